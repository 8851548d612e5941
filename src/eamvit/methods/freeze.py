"""Attention freezing (EAM eq. 15) and its random ablation (§5.2.2): the τ fraction of attention entries
(or rows, or heads) with the lowest entropy take the mean map ``A^μ``.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from eamvit.config import Config
from eamvit.modules.attention import attention_layers, executes_plans, require, set_frozen
from eamvit.io import load_tensors, save_tensors
from eamvit.methods.calibrate import CalibOptions, EntropyMaps, compute_entropy_maps
from eamvit.methods.data import add_calibration
from eamvit.methods.models import check_attention_shapes, model_spec
from eamvit.errors import EamError
from eamvit.methods.state import peek, state_of, step_config
from eamvit.methods.steps import StepHandler, StepInputs, register_step
from eamvit.ops.quant import log2_fake_quant, logsqrt2_fake_quant, uniform_fake_quant

from eamvit.choices import (AGGREGATES, GRANULARITIES, SCOPES, SELECTIONS, VALUE_QUANTIZERS,  # noqa: F401 (defined torch-free for the CLI)
                            Aggregate, Granularity, Scope, Selection, ValueQuantizer)


@dataclass(frozen=True)
class FreezeConfig(Config):
    """How to freeze.

    Args:
        tau: fraction of entries to freeze, in [0, 1] (the paper's sparsity level τ).
        scope: over which set the τ fraction is taken: ``"head"``, ``"layer"`` or ``"global"``; ``None`` =
            ``"head"`` for entries, ``"layer"`` for rows and heads.
        selection: ``"entropy"`` (lowest entropy first) or ``"random"`` (the ablation).
        value_bits: precision of the frozen values; ``None`` keeps fp32 (EAM_32bits), 4 is the
            paper's EAM_4bits.
        value_quantizer: ``"uniform"`` on [0, 1], ``"log2"`` or ``"logsqrt2"`` (Δ = 1 unless
            per-layer deltas are given to :func:`frozen_values`).
        aggregate: how a row's or head's entries' entropies rank it: ``"mean"``, ``"median"``, ``"max"``.
        execute: skip the work of frozen rows/heads in the layers whose class can (heads: the classes
            ``eamvit models`` lists with executed heads; rows: ViT's); ``False`` simulates them with
            ``torch.where`` (same numbers, no saving). Entry freezing is always simulated.
    """

    tau: float = 0.0
    scope: Optional[Scope] = None
    selection: Selection = "entropy"
    seed: int = 0
    value_bits: Optional[int] = None
    value_quantizer: ValueQuantizer = "uniform"
    granularity: Granularity = "entry"
    aggregate: Aggregate = "mean"
    execute: bool = True

    KIND = "freeze"
    VERSION = 1

    @property
    def resolved_scope(self) -> str:
        return self.scope or ("head" if self.granularity == "entry" else "layer")

    def _check(self) -> None:
        if not 0.0 <= self.tau <= 1.0:  # NaN too
            raise EamError(f"sparsity tau={self.tau} is outside [0, 1]; give a fraction such as 0.2")
        if self.granularity != "entry" and self.scope == "head":
            raise EamError(f"scope 'head' does not apply to granularity {self.granularity!r} (whole units are frozen); "
                           "use scope layer or global")
        if self.value_bits is not None and not 1 <= self.value_bits <= 16:
            raise EamError(f"frozen-value bits {self.value_bits} outside 1..16 (or omit for fp32)")


def _k(tau: float, n: int) -> int:
    return min(n, int(math.floor(tau * n + 0.5)))


def _head_rows(t: torch.Tensor) -> torch.Tensor:
    """``(H, n)`` view of one layer's map: heads are dim -3 for both ``(H,N,N)`` and ``(nW,H,N,N)``."""
    return t.movedim(-3, 0).reshape(t.shape[-3], -1)


def _from_head_rows(rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    moved = (shape[-3],) + tuple(s for i, s in enumerate(shape) if i != len(shape) - 3)
    return rows.reshape(moved).movedim(0, -3)


def _picker(selection: str, g: torch.Generator):
    """``pick(scores, k)``: the mask of the ``k`` units to freeze among 1-D ``scores``."""
    def pick(scores: torch.Tensor, k: int) -> torch.Tensor:
        mask = torch.zeros(scores.numel(), dtype=torch.bool)
        if selection == "entropy":  # the k lowest, ties to the lower index
            mask[torch.sort(scores.double(), stable=True).indices[:k]] = True
        elif k:  # no draw for k = 0: the stream stays that of the units that freeze
            mask[torch.randperm(scores.numel(), generator=g)[:k]] = True
        return mask
    return pick


def freeze_masks(entropy: Sequence[torch.Tensor], tau: float, scope: Optional[str] = None,
                 selection: str = "entropy", seed: int = 0, granularity: str = "entry",
                 aggregate: str = "mean") -> list[torch.Tensor]:
    """Per layer, the boolean mask (the layer's shape) of the entries to freeze; settings as :class:`FreezeConfig`."""
    cfg = FreezeConfig(tau=tau, scope=scope, selection=selection, granularity=granularity,
                       aggregate=aggregate)
    scope = cfg.resolved_scope
    g = torch.Generator().manual_seed(seed)
    pick = _picker(selection, g)
    ent = [e.detach().cpu() for e in entropy]
    if granularity != "entry":
        return _unit_masks(ent, tau, scope, selection, g, granularity, aggregate)
    if scope == "global":
        flat = torch.cat([e.reshape(-1) for e in ent])
        mask = pick(flat, _k(tau, flat.numel()))
        return [m.view(e.shape) for m, e in zip(torch.split(mask, [e.numel() for e in ent]), ent)]
    if scope == "layer":
        return [pick(e.reshape(-1), _k(tau, e.numel())).view(e.shape) for e in ent]
    return [_from_head_rows(torch.stack([pick(r, _k(tau, r.numel())) for r in _head_rows(e)]), tuple(e.shape))
            for e in ent]


def _units(e: torch.Tensor, granularity: str) -> torch.Tensor:
    """``(units, entries per unit)`` view of one layer's map: heads, or query rows over all heads."""
    if granularity == "head":
        return _head_rows(e)
    if e.dim() == 4:
        raise EamError("row granularity does not apply to Swin: a row there is one (window, token) pair, so "
                       "windows would keep different numbers of rows; use entry or head")
    return e.transpose(0, 1).reshape(e.shape[1], -1)


def _expand_units(units: torch.Tensor, shape: tuple[int, ...], granularity: str) -> torch.Tensor:
    view = (1, -1, 1) if granularity != "head" else (-1, 1, 1) if len(shape) == 3 else (1, -1, 1, 1)
    return units.view(view).expand(shape).clone()


def _unit_masks(ent: list[torch.Tensor], tau: float, scope: str, selection: str, g: torch.Generator,
                granularity: str, aggregate: str) -> list[torch.Tensor]:
    reduce = {"mean": lambda u: u.double().mean(1), "median": lambda u: u.double().median(1).values,
              "max": lambda u: u.double().amax(1)}[aggregate]
    units = [_units(e, granularity) for e in ent]
    scores = [reduce(u) for u in units]
    if scope == "layer":
        chosen = [_picker(selection, g)(s, _k(tau, s.numel())) for s in scores]
    else:
        flat = torch.cat(scores)
        sizes = torch.cat([torch.full((u.shape[0],), u.shape[1]) for u in units])
        order = torch.sort(flat, stable=True).indices if selection == "entropy" else torch.randperm(flat.numel(), generator=g)
        picked = torch.zeros(flat.numel(), dtype=torch.bool)
        # As many units, taken in order, as bring the frozen entries closest to τ of them (ties: more).
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), sizes[order].double().cumsum(0)])
        err = (cum - tau * float(sizes.sum())).abs()
        picked[order[:int((err == err.min()).nonzero().max())]] = True
        chosen = list(torch.split(picked, [s.numel() for s in scores]))
    return [_expand_units(c, tuple(e.shape), granularity) for c, e in zip(chosen, ent)]


