"""Row and head freezing: the executed path against the simulated torch.where path, unit choice, errors."""
import pytest
import torch
from torch.utils.data import TensorDataset

import eamvit
from eamvit.errors import EamError
from eamvit.methods.freeze import FreezeConfig, freeze_, freeze_masks, unfreeze_
from eamvit.modules.attention import observe

from conftest import TINY_DISTILLED, TINY_SWIN, TINY_VIT, make


def _data(n=8):
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.zeros(n, dtype=torch.long))


@pytest.fixture(scope="module")
def calibrated():
    out = {}
    for spec in (TINY_VIT, TINY_DISTILLED, TINY_SWIN):
        model = make(spec).eval()
        with torch.no_grad():  # peaky attention, so that a frozen map differs from the live one
            for layer in eamvit.instrument(model):
                layer.qkv.weight.mul_(6)
        out[spec[0]] = (model, eamvit.compute_entropy_maps(model, _data(), bits=8, progress=False))
    return out


def _both(model, maps, cfg, x):
    """Outputs of the executed path and of the same mask simulated with torch.where."""
    rep = freeze_(model, maps, cfg)
    with torch.no_grad():
        executed = model(x)
    freeze_(model, maps, FreezeConfig(**{**cfg.__dict__, "execute": False}))
    with torch.no_grad():
        simulated = model(x)
    unfreeze_(model)
    return rep, executed, simulated


CASES = [(TINY_VIT, "head"), (TINY_VIT, "row"), (TINY_DISTILLED, "head"), (TINY_DISTILLED, "row"),
         (TINY_SWIN, "head")]


@pytest.mark.parametrize("spec,gran", CASES)
@pytest.mark.parametrize("tau,scope,bits", [(0.5, None, None), (0.3, "global", 4), (1.0, None, None)])
def test_executed_equals_simulated(calibrated, spec, gran, tau, scope, bits):
    model, maps = calibrated[spec[0]]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    cfg = FreezeConfig(tau=tau, scope=scope, granularity=gran, value_bits=bits)
    rep, executed, simulated = _both(model, maps, cfg, x)
    assert rep.executed and rep.frozen > 0
    assert (executed - simulated).abs().max().item() < 1e-5
    assert not torch.allclose(executed, ref, atol=1e-4)  # something really was frozen


@pytest.mark.parametrize("fused", [True, False])
def test_executed_rows_and_heads_with_either_kernel(calibrated, fused):
    model, maps = calibrated[TINY_VIT[0]]
    layers = eamvit.instrument(model)
    for l in layers:
        l.fused_attn = fused
    try:
        for gran in ("row", "head"):
            _, a, b = _both(model, maps, FreezeConfig(tau=0.5, granularity=gran), torch.randn(2, 3, 32, 32))
            assert (a - b).abs().max().item() < 1e-5
    finally:
        for l in layers:
            l.fused_attn = True


def test_tau_is_the_fraction_of_entries(calibrated):
    model, maps = calibrated[TINY_VIT[0]]  # 2 layers x 2 heads x 17 x 17
    rep = freeze_(model, maps, FreezeConfig(tau=0.5, granularity="head"))
    assert rep.units_per_layer == [1, 1] and rep.frozen_fraction == 0.5
    rep = freeze_(model, maps, FreezeConfig(tau=0.3, granularity="row"))
    assert rep.units_per_layer == [5, 5]  # round(0.3 * 17) rows of 17
    assert rep.frozen == 2 * 5 * 2 * 17
    unfreeze_(model)


