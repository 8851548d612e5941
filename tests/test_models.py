"""Checkpoints: formats, wrappers, and every way they can be wrong."""
import pytest
import torch
from safetensors.torch import save_file

import eamvit
from eamvit.errors import EamError
from eamvit.methods.models import data_config

from conftest import TINY_VIT, make

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
    assert len(model.eam_spec.checkpoint_sha256) == 64


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
