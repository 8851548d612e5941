"""The one model-size rule: bytes of a model stored at its bit widths (every size column uses it)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from eamvit.modules.quantizers import Quantizer

# Quantizer tensors a deployed model needs: the scale and the zero point (AdaRound's variables are folded).
_SCALE_NAMES = ("delta", "zero_point")


@dataclass(frozen=True)
class ModelSize:
    """Storage of a model, in bytes: quantized weights packed at their bits, every other parameter and the
    quantizer scales and zero points at 32 bits."""

    weight_bytes: int
    fp32_param_bytes: int
    quant_param_bytes: int

    @property
    def model_bytes(self) -> int:
        return self.weight_bytes + self.fp32_param_bytes + self.quant_param_bytes

    @property
    def mb(self) -> float:
        """``model_bytes`` in MB (10^6 bytes)."""
        return self.model_bytes / 1e6

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "model_bytes": self.model_bytes}


def model_size(model: nn.Module) -> ModelSize:
    """Bytes to store ``model`` at its bit widths (what is counted and what not:
    ``docs/architecture-experiments.md``, "size"); a full-precision model is ``4 × parameters`` bytes."""
    quant_bits: dict[int, int] = {}
    for m in model.modules():
        wq, w = getattr(m, "weight_quantizer", None), getattr(m, "weight", None)
        if isinstance(wq, Quantizer) and wq.enabled and isinstance(w, nn.Parameter):
            quant_bits[id(w)] = wq.bits
    params = list(model.parameters())
    wbits = sum(p.numel() * quant_bits[id(p)] for p in params if id(p) in quant_bits)
    fp32 = sum(4 * p.numel() for p in params if id(p) not in quant_bits)
    param_ids = {id(p) for p in params}
    scales = 0
    for q in model.modules():
        if isinstance(q, Quantizer) and q.enabled:
            for name in _SCALE_NAMES:
                t = getattr(q, name, None)
                if t is not None and id(t) not in param_ids:
                    scales += 4 * t.numel()
    return ModelSize(weight_bytes=(wbits + 7) // 8, fp32_param_bytes=fp32, quant_param_bytes=scales)
