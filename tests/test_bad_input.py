"""Every bad input of every command and every file eamvit reads: one line, exit 2, nothing written.

Each case runs ``eamvit.cli.main.main(argv)`` in an empty working folder and checks the error line,
the exit status, the absence of a traceback, and that no file or folder appeared (inputs made by the
case itself are listed before the run).
"""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import eamvit
from eamvit.cli.main import main
from eamvit.io import save_tensors

from conftest import TINY_VIT, make, write_image_folder
from eamvit.methods.state import state_of

KW = ["img_size=32", "patch_size=8", "num_classes=3", "embed_dim=32", "depth=2", "num_heads=2"]
TINY = ["--model", TINY_VIT[0], "--model-kwargs", *KW]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good inputs shared by the cases: an image folder, a checkpoint, maps of that model."""
    root = tmp_path_factory.mktemp("inputs")
    write_image_folder(root / "images", per_class=2)
    model = make(TINY_VIT)
    torch.save(model.state_dict(), root / "tiny.pth")
    model = eamvit.create_model(TINY_VIT[0], model_kwargs=dict(TINY_VIT[1]), checkpoint=root / "tiny.pth")
    ds = eamvit.build_dataset(str(root / "images"), eamvit.data_config(model))
    eamvit.compute_entropy_maps(model, ds, bits=4, progress=False).save(root / "maps.safetensors")
    return root


def _rewrite(src, dst, change, sign=True):
    """A copy of eamvit file ``src`` with its metadata or tensors changed by ``change(meta, tensors)``.

    ``sign``: store a digest of the changed contents, as one who knows eamvit's digest would, so that
    only the checks behind the digest can catch the change; else keep the original digest.
    """
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        header = f.metadata()
    meta, tensors = json.loads(header["eamvit"]), load_file(str(src))
    change(meta, tensors)
    if sign:
        save_tensors(dst, tensors, meta)
    else:
        save_file(tensors, str(dst), metadata={**header, "eamvit": json.dumps(meta)})
    return dst


def _damaged_maps(src, dst, change):
    """A copy of maps ``src`` with its metadata or tensors changed by ``change(meta, tensors)``, re-signed."""
    return _rewrite(src, dst, change)


def _del(d, k):
    del d[k]


MAP_DAMAGE = {
    "no-layer-shapes": (lambda m, t: _del(m, "layer_shapes"), "layer_shapes"),
    "more-layers": (lambda m, t: m["layer_shapes"].append(m["layer_shapes"][0]), "claims 3 layers"),
    "wrong-shape": (lambda m, t: t.__setitem__("entropy.1", t["entropy.1"][:, :2].contiguous()), "shape"),
    "nan-entropy": (lambda m, t: t["entropy.0"].view(-1).__setitem__(3, float("nan")), "NaN"),
    "nan-mean": (lambda m, t: t["mean.1"].view(-1).__setitem__(0, float("nan")), "NaN"),
    "out-of-range": (lambda m, t: t["entropy.0"].view(-1).__setitem__(0, 99.0), "outside"),
    "other-format": (lambda m, t: m.__setitem__("format", "something/1"), "not an eamvit entropy maps"),
}


def _case(name, inputs, tmp):
    """``(argv, needles)`` of a bad-input case; may create input files in ``tmp``."""
    imgs, ckpt, maps = str(inputs / "images"), str(inputs / "tiny.pth"), str(inputs / "maps.safetensors")
    ev = ["eval", *TINY, "--checkpoint", ckpt, "--data", imgs]
    if name.startswith("damaged-maps-"):
        change, needle = MAP_DAMAGE[name[len("damaged-maps-"):]]
        bad = _damaged_maps(maps, tmp / "bad.safetensors", change)
        return [*ev, "--maps", bad, "--tau", "0.2", "--out", "r"], [needle, "eamvit calibrate"]
    cases = {
        "kwargs-no-equals": (["eval", "--model", TINY_VIT[0], "--model-kwargs", "img_size16"], ["KEY=VALUE"]),
        "kwargs-checkpoint-path": ([*ev[:-2], "--model-kwargs", *KW, f"checkpoint_path={ckpt}", "--data", imgs],
                                   ["checkpoint_path", "--checkpoint"]),
        "kwargs-pretrained-cfg-overlay": (["eval", *TINY, "pretrained_cfg_overlay={'file':'x'}", "--data", imgs],
                                          ["pretrained_cfg_overlay", "--checkpoint"]),
        "kwargs-pretrained": (["eval", *TINY, "pretrained=True", "--data", imgs], ["pretrained"]),
        "kwargs-without-model": (["eval", "--model-kwargs", "img_size=16"], ["--model NAME"]),
        "img-size-0": (["eval", "--img-size", "0"], ["--img-size"]),
        "img-size-17": (["eval", "--img-size", "17"], ["patch size 2"]),
        "img-size-fixed": (["eval", "--img-size", "32"], ["16x16", "img_size=32"]),
        "crop-pct-negative": (["eval", *ev[1:], "--crop-pct", "-1"], ["--crop-pct", "(0, 1]"]),
        "crop-pct-zero": (["eval", *ev[1:], "--crop-pct", "0"], ["(0, 1]"]),
        "crop-pct-above-one": (["eval", *ev[1:], "--crop-pct", "1.5"], ["(0, 1]"]),
        "crop-pct-digits": (["eval", "--crop-pct", "0.9"], ["never cropped"]),
        "workers": (["eval", "--workers", "-1"], ["--workers"]),
        "std-zero": (["eval", "--std", "0"], ["--std must be positive"]),
        "std-negative": (["eval", *ev[1:], "--std", "0.5", "-1", "0.5"], ["--std must be positive"]),
        "mean-length": ([*ev, "--mean", "0.1", "0.2"], ["2 values", "3 channel"]),
        "interpolation-digits": (["eval", "--interpolation", "random"], ["digits"]),
        "device-mps": (["eval", "--device", "mps"], ["not available"]),
        "device-unknown": (["eval", "--device", "tpu9"], ["unknown device"]),
        "batch-size": (["eval", "--batch-size", "0"], ["--batch-size"]),
        "calib-size-too-big": ([*ev, "--tau", "0.2", "--calib-size", "6"], ["--calib-size 6 leaves no images"]),
        "calib-data-digits": ([*ev, "--tau", "0.2", "--calib-data", "digits"], ["--calib-data digits"]),
        "digits-rgb-model": (["eval", *TINY, "--checkpoint", ckpt], ["one channel"]),
        "ckpt-missing": (["eval", "--checkpoint", str(tmp / "nope.pth")], ["does not exist"]),
        "ckpt-folder": (["eval", "--checkpoint", str(tmp)], ["is a folder"]),
        "ckpt-random-bytes": (["eval", "--checkpoint", _file(tmp / "r.pth", os.urandom(3000))],
                              ["not a .pth/.pt/.safetensors state dict"]),
        "ckpt-random-safetensors": (["eval", "--checkpoint", _file(tmp / "r.safetensors", os.urandom(3000))],
                                    ["not a .pth/.pt/.safetensors state dict"]),
        "ckpt-pickled-object": (["eval", "--checkpoint", _pickled(tmp / "p.pth")], ["pickled objects"]),
        "ckpt-not-tensors": (["eval", "--checkpoint", _saved(tmp / "l.pth", [1, 2, 3])], ["not a state dict"]),
        "maps-missing": ([*ev, "--maps", str(tmp / "none.safetensors")], ["do not exist"]),
        "maps-folder": ([*ev, "--maps", str(tmp)], ["is a folder"]),
        "maps-random-bytes": ([*ev, "--maps", _file(tmp / "m.safetensors", os.urandom(500))], ["cannot read"]),
        "calibrate-out-dir": (["calibrate", "--out", str(tmp)], ["is a directory"]),
        "calibrate-out-empty": (["calibrate", "--out", ""], ["--out is empty"]),
        "calibrate-num-samples": (["calibrate", "--out", "m.safetensors", "--num-samples", "5"], ["--calib-size"]),
        "calibrate-partial-wrong-object": (["calibrate", "--calib-size", "4", "--resume", "--out",
                                            _partial(tmp / "m.safetensors")], ["not an eamvit calibration"]),
        "eval-out-dir": (["eval", "--out", str(tmp)], ["is a directory"]),
        "max-memory": (["calibrate", "--out", "m.safetensors", "--max-memory", "lots"], ["memory size"]),
        "plot-layer": (["plot", "--maps", maps, "--layers", "5", "--out", "figs"], ["--layers 5"]),
        "plot-pair": (["plot", "--maps", maps, "--pairs", "9,0", "--out", "figs"], ["--pairs 9,0"]),
        "plot-out-file": (["plot", "--maps", maps, "--out", _file(tmp / "f", b"x")], ["is a file"]),
        "pretrained-bundled": (["eval", "--pretrained"], ["--model NAME"]),
    }
    return cases[name]


def _file(path, data):
    path.write_bytes(data)
    return str(path)


def _saved(path, obj):
    torch.save(obj, path)
    return str(path)


class Payload:
    """A class a pickle would have to import: weights_only loading refuses it."""


def _pickled(path):
    return _saved(path, {"weight": torch.zeros(2), "evil": Payload()})


def _partial(maps_path):
    torch.save(["not", "a", "checkpoint"], str(maps_path) + ".partial")
    return str(maps_path)


CASES = ["kwargs-no-equals", "kwargs-checkpoint-path", "kwargs-pretrained-cfg-overlay", "kwargs-pretrained",
         "kwargs-without-model", "img-size-0", "img-size-17", "img-size-fixed", "crop-pct-negative",
         "crop-pct-zero", "crop-pct-above-one", "crop-pct-digits", "workers", "std-zero", "std-negative",
         "mean-length", "interpolation-digits", "device-mps", "device-unknown", "batch-size",
         "calib-size-too-big", "calib-data-digits", "digits-rgb-model", "ckpt-missing", "ckpt-folder",
         "ckpt-random-bytes", "ckpt-random-safetensors", "ckpt-pickled-object", "ckpt-not-tensors",
         "maps-missing", "maps-folder", "maps-random-bytes", "calibrate-out-dir", "calibrate-out-empty",
         "calibrate-num-samples", "calibrate-partial-wrong-object", "eval-out-dir", "max-memory", "plot-layer",
         "plot-pair", "plot-out-file", "pretrained-bundled"] + [f"damaged-maps-{k}" for k in MAP_DAMAGE]


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _assert_one_line_error(code, err, needles):
    """Exit 2, no traceback, and the error is one line (the last; earlier lines are progress/info)."""
    assert code == 2, err
    assert "Traceback" not in err
    errors = [l for l in err.splitlines() if "eamvit: error:" in l]
    assert len(errors) == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("eamvit: error:") or last.split("\r")[-1].lstrip().startswith("eamvit: error:"), err
    line = last[last.index("eamvit: error:"):]
    for n in needles:
        assert n in line, line


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name, inputs, tmp_path, monkeypatch, capsys):
    if name == "device-mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv, needles = _case(name, inputs, tmp_path)
    before = _tree(tmp_path)
    code = main([str(a) for a in argv])
    _assert_one_line_error(code, capsys.readouterr().err, needles)
    assert _tree(tmp_path) == before  # nothing written, not even an empty folder or a lock


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--workers", "abc"], "--workers: invalid int value"),
    (["eval", "--crop-pct", "x"], "--crop-pct: invalid float value"),
    (["eval", "--no-such-option"], "unrecognized arguments"),
    (["calibrate"], "--out"),
    (["plot", "--maps", "m", "--layers", "a,b"], "--layers"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_are_one_line(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    _assert_one_line_error(e.value.code, capsys.readouterr().err, [needle, "--help"])
    assert list(tmp_path.iterdir()) == []


# Recipe files edited by hand: each step's values are checked against the config's field types and ranges.
BAD_RECIPES = {
    "kind-list": ([{"kind": ["repq"], "version": 1}], "recipe step kind ['repq'] is not one of"),
    "value-bits-string": ([{"kind": "freeze", "version": 1, "tau": 0.2, "value_bits": "4"}],
                          "freeze config field value_bits must be an int, not the string '4'"),
    "w-bits-bool": ([{"kind": "repq", "version": 1, "w_bits": True}],
                    "repq config field w_bits must be an int, not the bool True"),
    "tau-string": ([{"kind": "freeze", "version": 1, "tau": "0.2"}],
                   "freeze config field tau must be a number, not the string '0.2'"),
    "granularity-number": ([{"kind": "freeze", "version": 1, "tau": 0.2, "granularity": 2}],
                           "freeze config field granularity must be one of entry, row, head, not the int 2"),
    "blocks-strings": ([{"kind": "prune", "version": 1, "blocks": ["3"]}],
                       "prune config field blocks must be a tuple of ints, not the tuple ('3',)"),
    "step-not-object": (["freeze"], "a recipe step must be a JSON object, not str"),
    "keep-rate-out-of-range": ([{"kind": "prune", "version": 1, "keep_rate": 1.5}], "keep rate 1.5 is outside (0, 1]"),
}


@pytest.mark.parametrize("command", ["compress", "eval"])
@pytest.mark.parametrize("name", BAD_RECIPES)
def test_hand_edited_recipe_file_is_one_line(command, name, tmp_path, monkeypatch, capsys):
    steps, needle = BAD_RECIPES[name]
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"kind": "recipe", "version": 1, "steps": steps}))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    out = ["--out", "c.safetensors"] if command == "compress" else []
    code = main([command, *TINY, "--recipe", str(recipe), *out])
    _assert_one_line_error(code, capsys.readouterr().err, [needle])
    assert _tree(tmp_path) == before


def test_pickled_checkpoint_runs_no_code(tmp_path, capsys):
    """A checkpoint whose pickle would call os.system is refused, and the command never runs."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"w": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pth")
    code = main(["eval", "--checkpoint", str(tmp_path / "evil.pth")])
    _assert_one_line_error(code, capsys.readouterr().err, ["pickled objects"])
    assert not marker.exists()


