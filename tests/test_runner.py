"""The one sweep runner, the throughput timer and the model-size rule."""
import statistics
import time
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from eamvit.errors import EamError
from eamvit.experiments.freeze_sweep import freeze_sweep
from eamvit.experiments.runner import Applied, EvalData, Point, Timing, measure_throughput, run_sweep
from eamvit.experiments.size import model_size
from eamvit.methods.calibrate import compute_entropy_maps
from eamvit.methods.evaluate import evaluate
from eamvit.methods.freeze import FreezeConfig, freeze_, unfreeze_
from eamvit.modules.quantizers import UniformQuantizer

from conftest import TINY_VIT, make


@contextmanager
def unchanged(model: nn.Module, seed: int):
    """The state of a baseline point: the model as it is."""
    yield Applied()


class Images(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_seeds_are_averaged_by_hand():
    top1 = {0: 90.0, 1: 80.0, 2: 75.0}
    top5 = {0: 100.0, 1: 100.0, 2: 94.0}

    @contextmanager
    def state(model, seed):
        model.seed = seed
        yield Applied({"measured": seed})

    def fake_eval(model, dataset, indices, **kw):
        s = model.seed
        return {"top1": top1[s], "top1_err": 100 - top1[s], "top5": top5[s], "top5_err": 100 - top5[s],
                "num_images": 10, "skipped_images": 0}

    model = nn.Linear(2, 2)
    rows = run_sweep(model, EvalData(None), [Point({"tau": 0.5}, state, seeds=(0, 1, 2)),
                                             Point({"tau": 0.0}, state, seeds=(1,))],
                     evaluate_fn=fake_eval, progress=False)
    r = rows[0]
    # mean (90 + 80 + 75) / 3 = 81.667; population std sqrt(((8.333)^2 + (1.667)^2 + (6.667)^2) / 3) = 6.236
    assert r["top1"] == 81.667 and r["top1_std"] == 6.236 and r["top1_err"] == 18.333
    assert r["top5"] == 98.0 and r["top5_std"] == 2.828 and r["seeds"] == 3
    assert r["tau"] == 0.5 and r["measured"] == 2  # the last seed's measured fields
    assert r["param_count"] == 0.0 and r["model"] == "Linear"
    assert rows[1]["top1"] == 80.0 and rows[1]["top1_std"] == 0.0 and rows[1]["seeds"] == 1


def _tiny_with_maps():
    model = make(TINY_VIT)
    maps = compute_entropy_maps(model, Images(8, seed=0), bits=4, batch_size=8, progress=False)
    return model, maps


def test_freeze_sweep_equals_a_direct_loop_and_restores_the_model():
    model, maps = _tiny_with_maps()
    test = Images(12, seed=1)
    x = test.x[:4]
    with torch.no_grad():
        reference = model(x)
    rows = freeze_sweep(model, maps, EvalData(test, batch_size=5), (0.0, 0.6), seeds=(0, 1, 2), progress=False)
    with torch.no_grad():
        assert torch.equal(model(x), reference)  # unfrozen after the sweep
    # The same numbers by hand: freeze, evaluate, average over seeds, unfreeze.
    for r in rows:
        seeds = (0, 1, 2) if r["selection"] == "random" and r["tau"] > 0 else (0,)
        top1s = []
        for s in seeds:
            freeze_(model, maps, FreezeConfig(tau=r["tau"], selection=r["selection"], seed=s))
            top1s.append(evaluate(model, test, progress=False)["top1"])
            unfreeze_(model)
        assert r["top1"] == pytest.approx(statistics.fmean(top1s), abs=1e-3)
        assert r["seeds"] == len(seeds)
        assert r["frozen_fraction"] == pytest.approx(r["tau"], abs=0.02)


def test_state_applied_during_evaluation_and_undone_between_points_even_on_error():
    model, maps = _tiny_with_maps()
    x = Images(4, seed=2).x
    with torch.no_grad():
        reference = model(x)
    seen = []

    @contextmanager
    def frozen(m, seed):
        freeze_(m, maps, FreezeConfig(tau=0.7))
        try:
            yield None
        finally:
            unfreeze_(m)

    def probe(m, *a, **kw):
        with torch.no_grad():
            seen.append(torch.equal(m(x), reference))
        return {"top1": 1.0, "top1_err": 99.0, "top5": 1.0, "top5_err": 99.0, "num_images": 4}

    run_sweep(model, EvalData(None), [Point({}, frozen), Point({}, unchanged), Point({}, frozen)],
              evaluate_fn=probe, progress=False)
    assert seen == [False, True, False]

    def failing(m, *a, **kw):
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError):
        run_sweep(model, EvalData(None), [Point({}, frozen)], evaluate_fn=failing, progress=False)
    with torch.no_grad():
        assert torch.equal(model(x), reference)


