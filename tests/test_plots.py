"""Figures drawn from small synthetic data: each is a real PNG, texts do not run into each other,
colour scales are shared where figures are to be compared, and layers/heads are numbered from 0."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch
from matplotlib.colors import to_rgb

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
    # Maps without ``bits``: the scale runs to the largest entropy of any entry of any layer.
    top = max(float(e.max()) for e in vit_maps.entropy)
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
    rows = [{"prune": None, "alpha": None, "keep_rate": None, "top1": 98.0, "gmacs": 0.0128}]
    for m, a in (("shannon", None), ("renyi", 2.0), ("evit", None), ("random", None)):
        for k, g in ((0.7, 0.0099), (0.5, 0.0083)):
            rows.append({"prune": m, "alpha": a, "keep_rate": k, "top1": 90 * k,
                         "gmacs": g + (0.0001 if m == "evit" else 0.0)})  # EViT keeps one fused token more
    return rows


def test_prune_figure_one_unit_and_keep_rates_told_by_marker(tmp_path):
    from eamvit.plots.prune import plot_top1_vs_gmacs

    rows = _prune_rows()
    fig = plot_top1_vs_gmacs(rows, tmp_path / "prune.png")
    assert_sane_png(tmp_path / "prune.png")
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("GMACs")  # the unit of the sweep's table
    texts = [t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text"))]
    assert not any("MFLOP" in s for s in texts)
    assert not ax.texts  # no per-point labels that could pile up at one κ
    legend = {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    assert {"unmodified", "Shannon", "Rényi α=2", "EViT", "random", "κ = 0.7", "κ = 0.5"} == set(legend)
    # Every pruned point is drawn with the marker its κ has in the legend.
    points = [(ln.get_xdata()[0], ln.get_ydata()[0], ln.get_marker()) for ln in ax.get_lines() if len(ln.get_xdata()) == 1]
    assert len(points) == len(rows) - 1
    for r in rows[1:]:
        assert (r["gmacs"], r["top1"], legend[f"κ = {r['keep_rate']:g}"].get_marker()) in points
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
    # Drawn in bits: the bin edges, shared by every block, span min..max of all the nats / ln 2.
    lo = min(float(e.min()) for per in ent.values() for e in per) / math.log(2)
    hi = max(float(e.max()) for per in ent.values() for e in per) / math.log(2)
    for ax in panels:
        assert (ax.dataLim.x0, ax.dataLim.x1) == (pytest.approx(lo, rel=1e-5), pytest.approx(hi, rel=1e-5))
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


# --------------------------------------------------------------------------- what a reader sees


def _render(fig):
    """The figure drawn again (it was closed when saved): RGB pixels, rows from the top."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(float) / 255


def _pixel(pixels, ax, x: float, y: float):
    px, py = ax.transData.transform((x, y))
    return pixels[int(round(pixels.shape[0] - py)), int(round(px))]


def _contrast(a, b) -> float:
    """WCAG 2 contrast ratio of two sRGB colours."""
    def lum(c):
        lin = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in c[:3]]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def shared_or_every_panel_legends(fig, panels) -> list:
    """The legends a reader finds: one for the whole figure, or one on every panel (not on some only)."""
    own = [ax.get_legend() for ax in panels if ax.get_legend()]
    if fig.legends:
        assert len(fig.legends) == 1 and not own, "a figure legend and panel legends"
        return list(fig.legends)
    assert len(own) == len(panels), f"a legend on {len(own)} of {len(panels)} panels"
    return own


