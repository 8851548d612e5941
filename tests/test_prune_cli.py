"""`eamvit eval --prune`, `eamvit sweep --prune`, `eamvit finetune`: thin wrappers, one-line errors."""
from __future__ import annotations

import json

import pytest

from eamvit.cli.main import main

from conftest import single_thread

M = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=16", "patch_size=2", "in_chans=1",
     "num_classes=10", "embed_dim=32", "depth=4", "num_heads=2"]


one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def test_eval_with_pruning(tmp_path, capsys):
    assert main(["eval", *M, "--num-samples", "32", "--prune", "renyi", "--alpha", "inf", "--keep-rate", "0.5",
                 "--out", str(tmp_path / "r")]) == 0
    row = json.loads((tmp_path / "r.json").read_text())[0]
    assert row["prune"] == "renyi" and row["alpha"] == "inf" and row["tokens"] == "64-32-16-8"


def test_prune_sweep(tmp_path):
    assert main(["sweep", "--prune", *M, "--num-samples", "32", "--keep-rates", "0.7", "--methods",
                 "shannon,evit", "--no-throughput", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "prune_sweep.json").read_text())
    assert [r["prune"] for r in rows] == [None, "shannon", "evit"]
    assert (tmp_path / "prune_sweep.png").is_file() and (tmp_path / "prune_sweep.md").is_file()
    assert (tmp_path / "kept_patches.png").stat().st_size > 1000 and (tmp_path / "token_entropy.png").is_file()


def test_finetune_and_resume(tmp_path, capsys):
    args = ["finetune", *M, "--epochs", "1", "--lr", "1e-3", "--keep-rate", "0.5", "--batch-size", "256",
            "--out", str(tmp_path)]
    assert main(args) == 0
    assert (tmp_path / "finetuned.safetensors").is_file() and (tmp_path / "finetune_ckpt.pth").is_file()
    hist = json.loads((tmp_path / "finetune.json").read_text())["history"]
    assert len(hist) == 1 and "top1" in hist[0]
    assert main([*args[:-2], "--prune", "evit", "--out", str(tmp_path)]) == 2
    assert "different prune configuration" in capsys.readouterr().err


@pytest.mark.parametrize("extra,msg", [
    (["--prune", "shannon", "--keep-rate", "0"], "keep rate 0.0 is outside (0, 1]"),
    (["--prune", "renyi", "--alpha", "-0.5"], "must be ≥ 0"),
    (["--prune", "shannon", "--prune-blocks", "9"], "outside the model's 4 blocks"),
])
def test_bad_pruning_input_is_one_line_exit_2(extra, msg, capsys):
    assert main(["eval", *M, "--num-samples", "8", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and err.count("\n") == 0 and err.startswith("eamvit: error:")
