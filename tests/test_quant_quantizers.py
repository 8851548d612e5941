"""Quantizer arithmetic and range search against values worked out by hand."""
import math

import pytest
import torch

from eamvit.errors import EamError
from eamvit.ops.quant import log2_fake_quant, logsqrt2_fake_quant, uniform_fake_quant
from eamvit.modules.quantizers import (Log2Quantizer, LogSqrt2Quantizer, UniformQuantizer, row_quantiles,
                                     set_quant_enabled)


def test_uniform_rounds_half_to_even():
    # Δ = 1, zp = 8, 4 bits: x/Δ = .5, 1.5, 2.5, -.5, -1.5 round to 0, 2, 2, 0, -2 (half to even).
    q = UniformQuantizer(4)
    q.set_params(1.0, 8.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    assert q(x).tolist() == [0.0, 2.0, 2.0, 0.0, -2.0]


def test_uniform_clamps_to_the_code_range():
    # Δ = 0.5, zp = 2, 3 bits: codes 0..7 cover [-1, 2.5].
    out = uniform_fake_quant(torch.tensor([-5.0, -1.0, 0.74, 2.5, 9.0]), 0.5, 2.0, 3)
    assert out.tolist() == [-1.0, -1.0, 0.5, 2.5, 2.5]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_zero_through_log_quantizers_is_zero(bits):
    x = torch.tensor([0.0, 1.0])
    assert logsqrt2_fake_quant(x, 1.0, bits)[0].item() == 0.0
    assert log2_fake_quant(x, 1.0, bits)[0].item() == 0.0
    assert logsqrt2_fake_quant(x, 1.0, bits)[1].item() == 1.0


def test_logsqrt2_levels_by_hand():
    # Δ = 1, 4 bits: code q = round(-2 log2 x), value 2^(-q/2); q >= 16 gives 0; x > Δ gives Δ.
    x = torch.tensor([2.0, 1.0, 0.6, 0.5, 2.0 ** -7, 2.0 ** -7.5, 2.0 ** -8, 2.0 ** -20])
    want = [1.0, 1.0, 2 ** -0.5, 0.5, 2.0 ** -7, 2.0 ** -7.5, 0.0, 0.0]  # 0.6: -2 log2 .6 = 1.47 -> code 1
    assert torch.allclose(logsqrt2_fake_quant(x, 1.0, 4), torch.tensor(want), rtol=1e-6, atol=0)
    # log2 quantizer, 2 bits: codes 0..3 are 1, 1/2, 1/4, 1/8; 1/16 is code 4 -> 0.
    y = torch.tensor([1.0, 0.3, 0.125, 0.0625])
    assert log2_fake_quant(y, 1.0, 2).tolist() == [1.0, 0.25, 0.125, 0.0]


def test_quantiles_equal_torch_quantile():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 1001, generator=g)
    ps = [0.999, 0.9999, 0.99999, 1 - 0.999, 1 - 0.9999, 1 - 0.99999, 0.5]
    ours = row_quantiles(x, ps)
    for i, p in enumerate(ps):
        assert torch.equal(ours[i], torch.quantile(x, p, dim=1))


def _outlier_channels(g):
    x = torch.randn(8, 50, 384, generator=g)
    x[..., [5, 77]] *= 40  # a LayerNorm output's few huge channels
    return x.reshape(1, -1)


def _sampled_positions_largest(g):
    x = torch.rand(1, 200_000, generator=g)
    x[0, ::61] += 10  # every value the threshold's sample reads is above all others: too few left, whole row
    return x


@pytest.mark.parametrize("make", [lambda g: torch.randn(1, 300_000, generator=g),
                                  lambda g: torch.randn(1, 100_000, generator=g).round(), _outlier_channels,
                                  _sampled_positions_largest])
def test_one_large_row_quantiles_equal_torch_quantile(make):
    """A single row past the prefilter size (a per-tensor range): the tails are narrowed down first."""
    x = make(torch.Generator().manual_seed(1))
    ps = [0.999, 0.9999, 0.99999, 1 - 0.999, 1 - 0.9999, 1 - 0.99999, 0.97, 0.03]
    ours = row_quantiles(x, ps)
    for i, p in enumerate(ps):
        assert torch.equal(ours[i], torch.quantile(x, p, dim=1))


