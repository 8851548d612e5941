"""What every instrumented attention shares (:class:`EamState`, :class:`EamBase`) and the adapter registry:
one :class:`Adapter` per timm attention class, the one place that says what a family supports.
See docs/architecture-modules.md."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

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
               "repq": "RepQ-ViT", "adfq": "ADFQ-ViT", "pmq": "PMQ", "export": "ONNX export"}
# The verbs most adapters declare: maps, entry and head freezing, RepQ-ViT (through the tap where timm's
# forward runs) and the ONNX export; "row" only where a layer map has one set of query rows.
BASE_VERBS = frozenset({"maps", "entry", "head", "repq", "export"})
_VERB_WORDS = {"maps": "entropy maps", "entry": "entry freezing", "row": "row freezing",
               "head": "head freezing", "executed_head": "executed head freezing", "prune": "token pruning",
               "merge": "token merging", "repq": "RepQ-ViT quantization", "adfq": "ADFQ-ViT quantization",
               "pmq": "PMQ quantization", "export": "ONNX export"}


def as_pair(v) -> tuple[int, int]:
    """An int or a pair as ``(int, int)``."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def patch_embed_size(model: nn.Module, attr: str = "patch_embed") -> Optional[tuple[int, int]]:
    """``model.<attr>.img_size`` (the first embedding's): the built size, lost from the pretrained config."""
    pe = getattr(model, attr, None)
    if isinstance(pe, nn.ModuleList) and len(pe):
        pe = pe[0]
    img = getattr(pe, "img_size", None)
    return as_pair(img) if img is not None else None


@dataclass(frozen=True)
class QuantFacts:
    """What RepQ-ViT (and ADFQ-ViT, PMQ on top of it) needs to know about one attention class and its family.

    Args:
        inputs: the Linears the attention applies to its whole (normalised) input, the one that sees every
            token first; ``[None]`` where something else reads that input too (a pooling or sub-sampling
            conv, zero padding), so that no LayerNorm → Linear group is formed there.
        groups: the family's timm block classes (exact types) → their LayerNorm → Linear groups.
        in_float: the attention's children whose Linears stay in float (position terms, head mixing).
        separate_bias: the qkv projection adds separate q / v biases through ``F.linear`` (quantized: after it).
        one_token: the Linears that read the class token alone, as ``(B, C)``.
        score_order: ``"timm"`` (quantize the operands of timm's own score matmul, through the tap),
            ``"scale_first"`` (q scaled, then quantized) or ``"config"`` (ViT: ``RepQConfig.vit_scale_first``).
        k_dim, channel_map: for PMQ's per-patch bits: where k's tokens are in the operand its quantizer sees;
            the map is over channels, not tokens (skipped).
    """

    inputs: Callable[[nn.Module], list] = lambda attn: [getattr(attn, "qkv", None)]
    groups: Mapping[type, Callable[[nn.Module], list]] = field(default_factory=dict)
    in_float: tuple[str, ...] = ()
    separate_bias: bool = False
    one_token: tuple[str, ...] = ()
    score_order: str = "timm"
    k_dim: int = -1
    channel_map: bool = False


@dataclass(frozen=True)
class TokenFamily:
    """How a family's blocks drop or merge patch tokens: the classes swapped in and the facts both verbs need.

    Args:
        block: the timm block class (exact type: a subclass with its own forward is not assumed compatible).
        merge_followers: timm classes of blocks outside ``.blocks`` that read the merged tokens → the class
            swapped in for them (CaiT's class attention).
        positions: later blocks need the present tokens' positions (RoPE, relative-position bias), so
            every block after the first reducing block is swapped too (as a follower).
        class_token: a class token precedes the patch tokens inside these blocks (EViT's score and
            fusion read it); ``False`` for CaiT, whose class token joins only in the class-attention blocks.
        refuse, refuse_model: why a given block of this class, or model of this family, cannot prune or merge.
    """

    name: str
    block: type
    prune_class: type
    merge_class: type
    merge_followers: Mapping[type, type] = field(default_factory=dict)
    positions: bool = False
    class_token: bool = True
    refuse: Callable[[nn.Module], Optional[str]] = lambda block: None
    refuse_model: Callable[[nn.Module], Optional[str]] = lambda model: None


HEAD_MODES = ("sliced", "sdpa", "matmul", "own")


