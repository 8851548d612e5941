"""ADFQ-ViT: outlier-aware and shift-log quantizers, AdaRound pieces, module-wise reconstruction."""
from __future__ import annotations

import math

import pytest
import torch

import eamvit
from eamvit.experiments.digits import DEMO_KWARGS, DEMO_MODEL, DigitsDataset
from eamvit.errors import EamError
from eamvit.methods import adfq
from eamvit.methods.quantize import quantize_
from eamvit.modules import adfq as adfq_modules
from eamvit.methods.state import state_of


def test_outlier_parts_sum_back_and_dense_error_bounded():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g)
    x[0, 1, 2], x[1, 3, 0], x[2, 4, 7] = 9.0, -7.5, 5.0  # 5.0 is not > 5: not an outlier
    q = adfq_modules.OutlierAwareQuantizer(4, alpha=5.0, search="minmax")
    dense, sparse = q.split(x)
    assert torch.equal(dense + sparse, x)
    assert int((sparse != 0).sum()) == 2 and sparse[0, 1, 2] == 9.0 and sparse[1, 3, 0] == -7.5
    out = q(x)
    mask = x.abs() > 5
    assert torch.equal(out[mask], x[mask])  # outliers exactly full precision
    # min/max per token over (batch, channels) of the dense part: nothing clipped, error <= Δ/2.
    d = dense.permute(1, 0, 2).reshape(5, -1)
    delta = (d.amax(1) - d.amin(1)) / 15
    err = (out - x).abs().permute(1, 0, 2).reshape(5, -1)
    assert bool((err <= delta[:, None] / 2 + 1e-6).all())
    assert q.outliers == 2 and q.seen == x.numel()
    assert math.isclose(q.outlier_ratio, 2 / x.numel())


def test_outlier_upper_mode_is_one_sided():
    q = adfq_modules.OutlierAwareQuantizer(4, alpha=5.0, mode="upper")
    x = torch.tensor([[[-6.0, 5.0, 4.0, 0.0]]])
    assert q.outlier_mask(x).tolist() == [[[False, True, False, False]]]


@pytest.mark.parametrize("kind, expected", [
    # shifted x' = [0, 0.17, 0.67, 2.0], Δ = 2: codes round(-log2(x'/2)) = [inf, 4, 2, 0]
    ("log2", [-0.17, -0.17 + 2 * 2 ** -4, -0.17 + 2 * 2 ** -2, 1.83]),
    # log√2 codes round(-2·log2(x'/2)) = [inf, 7, 3, 0]
    ("logsqrt2", [-0.17, -0.17 + 2 * 2 ** -3.5, -0.17 + 2 * 2 ** -1.5, 1.83]),
])
def test_shift_log_hand_computation(kind, expected):
    q = adfq_modules.ShiftLogQuantizer(3, kind=kind, eps=0.0)
    q.log.set_params(2.0)
    x = torch.tensor([[-0.17, 0.0, 0.5, 1.83]])
    assert torch.allclose(q(x), torch.tensor([expected]), atol=1e-6)
    # The minimum is recomputed at every forward: a shifted input gives a shifted output.
    assert torch.allclose(q(x + 1.0), torch.tensor([expected]) + 1.0, atol=1e-6)


def test_rectified_sigmoid_round_loss_and_beta_annealing():
    v = torch.tensor([0.0, math.log(1 / 3), 50.0, -50.0])
    assert torch.allclose(adfq_modules.rectified_sigmoid(v), torch.tensor([0.5, 0.25 * 1.2 - 0.1, 1.0, 0.0]))
    h = torch.tensor([0.1, 0.3, 0.9])
    assert torch.allclose(adfq_modules.rectified_sigmoid(adfq_modules.inverse_rectified_sigmoid(h)), h, atol=1e-6)
    # 1 - |2h-1|^β: h = 0.5 costs 1, h ∈ {0, 1} costs 0; h = 0.2: 1 - 0.6^2.
    assert math.isclose(float(adfq_modules.round_loss(torch.tensor([0.0, 50.0, -50.0]), 2.0)), 1.0, abs_tol=1e-6)
    assert math.isclose(float(adfq_modules.round_loss(torch.tensor([math.log(1 / 3)]), 2.0)), 1 - 0.6 ** 2, rel_tol=1e-5)
    b = lambda s, w=0.0: adfq_modules.beta_schedule(s, 100, 20, 2, w)  # noqa: E731
    assert math.isclose(b(0), 20 - 18 * 0.01) and math.isclose(b(49), 11) and math.isclose(b(99), 2)
    assert b(10, 0.2) == 20 and math.isclose(b(19, 0.2), 20) and math.isclose(b(59, 0.2), 11)


