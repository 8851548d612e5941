"""The command line on a tiny ImageFolder made here, and every bad input of the foundation issue."""
import json
import subprocess
import sys

import pytest
import torch


from conftest import make, MODEL, run, TINY_SWIN, TINY_VIT, write_image_folder


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(make(TINY_VIT).state_dict(), path)
    return str(path)


def assert_one_line_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("eamvit: error:")
    for n in needles:
        assert n in last, last


def test_calibrate_eval_sweep_plot(tmp_path, image_folder, ckpt, capsys):
    maps = tmp_path / "maps.safetensors"
    code, out, err = run(capsys, "calibrate", *MODEL, "--checkpoint", ckpt, "--data", image_folder,
                         "--calib-size", 7, "--bits", 6, "--out", maps)
    assert code == 0, err
    assert "M=7" in out and maps.exists()

    code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder, "--maps", maps,
                         "--tau", 0.3, "--out", tmp_path / "res")
    assert code == 0, err
    row = json.loads((tmp_path / "res.json").read_text())[0]
    assert row["num_images"] == 12 - 7 and row["model"] == TINY_VIT[0]  # the maps' 7 images are not scored
    assert row["calib_excluded"] == 7
    assert abs(row["frozen_fraction"] - 0.3) < 0.01
    assert (tmp_path / "res.csv").read_text().startswith("model,top1,top1_err,top5,top5_err")

    code, out, err = run(capsys, "sweep", *MODEL, "--checkpoint", ckpt, "--data", image_folder,
                         "--calib-size", 6, "--taus", "0,0.5", "--seeds", 2, "--out", tmp_path / "sw")
    assert code == 0, err
    rows = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [(r["tau"], r["selection"]) for r in rows] == [(0.0, "entropy"), (0.0, "random"),
                                                         (0.5, "entropy"), (0.5, "random")]
    assert rows[0]["top1"] == rows[1]["top1"]  # nothing frozen either way
    assert rows[3]["seeds"] == 2
    assert all(r["num_images"] == 6 for r in rows)  # the 6 calibration images are held out
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 1000
    assert "| τ |" in out

    code, out, err = run(capsys, "plot", "--maps", maps, "--layers", "0,1", "--pairs", "1,1", "--out",
                         tmp_path / "fig")
    assert code == 0, err
    assert {p.name for p in (tmp_path / "fig").iterdir()} == {
        "cls_entropy_L0.png", "cls_entropy_L1.png", "full_entropy.png", "head_entropy.png"}  # 0-based, as --layers


def test_swin_cli_reports_masked(tmp_path, image_folder, capsys):
    swin = ["--model", TINY_SWIN[0], "--model-kwargs", "img_size=32", "patch_size=2", "window_size=4",
            "embed_dim=16", "depths=(2,2)", "num_heads=(2,2)", "num_classes=3"]
    code, out, err = run(capsys, "eval", *swin, "--data", image_folder, "--calib-size", 4, "--tau", 0.5,
                         "--scope", "global")
    assert code == 0, err
    assert "frozen_window_masked=" in out


def test_unreadable_image_is_skipped_and_counted(tmp_path, image_folder, ckpt, capsys):
    (image_folder / "cat" / "broken.png").write_bytes(b"not a png")
    code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder)
    assert code == 0, err
    assert "skipped_images=1" in out and "num_images=12" in out
    code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder, "--strict-images")
    assert_one_line_error(code, err, "broken.png")


@pytest.mark.parametrize("case", ["unknown", "unsupported", "missing-ckpt", "corrupt-ckpt", "mismatch-ckpt",
                                  "empty-folder", "no-folder", "tau", "bits-low", "bits-high", "other-maps",
                                  "unwritable"])
