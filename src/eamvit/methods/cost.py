"""What a model state costs: a per-layer, analytic account of the multiply-accumulates it executes and
saves (what each count means: docs/architecture-quant-export.md)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
from timm.layers import PatchEmbed
from torch import nn

from eamvit.errors import EamError
from eamvit.methods.models import data_config
from eamvit.methods.repq import classifier_heads
from eamvit.methods.state import state_of
from eamvit.modules.attention import ADAPTERS, attention_layers, executes_plans
from eamvit.ops.cost import (ATTENTION_OPS, NOT_MACS, AttentionShape, attention_macs, conv_macs,
                             entry_sparse_skippable, linear_macs, speedup)


@dataclass
class CostRow:
    """One op of one layer (the three counts: docs/architecture-quant-export.md)."""

    layer: Optional[int]
    part: str  # patch_embed, attention, mlp, head, other
    op: str
    tokens: int
    full: int
    executed: int
    skippable: int = 0
    how: str = ""
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None

    @property
    def is_mac(self) -> bool:
        return self.op not in NOT_MACS


@dataclass
class CostAccount:
    """The per-op rows of one model state, per image, and their totals."""

    rows: list[CostRow] = field(default_factory=list)

    def total(self, what: str = "executed") -> int:
        """Sum of ``what`` (``full``, ``executed`` or ``skippable``) over MAC rows."""
        return sum(getattr(r, what) for r in self.rows if r.is_mac)

    @property
    def gmacs(self) -> float:
        return self.total("executed") / 1e9

    @property
    def predicted_speedup(self) -> float:
        """``full / executed`` MACs: the speed-up if time were proportional to MACs."""
        return speedup(self.total("full"), self.total("executed"))

    def per_layer(self) -> list[dict[str, Any]]:
        """One dict per (layer, part): MACs full/executed/skippable and softmax exponentials."""
        out: dict[tuple, dict[str, Any]] = {}
        for r in self.rows:
            d = out.setdefault((r.layer, r.part), {"layer": r.layer, "part": r.part, "full": 0, "executed": 0,
                                                   "skippable": 0, "softmax_executed": 0, "how": ""})
            if r.is_mac:
                for k in ("full", "executed", "skippable"):
                    d[k] += getattr(r, k)
            else:
                d["softmax_executed"] += r.executed
            d["how"] = d["how"] or r.how
        return list(out.values())

    def summary(self) -> dict[str, Any]:
        """Totals in GMACs per image, the predicted speed-up and the softmax exponentials."""
        return {"gmacs_full": round(self.total("full") / 1e9, 6), "gmacs_executed": round(self.gmacs, 6),
                "gmacs_skippable": round(self.total("skippable") / 1e9, 6),
                "predicted_speedup": round(self.predicted_speedup, 4),
                "softmax_executed": sum(r.executed for r in self.rows if not r.is_mac)}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "rows": [asdict(r) for r in self.rows]}


def _bits(module: nn.Module) -> tuple[Optional[int], Optional[int]]:
    wq, aq = getattr(module, "weight_quantizer", None), getattr(module, "input_quantizer", None)
    return getattr(wq, "bits", None), getattr(aq, "bits", None)


def _owners(model: nn.Module, layers: Sequence[nn.Module]) -> dict[int, tuple[Optional[int], str]]:
    """``id(module) → (layer, part)`` for every Linear/Conv2d outside the attention modules."""
    inside_attn = {id(m) for a in layers for m in a.modules()}
    owner: dict[int, tuple[Optional[int], str]] = {}
    for block in model.modules():  # the module that holds an attention layer is its block
        for child in block.children():
            if child in layers:
                layer = layers.index(child)
                for m in block.modules():
                    if id(m) not in inside_attn:
                        owner.setdefault(id(m), (layer, "mlp"))
    patch_embeds = [m for m in model.modules() if isinstance(m, PatchEmbed)]
    for part, roots in (("patch_embed", patch_embeds), ("head", classifier_heads(model))):
        for m in (m for r in roots for m in r.modules()):
            owner[id(m)] = (None, part)
    return owner


def _record_shapes(model: nn.Module, layers: Sequence[nn.Module], x: torch.Tensor) -> tuple[list, dict]:
    """One forward of ``x``: input shapes of each attention layer, and per Linear/Conv2d call its shape."""
    attn_in: dict[int, tuple[int, ...]] = {}
    calls: list[tuple[nn.Module, tuple[int, ...], tuple[int, ...]]] = []
    inside_attn = {id(m) for a in layers for m in a.modules()}

    def on_attention(i: int):
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the inputs pass unchanged
            attn_in.setdefault(i, tuple(args[0].shape))
        return hook

    def on_linear(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        calls.append((module, tuple(args[0].shape), tuple(out.shape)))

    handles = [a.register_forward_pre_hook(on_attention(i)) for i, a in enumerate(layers)]
    handles += [m.register_forward_hook(on_linear) for m in model.modules()
                if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in inside_attn]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return calls, attn_in


def _plan_macs(module: nn.Module, s: AttentionShape, frozen_heads: int, frozen_rows: int) -> dict[str, int]:
    """Per-op work of ``module``'s executed plan: only the ops its executed path cuts (``Adapter.plan_skips``)."""
    cut, full = attention_macs(s, frozen_heads, frozen_rows), attention_macs(s)
    skips = module.eam.adapter.plan_skips
    return {op: cut[op] if op in skips else full[op] for op in ATTENTION_OPS}


