"""Files written by eamvit 0.3 load to the logits of the models that were saved, and a model carries one
state object.

``fixtures/v0.3`` holds a quantized state, entropy maps, frozen attention and a compressed model of a
tiny DeiT, written by eamvit 0.3 (commit c6bf01e) with ``fixtures/v0.3/make_fixtures.py``, and the
logits each saved model gave on the stored inputs. They were computed on an AVX-512 machine: another
CPU sums floats in another order, so the comparison allows float rounding, not a changed model.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import eamvit
from eamvit.methods.calibrate import EntropyMaps
from eamvit.methods.freeze import FreezeConfig, freeze_, load_frozen
from eamvit.methods.prune import PruneConfig
from eamvit.methods.quantize import load_quantized
from eamvit.methods.recipe import Recipe, apply_, load
from eamvit.methods.repq import RepQConfig
from eamvit.methods.state import ModelState

from conftest import TINY_VIT, make

V03 = Path(__file__).parent / "fixtures" / "v0.3"
SAVED = load_file(V03 / "logits.safetensors")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_quantized_state_of_v03_loads_to_its_logits():
    model = load_quantized(make(TINY_VIT), V03 / "quant.safetensors")
    _close(model(SAVED["x"]), SAVED["quant"])


@torch.no_grad()
def test_frozen_file_of_v03_loads_to_its_logits():
    model = make(TINY_VIT)
    load_frozen(model, str(V03 / "frozen.safetensors"))
    _close(model(SAVED["x"]), SAVED["frozen"])


@torch.no_grad()
def test_maps_of_v03_freeze_as_they_did():
    model = make(TINY_VIT)
    freeze_(model, EntropyMaps.load(V03 / "maps.safetensors"), FreezeConfig(tau=0.3))
    _close(model(SAVED["x"]), SAVED["frozen"])


@torch.no_grad()
def test_compressed_model_of_v03_loads_to_its_logits():
    model = load(V03 / "compressed.safetensors", make(TINY_VIT))
    _close(model(SAVED["x"]), SAVED["compressed"])


@pytest.mark.parametrize("stack", ["fp", "quant+freeze+prune"])
def test_a_model_carries_one_eamvit_attribute(stack):
    model = make(TINY_VIT)
    if stack != "fp":
        calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        maps = eamvit.compute_entropy_maps(model, [(c, 0) for c in calib], batch_size=4, progress=False)
        apply_(model, Recipe(steps=(RepQConfig(w_bits=8, a_bits=8, calib_size=8), FreezeConfig(tau=0.2),
                                    PruneConfig(method="shannon", keep_rate=0.7))), calib, maps=maps)
    model(torch.randn(1, 3, 32, 32))
    assert [k for k in vars(model) if k.startswith("eam")] == ["eam_state"]
    assert isinstance(model.eam_state, ModelState)
