"""PMQ: patch-wise mixed-precision quantization (seed 003), from the paper alone (no public code); the
readings of its lost equations: docs/architecture-quant-export.md."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from eamvit.choices import AttnQuantizer
from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.methods.evaluate import logits_of
from eamvit.methods.quant_registry import QuantizeHandler, QuantRun, calibration_images
from eamvit.methods.repq import RepQConfig, calibrate_, classifier_heads, prepare_, reparam_structure_
from eamvit.modules import family_quant
from eamvit.modules.attention import attention_layers, observe
from eamvit.modules.quant_layers import PatchBitsQuantizer, QuantConv2d, QuantLinear
from eamvit.modules.quantizers import DEFAULT_PERCENTILES, MAX_BITS, MIN_BITS, UniformQuantizer, check_quant_bits
from eamvit.ops.pareto import choose, pareto_frontier

_CONFIG_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*(?:/\s*(\d+))?\s*(\(\s*MP\s*\))?\s*$", re.IGNORECASE)


def parse_bits_config(text: str) -> dict[str, Any]:
    """``"W/A[/P][(MP)]"`` (e.g. ``"8/8/4(MP)"``, ``"4/4"``) → ``{"w_bits", "a_bits", "p_bits", "mixed"}`` (P: A)."""
    m = _CONFIG_RE.match(str(text))
    if not m:
        raise EamError(f"bit configuration {text!r} is not W/A[/P][(MP)], e.g. 8/8/4(MP) or 6/6/6(MP)")
    w, a = int(m.group(1)), int(m.group(2))
    p = int(m.group(3)) if m.group(3) else a
    for v, what in ((w, "W"), (a, "A"), (p, "P")):
        check_quant_bits(v, f"{what} bits of {text!r}")
    return {"w_bits": w, "a_bits": a, "p_bits": p, "mixed": bool(m.group(4))}


@dataclass(frozen=True)
class PMQConfig(Config):
    """PMQ settings.

    Args:
        w_bits: weight bits; with ``mixed`` the average the size budget is derived from.
        a_bits: activation bits (Linear inputs, post-softmax).
        p_bits: average patch bits of q, k, v under AAS (None: ``a_bits``).
        mixed: Pareto-frontier per-layer weight bits (else ``w_bits`` everywhere).
        aas: Adaptive Attention Shrink on q, k, v (else ``p_bits`` for every patch).
        size_budget_mb: budget of the quantized weights in MB (1e6 bytes, eq. 17); None: the size
            of all quantized weights at ``w_bits``.
        bit_choices: search space of the per-layer bits (2..8).
        metric: ``"fisher"`` (GSM, the paper) or ``"hessian"`` (Hutchinson trace, HAWQ-v2).
        calib_size: calibration images (the paper's 32).
        micro_batch: images per gradient for the Fisher (1 = per-sample, the empirical Fisher).
        aas_step: bits added to / taken from important / unimportant patches.
        base: ``"repq"`` (RepQ-ViT calibration + reparameterization) or ``"percentile"``.
        quantize_head: quantize (and allocate bits to) the classifier head.
        seed: seed of the calibration subset and of the Hutchinson vectors.
    """

    w_bits: int = 8
    a_bits: int = 8
    p_bits: Optional[int] = None
    mixed: bool = True
    aas: bool = True
    size_budget_mb: Optional[float] = None
    bit_choices: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    metric: Literal["fisher", "hessian"] = "fisher"
    calib_size: int = 32
    micro_batch: int = 1
    hutchinson_samples: int = 8
    aas_step: int = 1
    base: Literal["repq", "percentile"] = "repq"
    attn_quantizer: AttnQuantizer = "logsqrt2"
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    quantize_head: bool = True
    seed: int = 0

    KIND = "pmq"
    VERSION = 1

    @classmethod
    def from_string(cls, text: str, **kw: Any) -> "PMQConfig":
        """A config from ``"8/8/4(MP)"``; without ``(MP)`` the weights are not mixed."""
        return cls(**{**parse_bits_config(text), **kw})

    @property
    def label(self) -> str:
        return f"{self.w_bits}/{self.a_bits}/{self.patch_bits}" + ("(MP)" if self.mixed or self.aas else "")

    @property
    def patch_bits(self) -> int:
        return self.a_bits if self.p_bits is None else self.p_bits

    def _check(self) -> None:
        check_quant_bits(self.w_bits, "w_bits")
        check_quant_bits(self.a_bits, "a_bits")
        check_quant_bits(self.patch_bits, "p_bits")
        object.__setattr__(self, "bit_choices", tuple(sorted(set(self.bit_choices))))
        if not self.bit_choices:
            raise EamError("bit_choices is empty; PMQ searches 2..8 bits")
        for b in self.bit_choices:
            check_quant_bits(b, "bit_choices")
        for name in ("calib_size", "micro_batch", "hutchinson_samples", "aas_step"):
            v = getattr(self, name)
            if v < 1:
                raise EamError(f"{name}={v!r} must be an integer >= 1")
        if self.size_budget_mb is not None and not self.size_budget_mb > 0:
            raise EamError(f"size_budget_mb={self.size_budget_mb!r} must be a positive size in MB")
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))


def weight_components(model: nn.Module, include_head: bool = True) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Linear`` / ``nn.Conv2d`` that RepQ-ViT's surgery quantizes (the head
    with ``include_head``), in module order."""
    heads = set() if include_head else {id(h) for h in classifier_heads(model)}
    attention_layers(model)  # instrumented: the adapters say which Linears stay in float
    in_float = family_quant.float_linears(model)  # never quantized: no bits to allocate
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in heads and id(m) not in in_float]