def _attention_rows(layer: int, module: nn.Module, shape_in: tuple[int, ...], n_full: int) -> list[CostRow]:
    B_, N, C = shape_in
    H = module.num_heads
    d = module.qkv.weight.shape[0] // (3 * H)
    s = AttentionShape(tokens=N, windows=B_, dim=C, heads=H, head_dim=d, out_dim=module.proj.out_features)
    full = attention_macs(AttentionShape(n_full, B_, C, H, d, s.out_dim))
    mask, gran = module.eam_frozen_mask, module.eam.granularity
    units = int(module.eam_plan_frozen.numel()) if mask is not None and gran != "entry" else 0
    fh, fr = (units, 0) if gran == "head" else (0, units)
    # Observers are attached only for the length of an `observe` block, so they do not count here.
    executes = mask is not None and module.eam.plan is not None and module.eam_quant is None
    run = _plan_macs(module, s, fh, fr) if executes else attention_macs(s)
    skip, how = dict.fromkeys(ATTENTION_OPS, 0), ""
    if mask is not None and not executes:
        if gran == "entry":
            skip, how = entry_sparse_skippable(mask, s), "sparse kernel"
        elif executes_plans(module, gran):  # a layer that can only simulate its plan would skip nothing
            structured = _plan_macs(module, s, fh, fr)
            skip, how = {k: run[k] - structured[k] for k in run}, "executed path"
    qz = module.eam_quant
    a_bits = getattr(getattr(qz, "q", None), "bits", None) if qz is not None else None
    w_bits, x_bits = _bits(module.qkv)
    bits = {"q": (w_bits, x_bits), "k": (w_bits, x_bits), "v": (w_bits, x_bits), "qk": (None, a_bits),
            "softmax": (None, None), "av": (None, a_bits), "proj": _bits(module.proj)}
    return [CostRow(layer, "attention", op, N, full[op], run[op], skip[op], how if skip[op] else "", *bits[op])
            for op in ATTENTION_OPS]


def _linear_row(module: nn.Module, shape_in, shape_out, layer, part, scale: float) -> CostRow:
    if isinstance(module, nn.Conv2d):
        positions = shape_out[0] * shape_out[2] * shape_out[3]
        macs = conv_macs(positions, module.out_channels, module.in_channels, module.groups, module.kernel_size)
        tokens, op = positions, "conv"
    else:
        tokens = math.prod(shape_in[:-1])
        macs, op = linear_macs(tokens, module.in_features, module.out_features), "linear"
    return CostRow(layer, part, op, tokens, int(round(macs * scale)), macs, 0, "", *_bits(module))


def modelled(model: nn.Module) -> bool:
    """Whether the account models every attention layer of ``model`` (adapters that declare
    ``cost_modelled``: a fused qkv over one set of tokens, as in ViT, Swin, EVA and BEiT)."""
    return all(m.eam.adapter.cost_modelled for m in attention_layers(model))


def cost_account(model: nn.Module, input_size: Optional[Sequence[int]] = None,
                 device: torch.device | str | None = None) -> CostAccount:
    """The per-layer account of one image ``(C, H, W)`` (``input_size``, the model's own by default) through
    ``model`` in its current state; the one shape-recording forward runs on ``device`` (the model's by default)."""
    layers = attention_layers(model)
    m = next((m for m in layers if not m.eam.adapter.cost_modelled), None)
    if m is not None:  # an attention layer whose shapes the account does not read
        known = sorted({a.family for a in ADAPTERS if a.cost_modelled})
        raise EamError(f"the MAC account (gmacs, predicted_speedup) does not model {m.eam.adapter.family}'s "
                       f"{m.eam.adapter.timm_class.__name__} yet (it models {'; '.join(known)}); "
                       "measure speed instead, e.g. `eamvit optimize --runtime torch`")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    size = input_size if input_size is not None else data_config(model)["input_size"]
    x = torch.zeros(1, *(int(s) for s in size), device=device)
    calls, attn_in = _record_shapes(model, layers, x)
    windowed = any(attn_in[i][0] > 1 for i in attn_in)
    # Without pruning every ViT block sees the tokens that enter the first one; Swin never prunes.
    n_full = {i: (attn_in[i][1] if windowed else attn_in[min(attn_in)][1]) for i in attn_in}
    owners = _owners(model, layers)
    rows: list[CostRow] = []
    for mod, s_in, s_out in calls:
        layer, part = owners.get(id(mod), (None, "other"))
        scale = 1.0
        if part == "mlp" and not windowed and layer in attn_in:
            tokens = math.prod(s_in[:-1])
            scale = n_full[layer] / tokens if tokens else 1.0
        rows.append(_linear_row(mod, s_in, s_out, layer, part, scale))
    for i in sorted(attn_in):
        rows += _attention_rows(i, layers[i], attn_in[i], n_full[i])
    merging = state_of(model).merge  # what the shape-recording forward just matched
    rows += [CostRow(layer, "merge", "match", tokens, 0, macs)
             for layer, tokens, macs in (merging.match_macs if merging is not None else ())]
    order = {"patch_embed": 0, "attention": 1, "merge": 2, "mlp": 3, "other": 4, "head": 5}
    rows.sort(key=lambda r: (-1 if r.layer is None and r.part == "patch_embed" else
                             10 ** 6 if r.layer is None else r.layer, order[r.part]))
    return CostAccount(rows)


def count_gflops(model: nn.Module, input_size: Optional[Sequence[int]] = None, macs: bool = True,
                 device: torch.device | str | None = None) -> float:
    """GFLOPs per image (matmuls, convolutions and attention): the executed total of :func:`cost_account`.

    Args:
        macs: count one multiply-add as one FLOP (fvcore's convention, which the seeds' and EViT's
            tables use: DeiT-S = 4.6 GFLOPs); ``False`` counts two, as ``torch.utils.flop_counter`` does.
    """
    return cost_account(model, input_size, device).total("executed") * (1 if macs else 2) / 1e9
