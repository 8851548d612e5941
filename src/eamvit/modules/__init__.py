"""Layer 2: ``nn.Module`` building blocks: the one attention instrumentation, quantizer modules,
pruning blocks. Imports from :mod:`eamvit.ops` only."""
