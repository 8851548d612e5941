"""``eamvit optimize``: the front, the choice, the cache, the shipped file and the commands it reports."""
import json
import random
import re
import shlex

import pytest
import torch

from eamvit.columns import COLUMNS, HEAD

from conftest import shipped_bound, run, single_thread  # noqa: F401  (fixture)
from eamvit.experiments import optimize as opt
from eamvit.experiments.optimize_space import single_candidates
from eamvit.ops.pareto import front_mask

single_thread = pytest.fixture(autouse=True, scope="module")(single_thread)

FAST = ["--data", "digits", "--reps", "3"]


def _dominated(p, points):
    return any(q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1]) for q in points)


def test_front_mask_is_the_brute_force_front():
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 12)
        # Few distinct values: ties in either coordinate and repeated points are common.
        pts = [(rng.choice([90.0, 95.5, 98.0, 99.0]), rng.choice([0.9, 1.0, 1.2, 1.5])) for _ in range(n)]
        assert front_mask(pts) == [not _dominated(p, pts) for p in pts], pts


def _space(monkeypatch, labels, runtime):
    """A search space of the named singles of the small space (the public list, cut down for speed)."""
    cands = [c for c in single_candidates(4, runtime, "small") if c.label in labels]
    assert [c.label for c in cands] == list(labels)
    monkeypatch.setattr(opt, "single_candidates", lambda depth, rt, space, seed, merges=(), prunes=(): cands)


def _count_measures(monkeypatch):
    calls = []
    real = opt.measure

    def counted(run_, cand):
        calls.append(cand.label)
        return real(run_, cand)

    monkeypatch.setattr(opt, "measure", counted)
    return calls


def _rows(out):
    return json.loads((out / "pareto.json").read_text())


def test_torch_search_chooses_the_fastest_within_budget_and_resumes(tmp_path, monkeypatch, capsys):
    _space(monkeypatch, ["evit-k0.7@2,3", "evit-k0.5@2,3", "head-t0.25"], "torch")
    calls = _count_measures(monkeypatch)
    out = tmp_path / "o"
    # A budget already spent after the reference: the search stops cleanly, with only the reference.
    code, _, err = run(capsys, "optimize", *FAST, "--runtime", "torch", "--max-drop", "3", "--budget-minutes",
                       "1e-9", "--out", out)
    assert code == 2 and "--budget-minutes" in err.strip().splitlines()[-1]
    assert calls == ["fp32"] and not (out / "best.safetensors").exists() and (out / "pareto.csv").exists()
    code, stdout, err = run(capsys, "optimize", *FAST, "--runtime", "torch", "--max-drop", "3", "--out", out)
    assert code == 0, err
    # Resumed: the reference came from the cache, the singles are measured now (no two stages survive to stack).
    assert calls == ["fp32", "evit-k0.7@2,3", "evit-k0.5@2,3", "head-t0.25"]
    rows = _rows(out)
    ref = rows[0]["top1"]
    for r in rows:
        assert r["top1_delta"] == pytest.approx(r["top1"] - ref, abs=1e-6)
        assert r["within_budget"] == (ref - r["top1"] <= 3 + 1e-9)
    pts = [(r["top1"], r["speedup"]) for r in rows]
    assert [r["on_front"] for r in rows] == [not _dominated(p, pts) for p in pts]
    ok = [r for r in rows[1:] if r["within_budget"]]
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["speedup"] == max(r["speedup"] for r in ok)
    assert (out / "best.safetensors").exists() and not (out / "best.onnx").exists()
    assert (out / "pareto.png").stat().st_size > 0
    # One row shape: every eamvit row's head, then columns of the one vocabulary.
    header = (out / "pareto.csv").read_text().splitlines()[0].split(",")
    assert tuple(header[:len(HEAD)]) == HEAD and set(header) <= set(COLUMNS), set(header) - set(COLUMNS)
    assert {r["data_config_source"] for r in rows} == {"digits"}
    calls.clear()
    assert run(capsys, "optimize", *FAST, "--runtime", "torch", "--max-drop", "3", "--out", out)[0] == 0
    assert calls == []  # everything from points.jsonl
    assert _rows(out) == rows


