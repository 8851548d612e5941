"""Choice lists and command-line-visible defaults, defined once and free of torch.

The methods validate their configs against these tuples and the ``eamvit`` command offers them as
``choices``; both import them from here so that building the command's parser (``eamvit --help``)
imports neither torch nor timm. Imports nothing.
"""
from __future__ import annotations

# Attention freezing (eamvit.methods.freeze).
SCOPES = ("head", "layer", "global")
GRANULARITIES = ("entry", "row", "head")
AGGREGATES = ("mean", "median", "max")
SELECTIONS = ("entropy", "random")
VALUE_QUANTIZERS = ("uniform", "log2", "logsqrt2")

# Token pruning (eamvit.methods.prune).
PRUNE_METHODS = ("shannon", "renyi", "evit", "random")
PLACEMENTS = ("attn", "block")
ENTROPY_KEYS = ("all", "patches")

# Training augmentation (eamvit.methods.train): "auto" is imagenet from IMAGENET_MIN_SIZE pixels a
# side, shift below (random-resized crops and colour jitter destroy smaller images).
AUGMENTS = ("auto", "none", "shift", "imagenet")
IMAGENET_MIN_SIZE = 64

# Quantization: the --quant methods, the post-softmax quantizers of RepQ-ViT (first: the default),
# and the rows of ``eamvit compare``.
QUANT_METHODS = ("repq", "adfq", "pmq")
ATTN_QUANTIZERS = ("logsqrt2", "log2", "uniform")
COMPARE_METHODS = ("fp", "repq", "adfq", "pmq")

# ADFQ-ViT defaults the command shows (eamvit.methods.adfq.ADFQConfig uses the same names):
# the reference code's values, where the paper says 3000 iterations and an fc1 threshold of 10.
ADFQ_ITERATIONS = 5000
ADFQ_CALIB_SIZE = 1024
ADFQ_ALPHA_FC1 = 5.0
