"""The recipe (issue 16 §1): one stack for eval, export and compress; one file; the export honours every step.

References: ONNX Runtime's top-1 of the exported graph against PyTorch's ``eval`` of the same options;
the logits of the model that was saved against those of the model :func:`eamvit.methods.recipe.load`
rebuilds; the graph bytes of an export with and without each option.
"""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from eamvit.cli.main import main
from eamvit.errors import EamError
from eamvit.methods.freeze import FreezeConfig
from eamvit.methods.prune import PruneConfig
from eamvit.methods.recipe import Recipe, apply_, load, read_recipe, save_compressed
from eamvit.methods.repq import RepQConfig

from conftest import shipped_bound, run


def top1(capsys, *args) -> float:
    code, out, err = run(capsys, "eval", "--data", "digits", *args)
    assert code == 0, err
    return float(next(f for f in out.split() if f.startswith("top1=")).split("=")[1])


@pytest.fixture(scope="module")
def maps_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("maps") / "maps.safetensors"
    assert main(["calibrate", "--data", "digits", "--calib-size", "256", "--out", str(path)]) == 0
    return path


def test_recipe_round_trip_and_order():
    r = Recipe(steps=(RepQConfig(w_bits=8, a_bits=8), FreezeConfig(tau=0.2, granularity="row"),
                      PruneConfig(method="renyi", alpha=float("inf"))))
    assert Recipe.from_dict(json.loads(r.to_json())) == r
    with pytest.raises(EamError, match="quant → freeze → prune"):
        Recipe(steps=(PruneConfig(), FreezeConfig(tau=0.1)))
    with pytest.raises(EamError, match="newer"):
        Recipe.from_dict({**r.to_dict(), "version": 99})


STACKS = {"alone": [], "int8+prune": ["--quant", "repq", "--w-bits", "8", "--a-bits", "8",
                                      "--attn-quantizer", "uniform", "--prune", "shannon", "--keep-rate", "0.7"]}


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("granularity", ["entry", "row", "head"])
def test_export_top1_equals_eval(maps_path, tmp_path, capsys, granularity, stack):
    """The file `export` writes scores in ONNX Runtime what `eval` scores with the same options."""
    opts = ["--maps", maps_path, "--tau", "0.5", "--granularity", granularity, *STACKS[stack]]
    want = top1(capsys, *opts)
    code, _, err = run(capsys, "export", "--data", "digits", *opts, "--out", tmp_path / "m.onnx")
    assert code == 0, err
    got = top1(capsys, "--onnx", tmp_path / "m.onnx")
    assert abs(got - want) <= (shipped_bound() if stack != "alone" else 0.0), (want, got)


def test_default_stack_ships_what_eval_scores(maps_path, tmp_path, capsys):
    """With default options, `eval`, `eval --state` and `eval --onnx` of the export score the same model: the
    quantizers are calibrated in the QDQ target's form, not swapped at export."""
    opts = ["--quant", "repq", "--w-bits", "8", "--a-bits", "8", "--maps", maps_path, "--tau", "0.2",
            "--prune", "shannon", "--keep-rate", "0.7"]
    evaluated = top1(capsys, *opts)
    state = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "compress", "--data", "digits", *opts, "--out", state)
    assert code == 0, err
    assert read_recipe(state).target.form == "qdq"
    assert top1(capsys, "--state", state) == evaluated
    code, _, err = run(capsys, "export", "--data", "digits", "--state", state, "--out", tmp_path / "m.onnx")
    assert code == 0, err
    shipped = top1(capsys, "--onnx", tmp_path / "m.onnx")
    assert abs(shipped - evaluated) <= shipped_bound(), (evaluated, shipped)
    # An export that asks for another form than the one calibrated is refused, not swapped.
    code, _, err = run(capsys, "export", "--data", "digits", *opts, "--target", "torch", "--out", tmp_path / "t.onnx")
    assert code == 2 and "target torch" in err and not (tmp_path / "t.onnx").exists()


def test_compress_state_load_and_export(maps_path, tmp_path, capsys):
    """One file holds the stack: eval --state scores what eval scored, load() gives its logits, export --state
    writes the graph export with the options writes."""
    opts = ["--maps", maps_path, "--tau", "0.5", "--granularity", "head", *STACKS["int8+prune"]]
    want = top1(capsys, *opts)
    state = tmp_path / "m.safetensors"
    code, out, err = run(capsys, "compress", "--data", "digits", *opts, "--out", state)
    assert code == 0, err
    assert top1(capsys, "--state", state) == want
    assert [s.KIND for s in read_recipe(state).steps] == ["repq", "freeze", "prune"]
    for args, name in (([*opts], "opts.onnx"), (["--state", state], "state.onnx")):
        code, _, err = run(capsys, "export", "--data", "digits", *args, "--out", tmp_path / name)
        assert code == 0, err
    graphs = [onnx.load(str(tmp_path / n)).graph.SerializeToString() for n in ("opts.onnx", "state.onnx")]
    assert graphs[0] == graphs[1]