@dataclass(frozen=True)
class Adapter:
    """One timm attention class as eamvit sees it.

    Args:
        eam_class: the instrumented subclass swapped in (``module.__class__ = eam_class``); what it computes
            (q, k, v, the terms before the softmax, its layer map, heads at dim -3) is in the docs.
        verbs: the supported verbs besides those the facts below imply: ``executed_head`` with ``heads``,
            ``prune`` and ``merge`` with ``tokens``, ADFQ-ViT and PMQ with RepQ-ViT unless ``why_not`` refuses them.
        why_not: for an unsupported verb, the reason to give instead of the generic refusal.
        heads: how an executed head plan runs (:data:`HEAD_MODES`); None: heads are simulated only.
        heads_at: where the heads are in timm's attention tensors, when not at dim -3 (Hiera's mask units).
        cut_einsum: the executed path also cuts the queries of the one ``einsum`` between the score matmul and
            the softmax (MViTv2's decomposed relative position, a term per head).
        cost_modelled: the MAC account (methods/cost.py) reads its shapes (fused ``qkv``, ``proj``, one token set).
        tokens: how the family's blocks drop or merge tokens; None: neither.
        bind: sets what its layers need from their model (groups per image: Swin's windows, TNT's patches).
        input_size: the one source of a built model's image size for data configs and exports.
    """

    family: str
    timm_class: type
    eam_class: type
    verbs: frozenset
    why_not: dict = field(default_factory=dict)
    heads: Optional[str] = None
    heads_at: Optional[int] = None
    cut_einsum: bool = False
    cost_modelled: bool = False
    quant: QuantFacts = QuantFacts()
    tokens: Optional[TokenFamily] = None
    bind: Callable[[nn.Module], None] = lambda model: None
    input_size: SizeReader = patch_embed_size
    min_opset: OpsetReader = lambda model, size: (0, "")  # any opset eamvit takes

    def __post_init__(self) -> None:
        given = set(self.verbs)
        unknown = given - set(VERBS)
        lacking = [v for v, fact in (("executed_head", self.heads), ("prune", self.tokens), ("merge", self.tokens))
                   if v in given and not fact]
        if unknown or lacking or self.heads not in (None, *HEAD_MODES):
            raise ValueError(f"adapter {self.family}: unknown verbs {sorted(unknown)}, verbs without the facts they "
                             f"need {lacking}, head mode {self.heads!r} (one of {', '.join(HEAD_MODES)} or None)")
        # Derived on every construction (dataclasses.replace too): ADFQ-ViT and PMQ refine RepQ-ViT's surgery.
        verbs = (given - {"adfq", "pmq"}) | ({"executed_head"} if self.heads else set()) | \
            ({"prune", "merge"} if self.tokens else set())
        if "repq" in verbs:
            verbs |= {"adfq", "pmq"} - set(self.why_not)
        object.__setattr__(self, "verbs", frozenset(verbs))

    def executes(self, plan: str) -> bool:
        """Whether its layers can execute a frozen ``plan``: rows only where heads are sliced and rows are declared."""
        return self.heads is not None and (plan == "head" or self.heads == "sliced" and "row" in self.verbs)

    @property
    def plan_skips(self) -> tuple[str, ...]:
        """The ops whose frozen units' work an executed plan skips (the MAC account reads it)."""
        return ("q", "k", "qk", "softmax") if self.heads == "sliced" else ("qk", "softmax")


def may_overwrite() -> bool:
    """A fresh intermediate may be overwritten in place: not under autograd, nor when tracing (ONNX has none)."""
    return not torch.is_grad_enabled() and not torch.jit.is_tracing()


@dataclass(eq=False)
class EamState:
    """What eamvit keeps on one instrumented attention module (``module.eam``), besides its tensors (registered
    on the module, so that ``model.to(device)`` moves them and a quantized ``state_dict`` keeps its keys).

    Args:
        layer: the layer number (module order, see :func:`eamvit.modules.attention.instrument`).
        observer, observer_q, observer_k: :func:`~eamvit.modules.attention.observe`'s stages: called with the
            post-softmax map, the map after the post-softmax quantizer, the keys ``(B, H, N, d)`` as the score
            product receives them (token merging's matching features).
        observer_qk: called with the queries and the keys of a float attention whose map is ``softmax(q·scale·kᵀ)``
            (``eam_reads_qk``), which keeps its fused kernel (pruning's export form).
        score_bias: added to the pre-softmax scores, broadcast over ``(B, H, N_q, N_k)``.
        plan, granularity: the executed frozen plan (``"head"``, ``"row"`` or None) and what the frozen mask
            covers (``"entry"``, ``"row"`` or ``"head"``).
        num_windows: groups per image folded into the batch dim (Swin windows, TNT's patches).
        positions: the present tokens' positions ``(B, n)`` while token pruning has dropped some (BEiT).
        cache: :meth:`EamBase._eam_cached`'s tensors; emptied by :func:`~eamvit.modules.attention.set_frozen`.
    """

    layer: int
    adapter: Adapter
    observer: Optional[Observer] = None
    observer_q: Optional[Observer] = None
    observer_k: Optional[Observer] = None
    observer_qk: Optional[Observer] = None
    score_bias: Optional[torch.Tensor] = None
    plan: Optional[str] = None
    granularity: str = "entry"
    num_windows: int = 1
    positions: Optional[torch.Tensor] = None
    cache: dict = field(default_factory=dict, repr=False)


