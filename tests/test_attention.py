"""The class-swap instrumentation reproduces timm exactly and freezes what it is told to."""
import pytest
import timm
import torch
import torch.nn.functional as F

import eamvit
from eamvit.modules.attention import EamAttention, EamWindowAttention, instrument, observe
from eamvit.errors import EamError

from conftest import TINY_DISTILLED, TINY_SWIN, TINY_VIT


def _pair(spec):
    torch.manual_seed(0)
    ref = timm.create_model(spec[0], **spec[1]).eval()
    model = eamvit.create_model(spec[0], model_kwargs=dict(spec[1]))
    model.load_state_dict(ref.state_dict())
    return ref, model


@pytest.mark.parametrize("spec", [TINY_VIT, TINY_DISTILLED, TINY_SWIN], ids=["vit", "deit-distilled", "swin"])
def test_outputs_equal_timm_with_and_without_observers(spec):
    ref, model = _pair(spec)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
        fused = model(x)
        seen = []
        n = len(instrument(model))
        with observe(model, {i: (lambda a, m, seen=seen: seen.append(a.shape)) for i in range(n)}):
            explicit = model(x)
        after = model(x)
    assert (fused - want).abs().max() <= 1e-5
    assert (explicit - want).abs().max() <= 1e-5
    assert len(seen) == len(instrument(model))
    assert all(l.eam.observer is None for l in instrument(model))  # the block cleared itself
    assert torch.equal(after, fused)


def test_swap_is_by_class_and_idempotent():
    _, model = _pair(TINY_SWIN)
    layers = instrument(model)
    assert all(type(l) is EamWindowAttention for l in layers)
    assert instrument(model) == layers
    assert [l.eam.layer for l in layers] == list(range(4))
    _, vit = _pair(TINY_VIT)
    assert all(type(b.attn) is EamAttention for b in vit.blocks)


def test_unhooked_blocks_keep_fused_attention(monkeypatch):
    _, model = _pair(TINY_VIT)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with observe(model, {0: lambda a, m: None}), torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert len(calls) == 1  # layer 1 fused, layer 0 explicit


def _by_hand(attn, x, mask, values):
    qkv = attn.qkv(x).reshape(x.shape[0], 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    a = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * attn.scale, -1)
    a = torch.where(mask, values, a)
    return attn.proj((a @ qkv[2]).transpose(1, 2).reshape(x.shape[0], 17, 32))


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["whole-batch", "one-image-chunks"])
def test_frozen_entries_are_replaced_by_hand(monkeypatch, request, chunk_bytes):
    from eamvit.modules import vit_swin

    if chunk_bytes is not None:  # the inference path's map, one image at a time (on one thread)
        monkeypatch.setattr(vit_swin, "_MAP_CHUNK_BYTES", chunk_bytes)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    _, model = _pair(TINY_VIT)
    attn = model.blocks[0].attn
    x = torch.randn(3, 17, 32)
    mask = torch.zeros(2, 17, 17, dtype=torch.bool)
    mask[1, 3, :5] = True
    mask[0, 0, 16] = True
    values = torch.rand(2, 17, 17)
    attn.eam_frozen_mask, attn.eam_frozen_values = mask, values
    with torch.no_grad():
        got, want = attn(x), _by_hand(attn, x, mask, values)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got, attn(x).detach())  # the autograd path: the same numbers
    with torch.no_grad():  # a mask changed in place after a forward is the one used next
        mask[1, 5, 2:9] = True
        values[1, 5] = 0.25
        got, want = attn(x), _by_hand(attn, x, mask, values)
    assert torch.allclose(got, want, atol=1e-6)


def test_unsupported_model_names_families():
    with pytest.raises(EamError, match="ViT.*Swin"):
        eamvit.create_model("resnet18", model_kwargs=dict(num_classes=2))


def test_unknown_model():
    with pytest.raises(EamError, match="unknown timm model"):
        eamvit.create_model("vit_does_not_exist")


def test_observer_sees_the_live_map_in_training():
    _, model = _pair(TINY_VIT)
    seen = []
    with observe(model, {0: lambda a, m: seen.append(a)}):
        model(torch.randn(1, 3, 32, 32))
        assert seen[0].requires_grad  # pruning's fusion weights need the gradient (EViT)
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    assert not seen[1].requires_grad


def test_observe_nests_and_restores_on_error():
    _, model = _pair(TINY_VIT)
    outer, inner = [], []
    x = torch.randn(1, 3, 32, 32)
    with observe(model, {0: lambda a, m: outer.append(1)}):
        with pytest.raises(RuntimeError):
            with observe(model, {0: lambda a, m: inner.append(1)}):
                model(x)
                raise RuntimeError("body fails")
        model(x)  # only the outer observer is left
    model(x)      # and none after the outer block
    assert (len(inner), len(outer)) == (1, 2)
    assert instrument(model)[0].eam.observer is None


def test_observe_rejects_a_missing_layer():
    _, model = _pair(TINY_VIT)
    with pytest.raises(EamError, match="layer 5 does not exist"):
        with observe(model, {5: lambda a, m: None}):
            pass