def test_cls_and_full_maps_share_colour_map_and_the_0_to_bits_scale(vit_maps, tmp_path):
    vit_maps.meta["bits"] = 8  # a 2^8-bin histogram holds at most 8 bits of entropy
    cls = plot_cls_entropy(vit_maps, 0, tmp_path / "cls.png")
    full = plot_full_entropy(vit_maps, [(0, 0), (2, 1)], tmp_path / "full.png")
    images = [im for fig in (cls, full) for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 4  # 2 heads + 2 pairs
    assert {im.get_clim() for im in images} == {(0.0, 8.0)}
    assert len({im.get_cmap().name for im in images}) == 1
    # The same entropy gets the same colour in both figures.
    assert images[0].to_rgba(3.0) == images[-1].to_rgba(3.0)


def test_head_summary_is_large_and_its_numbers_contrast_with_their_cells(tmp_path):
    # Mean entropies from 0 to 8 bits cover the colour map's dark, middle and light cells.
    ent = [torch.stack([torch.full((17, 17), float(l + h / 2)) for h in range(4)]) for l in (0, 2, 4, 6)]
    maps = EntropyMaps(entropy=ent, mean=[torch.zeros_like(e) for e in ent], masked=[None] * 4,
                       meta={"num_images": 10, "num_prefix_tokens": 1, "grid": [4, 4]})
    fig = plot_head_summary(maps, tmp_path / "heads.png")
    assert png_size(tmp_path / "heads.png")[0] >= 900
    ax = fig.axes[0]
    im = ax.get_images()[0]
    assert len(ax.texts) == 16
    for t in ax.texts:
        h, l = (round(v) for v in t.get_position())
        cell = im.to_rgba(float(ent[l][h].mean()))
        assert t.get_text() == f"{float(ent[l][h].mean()):.2f}"
        assert _contrast(cell, to_rgb(t.get_color())) >= 4.5, (t.get_text(), cell, t.get_color())


def test_sweep_reference_is_named_in_the_legend_not_written_on_the_curves(tmp_path):
    rows = [{"selection": s, "scope": "head", "tau": t, "top1": 90.0 - (30 * t if s == "random" else 0),
             "top1_std": 1.0 if s == "random" else 0.0} for s in ("entropy", "random") for t in (0.0, 0.5, 0.9)]
    fig = plot_sweep(rows, tmp_path / "sweep.png", title="t", reference={"unfrozen": 90.0})
    assert png_size(tmp_path / "sweep.png")[0] >= 900
    ax = fig.axes[0]
    assert not ax.texts  # a label by the line would sit on the τ = 0 markers, which start on it
    assert any("unfrozen" in t.get_text() for t in ax.get_legend().get_texts())


def test_quant_sweep_repq_reference_shows_where_the_eam_curves_lie_on_it(tmp_path):
    from matplotlib.colors import to_rgba

    from eamvit.plots.quant import plot_quant_sweep

    rows = []
    for t in (0.0, 0.1, 0.2, 0.3):
        rows += [{"quant": "fp", "tau": t, "top1": 99.0}, {"quant": "repq", "tau": t, "top1": 97.0}]
        rows += [{"quant": "repq", "selection": "entropy", "maps": m, "value_bits": v, "tau": t,
                  "top1": 97.0} for m in ("fp", "quant") for v in (32, 4)]  # exactly on RepQ-ViT
        rows.append({"quant": "repq", "selection": "random", "maps": "quant", "value_bits": 4, "tau": t,
                     "top1": 97.0 - 40 * t})
    fig = plot_quant_sweep(rows, tmp_path / "q.png")
    ax = fig.axes[0]
    repq = next(ln for ln in ax.get_lines() if ln.get_label().startswith("RepQ-ViT"))
    r, g, b, a = to_rgba(repq.get_color(), repq.get_alpha())
    shown = [a * c + (1 - a) * 1.0 for c in (r, g, b)]  # the reference over the white axes
    pixels = _render(fig)
    cols = [ax.transData.transform((x, 97.0)) for x in (2, 8, 12, 18, 22, 28)]  # between τ markers
    seen = 0
    for px, py in cols:
        window = pixels[int(pixels.shape[0] - py) - 10:int(pixels.shape[0] - py) + 11, int(px)]
        seen += any(abs(window - shown).max(axis=1) < 0.03)
    assert seen == len(cols), "RepQ-ViT's reference is hidden under the EAM curves"


def test_prune_figure_ticks_read_as_gflops_without_offset(tmp_path):
    from eamvit.plots.prune import plot_top1_vs_gmacs

    fig = plot_top1_vs_gmacs(_prune_rows(), tmp_path / "prune.png")
    _render(fig)
    ax = fig.axes[0]
    assert ax.xaxis.get_offset_text().get_text() == ""
    ticks = [(t.get_text(), t.get_position()[0]) for t in ax.get_xticklabels() if t.get_text()]
    assert len(ticks) >= 3
    for text, loc in ticks:
        assert float(text.replace("−", "-")) == pytest.approx(loc, abs=1e-9)


def test_kl_per_head_one_legend_for_both_panels_and_one_norm_sign(kl_maps, tmp_path):
    from eamvit.plots.quant import plot_kl_per_head

    fig = plot_kl_per_head(kl_maps, tmp_path / "kl.png")
    assert png_size(tmp_path / "kl.png")[0] >= 900
    heads = kl_maps.kl[0].shape[0]
    legends = shared_or_every_panel_legends(fig, fig.axes)
    assert [t.get_text() for t in legends[0].get_texts()] == [f"head {h}" for h in range(heads)]
    for ax in fig.axes:  # a head has one colour in both panels
        assert [ln.get_color() for ln in ax.get_lines()] == [h.get_color() for h in legends[0].legend_handles]
    texts = [t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text"))]
    assert not any("||" in s for s in texts) and any("‖" in s for s in texts)


def test_kept_patches_legend_names_every_overlay_colour(tmp_path):
    import numpy as np

    from eamvit.plots.prune import plot_kept_patches

    image = torch.linspace(-1, 1, 256).reshape(1, 16, 16)  # dark to bright: an overlay tint would vary
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[::2, ::3] = False
    fig = plot_kept_patches(image, {"Shannon": [keep]}, tmp_path / "kept.png", mean=[0.5], std=[0.5])
    dropped = keep.repeat_interleave(2, 0).repeat_interleave(2, 1).logical_not().numpy()
    shown = np.asarray(fig.axes[1].get_images()[0].get_array())[..., :3]
    overlay = {tuple(np.round(c, 6)) for c in shown[dropped]}
    swatches = [h for lg in fig.legends for h in lg.legend_handles if h.get_facecolor()[3] > 0]
    assert len(overlay) == len(swatches) == 1
    assert np.allclose(next(iter(overlay)), swatches[0].get_facecolor()[:3])
    # Kept patches are the image itself.
    assert np.allclose(shown[~dropped][:, 0], ((image[0] * 0.5 + 0.5).numpy()[~dropped]), atol=1e-6)


def test_token_entropy_one_x_scale_and_one_legend_for_every_block(tmp_path):
    from eamvit.plots.prune import plot_entropy_histograms

    g = torch.Generator().manual_seed(3)
    ent = {a: [torch.rand(256, generator=g) * (l + 1) for l in range(3)] for a in (1.0, 2.0)}
    fig = plot_entropy_histograms(ent, tmp_path / "te.png")
    panels = [ax for ax in fig.axes if ax.axison]
    lo = min(float(e.min()) for per in ent.values() for e in per) / math.log(2)
    hi = max(float(e.max()) for per in ent.values() for e in per) / math.log(2)
    assert len({ax.get_xlim() for ax in panels}) == 1
    x0, x1 = panels[0].get_xlim()
    assert x0 <= lo and x1 >= hi and (x1 - x0) < 1.1 * (hi - lo)
    legends = shared_or_every_panel_legends(fig, panels)
    assert len(legends[0].get_texts()) == len(ent)
    assert_no_overlaps(fig)


def _speed_rows() -> list[dict]:
    def row(m, s, top1, point, lo=None, hi=None):
        return {"method": m, "speedup": s, "speedup_lo": s - 0.03 if lo is None else lo,
                "speedup_hi": s + 0.03 if hi is None else hi, "top1": top1, "point": point}

    return [row("unmodified", 1.0, 90.0, None),
            row("freeze (entry)", 0.85, 89.0, "τ=0.3"), row("freeze (entry)", 0.86, 88.9, "τ=0.5"),
            row("freeze (head)", 1.1, 80.0, "τ=0.3", hi=3.1),  # one noisy repetition
            row("freeze (head)", 1.3, 72.0, "τ=0.5"),
            row("prune (EViT)", 1.0, 90.0, "κ=0.9"),  # right on the unmodified model
            row("prune (EViT)", 1.4, 72.5, "κ=0.5")]


def test_speed_figure_points_are_readable(tmp_path):
    from matplotlib.lines import Line2D

    from eamvit.plots.speed import plot_top1_vs_speedup

    rows = _speed_rows()
    fig = plot_top1_vs_speedup(rows, tmp_path / "speed.png")
    assert png_size(tmp_path / "speed.png")[0] >= 900
    ax = fig.axes[0]
    assert not ax.texts  # τ/κ are told by the marker (in the legend), not by labels that pile up
    legend = {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    singles = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 1]
    for r in rows[1:]:  # every point drawn with its knob's marker from the legend
        assert any((ln.get_xdata()[0], ln.get_ydata()[0], ln.get_marker()) ==
                   (r["speedup"], r["top1"], legend[r["point"]].get_marker()) for ln in singles), r
    # The x range follows the medians; the 3.1x bar is cut at the edge and the legend says how that looks.
    x0, x1 = ax.get_xlim()
    assert x0 <= 0.85 and 1.4 <= x1 < 1.6
    for seg in (s for c in ax.collections for s in c.get_segments()):
        assert x0 - 1e-9 <= seg[:, 0].min() and seg[:, 0].max() <= x1 + 1e-9
    tip = next(ln for ln in singles if ln.get_xdata()[0] == pytest.approx(x1) and ln.get_ydata()[0] == 80.0)
    named = [name for name, h in legend.items() if isinstance(h, Line2D) and h.get_marker() == tip.get_marker()]
    assert len(named) == 1 and named[0] not in {r["point"] for r in rows}
    # The unmodified model's star does not cover the EViT point that lies on it.
    pixels = _render(fig)
    evit = next(ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1 and ln.get_linestyle() == "--")
    assert abs(_pixel(pixels, ax, 1.0, 90.0) - to_rgb(evit.get_color())).max() < 0.1