# The buffers of an executed row/head plan (see attention._set_plan).
PLAN_BUFFERS = ("eam_plan_keep", "eam_plan_frozen", "eam_plan_order", "eam_plan_values", "eam_plan_wrows",
                "eam_plan_cols_k", "eam_plan_cols_f")


class EamBase:
    """The state and the post-softmax step of every instrumented attention class."""

    eam: EamState
    eam_reads_qk: bool = False  # the forward calls ``eam.observer_qk`` (float ViT attention)
    eam_quant: Optional[nn.Module]
    eam_frozen_mask: Optional[torch.Tensor]
    eam_frozen_values: Optional[torch.Tensor]

    def _eam_init(self, layer: int, adapter: Adapter) -> None:
        self.eam = EamState(layer, adapter)
        self.register_module("eam_quant", None)  # a submodule slot: state_dict keys `….eam_quant.…` once set
        for name in ("eam_frozen_mask", "eam_frozen_values", *PLAN_BUFFERS):
            self.register_buffer(name, None, persistent=False)

    @property
    def eam_active(self) -> bool:
        return self.eam_needs_scores or self.eam_quant is not None or self.eam_frozen_mask is not None

    @property
    def eam_needs_scores(self) -> bool:
        """An observer or a score bias needs every head's and query's attention (an executed plan would skip it)."""
        state = self.eam
        return (state.observer is not None or state.observer_q is not None or state.observer_k is not None
                or state.observer_qk is not None or state.score_bias is not None)

    @property
    def eam_executes_plan(self) -> bool:
        """The next forward skips the frozen heads/rows: nothing needs every head's scores."""
        state, drop = self.eam, getattr(self, "attn_drop", None)
        if (state.plan is None or self.eam_frozen_mask is None or self.eam_needs_scores or self.eam_quant is not None
                or (self.training and drop is not None and drop.p > 0)):
            return False
        # Sliced weights: exact nn.Linear only, a quantized linear's forward must not be bypassed by F.linear.
        return state.adapter.heads != "sliced" or (type(self.qkv) is nn.Linear and type(self.proj) is nn.Linear)

    def _eam_groups(self, lead: int, mask: Optional[torch.Tensor] = None) -> int:
        """Groups per image (the window mask's, else ``eam.num_windows``); refuses ``lead`` groups in the batch
        dim that are not whole images."""
        groups = mask.shape[0] if mask is not None else self.eam.num_windows
        if lead % groups:
            raise EamError(f"{self.eam.adapter.family} attention layer {self.eam.layer}: {lead} windows (groups) is "
                           f"not a multiple of {groups} per image; run the model at the image size it was "
                           "instrumented for")
        return groups

    def _eam_cached(self, key: str, make: Callable[[], torch.Tensor], *sources: torch.Tensor) -> torch.Tensor:
        """``make()``, derived from ``sources``: recomputed while a source needs a gradient, else cached until a
        source changes (another tensor, its version, its storage). Inference tensors keep no version, so what
        is made from them is made on every call."""
        learning = torch.is_grad_enabled() and any(t.requires_grad for t in sources)
        if learning or any(t.is_inference() for t in sources):
            return make()
        stamp = tuple((t._version, t.data_ptr()) for t in sources)
        hit = self.eam.cache.get(key)
        # The entry holds its sources, so no other tensor can take their storage (and data_ptr) while it lives.
        if hit is None or hit[0] != stamp or any(a is not b for a, b in zip(hit[2], sources)):
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable by autograd later
                hit = self.eam.cache[key] = (stamp, make(), sources)
        return hit[1]

    def _eam_frozen_terms(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep, fixed)`` in ``dtype``, so that ``attn·keep + fixed`` is eq. 15 in one pass over the map."""
        mask, values = self.eam_frozen_mask, self.eam_frozen_values
        keep = self._eam_cached(f"keep.{dtype}", lambda: (~mask).to(dtype), mask)
        fixed = self._eam_cached(f"fixed.{dtype}", lambda: values.to(dtype).masked_fill(~mask, 0), mask, values)
        return keep, fixed

    def _eam_post_softmax(self, attn: torch.Tensor, groups: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Observe, quantize and freeze ``attn`` ``(B*groups, …)``; ``groups`` > 1 splits out the windows."""
        shape5 = (-1, groups) + tuple(attn.shape[1:]) if groups > 1 else None
        state = self.eam
        if state.observer is not None:
            state.observer(attn.view(shape5) if shape5 else attn, mask)
        if self.eam_quant is not None:
            attn = self.eam_quant.attn(attn)
        if state.observer_q is not None:
            state.observer_q(attn.view(shape5) if shape5 else attn, mask)
        if self.eam_frozen_mask is not None:
            view = attn.view(shape5) if shape5 else attn
            if torch.jit.is_tracing():  # the exported graph's form: one Where
                view = torch.where(self.eam_frozen_mask, self.eam_frozen_values.to(attn.dtype), view)
            else:  # the numbers of torch.where, faster on CPU (docs/architecture-modules.md)
                keep, fixed = self._eam_frozen_terms(attn.dtype)
                in_place = may_overwrite() and state.observer is None and state.observer_q is None
                view = torch.addcmul(fixed, view, keep, out=view) if in_place else torch.addcmul(fixed, view, keep)
            attn = view.reshape(attn.shape)
        return attn