def test_a_point_can_evaluate_another_model():
    base = nn.Linear(2, 3)
    other = nn.Linear(4, 5)

    @contextmanager
    def swap(m, seed):
        yield Applied({"which": "other"}, model=other)

    def count(m, *a, **kw):
        return {"top1": float(m.out_features), "top1_err": 0.0, "top5": 0.0, "top5_err": 0.0, "num_images": 1}

    row = run_sweep(base, EvalData(None), [Point({"p": 1}, swap)], evaluate_fn=count, progress=False)[0]
    assert row["top1"] == 5.0 and row["param_count"] == round(25 / 1e6, 3) and row["which"] == "other"
    with pytest.raises(EamError):
        run_sweep(base, EvalData(None), [Point({}, swap, seeds=())], evaluate_fn=count, progress=False)


class Sleeper(nn.Module):
    """A model whose forward takes a known time."""

    def __init__(self, seconds):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def test_throughput_median_and_spread():
    t = measure_throughput(Sleeper(0.02), Timing(batch_size=8, warmup=1, reps=5), input_size=(1, 2, 2))
    assert t.reps == 5 and t.p25 <= t.median <= t.p75
    assert 0.5 * 400 < t.median <= 400 * 1.02  # 8 images / 0.02 s, sleep never returns early
    with pytest.raises(EamError):
        Timing(reps=2)


def test_speedup_is_the_ratio_of_alternately_timed_forwards():
    from eamvit.experiments.runner import measure_speedup

    fast, slow = Sleeper(0.01), Sleeper(0.03)
    fast.pretrained_cfg = {"input_size": (1, 2, 2)}
    s = measure_speedup(fast, slow, Timing(batch_size=4, warmup=1, reps=6))
    assert s["speedup_p25"] <= s["speedup"] <= s["speedup_p75"]
    # 0.03 s / 0.01 s; each sleep lasts at least as long as asked, and a loaded machine oversleeps both
    assert 2.0 < s["speedup"] < 4.5
    assert 0.5 * 400 < s["images_per_s"] <= 400 * 1.02  # 4 images / 0.01 s


def test_runner_times_each_point_once():
    calls = []

    def fake_eval(m, *a, **kw):
        return {"top1": 1.0, "top1_err": 99.0, "top5": 1.0, "top5_err": 99.0, "num_images": 1}

    @contextmanager
    def state(m, seed):
        calls.append(seed)
        yield None

    model = Sleeper(0.001)
    model.pretrained_cfg = {"input_size": (1, 2, 2)}
    rows = run_sweep(model, EvalData(None), [Point({}, state, seeds=(0, 1))], evaluate_fn=fake_eval,
                     timing=Timing(batch_size=2, warmup=0, reps=3), progress=False)
    r = rows[0]
    assert calls == [0, 1] and r["images_per_s_p25"] <= r["images_per_s"] <= r["images_per_s_p75"]
    assert r["images_per_s"] < 2 / 0.001


def test_model_size_by_hand():
    lin = nn.Linear(10, 4)  # 40 weights + 4 biases
    lin.weight_quantizer = UniformQuantizer(3, "channel", channel_dim=0)
    lin.weight_quantizer.calibrate(lin.weight)
    lin.input_quantizer = UniformQuantizer(8)  # tensor-wise activation quantizer: one Δ, one zero point
    lin.input_quantizer.calibrate(torch.randn(5, 10))
    model = nn.Sequential(lin, nn.LayerNorm(4))  # LayerNorm: 8 fp32 parameters
    s = model_size(model)
    assert s.weight_bytes == 15  # 40 × 3 bits = 120 bits
    assert s.fp32_param_bytes == 4 * (4 + 8)
    assert s.quant_param_bytes == 4 * (4 + 4) + 4 * 2  # per-channel Δ and zero point, then the activation's
    assert s.model_bytes == 15 + 48 + 40 and s.mb == pytest.approx(103e-6)
    lin.weight_quantizer.enabled = False
    lin.input_quantizer.enabled = False
    assert model_size(model).model_bytes == 4 * sum(p.numel() for p in model.parameters())