def test_bad_input(case, tmp_path, image_folder, ckpt, capsys):
    out_file = tmp_path / "out" / "res"
    args = ["eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder, "--out", out_file]
    needle = []
    if case == "unknown":
        args[2] = "vit_nonexistent_model"
        needle = ["unknown timm model"]
    elif case == "unsupported":
        args = ["eval", "--model", "resnet18", "--data", image_folder, "--out", out_file]
        needle = ["ViT", "Swin"]
    elif case == "missing-ckpt":
        args[args.index(ckpt)] = tmp_path / "nope.pth"
        needle = ["does not exist"]
    elif case == "corrupt-ckpt":
        (tmp_path / "bad.pth").write_bytes(b"junk" * 10)
        args[args.index(ckpt)] = tmp_path / "bad.pth"
        needle = ["corrupt"]
    elif case == "mismatch-ckpt":
        args[args.index("num_classes=3")] = "num_classes=7"
        needle = ["shape mismatch", "head.weight"]
    elif case == "empty-folder":
        (tmp_path / "empty").mkdir()
        args[args.index(image_folder)] = tmp_path / "empty"
        needle = ["no class folders"]
    elif case == "no-folder":
        args[args.index(image_folder)] = tmp_path / "missing"
        needle = ["does not exist"]
    elif case == "tau":
        args += ["--tau", "1.5"]
        needle = ["[0, 1]"]
    elif case == "bits-low":
        args += ["--tau", "0.2", "--bits", "0"]
        needle = ["1..16"]
    elif case == "bits-high":
        args += ["--tau", "0.2", "--bits", "17"]
        needle = ["1..16"]
    elif case == "other-maps":
        maps = tmp_path / "swin.safetensors"
        swin = ["--model", TINY_SWIN[0], "--model-kwargs", "img_size=32", "patch_size=2", "window_size=4",
                "embed_dim=16", "depths=(2,2)", "num_heads=(2,2)", "num_classes=3"]
        assert run(capsys, "calibrate", *swin, "--data", image_folder, "--out", maps)[0] == 0
        args += ["--maps", maps, "--tau", "0.2"]
        needle = ["recompute"]
    elif case == "unwritable":
        (tmp_path / "afile").write_text("x")
        out_file = tmp_path / "afile" / "sub" / "res"
        args[args.index("--out") + 1] = out_file
        needle = ["is a file, not a folder"]
    code, out, err = run(capsys, *args)
    assert_one_line_error(code, err, *needle)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "eamvit.cli", "eval", "--model", "resnet18", "--data", "digits"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
    assert proc.stderr.startswith("eamvit: error: unsupported model")


def test_outputs_are_atomic_and_keep_normal_permissions(tmp_path):
    import os

    from eamvit.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def test_failed_write_leaves_nothing(tmp_path):
    from eamvit.io import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "maps.safetensors") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


# --- preprocessing, calibration sizes, weights: what the rows and messages say ------------------

