"""What every instrumented attention shares, and the registry of attention adapters.

An *adapter* describes one timm attention class: how it computes q, k and v, the terms it adds
before the softmax, where its probabilities are, the shape of its layer map ``(…, N_q, N_k)``,
which eamvit verbs it supports, and the image size a built model of its family takes and the ONNX
opset its export needs (data configs and exports ask the adapter, not the pretrained config). A
family is one adapter per attention class it uses; the verbs read the declared capabilities
(:func:`require`) and ``eamvit models`` prints them.

:class:`EamState` is the per-module state every instrumented class keeps (``module.eam``: layer,
adapter, observers, plan; the frozen mask and values and the optional ``eam_quant`` are registered on
the module) and :class:`EamBase` the one post-softmax step that observes, quantizes and freezes a
map. The frozen tensors are buffers, so that ``model.to(device)`` moves them with the weights; they
are non-persistent, so a model's ``state_dict`` stays loadable by plain timm.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from eamvit.errors import EamError

Observer = Callable[[torch.Tensor, Optional[torch.Tensor]], None]
# A built model's image size ``(H, W)``, or None where the model does not record one.
SizeReader = Callable[[nn.Module], Optional[tuple[int, int]]]
# The lowest ONNX opset a model's export at an image size ``(H, W)`` needs, and why (0, "": no need).
OpsetReader = Callable[[nn.Module, tuple[int, int]], tuple[int, str]]

# The verbs an adapter may support, in the order `eamvit models` prints them.
VERBS = ("maps", "entry", "row", "head", "executed_head", "prune", "merge", "repq", "adfq", "pmq", "export")
VERB_TITLES = {"maps": "maps", "entry": "entry freeze", "row": "row freeze", "head": "head freeze",
               "executed_head": "executed heads", "prune": "token pruning", "merge": "token merging",
               "repq": "RepQ-ViT",
               "adfq": "ADFQ-ViT", "pmq": "PMQ", "export": "ONNX export"}
_VERB_WORDS = {"maps": "entropy maps", "entry": "entry freezing", "row": "row freezing",
               "head": "head freezing", "executed_head": "executed head freezing", "prune": "token pruning",
               "merge": "token merging",
               "repq": "RepQ-ViT quantization", "adfq": "ADFQ-ViT quantization", "pmq": "PMQ quantization",
               "export": "ONNX export"}


def as_pair(v) -> tuple[int, int]:
    """An int or a pair as ``(int, int)``."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def patch_embed_size(model: nn.Module, attr: str = "patch_embed") -> Optional[tuple[int, int]]:
    """``model.<attr>.img_size`` (the first embedding's where there are several): the size most timm models
    are built for, which their pretrained config no longer describes once ``img_size`` is overridden."""
    pe = getattr(model, attr, None)
    if isinstance(pe, nn.ModuleList) and len(pe):
        pe = pe[0]
    img = getattr(pe, "img_size", None)
    return as_pair(img) if img is not None else None


def no_opset_need(model: nn.Module, size: tuple[int, int]) -> tuple[int, str]:
    """An adapter's models export at any opset eamvit takes."""
    return 0, ""


@dataclass(frozen=True)
class Adapter:
    """One timm attention class as eamvit sees it.

    Args:
        family: the model family, as ``eamvit models`` names it.
        timm_class: the attention class, matched by exact type.
        eam_class: the instrumented subclass swapped in (``module.__class__ = eam_class``).
        qkv: how the module computes q, k and v.
        logits: the terms before the softmax.
        probs: where the probabilities are (what observers see and freezing overwrites).
        layer_map: the per-layer map shape ``(…, N_q, N_k)``; heads are at dim -3.
        verbs: the supported verbs (a subset of :data:`VERBS`).
        example: a timm model name of the family.
        why_not: for an unsupported verb, the reason to give instead of the generic refusal.
        input_size: reads the image size ``(H, W)`` a built model of the family takes (None: it does not
            record one); the one source of that size for data configs and exports.
        min_opset: the lowest ONNX opset an export of a model at a size needs, with the reason.
    """

    family: str
    timm_class: type
    eam_class: type
    qkv: str
    logits: str
    probs: str
    layer_map: str
    verbs: frozenset
    example: str
    why_not: dict = field(default_factory=dict)
    input_size: SizeReader = patch_embed_size
    min_opset: OpsetReader = no_opset_need

    def __post_init__(self) -> None:
        unknown = set(self.verbs) - set(VERBS)
        if unknown:
            raise ValueError(f"adapter {self.family}: unknown verbs {sorted(unknown)}")


def may_overwrite() -> bool:
    """Whether a fresh intermediate may be overwritten in place: not under autograd, and not while
    tracing for export (ONNX has no in-place softmax/where)."""
    return not torch.is_grad_enabled() and not torch.jit.is_tracing()