def test_impossible_budget_is_one_line_and_no_best_file(tmp_path, monkeypatch, capsys):
    _space(monkeypatch, ["evit-k0.5@2,3"], "torch")  # 96.1 % against 98.9 %: never within 0 points
    out = tmp_path / "o"
    code, _, err = run(capsys, "optimize", *FAST, "--runtime", "torch", "--max-drop", "0", "--out", out)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("eamvit: error: no recipe keeps top-1 within --max-drop 0")
    assert "Traceback" not in err
    assert not (out / "best.safetensors").exists() and (out / "pareto.json").exists()
    assert "No recipe within" in (out / "report.md").read_text()


@pytest.mark.parametrize("args, words", [
    (["--max-drop", "-0.5"], "--max-drop"),
    (["--budget-minutes", "0"], "--budget-minutes"),
    (["--runtime", "tensorrt"], "optimize config field runtime must be one of onnxruntime, openvino, torch, not the string 'tensorrt'"),
    (["--space", "huge"], "optimize config field space must be one of standard, small"),
    (["--reps", "2"], "--reps"),
    (["--runtime", "torch", "--threads", "1"], "--threads"),
    (["--finetune-lr", "1e-3"], "--finetune-lr cannot apply without --finetune-epochs"),
    (["--finetune-epochs", "-1"], "--finetune-epochs must be 0"),
])
def test_bad_values_are_refused_before_anything_is_written(tmp_path, capsys, args, words):
    out = tmp_path / "o"
    code, stdout, err = run(capsys, "optimize", "--data", "digits", *args, "--out", out)
    assert code == 2 and err.count("\n") == 1 and err.startswith("eamvit: error:") and words in err
    assert not out.exists()


def _report_command(report: str, name: str) -> list[str]:
    line = next(l for l in report.splitlines() if l.startswith(f"eamvit {name} "))
    return shlex.split(line)[1:]


def _top1(stdout: str) -> float:
    return float(re.search(r"top1=([0-9.]+)", stdout).group(1))


def test_onnx_best_is_what_was_measured_and_the_report_rebuilds_it(tmp_path, monkeypatch, capsys):
    _space(monkeypatch, ["int8-sym"], "onnxruntime")
    out = tmp_path / "o"
    code, stdout, err = run(capsys, "optimize", *FAST, "--max-drop", "1", "--threads", "1", "--out", out)
    assert code == 0, err
    best = next(r for r in _rows(out) if r["chosen"])
    # The shipped file, scored by `eval --onnx` (ONNX Runtime, the same held-out digits).
    code, stdout, err = run(capsys, "eval", "--onnx", out / "best.onnx", "--data", "digits")
    assert code == 0, err
    assert _top1(stdout) == pytest.approx(best["top1"], abs=1e-9)
    # best.safetensors is the same model: calibrated for the target it is shipped in.
    assert abs(best["top1_torch"] - best["top1"]) <= shipped_bound()
    # report.md's compress command, run, gives a model whose `eval --state` top-1 is best.safetensors'.
    report = (out / "report.md").read_text()
    reported = best["top1_torch"]
    cmd = _report_command(report, "compress")
    state = tmp_path / "rebuilt.safetensors"
    cmd[cmd.index("--out") + 1] = str(state)
    code, _, err = run(capsys, *cmd)
    assert code == 0, err
    code, stdout, err = run(capsys, "eval", "--state", state, "--data", "digits")
    assert code == 0, err
    assert _top1(stdout) == pytest.approx(reported, abs=1e-9)
    # ... and its export command, run on that file, ships a file that scores what the search measured.
    cmd = _report_command(report, "export")
    cmd[cmd.index("--state") + 1], cmd[cmd.index("--out") + 1] = str(state), str(tmp_path / "rebuilt.onnx")
    code, _, err = run(capsys, *cmd)
    assert code == 0, err
    code, stdout, err = run(capsys, "eval", "--onnx", tmp_path / "rebuilt.onnx", "--data", "digits")
    assert code == 0, err
    assert _top1(stdout) == pytest.approx(best["top1"], abs=1e-9)


