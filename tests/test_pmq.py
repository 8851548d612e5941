"""PMQ: Fisher sensitivity, Pareto frontier, Adaptive Attention Shrink, configs, end to end."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import eamvit
from eamvit.errors import EamError
from eamvit.methods import pmq
from eamvit.methods.quantize import quantize_
from eamvit.modules.quant_layers import PatchBitsQuantizer
from eamvit.ops.pareto import choose, pareto_frontier
from eamvit.methods.state import state_of

TINY = ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=2, num_heads=2))


def _two_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _brute_force_fisher(model, x, y):
    """1/(2N) Σ_n Σ_i (w_i ∂L_n/∂w_i)² with central finite differences of the per-sample loss."""
    def loss(n):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(x[n:n + 1]), y[n:n + 1]))

    scores = {}
    for name, lin in (("0", model[0]), ("2", model[2])):
        total = 0.0
        w = lin.weight.data
        for n in range(x.shape[0]):
            for idx in itertools.product(*map(range, w.shape)):
                old = float(w[idx])
                h = 1e-6
                w[idx] = old + h
                up = loss(n)
                w[idx] = old - h
                down = loss(n)
                w[idx] = old
                total += (old * (up - down) / (2 * h)) ** 2
        scores[name] = total / (2 * x.shape[0])
    return scores


@pytest.mark.parametrize("use_labels", [True, False])
def test_fisher_matches_brute_force(use_labels):
    model = _two_layer()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    if not use_labels:
        with torch.no_grad():
            y_ref = model(x).argmax(-1)
    got = pmq.fisher_sensitivity(model, x, y if use_labels else None, [("0", model[0]), ("2", model[2])])
    want = _brute_force_fisher(model, x, y if use_labels else y_ref)
    for k in want:
        assert math.isclose(got[k], want[k], rel_tol=1e-5), (k, got[k], want[k])


def _dominated(p, q):
    return q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])


def test_pareto_frontier_matches_exhaustive_search():
    g = torch.Generator().manual_seed(3)
    options = [[(int(n * b), float(torch.rand(1, generator=g)) * 10 / b) for b in (2, 4, 8)] for n in (3, 5, 7)]
    configs = []
    for pick in itertools.product(range(3), repeat=3):
        size = sum(options[l][c][0] for l, c in enumerate(pick))
        cost = sum(options[l][c][1] for l, c in enumerate(pick))
        configs.append((size, cost, pick))
    front = [c for c in configs if not any(_dominated(c, o) for o in configs)]
    got = pareto_frontier(options)
    assert sorted((s, round(c, 12)) for s, c, _ in got) == sorted((s, round(c, 12)) for s, c, _ in front)
    for s, c, pick in got:  # the choices rebuild their own size and cost
        assert s == sum(options[l][i][0] for l, i in enumerate(pick))
        assert math.isclose(c, sum(options[l][i][1] for l, i in enumerate(pick)))
    for budget in (30, 45, 60, 90, 120):
        best = min((c for c in configs if c[0] <= budget), key=lambda c: c[1])
        assert math.isclose(choose(got, budget)[1], best[1])
    with pytest.raises(EamError, match="budget"):
        choose(got, 29)  # the smallest configuration is 2·(3+5+7) = 30


def test_aas_on_a_hand_made_attention_map():
    # Every query of head 0 attends [0.6, 0.2, 0.2, 0, 0], of head 1 [0.4, 0.2, 0.2, 0.2, 0]:
    # received attention (eq. 12) = [0.5, 0.2, 0.2, 0.1, 0]; μ = 0.2, σ = √0.028 ≈ 0.167.
    rows = torch.tensor([[0.6, 0.2, 0.2, 0.0, 0.0], [0.4, 0.2, 0.2, 0.2, 0.0]])
    attn = rows[:, None, :].expand(2, 5, 5)[None].repeat(3, 1, 1, 1)  # 3 images, 2 heads
    imp = pmq.patch_importance(attn)
    assert torch.allclose(imp, torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0]), atol=1e-6)
    assert pmq.aas_bits(imp, 4).tolist() == [5, 4, 4, 4, 3]
    assert pmq.aas_bits(imp, 8).tolist() == [8, 8, 8, 8, 7]  # clamped to 2..8
    assert pmq.aas_bits(imp, 4, step=2).tolist() == [6, 4, 4, 4, 2]


def test_patch_bits_quantizer_uses_each_tokens_bits():
    x = torch.randn(2, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    q = PatchBitsQuantizer(torch.tensor([8, 2, 8, 2]), token_dim=-2)
    out = q(x)
    err = (out - x).abs().mean(dim=(0, 1, 3))
    assert float(err[[0, 2]].max()) < float(err[[1, 3]].min())
    # Same result as a per-tensor 2-bit quantizer calibrated on tokens 1 and 3 alone.
    ref = pmq.UniformQuantizer(2)(x[:, :, [1, 3]])
    assert torch.equal(out[:, :, [1, 3]], ref)


@pytest.mark.parametrize("text, want", [("8/8/4(MP)", (8, 8, 4, True)), ("6/6/6(MP)", (6, 6, 6, True)),
                                        ("4/8/8(mp)", (4, 8, 8, True)), ("4/4", (4, 4, 4, False))])
def test_parse_bits_config(text, want):
    d = pmq.parse_bits_config(text)
    assert (d["w_bits"], d["a_bits"], d["p_bits"], d["mixed"]) == want
    assert pmq.PMQConfig.from_string(text).w_bits == want[0]


@pytest.mark.parametrize("bad", ["9/8", "8/8/1(MP)", "8-8", "", "8/8/4(XX)"])
def test_parse_bits_config_rejects(bad):
    with pytest.raises(EamError):
        pmq.parse_bits_config(bad)


def test_end_to_end_and_impossible_budget(tmp_path):
    torch.manual_seed(0)
    images = torch.randn(8, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    model = eamvit.create_model(TINY[0], model_kwargs=TINY[1])
    cfg = pmq.PMQConfig.from_string("4/8/4(MP)", calib_size=8)
    quantize_(model, cfg, (images, labels))
    rep = state_of(model).reports["quant"]
    assert rep["chosen_size_mb"] <= rep["budget_mb"] + 1e-12
    assert {r["bits"] for r in rep["components"]} <= set(range(2, 9))
    assert len(rep["patch_bits"]) == 2 and all(r["patches"] == 17 for r in rep["patch_bits"])
    assert model(images).shape == (8, 3)
    with pytest.raises(EamError, match="budget"):
        quantize_(eamvit.create_model(TINY[0], model_kwargs=TINY[1]),
                      pmq.PMQConfig(size_budget_mb=1e-6, calib_size=8), images)
    with pytest.raises(EamError):
        pmq.PMQConfig(micro_batch=0)


def test_hessian_variant_runs():
    model = _two_layer()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    h = pmq.hessian_sensitivity(model, x, torch.tensor([0, 1, 2, 0, 1, 2]), [("0", model[0]), ("2", model[2])],
                                samples=4)
    assert set(h) == {"0", "2"} and all(math.isfinite(v) for v in h.values())


@pytest.mark.parametrize("argv, msg", [
    (["--quant", "pmq", "--pmq-budget-mb", "0.00001"], "size budget"),
    (["--quant", "pmq", "--pmq-config", "9/8/4(MP)"], "W bits"),
    (["--quant", "adfq", "--adfq-iterations", "0"], "iterations"),
    (["--quant", "adfq", "--adfq-alpha-fc1", "0"], "alpha_fc1"),
])
def test_cli_bad_input_one_line_nonzero_exit(argv, msg, capsys):
    from eamvit.cli.main import main

    rc = main(["eval", "--data", "digits", "--num-samples", "8", "--device", "cpu"] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("eamvit: error:") and msg in err[-1]
