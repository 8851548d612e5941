"""Mean attention distance, head entropy and Rényi entropy histograms (the Rényi paper's Fig. 5 and 6):
against hand computations and plain loops over the unmodified timm model's attention."""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import eamvit
from eamvit.errors import EamError
from eamvit.methods.calibrate import EntropyMaps
from eamvit.ops.entropy import AttentionHistogram
from eamvit.ops.attention_stats import (AttentionStats, attention_distance, check_orders, grid_distances,
                                        patch_prefix)

from conftest import FailOnce, TINY_SWIN, TINY_VIT, make, run
from test_plots import assert_sane_png

ORDERS = (0.5, 1.0, 2.0, math.inf)
V03 = Path(__file__).parent / "fixtures" / "v0.3"


def _dataset(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.zeros(n, dtype=torch.long))


def test_grid_distances_by_hand():
    d = grid_distances((2, 3))  # row-major: patch 0 at (0, 0), 2 at (0, 2), 3 at (1, 0), 5 at (1, 2)
    assert d.shape == (6, 6)
    assert float(d[0, 5]) == pytest.approx(math.sqrt(5)) and float(d[2, 3]) == pytest.approx(math.sqrt(5))
    assert float(d[1, 4]) == 1.0 and float(d[0, 2]) == 2.0 and float(d[4, 4]) == 0.0
    assert torch.equal(d, d.T)


def test_attention_distance_by_hand():
    # One class token, a 1x3 grid: tokens (cls, p0, p1, p2).
    attn = torch.tensor([[0.25, 0.25, 0.25, 0.25],
                         [0.4, 0.3, 0.2, 0.1],    # p0: patch mass 0.6, 0.2·1 + 0.1·2 = 0.4
                         [0.25, 0.25, 0.25, 0.25],  # p1: 0.25·1 + 0.25·1 = 0.5 over mass 0.75
                         [0.0, 0.5, 0.0, 0.5]])   # p2: 0.5·2 = 1 over mass 1
    d = attention_distance(attn.view(1, 1, 4, 4), grid_distances((1, 3)), num_prefix=1)
    assert d.shape == (1, 1, 3)
    assert d.flatten().tolist() == pytest.approx([0.4 / 0.6, 0.5 / 0.75, 1.0])
    raw = attention_distance(attn.view(1, 1, 4, 4), grid_distances((1, 3)), num_prefix=1, renormalize=False)
    assert raw.flatten().tolist() == pytest.approx([0.4, 0.5, 1.0])
    with pytest.raises(EamError, match="patch grid"):
        attention_distance(attn.view(1, 1, 4, 4), grid_distances((2, 2)), num_prefix=1)


def test_patch_prefix_picks_the_layers_over_the_grid():
    assert patch_prefix((2, 17, 17), (4, 4), 1) == 1
    assert patch_prefix((2, 16, 16), (4, 4), 1) == 0  # CaiT's patch layers run without the class token
    assert patch_prefix((2, 1, 17), (4, 4), 1) is None  # class attention
    assert patch_prefix((4, 2, 16, 16), (4, 4), 0) is None  # Swin windows
    assert patch_prefix((2, 18, 18), (4, 4), 1) is None
    assert patch_prefix((2, 17, 17), None, 1) is None


def test_orders_are_checked():
    assert check_orders([0.5, "inf", 2]) == (0.5, math.inf, 2.0)
    with pytest.raises(EamError, match=">= 0"):
        check_orders([-1.0])
    with pytest.raises(EamError, match="twice"):
        check_orders([2, 2.0])


def _renyi_loop(row, alpha):
    """Rényi entropy (nats) of one distribution given as a list, by its definition."""
    if alpha == 1.0:
        return -sum(p * math.log(p) for p in row if p > 0)
    if math.isinf(alpha):
        return -math.log(max(row))
    return math.log(sum(p ** alpha for p in row if p > 0)) / (1.0 - alpha)


