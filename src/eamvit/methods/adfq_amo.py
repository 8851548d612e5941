"""ADFQ-ViT's Attention-score enhanced Module-wise Optimization (AMO), the reconstruction loop of
:mod:`eamvit.methods.adfq` (docs/architecture-quant-export.md)."""
from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any, Optional

import torch
from timm.layers import Mlp
from torch import nn
from tqdm.auto import tqdm

from eamvit.errors import EamError
from eamvit.io import atomic_path
from eamvit.methods.quant_registry import QuantRun
from eamvit.modules.adfq import (AdaRoundQuantizer, LearnableLog2Quantizer, LearnableLogSqrt2Quantizer,
                                 LearnableUniformQuantizer, beta_schedule, round_loss)
from eamvit.modules.adapters import EamBase
from eamvit.modules.attention import observe
from eamvit.modules.quantizers import DELTA_FLOOR, Quantizer, set_quant_enabled

FORMAT = "eamvit-adfq-unit/1"
_LEARNABLE = (LearnableUniformQuantizer, LearnableLogSqrt2Quantizer, LearnableLog2Quantizer)
ADFQConfig = Any  # eamvit.methods.adfq.ADFQConfig (that module imports this one)


def _blocks(model: nn.Module) -> list[list[nn.Module]]:
    """The children, in order, of each module holding an instrumented attention as a direct child."""
    return [list(m.children()) for m in model.modules() if any(isinstance(c, EamBase) for c in m.children())]


def mlps(model: nn.Module) -> list[nn.Module]:
    """The timm ``Mlp`` modules (exact type) beside an instrumented attention, in module order."""
    return [c for kids in _blocks(model) for c in kids if type(c) is Mlp]


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The reconstruction units in forward order: per block, ``("attn", attention)`` and ``("mlp", mlp)``
    in the order the block holds them (TNT: inner attention and MLP, then outer)."""
    return [("attn", c) if isinstance(c, EamBase) else ("mlp", c) for kids in _blocks(model) for c in kids
            if isinstance(c, EamBase) or type(c) is Mlp]


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


def _windows(attn: torch.Tensor) -> torch.Tensor:
    """An observed map as ``(B·groups, H, N, N)``, the shape the attention module computes it in."""
    return attn.reshape((-1,) + tuple(attn.shape[-3:]))


def _capture(model: nn.Module, unit: nn.Module, images: torch.Tensor, batch_size: int,
             layer: Optional[int], quant: bool) -> dict[str, Any]:
    """Inputs, outputs (and, for attention layer ``layer``, its post-quantizer maps) of ``unit`` over
    ``images``, stopping each forward there; per image as ``(n, g, ...)``, ``g`` unit calls per image (windows)."""
    device = next(model.parameters()).device
    got: dict[str, Any] = {"x": [], "y": [], "a": [], "kwargs": None, "args": ()}

    def hook(module, args, kwargs, output):
        got["x"].append(args[0].detach())
        got["y"].append(_main(output).detach())
        if got["kwargs"] is None:  # the rest of the call is the same for every batch (masks, grid sizes)
            got["kwargs"] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            got["args"] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:])
        raise _Stop

    observers = {layer: lambda attn, mask: got["a"].append(_windows(attn).detach())} if layer is not None else {}
    handle = unit.register_forward_hook(hook, with_kwargs=True)
    set_quant_enabled(model, quant)
    try:
        with torch.no_grad(), observe(model, observers, stage="quantized"):
            for i in range(0, images.shape[0], batch_size):
                with contextlib.suppress(_Stop):
                    model(images[i:i + batch_size].to(device))
    finally:
        handle.remove()
        set_quant_enabled(model, True)
    out = {"kwargs": got["kwargs"] or {}, "args": got["args"]}
    out.update({k: torch.cat(got[k]).unflatten(0, (images.shape[0], -1)) for k in ("x", "y", "a") if got[k]})
    return out


def _main(output: Any) -> torch.Tensor:
    """A unit's output tensor (MViTv2's attention also returns its pooled grid size)."""
    return output[0] if isinstance(output, tuple) else output


def _run(unit: nn.Module, x: torch.Tensor, data: dict) -> torch.Tensor:
    """``unit`` on ``x`` with the rest of the call it was captured with."""
    return _main(unit(x, *data.get("args", ()), **data["kwargs"]))


def _flat(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    s = t[idx]
    return s.reshape((-1,) + tuple(s.shape[2:]))


def _kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p‖q) along the last dim (p: full-precision attention, q: quantized). Quantized rows
    no longer sum to 1 (log levels, codes past the last level are 0): they are renormalised so the term is a
    true KL divergence (≥ 0); the MSE term keeps the scale."""
    tiny = torch.finfo(q.dtype).tiny
    q = q / q.sum(-1, keepdim=True).clamp_min(tiny)
    return (p * (torch.log(p.clamp_min(tiny)) - torch.log(q.clamp_min(tiny)))).sum(-1).mean()