def _point(label, top1):
    return {"label": label, "top1": top1, "num_images": 360, "speedup": 1.0, "speedup_p25": 0.9, "speedup_p75": 1.1}


def test_a_line_cut_short_by_an_interruption_is_measured_again(tmp_path):
    path = tmp_path / "points.jsonl"
    cache = opt.PointCache(path)
    cache.add("a", _point("x", 1.0))
    with open(path, "a") as f:
        f.write('{"key": "b", "point": {"label": "y", "to')  # killed mid-write
    again = opt.PointCache(path)
    assert again.get("a") == _point("x", 1.0) and again.get("b") is None
    again.add("b", _point("y", 2.0))  # measured again, on a line of its own
    third = opt.PointCache(path)  # the cut line is now between two points: still ignored
    assert third.get("a") == _point("x", 1.0) and third.get("b") == _point("y", 2.0)
    assert len(path.read_text().splitlines()) == 3


@pytest.mark.parametrize("line, words", [
    ("not json at all", "line 2 is not JSON"),
    ("{}", "line 2: not {"),
    ('{"key": "b", "point": {}}', "line 2: its point has no label"),
    ('{"key": "b", "point": {"label": "y", "top1": "high"}}', "line 2: its point has no number 'top1'"),
])
def test_a_cache_line_that_is_not_a_point_refuses_the_file(tmp_path, line, words):
    path = tmp_path / "points.jsonl"
    opt.PointCache(path).add("a", _point("x", 1.0))
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(opt.EamError, match="cannot resume from") as e:
        opt.PointCache(path)
    assert words in str(e.value) and "delete it" in str(e.value)


@pytest.mark.parametrize("n, max_drop, ok", [
    (100, 1.0, True), (99, 1.0, False),  # one image of 100 is exactly one point
    (360, 1.0, True),  # the demo: the digits test split against one point
    (2, 1.0, False), (2, 50.0, True), (3, 33.3, False), (3, 33.34, True),
    (2, 0.0, True),  # no image may be lost: any sample says whether one was
])
def test_max_drop_finer_than_one_held_out_image_is_refused(n, max_drop, ok):
    if ok:
        opt.check_resolution(n, max_drop)
    else:
        with pytest.raises(opt.EamError, match=f"{n} held-out images cannot resolve --max-drop {max_drop:g}"):
            opt.check_resolution(n, max_drop)


def test_pareto_figure_draws_the_front_through_the_front_points(tmp_path):
    from eamvit.plots.optimize import plot_pareto

    rows = [{"label": "fp32", "stage": "reference", "top1": 99.0, "speedup": 1.0, "speedup_p25": 0.9,
             "speedup_p75": 1.1, "on_front": False, "chosen": False},
            {"label": "a", "stage": "single", "top1": 99.2, "speedup": 1.3, "speedup_p25": 1.2, "speedup_p75": 1.4,
             "on_front": True, "chosen": False},
            {"label": "b", "stage": "stack", "top1": 98.5, "speedup": 1.6, "speedup_p25": 1.5, "speedup_p75": 1.7,
             "on_front": True, "chosen": True},
            {"label": "broken", "stage": "single", "top1": None, "speedup": None, "error": "no export",
             "on_front": False, "chosen": False}]
    fig = plot_pareto(rows, tmp_path / "p.png", max_drop=1.0)
    assert (tmp_path / "p.png").stat().st_size > 0
    line = next(l for l in fig.axes[0].get_lines() if l.get_label() == "Pareto front")
    # A step "pre" line through (1.3, 99.2) and (1.6, 98.5): the faster point's top-1 holds left of it.
    xs, ys = list(line.get_xdata()), list(line.get_ydata())
    assert (xs[0], ys[0]) == (1.3, 99.2) and (xs[-1], ys[-1]) == (1.6, 98.5)
    budget = [l for l in fig.axes[0].get_lines() if l.get_label().startswith("budget")]
    assert budget and list(budget[0].get_ydata()) == [98.0, 98.0]