def frozen_times_v(values: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``A^μ·V`` of the frozen heads or rows, ``(B, G, …, N_q, d)``, as one batched matmul shared by the images;
    a view, which the caller lays out (one copy) as its next step needs it.

    Args:
        values: ``(G, …, N_q, N_k)`` frozen maps, the leading dim the groups (windows, patches) of one image.
        v: ``(B·G, …, N_k, d)`` the frozen units' values (image-major, as timm orders windows).
    """
    G, mid, (nq, nk), d = values.shape[0], tuple(values.shape[1:-2]), values.shape[-2:], v.shape[-1]
    B, m = v.shape[0] // G, len(mid)
    vv = v.reshape(B, G, *mid, nk, d).permute(1, *range(2, m + 3), 0, m + 3).reshape(-1, nk, B * d)
    out = torch.bmm(values.reshape(-1, nq, nk).to(vv.dtype), vv).view(G, *mid, nq, B, d)
    return out.permute(m + 2, *range(m + 2), m + 3)


def _chain(first: Observer, then: Observer) -> Observer:
    def both(attn: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        first(attn, mask)
        then(attn, mask)
    return both


@contextlib.contextmanager
def _attached(layers: Sequence[nn.Module], values: Mapping[int, object], attr: str,
              combine: Callable[[object, object], object]) -> Iterator[Sequence[nn.Module]]:
    """Set ``layers[i].eam.<attr>`` to ``values[i]`` (``combine``d with what was there) for the block."""
    saved = {l: getattr(layers[l].eam, attr) for l in values}
    try:
        for l, value in values.items():
            setattr(layers[l].eam, attr, value if saved[l] is None else combine(value, saved[l]))
        yield layers
    finally:
        for l, prev in saved.items():
            setattr(layers[l].eam, attr, prev)


def observing(layers: Sequence[nn.Module], observers: Mapping[int, Observer],
              attr: str = "observer") -> contextlib.AbstractContextManager:
    """Attach ``observers[i]`` to ``layers[i].eam.<attr>`` for the block, before any observer already there."""
    return _attached(layers, observers, attr, _chain)


def biasing(layers: Sequence[nn.Module],
            biases: Mapping[int, Optional[torch.Tensor]]) -> contextlib.AbstractContextManager:
    """Add ``biases[i]`` (``None``: nothing) to ``layers[i]``'s scores for the block, on top of any already there."""
    return _attached(layers, {l: b for l, b in biases.items() if b is not None}, "score_bias",
                     lambda bias, outer: outer + bias)


@dataclass(frozen=True)
class Family:
    """A row of ``eamvit models``: a family, its attention classes, an example model, what is left out and why."""

    name: str
    classes: tuple
    example: str
    note: str = ""


def require(layers: Iterable[nn.Module], verb: str) -> None:
    """Refuse, in one line, a verb (one of :data:`VERBS`) that some instrumented attention layer does not support."""
    for layer in layers:
        adapter = layer.eam.adapter
        if verb not in adapter.verbs:
            if verb in adapter.why_not:
                raise EamError(adapter.why_not[verb])
            raise EamError(f"{_VERB_WORDS[verb]} does not support {adapter.family} yet "
                           f"(attention layer {layer.eam.layer}, timm {adapter.timm_class.__name__}); "
                           "`eamvit models` lists what each family supports")
