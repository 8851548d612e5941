"""Masks per scope, ties, random ablation, frozen-value precision and τ = 0."""
import pytest
import torch
from torch.utils.data import TensorDataset

import eamvit
from eamvit.errors import EamError
from eamvit.methods.freeze import FreezeConfig, freeze_, freeze_masks, frozen_values, unfreeze_

from conftest import TINY_SWIN, TINY_VIT, make


def _ent(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 4, 4, generator=g), torch.rand(2, 4, 4, generator=g)]


@pytest.mark.parametrize("scope,per_layer,per_head", [("head", [8, 8], [4, 4]), ("layer", [8, 8], None),
                                                       ("global", None, None)])
def test_mask_counts_per_scope(scope, per_layer, per_head):
    ent = _ent()
    masks = freeze_masks(ent, 0.25, scope)
    assert sum(int(m.sum()) for m in masks) == 16  # 64 entries, 25 %
    if per_layer:
        assert [int(m.sum()) for m in masks] == per_layer
    if per_head:
        assert [int(m[h].sum()) for m in masks for h in range(2)] == per_head * 2


def test_global_picks_the_lowest_entries():
    ent = [torch.full((1, 2, 2), 5.0), torch.full((1, 2, 2), 5.0)]
    ent[1][0, 1, 0] = 0.1
    ent[0][0, 0, 1] = 0.2
    ent[1][0, 0, 0] = 0.3
    masks = freeze_masks(ent, 3 / 8, "global")
    assert masks[0].nonzero().tolist() == [[0, 0, 1]]
    assert sorted(masks[1].nonzero().tolist()) == [[0, 0, 0], [0, 1, 0]]


def test_ties_broken_by_position():
    ent = [torch.zeros(1, 3, 3)]
    m = freeze_masks(ent, 4 / 9, "layer")[0].flatten()
    assert m.tolist() == [True] * 4 + [False] * 5


def test_swin_head_scope_counts_over_windows():
    ent = [torch.rand(4, 2, 3, 3)]  # (nW, H, N, N)
    m = freeze_masks(ent, 0.5, "head")[0]
    assert [int(m[:, h].sum()) for h in range(2)] == [18, 18]  # k = floor(0.5 * 36 + 0.5)


def test_random_same_counts_seeded():
    ent = _ent()
    a = freeze_masks(ent, 0.3, "head", "random", seed=1)
    b = freeze_masks(ent, 0.3, "head", "random", seed=1)
    c = freeze_masks(ent, 0.3, "head", "random", seed=2)
    e = freeze_masks(ent, 0.3, "head", "entropy")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    assert [int(m[h].sum()) for m in a for h in range(2)] == [int(m[h].sum()) for m in e for h in range(2)]
    assert all(int(m[h].sum()) == 5 for m in a for h in range(2))  # floor(0.3 * 16 + 0.5)


def test_frozen_value_precision_by_hand():
    x = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    # 2-bit uniform on [0, 1]: levels 0, 1/3, 2/3, 1; 0.5 * 3 = 1.5 rounds half to even -> 2/3
    assert torch.allclose(frozen_values(x, 2, "uniform"), torch.tensor([0, 1 / 3, 2 / 3, 1, 1]))
    # 4-bit log2: 0.2 -> round(2.32) = 2 -> 0.25; 0.9 -> round(0.152) = 0 -> 1; 0 -> 0
    assert torch.allclose(frozen_values(x, 4, "log2"), torch.tensor([0, 0.25, 0.5, 1, 1]))
    # 3-bit log2: codes >= 8 map to 0 (2^-8 would be code 8)
    assert frozen_values(torch.tensor([2 ** -8]), 3, "log2").item() == 0
    # log sqrt2: 0.2 -> round(-2 log2 0.2) = round(4.64) = 5 -> 2^-2.5
    assert frozen_values(torch.tensor([0.2]), 4, "logsqrt2").item() == pytest.approx(2 ** -2.5)
    assert torch.equal(frozen_values(x), x)


def _data(n=8):
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.zeros(n, dtype=torch.long))


def test_tau_zero_is_exact_and_tau_changes_outputs():
    model = make(TINY_VIT)
    maps = eamvit.compute_entropy_maps(model, _data(), bits=8, progress=False)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        rep = freeze_(model, maps, FreezeConfig(tau=0.0))
        same = model(x)
        rep2 = freeze_(model, maps, FreezeConfig(tau=0.5))
        changed = model(x)
        unfreeze_(model)
        back = model(x)
    assert rep.frozen == 0 and torch.equal(ref, same)
    assert rep2.frozen_fraction == pytest.approx(0.5, abs=0.01)
    assert not torch.allclose(ref, changed)
    assert torch.equal(ref, back)


def test_full_freeze_uses_mean_maps():
    model = make(TINY_VIT)
    maps = eamvit.compute_entropy_maps(model, _data(), bits=8, progress=False)
    freeze_(model, maps, FreezeConfig(tau=1.0))
    seen = []
    attn = model.blocks[0].attn
    # Observe what multiplies V: hook the dropout that follows the frozen map.
    attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert torch.allclose(seen[0][1], maps.mean[0])


def test_swin_report_counts_window_masked_entries():
    model = make(TINY_SWIN)
    with torch.no_grad():  # peaky attention, so unmasked entries vary across images
        for layer in eamvit.instrument(model):
            layer.qkv.weight.mul_(6)
    maps = eamvit.compute_entropy_maps(model, _data(16), bits=8, progress=False)
    rep = freeze_(model, maps, FreezeConfig(tau=0.3, scope="global"))
    wmasks = [m.unsqueeze(1).expand_as(e) if m is not None else torch.zeros_like(e, dtype=torch.bool)
              for m, e in zip(maps.masked, maps.entropy)]
    masked_total = sum(int(w.sum()) for w in wmasks)
    assert rep.window_masked_total == masked_total > 0
    frozen = freeze_masks(maps.entropy, 0.3, "global")
    assert rep.frozen_window_masked == sum(int((f & w).sum()) for f, w in zip(frozen, wmasks))
    # Masked entries have zero entropy, and they are fewer than 30 %: all of them are frozen first.
    assert masked_total / rep.total < 0.3
    assert rep.frozen_window_masked == masked_total


@pytest.mark.parametrize("tau", [-0.1, 1.5, float("nan")])
def test_tau_out_of_range(tau):
    with pytest.raises(EamError, match=r"\[0, 1\]"):
        FreezeConfig(tau=tau)


def test_bad_scope():
    with pytest.raises(EamError, match="scope"):
        freeze_masks(_ent(), 0.1, "row")