# --- writes: a full disk, two runs on one output, temporaries of killed runs -----------------------

def _disk_full(monkeypatch, after=10):
    """Make eamvit.io's one write function fail like a full disk, after writing ``after`` bytes."""
    import eamvit.io as eio

    def full(path, data):
        with open(path, "wb") as f:
            f.write(data[:after])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(eio, "_write", full)


@pytest.mark.parametrize("command", ["calibrate", "eval"])
def test_disk_full_leaves_nothing(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _disk_full(monkeypatch)
    argv = (["calibrate", "--calib-size", "8", "--out", "maps.safetensors"] if command == "calibrate" else
            ["eval", "--num-samples", "8", "--out", "res"])
    code = main(argv)
    _assert_one_line_error(code, capsys.readouterr().err, ["disk full"])
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary, no lock


def test_second_writer_of_one_output_fails(tmp_path, monkeypatch, capsys):
    """While one run holds an output, another writing it fails; a lock of a dead run is taken over."""
    from eamvit.io import output_lock

    monkeypatch.chdir(tmp_path)
    with output_lock(tmp_path / "res.csv"):  # this (live) process is "the other run"
        code = main(["eval", "--num-samples", "4", "--out", "res"])
        _assert_one_line_error(code, capsys.readouterr().err, ["another eamvit run", "res.csv"])
    assert not (tmp_path / "res.csv").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".res.csv.eamvit-lock").write_text(dead.stdout.strip())
    assert main(["eval", "--num-samples", "4", "--out", "res"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.csv", "res.json"]


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    """A writer killed with -9 leaves ``.<name>.eamvit-tmp-<pid>-<n>`` (with safetensors' own
    temporary inside); the next write into that folder removes it, and never a live run's."""
    from eamvit.io import save_tensors

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = tmp_path / f".maps.safetensors.eamvit-tmp-{dead}-0"
    stale.mkdir()
    (stale / ".tmpAbC123").write_bytes(b"x" * 100)
    live = tmp_path / f".other.eamvit-tmp-{os.getppid()}-0"
    live.mkdir()
    save_tensors(tmp_path / "maps.safetensors", {"a": torch.ones(3)}, {"format": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "maps.safetensors"])


def test_results_stem_keeps_its_dots(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for stem in ("eval_0.2", "eval_0.5", "named.csv"):
        assert main(["eval", "--num-samples", "4", "--out", stem]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eval_0.2.csv", "eval_0.2.json", "eval_0.5.csv", "eval_0.5.json", "named.csv", "named.json"]


# --- tampered artifacts: quantized states, maps, frozen attention, ONNX exports ---------------------

from eamvit.methods.quantize import load_quantized, quantize_, save_quantized  # noqa: E402
from eamvit.methods.repq import RepQConfig  # noqa: E402

DIGITS_X = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
KW64 = [k if not k.startswith("img_size") else "img_size=64" for k in KW]  # 65 tokens against 17
TINY64 = ["--model", TINY_VIT[0], "--model-kwargs", *KW64]


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    """A W4A4 RepQ-ViT state of the bundled digits ViT, and one of other weights of that architecture."""
    from eamvit.methods.models import save_checkpoint

    root = tmp_path_factory.mktemp("states")
    model = eamvit.create_model()
    save_quantized(quantize_(model, RepQConfig(calib_size=8), DIGITS_X, progress=False), root / "q.safetensors")
    other = eamvit.create_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_checkpoint(other, root / "other.safetensors")
    other = eamvit.create_model(checkpoint=root / "other.safetensors")
    save_quantized(quantize_(other, RepQConfig(calib_size=8), DIGITS_X, progress=False), root / "other_q.safetensors")
    return root


def _flip_payload(src, dst, suffix, n_bytes):
    """Copy ``src`` with ``n_bytes`` bytes of its tensors whose names end in ``suffix`` inverted in the
    file itself (the safetensors header names each tensor's byte range after the header)."""
    data = bytearray(src.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    left = n_bytes
    for name, info in sorted(header.items()):
        if name == "__metadata__" or not name.endswith(suffix):
            continue
        a, b = info["data_offsets"]
        for i in range(8 + n + a, 8 + n + min(b, a + left)):
            data[i] ^= 0xFF
        left -= min(b - a, left)
    assert left == 0
    dst.write_bytes(bytes(data))
    return dst


def _set_weight_bits(bits):
    def change(meta, tensors):
        for name, q in meta["quantizers"].items():
            if name.endswith("weight_quantizer"):
                q["bits"] = bits
    return change


def _bundled_spec(meta, tensors):
    meta["model"] = eamvit.methods.models.model_spec(eamvit.create_model()).to_dict()


QUANT_TAMPER = {  # name: (change, needles of the re-signed file)
    "weight-bits-2": (_set_weight_bits(2), ["has 2 bits", "w_bits=4", "gives it 4"]),
    "weight-bits-0": (_set_weight_bits(0), ["0 bits, not 2..8"]),
    "config-w-bits-8": (lambda m, t: m["config"].__setitem__("w_bits", 8), ["has 4 bits", "w_bits=8", "gives it 8"]),
}


def _run_bad(argv, tmp_path, monkeypatch, capsys, needles):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    code = main([str(a) for a in argv])
    _assert_one_line_error(code, capsys.readouterr().err, needles)
    assert _tree(tmp_path) == before


def test_flipped_weight_codes_are_refused(states, tmp_path, monkeypatch, capsys):
    """2,048 packed 4-bit codes inverted in the file: valid codes, so only the digest can tell."""
    bad = _flip_payload(states / "q.safetensors", tmp_path / "flipped.safetensors", ".weight.codes", 1024)
    _run_bad(["eval", "--quant-state", bad, "--num-samples", "8", "--out", "r"], tmp_path, monkeypatch, capsys,
             ["was modified after eamvit wrote it (digest mismatch)", "eamvit quantize"])


@pytest.mark.parametrize("sign", [False, True], ids=["digest", "re-signed"])
@pytest.mark.parametrize("case", list(QUANT_TAMPER) + ["relabelled"])
def test_tampered_quantized_state_is_refused(case, sign, states, tmp_path, monkeypatch, capsys):
    if case == "relabelled":  # another checkpoint's state said to be the bundled model's
        src, change, needles = states / "other_q.safetensors", _bundled_spec, ["made from other weights"]
    else:
        src, (change, needles) = states / "q.safetensors", QUANT_TAMPER[case]
    bad = _rewrite(src, tmp_path / "bad.safetensors", change, sign=sign)
    needles = needles if sign else ["digest mismatch"]
    _run_bad(["eval", "--quant-state", bad, "--num-samples", "8", "--out", "r"], tmp_path, monkeypatch, capsys,
             needles + ["eamvit quantize"])


@pytest.fixture(scope="module")
def wide(inputs):
    """The tiny ViT at 64 px (65 tokens against 17; same depth and heads) and a frozen-attention file
    of the 32-px one."""
    from eamvit.methods.freeze import FreezeConfig, freeze_, save_frozen

    model = make(("deit_tiny_patch16_224", {**TINY_VIT[1], "img_size": 64}))
    torch.save(model.state_dict(), inputs / "tiny64.pth")
    small = eamvit.create_model(TINY_VIT[0], model_kwargs=dict(TINY_VIT[1]), checkpoint=inputs / "tiny.pth")
    cfg = FreezeConfig(tau=0.3)
    freeze_(small, eamvit.EntropyMaps.load(inputs / "maps.safetensors"), cfg)
    save_frozen(small, str(inputs / "frozen.safetensors"), cfg)
    spec = state_of(eamvit.create_model(TINY_VIT[0], model_kwargs={**TINY_VIT[1], "img_size": 64},
                                        checkpoint=inputs / "tiny64.pth")).spec.to_dict()
    return inputs, spec


def test_frozen_attention_of_another_token_count_is_refused(wide, tmp_path, monkeypatch, capsys):
    inputs, _ = wide
    argv = ["eval", *TINY64, "--checkpoint", inputs / "tiny64.pth", "--data", inputs / "images",
            "--frozen", inputs / "frozen.safetensors", "--out", "r"]
    _run_bad(argv, tmp_path, monkeypatch, capsys, ["17 tokens", "65 tokens", "model it was written for"])


@pytest.mark.parametrize("sign", [False, True], ids=["digest", "re-signed"])
def test_maps_relabelled_for_another_token_count_are_refused(sign, wide, tmp_path, monkeypatch, capsys):
    inputs, spec = wide
    bad = _rewrite(inputs / "maps.safetensors", tmp_path / "bad.safetensors",
                   lambda m, t: m.__setitem__("model", spec), sign=sign)
    argv = ["eval", *TINY64, "--checkpoint", inputs / "tiny64.pth", "--data", inputs / "images",
            "--maps", bad, "--tau", "0.2", "--out", "r"]
    needles = ["17 tokens", "65 tokens"] if sign else ["digest mismatch"]
    _run_bad(argv, tmp_path, monkeypatch, capsys, needles + ["eamvit calibrate"])


@pytest.mark.parametrize("kind", ["maps", "frozen"])
def test_flipped_maps_and_frozen_files_are_refused(kind, wide, tmp_path, monkeypatch, capsys):
    inputs, _ = wide
    src, suffix = (inputs / "maps.safetensors", ".0") if kind == "maps" else (inputs / "frozen.safetensors", ".1")
    bad = _flip_payload(src, tmp_path / "bad.safetensors", suffix, 4)
    ev = ["eval", *TINY, "--checkpoint", inputs / "tiny.pth", "--data", inputs / "images", "--out", "r"]
    argv = [*ev, "--maps", bad, "--tau", "0.2"] if kind == "maps" else [*ev, "--frozen", bad]
    _run_bad(argv, tmp_path, monkeypatch, capsys, ["digest mismatch"])


def test_files_without_a_digest_are_refused(inputs, tmp_path, monkeypatch, capsys):
    """Files of eamvit 0.2 carry no digest: refused with what to do, never trusted unchecked."""
    from safetensors import safe_open

    with safe_open(str(inputs / "maps.safetensors"), framework="pt") as f:
        meta = f.metadata()["eamvit"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(inputs / "maps.safetensors")), str(old), metadata={"eamvit": meta})
    argv = ["eval", *TINY, "--checkpoint", inputs / "tiny.pth", "--data", inputs / "images", "--maps", old,
            "--tau", "0.2", "--out", "r"]
    _run_bad(argv, tmp_path, monkeypatch, capsys, ["has no digest", "eamvit 0.2", "eamvit calibrate"])


def test_onnx_graph_of_another_size_than_its_metadata_is_refused(inputs, tmp_path, monkeypatch, capsys):
    """A 32-px graph whose metadata says 16 px (model and data config)."""
    import onnx

    good = tmp_path / "m.onnx"
    ckpt, imgs = inputs / "tiny.pth", inputs / "images"
    assert main(["export", *TINY, "--checkpoint", str(ckpt), "--data", str(imgs), "--out", str(good)]) == 0
    proto = onnx.load(str(good))
    prop = next(p for p in proto.metadata_props if p.key == "eamvit")
    meta = json.loads(prop.value)
    meta["model"]["model_kwargs"]["img_size"] = 16
    meta["data_config"]["input_size"] = [3, 16, 16]
    prop.value = json.dumps(meta)
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    good.unlink()
    _run_bad(["eval", "--onnx", tmp_path / "bad.onnx", "--data", imgs, "--out", "r"], tmp_path, monkeypatch, capsys,
             ["takes 3x32x32 images", "give 3x16x16", "eamvit export"])


def test_untampered_files_round_trip(states, wide, tmp_path):
    """What eamvit wrote loads back: the quantized state gives the saved model's logits, bit for bit,
    and the maps and frozen attention their tensors."""
    from eamvit.methods.freeze import load_frozen

    inputs, _ = wide
    model = quantize_(eamvit.create_model(), RepQConfig(calib_size=8), DIGITS_X, progress=False)
    path = save_quantized(model, tmp_path / "q.safetensors")
    fresh = load_quantized(eamvit.create_model(), path)
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    maps = eamvit.EntropyMaps.load(inputs / "maps.safetensors")
    raw = load_file(str(inputs / "maps.safetensors"))
    assert all(torch.equal(maps.entropy[l], raw[f"entropy.{l}"]) for l in range(maps.num_layers))
    small = eamvit.create_model(TINY_VIT[0], model_kwargs=dict(TINY_VIT[1]), checkpoint=inputs / "tiny.pth")
    load_frozen(small, str(inputs / "frozen.safetensors"))
    raw = load_file(str(inputs / "frozen.safetensors"))
    layers = eamvit.modules.attention.attention_layers(small)
    assert any(f"mask.{l}" in raw for l in range(len(layers)))
    for l, m in enumerate(layers):
        if f"mask.{l}" in raw:
            assert torch.equal(m.eam_frozen_mask.cpu(), raw[f"mask.{l}"].bool())
# --- issue 15: options that cannot apply, inputs that cannot be scored, outputs left behind ---------

DIGITS_LABELS = "0123456789"
SMALL_CROSSVIT = ["embed_dim=(16,32)", "depth=((1,1,0),)", "num_heads=(1,1)", "mlp_ratio=(1,1,1)"]


def _digit_folder(root, classes, per_class=3):
    """An ImageFolder of real scikit-learn digits as 16-px grayscale PNGs, one folder per digit."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in classes:
        (root / c).mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(d.target == int(c))[:per_class]):
            img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((16, 16), Image.BILINEAR)
            img.save(root / c / f"{j}.png")
    return root


def _evil_pickle(path, marker):
    """A torch file whose pickle would create ``marker`` if it were ever executed."""
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"w": torch.zeros(1), "x": Evil()}, path)
    return str(path)


@pytest.fixture(scope="module")
def more(inputs, tmp_path_factory):
    """Inputs of the issue-15 cases: digit folders (ten classes, one class, one image, a cut PNG), a
    3-channel fp32 ONNX export, a quantized state and a saved freeze of the tiny ViT."""
    from eamvit.methods.export import export_onnx
    from eamvit.methods.freeze import FreezeConfig, freeze_, save_frozen
    from eamvit.methods.quantize import quantize_, save_quantized
    from eamvit.methods.repq import RepQConfig

    root = tmp_path_factory.mktemp("more")
    _digit_folder(root / "digits", DIGITS_LABELS)
    _digit_folder(root / "seven", "7")
    _digit_folder(root / "single", "3", per_class=1)
    _digit_folder(root / "cut", DIGITS_LABELS)
    png = root / "cut" / "3" / "0.png"
    png.write_bytes(png.read_bytes()[:40])  # a PNG cut short: its header survives, its pixels do not
    rgb = make(("deit_tiny_patch16_224", dict(img_size=16, patch_size=8, num_classes=10, embed_dim=16, depth=1,
                                              num_heads=2)))
    export_onnx(rgb, root / "rgb.onnx")
    q = quantize_(make(TINY_VIT), RepQConfig(calib_size=8), (torch.randn(8, 3, 32, 32), torch.zeros(8).long()),
                  progress=False)
    save_quantized(q, root / "q.safetensors")
    frozen = eamvit.create_model(TINY_VIT[0], model_kwargs=dict(TINY_VIT[1]), checkpoint=inputs / "tiny.pth")
    freeze_(frozen, eamvit.EntropyMaps.load(inputs / "maps.safetensors"), FreezeConfig(tau=0.5))
    save_frozen(frozen, root / "frozen.safetensors", FreezeConfig(tau=0.5))
    return root


def _more_case(name, inputs, more, tmp):
    """``(argv, needles)`` of an issue-15 case; may create input files in ``tmp``."""
    ckpt, imgs = str(inputs / "tiny.pth"), str(inputs / "images")
    tiny = [*TINY, "--checkpoint", ckpt, "--data", imgs]
    evil = lambda: _evil_pickle(tmp / "evil.pth", tmp / "ran")  # noqa: E731
    cases = {
        "onnx-threads": lambda: (["eval", "--onnx", more / "rgb.onnx", "--data", more / "digits", "--threads", "-1"],
                                 ["--threads must be at least 1"]),
        "threads-without-onnx": lambda: (["eval", "--threads", "2"], ["--threads", "without --onnx"]),
        "export-weight-only-a-bits": lambda: (["export", *tiny, "--quant", "repq", "--target", "weight-only",
                                               "--a-bits", "4", "--out", "m.onnx"], ["--a-bits", "weight-only"]),
        "export-scheme-without-quant": lambda: (["export", *tiny, "--target", "weight-only", "--out", "m.onnx"],
                                                ["--target", "without a quantization"]),
        "quant-state-w-bits": lambda: (["eval", *tiny, "--quant-state", more / "q.safetensors", "--w-bits", "8"],
                                       ["--w-bits", "--quant-state"]),
        "quant-state-quant-pmq": lambda: (["eval", *tiny, "--quant-state", more / "q.safetensors", "--quant", "pmq"],
                                          ["--quant ", "--quant-state"]),
        "frozen-granularity": lambda: (["eval", *tiny, "--frozen", more / "frozen.safetensors", "--granularity",
                                        "head"], ["--granularity", "--frozen"]),
        "w-bits-without-quant": lambda: (["eval", "--w-bits", "6"], ["--w-bits", "without --quant"]),
        "export-bogus-scheme-new-folder": lambda: (["export", "--target", "bogus", "--out", "sub/m.onnx"],
                                                   ["--target", "bogus"]),
        "quantize-missing-checkpoint-new-folder": lambda: (["quantize", "--checkpoint", tmp / "nope.pth", "--out",
                                                            "new/q.safetensors"], ["does not exist"]),
        "demo-pickle": lambda: (["demo", "--checkpoint", evil(), "--out", "new/demo"], ["pickled objects"]),
        "compare-pickle": lambda: (["compare", "--checkpoint", evil(), "--out", "new/compare"], ["pickled objects"]),
        "sweep-pickle": lambda: (["sweep", "--checkpoint", evil(), "--out", "new/sweep"], ["pickled objects"]),
        "onnx-rgb-on-digits": lambda: (["eval", "--onnx", more / "rgb.onnx"], ["--data digits has one channel",
                                                                               "3-channel"]),
        "tau-one-image-folder": lambda: (["eval", "--data", more / "single", "--tau", "0.2"], ["1 image", "--calib-data"]),
        "adfq-pickled-unit": lambda: _adfq_case(tmp, evil()),
        "adfq-corrupt-unit": lambda: _adfq_case(tmp, _file(tmp / "junk.pt", os.urandom(700))),
        # CrossViT has maps, entry freezing and the quantizers (tests/test_families*.py) but no token
        # pruning: refused before any data is read (the folder does not exist).
        "crossvit": lambda: (["eval", "--model", "crossvit_tiny_240", "--model-kwargs", *SMALL_CROSSVIT, "--prune",
                              "evit", "--data", tmp / "no-such-folder"],
                             ["CrossViT", "token pruning", "eamvit models"]),
    }
    return cases[name]()


def _adfq_case(tmp, unit_file):
    """ADFQ-ViT on the bundled model with a checkpoint folder whose first unit checkpoint is ``unit_file``."""
    (tmp / "adfq").mkdir()
    os.replace(unit_file, tmp / "adfq" / "unit_000.pt")
    return (["eval", "--quant", "adfq", "--adfq-calib-size", "4", "--adfq-iterations", "1", "--num-samples", "4",
             "--adfq-checkpoint-dir", tmp / "adfq"], ["ADFQ-ViT checkpoint", "unit_000.pt", "delete it"])


MORE_CASES = ["onnx-threads", "threads-without-onnx", "export-weight-only-a-bits", "export-scheme-without-quant",
              "quant-state-w-bits", "quant-state-quant-pmq", "frozen-granularity", "w-bits-without-quant",
              "export-bogus-scheme-new-folder", "quantize-missing-checkpoint-new-folder", "demo-pickle",
              "compare-pickle", "sweep-pickle", "onnx-rgb-on-digits", "tau-one-image-folder", "adfq-pickled-unit",
              "adfq-corrupt-unit", "crossvit"]


@pytest.mark.parametrize("name", MORE_CASES)
def test_bad_input_issue15(name, inputs, more, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv, needles = _more_case(name, inputs, more, tmp_path)
    before = _tree(tmp_path)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err, needles)
    assert "--crop-pct" not in err and "weights_only" not in err
    assert _tree(tmp_path) == before  # no empty output folder, no lock, no temporary
    assert not (tmp_path / "ran").exists()  # no pickle was executed


def test_one_class_folder_warns(more, tmp_path, monkeypatch, capsys):
    """ImageFolder scores folder `7/` as class 0: the run warns instead of silently reporting 0 %; a folder
    of all ten digits 0..9 gets no warning."""
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--data", str(more / "seven")]) == 0
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("eamvit: warning:")]
    assert len(warnings) == 1 and "1 class folder for a 10-class model" in warnings[0], warnings
    assert "folder 7 is scored as class 0" in warnings[0]
    assert main(["eval", "--data", str(more / "digits")]) == 0
    assert "eamvit: warning:" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_finetune_counts_a_cut_png(more, tmp_path, monkeypatch, capsys):
    """30 files, one cut short: fine-tuning says 29 images and 1 skipped, not 31 or 30."""
    monkeypatch.chdir(tmp_path)
    files = sorted((more / "cut").rglob("*.png"))
    assert len(files) == 30
    code = main(["finetune", "--data", str(more / "cut"), "--epochs", "1", "--batch-size", "16", "--out", "ft"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "on 29 images (1 unreadable skipped)" in out, out
    history = json.loads((tmp_path / "ft" / "finetune.json").read_text())["history"]
    assert history[-1]["skipped_images"] == 1


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_second_writer_of_quantize_and_export_fails(command, tmp_path, monkeypatch, capsys):
    """quantize and export hold the output lock: while another run writes --out, a second one fails."""
    from eamvit.io import output_lock

    monkeypatch.chdir(tmp_path)
    out = tmp_path / ("q.safetensors" if command == "quantize" else "m.onnx")
    with output_lock(out):  # this (live) process is "the other run"
        code = main([command, "--out", out.name] + (["--quant-calib-size", "4"] if command == "quantize" else []))
        _assert_one_line_error(code, capsys.readouterr().err, ["another eamvit run", out.name])
        assert sorted(p.name for p in tmp_path.iterdir()) == [f".{out.name}.eamvit-lock"]
    assert list(tmp_path.iterdir()) == []


class _LockDiskFull:
    """``os`` for eamvit.io, except that writing a lock's pid finds the disk full."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def write(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_at_the_lock(tmp_path, monkeypatch, capsys):
    import eamvit.io as eio

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(eio, "os", _LockDiskFull())
    code = main(["eval", "--num-samples", "4", "--out", "sub/res"])
    _assert_one_line_error(code, capsys.readouterr().err, ["disk full", "res.csv"])
    assert list(tmp_path.iterdir()) == []  # no lock left on the full disk, no empty folder


def test_killed_run_leftovers_are_removed_at_the_start(tmp_path, monkeypatch, capsys):
    """A run killed with -9 leaves an empty temporary folder and its lock; the next command writing
    into that folder removes both before it starts (here it is then refused), never a live run's."""
    monkeypatch.chdir(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = dead.stdout.strip()
    (tmp_path / f".m.onnx.eamvit-tmp-{dead}-0").mkdir()
    (tmp_path / ".m.onnx.eamvit-lock").write_text(dead)
    live = tmp_path / ".other.onnx.eamvit-lock"
    live.write_text(str(os.getppid()))
    code = main(["export", "--checkpoint", str(tmp_path / "missing.pth"), "--out", "m.onnx"])
    _assert_one_line_error(code, capsys.readouterr().err, ["does not exist"])
    assert [p.name for p in tmp_path.iterdir()] == [live.name]


# --- issue 21 §7: data folders, optimize's cache, lock and sample size, metadata of files eamvit reads ----

def _garbage_folder(root):
    """Two class folders of ``.png`` files that hold no image."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            (root / c / f"{i}.png").write_bytes(b"not an image " * 20)
    return root


@pytest.mark.parametrize("command", ["eval", "optimize"])
def test_folder_of_unreadable_images_is_refused(command, tmp_path, monkeypatch, capsys):
    """Every file unreadable: refused when the folder is opened, naming it and the first bad file
    (a folder with some readable images skips and counts the others: test_finetune_counts_a_cut_png)."""
    bad = _garbage_folder(tmp_path / "garbage")
    extra = ["--runtime", "torch", "--out", "o"] if command == "optimize" else ["--out", "r"]
    _run_bad([command, "--data", bad, *extra], tmp_path, monkeypatch, capsys,
             [f"no image in {bad} can be read", "all 4 files", str(bad / "a" / "0.png"), "cannot identify image"])


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe\x00garbage\x81" * 10, "byte 0 is not text"),
    (b"{}\n", "line 1: not {"),
    (b'{"key": "0", "point": {}}\n', "line 1: its point has no label"),
], ids=["garbage-bytes", "empty-object", "empty-point"])
def test_optimize_cache_it_cannot_read_is_refused(content, words, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "points.jsonl").write_bytes(content)
    _run_bad(["optimize", "--runtime", "torch", "--reps", "3", "--out", out], tmp_path, monkeypatch, capsys,
             [f"cannot resume from {out / 'points.jsonl'}", words, "delete it", "another --out"])
    assert (out / "points.jsonl").read_bytes() == content


def test_second_optimize_on_one_out_is_refused(tmp_path, monkeypatch, capsys):
    """The lock names the run that holds it, and is the run's own to remove."""
    from eamvit.io import output_lock

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o"
    with output_lock(out / "points.jsonl"):  # this (live) process is "the other run"
        before = _tree(tmp_path)
        code = main(["optimize", "--runtime", "torch", "--out", str(out)])
        _assert_one_line_error(code, capsys.readouterr().err,
                               [f"another eamvit run (pid {os.getpid()}) is writing {out / 'points.jsonl'}"])
        assert _tree(tmp_path) == before
    assert list(out.iterdir()) == []


def test_stale_optimize_lock_is_taken_over_and_removed_on_error(tmp_path, monkeypatch, capsys):
    """A lock of a killed run is taken over (the run goes on to read its cache, refused here), and
    the run's own lock is gone after its error."""
    monkeypatch.chdir(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "o"
    out.mkdir()
    (out / ".points.jsonl.eamvit-lock").write_text(dead.stdout.strip())
    (out / "points.jsonl").write_text("{}\n")
    code = main(["optimize", "--runtime", "torch", "--reps", "3", "--out", str(out)])
    _assert_one_line_error(code, capsys.readouterr().err, ["cannot resume from"])
    assert [p.name for p in out.iterdir()] == ["points.jsonl"]


def test_optimize_on_too_few_held_out_images_is_refused(inputs, tmp_path, monkeypatch, capsys):
    """6 images: 3 calibrate, 3 are scored, so top-1 moves in steps of 33 points, not 1."""
    argv = ["optimize", *TINY, "--checkpoint", inputs / "tiny.pth", "--data", inputs / "images", "--runtime", "torch",
            "--out", "o"]
    _run_bad(argv, tmp_path, monkeypatch, capsys, ["3 held-out images cannot resolve --max-drop 1",
                                                   "one image is 33.3 points", "at least 100 held-out images",
                                                   "--max-drop 33.34 or more"])


@pytest.fixture(scope="module")
def compressed(inputs):
    """A compressed (token-pruned) tiny ViT and a checkpoint of it with its data config, both written by eamvit."""
    from eamvit.methods.models import save_checkpoint

    path = inputs / "c.safetensors"
    assert main([str(a) for a in ["compress", *TINY, "--checkpoint", inputs / "tiny.pth", "--data", inputs / "images",
                                  "--prune", "evit", "--keep-rate", "0.7", "--out", path]]) == 0
    save_checkpoint(make(TINY_VIT), inputs / "ckpt.safetensors")
    return path


def _set(key, value, sub=None):
    return lambda m, t: (m[sub] if sub else m).__setitem__(key, value)


@pytest.mark.parametrize("kind", ["compressed", "quantized"])
@pytest.mark.parametrize("records", [5, "abc", {"data": None}], ids=["number", "text", "mapping"])
def test_calibration_records_that_are_not_a_list_are_refused(kind, records, compressed, states, inputs, tmp_path,
                                                             monkeypatch, capsys):
    src = compressed if kind == "compressed" else states / "q.safetensors"
    bad = _rewrite(src, tmp_path / "bad.safetensors", _set("calibration", records))
    argv = (["eval", *TINY, "--checkpoint", inputs / "tiny.pth", "--data", inputs / "images", "--state", bad]
            if kind == "compressed" else ["eval", "--quant-state", bad, "--num-samples", "8"])
    _run_bad([*argv, "--out", "r"], tmp_path, monkeypatch, capsys,
             [str(bad), "malformed record of its calibration images", "create it again"])


def test_restoring_calibration_records_that_are_not_a_list_is_refused(compressed, inputs, tmp_path):
    """The library path too: restore_ (optimize's best file, `eval --state`) refuses them."""
    from eamvit.methods.recipe import restore_

    bad = _rewrite(compressed, tmp_path / "bad.safetensors", _set("calibration", 5))
    model = eamvit.create_model(TINY_VIT[0], model_kwargs=dict(TINY_VIT[1]), checkpoint=inputs / "tiny.pth")
    with pytest.raises(eamvit.EamError, match="malformed record of its calibration images"):
        restore_(model, bad)


@pytest.mark.parametrize("size, shown", [([3, 7, 7], "[3, 7, 7]"), ("abc", "'abc'"), ([1, 32, 32], "[1, 32, 32]"),
                                         ([32, 32], "[32, 32]")], ids=["7px", "text", "1-channel", "2-values"])
@pytest.mark.parametrize("kind", ["compressed", "checkpoint"])
def test_data_config_input_size_the_model_cannot_take_is_refused(kind, size, shown, compressed, inputs, tmp_path,
                                                                 monkeypatch, capsys):
    """The tiny ViT reads 3x32x32 images (TINY_VIT: img_size=32, RGB)."""
    if kind == "compressed":
        bad = _rewrite(compressed, tmp_path / "bad.safetensors", _set("input_size", size, "data_config"))
        argv, origin = [*TINY, "--checkpoint", inputs / "tiny.pth", "--state", bad], f"compressed model {bad}"
    else:
        bad = _rewrite(inputs / "ckpt.safetensors", tmp_path / "bad.safetensors",
                       _set("input_size", size, "data_config"))
        argv, origin = [*TINY, "--checkpoint", bad], "the checkpoint's data config"
    _run_bad(["eval", *argv, "--data", inputs / "images", "--out", "r"], tmp_path, monkeypatch, capsys,
             [f"input_size {shown} from {origin}", "not what the model takes (3x32x32 images)"])