def _setup(model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor],
           components: Optional[Sequence[tuple[str, nn.Module]]]) -> tuple[list, torch.Tensor, torch.Tensor, list]:
    """``(components, images on the model's device, targets, weights)`` of a sensitivity metric, in eval mode."""
    comps = list(components) if components is not None else weight_components(model)
    images = images.to(next(model.parameters()).device)
    model.eval()
    if labels is not None:
        return comps, images, labels.to(images.device), [m.weight for _, m in comps]
    with torch.no_grad():  # no labels: the model's own predictions
        return comps, images, logits_of(model, images).argmax(-1), [m.weight for _, m in comps]


def fisher_sensitivity(model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                       components: Optional[Sequence[tuple[str, nn.Module]]] = None, micro_batch: int = 1,
                       progress: bool = False) -> dict[str, float]:
    """Empirical-Fisher importance per component: ``1/(2N) Σ_n Σ_{i∈c} (w_i g_{n,i})²`` (eq. 10).

    Args:
        model: a classifier in full precision (gradients are taken w.r.t. its weights).
        labels: the images' labels; None uses the model's argmax predictions.
        components: ``(name, module)`` pairs whose ``weight`` is scored (default :func:`weight_components`).
        micro_batch: images per gradient ``g_n`` (1: per-sample gradients, the empirical Fisher).
    """
    was_training = model.training
    comps, images, targets, weights = _setup(model, images, labels, components)
    acc = {n: torch.zeros((), dtype=torch.float64, device=images.device) for n, _ in comps}
    chunks = range(0, images.shape[0], micro_batch)
    try:
        for i in tqdm(chunks, desc="Fisher", disable=not progress, leave=False):
            loss = F.cross_entropy(logits_of(model, images[i:i + micro_batch]), targets[i:i + micro_batch])
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for (n, m), g in zip(comps, grads):
                if g is not None:
                    acc[n] += (m.weight.detach().double() * g.double()).pow(2).sum()
    finally:
        model.train(was_training)
    return {n: float(v) / (2 * len(chunks)) for n, v in acc.items()}


