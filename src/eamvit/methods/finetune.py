"""Fine-tuning a pruned, merged or frozen ViT (EViT's recipe by default) with the one training loop, resumable
(docs/architecture-quant-export.md)."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from eamvit.methods.state import state_of
from eamvit.errors import EamError
from eamvit.io import ensure_writable_dir, write_json
from eamvit.methods.freeze import FreezeConfig, frozen_digest, save_frozen
from eamvit.methods.models import model_spec, save_checkpoint
from eamvit.methods.prune import set_keep_rate
from eamvit.modules.prune_block import PruneState
from eamvit.methods.train import TrainConfig, train

CHECKPOINT = "finetune_ckpt.pth"
WEIGHTS = "finetuned.safetensors"
FROZEN = "frozen.safetensors"


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """EViT's fine-tuning recipe: :class:`~eamvit.methods.train.TrainConfig` plus the keep-rate schedule.

    Args:
        keep_warmup_epochs: epochs at κ = 1 before pruning starts (EViT's ``shrink_start_epoch``).
        keep_decay_epochs: epochs of the cosine from κ = 1 to the target (EViT's ``shrink_epochs``);
            0 = the target at once.
    """

    KIND: ClassVar[str] = "finetune"
    VERSION: ClassVar[int] = 1
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = TrainConfig.NON_NEGATIVE + ("keep_warmup_epochs", "keep_decay_epochs")

    keep_warmup_epochs: float = 0.0
    keep_decay_epochs: float = 0.0


def keep_rate_at(step: int, steps_per_epoch: int, target: float, config: FinetuneConfig) -> float:
    """EViT's ``adjust_keep_rate``: 1 during ``keep_warmup_epochs``, then a per-iteration cosine to
    ``target`` over ``keep_decay_epochs``, then ``target``."""
    start = config.keep_warmup_epochs * steps_per_epoch
    if step < start:
        return 1.0
    span = config.keep_decay_epochs * steps_per_epoch
    if step >= start + span:
        return target
    return target + (1.0 - target) * 0.5 * (math.cos((step - start) / span * math.pi) + 1)


def _identity(model: nn.Module, st: Optional[PruneState], freeze: Optional[FreezeConfig]) -> dict[str, Any]:
    """What a resumed run must match: the pruning, merging, freezing (each when present), the model. A
    pruned-only model gets exactly the identity it had before freezing was supported, so its checkpoints resume."""
    digest = frozen_digest(model)
    merging = state_of(model).merge
    if st is None and merging is None and digest is None and freeze is None:
        raise EamError("this model is not pruned, merged nor frozen; call prune_(model, PruneConfig(...)) or "
                       "merge_(model, MergeConfig(...)), and/or freeze_(model, maps, FreezeConfig(...)) first")
    if freeze is not None and freeze.tau > 0 and digest is None:
        raise EamError(f"freeze= says τ = {freeze.tau} but the model has no frozen attention; call "
                       "freeze_(model, maps, freeze) first")
    ident = {"prune": st.config.to_dict() if st is not None else None,
             "merge": merging.config.to_dict() if merging is not None else None,
             "freeze": {"config": asdict(freeze) if freeze is not None else None, "digest": digest}
             if digest is not None or freeze is not None else None, "model": model_spec(model).to_dict()}
    return {k: v for k, v in ident.items() if v is not None}


def finetune(model: nn.Module, train_ds: Dataset, config: FinetuneConfig = FinetuneConfig(),
             val_ds: Optional[Dataset] = None, out_dir: Optional[str | os.PathLike] = None, resume: bool = True,
             stop_after: Optional[int] = None, device: torch.device | str | None = None, workers: int = 0,
             progress: bool = True, data_config: Optional[dict[str, Any]] = None,
             freeze: Optional[FreezeConfig] = None) -> dict[str, Any]:
    """Fine-tune a pruned, merged and/or frozen model in place; a pruned model's keep rate follows
    :func:`keep_rate_at`.

    Args:
        model: pruned (:func:`~eamvit.methods.prune.prune_`; its κ is the target keep rate) or merged
            (:func:`~eamvit.methods.merge.merge_`), and/or frozen (:func:`~eamvit.methods.freeze.freeze_`; the
            frozen values stay fixed).
        config: the keep-rate options apply to pruned models only.
        out_dir: folder of the checkpoint, the final weights (``finetuned.safetensors``), the frozen attention
            when frozen (``frozen.safetensors``) and ``finetune.json``; nothing is written when ``None``.
        resume: continue from ``out_dir``'s checkpoint (same options and frozen masks and values required).
        data_config: the model's preprocessing (timm data config), saved with the weights.
        freeze: the :class:`~eamvit.methods.freeze.FreezeConfig` the model was frozen with, recorded in
            the checkpoint identity and the outputs (``None``: not recorded; the frozen maps' digest is).

    The other arguments and the result are :func:`eamvit.methods.train.train`'s.
    """
    st = state_of(model).prune
    ident = _identity(model, st, freeze)
    out = ensure_writable_dir(out_dir) if out_dir is not None else None
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    schedule = None
    if st is not None:
        target = st.config.keep_rate  # one κ, or one per pruning block (each follows the schedule)
        if st.method == "random":  # a fresh, checkpointed stream: runs and resumes repeat exactly
            st.generator = torch.Generator(device=dev).manual_seed(st.seed)

        def schedule(step: int, steps_per_epoch: int) -> dict[str, Any]:
            set_keep_rate(model, tuple(keep_rate_at(step, steps_per_epoch, t, config) for t in target)
                          if isinstance(target, tuple) else keep_rate_at(step, steps_per_epoch, target, config))
            if isinstance(st.keep_rate, tuple):  # one number per pruning block (the history and the bar show numbers)
                return {f"keep_rate_block{b}": k for b, k in zip(st.blocks, st.keep_rate)}
            return {"keep_rate": st.keep_rate}

    gens = [st.generator] if st is not None and st.generator is not None else []
    res = train(model, train_ds, config, val_ds=val_ds, checkpoint=out / CHECKPOINT if out is not None else None,
                resume=resume, stop_after=stop_after, schedule=schedule, identity=ident, generators=gens,
                device=dev, workers=workers, progress=progress, desc="finetune")
    if out is not None and res["epochs_done"] == config.epochs:
        extra = {"train": config.to_dict(), **{k: v for k, v in ident.items() if k != "model"}}
        save_checkpoint(model, out / WEIGHTS, data_config, extra=extra)
        if "freeze" in ident:
            save_frozen(model, str(out / FROZEN), freeze)
        write_json(out / "finetune.json", {**res, "identity": {**extra, "model": ident["model"]}})
    return res


def prune_method(prune: Optional[str], freezes: bool, merges: bool) -> Optional[str]:
    """The pruning method a fine-tuning run trains with: ``prune`` when asked for, else Shannon (so that
    ``finetune --keep-rate κ`` prunes) unless the run ``freezes`` attention or ``merges`` tokens (then none)."""
    return prune if prune is not None else None if freezes or merges else "shannon"
