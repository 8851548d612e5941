"""A step that nobody in eamvit knows: one config and one handler, registered here, go through the
recipe, its file, loading and the ONNX export without any other file knowing of them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.methods.export import export_onnx
from eamvit.methods.prune import PruneConfig
from eamvit.methods.recipe import Recipe, apply_, load, read_recipe, recipe_of, save_compressed
from eamvit.methods.steps import StepHandler, register_step

from conftest import TINY_VIT, make


@dataclass(frozen=True)
class HeadScale(Config):
    """Scales the classifier's logits by per-class factors drawn from ``seed`` (the toy step)."""

    seed: int = 0
    KIND = "toy-head-scale"


def _apply(model, config, inputs):
    factors = torch.rand(model.head.out_features, generator=torch.Generator().manual_seed(config.seed)) + 0.5
    with torch.no_grad():
        model.head.weight.mul_(factors[:, None])
        model.head.bias.mul_(factors)
    model.head.register_buffer("toy_factors", factors)
    return {"factors": factors.tolist()}


def _content(model, config):
    return {"factors": model.head.toy_factors.clone()}, {"classes": model.head.out_features}


def _restore(model, config, meta, tensors, path):
    factors = tensors["factors"]
    if meta.get("classes") != model.head.out_features or factors.shape != (model.head.out_features,):
        raise EamError(f"{path}: the toy step does not fit this head")
    with torch.no_grad():
        model.head.weight.mul_(factors[:, None])
        model.head.bias.mul_(factors)
    model.head.register_buffer("toy_factors", factors.clone())


@pytest.fixture(autouse=True)
def toy_step():
    """The toy step is registered for this file's tests only."""
    from eamvit.methods.steps import _STEPS

    register_step(HeadScale, StepHandler(stage="toy", order=40, apply=_apply, restore=_restore, content=_content))
    yield
    _STEPS.pop(HeadScale)


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def test_a_registered_step_goes_through_recipe_file_load_and_export(tmp_path):
    reference = make(TINY_VIT)  # the same weights, scaled by hand
    factors = torch.rand(3, generator=torch.Generator().manual_seed(7)) + 0.5
    want = reference(X) * factors

    model = make(TINY_VIT)
    recipe = Recipe(steps=(HeadScale(seed=7),))
    apply_(model, recipe, None)
    torch.testing.assert_close(model(X), want, rtol=1e-5, atol=1e-5)
    assert recipe_of(model) == recipe

    path = save_compressed(model, tmp_path / "toy.safetensors", recipe)
    assert read_recipe(path) == recipe
    loaded = load(path, make(TINY_VIT))
    assert torch.equal(loaded(X), model(X))

    onnx = export_onnx(loaded, tmp_path / "toy.onnx").path
    import onnxruntime as ort

    got = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(None, {"images": X.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_a_registered_step_orders_itself_after_pruning():
    with pytest.raises(EamError, match="order"):
        Recipe(steps=(HeadScale(), PruneConfig(keep_rate=0.7)))
    Recipe(steps=(PruneConfig(keep_rate=0.7), HeadScale()))


def test_a_second_step_of_the_same_kind_is_refused():
    @dataclass(frozen=True)
    class Impostor(Config):
        KIND = "toy-head-scale"

    with pytest.raises(EamError, match="registered already"):
        register_step(Impostor, StepHandler(stage="impostor", order=50, apply=_apply, restore=_restore))