def test_units_ranked_by_aggregate():
    e = torch.full((3, 4, 4), 2.0)
    e[0] = 1.5  # head 0: mean 1.5, max 1.5
    e[1, 0, 0] = 3.0
    e[1, 1:] = 0.0  # head 1: mean ≈ 0.69, but one entry is 3.0
    mean = freeze_masks([e], 1 / 3, granularity="head")[0]
    high = freeze_masks([e], 1 / 3, granularity="head", aggregate="max")[0]
    assert mean[1].all() and not mean[0].any() and not mean[2].any()
    assert high[0].all() and not high[1].any()
    rows = freeze_masks([e], 0.5, granularity="row")[0]  # two of four rows: 1, 2 or 3 (mean 1.5·..)
    per_row = e.transpose(0, 1).reshape(4, -1).mean(1)
    assert set(rows[0].all(-1).nonzero().flatten().tolist()) == set(per_row.argsort()[:2].tolist())


def test_global_scope_counts_entries_across_unequal_units():
    a, b = torch.zeros(2, 4, 4), torch.ones(1, 2, 2)  # heads of 16 and 4 entries
    masks = freeze_masks([a, b], 16 / 36, scope="global", granularity="head")
    assert int(masks[0].sum()) == 16 and int(masks[1].sum()) == 0  # one 16-entry head is exactly τ


def test_random_units_same_count_seeded():
    e = [torch.rand(4, 6, 6)]
    a = freeze_masks(e, 0.5, selection="random", seed=1, granularity="head")[0]
    b = freeze_masks(e, 0.5, selection="random", seed=1, granularity="head")[0]
    assert torch.equal(a, b) and int(a.flatten(1).all(1).sum()) == 2


def test_row_granularity_refused_on_swin(calibrated):
    model, maps = calibrated[TINY_SWIN[0]]
    with pytest.raises(EamError, match="row granularity does not apply to Swin") as err:
        freeze_(model, maps, FreezeConfig(tau=0.5, granularity="row"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kw,match", [(dict(granularity="column"), "granularity"),
                                      (dict(granularity="head", scope="head"), "scope 'head' does not apply"),
                                      (dict(aggregate="sum"), "aggregate")])
def test_bad_options(kw, match):
    with pytest.raises(EamError, match=match):
        FreezeConfig(tau=0.5, **kw)


def test_observer_sees_full_map_and_output_unchanged(calibrated):
    model, maps = calibrated[TINY_VIT[0]]
    x = torch.randn(2, 3, 32, 32)
    freeze_(model, maps, FreezeConfig(tau=0.5, granularity="head"))
    seen = []
    with torch.no_grad():
        executed = model(x)
        with observe(model, {0: lambda a, m: seen.append(a)}):
            observed = model(x)
    frozen_head = model.blocks[0].attn.eam_plan_frozen.item()
    unfreeze_(model)
    # Observers see the live map before freezing, so the frozen head's scores were computed for them.
    assert seen[0].shape == (2, 2, 17, 17)
    assert torch.allclose(seen[0][:, frozen_head].sum(-1), torch.ones(2, 17))
    assert not torch.allclose(seen[0][:, frozen_head], maps.mean[0][frozen_head].expand(2, -1, -1))
    assert (executed - observed).abs().max().item() < 1e-5


def test_gradients_match_simulation_and_skip_frozen_queries(calibrated):
    model, maps = calibrated[TINY_VIT[0]]
    x = torch.randn(2, 3, 32, 32)
    grads, attn = [], model.blocks[0].attn
    for execute in (True, False):
        freeze_(model, maps, FreezeConfig(tau=0.5, granularity="head", execute=execute))
        if execute:
            h = attn.eam_plan_frozen.item()
        model.zero_grad()
        model(x).sum().backward()
        grads.append(attn.qkv.weight.grad.clone())
    unfreeze_(model)
    model.zero_grad()
    assert (grads[0] - grads[1]).abs().max().item() < 1e-5
    d = attn.head_dim
    assert grads[0][h * d:(h + 1) * d].abs().max() == 0  # a frozen head's query weights get no gradient


def test_nothing_frozen_keeps_timm_forward(calibrated):
    model, maps = calibrated[TINY_VIT[0]]
    freeze_(model, maps, FreezeConfig(tau=0.0, granularity="head"))
    assert not any(l.eam_active for l in eamvit.instrument(model))


