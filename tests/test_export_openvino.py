"""Exports for OpenVINO, checked against the runtimes that execute them.

The ``"openvino"`` graph form quantizes where a value is made and dequantizes where it is read; its
reference is the default form and eamvit's simulation (:func:`prepare_export_`), both run by ONNX
Runtime with its optimisations off (every QuantizeLinear/DequantizeLinear as written). OpenVINO itself
is checked against ONNX Runtime on the digits model: top-1 of the 360 held-out digits within
``TOP1_BOUND`` points. OpenVINO runs the float parts of a graph in bf16 on CPUs with AVX-512 BF16 or
AMX and in f32 elsewhere, and its int8 kernels accumulate in another order than ONNX Runtime's; a
few digits near a decision boundary may change class, so the bound is 2 of 360 digits (0.56 points). On x86
CPUs without VNNI, OpenVINO's int8 kernels (oneDNN's) add pairs of u8·s8 products in 16 bits, which saturate
as ONNX Runtime's do; 3 digits apart were seen on such a CPU, and the bound there is 4 digits (1.12 points).
The tests of OpenVINO and NNCF are skipped where they are not installed.
"""
import copy
import json
import sys

import numpy as np
import onnx
import pytest
import torch

import eamvit
from eamvit.experiments.digits import load_demo_model
from eamvit.methods.data import DigitsDataset
from eamvit.methods.export import ExportConfig, export_onnx, prepare_export_
from eamvit.modules.export_forms import QdqAttention
from eamvit.methods.export_runtime import OnnxClassifier, cpu_has_vnni, onnx_session
from eamvit.methods.prune import PruneConfig, prune_
from eamvit.methods.quantize import quantize_
from eamvit.methods.repq import RepQConfig

from conftest import run
from test_export import one_line_error

# Points of top-1 on the 360 test digits: 2 digits, 4 on CPUs without VNNI (see the module doc).
TOP1_BOUND = 0.56 if cpu_has_vnni() is not False else 1.12
OV_CONFIG = ExportConfig(runtime="openvino", symmetric_weights=True, symmetric_activations=True)


@pytest.fixture(scope="module")
def digits():
    test = DigitsDataset("test")
    return load_demo_model(), DigitsDataset("train").images, test.images, test.targets


@pytest.fixture(scope="module")
def digits_w8a8(digits):
    model, train, _, _ = digits
    return quantize_(copy.deepcopy(model), RepQConfig(w_bits=8, a_bits=8), train[:64], progress=False)


def _exact(path, x):
    """The graph as written: ONNX Runtime with its optimisations off."""
    return onnx_session(path, threads=1, optimize=False).run(None, {"images": x.numpy()})[0]


def _top1(logits, y) -> float:
    return float((torch.as_tensor(logits).argmax(1) == y).float().mean()) * 100


@pytest.mark.parametrize("symmetric", [True, False])
def test_openvino_form_computes_what_the_default_form_computes(digits, digits_w8a8, tmp_path, symmetric):
    _, _, x, _ = digits
    ov_cfg = ExportConfig(runtime="openvino", symmetric_weights=True, symmetric_activations=symmetric)
    ort_cfg = ExportConfig(symmetric_weights=True, symmetric_activations=symmetric)
    export_onnx(digits_w8a8, tmp_path / "ov.onnx", ov_cfg)
    export_onnx(digits_w8a8, tmp_path / "ort.onnx", ort_cfg)
    sim = prepare_export_(copy.deepcopy(digits_w8a8), ov_cfg)
    with torch.no_grad():
        want = sim(x).argmax(1)
    a, b = _exact(tmp_path / "ov.onnx", x), _exact(tmp_path / "ort.onnx", x)
    # The same quantizers on the same values: the same codes; only float rounding order may differ.
    assert float((torch.from_numpy(a).argmax(1) == want).float().mean()) >= 0.997
    assert float((torch.from_numpy(a).argmax(1) == torch.from_numpy(b).argmax(1)).float().mean()) >= 0.997
    assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()

    graph = onnx.load(str(tmp_path / "ov.onnx")).graph
    inits = {i.name: i for i in graph.initializer}
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    layers = len(eamvit.modules.attention.attention_layers(digits_w8a8))
    width = digits_w8a8.blocks[0].attn.attn_dim
    # One QuantizeLinear per attention makes q, k and v: per channel of qkv's output, their codes reshaped.
    per_channel = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[1] in inits
                   and tuple(inits[n.input[1]].dims) == (3 * width,)]
    assert len(per_channel) == layers
    assert all(c.op_type == "Reshape" for n in per_channel for c in consumers[n.output[0]])
    # The projection's input codes leave the attention's matmul and are transposed as integers.
    to_layout = [n for n in graph.node if n.op_type == "QuantizeLinear"
                 and all(c.op_type == "Transpose" for c in consumers[n.output[0]])]
    assert len(to_layout) == layers


