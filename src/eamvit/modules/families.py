"""Adapters for timm attention classes whose maps eamvit reads through timm's own forward (one softmax
tapped). See docs/architecture-modules.md."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from timm.models import beit, cait, convit, crossvit, efficientformer, eva, fastvit, hiera, levit, mvitv2, tnt, \
    twins, volo, xcit
from timm.models import swin_transformer_v2 as swinv2
from timm.layers.attention import Attention

from eamvit.errors import EamError
from eamvit.modules import family_quant as fq
from eamvit.modules.adapters import BASE_VERBS, Adapter, EamBase, Family, QuantFacts, TokenFamily
from eamvit.modules.family_heads import _MATMULS, _SOFTMAXES, KeptBiases, gpsa_heads, run_heads, run_tapped, \
    swinv2_heads
from eamvit.modules.family_sizes import hiera_size, levit_size, mvitv2_size, tnt_size, twins_size, volo_opset, volo_size
from eamvit.modules.merge_block import MergeBeitBlock, MergeCaitBlock, MergeCaitClassBlock, MergeConvitBlock, \
    MergeEvaBlock
from eamvit.modules.prune_block import PruneBeitBlock, PruneCaitBlock, PruneConvitBlock, PruneEvaBlock
from eamvit.modules.vit_swin import bind_windows
from eamvit.ops.positions import gather_pair_bias


class _SoftmaxTap(TorchFunctionMode):
    """Passes the output of every softmax computed inside the block through ``fn``; with ``quant`` (an
    attention's ``eam_quant``) also quantizes q and k of the score matmul and v of the first matmul after the
    softmax. ``keys`` (an observer) receives the key operand of the score matmul as ``(…, N, d)``; ``bias``
    is added to the input of the first softmax; the forward must compute ``softmaxes`` of them."""

    def __init__(self, fn: Optional[Callable[[torch.Tensor], torch.Tensor]], quant: Optional[nn.Module] = None,
                 keys: Optional[Callable] = None, bias: Optional[torch.Tensor] = None, softmaxes: int = 1) -> None:
        super().__init__()
        self.fn, self.quant, self.keys, self.bias, self.softmaxes = fn, quant, keys, bias, softmaxes
        self.calls = 0
        self.matmuls = [0, 0]  # before the first softmax, after it

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # The mode is suspended inside this method, so neither call below is seen again.
        kwargs = kwargs or {}
        if func in _MATMULS and (self.quant is not None or self.keys is not None):
            args = self._score_operands(args)
        if func in _SOFTMAXES and self.bias is not None and not self.calls:
            if kwargs.get("dim", args[1] if len(args) > 1 else None) not in (-1, args[0].dim() - 1):
                raise EamError("a score bias needs the softmax over the last (key) dim; this timm version differs")
            args = (args[0] + self.bias.to(args[0].dtype),) + tuple(args[1:])
        out = func(*args, **kwargs)
        if func in _SOFTMAXES:
            self.calls += 1
            if self.fn is not None:
                out = self.fn(out)
        return out

    def _score_operands(self, args: tuple) -> tuple:
        after = int(self.calls > 0)
        self.matmuls[after] += 1
        qz = self.quant
        if not after:
            if qz is not None:
                args = (qz.q(args[0]), qz.k(args[1])) + tuple(args[2:])
            if self.keys is not None and self.matmuls[0] == 1:
                self.keys(args[1].transpose(-2, -1), None)  # timm multiplies by kᵀ
            return args
        if qz is not None and self.matmuls[1] == 1:
            return (args[0], qz.v(args[1])) + tuple(args[2:])
        return args

    def check(self, cls: type) -> None:
        """Refuse a forward that did not compute what the adapter expects (a timm change)."""
        where = f"timm {cls.__module__}.{cls.__name__}"
        if self.calls != self.softmaxes:
            raise EamError(f"{where} computed {self.calls} softmaxes in one forward where eamvit expects "
                           f"{self.softmaxes}; this timm version is not supported for that family")
        if self.quant is not None and (self.matmuls[0] != 1 or self.matmuls[1] < 1):
            raise EamError(f"{where} computed {self.matmuls[0]} score matmuls and {self.matmuls[1]} after its "
                           "softmax where eamvit's quantizers expect one and at least one; this timm version "
                           "is not supported for RepQ-ViT on that family")
        if self.keys is not None and self.matmuls[0] != 1:
            raise EamError(f"{where} computed {self.matmuls[0]} score matmuls before its softmax where token "
                           "merging reads the keys of one; this timm version is not supported for merging")


class _Tapped(EamBase):
    """An attention whose probabilities are the output of the one softmax of timm's forward."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.eam_active:
            return super().forward(*args, **kwargs)
        groups = self._eam_groups((args[0] if args else next(iter(kwargs.values()))).shape[0])
        run = lambda: super(_Tapped, self).forward(*args, **kwargs)
        if self.eam_executes_plan:
            return run_heads(self, run)
        return self._eam_tapped(run, groups, None)

    def _eam_probs(self, attn: torch.Tensor, groups: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.eam.adapter.heads_at
        if h is None:
            return self._eam_post_softmax(attn, groups, mask)
        # A non-negative dim: the ONNX exporter writes movedim(…, -3) as a Transpose with a negative perm.
        at = attn.dim() - 3
        return self._eam_post_softmax(attn.movedim(h, at), groups, mask).movedim(at, h)

    def _eam_tapped(self, run: Callable[[], Any], groups: int, mask: Optional[torch.Tensor]) -> Any:
        """``run()`` (timm's forward) with the fused kernel off and the softmax output post-processed."""
        tap = _SoftmaxTap(lambda attn: self._eam_probs(attn, groups, mask), self.eam_quant, self.eam.observer_k,
                          self.eam.score_bias)
        return run_tapped(self, tap, run, False)


def _adapter(family: str, timm_class: type, eam_class: type, verbs: frozenset = BASE_VERBS,
             why_not: Optional[dict] = None, no_rows: str = "", **facts: Any) -> Adapter:
    """An adapter of this module; ``no_rows``: why the map has no query rows to freeze (rows declared if empty)."""
    why_not = dict(why_not or {})
    if no_rows:
        why_not["row"] = (f"row granularity does not apply to {family}: {no_rows}, so the groups would keep "
                          "different numbers of rows; use entry or head")
    return Adapter(family=family, timm_class=timm_class, eam_class=eam_class,
                   verbs=verbs if no_rows else verbs | {"row"}, why_not=why_not, **facts)


def _batchnorm(family: str, where: str = "its normalisation is BatchNorm") -> dict:
    """The verbs (no RepQ-ViT) and refusals of a BatchNorm family."""
    why = {"repq": f"RepQ-ViT quantization does not apply to {family}: {where}, and RepQ-ViT reparameterises "
                   "LayerNorm → Linear pairs; quantize a family with LayerNorm (`eamvit models`)"}
    for verb, name in (("adfq", "ADFQ-ViT"), ("pmq", "PMQ")):  # both start from RepQ-ViT's surgery
        why[verb] = f"{name} quantization does not apply to {family}: {where}, and {name} builds on RepQ-ViT's " \
                    "LayerNorm → Linear surgery; quantize a family with LayerNorm (`eamvit models`)"
    return {"verbs": BASE_VERBS - {"repq"}, "why_not": why}


def _tapped(name: str, timm_class: type, *mixins: type) -> type:
    """An instrumented class read through timm's own forward, bound at module level as ``name`` (for pickling)."""
    return type(name, (*mixins, _Tapped, timm_class), {"__module__": __name__})


EamEvaAttention = _tapped("EamEvaAttention", eva.EvaAttention)
EamTalkingHeadAttn = _tapped("EamTalkingHeadAttn", cait.TalkingHeadAttn)
EamClassAttn = _tapped("EamClassAttn", cait.ClassAttn)
EamMHSA = _tapped("EamMHSA", convit.MHSA)
EamXCA = _tapped("EamXCA", xcit.XCA)
EamLocallyGroupedAttn = _tapped("EamLocallyGroupedAttn", twins.LocallyGroupedAttn)
EamGlobalSubSampleAttn = _tapped("EamGlobalSubSampleAttn", twins.GlobalSubSampleAttn)
EamMultiScaleAttention = _tapped("EamMultiScaleAttention", mvitv2.MultiScaleAttention)
EamMultiScaleAttentionPoolFirst = _tapped("EamMultiScaleAttentionPoolFirst", mvitv2.MultiScaleAttentionPoolFirst)
EamLevitAttention = _tapped("EamLevitAttention", levit.Attention, KeptBiases)
EamLevitAttentionDownsample = _tapped("EamLevitAttentionDownsample", levit.AttentionDownsample, KeptBiases)
EamVoloAttention = _tapped("EamVoloAttention", volo.Attention)
EamVoloClassAttention = _tapped("EamVoloClassAttention", volo.ClassAttention)
EamTntAttention = _tapped("EamTntAttention", tnt.Attention)
EamEfficientFormerAttention = _tapped("EamEfficientFormerAttention", efficientformer.Attention, KeptBiases)
EamFastVitAttention = _tapped("EamFastVitAttention", fastvit.Attention)
EamMaskUnitAttention = _tapped("EamMaskUnitAttention", hiera.MaskUnitAttention)
EamCrossAttention = _tapped("EamCrossAttention", crossvit.CrossAttention)


class EamBeitAttention(_Tapped, beit.Attention):
    """BEiT attention; while token pruning has dropped tokens, the pruning block sets ``eam.positions`` around
    the call, and the relative-position bias covers those tokens only."""

    def _get_rel_pos_bias(self) -> torch.Tensor:
        bias = super()._get_rel_pos_bias()
        return bias if self.eam.positions is None else gather_pair_bias(bias, self.eam.positions)


class EamWindowAttentionV2(_Tapped, swinv2.WindowAttention):
    """Swin v2 cosine window attention; ``eam.num_windows`` is set from the owning block."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.eam_active:
            return super().forward(x, mask=mask)
        num_win = self._eam_groups(x.shape[0], mask)
        if self.eam_executes_plan:
            return swinv2_heads(self, x, mask)
        return self._eam_tapped(lambda: swinv2.WindowAttention.forward(self, x, mask=mask), num_win, mask)


class EamGPSA(EamBase, convit.GPSA):
    """ConViT gated positional self-attention: the map is the gated mix of two softmaxes."""

    def get_attention(self, x: torch.Tensor) -> torch.Tensor:
        attn = super().get_attention(x)
        return self._eam_post_softmax(attn, 1, None) if self.eam_active else attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.eam.observer_k is not None or self.eam.score_bias is not None:
            raise EamError(f"ConViT GPSA layer {self.eam.layer} gates positional scores: no keys to match nor scores "
                           "to bias; merge tokens at the MHSA blocks only")
        if self.eam_executes_plan:
            return gpsa_heads(self, x)
        if self.eam_quant is None:
            return super().forward(x)
        # Quantized: q and k of the patch scores and v through the tap; the softmaxes are left alone
        # (get_attention quantizes their gated mix).
        return run_tapped(self, _SoftmaxTap(None, self.eam_quant, softmaxes=2), lambda: super(EamGPSA, self).forward(x),
                          False)


def _bind_tnt(model: nn.Module) -> None:
    """The patches per image of TNT's inner attention (each patch position is its own variable)."""
    for module in model.modules():
        if isinstance(module, tnt.TNT):
            for block in module.blocks:
                if isinstance(block.attn_in, EamTntAttention):
                    block.attn_in.eam.num_windows = module.pixel_embed.num_patches


def _convit_refuse(block: nn.Module) -> Optional[str]:
    if isinstance(block.attn, convit.GPSA):
        return ("its GPSA blocks compute positional attention over the full patch grid and run before the class "
                "token exists; use the MHSA blocks (local_up_to_layer onwards)")
    return None


def _eva_refuse(model: nn.Module) -> Optional[str]:
    rope = getattr(model, "rope", None)
    if getattr(model, "rope_mixed", False) or (rope is not None and type(rope).__name__ != "RotaryEmbeddingCat"):
        return (f"its {type(rope).__name__} rotary embedding cannot be gathered for the present tokens; "
                "only EVA02's shared RotaryEmbeddingCat is supported")
    return None


def _eva_inputs(a: nn.Module) -> list:
    return ([a.qkv] if a.qkv is not None else [a.q_proj, a.k_proj, a.v_proj]) + ([a.gate] if a.gate is not None else [])


# Token pruning and merging (methods/prune.py, merge.py) in the flat-token families; XCiT's class attention
# shares CaiT's adapter (XCiT itself is refused by its XCA blocks).
_CAIT = TokenFamily("CaiT", cait.LayerScaleBlock, PruneCaitBlock, MergeCaitBlock,
                    {cait.LayerScaleBlockClassAttn: MergeCaitClassBlock}, class_token=False)
_CONVIT = TokenFamily("ConViT", convit.Block, PruneConvitBlock, MergeConvitBlock, refuse=_convit_refuse)
_NO_TOKENS = ("does not apply to XCiT: its XCA blocks attend over channels (no token scores or keys) and their "
              "local patch interaction convolves the full patch grid; its class attention only comes after them")
_NONE = lambda a: [None]  # noqa: E731 (a conv, pooling or padding also reads the normalised input)
_WINDOW_ROW = "a row there is one (window, token) pair"
_VOLO = dict(input_size=volo_size, min_opset=volo_opset)
# What each class computes (q, k and v, the terms before the softmax, its layer map) is in
# docs/architecture-modules.md, "The families' attention classes".
ADAPTERS: tuple[Adapter, ...] = (
    _adapter("EVA / EVA02", eva.EvaAttention, EamEvaAttention, heads="sdpa", cost_modelled=True,
             quant=QuantFacts(_eva_inputs, {eva.EvaBlock: fq.attn_block}, separate_bias=True),
             tokens=TokenFamily("EVA02", eva.EvaBlock, PruneEvaBlock, MergeEvaBlock, positions=True,
                                refuse_model=_eva_refuse)),
    _adapter("BEiT", beit.Attention, EamBeitAttention, heads="sdpa", cost_modelled=True,
             quant=QuantFacts(groups={beit.Block: fq.attn_block}, separate_bias=True),
             tokens=TokenFamily("BEiT", beit.Block, PruneBeitBlock, MergeBeitBlock, positions=True)),
    # Swin v2 and EVA's post-norm blocks have no groups: the norm follows the attention and the MLP.
    _adapter("Swin v2", swinv2.WindowAttention, EamWindowAttentionV2, no_rows=_WINDOW_ROW, heads="own",
             cost_modelled=True, quant=QuantFacts(in_float=("cpb_mlp",), separate_bias=True),
             bind=partial(bind_windows, EamWindowAttentionV2),
             why_not={"adfq": "ADFQ-ViT quantization does not apply to Swin v2: its blocks are post-norm, so no "
                              "LayerNorm feeds a Linear and its per-patch outlier-aware quantizer has no input; "
                              "use RepQ-ViT or PMQ"}),
    _adapter("CaiT", cait.TalkingHeadAttn, EamTalkingHeadAttn, tokens=_CAIT,
             quant=QuantFacts(groups={cait.LayerScaleBlock: fq.attn_block}, in_float=("proj_l", "proj_w")),
             why_not={"executed_head": "executed head freezing does not apply to CaiT's talking-heads attention: a "
                                       "linear layer mixes every head's scores before the softmax, so no head's "
                                       "q·k can be skipped; simulate its heads (execute=False)"}),
    # XCiT's class-attention block is not a group: its normalised tokens also pass through unchanged.
    _adapter("CaiT / XCiT", cait.ClassAttn, EamClassAttn, heads="sdpa", tokens=_CAIT,
             quant=QuantFacts(lambda a: [a.k, a.q, a.v], {cait.LayerScaleBlockClassAttn: fq.attn_block},
                              one_token=("q",))),
    _adapter("ConViT", convit.GPSA, EamGPSA, heads="own", tokens=_CONVIT,
             quant=QuantFacts(lambda a: [a.qk, a.v], {convit.Block: fq.attn_block}, in_float=("pos_proj",))),
    _adapter("ConViT", convit.MHSA, EamMHSA, heads="matmul", tokens=_CONVIT),
    _adapter("XCiT", xcit.XCA, EamXCA, heads="sdpa",
             quant=QuantFacts(groups={xcit.XCABlock: fq.attn_block}, channel_map=True),
             why_not={"prune": "token pruning " + _NO_TOKENS, "merge": "token merging " + _NO_TOKENS}),
    # Twins pads the grid to whole windows with zeros after the norm, and padded tokens are keys.
    _adapter("Twins", twins.LocallyGroupedAttn, EamLocallyGroupedAttn, heads="sdpa", input_size=twins_size,
             no_rows="its local attention is windowed, " + _WINDOW_ROW,
             quant=QuantFacts(_NONE, {twins.Block: fq.attn_block})),
    _adapter("Twins", twins.GlobalSubSampleAttn, EamGlobalSubSampleAttn, heads="sdpa", input_size=twins_size,
             quant=QuantFacts(lambda a: [a.kv, a.q] if a.sr is None else [None])),
    _adapter("MViTv2", mvitv2.MultiScaleAttention, EamMultiScaleAttention, heads="matmul", cut_einsum=True,
             input_size=mvitv2_size, quant=QuantFacts(groups={mvitv2.MultiScaleBlock: fq.mvitv2_block})),
    _adapter("MViTv2", mvitv2.MultiScaleAttentionPoolFirst, EamMultiScaleAttentionPoolFirst, heads="matmul",
             cut_einsum=True, input_size=mvitv2_size, quant=QuantFacts(_NONE)),
    _adapter("LeViT", levit.Attention, EamLevitAttention, heads="matmul", input_size=levit_size, **_batchnorm("LeViT")),
    _adapter("LeViT", levit.AttentionDownsample, EamLevitAttentionDownsample, heads="matmul", input_size=levit_size,
             **_batchnorm("LeViT")),
    # VOLO's outlooker: an average pooling also reads norm1's output.
    _adapter("VOLO", volo.Attention, EamVoloAttention, heads="sdpa",
             quant=QuantFacts(groups={volo.Transformer: fq.attn_block, volo.ClassBlock: fq.attn_block,
                                      volo.Outlooker: fq.mlp_only}), **_VOLO),
    _adapter("VOLO", volo.ClassAttention, EamVoloClassAttention, heads="matmul",
             quant=QuantFacts(lambda a: [a.kv, a.q]), **_VOLO),
    _adapter("TNT", tnt.Attention, EamTntAttention, heads="matmul", bind=_bind_tnt, input_size=tnt_size,
             no_rows="its inner attention runs per patch, a row there is one (patch, pixel) pair",
             quant=QuantFacts(lambda a: [a.qk, a.v], {tnt.Block: fq.tnt_block})),
    _adapter("EfficientFormer", efficientformer.Attention, EamEfficientFormerAttention, heads="matmul",
             **_batchnorm("EfficientFormer", "its blocks are BatchNorm convolutions up to the last stage")),
    _adapter("FastViT", fastvit.Attention, EamFastVitAttention, heads="sdpa", **_batchnorm("FastViT")),
    _adapter("Hiera", hiera.MaskUnitAttention, EamMaskUnitAttention, heads="sdpa", heads_at=1, input_size=hiera_size,
             no_rows="its attention runs per mask unit, a row there is one (unit, token) pair",
             quant=QuantFacts(groups={hiera.HieraBlock: fq.hiera_block})),
    _adapter("CrossViT", crossvit.CrossAttention, EamCrossAttention, heads="matmul",
             quant=QuantFacts(lambda a: [a.wk, a.wq, a.wv], {crossvit.CrossAttentionBlock: fq.norm1_only})),
)

# Attention-like timm classes that have no token-by-token softmax map, and why.
UNMAPPED: dict[type, str] = {
    volo.OutlookAttention: "VOLO's outlook attention predicts its weights from the centre token (no q·k)",
}

_BN = "quantization: BatchNorm, no LayerNorm → Linear pairs"
FAMILIES: tuple[Family, ...] = (
    Family("EVA / EVA02", (eva.EvaAttention,), "eva02_tiny_patch14_224"),
    Family("BEiT", (beit.Attention,), "beit_base_patch16_224"),
    Family("Swin v2", (swinv2.WindowAttention,), "swinv2_tiny_window8_256",
           "rows: windowed map; ADFQ-ViT: post-norm, no LayerNorm → Linear input"),
    Family("CaiT", (cait.TalkingHeadAttn, cait.ClassAttn), "cait_xxs24_224",
           "executed heads: talking heads mix all heads' scores before the softmax"),
    Family("ConViT", (convit.GPSA, convit.MHSA), "convit_tiny"),
    Family("XCiT", (xcit.XCA, cait.ClassAttn), "xcit_nano_12_p16_224", "XCA is mapped over channels, (H, d, d)"),
    Family("Twins", (twins.LocallyGroupedAttn, twins.GlobalSubSampleAttn), "twins_svt_small",
           "rows: windowed local attention"),
    Family("MViTv2", (mvitv2.MultiScaleAttention, mvitv2.MultiScaleAttentionPoolFirst), "mvitv2_tiny"),
    Family("LeViT", (levit.Attention, levit.AttentionDownsample), "levit_128s", _BN),
    Family("VOLO", (volo.Attention, volo.ClassAttention), "volo_d1_224",
           "outlook attention has no q·k and is not mapped; export picks opset 18 (Col2Im)"),
    Family("TNT", (tnt.Attention,), "tnt_s_patch16_224", "rows: inner attention runs per patch"),
    Family("EfficientFormer", (efficientformer.Attention,), "efficientformer_l1", _BN),
    Family("FastViT", (fastvit.Attention,), "fastvit_sa12", _BN),
    Family("Hiera", (hiera.MaskUnitAttention,), "hiera_tiny_224", "rows: attention per mask unit"),
    Family("CrossViT", (Attention, crossvit.CrossAttention), "crossvit_tiny_240"),
)
