"""Figures drawn from small synthetic data: each is a real PNG, texts do not run into each other,
colour scales are shared where figures are to be compared, and layers/heads are numbered from 0."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch

from eamvit.methods.calibrate import EntropyMaps
from eamvit.plots.entropy import plot_cls_entropy, plot_full_entropy, plot_head_summary, plot_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk (read directly, not through matplotlib)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_sane_png(path: Path) -> None:
    w, h = png_size(path)
    assert 200 <= w <= 4000 and 150 <= h <= 4000, (path.name, w, h)
    assert not list(path.parent.glob(f".{path.name}*")), "temporary file left behind"


def _text_boxes(fig):
    """Window extents of the figure-level texts and of every axes with its titles, labels and ticks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the saved figure was closed: attach a canvas to lay it out again
    canvas.draw()
    r = canvas.get_renderer()
    sup = [t.get_window_extent(r) for t in (fig._suptitle, fig._supxlabel, fig._supylabel)
           if t is not None and t.get_text()]
    return sup, [ax.get_tightbbox(r) for ax in fig.axes if ax.get_visible() and ax.axison]


def assert_no_overlaps(fig) -> None:
    sup, axes = _text_boxes(fig)
    for i, a in enumerate(axes):
        for b in axes[i + 1:]:
            assert not a.overlaps(b), "two panels (with their labels) overlap"
        for s in sup:
            assert not a.overlaps(s), "a figure title/label overlaps a panel"


@pytest.fixture
def vit_maps() -> EntropyMaps:
    """3 layers x 2 heads, CLS + 4x4 patches; layer 2's entropies are 4x smaller than the others'."""
    g = torch.Generator().manual_seed(0)
    n, heads = 17, 2
    ent = [8 * torch.rand(heads, n, n, generator=g) for _ in range(3)]
    ent[2] = ent[2] / 4
    mean = [torch.softmax(torch.randn(heads, n, n, generator=g), -1) for _ in range(3)]
    return EntropyMaps(entropy=ent, mean=mean, masked=[None] * 3,
                       meta={"num_images": 10, "num_prefix_tokens": 1, "grid": [4, 4]})


def test_cls_entropy_layers_share_one_colour_scale(vit_maps, tmp_path):
    # The largest entropy of any CLS row (over the 16 patch tokens), computed here by hand.
    top = max(float(e[:, 0, 1:].max()) for e in vit_maps.entropy)
    figs = [plot_cls_entropy(vit_maps, l, tmp_path / f"cls_L{l}.png") for l in (0, 2)]
    for l, fig in zip((0, 2), figs):
        assert_sane_png(tmp_path / f"cls_L{l}.png")
        images = [im for ax in fig.axes for im in ax.get_images()]
        assert len(images) == 2  # one panel per head
        for im in images:
            assert im.get_clim() == pytest.approx((0.0, top))
        assert len(fig.axes) == 3  # 2 heads + ONE colour bar
        assert "one scale for all layers" in fig.axes[-1].get_ylabel()
        titles = [ax.get_title() for ax in fig.axes[:2]]
        assert titles == [f"layer {l}, head 0", f"layer {l}, head 1"]  # 0-based, as the options
        assert_no_overlaps(fig)
    # What the panels show is the CLS row laid on the 4x4 grid.
    shown = figs[1].axes[1].get_images()[0].get_array()
    assert torch.allclose(torch.as_tensor(shown.data), vit_maps.entropy[2][1, 0, 1:].reshape(4, 4))


def test_full_entropy_has_title_and_no_overlapping_labels(vit_maps, tmp_path):
    fig = plot_full_entropy(vit_maps, [(0, 0), (1, 1), (2, 0)], tmp_path / "full.png")
    assert_sane_png(tmp_path / "full.png")
    assert fig._suptitle is not None and "Entropy attention maps" in fig._suptitle.get_text()
    top = max(float(e.max()) for e in vit_maps.entropy)
    clims = [im.get_clim() for ax in fig.axes for im in ax.get_images()]
    assert clims == [pytest.approx((0.0, top))] * 3
    assert [ax.get_title() for ax in fig.axes[:3]] == ["layer 0, head 0", "layer 1, head 1", "layer 2, head 0"]
    assert_no_overlaps(fig)