def _unit_loss(unit: nn.Module, x: torch.Tensor, y: torch.Tensor, a: Optional[torch.Tensor],
               data: dict, seen: dict, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reconstruction loss, KL)``: ``Σ_tokens‖ŷ − y‖²`` averaged over the batch (the code's lp_loss), and KL
    against ``seen["a"]``, the quantized attention map of this forward (set by an observer), with its graph."""
    seen.pop("a", None)
    out = _run(unit, x, data)
    rec = (out - y).pow(2).sum(1).mean()
    kl = torch.zeros((), device=x.device)
    if a is not None and kl_weight > 0 and "a" in seen:
        kl = _kl_rows(a, seen.pop("a"))
    return rec, kl


@torch.no_grad()
def _unit_mse(unit: nn.Module, data: dict, batch_size: int) -> float:
    """Mean squared error of the unit's (quantized) output against the full-precision target."""
    total, count = 0.0, 0
    n = data["x"].shape[0]
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(i + batch_size, n))
        d = _run(unit, _flat(data["x"], idx), data) - _flat(data["y"], idx)
        total += float(d.pow(2).sum())
        count += d.numel()
    return total / count


def _fingerprint(model: nn.Module, config: ADFQConfig, images: torch.Tensor) -> str:
    """What a checkpoint must match to be reused: settings, weights and calibration images."""
    h = hashlib.sha256(repr(sorted(config.to_dict().items())).encode())
    for t in list(model.state_dict().values())[:8] + [images[: min(8, images.shape[0])]]:
        h.update(t.detach().cpu().float().numpy().tobytes())
    h.update(str(tuple(images.shape)).encode())
    return h.hexdigest()


def _finish(unit: nn.Module) -> None:
    """Back to plain buffers: hard rounding, positive step sizes."""
    for m in unit.modules():
        if isinstance(m, AdaRoundQuantizer):
            m.alpha = m.alpha.detach().clone()
            m.mode = "hard"
        elif isinstance(m, _LEARNABLE) and m.inited:
            m.delta = m.delta.detach().clamp_min(DELTA_FLOOR).clone()


def _optimizers(unit: nn.Module, config: ADFQConfig) -> tuple[list, Any, list[AdaRoundQuantizer]]:
    """``(Adam for V and Adam for Δ where there are any, Δ's cosine schedule or None, AdaRound quantizers)``. V and Δ
    become leaf tensors that require grad but stay buffers, so the structure and ``state_dict`` keys never change."""
    w, a = [], []
    for m in unit.modules():
        if isinstance(m, AdaRoundQuantizer):
            m.mode = "soft"
            m.alpha = m.alpha.detach().clone().requires_grad_(True)
            w.append(m.alpha)
        elif config.learn_act and isinstance(m, _LEARNABLE) and m.enabled and m.inited:
            m.delta = m.delta.detach().clone().requires_grad_(True)
            a.append(m.delta)
    opts = [torch.optim.Adam(p, lr=lr) for p, lr in ((w, config.w_lr), (a, config.a_lr)) if p]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opts[-1], T_max=config.iterations, eta_min=0.0) if a else None
    return opts, sched, [m for m in unit.modules() if isinstance(m, AdaRoundQuantizer)]


