"""`eamvit demo` on a fresh install: missing modules fail first, steps report as they finish, `--full`.

The whole demo is too slow for a test; its step machinery runs here with stub steps after the real
(fast) loading of the bundled model.
"""
import sys

import pytest

import eamvit.experiments.demo as demo_mod
from eamvit.cli.main import build_parser, main
from eamvit.errors import EamError
from eamvit.experiments.demo import STEPS, Step

from conftest import MODEL, run, single_thread

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)  # tiny models: threads only cost


def _no_work(monkeypatch):
    """Make the demo's work itself fail the test: the module check must come before it."""
    def work(**_):
        raise AssertionError("the demo started working")
    monkeypatch.setattr(demo_mod, "run_demo", work)


@pytest.mark.parametrize("missing", [["onnx"], ["onnxruntime"], ["onnx", "onnxruntime"]])
def test_demo_missing_module_is_one_line_before_any_work(missing, monkeypatch, tmp_path, capsys):
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    _no_work(monkeypatch)
    code, out, err = run(capsys, "demo", "--out", tmp_path / "out")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("eamvit: error: eamvit demo needs " + ", ".join(missing) + ",")
    assert f"pip install {' '.join(missing)}" in err
    assert not (tmp_path / "out").exists()


def test_demo_with_modules_present_gets_to_the_work(monkeypatch, tmp_path, capsys):
    _no_work(monkeypatch)
    with pytest.raises(AssertionError, match="started working"):
        main(["demo", "--out", str(tmp_path / "out")])


