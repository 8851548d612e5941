"""`sweep --granularity`: freezing by entry/row/head next to token pruning and merging, at measured speed."""
import json

import pytest
import torch
from torch.utils.data import TensorDataset

import eamvit
from eamvit.cli.main import main
from eamvit.experiments.prune_sweep import matched_merges
from eamvit.experiments.runner import EvalData, Timing
from eamvit.experiments.speed_sweep import speed_sweep
from eamvit.methods.evaluate import evaluate
from eamvit.methods.freeze import FreezeConfig, freeze_, unfreeze_
from eamvit.methods.merge import MergeConfig, merge_, unmerge_
from eamvit.methods.prune import PruneConfig, prune_, unprune_
from eamvit.plots.speed import plot_top1_vs_speedup

from conftest import TINY_SWIN, TINY_VIT, make

MODEL = ["--model", TINY_VIT[0], "--model-kwargs", "img_size=32", "patch_size=8", "num_classes=3",
         "embed_dim=32", "depth=2", "num_heads=2"]
FAST = ["--throughput-reps", "3", "--throughput-batch", "2"]


@pytest.fixture(scope="module")
def setup():
    model = make(TINY_VIT).eval()
    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 3, (24,), generator=g))
    return model, eamvit.compute_entropy_maps(model, data, bits=8, progress=False), data


def test_rows_match_each_state_evaluated_alone(setup):
    model, maps, data = setup
    x = data.tensors[0][:4]
    with torch.no_grad():
        before = model(x)
    rows = speed_sweep(model, maps, EvalData(data, batch_size=8), [FreezeConfig(tau=0.5, granularity=g)
                       for g in ("entry", "head")], [PruneConfig(method="evit", keep_rate=0.5)],
                       matched_merges(model, [0.5], [MergeConfig(selection="tome")], {}),
                       Timing(batch_size=2, warmup=0, reps=3), progress=False)
    assert [(r["selection"], r["granularity"], r["tau"], r["prune"], r["keep_rate"], r["merge"]) for r in rows] == [
        (None, None, None, None, None, None), ("entropy", "entry", 0.5, None, None, None),
        ("entropy", "head", 0.5, None, None, None), (None, None, None, "evit", 0.5, None),
        (None, None, None, None, None, "tome")]  # a setting that does not apply is blank
    assert rows[4]["matched_keep_rate"] == 0.5 and [r["matched_keep_rate"] for r in rows[:4]] == [None] * 4
    merged = MergeConfig(r=int(rows[4]["merge_r"].split("-")[0]))  # one r; later blocks are capped alike
    with torch.no_grad():  # the sweep left the model as it found it
        assert torch.equal(model(x), before)
    # Each row's top-1 and cost against the same state set up by hand and evaluated on its own.
    full = eamvit.cost_account(model).gmacs
    for row, (apply, undo) in zip(rows[1:], [
            (lambda: freeze_(model, maps, FreezeConfig(tau=0.5)), lambda: unfreeze_(model)),
            (lambda: freeze_(model, maps, FreezeConfig(tau=0.5, granularity="head")), lambda: unfreeze_(model)),
            (lambda: prune_(model, PruneConfig(method="evit", keep_rate=0.5)), lambda: unprune_(model)),
            (lambda: merge_(model, merged), lambda: unmerge_(model))]):
        apply()
        assert row["top1"] == evaluate(model, data, batch_size=8, progress=False)["top1"]
        assert row["gmacs"] == pytest.approx(eamvit.cost_account(model).gmacs, rel=1e-4)
        undo()
        assert row["predicted_speedup"] == pytest.approx(full / row["gmacs"], rel=1e-3)
        assert row["speedup_p25"] <= row["speedup"] <= row["speedup_p75"]
        assert row["images_per_s"] > 0
    for row in rows:  # images/s tell the same story as the measured ×, the unmodified row included
        assert row["images_per_s"] / rows[0]["images_per_s"] == pytest.approx(row["speedup"] / rows[0]["speedup"],
                                                                              rel=0.01)
    entry, head = rows[1], rows[2]
    assert entry["gmacs"] == pytest.approx(full, rel=1e-6) and entry["predicted_speedup"] == 1  # entries save nothing
    assert head["gmacs"] < full and head["gmacs_skippable"] == 0  # heads are skipped, not merely skippable


