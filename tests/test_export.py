"""ONNX exports checked against the runtime that executes them (ONNX Runtime on CPU).

References: the unmodified PyTorch model (fp32, pruned, frozen), eamvit's simulation of the same
integer scheme (int8 QDQ, weight-only), PyTorch's kept-token indices (pruning), and ``eval``'s
own row for the same model (``eval --onnx``).
"""
import copy
import json

import numpy as np
import onnx
import pytest
import torch

import eamvit
from eamvit.experiments.digits import load_demo_model
from eamvit.methods.data import DigitsDataset
from eamvit.methods.export import ExportConfig, export_onnx, prepare_export_
from eamvit.methods.export_runtime import cpu_has_vnni, onnx_session, optimized_ops, read_onnx_meta
from eamvit.methods.prune import PruneConfig, prune_
from eamvit.methods.quantize import quantize_
from eamvit.methods.repq import RepQConfig

from conftest import make, run, TINY_DISTILLED, TINY_SWIN, TINY_VIT
from eamvit.methods.state import state_of


@pytest.fixture(scope="module")
def digits():
    test = DigitsDataset("test")
    return load_demo_model(), DigitsDataset("train").images, test.images, test.targets


@pytest.fixture(scope="module")
def digits_w8a8(digits):
    model, train, _, _ = digits
    return quantize_(copy.deepcopy(model), RepQConfig(w_bits=8, a_bits=8), train, progress=False)


def constants(graph):
    """Name -> array of every initializer and Constant output (Identity of a constant followed)."""
    out = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Identity" and n.input[0] in out:
            out[n.output[0]] = out[n.input[0]]
    return out


def ort_run(path, x, outputs=None):
    return onnx_session(path, threads=1).run(outputs, {"images": x.numpy()})


@pytest.mark.parametrize("spec", [TINY_VIT, TINY_DISTILLED, TINY_SWIN], ids=["vit", "distilled", "swin"])
def test_fp32_logits_equal_pytorch(spec, tmp_path):
    model = make(spec)
    export_onnx(model, tmp_path / "m.onnx")
    x = torch.randn(5, 3, 32, 32)  # the graph was traced at batch 2: the batch axis is dynamic
    with torch.no_grad():
        ref = model(x)
    out = ort_run(tmp_path / "m.onnx", x)[0]
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-4, rtol=0)


def test_export_does_not_change_the_model(digits_w8a8, tmp_path, digits):
    x = digits[2][:8]
    with torch.no_grad():
        before = digits_w8a8(x)
    export_onnx(digits_w8a8, tmp_path / "q.onnx")
    with torch.no_grad():
        assert torch.equal(digits_w8a8(x), before)