def frozen_values(mean: torch.Tensor, bits: Optional[int] = None, quantizer: str = "uniform",
                  delta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The values frozen entries take: ``A^μ`` in fp32, or fake-quantized to ``bits`` (``uniform``: ``2^b``
    levels on [0, Δ]; ``log2``/``logsqrt2``: Δ the largest level, 1 for softmax outputs unless calibrated)."""
    if bits is None:
        return mean.float()
    if quantizer == "uniform":
        return uniform_fake_quant(mean.float(), delta / ((1 << bits) - 1), 0.0, bits)
    if quantizer == "log2":
        return log2_fake_quant(mean.float(), delta, bits)
    if quantizer == "logsqrt2":
        return logsqrt2_fake_quant(mean.float(), delta, bits)
    raise EamError(f"frozen-value quantizer {quantizer!r} is not one of {', '.join(VALUE_QUANTIZERS)}")


@dataclass
class FreezeReport:
    """What a freeze did: ``frozen_fraction`` of all attention entries, per-layer counts, and for
    Swin how many frozen entries are ones the shifted-window mask already forces to ≈ 0. For rows and
    heads, ``units_per_layer`` counts the frozen rows/heads and ``executed`` says whether their work is
    skipped (otherwise simulated)."""

    tau: float
    scope: str
    selection: str
    frozen: int
    total: int
    frozen_per_layer: list[int]
    frozen_window_masked: int
    window_masked_total: int
    granularity: str = "entry"
    units_per_layer: list[int] = field(default_factory=list)
    executed: bool = False

    @property
    def frozen_fraction(self) -> float:
        return self.frozen / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "frozen_fraction": self.frozen_fraction}


def freeze_(model: nn.Module, maps: EntropyMaps, config: FreezeConfig,
            value_deltas: Optional[Sequence[float | torch.Tensor]] = None) -> FreezeReport:
    """Freeze the attention of ``model`` in place; τ = 0 leaves outputs exactly unchanged.

    Args:
        maps: entropy maps of this model.
        value_deltas: optional per-layer Δ for the frozen-value quantizer (RepQ's log√2 scale).
    """
    maps.check_model(model)
    layers = attention_layers(model)
    require(layers, config.granularity)  # before any layer is touched: nothing half-frozen
    # Layers whose class cannot execute plans simulate their rows and heads; the report says so.
    executing = [config.execute and executes_plans(m, config.granularity) for m in layers]
    masks = freeze_masks(maps.entropy, config.tau, config.resolved_scope, config.selection, config.seed,
                         config.granularity, config.aggregate)
    plan = config.granularity if config.granularity != "entry" else None
    per_layer, frozen_masked, masked_total = [], 0, 0
    for l, (module, mask) in enumerate(zip(layers, masks)):
        k = int(mask.sum())
        per_layer.append(k)
        if maps.masked[l] is not None:
            wm = maps.masked[l].unsqueeze(1).expand(mask.shape)  # (nW, N, N) -> (nW, H, N, N)
            frozen_masked += int((mask & wm).sum())
            masked_total += int(wm.sum())
        device = next(module.parameters()).device
        if k == 0:
            set_frozen(module, None, None)
            continue
        delta = 1.0 if value_deltas is None else value_deltas[l]
        values = frozen_values(maps.mean[l], config.value_bits, config.value_quantizer, delta)
        set_frozen(module, mask.to(device), values.to(device), plan, executing[l])
    if sum(per_layer):  # the frozen values are the calibration images' mean attention
        add_calibration(model, maps.meta.get("calibration") or [])
    state_of(model).steps["freeze"] = config
    units = [_units(m, config.granularity).all(1).sum().item() if config.granularity != "entry" else 0
             for m in masks]
    return FreezeReport(tau=float(config.tau), scope=config.resolved_scope, selection=config.selection,
                        frozen=sum(per_layer), total=sum(m.numel() for m in masks), frozen_per_layer=per_layer,
                        frozen_window_masked=frozen_masked, window_masked_total=masked_total,
                        granularity=config.granularity, units_per_layer=[int(u) for u in units],
                        executed=plan is not None and all(executing))


def unfreeze_(model: nn.Module) -> None:
    """Remove all frozen attention entries."""
    for module in attention_layers(model):
        set_frozen(module, None, None)
    st = peek(model)
    if st is not None:
        st.steps.pop("freeze", None)


def frozen_digest(model: nn.Module) -> Optional[str]:
    """SHA-256 of ``model``'s frozen attention (per layer: granularity, mask and values), ``None`` if none:
    a training checkpoint records which frozen maps it was trained with."""
    h, any_frozen = hashlib.sha256(), False
    for l, m in enumerate(attention_layers(model)):
        if m.eam_frozen_mask is None:
            continue
        any_frozen = True
        mask, values = m.eam_frozen_mask.detach().cpu(), m.eam_frozen_values.detach().float().cpu()
        h.update(f"{l}:{m.eam.granularity}:{tuple(mask.shape)};".encode())
        h.update(mask.contiguous().numpy().tobytes())
        h.update(values.contiguous().numpy().tobytes())
    return h.hexdigest() if any_frozen else None


FROZEN_FORMAT = "eamvit-frozen/1"


def frozen_content(model: nn.Module, config: Optional[FreezeConfig] = None) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of ``model``'s frozen attention (``config`` recorded), as :func:`save_frozen` writes."""
    tensors, plans = {}, []
    for l, m in enumerate(attention_layers(model)):
        frozen = m.eam_frozen_mask is not None
        if frozen:
            tensors[f"mask.{l}"], tensors[f"values.{l}"] = m.eam_frozen_mask, m.eam_frozen_values.float()
        plans.append({"granularity": m.eam.granularity, "execute": m.eam.plan is not None} if frozen else None)
    meta = {"format": FROZEN_FORMAT, "model": model_spec(model).name, "layers": plans,
            "config": asdict(config) if config is not None else None}
    return tensors, meta


def save_frozen(model: nn.Module, path: str, config: Optional[FreezeConfig] = None) -> None:
    """Write the frozen attention of ``model`` (masks, values, granularity; ``config`` recorded) to a
    safetensors file, atomically. The weights are not included (they are the model's own state dict)."""
    save_tensors(path, *frozen_content(model, config))


def load_frozen(model: nn.Module, path: str) -> dict:
    """Put the frozen attention of a :func:`save_frozen` file on ``model`` (replacing any); returns its metadata."""
    meta, tensors = load_tensors(path, FROZEN_FORMAT, "frozen attention",
                                 "write one with `eamvit finetune --maps MAPS --tau T`")
    restore_frozen(model, meta, tensors, path)
    return meta


def restore_frozen(model: nn.Module, meta: dict, tensors: dict, path: str) -> None:
    """Put frozen attention read from ``path`` (:func:`frozen_content`'s ``tensors`` and ``meta``) on ``model``."""
    layers = attention_layers(model)
    plans = meta.get("layers") or []
    if len(plans) != len(layers):
        raise EamError(f"frozen attention {path} has {len(plans)} layers but the model has {len(layers)}; "
                       "load it on the model it was written for")
    check_attention_shapes(model, [tuple(tensors[f"mask.{l}"].shape) if f"mask.{l}" in tensors else None
                                   for l in range(len(layers))],
                           f"frozen attention {path}", "load it on the model it was written for")
    for l, (m, plan) in enumerate(zip(layers, plans)):
        if plan is None:
            set_frozen(m, None, None)
            continue
        mask, values = tensors.get(f"mask.{l}"), tensors.get(f"values.{l}")
        heads = getattr(m, "num_heads", None) or m.heads  # Hiera's mask-unit attention calls them heads
        if mask is None or values is None or mask.shape != values.shape or mask.shape[-3] != heads:
            raise EamError(f"frozen attention {path}: layer {l} does not fit the model ({heads} heads); "
                           "load it on the model it was written for")
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()) or bool((values > 1).any()):
            raise EamError(f"frozen attention {path}: layer {l} holds values that are not attention weights "
                           "(non-finite, or outside [0, 1]); the file is damaged: write it again")
        device = next(m.parameters()).device
        gran = plan["granularity"]
        set_frozen(m, mask.bool().to(device), values.to(device), None if gran == "entry" else gran,
                   bool(plan.get("execute", True)))
    stored = meta.get("config")
    state_of(model).steps["freeze"] = FreezeConfig.from_dict(stored) if stored is not None else FreezeConfig()


def _value_deltas(model: nn.Module, value_quantizer: str) -> Optional[list]:
    """Per-layer Δ of a quantized model's log post-softmax quantizer, which log-quantized frozen values share;
    ``None`` (values on their own scale) unless both are logarithmic."""
    from eamvit.methods.repq import attn_deltas
    from eamvit.modules.quantizers import Log2Quantizer, LogSqrt2Quantizer

    cfg = step_config(model, "quant")
    if cfg is None or value_quantizer not in ("log2", "logsqrt2") or getattr(cfg, "attn_quantizer", None) == "uniform":
        return None
    quantizers = [getattr(getattr(m, "eam_quant", None), "attn", None) for m in attention_layers(model)]
    if any(q is not None and not isinstance(q, (Log2Quantizer, LogSqrt2Quantizer)) for q in quantizers):
        return None
    return attn_deltas(model)


def _apply_step(model: nn.Module, config: FreezeConfig, inputs: StepInputs) -> FreezeReport:
    maps = inputs.maps(model) if callable(inputs.maps) else inputs.maps
    if maps is None:
        maps = compute_entropy_maps(model, inputs.calib, progress=inputs.progress,
                                    options=CalibOptions(device=inputs.device))
    return freeze_(model, maps, config, value_deltas=_value_deltas(model, config.value_quantizer))


def _restore_step(model: nn.Module, config: FreezeConfig, meta: dict, tensors: dict, path: str) -> None:
    stored = meta.get("config")
    if stored is not None and stored != asdict(config):
        raise EamError(f"{path}: its recipe's freezing step ({_settings(config)}) is not the one its frozen "
                       f"attention was made with ({stored if not isinstance(stored, dict) else _settings(stored)}); "
                       "the file was edited: compress the model again with `eamvit compress`")
    restore_frozen(model, meta, tensors, path)


def _settings(config: FreezeConfig | dict) -> str:
    d = asdict(config) if isinstance(config, FreezeConfig) else config
    return ", ".join(f"{k}={d.get(k)!r}" for k in ("tau", "granularity", "selection", "value_bits"))


register_step(FreezeConfig, StepHandler(stage="freeze", order=20, apply=_apply_step, restore=_restore_step,
                                        content=frozen_content))