def test_finetuning_without_training_images_is_refused(tmp_path, capsys):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "val")
    out = tmp_path / "o"
    code, _, err = run(capsys, "optimize", "--data", tmp_path / "val", "--finetune-epochs", "1", "--out", out)
    assert code == 2 and err.count("\n") == 1 and "--calib-data" in err and "Traceback" not in err
    assert not (out / "pareto.csv").exists()


def test_a_finetuned_reduction_stacks_on_its_own_weights():
    from eamvit.errors import EamError
    from eamvit.experiments.optimize_space import combinations, finetuned
    from eamvit.methods.finetune import FinetuneConfig

    singles = {c.label: c for c in single_candidates(4, "openvino", "small")}
    evit, nncf = singles["evit-k0.5@2,3"], singles["nncf-int8"]
    ft = finetuned(evit, FinetuneConfig(epochs=1))
    assert ft.label == "evit-k0.5@2,3+ft" and ft.recipe == evit.recipe and ft.identity() != evit.identity()
    # The post-training point that missed the budget never stacks; its fine-tuned twin does, on its weights.
    stacks = combinations([(nncf, True), (evit, False), (ft, True)])
    assert [(s.label, s.finetune) for s in stacks] == [("nncf-int8 + evit-k0.5@2,3+ft", ft.finetune)]
    assert combinations([(nncf, True), (evit, True)])[0].finetune is None
    with pytest.raises(EamError, match="neither prunes nor merges"):
        finetuned(nncf, FinetuneConfig(epochs=1))


def test_finetuned_points_are_the_missed_reductions_trained_as_eamvit_finetune_trains(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from eamvit.methods.finetune import FinetuneConfig, finetune
    from eamvit.methods.models import create_model, data_config
    from eamvit.methods.prune import PruneConfig, prune_
    from eamvit.methods.train import train_dataset

    _space(monkeypatch, ["evit-k0.5@2,3", "head-t0.25"], "torch")
    calls = _count_measures(monkeypatch)
    out = tmp_path / "o"
    tuning = ["--finetune-epochs", "1", "--finetune-lr", "1e-3"]
    code, _, err = run(capsys, "optimize", *FAST, "--runtime", "torch", "--max-drop", "2", *tuning, "--out", out)
    assert code == 0, err
    rows = {r["label"]: r for r in _rows(out)}
    # Both miss 2 points untrained; only the token reduction is fine-tuned and searched again.
    assert not rows["evit-k0.5@2,3"]["within_budget"] and not rows["head-t0.25"]["within_budget"]
    assert calls == ["fp32", "evit-k0.5@2,3", "head-t0.25", "evit-k0.5@2,3+ft"]
    ft = rows["evit-k0.5@2,3+ft"]
    assert ft["finetune_epochs"] == 1 and ft["within_budget"] and ft["chosen"]
    # The shipped weights are what `eamvit finetune` (its API) trains from the bundled model pruned alike.
    ref = create_model()
    prune_(ref, PruneConfig(method="evit", keep_rate=0.5, blocks=(2, 3)))
    finetune(ref, train_dataset("digits", data_config(ref)), FinetuneConfig(epochs=1, lr=1e-3), progress=False)
    shipped = load_file(str(out / "best_weights.safetensors"))
    assert shipped.keys() == ref.state_dict().keys()
    assert all(torch.equal(shipped[k], v) for k, v in ref.state_dict().items())
    # The report's `eval --state` line (it names those weights) scores what the search measured.
    code, stdout, err = run(capsys, *_report_command((out / "report.md").read_text(), "eval"))
    assert code == 0, err
    assert _top1(stdout) == pytest.approx(ft["top1"], abs=1e-9)