def test_percentile_candidates_by_hand():
    # x = 0..8 (n - 1 = 8): percentiles .75/.875/1 give ranges [2,6], [1,7], [0,8]. 2 bits (3 steps):
    # MSEs 116/81, 8/9, 44/81: the full range wins, Δ = 8/3, zp = round(0) = 0.
    x = torch.arange(9, dtype=torch.float32)
    q = UniformQuantizer(2, percentiles=(0.75, 0.875, 1.0))
    q(x)
    assert q.delta.item() == pytest.approx(8 / 3, rel=1e-7)
    assert q.zero_point.item() == 0.0
    # Only [2, 6]: Δ = 4/3, zp = round(-1.5) = -2 (half to even).
    q = UniformQuantizer(2, percentiles=(0.75,))
    q(x)
    assert q.delta.item() == pytest.approx(4 / 3, rel=1e-7)
    assert q.zero_point.item() == -2.0


def test_first_minimum_wins_ties():
    # x = [0,0,0,5,6], 2 bits. p = .75 -> [0, 5], Δ = 5/3: 6 clips to 5. p = 1 -> [0, 6], Δ = 2:
    # 5/2 = 2.5 rounds to 2 -> 4. Both have MSE 1/5: the first candidate in the search order wins.
    x = torch.tensor([0.0, 0.0, 0.0, 5.0, 6.0])
    a = UniformQuantizer(2, percentiles=(0.75, 1.0))
    a(x)
    b = UniformQuantizer(2, percentiles=(1.0, 0.75))
    b(x)
    assert a.delta.item() == pytest.approx(5 / 3, rel=1e-7)
    assert b.delta.item() == 2.0


def test_log_search_by_hand():
    # x = [0, .25, .5, 1, 2]: p = .75 -> Δ = 1 (2 clips to 1, MSE 1/5); p = 1 -> Δ = 2 (exact, MSE 0).
    x = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0])
    q = LogSqrt2Quantizer(4, percentiles=(0.75, 1.0))
    assert torch.equal(q(x), x)
    assert q.delta.item() == 2.0
    q = LogSqrt2Quantizer(4, percentiles=(0.75,))
    q(x)
    assert q.delta.item() == 1.0
    q = Log2Quantizer(4, search="minmax")
    q(x)
    assert q.delta.item() == 2.0


def _loop_reference(x2d: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT's per-channel search, one row at a time with torch.quantile."""
    deltas, zps = [], []
    for row in x2d:
        best = 1e10
        for p in (0.999, 0.9999, 0.99999):
            hi, lo = torch.quantile(row, p), torch.quantile(row, 1.0 - p)
            d = (hi - lo) / (2 ** bits - 1)
            z = (-lo / d).round()
            s = (uniform_fake_quant(row, d, z, bits) - row).abs().pow(2).mean()
            if s < best:
                best, bd, bz = s, d, z
        deltas.append(bd)
        zps.append(bz)
    return torch.stack(deltas), torch.stack(zps)


def test_per_channel_equals_the_reference_loop():
    g = torch.Generator().manual_seed(1)
    act = torch.randn(4, 50, 12, generator=g) * torch.linspace(0.1, 5, 12) + torch.linspace(-2, 2, 12)
    q = UniformQuantizer(4, "channel", channel_dim=-1)
    q(act)
    d, z = _loop_reference(act.reshape(-1, 12).t(), 4)
    assert q.delta.shape == (12,)
    assert torch.allclose(q.delta, d, rtol=1e-6) and torch.equal(q.zero_point, z)
    w = torch.randn(6, 40, generator=g)
    qw = UniformQuantizer(3, "channel", channel_dim=0)
    qw(w)
    d, z = _loop_reference(w, 3)
    assert torch.allclose(qw.delta, d, rtol=1e-6) and torch.equal(qw.zero_point, z)


def test_per_channel_beats_per_tensor_on_unequal_channels():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 30, 6, generator=g) * torch.tensor([0.01, 0.1, 1.0, 5.0, 20.0, 100.0])
    pc, pt = UniformQuantizer(4, "channel"), UniformQuantizer(4, "tensor")
    err_c = (pc(x) - x).square().mean((0, 1))
    err_t = (pt(x) - x).square().mean((0, 1))
    assert pc.delta.shape == (6,) and pt.delta.dim() == 0
    assert err_c.sum() <= err_t.sum()
    # The small channels collapse to a few codes under one shared range, not under their own.
    assert (err_c[:3] < err_t[:3] / 50).all()
    # Each channel's parameters equal a per-tensor quantizer calibrated on that channel alone.
    for c in range(6):
        one = UniformQuantizer(4, "tensor")
        one(x[..., c])
        assert torch.allclose(one.delta, pc.delta[c]) and torch.equal(one.zero_point, pc.zero_point[c])


