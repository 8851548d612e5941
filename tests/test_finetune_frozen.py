"""Fine-tuning with frozen attention: the frozen entries stay at their values while everything else trains,
the saved weights + frozen attention reload to the same model, resuming checks the frozen maps, and the
CLI refuses bad input in one line."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

import eamvit
from eamvit.cli.main import main
from eamvit.errors import EamError
from eamvit.experiments.frozen_finetune import frozen_finetune_table, markdown_table
from eamvit.experiments.runner import EvalData
from eamvit.experiments.results import write_table
from eamvit.methods.data import DigitsDataset
from eamvit.methods.evaluate import evaluate
from eamvit.methods.finetune import FROZEN, WEIGHTS, FinetuneConfig, finetune
from eamvit.methods.freeze import FreezeConfig, freeze_, frozen_values, load_frozen
from eamvit.methods.prune import PruneConfig, prune_
from eamvit.modules.attention import attention_layers, observe

from conftest import single_thread

NAME = "vit_tiny_patch16_224"
KW = dict(img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=2)
M = ["--model", NAME, "--model-kwargs", *[f"{k}={v}" for k, v in KW.items()]]
CFG = FinetuneConfig(epochs=1, lr=1e-3, min_lr=1e-4, batch_size=16, label_smoothing=0.0)


one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def small_model():
    torch.manual_seed(0)
    return eamvit.create_model(NAME, model_kwargs=KW)


@pytest.fixture(scope="module")
def data():
    """(training subset with augmentation, test subset, entropy maps of :func:`small_model`)."""
    train = Subset(DigitsDataset("train", img_size=16, augment=True), range(48))
    test = Subset(DigitsDataset("test", img_size=16), range(64))
    maps = eamvit.compute_entropy_maps(small_model(), Subset(DigitsDataset("train", img_size=16), range(64)),
                                       bits=6, progress=False)
    return train, test, maps


def _reference_attention_output(module, x, mask, values):
    """timm's attention computed by hand, with ``mask``ed entries replaced by ``values``: ``(map, output)``."""
    B, N, C = x.shape
    H = module.num_heads
    q, k, v = F.linear(x, module.qkv.weight, module.qkv.bias).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    attn = ((q * module.scale) @ k.transpose(-2, -1)).softmax(-1)
    mixed = torch.where(mask, values, attn)
    return attn, F.linear((mixed @ v).transpose(1, 2).reshape(B, N, C), module.proj.weight, module.proj.bias)


def test_frozen_entries_stay_and_the_rest_trains(data):
    train, test, maps = data
    model = small_model()
    fcfg = FreezeConfig(tau=0.5)
    freeze_(model, maps, fcfg)
    layers = attention_layers(model)
    masks = [m.eam_frozen_mask.clone() for m in layers]
    expected = [frozen_values(maps.mean[l]) for l in range(len(layers))]  # A^μ, computed independently
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, train, CFG, progress=False, freeze=fcfg)
    for k, v in model.state_dict().items():  # every weight trains (none is tied to the frozen entries)
        assert not torch.equal(v, before[k]), k
    x = torch.stack([test[i][0] for i in range(8)])
    for l in (0, len(layers) - 1):
        module, seen = layers[l], {}
        assert torch.equal(module.eam_frozen_mask, masks[l]) and torch.equal(module.eam_frozen_values, expected[l])
        hooks = [module.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
                 module.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))]
        with observe(model, {l: lambda a, mask: seen.__setitem__("attn", a.clone())}), torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            attn, out = _reference_attention_output(module, seen["x"], masks[l], expected[l])
            _, unfrozen = _reference_attention_output(module, seen["x"], torch.zeros_like(masks[l]), expected[l])
        assert torch.allclose(seen["attn"], attn, atol=1e-5)  # the observed map is the computed one
        err = (seen["out"] - out).abs().max().item()  # the layer uses A^μ where frozen ...
        gap = (unfrozen - out).abs().max().item()  # ... which would be told apart from not freezing
        assert err < 1e-6 and gap > 1e-5


@pytest.mark.parametrize("granularity", ["entry", "head"])
def test_saved_model_reloads_through_the_cli(granularity, data, tmp_path, capsys):
    train, _, maps = data
    model = small_model()
    fcfg = FreezeConfig(tau=0.5, granularity=granularity)
    freeze_(model, maps, fcfg)
    finetune(model, train, CFG, out_dir=tmp_path, progress=False, freeze=fcfg)
    test = DigitsDataset("test", img_size=16)
    top1 = evaluate(model, test, progress=False)["top1"]
    assert main(["eval", *M, "--checkpoint", str(tmp_path / WEIGHTS), "--frozen", str(tmp_path / FROZEN),
                 "--out", str(tmp_path / "r")]) == 0
    row = json.loads((tmp_path / "r.json").read_text())[0]
    assert row["top1"] == top1 and row["granularity"] == granularity and row["tau"] == 0.5
    again = eamvit.create_model(NAME, model_kwargs=KW, checkpoint=tmp_path / WEIGHTS)
    load_frozen(again, str(tmp_path / FROZEN))
    x = torch.stack([test[i][0] for i in range(16)])
    unfrozen = eamvit.create_model(NAME, model_kwargs=KW, checkpoint=tmp_path / WEIGHTS)
    with torch.no_grad():
        ref = model(x)
        same, other = (again(x) - ref).abs().max().item(), (unfrozen(x) - ref).abs().max().item()
    assert same < 1e-6 and other > 1e-5  # the reloaded frozen maps matter, and they are the trained ones


