"""Layer 1: pure tensor math (entropy and histograms, fake quantization, token scores, Pareto, cost
model, bit packing). Imports nothing from eamvit but :mod:`eamvit.errors`."""