def test_openvino_form_of_pruned_and_frozen_models_equals_the_simulation(digits, tmp_path):
    model, train, x, _ = digits
    m = copy.deepcopy(model)
    maps = eamvit.compute_entropy_maps(m, DigitsDataset("train"), indices=range(32), progress=False)
    eamvit.freeze_(m, maps, eamvit.FreezeConfig(tau=0.3))
    prune_(m, PruneConfig(method="evit", keep_rate=0.7))
    quantize_(m, RepQConfig(w_bits=8, a_bits=8), train[:64], progress=False)
    export_onnx(m, tmp_path / "p.onnx", OV_CONFIG)
    sim = prepare_export_(copy.deepcopy(m), OV_CONFIG)
    with torch.no_grad():
        want = sim(x).argmax(1)
    got = torch.from_numpy(_exact(tmp_path / "p.onnx", x)).argmax(1)
    assert float((got == want).float().mean()) >= 0.997
    ops = {n.op_type for n in onnx.load(str(tmp_path / "p.onnx")).graph.node}
    assert "TopK" in ops or "ArgMax" in ops or "GatherElements" in ops  # the pruning is in the graph


def test_openvino_form_needs_symmetric_weights(digits, digits_w8a8, tmp_path):
    with pytest.raises(eamvit.EamError, match="symmetric weights") as err:
        export_onnx(digits_w8a8, tmp_path / "q.onnx", ExportConfig(runtime="openvino"))
    assert "\n" not in str(err.value) and not (tmp_path / "q.onnx").exists()
    with pytest.raises(eamvit.EamError, match="runtime"):
        ExportConfig(runtime="tensorrt")
    # Nothing to move in an fp32 model: the same graph as the default form.
    model = digits[0]
    export_onnx(model, tmp_path / "a.onnx", ExportConfig(runtime="openvino"))
    export_onnx(model, tmp_path / "b.onnx")
    kinds = lambda p: [n.op_type for n in onnx.load(str(p)).graph.node]
    assert kinds(tmp_path / "a.onnx") == kinds(tmp_path / "b.onnx")


def test_export_swaps_only_eligible_attention(digits_w8a8, tmp_path):
    """Only ViT attention in RepQ-ViT's score order changes form; the swapped copy is still instrumented."""
    from eamvit.modules.export_forms import swap_for_export_

    m = prepare_export_(copy.deepcopy(digits_w8a8), OV_CONFIG)
    swap_for_export_(m, OV_CONFIG)
    layers = eamvit.modules.attention.attention_layers(m)
    assert layers and all(type(l) is QdqAttention for l in layers)
    q = quantize_(copy.deepcopy(load_demo_model()), RepQConfig(w_bits=8, a_bits=8, vit_scale_first=True),
                  DigitsDataset("train").images[:32], progress=False)
    prepare_export_(q, OV_CONFIG)
    swap_for_export_(q, OV_CONFIG)
    assert not any(type(l) is QdqAttention for l in eamvit.modules.attention.attention_layers(q))


# --------------------------------------------------------------------------- OpenVINO itself


