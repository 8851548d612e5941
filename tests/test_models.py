"""Checkpoints: formats, wrappers, and every way they can be wrong."""
import pytest
import torch
from safetensors.torch import save_file

import eamvit
from eamvit.errors import EamError
from eamvit.methods.models import data_config

from conftest import TINY_VIT, make
from eamvit.methods.state import state_of

NAME, KW = TINY_VIT


@pytest.fixture
def state(tmp_path):
    model = make(TINY_VIT, seed=5)
    return model.state_dict()


def _same(model, sd):
    return all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module-prefix"])
def test_pth_wrappers_load(tmp_path, state, wrap):
    obj = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
           "model": {"model": state, "optimizer": {}}, "module-prefix": {f"module.{k}": v for k, v in state.items()}}[wrap]
    torch.save(obj, tmp_path / "w.pth")
    model = eamvit.create_model(NAME, model_kwargs=KW, checkpoint=tmp_path / "w.pth")
    assert _same(model, state)
    assert len(state_of(model).spec.checkpoint_sha256) == 64


def test_safetensors_loads(tmp_path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    model = eamvit.create_model(NAME, model_kwargs=KW, checkpoint=tmp_path / "w.safetensors")
    assert _same(model, state)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(EamError, match="does not exist"):
        eamvit.create_model(NAME, model_kwargs=KW, checkpoint=tmp_path / "nope.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_checkpoint(tmp_path, suffix):
    p = tmp_path / f"bad{suffix}"
    p.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(EamError, match="corrupt"):
        eamvit.create_model(NAME, model_kwargs=KW, checkpoint=p)


class Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_not_executed(tmp_path, capsys):
    torch.save({"state_dict": {}, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(EamError, match="pickled"):
        eamvit.create_model(NAME, model_kwargs=KW, checkpoint=tmp_path / "evil.pth")
    assert "pickled code ran" not in capsys.readouterr().out


def test_shape_mismatch_names_the_key(tmp_path, state):
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(EamError, match=r"head.weight: checkpoint \(3, 32\) vs model \(5, 32\)"):
        eamvit.create_model(NAME, model_kwargs={**KW, "num_classes": 5}, checkpoint=tmp_path / "w.pth")


def test_missing_keys(tmp_path, state):
    state.pop("head.bias")
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(EamError, match="1 missing key"):
        eamvit.create_model(NAME, model_kwargs=KW, checkpoint=tmp_path / "w.pth")


def test_pretrained_without_cache_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(EamError, match="no cached pretrained weights.*expected in"):
        eamvit.create_model("deit_tiny_patch16_224", pretrained=True)


def test_data_config_follows_overridden_model():
    model = eamvit.create_model("vit_tiny_patch16_224", model_kwargs=dict(img_size=16, patch_size=2, in_chans=1))
    cfg = data_config(model, {"crop_pct": 1.0})
    assert cfg["input_size"] == (1, 16, 16)
    assert len(cfg["mean"]) == 1 and cfg["crop_pct"] == 1.0
    full = data_config(eamvit.create_model("deit_tiny_patch16_224"))
    assert full["input_size"] == (3, 224, 224) and full["interpolation"] == "bicubic"


# --- preprocessing follows the checkpoint -------------------------------------------------------

def test_checkpoint_carries_its_data_config(tmp_path):
    """A checkpoint written by save_checkpoint brings its preprocessing; the dataset applies exactly
    it (compared with a hand computation), and an option overrides it and says so."""
    import numpy as np
    from PIL import Image

    model = make(TINY_VIT)
    trained = {"input_size": (3, 32, 32), "mean": (0.3, 0.3, 0.3), "std": (0.4, 0.4, 0.4), "crop_pct": 1.0,
               "crop_mode": "center", "interpolation": "bilinear"}
    eamvit.save_checkpoint(model, tmp_path / "w.safetensors", trained)
    loaded = eamvit.create_model(NAME, model_kwargs=KW, checkpoint=tmp_path / "w.safetensors")
    cfg = data_config(loaded)
    assert cfg["source"] == "checkpoint" and cfg["mean"] == (0.3,) * 3 and cfg["crop_pct"] == 1.0
    assert _same(loaded, model.state_dict())

    arr = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / "imgs" / "a" / "0.png")
    x, _ = eamvit.build_dataset(str(tmp_path / "imgs"), cfg)[0]
    hand = (torch.tensor(arr, dtype=torch.float32).permute(2, 0, 1) / 255 - 0.3) / 0.4  # 32 -> 32: no resize
    assert torch.allclose(x, hand, atol=1e-6)

    over = data_config(loaded, {"mean": [0.5], "crop_pct": 0.9})
    assert over["source"] == "overrides" and over["mean"] == (0.5,) * 3 and over["std"] == (0.4,) * 3
    plain = eamvit.create_model(NAME, model_kwargs=KW)
    from timm.data import resolve_data_config

    assert data_config(plain)["source"] == "timm"
    assert data_config(plain)["crop_pct"] == resolve_data_config({}, model=plain)["crop_pct"]  # deit's own


def test_bundled_model_config_is_its_training_recipe():
    """The bundled digits ViT: created by name, trained on bilinear-upsampled, uncropped digits at 0.5/0.5."""
    from safetensors import safe_open

    from eamvit.experiments.digits import DEMO_KWARGS, DEMO_MODEL
    from eamvit.methods.models import BUNDLED_ASSET, BUNDLED_CONFIG

    model = eamvit.create_model(eamvit.BUNDLED_MODEL)
    spec = state_of(model).spec
    assert (spec.name, spec.model_kwargs, spec.weights) == (DEMO_MODEL, DEMO_KWARGS, "checkpoint")
    cfg = data_config(model)
    assert cfg == {"input_size": (1, 16, 16), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
                   "mean": (0.5,), "std": (0.5,), "source": "checkpoint"}
    assert json_load(BUNDLED_CONFIG)["model_kwargs"] == DEMO_KWARGS
    from eamvit.methods.data import digits_data_config

    assert {**digits_data_config(16), "source": "checkpoint"} == cfg  # the recipe train_digits trains with
    with safe_open(str(BUNDLED_ASSET), framework="pt") as f:  # the weights file is the one that was trained
        assert f.metadata()["test_top1"] == "98.89"


def json_load(path):
    import json

    return json.loads(path.read_text())


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay", "pretrained_cfg", "pretrained"])
def test_weight_loading_kwargs_are_refused(tmp_path, state, key):
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(EamError, match=f"{key} would load weights.*--checkpoint"):
        eamvit.create_model(NAME, model_kwargs={**KW, key: str(tmp_path / "w.pth")})


def test_img_size_is_validated_against_the_model():
    model = make(TINY_VIT)  # 32 px, patch 8, fixed size
    assert data_config(model, {"img_size": 32})["input_size"] == (3, 32, 32)
    for size, msg in ((0, "positive"), (36, "multiple of the model's patch size 8"), (64, "takes 32x32 images only")):
        with pytest.raises(EamError, match=msg):
            data_config(model, {"img_size": size})
    dyn = eamvit.create_model(NAME, model_kwargs={**KW, "dynamic_img_size": True})
    assert data_config(dyn, {"img_size": 64})["input_size"] == (3, 64, 64)


def test_weights_kind(tmp_path, state):
    torch.save(state, tmp_path / "w.pth")
    assert state_of(make(TINY_VIT)).spec.weights == "random"
    assert state_of(eamvit.create_model(NAME, model_kwargs=KW, checkpoint=tmp_path / "w.pth")).spec.weights == "checkpoint"


def test_families_page_is_what_eamvit_models_writes(tmp_path, capsys):
    """docs/families.md is written by `eamvit models --write`: it must not drift from the adapters."""
    from pathlib import Path

    from eamvit.cli.main import main

    assert main(["models"]) == 0
    table = capsys.readouterr().out.strip()
    assert main(["models", "--write", str(tmp_path / "families.md")]) == 0
    page = (Path(__file__).resolve().parents[1] / "docs" / "families.md").read_text()
    assert table.startswith("| family |") and table in page
    assert (tmp_path / "families.md").read_text() == page, \
        "docs/families.md is stale: run `eamvit models --write docs/families.md`"
