"""The cost model against torch.utils.flop_counter (explicit attention) and against hand computations."""
import pytest
import torch
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import eamvit
from eamvit.methods.cost import cost_account, count_gflops
from eamvit.methods.freeze import FreezeConfig, freeze_, unfreeze_
from eamvit.methods.prune import PruneConfig, prune_
from eamvit.modules.attention import set_frozen
from eamvit.ops.cost import realised_fraction

from conftest import TINY_DISTILLED, TINY_SWIN, TINY_VIT, make


def counted_macs(model, size=(3, 32, 32)):
    """MACs torch's own counter sees, with every attention on the explicit (non-fused) path."""
    layers = eamvit.instrument(model)
    for l in layers:
        l.fused_attn = False
    try:
        with FlopCounterMode(display=False) as c, torch.no_grad():
            model(torch.zeros(1, *size))
    finally:
        for l in layers:
            l.fused_attn = True
    return c.get_total_flops() // 2


@pytest.mark.parametrize("spec", [TINY_VIT, TINY_DISTILLED, TINY_SWIN])
def test_matches_torch_flop_counter(spec):
    model = make(spec)
    assert cost_account(model).total("executed") == counted_macs(model)
    assert count_gflops(model, macs=False) == pytest.approx(2 * count_gflops(model))


def test_pruned_model_matches_counter():
    model = make(TINY_VIT)
    full = cost_account(model)
    prune_(model, PruneConfig(method="shannon", keep_rate=0.5, blocks=[0]))
    acc = cost_account(model)
    assert acc.total("executed") == counted_macs(model)
    assert acc.total("full") == full.total("executed")  # "full" is the unpruned model
    assert acc.predicted_speedup > 1


def test_one_block_by_hand():
    model = make(TINY_VIT)  # 32 px / 8 = 16 patches + CLS = 17 tokens, C = 32, 2 heads of 16, MLP 128
    N, C, H, d = 17, 32, 2, 16
    layers = {(r["layer"], r["part"]): r for r in cost_account(model).per_layer()}
    assert layers[(0, "attention")]["executed"] == 3 * N * C * C + 2 * H * N * N * d + N * C * C
    assert layers[(0, "attention")]["softmax_executed"] == H * N * N
    assert layers[(0, "mlp")]["executed"] == 2 * N * C * 4 * C
    assert layers[(None, "patch_embed")]["executed"] == 16 * C * 3 * 8 * 8
    assert layers[(None, "head")]["executed"] == C * 3


def _maps(model):
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.zeros(8, dtype=torch.long))
    return eamvit.compute_entropy_maps(model, data, bits=8, progress=False)


def test_frozen_heads_and_rows_are_really_skipped():
    model = make(TINY_VIT)
    maps = _maps(model)
    N, C, d = 17, 32, 16
    freeze_(model, maps, FreezeConfig(tau=0.5, granularity="head"))  # one of two heads per layer
    acc = cost_account(model)
    assert acc.total("full") - acc.total("executed") == 2 * (2 * N * C * d + N * N * d)
    assert acc.total("executed") == counted_macs(model)  # the executed forward really ran fewer MACs
    freeze_(model, maps, FreezeConfig(tau=0.3, granularity="row"))  # 5 of 17 rows per layer
    acc = cost_account(model)
    assert acc.total("full") - acc.total("executed") == 2 * (5 * C * 2 * d + 2 * 5 * N * d)
    assert acc.total("executed") == counted_macs(model)
    freeze_(model, maps, FreezeConfig(tau=0.3, granularity="row", execute=False))
    acc = cost_account(model)
    assert acc.total("executed") == acc.total("full") == counted_macs(model)
    assert acc.total("skippable") == 2 * (5 * C * 2 * d + 2 * 5 * N * d)
    assert {r.how for r in acc.rows if r.skippable} == {"executed path"}
    unfreeze_(model)


def test_entry_freezing_saves_nothing_and_counts_only_full_rows():
    model = make(TINY_VIT)
    layer = eamvit.instrument(model)[0]
    N, C, d = 17, 32, 16
    mask = torch.zeros(2, N, N, dtype=torch.bool)
    mask[0, 3] = True  # one whole row of head 0: q slice, 17 scores and a softmax could go
    mask[1, 4, :-1] = True  # all but one entry of a row: nothing can go (the denominator needs them all)
    set_frozen(layer, mask, torch.full((2, N, N), 1.0 / N))
    acc = cost_account(model)
    assert acc.total("executed") == acc.total("full")
    sk = {r.op: r.skippable for r in acc.rows if r.layer == 0 and r.part == "attention"}
    assert sk == {"q": C * d, "k": 0, "v": 0, "qk": N * d, "softmax": N, "av": 0, "proj": 0}
    assert {r.how for r in acc.rows if r.skippable} == {"sparse kernel"}


def test_reference_models():
    from eamvit.experiments.digits import load_demo_model

    assert round(count_gflops(load_demo_model()), 4) == 0.0150
    torch.manual_seed(0)
    assert round(count_gflops(eamvit.create_model("deit_small_patch16_224")), 2) == 4.60


def test_realised_fraction():
    assert realised_fraction(1.1, 1.1) == pytest.approx(1.0)
    assert realised_fraction(1.0, 1.25) == 0.0
    assert realised_fraction(1.05, 1.0) is None


def test_quantized_model_same_macs_with_bits():
    from eamvit.methods.quantize import quantize_
    from eamvit.methods.repq import RepQConfig

    model = make(TINY_VIT)
    full = cost_account(model).total("executed")
    quantize_(model, RepQConfig(w_bits=4, a_bits=4, calib_size=8), torch.randn(8, 3, 32, 32))
    acc = cost_account(model)
    assert acc.total("executed") == full
    bits = {(r.op, r.w_bits, r.a_bits) for r in acc.rows if r.layer == 0 and r.part == "attention"}
    assert ("q", 4, 4) in bits and ("qk", None, 4) in bits
