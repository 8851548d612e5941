"""One quantizer family for the whole project (uniform, log2, log√2); methods build on it."""
from .functional import log2_fake_quant, logsqrt2_fake_quant, uniform_fake_quant

__all__ = ["uniform_fake_quant", "log2_fake_quant", "logsqrt2_fake_quant"]
