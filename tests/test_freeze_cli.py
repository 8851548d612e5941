"""`eval --granularity` and `eval --frozen` on a tiny ImageFolder; one-line errors."""
import torch

import eamvit
from eamvit.methods.freeze import FreezeConfig, freeze_, save_frozen

from conftest import make, MODEL, run, TINY_VIT, write_image_folder


def row_of(out):
    line = [l for l in out.splitlines() if l.startswith("model=")][-1]
    return dict(kv.split("=", 1) for kv in line.split())


def test_eval_granularity_and_frozen_file(tmp_path, image_folder, capsys):
    ckpt = tmp_path / "tiny.pth"
    model = make(TINY_VIT)
    torch.save(model.state_dict(), ckpt)
    maps = tmp_path / "maps.safetensors"
    calib = write_image_folder(tmp_path / "calib", seed=1)  # evaluation never scores the maps' own images
    code, _, _ = run(capsys, "calibrate", *MODEL, "--checkpoint", ckpt, "--data", calib, "--out", maps)
    assert code == 0
    code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder, "--maps", maps,
                         "--tau", "0.5", "--granularity", "head")
    assert code == 0, err
    direct = row_of(out)
    assert direct["granularity"] == "head" and direct["scope"] == "layer" and float(direct["frozen_fraction"]) == 0.5
    assert float(direct["predicted_speedup"]) > 1
    # The same freeze saved to a file and loaded by eval gives the same accuracy.
    loaded = eamvit.create_model(TINY_VIT[0], checkpoint=str(ckpt), model_kwargs=dict(TINY_VIT[1]))
    cfg = FreezeConfig(tau=0.5, granularity="head")
    freeze_(loaded, eamvit.EntropyMaps.load(maps), cfg)
    save_frozen(loaded, tmp_path / "frozen.safetensors", cfg)
    code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", ckpt, "--data", image_folder,
                         "--frozen", tmp_path / "frozen.safetensors")
    assert code == 0, err
    assert row_of(out)["top1"] == direct["top1"]


def test_eval_bad_granularity_options(tmp_path, image_folder, capsys):
    code, _, err = run(capsys, "eval", *MODEL, "--data", image_folder, "--tau", "0.5", "--granularity", "row",
                       "--scope", "head")
    assert code == 2 and err.strip().splitlines()[-1].startswith("eamvit: error: scope 'head' does not apply")
    code, _, err = run(capsys, "eval", *MODEL, "--data", image_folder, "--frozen", tmp_path / "none.safetensors")
    assert code == 2 and "frozen attention" in err.strip().splitlines()[-1]
