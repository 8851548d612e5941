"""One quantizer family for the whole project (uniform, log2, log√2); methods build on it.

* :mod:`.functional`: the fake-quantization arithmetic.
* :mod:`.quantizers`: modules with range search, per-tensor/channel/token granularity, lazy init.
* :mod:`.repq`: RepQ-ViT (:func:`quantize_`, :class:`RepQConfig`, save/load of the quantized state).
* :mod:`.sweep`: EAM on the quantized model (imported on use: it depends on :mod:`eamvit.freeze`,
  which itself uses :mod:`.functional`).
"""
from .functional import log2_fake_quant, logsqrt2_fake_quant, uniform_fake_quant
from .quantizers import (Log2Quantizer, LogSqrt2Quantizer, Quantizer, UniformQuantizer, find_quantizers,
                         make_quantizer, set_quant_enabled)
from .repq import RepQConfig, attn_deltas, load_quantized, quantize_, save_quantized

__all__ = ["uniform_fake_quant", "log2_fake_quant", "logsqrt2_fake_quant", "Quantizer", "UniformQuantizer",
           "LogSqrt2Quantizer", "Log2Quantizer", "make_quantizer", "find_quantizers", "set_quant_enabled",
           "RepQConfig", "quantize_", "save_quantized", "load_quantized", "attn_deltas"]
