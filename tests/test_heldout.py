"""No image that calibrated an artifact is scored with it: quantized states, ONNX exports, maps.

Each command runs through the CLI on a folder of digit PNGs (the bundled 16 px digits ViT). Spies on
the calibration and evaluation functions give the files really used; the reference for what is
scored is the folder's own listing (os.walk) minus the files the calibration really received.
"""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import eamvit.methods.calibrate as calibrate_mod
import eamvit.methods.evaluate as evaluate_mod
import eamvit.methods.quantize as quantize_mod
from eamvit.cli.main import main
from eamvit.methods.export_runtime import read_onnx_meta

N = 40  # a held-out part takes min(512, N // 2) = 20 images


def write_digits(root, offset=0):
    """N 8x8 digit PNGs as root/<label>/<k>.png (k = 0..N-1; offset picks other images, same names)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for k in range(N):
        i = k + offset
        (root / str(d.target[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).save(root / str(d.target[i]) / f"{k}.png")
    return root


def listing(root):
    return {os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("heldout") / "png")


def rel(dataset, indices, root):
    """Relative paths of the items of an ImageFolder dataset (possibly a Subset) that ``indices`` pick."""
    while hasattr(dataset, "indices") and hasattr(dataset, "dataset"):  # torch Subset
        indices = [dataset.indices[i] for i in (indices if indices is not None else range(len(dataset)))]
        dataset = dataset.dataset
    idx = indices if indices is not None else range(len(dataset))
    return {os.path.relpath(dataset.folder.samples[i][0], root).replace(os.sep, "/") for i in idx}


@pytest.fixture
def spy(monkeypatch, tmp_path):
    """What each calibration received and each evaluation scored (and a folder for results rows)."""
    seen = {"calibrated": [], "scored": [], "tmp": tmp_path / "rows"}
    seen["tmp"].mkdir()

    def wrap(module, name, key, pick):
        real = getattr(module, name)

        def spy_fn(*args, **kwargs):
            seen[key].append(pick(*args, **kwargs))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, spy_fn)

    wrap(quantize_mod, "quantize_", "calibrated", lambda model, cfg, calib, **kw: calib)
    wrap(calibrate_mod, "compute_entropy_maps", "calibrated", lambda model, ds, indices=None, **kw: (ds, indices))
    wrap(evaluate_mod, "evaluate", "scored", lambda model, ds, indices=None, **kw: (ds, indices))
    return seen


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def state_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["eamvit"])


def recorded(meta):
    return {f for r in meta["calibration"] for f in r.get("files", {})}


def scored_by_eval(capsys, spy, root, *args):
    """(files scored, the results row, stderr) of one ``eval``."""
    spy["scored"].clear()
    stem = spy["tmp"] / f"row{len(list(spy['tmp'].iterdir()))}"
    out, err = run(capsys, "eval", "--data", root, *args, "--out", stem)
    (ds, idx), = spy["scored"]
    return rel(ds, idx, root), json.loads(stem.with_suffix(".json").read_text())[0], err


def test_quantized_state_and_its_exports_never_score_their_calibration_images(tmp_path, folder, spy, capsys):
    q = tmp_path / "q.safetensors"
    run(capsys, "quantize", "--method", "repq", "--w-bits", 8, "--a-bits", 8, "--quant-calib-size", 8,
        "--data", folder, "--out", q)
    held = rel(spy["calibrated"][-1], None, folder)
    assert len(held) == N // 2 and recorded(state_meta(q)) == held  # what calibrated it is what it records
    every = listing(folder)

    scored, r, err = scored_by_eval(capsys, spy, folder, "--quant-state", q)
    assert scored == every - held and (r["num_images"], r["calib_excluded"]) == (N // 2, N // 2)
    assert "calibration:" not in err and f"scoring skips the {N // 2} images" in err
    _, r_fly, _ = scored_by_eval(capsys, spy, folder, "--quant", "repq", "--w-bits", 8, "--a-bits", 8,
                                 "--quant-calib-size", 8)
    assert r_fly["num_images"] == N // 2

    int8 = tmp_path / "int8.onnx"
    run(capsys, "export", "--quant-state", q, "--data", folder, "--out", int8)
    assert read_onnx_meta(int8)["calibration"] == state_meta(q)["calibration"]  # carried forward
    scored, r, err = scored_by_eval(capsys, spy, folder, "--onnx", int8)
    assert scored == every - held and r["calib_excluded"] == N // 2
    assert "calibration:" not in err and r["data_config_source"] == "onnx export"

    fp32 = tmp_path / "fp32.onnx"
    run(capsys, "export", "--data", folder, "--out", fp32)
    scored, r, err = scored_by_eval(capsys, spy, folder, "--onnx", fp32)
    assert scored == every and r["calib_excluded"] == 0 and "calibration:" not in err and "skips" not in err
    _, r, _ = scored_by_eval(capsys, spy, folder, "--onnx", fp32, "--mean", 0.4)
    assert (r["data_config_source"], r["mean"]) == ("overrides", "0.4")

    fly = tmp_path / "fly.onnx"  # quantized inside export: its held-out part goes into the file
    spy["calibrated"].clear()
    run(capsys, "export", "--quant", "repq", "--quant-calib-size", 8, "--seed", 3, "--data", folder, "--out", fly)
    held_fly = rel(spy["calibrated"][-1], None, folder)
    assert len(held_fly) == N // 2 and held_fly != held
    scored, _, _ = scored_by_eval(capsys, spy, folder, "--onnx", fly)
    assert scored == every - held_fly


def test_maps_images_are_never_scored(tmp_path, folder, spy, capsys):
    maps = tmp_path / "m.safetensors"
    run(capsys, "calibrate", "--data", folder, "--calib-size", 10, "--bits", 4, "--out", maps)
    ds, idx = spy["calibrated"][-1]
    used = rel(ds, idx, folder)
    assert len(used) == 10 and recorded(state_meta(maps)) == used
    scored, r, err = scored_by_eval(capsys, spy, folder, "--maps", maps, "--tau", 0.2)
    assert scored == listing(folder) - used and r["calib_excluded"] == 10 and "calibration:" not in err
    # Freezing with the maps and exporting: the file records the maps' images too.
    frozen = tmp_path / "frozen.onnx"
    run(capsys, "export", "--maps", maps, "--tau", 0.2, "--data", folder, "--out", frozen)
    scored, _, _ = scored_by_eval(capsys, spy, folder, "--onnx", frozen)
    assert scored == listing(folder) - used


def test_calibrate_uses_all_of_data_by_default(tmp_path, folder, spy, capsys):
    out, err = run(capsys, "calibrate", "--data", folder, "--bits", 4, "--out", tmp_path / "all.safetensors")
    ds, idx = spy["calibrated"][-1]
    assert rel(ds, idx, folder) == listing(folder) and f"M={N} " in out
    assert f"calibration: {N} images from {folder} (default: all of them)" in err
    out, err = run(capsys, "calibrate", "--data", folder, "--calib-size", 7, "--bits", 4,
                   "--out", tmp_path / "seven.safetensors")
    ds, idx = spy["calibrated"][-1]
    assert len(rel(ds, idx, folder)) == 7 and "M=7 " in out and "(--calib-size)" in err


def test_a_copy_skips_the_same_files_and_another_folder_none(tmp_path, folder, spy, capsys):
    q = tmp_path / "q.safetensors"
    run(capsys, "quantize", "--method", "repq", "--quant-calib-size", 8, "--data", folder, "--out", q)
    held = recorded(state_meta(q))
    copy = shutil.copytree(folder, tmp_path / "copy")
    (copy / "0" / "extra.png").write_bytes((copy / "0" / next(iter(os.listdir(copy / "0")))).read_bytes())
    scored, _, _ = scored_by_eval(capsys, spy, copy, "--quant-state", q)
    assert scored == listing(copy) - held
    other = write_digits(tmp_path / "other", offset=N)  # the same file names, other images
    names = {f.split("/")[-1] for f in listing(other)}
    assert names == {f.split("/")[-1] for f in listing(folder)}
    scored, r, err = scored_by_eval(capsys, spy, other, "--quant-state", q)
    assert scored == listing(other) and r["calib_excluded"] == 0
    assert [l for l in err.splitlines() if "scoring skips nothing" in l] == [
        f"eamvit: {q} was calibrated on {folder}, none of them in {other}: scoring skips nothing"]


def test_maps_without_a_record_warn_and_a_bad_record_is_refused(tmp_path, folder, capsys):
    import eamvit

    maps = tmp_path / "m.safetensors"
    run(capsys, "calibrate", "--data", folder, "--calib-size", 4, "--bits", 4, "--out", maps)
    m = eamvit.EntropyMaps.load(maps)
    del m.meta["calibration"]  # as maps written before eamvit recorded their images
    m.save(tmp_path / "old.safetensors")
    out, err = run(capsys, "eval", "--data", folder, "--maps", tmp_path / "old.safetensors", "--tau", 0.2)
    assert "num_images=40" in out and "does not record the images that calibrated it" in err
    m.meta["calibration"] = [{"data": str(folder), "files": ["0/0.png"]}]  # a list, not {file: digest}
    m.save(tmp_path / "bad.safetensors")
    code = main([str(a) for a in ["eval", "--data", folder, "--maps", tmp_path / "bad.safetensors", "--tau", 0.2]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("eamvit: error:") and "malformed record" in err[-1]
