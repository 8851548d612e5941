"""ADFQ-ViT and PMQ on the further families, held against timm's own unmodified model.

The tiny seeded configs are those of tests/test_families.py. Both methods refine RepQ-ViT's surgery;
here each must run end to end on every family that declares it, reach every attention layer (the
reconstruction trains one unit per attention; AAS gives per-patch bits where a map is over one set
of tokens) and give finite logits that differ from timm's. The refusals are one line.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import models_rows
from eamvit.errors import EamError
from eamvit.methods.adfq import ADFQConfig
from eamvit.methods.pmq import PMQConfig
from eamvit.methods.quantize import load_quantized, quantize_, save_quantized
from eamvit.modules.attention import attention_layers
from eamvit.modules.quant_layers import PatchBitsQuantizer
from eamvit.modules.quantizers import Quantizer

from test_families import _pair
from test_families_quant import BATCHNORM, REPQ
from eamvit.methods.state import state_of

ADFQ = [f for f in REPQ if f != "swinv2"]
# Layers whose map is (H, N, N) over one set of tokens, by family: AAS gives them per-patch bits.
# Not: windows (Swin v2, Twins' local attention, TNT's inner attention, Hiera's mask units), fewer
# queries than keys or the reverse (class attention, CrossViT's cross attention, MViTv2's first stage
# pools its keys 4×, Twins' global attention sub-samples them 8×), XCiT's channel attention. MViTv2's
# second stage pools queries and keys alike; VOLO's one Attention is square, its outlooker unmapped.
AAS_LAYERS = {"beit": 2, "cait": 2, "convit": 2, "crossvit": 2, "eva02": 2, "hiera": 0, "mvitv2": 1, "swinv2": 0,
              "tnt": 2, "twins": 0, "volo": 1, "xcit": 0}


def _calib(x: torch.Tensor) -> torch.Tensor:
    return torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(5))


def _differs_finite_and_reloads(model, reference, x, tmp_path) -> None:
    with torch.no_grad():
        got, want = model(x), reference(x)
    assert bool(got.isfinite().all())
    assert (got - want).abs().max() > 1e-3 * want.abs().max()
    # The saved state rebuilds the same quantizers on timm's own model (POQ, SLQ, patch bits included).
    fresh = load_quantized(copy.deepcopy(reference), save_quantized(model, tmp_path / "q.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(x), got)


@pytest.mark.parametrize("family", ADFQ)
def test_adfq_runs_and_reconstructs_every_attention(family, tmp_path):
    reference, model, x = _pair(family)
    config = ADFQConfig(w_bits=4, a_bits=4, calib_size=4, init_size=4, iterations=3, batch_size=2)
    quantize_(model, config, _calib(x), progress=False)
    _differs_finite_and_reloads(model, reference, x, tmp_path)
    report = state_of(model).reports["quant"]
    assert sum(r["kind"] == "attn" for r in report["units"]) == len(attention_layers(model))
    assert report["outliers"]  # POQ sits on the inputs of the LayerNorm → Linear pairs
    assert all(q.inited for q in model.modules() if isinstance(q, Quantizer) and q.enabled)


@pytest.mark.parametrize("family", REPQ)
def test_pmq_runs_with_patch_bits_where_a_map_is_over_tokens(family, tmp_path):
    reference, model, x = _pair(family)
    quantize_(model, PMQConfig.from_string("4/4/4(MP)", calib_size=4), _calib(x), progress=False)
    _differs_finite_and_reloads(model, reference, x, tmp_path)
    report = state_of(model).reports["quant"]
    assert {r["bits"] for r in report["components"]} <= set(range(2, 9))
    patched = [l for l in attention_layers(model) if isinstance(l.eam_quant.q, PatchBitsQuantizer)]
    assert len(patched) == len(report["patch_bits"]) == AAS_LAYERS[family]
    # Calibrated on operands whose token count is the map's (PatchBitsQuantizer refuses any other).
    assert all(getattr(l.eam_quant, n).inited for l in patched for n in ("q", "k", "v"))


@pytest.mark.parametrize("family,config", [(f, c) for f in sorted(BATCHNORM) for c in ("adfq", "pmq")] +
                         [("swinv2", "adfq")])
def test_refusals_are_one_line_and_touch_nothing(family, config):
    reference, model, x = _pair(family)
    cfg = ADFQConfig(calib_size=2, init_size=2) if config == "adfq" else PMQConfig(calib_size=2)
    with pytest.raises(EamError) as err:
        quantize_(model, cfg, x, progress=False)
    text = str(err.value)
    name = BATCHNORM.get(family, "Swin v2")
    method = "ADFQ-ViT" if config == "adfq" else "PMQ"
    assert "\n" not in text and f"{method} quantization does not apply to {name}" in text, text
    assert ("BatchNorm" if family in BATCHNORM else "post-norm") in text
    assert not any(isinstance(m, Quantizer) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_models_table_declares_adfq_and_pmq():
    rows = models_rows()
    for name, row in rows.items():
        assert row["PMQ"] == row["RepQ-ViT"], name
        assert row["ADFQ-ViT"] == ("no" if name == "Swin v2" else row["RepQ-ViT"]), name
    assert sum(r["ADFQ-ViT"] == "yes" for r in rows.values()) == len(rows) - 4  # Swin v2 and three BatchNorm
