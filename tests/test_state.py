"""``--state`` takes any of eamvit's three model files; the file's format tag says which (issue 16 §1).

References: a quantized state of `eamvit quantize` scores what `eval --quant` with the same settings
scores (the same calibration images, so the same model); frozen attention saved through the Python
API from given maps scores what `eval --maps --tau` with those settings scores.
"""
from __future__ import annotations

import pytest

from eamvit.cli.main import main
from eamvit.methods.calibrate import EntropyMaps
from eamvit.methods.freeze import FreezeConfig, freeze_, save_frozen
from eamvit.methods.models import BUNDLED_MODEL, create_model

from conftest import run

INT8 = ["--w-bits", "8", "--a-bits", "8", "--attn-quantizer", "uniform"]


def row(capsys, *args) -> dict:
    code, out, err = run(capsys, "eval", "--data", "digits", "--num-samples", "120", *args)
    assert code == 0, err
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def top1(capsys, *args) -> float:
    return float(row(capsys, *args)["top1"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A quantized state, maps and the head-level frozen attention made from those maps."""
    d = tmp_path_factory.mktemp("state")
    assert main(["quantize", "--data", "digits", *INT8, "--out", str(d / "q.safetensors")]) == 0
    assert main(["calibrate", "--data", "digits", "--calib-size", "128", "--out", str(d / "maps.safetensors")]) == 0
    model = create_model(BUNDLED_MODEL)
    cfg = FreezeConfig(tau=0.5, granularity="head")
    freeze_(model, EntropyMaps.load(str(d / "maps.safetensors")), cfg)
    save_frozen(model, str(d / "frozen.safetensors"), cfg)
    return d


def test_state_of_a_quantized_state_is_that_quantized_model(files, capsys):
    want = top1(capsys, "--quant", "repq", *INT8)
    got = row(capsys, "--state", files / "q.safetensors")
    assert float(got["top1"]) == want and (got["quant"], got["w_bits"], got["a_bits"]) == ("repq", "8", "8")
    assert top1(capsys, "--quant-state", files / "q.safetensors") == want


def test_state_of_frozen_attention_is_that_frozen_model(files, capsys):
    want = top1(capsys, "--maps", files / "maps.safetensors", "--tau", "0.5", "--granularity", "head")
    got = row(capsys, "--state", files / "frozen.safetensors")
    assert float(got["top1"]) == want and (got["frozen"], got["granularity"]) == (str(files / "frozen.safetensors"),
                                                                                "head")
    # a part loaded by --state takes the other steps on top, as --frozen does
    stacked = top1(capsys, "--frozen", files / "frozen.safetensors", "--prune", "shannon", "--keep-rate", "0.7")
    assert top1(capsys, "--state", files / "frozen.safetensors", "--prune", "shannon", "--keep-rate", "0.7") == stacked


@pytest.mark.parametrize("case", ["maps", "state-and-alias", "option-it-holds", "compress-a-compressed-model"])
def test_bad_state_is_one_line(files, tmp_path, capsys, case):
    if case == "compress-a-compressed-model":
        assert main(["compress", "--data", "digits", "--state", str(files / "frozen.safetensors"),
                     "--out", str(tmp_path / "c.safetensors")]) == 0
        capsys.readouterr()
    argv, words = {
        "maps": (["eval", "--state", files / "maps.safetensors"], ["is not an eamvit compressed model file",
                                                                   "eamvit quantize"]),
        "state-and-alias": (["eval", "--state", files / "q.safetensors", "--quant-state", files / "q.safetensors"],
                            ["--state", "--quant-state", "drop one"]),
        "option-it-holds": (["eval", "--state", files / "frozen.safetensors", "--granularity", "row"],
                            ["--granularity cannot apply with --state"]),
        "compress-a-compressed-model": (["compress", "--state", tmp_path / "c.safetensors", "--out",
                                         tmp_path / "d.safetensors"], ["is a compressed model already"]),
    }[case]
    code, out, err = run(capsys, *argv, "--data", "digits")
    assert code == 2 and err.count("\n") == 1 and err.startswith("eamvit: error: "), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "d.safetensors").exists()


def test_help_says_the_aliases_are_state(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--quant-state QUANT_STATE the same as --state" in text and "--frozen FROZEN the same as --state" in text