@pytest.mark.parametrize("gran", ["entry", "head", "row"])
def test_save_and_load_frozen_gives_identical_logits(calibrated, tmp_path, gran):
    from eamvit.methods.freeze import load_frozen, save_frozen

    model, maps = calibrated[TINY_VIT[0]]
    x = torch.randn(2, 3, 32, 32)
    cfg = FreezeConfig(tau=0.4, granularity=gran, value_bits=4)
    freeze_(model, maps, cfg)
    with torch.no_grad():
        before = model(x)
    save_frozen(model, tmp_path / "frozen.safetensors", cfg)
    fresh = make(TINY_VIT).eval()
    fresh.load_state_dict(model.state_dict())
    unfreeze_(model)
    meta = load_frozen(fresh, tmp_path / "frozen.safetensors")
    with torch.no_grad():
        after = fresh(x)
    assert torch.equal(before, after) and meta["config"]["granularity"] == gran
    assert fresh.blocks[0].attn.eam_executes_plan == (gran != "entry")


def test_load_frozen_refuses_another_model(calibrated, tmp_path):
    from eamvit.methods.freeze import load_frozen, save_frozen

    model, maps = calibrated[TINY_VIT[0]]
    freeze_(model, maps, FreezeConfig(tau=0.4))
    save_frozen(model, tmp_path / "f.safetensors")
    unfreeze_(model)
    with pytest.raises(EamError, match="layers but the model has"):
        load_frozen(make(TINY_SWIN), tmp_path / "f.safetensors")
    with pytest.raises(EamError, match="not an eamvit frozen attention file"):
        maps.save(tmp_path / "maps.safetensors")
        load_frozen(model, tmp_path / "maps.safetensors")


def test_entry_simulation_same_numbers_with_and_without_autograd(calibrated):
    # Without autograd the simulated path overwrites the map in place; it must not change a number.
    model, maps = calibrated[TINY_VIT[0]]
    x = torch.randn(2, 3, 32, 32)
    freeze_(model, maps, FreezeConfig(tau=0.5))
    with torch.no_grad():
        fast = model(x)
    slow = model(x).detach()
    unfreeze_(model)
    assert torch.equal(fast, slow)


def test_plan_refuses_a_mask_that_is_not_whole_units():
    from eamvit.modules.attention import set_frozen

    layer = eamvit.instrument(make(TINY_VIT))[0]
    mask = torch.zeros(2, 17, 17, dtype=torch.bool)
    mask[0, :, :-1] = True  # head 0 all but one column
    with pytest.raises(EamError, match="does not cover whole heads"):
        set_frozen(layer, mask, torch.zeros(2, 17, 17), "head")
    swin = eamvit.instrument(make(TINY_SWIN))[-1]
    with pytest.raises(EamError, match="row granularity does not apply to Swin"):
        set_frozen(swin, torch.ones(1, 2, 16, 16, dtype=torch.bool), torch.zeros(1, 2, 16, 16), "row")


def test_executed_heads_back_in_timm_order_under_a_scale_norm():
    # With a norm between the heads and the projection, the kept and frozen head groups must be put back
    # in timm's head order before it; a wrong order would still run, so compare with the simulation.
    spec = (TINY_VIT[0], {**TINY_VIT[1], "scale_attn_norm": True, "num_heads": 4})
    model = make(spec).eval()
    with torch.no_grad():
        for layer in eamvit.instrument(model):
            layer.qkv.weight.mul_(6)
    maps = eamvit.compute_entropy_maps(model, _data(), bits=8, progress=False)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rep, executed, simulated = _both(model, maps, FreezeConfig(tau=0.5, granularity="head"), x)
    assert rep.executed and rep.frozen > 0
    assert not isinstance(model.blocks[0].attn.norm, torch.nn.Identity)
    assert (executed - simulated).abs().max().item() < 1e-5