def _reconstruct_unit(model: nn.Module, unit: nn.Module, layer: Optional[int], data: dict, config: ADFQConfig,
                      bar: Any, gen: torch.Generator) -> list[float]:
    """AdaRound + step-size learning of one unit on cached data; returns the loss history (every step).
    ``layer``: an attention unit's layer number (its quantized map enters the KL term)."""
    frozen = [p for p in unit.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    opts, sched, ada = _optimizers(unit, config)
    n, seen, losses = data["x"].shape[0], {}, []
    observers = {layer: lambda attn, mask: seen.__setitem__("a", _windows(attn))} if layer is not None else {}
    try:
        with torch.enable_grad(), observe(model, observers, stage="quantized"):
            for it in bar:
                idx = torch.randint(0, n, (min(config.batch_size, n),), generator=gen)
                rec, kl = _unit_loss(unit, _flat(data["x"], idx), _flat(data["y"], idx),
                                     _flat(data["a"], idx) if "a" in data else None, data, seen,
                                     config.kl_weight)
                beta = beta_schedule(it, config.iterations, config.beta_start, config.beta_end, config.warmup)
                rnd = sum((round_loss(m.alpha, beta, config.zeta, config.gamma) for m in ada),
                          torch.zeros((), device=rec.device))
                if it + 1 < config.warmup * config.iterations:
                    rnd = rnd * 0
                loss = rec + config.kl_weight * kl + config.round_weight * rnd
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in [*opts, sched] if sched is not None else opts:
                    o.step()
                losses.append(float(loss.detach()))
                if it % 10 == 0 or it + 1 == config.iterations:
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", rec=f"{float(rec.detach()):.4g}",
                                    kl=f"{float(kl.detach()):.3g}", beta=f"{beta:.1f}")
    finally:
        bar.close()
        _finish(unit)
        for p in frozen:
            p.requires_grad_(True)
    return losses


def _resume(unit: nn.Module, path: Optional[Path], fp: str) -> Optional[dict]:
    """The saved report row of a finished unit (its state loaded into ``unit``), or None."""
    if path is None or not path.is_file():
        return None
    try:  # weights_only: a pickle that names classes or code is refused, never executed
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or pickled objects: many exception types
        raise EamError(f"cannot read ADFQ-ViT checkpoint {path} ({type(e).__name__}): it is corrupt or holds "
                       "pickled objects, which eamvit does not execute; delete it or use another "
                       "--adfq-checkpoint-dir") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("fingerprint") != fp:
        raise EamError(f"checkpoint {path} was made with other settings, weights or images; "
                       "use another checkpoint_dir or delete it")
    device = next(unit.parameters()).device
    for key, t in saved["state"].items():
        name, p = key.rsplit(".", 1)
        setattr(unit.get_submodule(name), p, t.to(device))
    for m in unit.modules():
        if isinstance(m, AdaRoundQuantizer):
            m.mode = "hard"
    return saved["row"]


def reconstruct_(model: nn.Module, images: torch.Tensor, config: ADFQConfig, run: QuantRun) -> list[dict[str, Any]]:
    """Attention-score enhanced Module-wise Optimization of an initialised ADFQ model, in place; with
    ``run.checkpoint_dir`` each finished unit is saved atomically and reused on a rerun with the same settings,
    weights and images. Returns per unit: ``unit``, ``kind``, ``mse_before`` (round-to-nearest), ``mse_after``,
    ``loss_first``, ``loss_last``, ``seconds``, ``resumed``."""
    ckpt_dir = Path(run.checkpoint_dir) if run.checkpoint_dir else None
    fp = _fingerprint(model, config, images) if ckpt_dir else ""
    gen = torch.Generator().manual_seed(config.seed)
    report, all_units = [], units(model)
    names = {id(m): n for n, m in model.named_modules()}
    for i, (kind, unit) in enumerate(all_units):
        layer = unit.eam.layer if kind == "attn" and getattr(unit, "eam_quant", None) is not None else None
        path = ckpt_dir / f"unit_{i:03d}.pt" if ckpt_dir else None
        row: dict[str, Any] = {"unit": names.get(id(unit), str(i)), "kind": kind}
        saved = _resume(unit, path, fp)
        if saved is not None:
            report.append({**row, **saved, "resumed": True})
            continue
        t0 = time.perf_counter()
        target = _capture(model, unit, images, config.batch_size, layer, quant=False)
        data = _capture(model, unit, images, config.batch_size, None, quant=True)
        data.update({k: target[k] for k in ("y", "a") if k in target})
        row["mse_before"] = _unit_mse(unit, data, config.batch_size)
        bar = tqdm(range(config.iterations), desc=f"ADFQ {kind} {i + 1}/{len(all_units)}", disable=not run.progress,
                   leave=False, dynamic_ncols=True)
        losses = _reconstruct_unit(model, unit, layer, data, config, bar, gen)
        row.update(mse_after=_unit_mse(unit, data, config.batch_size), loss_first=losses[0], loss_last=losses[-1],
                   seconds=time.perf_counter() - t0, resumed=False)
        report.append(row)
        if path is not None:
            state = {f"{n}.{p}": getattr(q, p).detach().cpu().clone() for n, q in unit.named_modules()
                     if isinstance(q, Quantizer) for p in q._param_names if getattr(q, p) is not None}
            with atomic_path(path) as tmp:
                torch.save({"format": FORMAT, "fingerprint": fp, "state": state, "row": row}, tmp)
    return report
