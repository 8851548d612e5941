"""fp32 ONNX export, row and head freezing of the families of ``modules/families.py``.

The tiny seeded configs are the table of ``test_families.py``. References: timm's own unmodified
model (a deep copy eamvit never touched) and ONNX Runtime running the exported graph.
"""
from __future__ import annotations

import onnx
import pytest
import timm
import torch

from conftest import models_rows
from eamvit.errors import EamError
from eamvit.methods.export import ExportConfig, export_onnx
from eamvit.methods.export_runtime import onnx_session
from eamvit.methods.freeze import FreezeConfig, freeze_
from eamvit.methods.models import data_config
from eamvit.modules.attention import instrument, set_frozen

from test_families import FAMILIES, _maps, _pair
from test_families_heads import EXECUTED

# Families whose maps are windowed (a row is one (window, token) pair): row freezing is refused.
NO_ROWS = {"swinv2": "Swin v2", "twins": "Twins", "tnt": "TNT", "hiera": "Hiera"}


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> bool:
    return bool((got - want).abs().max() <= rtol * want.abs().max())


def _one_line_refusal(err: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(err.value)
    assert "\n" not in text
    for n in needles:
        assert n in text, text


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_and_unit_freezing(family, tmp_path):
    reference, model, x = _pair(family)
    size = FAMILIES[family][1]
    x3 = torch.cat([x, x[:1].flip(-1)])  # three images: the graph is traced at batch 2, its batch axis is dynamic
    with torch.no_grad():
        want = reference(x3)

    maps = _maps(model, x[0])
    for granularity in ("head", "row"):
        if granularity == "row" and family in NO_ROWS:
            with torch.no_grad():
                before = model(x3)
            with pytest.raises(EamError) as err:
                freeze_(model, maps, FreezeConfig(tau=1.0, granularity="row"))
            _one_line_refusal(err, f"row granularity does not apply to {NO_ROWS[family]}", "use entry or head")
            with torch.no_grad():  # refused before any layer was touched: the heads stay frozen
                assert torch.equal(model(x3), before)
            continue
        report = freeze_(model, maps, FreezeConfig(tau=1.0, granularity=granularity))
        # Rows are executed in ViT layers only; heads wherever the family's classes can cut them.
        assert report.frozen == report.total
        assert report.executed == (granularity == "head" and family in EXECUTED)
        with torch.no_grad():
            got = model(x3)
        # Every map frozen to the calibration image's: that image's logits, and another image's change.
        assert _close(got[0], want[0]) and not _close(got[1], want[1], 1e-3), granularity

    # VOLO's outlook attention folds its patches back: ONNX Col2Im, from opset 18, which the export
    # picks itself (test_export_follows_the_size_the_model_was_built_for); a lower one given is refused.
    config = None
    if family == "volo":
        with pytest.raises(EamError) as err:
            export_onnx(model, tmp_path / "v.onnx", ExportConfig(opset=17), input_size=(3, size, size))
        _one_line_refusal(err, "needs opset 18", "--opset 18")
        assert not (tmp_path / "v.onnx").exists()

    # Half the heads frozen (executed where the family can, simulated elsewhere) traces through the
    # taps into the graph.
    freeze_(model, maps, FreezeConfig(tau=0.5, granularity="head"))
    with torch.no_grad():
        frozen = model(x3)
    assert not _close(frozen, want, 1e-3)
    export_onnx(model, tmp_path / "f.onnx", config, input_size=(3, size, size))
    got = onnx_session(tmp_path / "f.onnx", threads=1).run(None, {"images": x3.numpy()})[0]
    assert _close(torch.from_numpy(got), frozen)

    # τ = 0 leaves timm's own forward (fused kernels included) to the exporter.
    freeze_(model, maps, FreezeConfig(tau=0.0))
    export_onnx(model, tmp_path / "m.onnx", config, input_size=(3, size, size))
    got = onnx_session(tmp_path / "m.onnx", threads=1).run(None, {"images": x3.numpy()})[0]
    assert _close(torch.from_numpy(got), want)


_NAFLEX = dict(patch_size=16, depth=1, embed_dim=32, num_heads=2, num_classes=5)
# Families whose pretrained config (or timm's default one) does not give the size a model was built
# for: (builder, the size it takes, its attention classes, the opset its export needs).
BUILT_SIZES = {f: (*FAMILIES[f], 18 if f == "volo" else 17) for f in ("tnt", "twins", "mvitv2", "levit", "hiera",
                                                                      "volo")}
BUILT_SIZES.update({
    # A classic ViT made a NaFlexViT takes its position grid from img_size: its export runs at that size.
    "naflexvit": (lambda: timm.create_model("vit_base_patch16_224", use_naflex=True, img_size=32, **_NAFLEX), 32,
                  {"Attention"}, 17),
    # With timm's 16×16 grid, img_size is dropped; its pretrained config's 384 px resample the grid to 24×24
    # with an antialiased resize: ONNX Resize with antialias, from opset 18.
    "naflexvit-grid": (lambda: timm.create_model("naflexvit_base_patch16_gap", img_size=32, **_NAFLEX), 384,
                       {"Attention"}, 18),
})


@pytest.mark.parametrize("family", sorted(BUILT_SIZES))
def test_export_follows_the_size_the_model_was_built_for(family, tmp_path):
    """With no options, the graph takes the size the model was built for (data configs give it too, for
    eval) at the opset its family needs, and ONNX Runtime gives timm's own logits."""
    reference, model, _ = _pair(family, {f: row[:3] for f, row in BUILT_SIZES.items()})
    _, size, _, opset = BUILT_SIZES[family]
    assert data_config(model)["input_size"] == (3, size, size)
    export_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    dims = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, size, size]
    assert {o.domain: o.version for o in proto.opset_import}[""] == opset
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference(x)
    got = onnx_session(tmp_path / "m.onnx", threads=1).run(None, {"images": x.numpy()})[0]
    assert _close(torch.from_numpy(got), want)


def test_heads_are_simulated_where_the_class_cannot_execute_them():
    _, model, x = _pair("cait")
    layer = instrument(model)[0]  # talking heads
    shape = _maps(model, x[0]).mean[0].shape
    with pytest.raises(EamError) as err:  # execute=True asks for executed heads
        set_frozen(layer, torch.ones(shape, dtype=torch.bool), torch.zeros(shape), "head")
    _one_line_refusal(err, "executed head freezing does not apply to CaiT's talking-heads attention")
    assert layer.eam_frozen_mask is None


def test_models_table_declares_export_rows_and_heads():
    rows = models_rows()
    names = {"EVA / EVA02", "BEiT", "Swin v2", "CaiT", "ConViT", "XCiT", "Twins", "MViTv2", "LeViT", "VOLO", "TNT",
             "EfficientFormer", "FastViT", "Hiera", "CrossViT"}
    for name in names:
        assert rows[name]["ONNX export"] == rows[name]["head freeze"] == "yes", name
        assert rows[name]["row freeze"] == ("no" if name in NO_ROWS.values() else "yes"), name
