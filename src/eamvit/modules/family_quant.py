"""What RepQ-ViT needs to know about the blocks of a family (LayerNorm → Linear groups, float Linears),
read by the functions its adapter names. See docs/architecture-modules.md."""
from __future__ import annotations

from typing import Optional

from torch import nn

from timm.layers import GluMlp, Mlp, SwiGLU

from eamvit.modules.adapters import EamBase

Group = tuple[nn.LayerNorm, list[nn.Linear]]


def group(norm: Optional[nn.Module], *linears: Optional[nn.Module]) -> Optional[Group]:
    """``(norm, linears)`` when ``norm`` is an affine LayerNorm over the input of every one of ``linears``."""
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None or norm.weight.dim() != 1:
        return None
    if not linears or not all(isinstance(l, nn.Linear) and l.in_features == norm.weight.shape[0] for l in linears):
        return None
    return norm, list(linears)


def _mlp_in(mlp: nn.Module) -> list[Optional[nn.Module]]:
    """The input Linears of an MLP whose input goes nowhere else."""
    if type(mlp) in (Mlp, GluMlp):
        return [mlp.fc1]
    if type(mlp) is SwiGLU:
        return [mlp.fc1_g, mlp.fc1_x]
    return [None]


def attn_inputs(attn: nn.Module) -> list[Optional[nn.Module]]:
    """The Linears an instrumented attention applies to its whole input (``[None]`` for any other module)."""
    return attn.eam.adapter.quant.inputs(attn) if isinstance(attn, EamBase) else [None]


def attn_block(b: nn.Module) -> list:
    """norm1 → the attention's input Linears, norm2 → the MLP's."""
    return [group(b.norm1, *attn_inputs(b.attn)), group(b.norm2, *_mlp_in(b.mlp))]


def vit_block(b: nn.Module) -> list:
    """ViT and Swin v1 blocks: norm1 → the attention's input Linears, norm2 → a plain ``Mlp``'s fc1."""
    return [group(b.norm1, *attn_inputs(b.attn)), group(b.norm2, b.mlp.fc1) if type(b.mlp) is Mlp else None]


def patch_merging(m: nn.Module) -> list:
    return [group(m.norm, m.reduction)]


def mvitv2_block(b: nn.Module) -> list:
    attn = attn_inputs(b.attn)
    extra = [b.shortcut_proj_attn] if b.shortcut_proj_attn is not None else []
    mlp = _mlp_in(b.mlp) + ([b.shortcut_proj_mlp] if b.shortcut_proj_mlp is not None else [])
    return [group(b.norm1, *attn, *extra) if attn != [None] else None, group(b.norm2, *mlp)]


def hiera_block(b: nn.Module) -> list:
    lins = attn_inputs(b.attn) + ([b.proj] if b.do_expand and b.proj is not None else [])
    return [group(b.norm1, *lins), group(b.norm2, *_mlp_in(b.mlp))]


def tnt_block(b: nn.Module) -> list:
    # norm1_proj → proj is a group only when the norm spans proj's flattened input (the newer layout).
    return [group(b.norm_in, *attn_inputs(b.attn_in)), group(b.norm_mlp_in, *_mlp_in(b.mlp_in)),
            group(b.norm1_proj, b.proj), group(b.norm_out, *attn_inputs(b.attn_out)),
            group(b.norm_mlp, *_mlp_in(b.mlp))]


def mlp_only(b: nn.Module) -> list:
    """norm2 → the MLP (VOLO's outlooker: an average pooling also reads norm1's output)."""
    return [group(b.norm2, *_mlp_in(b.mlp))]


def norm1_only(b: nn.Module) -> list:
    """norm1 → the attention (CrossViT's cross-attention block has no MLP)."""
    return [group(b.norm1, *attn_inputs(b.attn))]


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, EamBase)]


def float_linears(model: nn.Module) -> set[int]:
    """``id`` of every Linear of an instrumented ``model`` that stays in float (position terms, head mixing)."""
    return {id(l) for a in _layers(model) for name in a.eam.adapter.quant.in_float
            for l in getattr(a, name).modules() if isinstance(l, nn.Linear)}


def class_token_linears(model: nn.Module) -> set[int]:
    """``id`` of the Linears of an instrumented ``model`` that read the class token alone, as ``(B, C)``."""
    return {id(getattr(a, name)) for a in _layers(model) for name in a.eam.adapter.quant.one_token}


def separate_biases_(model: nn.Module) -> None:
    """Make the attentions that pass q / v biases to ``F.linear`` run their (quantized) qkv Linear."""
    for a in _layers(model):
        if a.eam.adapter.quant.separate_bias and getattr(a, "q_bias", None) is not None:
            a.qkv_bias_separate = True
