"""The image size and ONNX opset readers of the families whose models record their size elsewhere than
``patch_embed.img_size``."""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

from torch import nn

from timm.models import levit, volo

from eamvit.modules.adapters import as_pair, patch_embed_size

tnt_size = partial(patch_embed_size, attr="pixel_embed")
twins_size = partial(patch_embed_size, attr="patch_embeds")  # the first stage's embedding sees the image


def _scaled(grid: Any, stride: Any) -> tuple[int, int]:
    (gh, gw), (sh, sw) = as_pair(grid), as_pair(stride)
    return gh * sh, gw * sw


def _conv_stride(module: nn.Module) -> tuple[int, int]:
    """The product of the strides of ``module``'s convolutions: a convolutional patch embedding's patch."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return math.prod(c.stride[0] for c in convs), math.prod(c.stride[1] for c in convs)


def mvitv2_size(model: nn.Module) -> Optional[tuple[int, int]]:
    """MViTv2 records no image size: its first stage's token grid (where that stage pools no queries)
    times the patch embedding's stride."""
    stages, pe = getattr(model, "stages", None), getattr(model, "patch_embed", None)
    if not stages or pe is None:
        return None
    pool_q = stages[0].blocks[0].attn.pool_q
    if pool_q is not None and as_pair(pool_q.stride) != (1, 1):
        return None
    return _scaled(stages[0].feat_size, _conv_stride(pe))


def levit_size(model: nn.Module) -> Optional[tuple[int, int]]:
    """LeViT records no image size: its first attention's token grid times the stem's stride."""
    stride = getattr(getattr(model, "stem", None), "stride", None)
    first = next((m for m in model.modules() if isinstance(m, (levit.Attention, levit.AttentionDownsample))), None)
    return _scaled(first.resolution, stride) if stride is not None and first is not None else None


def volo_size(model: nn.Module) -> Optional[tuple[int, int]]:
    """VOLO records no image size: its position grid times its pooling scale and the patch embedding's stride."""
    pos, pe = getattr(model, "pos_embed", None), getattr(model, "patch_embed", None)
    if pos is None or pe is None:
        return None
    (sh, sw), scale = _conv_stride(pe), int(getattr(model, "pooling_scale", 1))
    return int(pos.shape[1]) * scale * sh, int(pos.shape[2]) * scale * sw


def volo_opset(model: nn.Module, size: tuple[int, int]) -> tuple[int, str]:
    """VOLO's outlook attention (where the model has it) folds its patches back: ONNX Col2Im, opset 18."""
    if any(isinstance(m, volo.OutlookAttention) for m in model.modules()):
        return 18, "VOLO's outlook attention folds its patches back, ONNX Col2Im from opset 18"
    return 0, ""


def hiera_size(model: nn.Module) -> Optional[tuple[int, int]]:
    """Hiera's token grid times its patch stride (images only, not video)."""
    grid, stride = getattr(model, "tokens_spatial_shape", None), getattr(model, "patch_stride", None)
    return _scaled(grid, stride) if grid is not None and stride is not None and len(grid) == 2 else None