def _reference(attn, grid, prefix, orders, bins):
    """Per-head mean distance and entropy, and per-order token-entropy bins, with plain loops.

    Returns ``(distance, entropy, bins_of_tokens, near_edge)``: ``bins_of_tokens[i]`` lists the bin of
    every (image, token) for order ``i``; ``near_edge`` counts the tokens within float32 rounding of a
    bin edge (where the float32 code may pick the neighbouring bin).
    """
    a = attn.double().tolist()
    B, H, N = len(a), len(a[0]), len(a[0][0])
    cols = grid[1]
    pos = [(i // cols, i % cols) for i in range(N - prefix)]
    dist, ent = [0.0] * H, [0.0] * H
    for b in range(B):
        for h in range(H):
            for i in range(N - prefix):
                row = a[b][h][prefix + i]
                mass = sum(row[prefix:])
                num = sum(row[prefix + j] * math.dist(pos[i], pos[j]) for j in range(N - prefix))
                dist[h] += num / mass / (B * (N - prefix))
                ent[h] += _renyi_loop(row, 1.0) / (B * (N - prefix))
    width = math.log(N) / bins
    got, near = [[] for _ in orders], 0
    for k, alpha in enumerate(orders):
        for b in range(B):
            for i in range(N - prefix):
                h = sum(_renyi_loop(a[b][hd][prefix + i], alpha) for hd in range(H)) / H
                got[k].append(min(bins - 1, max(0, int(math.floor(h / width)))))
                near += abs(h / width - round(h / width)) * width < 1e-5
    return dist, ent, got, near


def _assert_counts(counts, token_bins, near, bins):
    for k, ref in enumerate(token_bins):
        want = np.bincount(ref, minlength=bins)
        assert int(counts[k].sum()) == len(ref)
        assert np.abs(counts[k].numpy() - want).sum() <= 2 * near, (k, counts[k], want)


def test_accumulator_matches_loops_over_batches():
    g = torch.Generator().manual_seed(3)
    attn = torch.softmax(torch.randn(5, 2, 7, 7, generator=g) * 2, dim=-1)  # 1 prefix + a 2x3 grid
    attn[0, 1, 3] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # one-hot: entropy 0, distance 0
    stats = AttentionStats(2, 7, 1, (2, 3), ORDERS, bins=16)
    for chunk in attn.split(2):
        stats.update(chunk)
    dist, ent, token_bins, near = _reference(attn, (2, 3), 1, ORDERS, 16)
    assert stats.distance().tolist() == pytest.approx(dist, rel=1e-5)
    assert stats.head_entropy().tolist() == pytest.approx(ent, rel=1e-5)
    _assert_counts(stats.renyi_counts, token_bins, near, 16)


def _timm_attention(model, images):
    """Post-softmax attention of every block of an unmodified timm ViT, recomputed from its weights."""
    store = []
    hooks = []
    for blk in model.blocks:
        def hook(mod, inp, out):
            x = inp[0]
            B, N, _ = x.shape
            q, k, _ = mod.qkv(x).reshape(B, N, 3, mod.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            store.append(torch.softmax(q @ k.transpose(-2, -1) * mod.scale, -1))
        hooks.append(blk.attn.register_forward_hook(hook))
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return store


def test_calibration_stats_match_loops_on_the_timm_model():
    model = make(TINY_VIT)  # 32 px, patch 8: a 4x4 grid and a class token, 2 heads, 2 blocks
    timm_model = copy.deepcopy(model)  # never instrumented
    ds = _dataset(4)
    maps = eamvit.compute_entropy_maps(model, ds, bits=4, batch_size=3, progress=False,
                                       options=eamvit.CalibOptions(distance=True, renyi_orders=ORDERS))
    attn = _timm_attention(timm_model, torch.stack([ds[i][0] for i in range(4)]))
    assert maps.renyi_orders == ORDERS and maps.meta["attention_stats"]["renyi_orders"][-1] == "inf"
    for l, a in enumerate(attn):
        dist, ent, token_bins, near = _reference(a, (4, 4), 1, ORDERS, maps.renyi[l].shape[-1])
        assert maps.distance[l].tolist() == pytest.approx(dist, rel=1e-5)
        assert maps.head_entropy[l].tolist() == pytest.approx(ent, rel=1e-5)
        _assert_counts(maps.renyi[l], token_bins, near, maps.renyi[l].shape[-1])


def test_statistics_leave_the_maps_unchanged_and_survive_passes_and_save(tmp_path):
    model = make(TINY_VIT)
    ds = _dataset(5)
    plain = eamvit.compute_entropy_maps(model, ds, bits=5, batch_size=2, progress=False)
    assert plain.distance is None and plain.renyi is None
    both = eamvit.compute_entropy_maps(model, ds, bits=5, batch_size=2, progress=False,
                                       options=eamvit.CalibOptions(distance=True, renyi_orders=(2.0,)))
    per_layer = AttentionHistogram.nbytes(tuple(plain.entropy[0].shape), 5, 5)  # one layer per pass
    split = eamvit.compute_entropy_maps(model, ds, bits=5, batch_size=2, progress=False,
                                        options=eamvit.CalibOptions(distance=True, renyi_orders=(2.0,),
                                                                    max_memory=per_layer))
    both.save(tmp_path / "m.safetensors")
    back = EntropyMaps.load(tmp_path / "m.safetensors")
    for l in range(2):
        assert torch.equal(plain.entropy[l], both.entropy[l]) and torch.equal(plain.mean[l], both.mean[l])
        for other in (split, back):
            assert torch.equal(both.distance[l], other.distance[l])
            assert torch.equal(both.head_entropy[l], other.head_entropy[l])
            assert torch.equal(both.renyi[l], other.renyi[l])
    assert back.renyi_orders == (2.0,)


def test_resume_keeps_the_statistics(tmp_path):
    model = make(TINY_VIT)
    base = _dataset(8)
    opts = dict(bits=4, batch_size=2, progress=False)
    stats = dict(distance=True, renyi_orders=(1.0, math.inf))
    full = eamvit.compute_entropy_maps(model, base, options=eamvit.CalibOptions(**stats), **opts)
    ds = FailOnce(base, fail_at=6)
    partial = tmp_path / "maps.partial"
    resuming = eamvit.CalibOptions(resume_path=partial, checkpoint_every=1, **stats)
    with pytest.raises(KeyboardInterrupt):
        eamvit.compute_entropy_maps(model, ds, options=resuming, **opts)
    resumed = eamvit.compute_entropy_maps(model, ds, options=resuming, **opts)
    for l in range(2):
        assert torch.allclose(full.distance[l], resumed.distance[l], rtol=1e-6)
        assert torch.equal(full.renyi[l], resumed.renyi[l])


def test_swin_is_refused_in_one_line():
    with pytest.raises(EamError, match="whole patch grid"):
        eamvit.compute_entropy_maps(make(TINY_SWIN), _dataset(2), bits=4, progress=False,
                                    options=eamvit.CalibOptions(distance=True))


def test_maps_without_statistics_still_load_and_plot(tmp_path, capsys):
    maps = EntropyMaps.load(V03 / "maps.safetensors")  # written by eamvit 0.3
    assert maps.distance is None and maps.head_entropy is None and maps.renyi is None
    code, out, err = run(capsys, "plot", "--maps", V03 / "maps.safetensors", "--out", tmp_path / "figs")
    assert code == 0, err
    assert "no entropy_distance.png" in out and "no renyi_entropy.png" in out
    assert not (tmp_path / "figs" / "entropy_distance.png").exists()


def test_damaged_statistics_are_refused(tmp_path):
    model = make(TINY_VIT)
    maps = eamvit.compute_entropy_maps(model, _dataset(2), bits=4, progress=False,
                                       options=eamvit.CalibOptions(distance=True))
    maps.distance[1] = torch.zeros(3)  # the layer has 2 heads
    maps.save(tmp_path / "bad.safetensors")
    with pytest.raises(EamError, match=r"damaged \(distance.1 has shape"):
        EntropyMaps.load(tmp_path / "bad.safetensors")
    maps.distance[1] = torch.zeros(2)
    maps.meta.pop("attention_stats")
    maps.save(tmp_path / "bad2.safetensors")
    with pytest.raises(EamError, match="no attention_stats metadata"):
        EntropyMaps.load(tmp_path / "bad2.safetensors")


def test_cli_on_digits_stores_the_statistics_and_draws_both_figures(tmp_path, capsys):
    maps = tmp_path / "maps.safetensors"
    code, out, err = run(capsys, "calibrate", "--data", "digits", "--calib-size", 12, "--distance",
                         "--renyi-orders", "0.5,1,2,inf", "--out", maps)
    assert code == 0, err
    back = EntropyMaps.load(maps)  # the bundled ViT: 4 blocks of 4 heads over an 8x8 grid and a class token
    assert back.renyi_orders == ORDERS
    assert [tuple(d.shape) for d in back.distance] == [(4,)] * 4
    assert all(int(r.sum()) == 4 * 12 * 64 for r in back.renyi)  # every order counts each image's 64 patches
    code, out, err = run(capsys, "plot", "--maps", maps, "--out", tmp_path / "figs")
    assert code == 0, err
    for name in ("entropy_distance.png", "renyi_entropy.png"):
        assert_sane_png(tmp_path / "figs" / name)
        assert name in out

    from eamvit.plots.renyi import plot_entropy_distance, plot_renyi_histograms

    ax = plot_entropy_distance(back, tmp_path / "d.png").axes[0]
    assert ax.get_xlabel().startswith("mean attention distance (patches") and "(nats)" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()][:4] == [f"layer {l}" for l in range(4)]
    points = ax.collections[2].get_offsets()  # layer 2's heads, where calibration measured them
    assert np.allclose(points, np.stack([back.distance[2].numpy(), back.head_entropy[2].numpy()], 1))
    fig = plot_renyi_histograms(back, tmp_path / "r.png")
    assert [a.get_title() for a in fig.axes if a.get_visible()] == [f"layer {l}" for l in range(4)]
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert names[:4] == ["α = 0.5", "α = 1 (Shannon)", "α = 2", "α = ∞ (min-entropy)"]


def test_cli_refuses_bad_orders_and_windowed_models_in_one_line(tmp_path, capsys):
    out = tmp_path / "maps.safetensors"
    code, _, err = run(capsys, "calibrate", "--data", "digits", "--calib-size", 4, "--renyi-orders", "-1",
                       "--out", out)
    assert code == 2 and err.strip().splitlines()[-1].startswith("eamvit: error: Rényi order -1 is not >= 0")
    swin = ["--model", TINY_SWIN[0], "--model-kwargs", "img_size=32", "patch_size=2", "window_size=4",
            "embed_dim=16", "depths=(2,2)", "num_heads=(2,2)", "num_classes=3", "in_chans=1"]
    code, _, err = run(capsys, "calibrate", *swin, "--data", "digits", "--calib-size", 2, "--distance",
                       "--out", out)
    assert code == 2 and "whole patch grid" in err and "Traceback" not in err
    assert not out.exists()
