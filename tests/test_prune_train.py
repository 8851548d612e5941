"""The one training loop from the command line: deterministic fine-tuning on an ImageFolder,
augmentation that fits the input, preprocessing overrides, --num-samples, bad input, train-digits --out."""
from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from eamvit.cli.main import main
from eamvit.methods.train import resolve_augment

from conftest import single_thread

M = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=16", "patch_size=2", "in_chans=1",
     "num_classes=2", "embed_dim=32", "depth=4", "num_heads=2"]


one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of six 20x20 grayscale images (bright square top-left or bottom-right, with noise)."""
    root = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for c in range(2):
        (root / f"c{c}").mkdir()
        for i in range(6):
            a = (torch.rand(20, 20, generator=g) * 60).to(torch.uint8)
            sl = slice(2, 10) if c == 0 else slice(10, 18)
            a[sl, sl] = 220
            Image.fromarray(a.numpy(), mode="L").save(root / f"c{c}" / f"{i}.png")
    return root


def _weights(out):
    from safetensors import safe_open

    with safe_open(str(out / "finetuned.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["eamvit"])


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Fixed starting weights (a model without a checkpoint is initialised from the global generator)."""
    import eamvit

    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=2, in_chans=1, num_classes=2, embed_dim=32, depth=4, num_heads=2)
    path = tmp_path_factory.mktemp("ckpt") / "start.pth"
    torch.save(eamvit.create_model("vit_tiny_patch16_224", model_kwargs=kw).state_dict(), path)
    return path


def _finetune(folder, out, *extra):
    args = ["finetune", *M, "--data", str(folder), "--epochs", "1", "--lr", "1e-3", "--batch-size", "4",
            "--keep-rate", "0.5", "--seed", "3", "--no-resume", "--out", str(out), *extra]
    assert main(args) == 0
    return _weights(out)


def test_finetune_on_an_image_folder_is_deterministic(folder, start, tmp_path):
    # imagenet augmentation draws its crops from Python's random module, which nothing seeded before.
    random.seed(1)  # whatever state the caller left must not matter
    a, _ = _finetune(folder, tmp_path / "a", "--augment", "imagenet", "--checkpoint", str(start))
    random.seed(2)
    torch.manual_seed(2)
    b, _ = _finetune(folder, tmp_path / "b", "--augment", "imagenet", "--checkpoint", str(start))
    c, _ = _finetune(folder, tmp_path / "c", "--augment", "imagenet", "--checkpoint", str(start), "--workers", "1")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], c[k]) for k in a)  # one worker process draws the same augmentation
    d, _ = _finetune(folder, tmp_path / "d", "--augment", "imagenet", "--checkpoint", str(start), "--seed", "4")
    assert not all(torch.equal(a[k], d[k]) for k in a)


def test_preprocessing_overrides_and_num_samples_reach_training(folder, tmp_path, capsys):
    _, meta = _finetune(folder, tmp_path / "a", "--augment", "none", "--crop-pct", "0.5", "--num-samples", "5")
    assert meta["data_config"]["crop_pct"] == 0.5 and meta["data_config"]["input_size"] == [1, 16, 16]
    assert "on 5 images" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "finetune.json").read_text())["images"] == 5


def test_training_transform_follows_the_crop(folder):
    from eamvit.methods.data import build_dataset
    from eamvit.methods.train import train_dataset

    cfg = {"input_size": (1, 16, 16), "interpolation": "bilinear", "mean": (0.5,), "std": (0.5,), "crop_pct": 0.5,
           "crop_mode": "center"}
    x = train_dataset(str(folder), cfg, augment="none")[0][0]
    assert torch.equal(x, build_dataset(str(folder), cfg)[0][0])  # the evaluation preprocessing, crop included
    assert not torch.equal(x, train_dataset(str(folder), {**cfg, "crop_pct": 1.0}, augment="none")[0][0])
    # shift: the same image rolled by at most 2 pixels (1/8 of 16) along each axis
    torch.manual_seed(0)
    y = train_dataset(str(folder), cfg, augment="shift")[0][0]
    assert any(torch.equal(y, torch.roll(x, (dy, dx), (1, 2))) for dy in range(-2, 3) for dx in range(-2, 3))


def test_auto_augmentation_fits_the_input():
    assert resolve_augment("auto", (1, 16, 16)) == "shift"
    assert resolve_augment("auto", (3, 32, 32)) == "shift"
    assert resolve_augment("auto", (3, 224, 224)) == "imagenet"
    assert resolve_augment("none", (3, 224, 224)) == "none"


@pytest.mark.parametrize("extra,msg", [
    (["--augment", "imagenet"], "--augment imagenet needs an image folder"),
    (["--crop-pct", "0.9"], "--crop-pct cannot change the digits' preprocessing"),
    (["--mean", "0.3", "--std", "0.4"], "--mean, --std cannot change"),
    (["--workers", "-1"], "--workers must be 0 or more"),
    (["--epochs", "0"], "epochs must be a whole number"),
    (["--warmup-lr", "nan"], "warmup_lr=nan"),
    (["--grad-clip", "0"], "grad_clip=0.0 must be positive"),
    (["--num-samples", "5000"], "asked for 5000 images but only 1437"),
])
def test_bad_finetune_input_is_one_line_exit_2(extra, msg, capsys, tmp_path):
    assert main(["finetune", *M, "--epochs", "1", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and err.count("\n") == 0 and err.startswith("eamvit: error:")
    assert not (tmp_path / "o" / "finetuned.safetensors").exists()


@pytest.mark.parametrize("where", ["dir", "under_file", "read_only"])
def test_train_digits_refuses_an_unwritable_out_before_training(where, tmp_path, capsys, monkeypatch):
    import eamvit.experiments.digits as digits

    monkeypatch.setattr(digits, "train", lambda *a, **k: pytest.fail("trained before checking --out"))
    (tmp_path / "file").write_text("x")
    out = {"dir": tmp_path, "under_file": tmp_path / "file" / "m.safetensors", "read_only": tmp_path / "ro.st"}[where]
    if where == "read_only":
        out.write_text("keep")
        # root may write anywhere; the check asks the OS, so emulate a read-only file for it
        import eamvit.io

        monkeypatch.setattr(eamvit.io.os, "access", lambda p, mode: str(p) != str(out))
    assert main(["train-digits", "--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eamvit: error: --out") and err.count("\n") == 0
    assert (tmp_path / "file").read_text() == "x"


def test_train_digits_default_out_is_the_current_folder():
    from eamvit.cli.main import build_parser

    args = build_parser().parse_args(["train-digits"])
    assert args.out == "digits_vit.safetensors"


@pytest.mark.parametrize("kw,msg", [(dict(opt="nope"), "timm has no optimizer 'nope'"),
                                    (dict(sched="nope"), "timm scheduler 'nope' is unknown"),
                                    (dict(sched="plateau"), "cannot be stepped per iteration")])
def test_unknown_optimizer_or_scheduler_is_one_line(kw, msg):
    from eamvit.errors import EamError
    from eamvit.methods.train import TrainConfig, train

    data = [(torch.zeros(3), 0), (torch.ones(3), 1)]
    with pytest.raises(EamError, match=msg) as e:
        train(torch.nn.Linear(3, 2), data, TrainConfig(epochs=1, batch_size=2, **kw), progress=False)
    assert "\n" not in str(e.value)