def test_adaround_hard_rounding_follows_v():
    q = adfq_modules.AdaRoundQuantizer(4)
    w = torch.tensor([[0.26, 0.74, -0.26]])
    q.calibrate(w)
    q.delta, q.zero_point = torch.tensor([0.5]), torch.tensor([8.0])
    # W/Δ = [0.52, 1.48, -0.52], floor [0, 1, -1]; V ≥ 0 rounds up.
    q.alpha = torch.tensor([[1.0, -1.0, -1.0]])
    q.mode = "hard"
    assert torch.allclose(q(w), torch.tensor([[0.5, 0.5, -0.5]]))
    q.alpha = torch.tensor([[-1.0, 1.0, 1.0]])
    assert torch.allclose(q(w), torch.tensor([[0.0, 1.0, 0.0]]))
    q.mode = "nearest"
    assert torch.allclose(q(w), torch.tensor([[0.5, 0.5, -0.5]]))
    q.mode = "soft"  # floor + h(V): V = -1 on the first weight, h = σ(-1)·1.2 − 0.1
    h = torch.sigmoid(torch.tensor(-1.0)) * 1.2 - 0.1
    assert torch.allclose(q(w)[0, 0], h * 0.5)


def test_adaround_init_matches_fraction():
    q = adfq_modules.AdaRoundQuantizer(4)
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    q.calibrate(w)
    d = q.delta.reshape(-1, 1)
    assert torch.allclose(q.soft_targets(), w / d - torch.floor(w / d), atol=1e-5)


@pytest.mark.parametrize("kw", [dict(alpha_qkv=0.0), dict(alpha_fc1=-1.0), dict(iterations=0),
                                dict(batch_size=0), dict(w_bits=9), dict(shift_log="log3"),
                                dict(beta_start=1.0, beta_end=2.0)])
def test_bad_config(kw):
    with pytest.raises(EamError):
        adfq.ADFQConfig(**kw)
    with pytest.raises(EamError):
        adfq_modules.OutlierAwareQuantizer(4, alpha=0.0)


def _digits_model():
    """The digits ViT's architecture (DEMO_KWARGS) with one block, seeded random weights: keeps the test fast."""
    torch.manual_seed(0)
    return eamvit.create_model(DEMO_MODEL, model_kwargs={**DEMO_KWARGS, "depth": 1})


@pytest.fixture(scope="module")
def digits_images():
    ds = DigitsDataset("train", img_size=16)
    return torch.stack([ds[i][0] for i in range(32)])


def _attn_out(model, images):
    got = []
    h = model.blocks[0].attn.register_forward_hook(lambda m, a, o: got.append(o.detach()))
    with torch.no_grad():
        model(images)
    h.remove()
    return got[0]


def test_reconstruction_lowers_module_mse(digits_images, tmp_path):
    fp = _digits_model()
    ref = _attn_out(fp, digits_images)
    base = dict(calib_size=32, init_size=32, iterations=300, batch_size=8, warmup=0.2)
    rtn = quantize_(_digits_model(), adfq.ADFQConfig(amo=False, **base), digits_images, progress=False)
    rec = quantize_(_digits_model(), adfq.ADFQConfig(**base), digits_images, progress=False,
                    checkpoint_dir=tmp_path)
    mse_rtn = float((_attn_out(rtn, digits_images) - ref).pow(2).mean())
    mse_rec = float((_attn_out(rec, digits_images) - ref).pow(2).mean())
    assert mse_rec < mse_rtn
    rows = state_of(rec).reports["quant"]["units"]
    assert [r["kind"] for r in rows] == ["attn", "mlp"]
    assert rows[0]["mse_after"] < rows[0]["mse_before"]
    # Resuming from the per-module checkpoints reproduces the model without training.
    again = quantize_(_digits_model(), adfq.ADFQConfig(**base), digits_images, progress=False,
                    checkpoint_dir=tmp_path)
    assert all(r["resumed"] for r in state_of(again).reports["quant"]["units"])
    with torch.no_grad():
        assert torch.equal(again(digits_images), rec(digits_images))
    with pytest.raises(EamError, match="other settings"):
        quantize_(_digits_model(), adfq.ADFQConfig(**{**base, "iterations": 3}), digits_images, progress=False,
                  checkpoint_dir=tmp_path)
    report = adfq.outlier_report(rec)
    assert [r["input_of"] for r in report] == ["qkv", "fc1"]