@dataclass(eq=False)
class EamState:
    """What eamvit keeps on one instrumented attention module (``module.eam``), besides its tensors.

    The tensors are registered on the module itself, so that ``model.to(device)`` moves them and a
    quantized model's ``state_dict`` keeps its keys: the frozen map (``eam_frozen_mask``,
    ``eam_frozen_values``) and an executed plan's indices and values (``eam_plan_*``) as
    non-persistent buffers, the attention quantizers as the submodule ``eam_quant``.

    Args:
        layer: the layer number (module order, see :func:`eamvit.modules.attention.instrument`).
        adapter: the adapter of the module's timm class.
        observer: called with the post-softmax map (``observe(stage="softmax")``).
        observer_q: called with the map after the post-softmax quantizer (``stage="quantized"``).
        observer_k: called with the keys ``(B, H, N, d)`` as the score product receives them
            (``stage="keys"``; token merging's matching features).
        score_bias: added to the pre-softmax scores, broadcast over ``(B, H, N_q, N_k)``
            (:func:`~eamvit.modules.attention.bias_scores`; proportional attention's ``log size``).
        plan: ``"head"`` or ``"row"`` while a frozen plan is executed; ``None`` otherwise.
        granularity: what the frozen mask covers: ``"entry"``, ``"row"`` or ``"head"``.
        num_windows: groups per image folded into the batch dim (Swin windows, TNT's patches).
        positions: the present tokens' positions ``(B, n)`` while token pruning has dropped some (BEiT's
            relative-position bias covers those only).
        cache: weight slices of an executed ViT/Swin v1 plan, keyed by name, with the versions they
            were cut from.
    """

    layer: int
    adapter: Adapter
    observer: Optional[Observer] = None
    observer_q: Optional[Observer] = None
    observer_k: Optional[Observer] = None
    score_bias: Optional[torch.Tensor] = None
    plan: Optional[str] = None
    granularity: str = "entry"
    num_windows: int = 1
    positions: Optional[torch.Tensor] = None
    cache: dict = field(default_factory=dict, repr=False)


class EamBase:
    """The state and the post-softmax step of every instrumented attention class."""

    eam: EamState
    eam_quant: Optional[nn.Module]
    eam_frozen_mask: Optional[torch.Tensor]
    eam_frozen_values: Optional[torch.Tensor]
    # The buffers of an executed row/head plan, registered by the classes that execute one.
    eam_plan_buffers: tuple = ()

    def _eam_init(self, layer: int, adapter: Adapter) -> None:
        self.eam = EamState(layer, adapter)
        self.register_module("eam_quant", None)  # a submodule slot: state_dict keys `….eam_quant.…` once set
        for name in ("eam_frozen_mask", "eam_frozen_values", *self.eam_plan_buffers):
            self.register_buffer(name, None, persistent=False)

    @property
    def eam_active(self) -> bool:
        return self.eam_needs_scores or self.eam_quant is not None or self.eam_frozen_mask is not None

    @property
    def eam_needs_scores(self) -> bool:
        """Something reads or changes the attention of every head and query: an observer of the map or
        of the keys, or a bias on the scores (an executed frozen plan would skip it)."""
        state = self.eam
        return (state.observer is not None or state.observer_q is not None or state.observer_k is not None
                or state.score_bias is not None)

    def _eam_post_softmax(self, attn: torch.Tensor, groups: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Observe, quantize and freeze ``attn`` of shape ``(B*groups, …)``; ``groups`` > 1 splits the
        leading dimension into images and windows (each window position is its own variable)."""
        shape5 = (-1, groups) + tuple(attn.shape[1:]) if groups > 1 else None
        state = self.eam
        if state.observer is not None:
            view = attn.view(shape5) if shape5 else attn
            state.observer(view, mask)
        if self.eam_quant is not None:
            attn = self.eam_quant.attn(attn)
        if state.observer_q is not None:
            state.observer_q(attn.view(shape5) if shape5 else attn, mask)
        if self.eam_frozen_mask is not None:
            view = attn.view(shape5) if shape5 else attn
            values = self.eam_frozen_values.to(attn.dtype)
            # Without autograd and with no observer holding the map, overwrite it in place: the same
            # numbers without allocating another (B, H, N, N) map.
            in_place = may_overwrite() and state.observer is None and state.observer_q is None
            view = torch.where(self.eam_frozen_mask, values, view, out=view) if in_place else \
                torch.where(self.eam_frozen_mask, values, view)
            attn = view.reshape(attn.shape)
        return attn


@dataclass(frozen=True)
class Family:
    """A row of ``eamvit models``: a model family and the attention classes its models use.

    Args:
        name: the family as users call it.
        classes: the timm attention classes of its models (each one with an adapter).
        example: a timm model name of the family.
        note: what is left out and why (e.g. an attention that has no token map).
    """

    name: str
    classes: tuple
    example: str
    note: str = ""


def families_line(families: Iterable[Family]) -> str:
    """The supported families, in registry order, as one phrase."""
    return ", ".join(f.name for f in families)


def require(layers: Iterable[nn.Module], verb: str) -> None:
    """Refuse, in one line, a verb that some instrumented attention layer does not support.

    Args:
        layers: instrumented attention modules.
        verb: one of :data:`VERBS`.

    Raises:
        EamError: the first layer whose adapter does not declare ``verb``.
    """
    for layer in layers:
        adapter = layer.eam.adapter
        if verb not in adapter.verbs:
            if verb in adapter.why_not:
                raise EamError(adapter.why_not[verb])
            raise EamError(f"{_VERB_WORDS[verb]} does not support {adapter.family} yet "
                           f"(attention layer {layer.eam.layer}, timm {adapter.timm_class.__name__}); "
                           "`eamvit models` lists what each family supports")


def capability_table(families: Iterable[Family], adapters: Iterable[Adapter]) -> str:
    """Families × verbs as a markdown table: a family supports a verb when all its classes do."""
    by_class = {a.timm_class: a for a in adapters}
    lines = ["| family | attention classes | " + " | ".join(VERB_TITLES[v] for v in VERBS) + " | example | note |",
             "|" + "---|" * (len(VERBS) + 4)]
    for fam in families:
        group = [by_class[c] for c in fam.classes]
        cells = ["yes" if all(v in a.verbs for a in group) else "no" for v in VERBS]
        names = ", ".join(f"{c.__module__.rsplit('.', 1)[-1]}.{c.__name__}" for c in fam.classes)
        lines.append(f"| {fam.name} | {names} | " + " | ".join(cells) + f" | {fam.example} | {fam.note} |")
    return "\n".join(lines)