def test_load_gives_the_saved_logits(maps_path, tmp_path):
    from eamvit.methods.calibrate import EntropyMaps
    from eamvit.methods.models import BUNDLED_MODEL, create_model

    model = create_model(BUNDLED_MODEL)
    from eamvit.methods.models import data_config

    x = torch.randn(32, *data_config(model)["input_size"])
    recipe = Recipe(steps=(RepQConfig(w_bits=4, a_bits=4, calib_size=16), FreezeConfig(tau=0.4, granularity="row"),
                           PruneConfig(method="evit", keep_rate=0.6)))
    apply_(model, recipe, x[:16], maps=EntropyMaps.load(maps_path))
    save_compressed(model, tmp_path / "m.safetensors", recipe)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), load(tmp_path / "m.safetensors")(x))


def _graph(capsys, tmp_path, name, args):
    path = tmp_path / name
    code, _, err = run(capsys, "export", "--data", "digits", *args, "--out", path)
    if code == 2:
        return None, err
    assert code == 0, err
    model = onnx.load(str(path))
    del model.metadata_props[:]  # eamvit's record of the options: the graph itself must change
    return model.SerializeToString(), err


FREEZE = ["--tau", "0.3"]
QUANT = ["--quant", "repq", "--quant-calib-size", "16"]
# (base options, the option): the export with it must differ from the one without, or be refused.
OPTIONS = [
    (FREEZE, ["--granularity", "row"]), (FREEZE, ["--granularity", "head"]),
    (FREEZE + ["--granularity", "row"], ["--aggregate", "max"]), (FREEZE, ["--aggregate", "max"]),
    (FREEZE, ["--scope", "global"]), (FREEZE, ["--selection", "random"]), (FREEZE, ["--value-bits", "2"]),
    (FREEZE, ["--value-quantizer", "log2"]), (FREEZE, ["--bits", "4"]), (FREEZE, ["--frozen", "x.safetensors"]),
    ([], ["--granularity", "row"]), ([], ["--value-bits", "4"]),
    (["--prune", "shannon"], ["--keep-rate", "0.5"]), (["--prune", "shannon"], ["--alpha", "3"]),
    (["--prune", "shannon"], ["--prune-blocks", "1,2"]), (["--prune", "shannon"], ["--fuse"]),
    (["--prune", "shannon"], ["--placement", "block"]), (["--prune", "shannon"], ["--entropy-keys", "patches"]),
    ([], ["--keep-rate", "0.5"]), ([], ["--kept-tokens"]), ([], ["--opset", "18"]),
    ([], ["--target", "weight-only"]), ([], ["--softmax", "fp32"]), ([], ["--symmetric-weights"]),
    (QUANT, ["--softmax", "fp32"]), (QUANT, ["--symmetric-activations"]), (QUANT, ["--symmetric-weights"]),
    (QUANT, ["--block-size", "32"]), (QUANT, ["--a-bits", "4"]),
]
_BASES: dict = {}


@pytest.mark.parametrize("base,option", OPTIONS, ids=[" ".join(b + o) for b, o in OPTIONS])
def test_every_export_option_changes_the_file_or_is_refused(maps_path, tmp_path, capsys, base, option):
    if "--tau" in base:
        base = ["--maps", maps_path, *base]
    key = tuple(map(str, base))
    if key not in _BASES:
        _BASES[key] = _graph(capsys, tmp_path, "base.onnx", base)[0]
        assert _BASES[key] is not None
    graph, err = _graph(capsys, tmp_path, "with.onnx", [*base, *option])
    if graph is None:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("eamvit: error:") and option[0] in lines[0], err
        assert not (tmp_path / "with.onnx").exists()
    else:
        assert graph != _BASES[key], f"{option} was accepted but changed nothing"


@pytest.mark.parametrize("quant, target, words", [
    (RepQConfig(w_bits=8, a_bits=4), "qdq", "8-bit activations, not --a-bits 4"),
    (RepQConfig(w_bits=8, a_bits=6), "openvino", "8-bit activations, not --a-bits 6"),
])
def test_a_target_the_quantization_cannot_take_is_refused_before_calibration(quant, target, words):
    from eamvit.methods.export import Target

    with pytest.raises(EamError, match=words):
        Recipe(steps=(quant,), target=Target(form=target))
    Recipe(steps=(quant,), target=Target(form="weight-only"))  # float activations: any a_bits calibrates


def test_a_non_repq_quantization_has_no_onnx_target(capsys):
    code, _, err = run(capsys, "eval", "--data", "digits", "--quant", "adfq", "--target", "qdq")
    assert code == 2 and err.count("\n") == 1 and "adfq has no integer-runtime form" in err


def test_a_recipe_without_a_target_gets_its_quantizations_default_one():
    from eamvit.methods.export import Target

    int8, w4a4 = RepQConfig(w_bits=8, a_bits=8), RepQConfig(w_bits=4, a_bits=4)
    assert Recipe(steps=(int8,)).targeted().target == Target(form="qdq")  # 8-bit activations run in int8 kernels
    assert Recipe(steps=(w4a4,)).targeted().target == Target(form="torch")  # no ONNX form for 4-bit activations
    named = Recipe(steps=(int8,), target=Target(form="weight-only"))
    assert named.targeted() == named
    unquantized = Recipe(steps=(FreezeConfig(tau=0.2),))
    assert unquantized.targeted().target is None
