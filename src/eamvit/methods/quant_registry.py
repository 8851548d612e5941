"""What every quantization method declares (:class:`QuantizeHandler`), and the one calibration input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.methods.data import ForwardLoop, make_loader, random_subset

_MORE = ("give more calibration images (--calib-size, --calib-data) or lower the method's calibration size "
         "(--quant-calib-size; ADFQ-ViT: --adfq-calib-size)")


@dataclass
class QuantRun:
    """Runtime settings of one quantization (never saved with the config).

    Args:
        checkpoint_dir: folder for resumable per-module checkpoints (ADFQ-ViT), None: none.
        forward_loop: ``f(model)`` that runs the model over the calibration data, given instead of
            images (only to methods registered with ``forward_loop=True``).
    """

    progress: bool = True
    checkpoint_dir: Optional[str] = None
    forward_loop: Optional[ForwardLoop] = None


@dataclass(frozen=True)
class QuantizeHandler:
    """What a quantization method declares (``HANDLER`` in its file); :mod:`.quantize` registers it in the
    one step table as the ``"quant"`` step of its config type.

    Args:
        config: the method's :class:`~eamvit.config.Config` subclass (with a unique ``KIND``).
        quantize: ``f(model, config, calib, run) -> report``: surgery and calibration, in place.
        rebuild: ``f(model, config, structure)``: the surgery alone, as the finished model has it
            (for :func:`load_quantized`).
        structure: ``f(model) -> dict``: what ``rebuild`` needs beyond the config (JSON-ready); default none.
        free_bits: ``f(model, config) -> {quantizer name: allowed widths}``: the quantizers whose bits
            the method chooses itself (PMQ's mixed precision); every other quantizer of a loaded state
            must have the bits ``rebuild`` gives it from the config. Default none.
        forward_loop: whether ``quantize`` calibrates from ``run.forward_loop`` when ``calib`` is None.
    """

    config: type[Config]
    quantize: Callable[[nn.Module, Any, Any, QuantRun], dict]
    rebuild: Callable[[nn.Module, Any, dict], None]
    structure: Callable[[nn.Module], dict] = lambda model: {}
    free_bits: Callable[[nn.Module, Any], dict[str, tuple[int, ...]]] = lambda model, config: {}
    forward_loop: bool = False


def _as_pair(item: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(item, torch.Tensor):
        return item, None
    if hasattr(item, "images") and hasattr(item, "targets"):  # eamvit Batch
        return item.images, item.targets
    if isinstance(item, (tuple, list)) and len(item) >= 1 and isinstance(item[0], torch.Tensor):
        return item[0], (torch.as_tensor(item[1]) if len(item) > 1 else None)
    raise EamError(f"a calibration batch must be a tensor, an eamvit Batch or (images, targets), "
                   f"not {type(item).__name__}")


def calibration_batches(calib: Any, limit: int, *, seed: int = 0,
                        batch_size: int = 32) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(images, targets or None)`` batches of ``calib``, stopping after ``limit`` images.

    Args:
        calib: a ``(B, C, H, W)`` tensor, an ``(images, targets)`` pair, an iterable of batches (DataLoader of
            :class:`~eamvit.methods.data.Batch` or tuples) or a map-style dataset of ``(image, target)`` (a
            random subset of ``limit`` items drawn with ``seed``, in batches of ``batch_size``).
    """
    if calib is None:
        raise EamError("quantization needs calibration images")
    pair = (isinstance(calib, (tuple, list)) and len(calib) == 2 and all(isinstance(t, torch.Tensor) for t in calib)
            and calib[0].dim() == 4 and calib[1].dim() == 1)
    if isinstance(calib, torch.Tensor) or pair:
        source: Any = iter([tuple(calib)] if pair else [calib])
    elif isinstance(calib, Dataset) and hasattr(calib, "__len__") and hasattr(calib, "__getitem__"):
        if len(calib) < limit:
            raise EamError(f"calibration needs {limit} images but the calibration set has {len(calib)}; {_MORE}")
        source = iter(make_loader(calib, random_subset(calib, limit, seed=seed), batch_size=batch_size))
    else:
        source = iter(calib)
    taken = 0
    for item in source:
        images, targets = _as_pair(item)
        if images.numel() == 0:  # a batch whose every file was unreadable
            continue
        if images.dim() != 4:
            raise EamError(f"calibration images must be a (B, C, H, W) tensor, got shape {tuple(images.shape)}")
        images, targets = images[: limit - taken], (targets[: limit - taken] if targets is not None else None)
        taken += images.shape[0]
        if images.shape[0]:
            yield images, targets
        if taken >= limit:
            return


def calibration_images(calib: Any, n: int, *, seed: int = 0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The first ``n`` images of ``calib`` (:func:`calibration_batches`) and their labels (None unless all had them)."""
    batches = list(calibration_batches(calib, n, seed=seed, batch_size=max(1, min(n, 256))))
    got = sum(x.shape[0] for x, _ in batches)
    if got < n:
        raise EamError(f"calibration needs {n} images but {got} were given (or could be read); {_MORE}")
    y = torch.cat([y for _, y in batches]) if all(y is not None for _, y in batches) else None
    return torch.cat([x for x, _ in batches]), y
