"""What RepQ-ViT needs to know about the blocks of the families of :mod:`eamvit.modules.families`.

* The LayerNorm → Linear groups: a LayerNorm whose output feeds only Linear layers (one or several:
  separate q, k, v projections, SwiGLU's two input projections, a shortcut projection reading the
  same normalised tokens). They are read from each block's structure, by exact block class, never
  from module names. A norm whose output also reaches anything else (a residual, a conv, a pooling
  with padding) is not a group: scaling its channels would change that other path. The first Linear
  of a group is the one whose input quantizer sets the group's parameters (it sees every token).
* The Linears that are not quantized, because they compute position terms or mix attention maps
  across heads rather than transform tokens: Swin v2's continuous position-bias MLP, ConViT's
  positional projection, CaiT's talking-head mixings (RepQ-ViT leaves the softmax input and position
  bias in float and quantizes the post-softmax map once, with log√2).
* The attentions whose map is over channels (XCiT's XCA), which PMQ's per-patch bits skip, and the
  Linears that read the class token alone (CaiT's class-attention query), where ADFQ-ViT's per-patch
  quantizer has one patch.
* The attentions whose qkv projection adds separate q / v biases through ``F.linear`` with the
  projection's weight (EVA, BEiT, Swin v2): under quantization they add them after the projection
  (timm's ``qkv_bias_separate``), so the quantized projection is the one that runs.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from timm.layers import GluMlp, Mlp, SwiGLU
from timm.models import beit, cait, convit, crossvit, eva, hiera, mvitv2, tnt, twins, volo, xcit
from timm.models import swin_transformer_v2 as swinv2

Group = tuple[nn.LayerNorm, list[nn.Linear]]


def group(norm: Optional[nn.Module], *linears: Optional[nn.Module]) -> Optional[Group]:
    """``(norm, linears)`` when ``norm`` is an affine LayerNorm over the input of every one of ``linears``."""
    lins = list(linears)
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None or not lins:
        return None
    if not all(isinstance(l, nn.Linear) and l.in_features == norm.weight.shape[0] for l in lins):
        return None
    if norm.weight.dim() != 1:
        return None
    return norm, lins


def _mlp_in(mlp: nn.Module) -> list[Optional[nn.Module]]:
    """The input Linears of an MLP whose input goes nowhere else."""
    if type(mlp) in (Mlp, GluMlp):
        return [mlp.fc1]
    if type(mlp) is SwiGLU:
        return [mlp.fc1_g, mlp.fc1_x]
    return [None]


def _eva(b: nn.Module) -> list:
    a = b.attn
    lins = [a.qkv] if a.qkv is not None else [a.q_proj, a.k_proj, a.v_proj]
    if a.gate is not None:
        lins.append(a.gate)
    return [group(b.norm1, *lins), group(b.norm2, *_mlp_in(b.mlp))]


def _qkv_block(b: nn.Module) -> list:
    """norm1 → attn.qkv, norm2 → the MLP input (BEiT, CaiT, XCiT's XCA block, VOLO's transformer)."""
    return [group(b.norm1, b.attn.qkv), group(b.norm2, *_mlp_in(b.mlp))]


def _attn_linears(a: nn.Module) -> list[Optional[nn.Module]]:
    """The Linears an attention applies to its whole input, the one that sees every token first."""
    if isinstance(a, cait.ClassAttn):
        return [a.k, a.q, a.v]
    if isinstance(a, convit.GPSA):
        return [a.qk, a.v]
    if isinstance(a, twins.GlobalSubSampleAttn):
        return [a.kv, a.q] if a.sr is None else [None]  # the sub-sampling conv reads the norm too
    if isinstance(a, volo.ClassAttention):
        return [a.kv, a.q]
    if isinstance(a, tnt.Attention):
        return [a.qk, a.v]
    if isinstance(a, crossvit.CrossAttention):
        return [a.wk, a.wq, a.wv]
    if isinstance(a, (mvitv2.MultiScaleAttentionPoolFirst, twins.LocallyGroupedAttn)):
        # Pooled (convolutions) before its projections; Twins pads the grid to whole windows with
        # zeros after the norm, and padded tokens are keys of the attention.
        return [None]
    return [getattr(a, "qkv", None)]


def _attn_block(b: nn.Module) -> list:
    return [group(b.norm1, *_attn_linears(b.attn)), group(b.norm2, *_mlp_in(b.mlp))]


def _mvitv2(b: nn.Module) -> list:
    attn = _attn_linears(b.attn)
    extra = [b.shortcut_proj_attn] if b.shortcut_proj_attn is not None else []
    mlp = _mlp_in(b.mlp) + ([b.shortcut_proj_mlp] if b.shortcut_proj_mlp is not None else [])
    return [group(b.norm1, *attn, *extra) if attn != [None] else None, group(b.norm2, *mlp)]


def _hiera(b: nn.Module) -> list:
    lins = [b.attn.qkv] + ([b.proj] if b.do_expand and b.proj is not None else [])
    return [group(b.norm1, *lins), group(b.norm2, *_mlp_in(b.mlp))]


def _tnt(b: nn.Module) -> list:
    # norm1_proj → proj is a group only when the norm spans proj's flattened input (the newer layout).
    return [group(b.norm_in, *_attn_linears(b.attn_in)), group(b.norm_mlp_in, *_mlp_in(b.mlp_in)),
            group(b.norm1_proj, b.proj), group(b.norm_out, *_attn_linears(b.attn_out)),
            group(b.norm_mlp, *_mlp_in(b.mlp))]


# Exact block classes → their groups. Not listed, on purpose: Swin v2 and EVA's post-norm blocks
# (the norm follows the attention and the MLP), XCiT's class-attention block (its normalised tokens
# also pass through unchanged), VOLO's outlooker attention (an average pooling reads the norm) and
# Twins' locally grouped attention (zero padding of the grid follows the norm).
PAIR_FINDERS: dict[type, Callable[[nn.Module], list]] = {
    eva.EvaBlock: _eva,
    beit.Block: _qkv_block,
    cait.LayerScaleBlock: _qkv_block,
    cait.LayerScaleBlockClassAttn: _attn_block,
    convit.Block: _attn_block,
    xcit.XCABlock: _qkv_block,
    twins.Block: _attn_block,
    mvitv2.MultiScaleBlock: _mvitv2,
    volo.Transformer: _qkv_block,
    volo.ClassBlock: _attn_block,
    volo.Outlooker: lambda b: [group(b.norm2, *_mlp_in(b.mlp))],
    tnt.Block: _tnt,
    hiera.HieraBlock: _hiera,
    crossvit.CrossAttentionBlock: lambda b: [group(b.norm1, *_attn_linears(b.attn))],
}

# Attention classes → their children that RepQ-ViT leaves in float (see the module doc).
_FLOAT_CHILDREN: dict[type, tuple[str, ...]] = {
    swinv2.WindowAttention: ("cpb_mlp",),
    convit.GPSA: ("pos_proj",),
    cait.TalkingHeadAttn: ("proj_l", "proj_w"),
}
_SEPARATE_BIAS = (eva.EvaAttention, beit.Attention, swinv2.WindowAttention)


def channel_attention(layer: nn.Module) -> bool:
    """Whether an attention layer's map is over channels (XCiT's XCA), not tokens: PMQ's per-patch bits
    have no patches there."""
    return isinstance(layer, xcit.XCA)


def class_token_linears(model: nn.Module) -> set[int]:
    """``id`` of the Linears that read the class token alone, as ``(B, C)`` (CaiT's class-attention query):
    a per-patch quantizer has one patch there."""
    return {id(m.q) for m in model.modules() if isinstance(m, cait.ClassAttn)}


def float_linears(model: nn.Module) -> set[int]:
    """``id`` of every Linear that stays in float (position terms, head mixing)."""
    out: set[int] = set()
    for m in model.modules():
        for cls, names in _FLOAT_CHILDREN.items():
            if isinstance(m, cls):
                out |= {id(l) for name in names for l in getattr(m, name).modules() if isinstance(l, nn.Linear)}
    return out


def separate_biases_(model: nn.Module) -> None:
    """Make the attentions that pass q / v biases to ``F.linear`` run their (quantized) qkv Linear."""
    for m in model.modules():
        if isinstance(m, _SEPARATE_BIAS) and getattr(m, "q_bias", None) is not None:
            m.qkv_bias_separate = True
