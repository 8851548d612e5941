"""Executed head freezing in the families of ``modules/families.py`` (``modules/family_heads.py``).

The tiny seeded configs are the table of ``test_families.py``. References: the simulated path
(``execute=False``: timm's whole attention with the frozen heads' maps overwritten), timm's own
unmodified model, and what the executed forward hands to the softmax and the fused kernel.
"""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from conftest import models_rows
from eamvit.errors import EamError
from eamvit.methods.freeze import FreezeConfig, freeze_
from eamvit.modules.attention import instrument, set_frozen

from test_families import FAMILIES, _maps, _pair

# Families whose every attention class executes frozen heads; the others simulate some layers.
EXECUTED = {"eva02", "beit", "swinv2", "convit", "xcit", "twins", "mvitv2", "levit", "volo", "tnt", "efficientformer",
            "fastvit", "hiera", "crossvit"}
NAMES = {"eva02": "EVA / EVA02", "beit": "BEiT", "swinv2": "Swin v2", "cait": "CaiT", "convit": "ConViT",
         "xcit": "XCiT", "twins": "Twins", "mvitv2": "MViTv2", "levit": "LeViT", "volo": "VOLO", "tnt": "TNT",
         "efficientformer": "EfficientFormer", "fastvit": "FastViT", "hiera": "Hiera", "crossvit": "CrossViT"}


class _Heads(TorchFunctionMode):
    """Records how many heads (dim -3 of the output; Hiera's dim 1) every softmax and fused attention had."""

    def __init__(self, heads_at_1: bool) -> None:
        super().__init__()
        self.seen: list[int] = []
        self.at = 1 if heads_at_1 else -3

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.softmax, torch.Tensor.softmax, F.softmax, F.scaled_dot_product_attention) \
                and out.dim() >= 3:
            self.seen.append(out.shape[self.at])
        return out


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


# LeViT's conv layout (v · Aᵀ), the same classes as levit_128s.
LEVIT_CONV = (lambda: timm.create_model("levit_conv_128s", img_size=32, embed_dim=(16, 24), key_dim=8,
                                        num_heads=(2, 2), depth=(1, 1), num_classes=5), 32,
              {"Attention", "AttentionDownsample"})


# MViTv2 with two heads per stage: kept heads next to frozen ones (the table's config has one head).
MVITV2_2H = (lambda: MultiScaleVit(MultiScaleVitCfg(depths=(1, 1), embed_dim=16, num_heads=2), img_size=32,
                                   num_classes=5), 32, {"MultiScaleAttention"})
EXTRA = {"levit_conv": LEVIT_CONV, "mvitv2_2h": MVITV2_2H}


@pytest.fixture(autouse=True)
def _extra_configs(monkeypatch):
    for name, config in EXTRA.items():
        monkeypatch.setitem(FAMILIES, name, config)


@pytest.mark.parametrize("family", sorted(FAMILIES) + sorted(EXTRA))
def test_executed_heads_equal_the_simulated_ones(family):
    reference, model, x = _pair(family)
    maps = _maps(model, x[0])
    with torch.no_grad():
        want = reference(x)
    freeze_(model, maps, FreezeConfig(tau=0.0, granularity="head"))
    with torch.no_grad():
        assert torch.equal(model(x), want)  # τ = 0: timm's own forward
    for tau in (0.5, 1.0):  # some heads kept, then none
        freeze_(model, maps, FreezeConfig(tau=tau, granularity="head", execute=False))
        with torch.no_grad():
            simulated = model(x)
        report = freeze_(model, maps, FreezeConfig(tau=tau, granularity="head"))
        assert report.executed == (family in EXECUTED | set(EXTRA))
        with torch.no_grad():
            executed = model(x)
        assert _relative(executed, simulated) <= 1e-5, tau
        assert _relative(executed, want) > 1e-3  # the frozen heads do reach the logits


@pytest.mark.parametrize("family", sorted(EXECUTED) + sorted(EXTRA))
def test_frozen_heads_get_no_scores_and_no_softmax(family):
    _, model, x = _pair(family)
    maps = _maps(model, x[0])
    layers = instrument(model)
    freeze_(model, maps, FreezeConfig(tau=0.5, granularity="head", execute=False))
    with _Heads(family == "hiera") as simulated, torch.no_grad():
        model(x)
    freeze_(model, maps, FreezeConfig(tau=0.5, granularity="head"))
    # ConViT's GPSA computes two softmaxes per head (patch and positional scores).
    frozen = sum(int(m.eam_plan_frozen.numel()) * (2 if type(m).__name__ == "EamGPSA" else 1)
                 for m in layers if m.eam_frozen_mask is not None)
    assert frozen and all(m.eam_executes_plan for m in layers if m.eam_frozen_mask is not None)
    with _Heads(family == "hiera") as executed, torch.no_grad():
        model(x)
    # Each layer's softmax (or fused kernel) sees only its kept heads: the frozen ones are missing in total.
    assert sum(simulated.seen) - sum(executed.seen) == frozen


def test_executed_heads_learn_like_the_simulated_ones():
    _, model, x = _pair("eva02")
    maps = _maps(model, x[0])
    grads = []
    for execute in (False, True):
        freeze_(model, maps, FreezeConfig(tau=0.5, granularity="head", execute=execute))
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    assert _relative(grads[1], grads[0]) <= 1e-4


@pytest.mark.parametrize("family,needle", [
    ("cait", "executed head freezing does not apply to CaiT's talking-heads attention"),
])
def test_executed_heads_are_refused_in_one_line_where_they_cannot_apply(family, needle):
    _, model, x = _pair(family)
    maps = _maps(model, x[0])
    layer = next(m for m in instrument(model) if "executed_head" not in m.eam.adapter.verbs)
    shape = maps.mean[layer.eam.layer].shape
    with pytest.raises(EamError) as err:
        set_frozen(layer, torch.ones(shape, dtype=torch.bool), torch.zeros(shape), "head")
    text = str(err.value)
    assert "\n" not in text and needle in text, text
    assert layer.eam_frozen_mask is None


def test_models_table_declares_executed_heads():
    rows = models_rows()
    for family, name in NAMES.items():
        assert rows[name]["executed heads"] == ("yes" if family in EXECUTED else "no"), name