def test_openvino_top1_equals_onnx_runtime(digits, digits_w8a8, tmp_path):
    pytest.importorskip("openvino")
    from eamvit.methods.export_openvino import OpenVinoClassifier

    model, _, x, y = digits
    export_onnx(model, tmp_path / "fp32.onnx")
    export_onnx(digits_w8a8, tmp_path / "int8.onnx", OV_CONFIG)
    for name in ("fp32", "int8"):
        path = tmp_path / f"{name}.onnx"
        ov = OpenVinoClassifier(path, threads=1)
        ort = OnnxClassifier(path, threads=1)
        assert ov.input_dims == ort.input_dims
        a, b = _top1(ov(x), y), _top1(ort(x), y)
        assert abs(a - b) <= TOP1_BOUND, (name, a, b)
    # OpenVINO runs the int8 export's linears in int8 (not as float layers with decompressed weights);
    # checked where the CPU has VNNI, the int8 instructions its kernels were measured on.
    if cpu_has_vnni() is not True:
        return
    runtime = ov.compiled.get_runtime_model()
    fc = [op.get_rt_info()["runtimePrecision"].astype(str) for op in runtime.get_ordered_ops()
          if op.get_rt_info()["layerType"].astype(str).startswith("FullyConnected")]
    linears = sum(isinstance(m, torch.nn.Linear) for m in digits_w8a8.modules())
    assert len(fc) == linears and all(p in ("i8", "u8", "I8", "U8") for p in fc), fc


def test_cli_eval_runtime_openvino(digits, tmp_path, capsys):
    pytest.importorskip("openvino")
    path = tmp_path / "q.onnx"
    code, out, err = run(capsys, "export", "--quant", "repq", "--quant-calib-size", "32", "--target", "openvino",
                         "--out", path)
    assert code == 0, err
    rows = {}
    for rt in ("onnxruntime", "openvino"):
        code, _, err = run(capsys, "eval", "--onnx", path, "--runtime", rt, "--threads", "1",
                           "--out", tmp_path / rt)
        assert code == 0, err
        rows[rt] = json.loads((tmp_path / f"{rt}.json").read_text())[0]
    assert rows["openvino"]["runtime"] == "OpenVINO" and rows["onnxruntime"]["runtime"] == "ONNX Runtime"
    assert rows["openvino"]["num_images"] == rows["onnxruntime"]["num_images"]
    assert abs(rows["openvino"]["top1"] - rows["onnxruntime"]["top1"]) <= TOP1_BOUND


def test_cli_runtime_bad_input_one_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "m.onnx"
    assert run(capsys, "export", "--out", path)[0] == 0
    one_line_error(*run(capsys, "eval", "--runtime", "openvino")[::2], "--onnx")
    one_line_error(*run(capsys, "eval", "--onnx", path, "--runtime", "tvm")[::2], "--runtime tvm")
    (tmp_path / "m.xml").write_text("<net/>")
    one_line_error(*run(capsys, "eval", "--onnx", tmp_path / "m.xml")[::2], "--runtime openvino")
    one_line_error(*run(capsys, "export", "--quant", "repq", "--quant-calib-size", "16", "--target", "openvino",
                        "--symmetric-weights", "--out", tmp_path / "q.onnx")[::2], "symmetric already")
    assert not (tmp_path / "q.onnx").exists()
    # Without the extra installed (a None entry makes every import of it fail): one line naming it.
    monkeypatch.setitem(sys.modules, "openvino", None)
    one_line_error(*run(capsys, "eval", "--onnx", path, "--runtime", "openvino")[::2], 'pip install "eamvit[openvino]"')


def test_export_table_openvino_rows_and_the_nncf_baseline(digits, tmp_path):
    pytest.importorskip("nncf")
    from eamvit.experiments.export_table import export_table
    from eamvit.methods.export_openvino import nncf_quantize, read_model_meta

    model, _, x, y = digits
    rows = export_table(model, reps=1, threads=1, short=True, openvino=True, workdir=str(tmp_path))
    by = {(r["label"], r["runtime"]): r for r in rows}
    assert len(rows) == 7 and {r["runtime"] for r in rows} == {"PyTorch", "ONNX Runtime", "OpenVINO"}
    ort_fp32, ov_fp32 = by[("fp32", "ONNX Runtime")], by[("fp32", "OpenVINO")]
    assert abs(ov_fp32["top1"] - ort_fp32["top1"]) <= TOP1_BOUND
    nncf = next(r for r in rows if r["label"].startswith("NNCF"))
    assert nncf["file_bytes"] == (tmp_path / "nncf.xml").stat().st_size + (tmp_path / "nncf.bin").stat().st_size
    assert nncf["top1"] >= ort_fp32["top1"] - 1.5  # NNCF's own int8: a point or so of the fp32 model
    meta, fp32_meta = read_model_meta(tmp_path / "nncf.xml"), read_model_meta(tmp_path / "fp32.onnx")
    assert meta["quant"]["method"] == "nncf" and meta["model"] == fp32_meta["model"]
    assert meta["data_config"] == fp32_meta["data_config"]
    with pytest.raises(eamvit.EamError, match="xml"):
        nncf_quantize(tmp_path / "fp32.onnx", tmp_path / "nncf.onnx", x[:4])
    with pytest.raises(eamvit.EamError, match="already quantized"):
        nncf_quantize(tmp_path / "w8a8.onnx", tmp_path / "again.xml", x[:4])
    # eamvit's OpenVINO export scores what ONNX Runtime scores on the same file.
    ov_int8 = next(r for r in rows if r["runtime"] == "OpenVINO" and r["label"].startswith("eamvit"))
    ref = _top1(OnnxClassifier(tmp_path / "w8a8_openvino.onnx", threads=1)(x), y)
    assert abs(ov_int8["top1"] - ref) <= TOP1_BOUND
    assert all(r["images_per_s"] > 0 for r in rows)