def hessian_sensitivity(model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                        components: Optional[Sequence[tuple[str, nn.Module]]] = None, samples: int = 8,
                        seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Hutchinson estimate of the Hessian trace of the loss per component, divided by its size (HAWQ-v2)."""
    comps, images, targets, weights = _setup(model, images, labels, components)
    loss = F.cross_entropy(logits_of(model, images), targets)
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tr = [0.0] * len(comps)
    for _ in tqdm(range(samples), desc="Hutchinson", disable=not progress, leave=False):
        vs = [(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w) for w in weights]
        hv = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=True, allow_unused=True)
        for j, (v, h) in enumerate(zip(vs, hv)):
            if h is not None:
                tr[j] += float((v * h).sum()) / samples
    return {n: tr[j] / m.weight.numel() for j, (n, m) in enumerate(comps)}


def quant_perturbation(weight: torch.Tensor, bits: int, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> float:
    """``‖Q_b(W) − W‖²`` with the family's per-output-channel uniform quantizer (eq. 16's L2 term)."""
    q = UniformQuantizer(bits, "channel", channel_dim=0, percentiles=percentiles)
    w = weight.detach()
    with torch.no_grad():
        return float((q(w) - w).double().pow(2).sum())


def patch_importance(attn: torch.Tensor) -> torch.Tensor:
    """Eq. 12: attention each patch receives, averaged over heads, queries and leading dims (images):
    ``(..., H, N, N)`` → ``(N,)``."""
    if attn.dim() < 3:
        raise EamError(f"attention maps must be (..., heads, N, N), got shape {tuple(attn.shape)}")
    return attn.reshape(-1, attn.shape[-2], attn.shape[-1]).mean(dim=(0, 1))


def aas_bits(importance: torch.Tensor, bits: int, step: int = 1) -> torch.Tensor:
    """Eq. 13–15: ``bits + step`` above ``μ + σ``, ``bits − step`` below ``μ − σ``, else ``bits`` (2..8); σ is
    the population standard deviation of the importance over the layer's patches."""
    mu, sigma = importance.mean(), importance.std(unbiased=False)
    out = torch.full(importance.shape, bits, dtype=torch.long)
    out[importance > mu + sigma] = bits + step
    out[importance < mu - sigma] = bits - step
    return out.clamp(MIN_BITS, MAX_BITS)


