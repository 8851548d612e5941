"""Layer 3: the public verbs (models and data, calibrate, freeze, prune, quantize, save/load, export,
train), one method a file. Imports from :mod:`eamvit.modules` and :mod:`eamvit.ops`."""