def test_nncf_leaves_token_selection_products_in_float(digits, tmp_path):
    """The products that only choose tokens (Shannon pruning's q·kᵀ, one per pruning block) stay float in
    NNCF's IR; an unpruned model and EViT (whose class-token row is no matrix product) have none."""
    pytest.importorskip("nncf")
    import openvino as ov
    from eamvit.methods.export_openvino import nncf_quantize, selection_products

    model, train, _, _ = digits
    export_onnx(model, tmp_path / "fp32.onnx")
    evit = copy.deepcopy(model)
    prune_(evit, PruneConfig(method="evit", keep_rate=0.7))
    export_onnx(evit, tmp_path / "evit.onnx")
    core = ov.Core()
    assert selection_products(core.read_model(str(tmp_path / "fp32.onnx"))) == []
    assert selection_products(core.read_model(str(tmp_path / "evit.onnx"))) == []
    m = copy.deepcopy(model)
    prune_(m, PruneConfig(method="shannon", keep_rate=0.7))
    export_onnx(m, tmp_path / "s.onnx")
    names = selection_products(core.read_model(str(tmp_path / "s.onnx")))
    # By hand: the products computed in the pruning blocks themselves (not in their attention or MLP).
    assert names == [f"/model/blocks/blocks.{b}/MatMul" for b in (1, 2, 3)]
    nncf_quantize(tmp_path / "s.onnx", tmp_path / "s.xml", train[:8])
    ir = core.read_model(str(tmp_path / "s.xml"))
    quantized_inputs = {op.get_friendly_name() for op in ir.get_ordered_ops() if op.get_type_name() == "MatMul"
                        and any(v.get_node().get_type_name() == "FakeQuantize" for v in op.input_values())}
    assert quantized_inputs and not quantized_inputs & set(names)


def test_repq_with_merging_has_no_openvino_form(digits, digits_w8a8, tmp_path):
    # OpenVINO's CPU plugin does not compile that graph (checked by hand); it is refused in one line.
    from eamvit.methods.export import Target
    from eamvit.methods.merge import MergeConfig, merge_
    from eamvit.methods.recipe import Recipe

    m = copy.deepcopy(digits_w8a8)
    merge_(m, MergeConfig(r=9))
    with pytest.raises(eamvit.EamError, match="NNCF") as err:
        export_onnx(m, tmp_path / "m.onnx", OV_CONFIG)
    assert "\n" not in str(err.value) and not (tmp_path / "m.onnx").exists()
    with pytest.raises(eamvit.EamError, match="NNCF"):  # a recipe says so before anything is calibrated
        Recipe(steps=(RepQConfig(w_bits=8, a_bits=8), MergeConfig(r=9)), target=Target("openvino"))
    export_onnx(m, tmp_path / "q.onnx", ExportConfig(symmetric_weights=True))  # ONNX Runtime's form exports


def _swapped(model):
    """The attention classes an OpenVINO export of ``model`` runs (its export copy's)."""
    from eamvit.modules.attention import attention_layers
    from eamvit.modules.export_forms import swap_for_export_

    m = prepare_export_(copy.deepcopy(model), OV_CONFIG)
    swap_for_export_(m, OV_CONFIG)
    return attention_layers(m)