def test_cli_writes_table_and_plot(tmp_path, image_folder, capsys):
    out = tmp_path / "speed"
    code = main([str(a) for a in ["sweep", *MODEL, "--data", image_folder, "--granularity", "entry,row,head",
                                  "--taus", "0,0.5", "--keep-rates", "0.7", "--methods", "shannon,renyi:2",
                                  *FAST, "--out", out]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = json.loads((out / "speed_sweep.json").read_text())
    assert [(r["granularity"], r["prune"], r["alpha"]) for r in rows] == [
        (None, None, None), ("entry", None, None), ("row", None, None), ("head", None, None),
        (None, "shannon", None), (None, "renyi", 2.0)]
    md = [line.split(" | ")[0] for line in (out / "speed_sweep.md").read_text().splitlines()[2:]]
    assert md == ["| unmodified", "| freeze (entry)", "| freeze (row)", "| freeze (head)", "| prune (Shannon)",
                  "| prune (Rényi α=2)"]
    assert all(r["images_per_s"] > 0 and r["predicted_speedup"] >= 1 for r in rows)
    header = (out / "speed_sweep.csv").read_text().splitlines()[0].split(",")
    assert {"top1", "gmacs", "predicted_speedup", "speedup", "images_per_s_p25", "frozen_fraction"} <= set(header)
    assert "| freeze (head) | 0.5 |" in (out / "speed_sweep.md").read_text()
    assert (out / "speed_sweep.png").stat().st_size > 10_000


@pytest.mark.parametrize("args,message", [
    (["--granularity", "row"], "row granularity does not apply to Swin"),
    (["--granularity", "head", "--methods", "evit"], "token pruning does not apply to Swin"),
])
def test_cli_swin_refusals(tmp_path, image_folder, capsys, args, message):
    kwargs = ["img_size=32", "patch_size=2", "window_size=4", "embed_dim=16", "depths=2,2", "num_heads=2,2",
              "num_classes=3"]
    code = main([str(a) for a in ["sweep", "--model", TINY_SWIN[0], "--model-kwargs", *kwargs, "--data",
                                  image_folder, *args, "--out", tmp_path / "o"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("eamvit: error: " + message)
    assert not (tmp_path / "o").exists()  # refused before any output


@pytest.mark.parametrize("args,message", [
    (["--granularity", "rows"], "expected granularities"),
    (["--granularity", "head", "--throughput-reps", "2"], "--throughput-reps must be at least 3"),
    (["--granularity", "head", "--prune"], "drop --prune"),
])
def test_cli_bad_options(tmp_path, image_folder, capsys, args, message):
    try:  # argparse's own errors leave through SystemExit, eamvit's through the return code
        code = main([str(a) for a in ["sweep", *MODEL, "--data", image_folder, *args, "--out", tmp_path / "o"]])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and not (tmp_path / "o" / "speed_sweep.csv").exists()


def test_plot_draws_one_line_per_method_in_sweep_order(tmp_path):
    rows = [{"method": "unmodified", "speedup": 1.0, "top1": 90.0, "point": None},
            {"method": "freeze (head)", "speedup": 1.2, "speedup_lo": 1.1, "speedup_hi": 1.3, "top1": 80.0, "point": "τ=0.5"},
            {"method": "freeze (head)", "speedup": 1.1, "speedup_lo": 1.0, "speedup_hi": 1.2, "top1": 70.0, "point": "τ=0.7"},
            {"method": "prune (EViT)", "speedup": 1.4, "top1": 85.0, "point": "κ=0.7"}]
    fig = plot_top1_vs_speedup(rows, tmp_path / "s.png")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["freeze (head)", "prune (EViT)", "unmodified (90.00 %)", "τ=0.5", "τ=0.7", "κ=0.7"]
    head = ax.lines[0]
    assert list(head.get_xdata()) == [1.2, 1.1] and list(head.get_ydata()) == [80.0, 70.0]
    assert (tmp_path / "s.png").stat().st_size > 5_000


def test_summary_picks_the_fastest_point_within_the_accuracy_budget():
    from eamvit.experiments.speed_sweep import summary_lines

    def row(top1, speedup, tau=None, keep=None, gran=None, prune=None):
        return {"top1": top1, "speedup": speedup, "speedup_p25": speedup - 0.05, "speedup_p75": speedup + 0.05,
                "predicted_speedup": speedup + 0.1, "tau": tau, "keep_rate": keep, "granularity": gran,
                "prune": prune, "alpha": None}

    rows = [row(90.0, 1.0), row(89.9, 0.8, 0.5, gran="entry"),
            row(89.5, 1.1, 0.5, gran="head"), row(80.0, 1.3, 0.9, gran="head"),
            row(89.0, 1.02, keep=0.7, prune="evit"), row(88.9, 1.9, keep=0.5, prune="evit")]
    freeze, prune, freeze5, prune5, entry = summary_lines(rows, max_drops=(1.0, 5.0))
    assert "freeze (head) at τ=0.5" in freeze and "×1.100" in freeze  # τ=0.9 is faster but 10 points worse
    assert freeze.endswith(": faster than the unmodified model")
    assert "prune (EViT) at κ=0.7" in prune and "not clearly faster" in prune  # κ=0.5 loses 1.1 points
    assert "freeze (head) at τ=0.5" in freeze5 and "prune (EViT) at κ=0.5" in prune5
    assert "×0.800..×0.800" in entry