def test_head_summary_is_numbered_from_zero(vit_maps, tmp_path):
    fig = plot_head_summary(vit_maps, tmp_path / "heads.png")
    assert_sane_png(tmp_path / "heads.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]
    # The cell texts are the mean entropy of each (layer, head), computed here directly.
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells[(2, 1)] == f"{float(vit_maps.entropy[2][1].mean()):.2f}"


def test_sweep_figure(tmp_path):
    rows = [{"selection": s, "scope": "head", "tau": t, "top1": 90 - 10 * t - (5 if s == "random" else 0),
             "top1_std": 1.0 if s == "random" else 0.0} for s in ("entropy", "random") for t in (0.0, 0.5)]
    plot_sweep(rows, tmp_path / "sweep.png", title="t", reference={"unfrozen": 90.0})
    assert_sane_png(tmp_path / "sweep.png")


def test_cli_plot_names_files_with_the_option_numbers(vit_maps, tmp_path):
    from eamvit.cli.main import main

    from eamvit.methods.calibrate import FORMAT

    vit_maps.meta.update(format=FORMAT, bits=8, layer_shapes=[list(e.shape) for e in vit_maps.entropy])
    vit_maps.save(tmp_path / "maps.safetensors")
    assert main(["plot", "--maps", str(tmp_path / "maps.safetensors"), "--layers", "0,2",
                 "--out", str(tmp_path / "figs")]) == 0
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["cls_entropy_L0.png", "cls_entropy_L2.png", "full_entropy.png", "head_entropy.png"]
    for p in (tmp_path / "figs").iterdir():
        assert_sane_png(p)


@pytest.fixture
def kl_maps():
    from eamvit.methods.kl import KLMaps

    g = torch.Generator().manual_seed(1)
    kl = [torch.rand(2, 17, 17, generator=g) * (l + 1) for l in range(3)]
    return KLMaps(kl=kl, meta={"num_images": 10, "eps": 1e-6, "num_prefix_tokens": 1, "grid": [4, 4]})


def test_kl_figures_are_numbered_from_zero_and_do_not_overlap(kl_maps, tmp_path):
    from eamvit.plots.quant import plot_kl_cls, plot_kl_per_head

    fig = plot_kl_cls(kl_maps, 0, tmp_path / "kl_cls_L0.png")
    assert_sane_png(tmp_path / "kl_cls_L0.png")
    assert [ax.get_title() for ax in fig.axes[:2]] == ["layer 0, head 0", "layer 0, head 1"]
    assert_no_overlaps(fig)
    fig = plot_kl_per_head(kl_maps, tmp_path / "kl_per_head.png")
    assert_sane_png(tmp_path / "kl_per_head.png")
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [0, 1, 2]
    assert_no_overlaps(fig)
    # The CSV rows use the same numbering: layer 2, head 1 is the mean over that head's entries.
    row = next(r for r in kl_maps.summary() if (r["layer"], r["head"]) == (2, 1))
    assert row["kl_mean"] == pytest.approx(float(kl_maps.kl[2][1].mean()), abs=1e-6)


def _prune_rows() -> list[dict]:
    rows = [{"method": "none", "alpha": None, "keep_rate": 1.0, "top1": 98.0, "gflops": 0.0128}]
    for m, a in (("shannon", None), ("renyi", 2.0), ("evit", None), ("random", None)):
        for k, g in ((0.7, 0.0099), (0.5, 0.0083)):
            rows.append({"method": m, "alpha": a, "keep_rate": k, "top1": 90 * k,
                         "gflops": g + (0.0001 if m == "evit" else 0.0)})  # EViT keeps one fused token more
    return rows


def test_prune_figure_one_unit_and_keep_rates_told_by_marker(tmp_path):
    from eamvit.plots.prune import plot_top1_vs_gflops

    rows = _prune_rows()
    fig = plot_top1_vs_gflops(rows, tmp_path / "prune.png")
    assert_sane_png(tmp_path / "prune.png")
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("GFLOPs")  # the unit of the sweep's table
    texts = [t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text"))]
    assert not any("MFLOP" in s for s in texts)
    assert not ax.texts  # no per-point labels that could pile up at one κ
    legend = {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    assert {"unpruned", "Shannon", "Rényi α=2", "EViT", "random", "κ = 0.7", "κ = 0.5"} == set(legend)
    # Every pruned point is drawn with the marker its κ has in the legend.
    points = [(ln.get_xdata()[0], ln.get_ydata()[0], ln.get_marker()) for ln in ax.get_lines() if len(ln.get_xdata()) == 1]
    assert len(points) == len(rows) - 1
    for r in rows[1:]:
        assert (r["gflops"], r["top1"], legend[f"κ = {r['keep_rate']:g}"].get_marker()) in points
    assert legend["κ = 0.7"].get_marker() != legend["κ = 0.5"].get_marker()
    assert_no_overlaps(fig)


def test_token_entropy_figure_in_bits_numbered_from_zero(tmp_path):
    from eamvit.plots.prune import plot_entropy_histograms

    g = torch.Generator().manual_seed(2)
    n = 65  # CLS + 64 patches: Shannon entropy of a row is at most ln 65 nats = log2 65 bits
    ent = {a: [torch.rand(8 * 64, generator=g) * math.log(n) for _ in range(4)] for a in (1.0, 2.0, math.inf)}
    fig = plot_entropy_histograms(ent, tmp_path / "token_entropy.png", title="patch-token attention entropy")
    assert_sane_png(tmp_path / "token_entropy.png")
    assert "bits" in fig._supxlabel.get_text() and "nats" not in fig._supxlabel.get_text()
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == [f"block {i}" for i in range(4)]  # 0-based, as --prune-blocks
    assert panels[0].get_ylabel()
    # Drawn in bits: block 0's shared bin edges span min..max of the nats / ln 2.
    lo = min(float(e[0].min()) for e in ent.values()) / math.log(2)
    hi = max(float(e[0].max()) for e in ent.values()) / math.log(2)
    assert (panels[0].dataLim.x0, panels[0].dataLim.x1) == (pytest.approx(lo, rel=1e-5), pytest.approx(hi, rel=1e-5))
    assert hi <= math.log2(n)
    assert_no_overlaps(fig)


def test_kept_patches_figure_says_what_a_dropped_patch_looks_like(tmp_path):
    from eamvit.plots.prune import plot_kept_patches

    keep1 = torch.ones(8, 8, dtype=torch.bool)
    keep1[0, :] = False
    keep2 = keep1.clone()
    keep2[1, :] = False
    masks = {"Shannon": [keep1, keep2], "EViT": [keep1, keep1]}
    fig = plot_kept_patches(torch.zeros(1, 16, 16), masks, tmp_path / "kept.png", mean=[0.5], std=[0.5], blocks=[1, 2])
    assert_sane_png(tmp_path / "kept.png")
    assert any("dropped" in t.get_text() for lg in fig.legends for t in lg.get_texts())
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert "stage 1 (after block 1): 56 kept" in titles and "stage 2 (after block 2): 48 kept" in titles  # 0-based
    assert_no_overlaps(fig)
