"""Every attention family of the adapter registry, held against timm's own unmodified model.

One row per family: a tiny, seeded, random-weight config built by timm itself. The reference is
always a deep copy of that model that eamvit never touched.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import pytest
import torch
from torch import nn

import timm
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
from timm.models.volo import VOLO

from eamvit.errors import EamError
from eamvit.methods.calibrate import compute_entropy_maps
from eamvit.methods.freeze import FreezeConfig, freeze_
from eamvit.modules.attention import instrument, layer_shapes

_T = dict(num_classes=5)
# family: (builder, image size, the attention classes the model must hold)
FAMILIES = {
    "eva02": (lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2, embed_dim=32, num_heads=2,
                                        **_T), 28, {"EvaAttention"}),
    "beit": (lambda: timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                                       num_heads=2, **_T), 32, {"Attention"}),
    "swinv2": (lambda: timm.create_model("swinv2_tiny_window8_256", img_size=32, patch_size=2, window_size=4,
                                         embed_dim=16, depths=(2, 2), num_heads=(2, 2), **_T), 32, {"WindowAttention"}),
    "cait": (lambda: timm.create_model("cait_xxs24_224", img_size=32, patch_size=8, depth=2, depth_token_only=1,
                                       embed_dim=32, num_heads=2, **_T), 32, {"TalkingHeadAttn", "ClassAttn"}),
    "convit": (lambda: timm.create_model("convit_tiny", img_size=32, patch_size=8, depth=2, local_up_to_layer=1,
                                         embed_dim=32, num_heads=2, **_T), 32, {"GPSA", "MHSA"}),
    "xcit": (lambda: timm.create_model("xcit_nano_12_p16_224", img_size=32, depth=2, cls_attn_layers=1,
                                       embed_dim=32, num_heads=2, **_T), 32, {"XCA", "ClassAttn"}),
    "twins": (lambda: timm.create_model("twins_svt_small", img_size=32, depths=(2, 1, 1, 1), wss=(2, 2, 2, 2),
                                        embed_dims=(16, 16, 16, 16), num_heads=(1, 2, 2, 2), **_T), 32,
              {"LocallyGroupedAttn", "GlobalSubSampleAttn"}),
    "mvitv2": (lambda: MultiScaleVit(MultiScaleVitCfg(depths=(1, 1), embed_dim=16, num_heads=1), img_size=32, **_T),
               32, {"MultiScaleAttention"}),
    "levit": (lambda: timm.create_model("levit_128s", img_size=32, embed_dim=(16, 24), key_dim=8, num_heads=(2, 2),
                                        depth=(1, 1), **_T), 32, {"Attention", "AttentionDownsample"}),
    "volo": (lambda: VOLO(layers=(1, 1), img_size=32, embed_dims=(16, 16), num_heads=(1, 2),
                          downsamples=(True, False), outlook_attention=(True, False), **_T), 32,
             {"Attention", "ClassAttention"}),
    "tnt": (lambda: timm.create_model("tnt_s_patch16_224", img_size=32, depth=2, embed_dim=32, inner_dim=8,
                                      num_heads_outer=2, num_heads_inner=2, **_T), 32, {"Attention"}),
    "efficientformer": (lambda: timm.create_model("efficientformer_l1", depths=(1, 1, 1, 1), embed_dims=(8, 8, 8, 16),
                                                  num_vit=1, **_T), 224, {"Attention"}),
    "fastvit": (lambda: timm.create_model("fastvit_sa12", layers=(1, 1, 1, 1), embed_dims=(8, 8, 16, 32),
                                          **_T), 64, {"Attention"}),
    "hiera": (lambda: timm.create_model("hiera_tiny_224", img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1),
                                        **_T), 64, {"MaskUnitAttention"}),
    "crossvit": (lambda: timm.create_model("crossvit_tiny_240", img_size=120, embed_dim=[16, 32],
                                           depth=[[1, 1, 0]], num_heads=[2, 2], **_T), 120, {"Attention", "CrossAttention"}),
}


def _pair(family: str, table: Optional[dict] = None) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """timm's model (never touched by eamvit), a copy of it, and two images (``table``: rows as :data:`FAMILIES`)."""
    build, size, classes = (table or FAMILIES)[family]
    torch.manual_seed(0)
    reference = build().eval()
    # timm's initialisation makes random-weight attention nearly uniform and silences residual branches
    # (layer scales of 1e-5, Swin v2's post-norms at 0). Wider weights and unit scales give maps that
    # differ from image to image and reach the logits, so freezing one image's maps changes another's.
    with torch.no_grad():
        for name, p in reference.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() >= 2 and "pos" not in name:
                p.normal_(0.0, 1.5 / math.sqrt(p[0].numel()))
            elif leaf.startswith("gamma") or (leaf == "weight" and p.dim() == 1):
                p.fill_(1.0)
    assert classes <= {type(m).__name__ for m in reference.modules()}
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return reference, copy.deepcopy(reference), x