def test_identity_records_pruning_and_freezing(data, tmp_path):
    train, _, maps = data
    m = small_model()
    fcfg = FreezeConfig(tau=0.3)
    freeze_(m, maps, fcfg)
    prune_(m, PruneConfig(keep_rate=0.7))
    finetune(m, train, CFG, out_dir=tmp_path, progress=False, freeze=fcfg)
    ident = json.loads((tmp_path / "finetune.json").read_text())["identity"]
    assert set(ident) == {"train", "prune", "freeze", "model"}
    assert ident["freeze"]["config"]["tau"] == 0.3 and len(ident["freeze"]["digest"]) == 64
    with pytest.raises(EamError, match="not pruned, merged nor frozen"):
        finetune(small_model(), train, CFG, progress=False)
    with pytest.raises(EamError, match="no frozen attention"):  # a config that was never applied
        finetune(small_model(), train, CFG, progress=False, freeze=FreezeConfig(tau=0.5))


def test_cli_finetune_writes_reloadable_output_and_resume_checks_the_frozen_maps(data, tmp_path, capsys):
    _, _, maps = data
    out = tmp_path / "o"
    run = lambda tau, *extra: main(["finetune", *M, "--tau", tau, "--epochs", "1", "--lr", "1e-3", "--batch-size",
                                    "32", "--num-samples", "64", "--out", str(out), *extra])
    assert run("0.5") == 0
    text = capsys.readouterr().out
    assert f"--checkpoint {out / WEIGHTS} --frozen {out / FROZEN}" in text and "eamvit eval" in text
    ident = json.loads((out / "finetune.json").read_text())["identity"]
    assert "prune" not in ident and ident["freeze"]["config"]["tau"] == 0.5  # --tau alone: no pruning
    # The same options (maps recomputed, hence the same digest) resume; another τ or other maps do not.
    assert run("0.5", "--maps", str(out / "maps.safetensors")) == 0
    capsys.readouterr()
    assert run("0.7") == 2
    assert "different freeze configuration" in capsys.readouterr().err
    maps.save(tmp_path / "other.safetensors")  # the same model's maps from other images
    assert run("0.5", "--maps", str(tmp_path / "other.safetensors")) == 2
    assert "different freeze configuration" in capsys.readouterr().err


@pytest.fixture(scope="module")
def map_files(data, tmp_path_factory):
    """``MAPS``: maps of the tiny model; ``BUNDLED``: maps of another model (the digits ViT, 4 heads, not 2)."""
    root = tmp_path_factory.mktemp("maps")
    data[2].save(root / "maps.safetensors")
    eamvit.compute_entropy_maps(eamvit.create_model(eamvit.BUNDLED_MODEL),
                                Subset(DigitsDataset("train", img_size=16), range(8)), bits=4,
                                progress=False).save(root / "bundled.safetensors")
    return {"MAPS": root / "maps.safetensors", "BUNDLED": root / "bundled.safetensors"}


@pytest.mark.parametrize("extra,msg", [
    (["--tau", "1.5"], "outside [0, 1]"),
    (["--tau", "0.5", "--granularity", "head", "--scope", "head"], "scope 'head' does not apply"),
    (["--tau", "0.5", "--value-bits", "0"], "outside 1..16"),
    (["--maps", "MAPS"], "give --tau > 0 with it"),
    (["--tau", "0.5", "--maps", "missing.safetensors"], "do not exist"),
    (["--tau", "0.5", "--maps", "BUNDLED"], "recompute them for this model"),
])
def test_bad_frozen_finetune_input_is_one_line_exit_2(extra, msg, map_files, tmp_path, capsys):
    extra = [str(map_files.get(e, e)) for e in extra]
    capsys.readouterr()
    assert main(["finetune", *M, "--epochs", "1", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and err.count("\n") == 0 and err.startswith("eamvit: error:")
    assert not (tmp_path / "o").exists()


def test_table_rows_are_written(data, tmp_path):
    train, test, maps = data
    model = small_model()
    rows = frozen_finetune_table(model, train, EvalData(test, batch_size=256), maps, taus=(0.5,), config=CFG)
    assert [(r["tau"], r["selection"]) for r in rows] == [(0.5, "entropy"), (0.5, "random")]
    assert all(0 <= r["top1"] <= 100 and 0 <= r["top1_finetuned"] <= 100 for r in rows)
    assert attention_layers(model)[0].eam_frozen_mask is None  # the model itself is left unfrozen
    files = write_table(tmp_path / "t", rows)
    assert json.loads(files["json"].read_text())[1]["selection"] == "random"
    assert "top-1 fine-tuned" in markdown_table(rows)


@pytest.mark.parametrize("extra,msg", [
    (["--tau", "0.5", "--granularity", "row"], "row granularity does not apply to Swin"),
    (["--prune", "evit"], "token pruning does not apply to Swin"),
])
def test_swin_refusals_come_before_any_output(extra, msg, tmp_path, capsys):
    swin = ["--model", "swin_tiny_patch4_window7_224", "--model-kwargs", "img_size=32", "patch_size=2",
            "window_size=4", "embed_dim=16", "depths=2,2", "num_heads=2,2", "num_classes=10"]
    assert main(["finetune", *swin, "--epochs", "1", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eamvit: error: " + msg) and err.count("\n") == 0
    assert not (tmp_path / "o").exists()