@pytest.mark.parametrize("softmax,symmetric", [("uniform", False), ("fp32", False), ("uniform", True)])
def test_int8_export_agrees_with_simulation(digits, digits_w8a8, tmp_path, softmax, symmetric):
    _, _, x, y = digits
    cfg = ExportConfig(softmax=softmax, symmetric_activations=symmetric, symmetric_weights=symmetric)
    sim = prepare_export_(copy.deepcopy(digits_w8a8), cfg)
    path = tmp_path / "q.onnx"
    export_onnx(digits_w8a8, path, cfg)
    with torch.no_grad():
        pred_sim = sim(x).argmax(1)
    acc_sim = (pred_sim == y).float().mean().item() * 100
    # The graph as written (every QuantizeLinear/DequantizeLinear run on its own) is the simulation.
    exact = torch.from_numpy(onnx_session(path, threads=1, optimize=False).run(None, {"images": x.numpy()})[0])
    assert (exact.argmax(1) == pred_sim).float().mean().item() >= 0.997
    # The fused int8 kernels: u8·s8 pairs saturate in 16 bits on x86 CPUs without VNNI (ONNX Runtime's
    # documented limitation), where the default weight storage is uint8 for its exact u8·u8 kernels.
    storage = read_onnx_meta(path)["export"]["weight_storage"]
    assert storage == ("int8" if cpu_has_vnni() is not False else "uint8")
    pred_ort = torch.from_numpy(ort_run(path, x)[0]).argmax(1)
    agree = (pred_sim == pred_ort).float().mean().item()
    acc_ort = (pred_ort == y).float().mean().item() * 100
    exact_kernels = storage == "uint8" or cpu_has_vnni() is not False
    assert agree >= (0.99 if exact_kernels else 0.97), (agree, acc_sim, acc_ort)
    assert abs(acc_sim - acc_ort) <= (0.3 if exact_kernels else 1.5), (agree, acc_sim, acc_ort)
    assert acc_ort > 90
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    # Weights (16 block linears, head, patch embedding) are 8-bit codes; activations have integer zero points.
    dq_codes = [inits[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    code_type = onnx.TensorProto.INT8 if storage == "int8" else onnx.TensorProto.UINT8
    assert len(dq_codes) == 16 + 1 + 1 and all(t.data_type == code_type for t in dq_codes)
    consts = constants(graph)
    zps = [consts[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == (np.int8 if symmetric else np.uint8) for z in zps)
    if symmetric:
        assert all(int(z) == 0 for z in zps)
    ops = optimized_ops(path, threads=1)  # ONNX Runtime fused the QDQ pairs into integer kernels
    integer = ops.get("MatMulIntegerToFloat", 0) + ops.get("QLinearMatMul", 0)
    assert integer == 16 + (8 if softmax == "uniform" else 4)  # block linears, q·kᵀ (and attn·v)


def test_prepared_model_has_integer_zero_points_and_is_idempotent(digits_w8a8, digits):
    cfg = ExportConfig(symmetric_activations=True)
    sim = prepare_export_(copy.deepcopy(digits_w8a8), cfg)
    qs = [m for m in sim.modules() if isinstance(m, eamvit.modules.quantizers.UniformQuantizer) and m.enabled]
    assert qs and all(torch.equal(q.zero_point, q.zero_point.round()) for q in qs)
    state = {k: v.clone() for k, v in sim.state_dict().items()}
    prepare_export_(sim, cfg)
    assert all(torch.equal(v, sim.state_dict()[k]) for k, v in state.items())
    x = digits[2]
    with torch.no_grad():
        a, b = digits_w8a8(x).argmax(1), sim(x).argmax(1)
    # Integer zero points, uniform post-softmax and symmetric ranges barely move RepQ-ViT's predictions.
    assert (a == b).float().mean() >= 0.97


def test_int8_export_refuses_4bit_activations(digits, tmp_path):
    model, train, _, _ = digits
    q = quantize_(copy.deepcopy(model), RepQConfig(w_bits=4, a_bits=4, calib_size=16), train, progress=False)
    with pytest.raises(eamvit.EamError, match="8-bit activations"):
        export_onnx(q, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_weight_only_4bit_is_4bit_on_disk_and_exact(digits, tmp_path):
    model, train, x, _ = digits
    q = quantize_(copy.deepcopy(model), RepQConfig(w_bits=4, a_bits=8, calib_size=16), train, progress=False)
    cfg = ExportConfig(scheme="weight-only")
    sim = prepare_export_(copy.deepcopy(q), cfg)
    path = tmp_path / "w4.onnx"
    export_onnx(q, path, cfg)
    with torch.no_grad():
        ref = sim(x)
    np.testing.assert_allclose(ort_run(path, x)[0], ref.numpy(), atol=1e-4, rtol=0)
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    nb = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nb) == 16 + 1  # every Linear, the head included
    for n in nb:
        attrs = {a.name: a.i for a in n.attribute}
        packed = inits[n.input[1]]
        assert attrs["bits"] == 4 and packed.data_type == onnx.TensorProto.UINT8
        assert packed.dims[0] * packed.dims[1] * packed.dims[2] * 2 >= attrs["N"] * attrs["K"]
    assert not any(n.op_type in ("MatMul", "Gemm") and n.input[1] in inits for n in graph.node)


def test_pruned_export_keeps_the_same_tokens(digits, tmp_path):
    model, _, x, _ = digits
    for method in ("evit", "shannon"):
        m = copy.deepcopy(model)
        prune_(m, PruneConfig(method=method, keep_rate=0.7))
        path = tmp_path / f"{method}.onnx"
        export_onnx(m, path, ExportConfig(kept_tokens=True))
        with torch.no_grad():
            ref = m(x)
        kept = state_of(m).prune.stage_idx
        out = ort_run(path, x)
        np.testing.assert_allclose(out[0], ref.numpy(), atol=1e-4, rtol=0)
        assert len(out) == 1 + len(kept)
        for got, want in zip(out[1:], kept):
            if method == "evit":  # the same indices in the same (best-first) order
                np.testing.assert_array_equal(got, want.numpy())
            else:  # the same kept set; near-equal entropies may swap places in the order
                np.testing.assert_array_equal(np.sort(got, 1), np.sort(want.numpy(), 1))
        # Every attention's map has one reader, its product with v (what runtimes fuse): the scores are
        # computed beside it.
        graph = onnx.load(str(path)).graph
        readers = {}
        for n in graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n.op_type)
        attention = [n for n in graph.node if n.op_type == "Softmax" and "/attn/" in n.name]
        assert len(attention) == len(m.blocks)
        assert all(readers[n.output[0]] == ["MatMul"] for n in attention)


@pytest.mark.parametrize("granularity", ["entry", "row", "head"])
def test_frozen_export_equals_pytorch(digits, tmp_path, granularity):
    model, train, x, _ = digits
    m = copy.deepcopy(model)
    maps = eamvit.compute_entropy_maps(m, DigitsDataset("train"), indices=range(64), progress=False)
    eamvit.freeze_(m, maps, eamvit.FreezeConfig(tau=0.3, granularity=granularity))
    export_onnx(m, tmp_path / "f.onnx")
    if granularity == "head":  # the exported graph skips the frozen heads' q/k: a narrower qkv weight
        qkv = [i for i in onnx.load(str(tmp_path / "f.onnx")).graph.initializer if tuple(i.dims) in {(64, 192), (192, 64)}]
        assert len(qkv) < 4
    with torch.no_grad():
        ref = m(x)
    np.testing.assert_allclose(ort_run(tmp_path / "f.onnx", x)[0], ref.numpy(), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- command line


def one_line_error(code, err, *needles):
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eamvit: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_export_then_eval_onnx_gives_eval_row(tmp_path, capsys):
    path = tmp_path / "d.onnx"
    code, out, err = run(capsys, "export", "--format", "onnx", "--out", path)
    assert code == 0 and path.is_file(), err
    code, _, err = run(capsys, "eval", "--onnx", path, "--out", tmp_path / "onnx")
    assert code == 0, err
    code, _, err = run(capsys, "eval", "--out", tmp_path / "torch")
    assert code == 0, err
    a = json.loads((tmp_path / "onnx.json").read_text())[0]
    b = json.loads((tmp_path / "torch.json").read_text())[0]
    for k in ("model", "top1", "top5", "num_images", "param_count", "img_size", "crop_pct", "interpolation"):
        assert a[k] == b[k], k


def test_cli_export_quantized_pruned(tmp_path, capsys):
    path = tmp_path / "q.onnx"
    code, out, err = run(capsys, "export", "--quant", "repq", "--quant-calib-size", "16", "--prune", "evit",
                         "--keep-rate", "0.7", "--out", path)
    assert code == 0, err
    assert "qdq W8/A8" in out
    code, out, err = run(capsys, "eval", "--onnx", path, "--num-samples", "64")
    assert code == 0, err
    assert "quant=repq" in out and "prune=evit" in out


@pytest.mark.parametrize("args,needle", [
    (["export", "--format", "tflite", "--out", "{tmp}/m.onnx"], "unknown export format"),
    (["export", "--out", "{tmp}/file.txt/m.onnx"], "file.txt"),
    (["export", "--out", "{tmp}"], "is a folder"),
    (["export", "--target", "int3", "--out", "{tmp}/m.onnx"], "--target"),
    (["export", "--quant", "adfq", "--out", "{tmp}/m.onnx"], "no integer-runtime form"),
    (["eval", "--onnx", "{tmp}/file.txt"], "is not an ONNX model"),
    (["eval", "--onnx", "{tmp}/missing.onnx"], "does not exist"),
    (["eval", "--onnx", "{tmp}/file.txt", "--quant", "repq"], "drop --quant"),
])
def test_cli_bad_input_one_line(tmp_path, capsys, args, needle):
    (tmp_path / "file.txt").write_bytes(b"\x00not an onnx model\xff" * 10)
    code, _, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    one_line_error(code, err, needle)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("symmetric", [False, True])
def test_uint8_weight_storage_is_the_same_model_in_exact_kernels(digits, digits_w8a8, tmp_path, symmetric):
    """uint8 weights with the zero point moved by 128 hold the same numbers as int8 ones, and ONNX Runtime's fused
    kernels then compute what the graph as written computes, on CPUs with and without VNNI."""
    _, _, x, _ = digits
    paths = {}
    for storage in ("int8", "uint8"):
        paths[storage] = tmp_path / f"{storage}.onnx"
        export_onnx(digits_w8a8, paths[storage], ExportConfig(symmetric_activations=symmetric,
                                                              symmetric_weights=symmetric, weight_storage=storage))
        assert read_onnx_meta(paths[storage])["export"]["weight_storage"] == storage
    exact = {s: onnx_session(p, threads=1, optimize=False).run(None, {"images": x.numpy()})[0]
             for s, p in paths.items()}
    np.testing.assert_array_equal(exact["int8"], exact["uint8"])
    graph = onnx.load(str(paths["uint8"])).graph
    inits = {i.name: i for i in graph.initializer}
    codes = [inits[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(codes) == 16 + 1 + 1 and all(t.data_type == onnx.TensorProto.UINT8 for t in codes)
    fused = ort_run(paths["uint8"], x)[0]
    assert (fused.argmax(1) == exact["uint8"].argmax(1)).mean() >= 0.997
    assert np.abs(fused - exact["uint8"]).max() <= 0.02 * np.ptp(exact["uint8"])
    with pytest.raises(eamvit.EamError, match="weight-storage"):
        ExportConfig(runtime="openvino", weight_storage="uint8")


def test_uint8_storage_of_a_hand_made_graph(tmp_path):
    """Per-channel int8 codes without a zero point, read through an Identity (as the exporter shares tensors)
    and by two DequantizeLinear nodes: the uint8 graph computes the same numbers, which are checked by hand."""
    from onnx import TensorProto, helper, numpy_helper

    from eamvit.methods.export import _store_weights_unsigned

    codes = np.array([[-128, 127, 3], [5, -7, 0]], np.int8)  # (in 2, out 3), per output channel
    scale = np.array([0.5, 0.25, 2.0], np.float32)
    nodes = [helper.make_node("Identity", ["codes"], ["shared"]),
             helper.make_node("DequantizeLinear", ["shared", "scale"], ["w1"], axis=1),
             helper.make_node("DequantizeLinear", ["codes", "scale"], ["w2"], axis=1),
             helper.make_node("MatMul", ["x", "w1"], ["y1"]), helper.make_node("MatMul", ["x", "w2"], ["y2"]),
             helper.make_node("Add", ["y1", "y2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scale, "scale")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _store_weights_unsigned(proto)
    onnx.checker.check_model(proto)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert not any(v.dtype == np.int8 for v in inits.values())  # the int8 codes are read by no node any more
    path = tmp_path / "g.onnx"
    onnx.save(proto, str(path))
    x = np.array([[1.0, -2.0]], np.float32)
    got = onnx_session(path, threads=1, optimize=False).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, 2 * x @ (codes.astype(np.float32) * scale))


def test_saturation_warning_only_for_int8_weights_without_vnni(monkeypatch):
    from eamvit.methods import export_runtime as rt

    qdq = {"quant": {"w_bits": 8}, "export": ExportConfig(weight_storage="int8").to_dict()}
    unsigned = {"quant": {"w_bits": 8}, "export": ExportConfig(weight_storage="uint8").to_dict()}
    ov = {"quant": {"w_bits": 8}, "export": ExportConfig(runtime="openvino").to_dict()}
    fp32 = {"quant": None, "export": ExportConfig().to_dict()}
    monkeypatch.setattr(rt, "cpu_has_vnni", lambda: False)
    assert "--weight-storage uint8" in rt.saturation_warning(qdq)
    assert "--runtime openvino" in rt.saturation_warning(ov)
    assert rt.saturation_warning(unsigned) is None and rt.saturation_warning(fp32) is None
    monkeypatch.setattr(rt, "cpu_has_vnni", lambda: True)
    assert rt.saturation_warning(qdq) is None