def _maps(model: nn.Module, image: torch.Tensor):
    return compute_entropy_maps(model, [(image, 0)], batch_size=1, progress=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tau0_keeps_timm_and_tau1_reproduces_the_calibration_image(family):
    reference, model, x = _pair(family)
    with torch.no_grad():
        want = reference(x)
    maps = _maps(model, x[0])
    shapes = layer_shapes(model, x[:1])
    assert [tuple(e.shape) for e in maps.entropy] == shapes and shapes
    freeze_(model, maps, FreezeConfig(tau=0.0))
    with torch.no_grad():
        assert torch.equal(model(x), want)  # nothing attached: timm's own forward
    freeze_(model, maps, FreezeConfig(tau=1.0))
    with torch.no_grad():
        got = model(x)
    scale = want.abs().max()
    assert (got[0] - want[0]).abs().max() <= 1e-4 * scale
    assert (got[1] - want[1]).abs().max() > 1e-3 * scale


@pytest.mark.parametrize("family", ["eva02", "swinv2", "hiera"])
def test_observing_with_grad_matches_timm(family):
    reference, model, x = _pair(family)
    seen = []
    from eamvit.modules.attention import observe

    with observe(model, {0: lambda a, m: seen.append(a.shape)}):
        got = model(x)
    assert seen and torch.allclose(got, reference(x), rtol=1e-4, atol=1e-5)


class _OwnAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def test_unsupported_attention_is_one_line():
    model = nn.Sequential(nn.Linear(8, 8), _OwnAttention())
    with pytest.raises(EamError) as err:
        instrument(model)
    text = str(err.value)
    assert "\n" not in text and "_OwnAttention" in text and "`eamvit models`" in text
    assert "EVA / EVA02" in text and "Swin v2" in text


def test_verbs_a_family_does_not_declare_are_refused_before_anything_changes():
    from eamvit.methods.adfq import ADFQConfig
    from eamvit.methods.quantize import quantize_

    reference, model, x = _pair("swinv2")
    _maps(model, x[0])  # rows and executed heads where a family has none: test_families_export.py
    with pytest.raises(EamError, match="ADFQ-ViT quantization does not apply to Swin v2: its blocks are post-norm"):
        quantize_(model, ADFQConfig(), [x])
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_models_table_lists_every_family_with_what_it_supports(capsys):
    from eamvit.cli.main import main

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(head)
        rows[cells[0]] = dict(zip(head, cells))
    named = {"eva02": "EVA / EVA02", "beit": "BEiT", "swinv2": "Swin v2", "cait": "CaiT", "convit": "ConViT",
             "xcit": "XCiT", "twins": "Twins", "mvitv2": "MViTv2", "levit": "LeViT", "volo": "VOLO", "tnt": "TNT",
             "efficientformer": "EfficientFormer", "fastvit": "FastViT", "hiera": "Hiera", "crossvit": "CrossViT"}
    assert set(named) == set(FAMILIES)
    for family in named.values():  # what the test above shows working, and the refusals below
        assert rows[family]["maps"] == rows[family]["entry freeze"] == "yes"
        # executed heads: test_families_heads.py; ADFQ-ViT and PMQ: test_families_adfq_pmq.py
    assert rows["Swin v1"]["row freeze"] == "no" and rows["Swin v1"]["RepQ-ViT"] == "yes"