def test_per_token_groups_and_nhwc_channels():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 8, generator=g)
    tok = UniformQuantizer(4, "token")
    tok(x)
    assert tok.delta.shape == (5,)
    one = UniformQuantizer(4)
    one(x[:, 3, :])
    assert torch.allclose(one.delta, tok.delta[3])
    nhwc = torch.randn(2, 3, 3, 7, generator=g)
    ch = UniformQuantizer(4, "channel")  # channel = last dim of a 4-D NHWC tensor
    ch(nhwc)
    assert ch.delta.shape == (7,)
    one = UniformQuantizer(4)
    one(nhwc[..., 2])
    assert torch.allclose(one.delta, ch.delta[2])


def test_lazy_init_enable_disable_reset():
    q = UniformQuantizer(4)
    assert not q.inited
    x = torch.linspace(-1, 1, 101)
    y = q(x)
    assert q.inited and not torch.equal(y, x)
    q.enabled = False
    assert torch.equal(q(x), x)
    q.enabled = True
    q.reset()
    assert not q.inited
    q(2 * x)
    assert q.delta.item() == pytest.approx(4 / 15, rel=5e-3)  # re-calibrated on the doubled range
    m = torch.nn.Sequential(UniformQuantizer(4), LogSqrt2Quantizer(4))
    set_quant_enabled(m, False)
    assert not any(q.enabled for q in m)


def test_constant_input_does_not_give_nan():
    q = UniformQuantizer(4, "channel", channel_dim=0)
    w = torch.zeros(3, 5)
    w[1] = 2.0
    assert torch.isfinite(q(w)).all()
    assert torch.allclose(q(w), w, atol=1e-6)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_bits_out_of_range(bits):
    with pytest.raises(EamError, match="2..8"):
        UniformQuantizer(bits)
    with pytest.raises(EamError, match="2..8"):
        LogSqrt2Quantizer(bits)


def test_bad_granularity_and_percentiles():
    with pytest.raises(EamError):
        UniformQuantizer(4, "row")
    with pytest.raises(EamError):
        UniformQuantizer(4, percentiles=(0.2,))
    with pytest.raises(EamError):
        UniformQuantizer(4, "token")(torch.ones(3, 4))


def test_grad_path_matches_no_grad_path():
    x = torch.randn(4, 10).requires_grad_()
    q = UniformQuantizer(4)
    with torch.no_grad():
        a = q(x)
    b = q(x)
    assert b.requires_grad and torch.equal(a, b.detach())
    assert math.isfinite(float(b.detach().sum()))


def test_batched_and_one_at_a_time_search_agree(monkeypatch):
    import eamvit.modules.quantizers as Q

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 40, 16, generator=g) * torch.linspace(0.5, 4, 16)
    att = torch.randn(2, 2, 9, 9, generator=g).softmax(-1)
    batched = [UniformQuantizer(4, "channel"), UniformQuantizer(3), LogSqrt2Quantizer(4)]
    for q, t in zip(batched, (x, x, att)):
        q(t)
    monkeypatch.setattr(Q, "BATCHED_SEARCH_LIMIT", 0)
    looped = [UniformQuantizer(4, "channel"), UniformQuantizer(3), LogSqrt2Quantizer(4)]
    for q, t in zip(looped, (x, x, att)):
        q(t)
    for a, b in zip(batched, looped):
        assert torch.equal(a.delta, b.delta)
    assert torch.equal(batched[0].zero_point, looped[0].zero_point)


def test_large_input_rank_rule_matches_installed_torch():
    """Above 2^24 elements the reference ranks with torch.quantile where the installed torch accepts such
    inputs and with numpy (double rank) where it refuses: the probe picks the rule the installed torch has."""
    import numpy as np

    import eamvit.modules.quantizers as Q

    n = (1 << 24) + 1001
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    ps = [0.99999, 1 - 0.99999]
    got = row_quantiles(x[None], ps)[:, 0]
    try:
        want = torch.quantile(x, torch.tensor(ps))
        accepted = True
    except RuntimeError:
        want = torch.tensor(np.percentile(x.numpy(), [p * 100 for p in ps]), dtype=torch.float32)
        accepted = False
    assert Q.torch_quantile_accepts_large() == accepted
    if accepted:
        assert torch.equal(got, want)
        # The two rules really differ here, so the probe matters: the double rank lands elsewhere.
        r = 0.99999 * (n - 1)
        lo = int(math.floor(r))
        a, b = (float(x.kthvalue(k + 1).values) for k in (lo, lo + 1))
        double_rule = a + (b - a) * (r - lo)
        assert float(double_rule) != float(want[0])
    else:
        assert torch.allclose(got, want, rtol=0, atol=1e-6)