def test_demo_runs_on_the_threads_asked_and_gives_them_back(monkeypatch, tmp_path, capsys):
    import torch

    seen = []
    monkeypatch.setattr(demo_mod, "run_demo", lambda **_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    assert main(["demo", "--out", str(tmp_path / "a")]) == 0 and seen == [1]
    assert main(["demo", "--threads", "2", "--out", str(tmp_path / "b")]) == 0 and seen == [1, 2]
    assert torch.get_num_threads() == before
    code, out, err = run(capsys, "demo", "--threads", "0", "--out", tmp_path / "c")
    assert code == 2 and err.startswith("eamvit: error: --threads must be at least 1") and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_export_and_eval_onnx_check_modules_first(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, out, err = run(capsys, "export", "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert code == 2 and err.startswith("eamvit: error: eamvit export needs onnxruntime,") and err.count("\n") == 1
    code, out, err = run(capsys, "eval", "--onnx", tmp_path / "none.onnx", "--data", "digits")
    assert code == 2 and err.startswith("eamvit: error: eamvit eval --onnx needs onnxruntime,")
    assert list(tmp_path.iterdir()) == []


def test_demo_parses_full():
    p = build_parser()
    assert p.parse_args(["demo"]).full is False
    assert p.parse_args(["demo", "--full"]).full is True


def test_full_holds_the_slow_steps_and_the_default_keeps_the_core_story():
    default = {s.name for s in STEPS if not s.full}
    assert default == {"maps", "figures", "sweep", "quant_sweep", "prune", "optimize"}
    assert {s.name for s in STEPS if s.full} == {"speed_sweep", "frozen_finetune", "compare", "export"}


def _section(name):
    return lambda demo: {"rows": [{"x": 1}], "table": f"TABLE-{name}", "markdown": f"## section {name}\n"}


def _boom(demo):
    raise EamError("step three failed")


@pytest.fixture
def stub_steps(monkeypatch):
    steps = (Step("one", "first step", _section("one")), Step("slow", "a slow step", _section("slow"), full=True),
             Step("two", "second step", _section("two")), Step("three", "failing step", _boom))
    monkeypatch.setattr(demo_mod, "STEPS", steps)


def test_a_late_failure_keeps_earlier_tables_and_report(stub_steps, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "demo", "--out", out, "--device", "cpu")
    assert code == 2 and err.strip().splitlines()[-1] == "eamvit: error: step three failed"
    # default plan: load, one, two, three, report = 5 steps; the slow one is not run
    assert [l.split("]")[0] + "]" for l in err.splitlines() if l.startswith("[")] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]"]
    assert "TABLE-one" in stdout and "TABLE-two" in stdout and "TABLE-slow" not in stdout
    report = (out / "report.md").read_text()
    assert "## section one" in report and "## section two" in report and "## section slow" not in report
    assert "Incomplete" in report
    assert "`eamvit demo --full` adds them" in report and "- a slow step" in report


def test_full_runs_every_step_and_finishes_the_report(monkeypatch, tmp_path, capsys):
    steps = (Step("one", "first step", _section("one")), Step("slow", "a slow step", _section("slow"), full=True))
    monkeypatch.setattr(demo_mod, "STEPS", steps)
    code, stdout, err = run(capsys, "demo", "--out", tmp_path, "--device", "cpu", "--full")
    assert code == 0, err
    assert [l.split("]")[0] + "]" for l in err.splitlines() if l.startswith("[")] == ["[1/4]", "[2/4]", "[3/4]",
                                                                                     "[4/4]"]
    report = (tmp_path / "report.md").read_text()
    assert "## section one" in report and "## section slow" in report
    assert "Incomplete" not in report and "--full` adds" not in report and "Run time:" in report
    assert "`one.*`, `slow.*`" in report


def _captured(monkeypatch, module, name):
    """Replace ``module.name`` by a stub that records its arguments and stops the command."""
    import importlib

    seen = {}

    def stub(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise EamError("stub reached")
    monkeypatch.setattr(importlib.import_module(module), name, stub)
    return seen


def test_speed_sweep_defaults_to_a_short_pruning_list(monkeypatch, tmp_path, capsys):
    seen = _captured(monkeypatch, "eamvit.experiments.speed_sweep", "speed_sweep")
    code, _, err = run(capsys, "sweep", "--data", "digits", "--num-samples", 8, "--granularity", "entry,head",
                       "--taus", 0.5, "--out", tmp_path)
    assert code == 2 and "stub reached" in err
    prune, merges = seen["args"][4:6]
    assert [(p.method, p.keep_rate) for p in prune] == [("shannon", 0.7), ("shannon", 0.5), ("evit", 0.7),
                                                        ("evit", 0.5)]
    assert len(prune) == 4  # pruning points, against 21 before
    assert [(m.selection, m.alpha) for _, m in merges] == [("tome", None), ("entropy", None)] * 2


def test_prune_sweep_keeps_its_wide_default(monkeypatch, tmp_path, capsys):
    seen = _captured(monkeypatch, "eamvit.experiments.prune_sweep", "prune_sweep")
    code, _, err = run(capsys, "sweep", "--data", "digits", "--num-samples", 8, "--prune", "--out", tmp_path)
    assert code == 2 and "stub reached" in err
    assert list(seen["args"][2]) == [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]


def test_sweep_help_says_how_to_widen_the_pruning_side(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0.7,0.5 with --granularity, widen it with e.g. --keep-rates" in text
    assert "shannon,evit,tome,entropy-merge with --granularity, widen it with e.g. --methods" in text


def test_random_weights_warning_comes_before_finetune_trains(monkeypatch, image_folder, tmp_path, capsys):
    seen = {}

    def finetune(*args, **kwargs):
        seen["err"] = capsys.readouterr().err  # what the user has seen when training starts
        raise EamError("stub reached")
    monkeypatch.setattr("eamvit.methods.finetune.finetune", finetune)
    code, _, err = run(capsys, "finetune", *MODEL, "--data", image_folder, "--epochs", 1, "--out", tmp_path / "ft")
    assert code == 2 and err.strip().splitlines()[-1] == "eamvit: error: stub reached"
    assert "eamvit: warning: deit_tiny_patch16_224 has random weights" in seen["err"]


def test_random_weights_warning_comes_before_eval_results(image_folder, capsys, monkeypatch):
    seen = {}
    import eamvit.methods.evaluate as ev

    real = ev.evaluate

    def evaluate(*args, **kwargs):
        seen.setdefault("err", capsys.readouterr().err)
        return real(*args, **kwargs)
    monkeypatch.setattr(ev, "evaluate", evaluate)
    code, out, err = run(capsys, "eval", *MODEL, "--data", image_folder)
    assert code == 0
    assert "eamvit: warning: deit_tiny_patch16_224 has random weights" in seen["err"]
    assert "warning" not in err  # printed once, not again at the end


def test_short_export_table_is_fp32_and_eamvit_int8():
    from eamvit.experiments.digits import load_demo_model
    from eamvit.experiments.export_table import export_table
    from eamvit.methods.data import DigitsDataset
    from eamvit.methods.evaluate import evaluate

    model = load_demo_model()
    rows = export_table(model, reps=3, short=True)
    assert [(r["label"], r["runtime"]) for r in rows] == [
        ("fp32", "PyTorch"), ("fp32", "ONNX Runtime"), ("eamvit RepQ-ViT W8/A8 (simulated)", "PyTorch"),
        ("eamvit RepQ-ViT W8/A8 (QDQ export)", "ONNX Runtime")]
    reference = evaluate(model, DigitsDataset("test"), progress=False)["top1"]  # the model as PyTorch runs it
    assert rows[0]["top1"] == pytest.approx(reference, abs=1e-3)
    assert abs(rows[1]["top1"] - reference) <= 100 / 360 + 1e-6  # ONNX Runtime's fp32: at most one digit apart
    assert all(r["file_bytes"] > 0 and r["images_per_s"] > 0 for r in rows)
