"""`eamvit quantize`, `eval --quant`, `sweep --quant` and their bad inputs (one line, exit 2)."""
import json

import pytest
import torch


from conftest import make, MODEL, run, TINY_VIT, write_image_folder

Q = ["--quant-calib-size", "4"]


def one_line_error(code, err, *needles):
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("eamvit: error:")
    for n in needles:
        assert n in last, last


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(make(TINY_VIT).state_dict(), path)
    return str(path)


def test_quantize_then_eval_from_state(tmp_path, image_folder, ckpt, capsys):
    state = tmp_path / "q.safetensors"
    # Another folder: evaluation then reads all of --data in both runs.
    cal = ["--calib-data", write_image_folder(tmp_path / "calib", seed=1)]
    code, out, err = run(capsys, "quantize", *MODEL, "--checkpoint", ckpt, "--data", image_folder, *cal, *Q,
                         "--out", state)
    assert code == 0, err
    assert state.is_file() and "W4/A4" in out
    code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder,
                         "--quant-state", state, "--out", tmp_path / "a")
    assert code == 0, err
    code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder, *cal,
                         "--quant", "repq", *Q, "--out", tmp_path / "b")
    assert code == 0, err
    a = json.loads((tmp_path / "a.json").read_text())[0]
    b = json.loads((tmp_path / "b.json").read_text())[0]
    assert a["quant"] == "repq" and a["w_bits"] == 4
    assert a["top1"] == b["top1"]  # same seed, same calibration images, same quantized model
    # A state for another model (no checkpoint: other weights) is refused.
    code, out, err = run(capsys, "eval", *MODEL, "--data", image_folder, "--quant-state", state)
    one_line_error(code, err, "was made for")


def test_eval_quant_with_frozen_4bit_values(tmp_path, image_folder, ckpt, capsys):
    code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder, "--quant", "repq", *Q,
                         "--w-bits", "6", "--a-bits", "5", "--tau", "0.3", "--value-bits", "5",
                         "--value-quantizer", "logsqrt2", "--bits", "4", "--out", tmp_path / "r")
    assert code == 0, err
    row = json.loads((tmp_path / "r.json").read_text())[0]
    assert row["w_bits"] == 6 and row["a_bits"] == 5 and row["frozen_fraction"] == pytest.approx(0.3, abs=0.01)


def test_sweep_quant_writes_everything(tmp_path, image_folder, ckpt, capsys):
    out_dir = tmp_path / "sw"
    code, out, err = run(capsys, "sweep", *MODEL, "--checkpoint", ckpt, "--data", image_folder, "--quant", "repq",
                         *Q, "--taus", "0,0.2", "--seeds", "1", "--bits", "4", "--out", out_dir)
    assert code == 0, err
    for f in ("sweep.csv", "sweep.json", "sweep.png", "table1.md", "sizes.md", "kl_per_head.csv",
              "kl_per_head.png", "kl_cls_L0.png"):
        assert (out_dir / f).is_file(), f
    rows = json.loads((out_dir / "sweep.json").read_text())
    assert {(r["quant"], r["selection"]) for r in rows} == {("fp", None), ("repq", None), ("repq", "entropy"),
                                                            ("repq", "random")}
    assert "RepQ-ViT" in (out_dir / "table1.md").read_text()


@pytest.mark.parametrize("args,needle", [
    (["quantize", "--w-bits", "9"], "w_bits=9"),
    (["quantize", "--a-bits", "1"], "a_bits=1"),
    (["quantize", "--quant-calib-size", "500"], "calibration needs 500 images"),
    (["eval", "--quant", "repq", "--a-bits", "12"], "a_bits=12"),
    (["eval", "--quant-state", "missing.safetensors"], "does not exist"),
    (["sweep", "--quant", "repq", "--frozen-bits", "1"], "--frozen-bits=1"),
])
def test_bad_quant_input(tmp_path, image_folder, capsys, args, needle):
    cmd, rest = args[0], args[1:]
    extra = ["--out", tmp_path / "x.safetensors"] if cmd == "quantize" else []
    code, out, err = run(capsys, cmd, *MODEL, "--data", image_folder, *rest, *extra)
    one_line_error(code, err, needle)


@pytest.mark.parametrize("method,extra", [
    ("adfq", ["--adfq-calib-size", "4", "--adfq-iterations", "2"]),
    ("pmq", ["--pmq-config", "4/8/4(MP)"]),
])
def test_quantize_any_method_then_eval_from_state(tmp_path, image_folder, ckpt, capsys, method, extra):
    state = tmp_path / f"{method}.safetensors"
    cal = ["--calib-data", write_image_folder(tmp_path / "calib", seed=1)] + (Q if method == "pmq" else [])
    code, out, err = run(capsys, "quantize", *MODEL, "--checkpoint", ckpt, "--data", image_folder, *cal,
                         "--method", method, *extra, "--out", state)
    assert code == 0, err
    assert state.is_file() and "bytes" in out
    code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder,
                         "--quant-state", state, "--out", tmp_path / "a")
    assert code == 0, err
    code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder, *cal,
                         "--quant", method, *extra, "--out", tmp_path / "b")
    assert code == 0, err
    a = json.loads((tmp_path / "a.json").read_text())[0]
    b = json.loads((tmp_path / "b.json").read_text())[0]
    assert a["quant"] == b["quant"] == method
    assert a["top1"] == b["top1"]  # the saved state is the model calibrated in the second run


def test_sweep_quant_state_rows_say_the_state_bits(tmp_path, image_folder, ckpt, capsys):
    """Rows of `sweep --quant-state` carry the bits of the saved state, not the W4/A4 defaults."""
    state = tmp_path / "q6.safetensors"
    cal = ["--calib-data", write_image_folder(tmp_path / "calib", seed=1)]
    code, out, err = run(capsys, "quantize", *MODEL, "--checkpoint", ckpt, "--data", image_folder, *cal, *Q,
                         "--w-bits", "6", "--a-bits", "6", "--out", state)
    assert code == 0, err
    code, out, err = run(capsys, "sweep", *MODEL, "--checkpoint", ckpt, "--data", image_folder, *cal,
                         "--quant-state", state, "--taus", "0", "--seeds", "1",
                         "--out", tmp_path / "s")
    assert code == 0, err
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())
    quantized = [r for r in rows if r["quant"] != "fp"]
    assert quantized and all(r["bits"] == "6/6" for r in quantized)
    assert {r["value_bits"] for r in quantized} >= {6}  # frozen values default to the state's a_bits


def test_export_qdq_refuses_low_bit_activations_before_calibrating(tmp_path, image_folder, ckpt, capsys):
    code, out, err = run(capsys, "export", *MODEL, "--checkpoint", ckpt, "--data", image_folder,
                         "--quant", "repq", "--a-bits", "4", "--out", tmp_path / "m.onnx")
    one_line_error(code, err, "--a-bits 4", "8-bit activations")
    assert "calibration" not in err and not (tmp_path / "m.onnx").exists()