@torch.no_grad()
def attention_importance(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> dict[int, torch.Tensor]:
    """Per attention layer, eq. 12's :func:`patch_importance` averaged over ``images`` (in double), from the maps
    ``(B, H, N, N)`` over one set of N tokens only (the maps skipped: docs/architecture-quant-export.md)."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    layers = attention_layers(model)
    channels = {l.eam.layer for l in layers if l.eam.adapter.quant.channel_map}

    def make(i: int):
        def obs(attn: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
            if attn.dim() == 4 and attn.shape[-1] == attn.shape[-2] and i not in channels:
                sums[i] = sums.get(i, 0) + patch_importance(attn.detach().double()) * attn.shape[0]
                counts[i] = counts.get(i, 0) + attn.shape[0]
        return obs

    device = next(model.parameters()).device
    with observe(model, {l: make(l) for l in range(len(layers))}):
        for i in range(0, images.shape[0], batch_size):
            model(images[i:i + batch_size].to(device))
    return {i: (sums[i] / counts[i]).float().cpu() for i in sums}


def allocate(model: nn.Module, config: PMQConfig, images: torch.Tensor,
             labels: Optional[torch.Tensor] = None, progress: bool = False) -> dict[str, Any]:
    """Sensitivity, frontier and chosen per-layer weight bits of a full-precision ``model`` (no surgery):
    ``components`` (rows: name, params, importance, bits), ``frontier`` (rows: pmq_weight_mb, perturbation,
    avg_bits), ``budget_mb``, ``chosen_size_mb``, ``chosen_perturbation``, ``metric``, ``metric_seconds``."""
    comps = weight_components(model, config.quantize_head)
    t0 = time.perf_counter()
    if config.metric == "fisher":
        imp = fisher_sensitivity(model, images, labels, comps, config.micro_batch, progress)
    else:
        imp = hessian_sensitivity(model, images, labels, comps, config.hutchinson_samples, config.seed, progress)
    metric_seconds = time.perf_counter() - t0
    n_params = [m.weight.numel() for _, m in comps]
    total = sum(n_params)
    budget_bits = config.size_budget_mb * 8e6 if config.size_budget_mb is not None else total * config.w_bits
    choices = config.bit_choices if config.mixed else (config.w_bits,)
    if budget_bits < total * min(choices):
        raise EamError(f"no bit configuration fits the size budget of {budget_bits / 8e6:.6g} MB: the quantized weights "
                       f"need at least {total * min(choices) / 8e6:.6g} MB at {min(choices)} bits; raise --pmq-budget-mb")
    options = [[(n * b, imp[name] * quant_perturbation(m.weight, b, config.percentiles)) for b in choices]
               for (name, m), n in zip(comps, n_params)]
    frontier = pareto_frontier(options)
    size, cost, pick = choose(frontier, budget_bits)
    bits = [choices[i] for i in pick]
    return {
        "components": [{"name": n, "params": k, "importance": imp[n], "bits": b}
                       for (n, _), k, b in zip(comps, n_params, bits)],
        "frontier": [{"pmq_weight_mb": s / 8e6, "perturbation": c, "avg_bits": s / total} for s, c, _ in frontier],
        "budget_mb": budget_bits / 8e6, "chosen_size_mb": size / 8e6, "chosen_perturbation": cost,
        "metric": config.metric, "metric_seconds": metric_seconds,
    }


def _repq_config(config: PMQConfig) -> RepQConfig:
    """The RepQ-ViT surgery PMQ starts from (the largest bit choice for weights with mixed precision)."""
    return RepQConfig(w_bits=max(config.bit_choices) if config.mixed else config.w_bits, a_bits=config.a_bits,
                      calib_size=config.calib_size, seed=config.seed, percentiles=config.percentiles,
                      reparam=config.base == "repq", attn_quantizer=config.attn_quantizer,
                      quantize_head=config.quantize_head)


def _refine_(model: nn.Module, config: PMQConfig, weight_bits: dict[str, int],
             token_bits: dict[int, torch.Tensor]) -> None:
    """Per-layer weight bits, per-tensor post-LayerNorm inputs (percentile base), AAS patch bits per layer."""
    mods = dict(model.named_modules())
    for name, bits in weight_bits.items():
        m = mods[name]
        if isinstance(m, (QuantLinear, QuantConv2d)):
            m.weight_quantizer.bits = check_quant_bits(int(bits))
    if config.base == "percentile":
        for m in model.modules():
            if isinstance(m, QuantLinear) and m.input_quantizer.granularity == "channel":
                m.input_quantizer.granularity = "tensor"
    for layer in attention_layers(model):
        tb = token_bits.get(layer.eam.layer)
        if tb is not None:  # the layers attention_importance scored
            # ViT's attention quantizes k before transposing it; a tapped family's k is the transposed
            # operand of timm's score matmul, its tokens last (the adapter says which).
            for name, dim in (("q", -2), ("k", layer.eam.adapter.quant.k_dim), ("v", -2)):
                setattr(layer.eam_quant, name, PatchBitsQuantizer(tb, dim, config.percentiles))


def _structure(model: nn.Module) -> dict[str, Any]:
    """The AAS patch bits per layer: the one part of a PMQ model its config does not determine."""
    return {"patch_bits": {str(l.eam.layer): l.eam_quant.q.token_bits.tolist() for l in attention_layers(model)
                           if isinstance(getattr(l.eam_quant, "q", None), PatchBitsQuantizer)}}


def _rebuild(model: nn.Module, config: PMQConfig, structure: dict) -> None:
    pairs = prepare_(model, _repq_config(config))
    try:
        token_bits = {int(l): torch.tensor(b, dtype=torch.long) for l, b in structure.get("patch_bits", {}).items()}
    except (TypeError, ValueError, AttributeError):
        raise EamError("the PMQ state's patch bits are unreadable; quantize the model again") from None
    _refine_(model, config, {}, token_bits)  # per-layer weight bits: restored with every quantizer's bits
    reparam_structure_(pairs)


def _free_bits(model: nn.Module, config: PMQConfig) -> dict[str, tuple[int, ...]]:
    """With mixed precision each weight's bits are PMQ's own choice among ``bit_choices``."""
    return {f"{n}.weight_quantizer": tuple(config.bit_choices) for n, m in model.named_modules()
            if config.mixed and isinstance(m, (QuantLinear, QuantConv2d))}


def _quantize_pmq(model: nn.Module, config: PMQConfig, calib: Any, run: QuantRun) -> dict[str, Any]:
    """PMQ: Pareto allocation and AAS patch bits on the full-precision model, then RepQ-ViT with those bits."""
    images, labels = calibration_images(calib, config.calib_size, seed=config.seed)
    report = allocate(model, config, images, labels, progress=run.progress)
    importance = attention_importance(model, images) if config.aas else {}
    token_bits = {l: aas_bits(imp, config.patch_bits, config.aas_step) for l, imp in importance.items()}
    pairs = prepare_(model, _repq_config(config))
    _refine_(model, config, {r["name"]: r["bits"] for r in report["components"]}, token_bits)
    calibrate_(model, images, pairs)
    report["patch_bits"] = [{"layer": l, "patches": tb.numel(), "mean_bits": float(tb.float().mean()),
                             "bits_hist": {int(b): int((tb == b).sum()) for b in tb.unique()}}
                            for l, tb in token_bits.items()]
    return report


HANDLER = QuantizeHandler(PMQConfig, _quantize_pmq, _rebuild, structure=_structure, free_bits=_free_bits)
