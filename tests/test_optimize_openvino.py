"""``eamvit optimize --runtime openvino``: points measured in OpenVINO, NNCF int8 alone and after eamvit's
float steps, and the shipped file scoring what the search reported.

The search's numbers are checked against the runtimes that execute the files: ``eamvit eval --onnx
FILE --runtime openvino`` scores the shipped file, ONNX Runtime the reference export, and PyTorch the
saved state. The tests of OpenVINO and NNCF are skipped where they are not installed; the refusal
without them is not.
"""
import shlex
import sys

import pytest
import torch

from conftest import run, single_thread  # noqa: F401  (fixture)
from eamvit.experiments.optimize_space import NncfInt8, combinations, single_candidates
from eamvit.methods.export import ExportConfig
from test_export_openvino import TOP1_BOUND
from test_optimize import FAST, _count_measures, _rows, _space, _top1

single_thread = pytest.fixture(autouse=True, scope="module")(single_thread)

# 64 calibration images: NNCF reads each one (alone) in each statistics pass; 300, its default, is slower.
OV = ["--runtime", "openvino", "--space", "small", "--threads", "1", "--calib-size", "64"]


def test_openvino_space_holds_nncf_alone_and_stacked_and_repq_for_openvino():
    singles = single_candidates(4, "openvino", "small")
    by = {c.label: c for c in singles}
    nncf, repq = by["nncf-int8"], by["repq-int8"]
    # NNCF acts on the fp32 export: no recipe step, an fp32 export, and its own cache identity.
    assert nncf.nncf and nncf.recipe.steps == () and nncf.export == ExportConfig()
    assert nncf.identity() != single_candidates(4, "onnxruntime", "small")[0].identity()
    assert nncf.identity()["nncf"] is True and "nncf" not in by["evit-k0.7@2,3"].identity()
    assert repq.recipe.target.form == "openvino" and repq.export.runtime == "openvino" and not repq.nncf
    assert repq.export.symmetric_weights and repq.export.symmetric_activations
    assert not any(c.nncf for c in single_candidates(4, "onnxruntime", "small"))
    # Every single within the budget: NNCF stacks on the float steps, each quantized after them.
    stacks = combinations([(c, True) for c in singles])
    nncf_stacks = [c for c in stacks if c.nncf]
    assert {c.label for c in nncf_stacks} == {"nncf-int8 + evit-k0.5@2,3", "nncf-int8 + head-t0.25",
                                             "nncf-int8 + head-t0.25 + evit-k0.5@2,3"}
    for c in nncf_stacks:
        assert c.recipe.step("quant") is None and c.recipe.target is None and c.export == ExportConfig()
        assert c.techniques == len(c.label.split(" + "))
    assert not any(isinstance(s, NncfInt8) for c in stacks for s in c.recipe.steps)


def _percent(logits, targets) -> float:
    return round(float((logits.argmax(1) == targets).double().mean()) * 100, 3)


def _shipped_top1(capsys, path) -> float:
    code, stdout, err = run(capsys, "eval", "--onnx", path, "--runtime", "openvino", "--data", "digits")
    assert code == 0, err
    return _top1(stdout)


def test_openvino_search_ships_the_file_it_measured(tmp_path, monkeypatch, capsys):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from eamvit.experiments.digits import load_demo_model
    from eamvit.methods.data import DigitsDataset
    from eamvit.methods.export import export_onnx
    from eamvit.methods.export_runtime import OnnxClassifier

    out = tmp_path / "o"
    _space(monkeypatch, ["nncf-int8"], "openvino")
    code, stdout, err = run(capsys, "optimize", *FAST, *OV, "--max-drop", "1", "--out", out)
    assert code == 0, err
    rows = _rows(out)
    assert [r["label"] for r in rows] == ["fp32", "nncf-int8"] and {r["runtime"] for r in rows} == {"OpenVINO"}
    ref, best = rows[0], rows[1]
    assert best["chosen"] and best["quant"] == "nncf" and best["stage"] == "single"
    # The reference is the fp32 export in OpenVINO: ONNX Runtime scores the same export alike.
    test = DigitsDataset("test")
    model = load_demo_model().eval()
    export_onnx(model, tmp_path / "fp32.onnx")
    logits = OnnxClassifier(tmp_path / "fp32.onnx", threads=1)(test.images)
    assert abs(ref["top1"] - _percent(logits, test.targets)) <= TOP1_BOUND
    # The shipped file is NNCF's IR, and OpenVINO scores it as the search reported.
    assert not (out / "best.onnx").exists()
    assert best["file_bytes"] == (out / "best.xml").stat().st_size + (out / "best.bin").stat().st_size
    report = (out / "report.md").read_text()
    check = next(shlex.split(l)[1:] for l in report.splitlines() if l.startswith("eamvit eval --onnx "))
    assert check[:3] == ["eval", "--onnx", str(out / "best.xml")] and check[-2:] == ["--runtime", "openvino"]
    code, stdout, err = run(capsys, *check)  # the report's check of the shipped file
    assert code == 0, err
    assert _top1(stdout) == pytest.approx(best["top1"], abs=1e-9)
    # best.safetensors is the float model before NNCF (here: the unmodified model), and the report says so.
    code, stdout, err = run(capsys, "eval", "--state", out / "best.safetensors", "--data", "digits")
    assert code == 0, err
    assert _top1(stdout) == pytest.approx(best["top1_torch"], abs=1e-9)
    with torch.no_grad():  # the unmodified model in PyTorch
        assert _percent(model(test.images), test.targets) == pytest.approx(best["top1_torch"], abs=1e-9)
    assert "OpenVINO" in report and "quantized to int8 by NNCF" in report and "before NNCF" in report

    # Pruning in PyTorch, then the fp32 export quantized by NNCF: the reference and NNCF alone come from the cache.
    _space(monkeypatch, ["nncf-int8", "evit-k0.7@2,3"], "openvino")
    calls = _count_measures(monkeypatch)
    code, stdout, err = run(capsys, "optimize", *FAST, *OV, "--max-drop", "1.5", "--out", out)
    assert code == 0, err
    assert calls == ["evit-k0.7@2,3", "nncf-int8 + evit-k0.7@2,3"]
    rows = _rows(out)
    stack = next(r for r in rows if r["label"] == "nncf-int8 + evit-k0.7@2,3")
    assert stack["quant"] == "nncf" and stack["prune"] == "evit" and stack["stage"] == "stack"
    best = next(r for r in rows if r["chosen"])
    shipped, other = ("best.xml", "best.onnx") if best["quant"] == "nncf" else ("best.onnx", "best.xml")
    assert not (out / other).exists()  # the earlier run's file would pass for this point's
    assert _shipped_top1(capsys, out / shipped) == pytest.approx(best["top1"], abs=1e-9)


@pytest.mark.parametrize("missing", ["openvino", "nncf"])
def test_openvino_runtime_without_the_extra_is_one_line(tmp_path, monkeypatch, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    out = tmp_path / "o"
    code, stdout, err = run(capsys, "optimize", "--data", "digits", "--runtime", "openvino", "--out", out)
    assert code == 2 and err.count("\n") == 1 and err.startswith("eamvit: error: eamvit optimize --runtime openvino")
    assert 'pip install "eamvit[openvino]"' in err and "Traceback" not in err
    assert not out.exists()
