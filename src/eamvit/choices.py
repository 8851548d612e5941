"""Choice lists and command-line-visible defaults, defined once and free of torch (imports only
``typing``): each a ``Literal`` type for the configs' fields and the tuple of its values for the command's
``choices``. See docs/architecture-core.md."""
from __future__ import annotations

from typing import Literal, get_args

# Attention freezing (eamvit.methods.freeze).
Scope = Literal["head", "layer", "global"]
SCOPES = get_args(Scope)
Granularity = Literal["entry", "row", "head"]
GRANULARITIES = get_args(Granularity)
Aggregate = Literal["mean", "median", "max"]
AGGREGATES = get_args(Aggregate)
Selection = Literal["entropy", "random"]
SELECTIONS = get_args(Selection)
ValueQuantizer = Literal["uniform", "log2", "logsqrt2"]
VALUE_QUANTIZERS = get_args(ValueQuantizer)

# Token pruning (eamvit.methods.prune).
PruneMethod = Literal["shannon", "renyi", "evit", "random"]
PRUNE_METHODS = get_args(PruneMethod)
Placement = Literal["attn", "block"]
PLACEMENTS = get_args(Placement)
EntropyKeys = Literal["all", "patches"]
ENTROPY_KEYS = get_args(EntropyKeys)

# Token merging (eamvit.methods.merge): ToMe's bipartite soft matching, or entropy-guided merging.
MergeSelection = Literal["tome", "entropy"]
MERGE_SELECTIONS = get_args(MergeSelection)

# Training augmentation (eamvit.methods.train): "auto" is imagenet from IMAGENET_MIN_SIZE pixels a
# side, shift below (random-resized crops and colour jitter destroy smaller images).
AUGMENTS = ("auto", "none", "shift", "imagenet")
IMAGENET_MIN_SIZE = 64

# Quantization: the --quant methods, the post-softmax quantizers of RepQ-ViT (first: the default),
# and the rows of ``eamvit compare``.
QuantMethod = Literal["repq", "adfq", "pmq"]
QUANT_METHODS = get_args(QuantMethod)
AttnQuantizer = Literal["logsqrt2", "log2", "uniform"]
ATTN_QUANTIZERS = get_args(AttnQuantizer)
CompareMethod = Literal["fp", "repq", "adfq", "pmq"]
COMPARE_METHODS = get_args(CompareMethod)

# ADFQ-ViT defaults the command shows (eamvit.methods.adfq.ADFQConfig uses the same names):
# the reference code's values, where the paper says 3000 iterations and an fc1 threshold of 10.
ADFQ_ITERATIONS = 5000
ADFQ_CALIB_SIZE = 1024
ADFQ_ALPHA_FC1 = 5.0