def _digits_pngs(root):
    """The 360 held-out digits as 8x8 grayscale PNGs in an ImageFolder (as a user would export them)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    _, test = train_test_split(range(len(d.target)), test_size=0.2, random_state=0, stratify=d.target)
    for i in test:
        (root / str(d.target[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).save(root / str(d.target[i]) / f"{i}.png")
    return root


def test_bundled_model_on_an_image_folder_uses_its_own_preprocessing(tmp_path, capsys):
    """98.89 % was measured when the bundled model was trained (its file's metadata); an ImageFolder of
    the same digits reaches it with no preprocessing option, as --data digits does."""
    folder = _digits_pngs(tmp_path / "png")
    code, out, err = run(capsys, "eval", "--data", folder, "--batch-size", 360, "--out", tmp_path / "f")
    assert code == 0, err
    row = json.loads((tmp_path / "f.json").read_text())[0]
    assert (row["top1"], row["num_images"]) == (98.889, 360)
    assert (row["crop_pct"], row["interpolation"], row["mean"], row["data_config_source"], row["weights"]) == (
        1.0, "bilinear", "0.5", "checkpoint", "checkpoint")
    code, out, err = run(capsys, "eval", "--data", "digits", "--batch-size", 360, "--out", tmp_path / "d")
    row = json.loads((tmp_path / "d.json").read_text())[0]
    assert (row["top1"], row["interpolation"], row["crop_pct"], row["data_config_source"]) == (
        98.889, "bilinear", 1.0, "digits")


def test_digits_apply_mean_and_std():
    from eamvit.methods.data import DigitsDataset, build_splits

    model = eamvit_model()
    cfg = data_config_of(model, {"mean": [0.4], "std": [0.25]})
    sp = build_splits("digits", cfg, overrides={"mean": [0.4], "std": [0.25]}, calibrate=False)
    plain = DigitsDataset("test")  # (x - 0.5) / 0.5
    x01 = plain.images * 0.5 + 0.5
    assert torch.allclose(sp.eval_set.images, (x01 - 0.4) / 0.25, atol=1e-6)
    assert sp.data_config["source"] == "overrides" and sp.data_config["mean"] == (0.4,)


def eamvit_model():
    import eamvit

    return eamvit.create_model(eamvit.BUNDLED_MODEL)


def data_config_of(model, ov):
    import eamvit

    return eamvit.data_config(model, ov)


def test_one_calibration_rule_printed(tmp_path, image_folder, ckpt, capsys):
    """calibrate takes all of --calib-data, eval min(512, available) of it; eval without --calib-data
    holds out at most half of --data; each says so on stderr."""
    calib = write_image_folder(tmp_path / "calib", seed=1)
    code, out, err = run(capsys, "calibrate", *MODEL, "--checkpoint", ckpt, "--data", "unused",
                         "--calib-data", calib, "--bits", 4, "--out", tmp_path / "m.safetensors")
    assert code == 0, err
    assert "M=12" in out and f"calibration: 12 images from {calib} (default: all of them)" in err
    code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder,
                         "--calib-data", calib, "--tau", 0.2)
    assert code == 0, err
    assert f"calibration: 12 images from {calib} (default min(512, 12 available))" in err
    assert "num_images=12" in out and "calib_excluded=0" in out
    code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder, "--tau", 0.2)
    assert code == 0, err
    assert "calibration: 6 images from" in err and "held out" in err and "num_images=6" in out


def test_maps_carry_the_preprocessing_they_were_made_with(tmp_path, image_folder, ckpt, capsys):
    maps = tmp_path / "m.safetensors"
    calib = write_image_folder(tmp_path / "calib", seed=1)  # evaluation never scores the maps' own images
    assert run(capsys, "calibrate", *MODEL, "--checkpoint", ckpt, "--data", calib, "--crop-pct", 0.8,
               "--bits", 4, "--out", maps)[0] == 0
    code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder, "--maps", maps,
                         "--tau", 0.2)
    assert code == 0, err
    assert "crop_pct=0.8 " in out and "data_config_source=maps" in out


def test_random_weights_warn_once(image_folder, capsys):
    code, out, err = run(capsys, "eval", *MODEL, "--data", image_folder)
    assert code == 0, err
    assert [l for l in err.splitlines() if l.startswith("eamvit: warning:")] == [
        f"eamvit: warning: {TINY_VIT[0]} has random weights (no --checkpoint, no --pretrained); its results are "
        "meaningless and change from run to run"]
    assert "weights=random" in out


def test_quantized_state_carries_its_preprocessing(tmp_path, image_folder, ckpt, capsys):
    q = tmp_path / "q.safetensors"
    code, out, err = run(capsys, "quantize", *MODEL, "--checkpoint", ckpt, "--data", image_folder, "--crop-pct", 0.8,
                         "--quant-calib-size", 4, "--out", q)
    assert code == 0, err
    code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder, "--quant-state", q)
    assert code == 0, err
    assert "crop_pct=0.8 " in out and "data_config_source=quantized state" in out


def test_adfq_gets_its_calibration_images_by_default():
    """ADFQ-ViT reads 1024 images (its protocol); the default calibration set must hold them, not 512."""
    from eamvit.cli.main import build_parser
    from eamvit.cli.common import _calib_need
    from eamvit.methods.data import build_splits

    parser = build_parser()
    assert _calib_need(parser.parse_args(["eval", "--quant", "adfq"])) == 1024
    assert _calib_need(parser.parse_args(["eval", "--quant", "adfq", "--adfq-calib-size", "700"])) == 700
    assert _calib_need(parser.parse_args(["eval", "--quant", "repq"])) == 0
    assert _calib_need(parser.parse_args(["compare", "--methods", "repq,adfq"])) == 1024
    assert _calib_need(parser.parse_args(["compare", "--methods", "repq,pmq"])) == 0
    model = eamvit_model()
    sp = build_splits("digits", data_config_of(model, {}), calib_need=1024)
    assert len(sp.calib_indices) == 1024 and len(set(sp.calib_indices)) == 1024  # of 1437 training digits
    assert "min(1024, 1437 available)" in sp.calib_note
    sp = build_splits("digits", data_config_of(model, {}))
    assert len(sp.calib_indices) == 512


def _config_defaults() -> dict:
    """The defaults the configs give to options left out (the independent reference of the tests below)."""
    from eamvit.methods.freeze import FreezeConfig
    from eamvit.methods.merge import MergeConfig
    from eamvit.methods.prune import PruneConfig
    from eamvit.methods.repq import RepQConfig

    return {"keep_rate": PruneConfig().keep_rate, "alpha": PruneConfig().alpha, "placement": PruneConfig().placement,
            "tau": FreezeConfig().tau, "selection": FreezeConfig().selection, "merge_r": MergeConfig().r,
            "w_bits": RepQConfig().w_bits, "attn_quantizer": RepQConfig().attn_quantizer}


@pytest.mark.parametrize("argv,dest,why", [
    (["eval"], "keep_rate", "without --prune"),
    (["eval", "--prune", "shannon"], "alpha", "to --prune shannon"),
    (["eval"], "placement", "without --prune"),
    (["eval"], "selection", "without --tau or --maps"),
    (["eval", "--frozen", "frozen.safetensors"], "tau", "with --frozen"),
    (["eval"], "merge_r", "without --merge"),
    (["eval"], "w_bits", "without --quant"),
    (["eval", "--quant", "adfq"], "attn_quantizer", "to --quant adfq"),
    (["finetune", "--merge", "tome"], "keep_rate", "to --merge tome"),
])
def test_an_option_given_at_its_default_is_still_refused_where_it_cannot_apply(argv, dest, why, capsys):
    """Typing the default value is giving the option: it is refused as any other value would be."""
    value = _config_defaults()[dest]
    flag = "--" + dest.replace("_", "-")
    code, out, err = run(capsys, *argv, flag, value)
    assert_one_line_error(code, err, f"{flag} cannot apply {why}")


def test_export_a_bits_at_the_export_default_is_refused_for_weight_only(tmp_path, capsys):
    from eamvit.methods.quantize import default_bits

    code, out, err = run(capsys, "export", "--quant", "repq", "--target", "weight-only",
                         "--a-bits", default_bits(exported=True), "--out", tmp_path / "m.onnx")
    assert_one_line_error(code, err, "--a-bits cannot apply to --target weight-only")
    assert not (tmp_path / "m.onnx").exists()
