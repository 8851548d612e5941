"""One keep rate and one Rényi order per pruning block: token counts by hand, the single value unchanged,
the compressed file and the ONNX export, the greedy per-block search on a case whose answer is known,
and the refusals."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import eamvit
from eamvit.errors import EamError
from eamvit.experiments.per_block_sweep import PerBlockSweepConfig, per_block_sweep
from eamvit.experiments.runner import EvalData
from eamvit.methods.export import export_onnx
from eamvit.methods.prune import PruneConfig, prune_, set_keep_rate, unprune_
from eamvit.methods.recipe import Recipe, apply_, load, read_recipe, save_compressed
from eamvit.methods.state import state_of
from eamvit.modules.attention import layer_shapes

from conftest import run

TINY = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=48, num_heads=3)  # 8x8 = 64 patches, 12 blocks
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def tiny():
    torch.manual_seed(0)
    return eamvit.create_model("deit_tiny_patch16_224", model_kwargs=TINY).eval()


def tokens_per_layer(model) -> list[int]:
    return [s[-1] for s in layer_shapes(model, X)]


def test_per_block_keep_rates_give_the_hand_counted_tokens():
    model = tiny()
    # Blocks 3, 6, 9 (EViT's of 12); placement attn: a block's attention still sees its input tokens.
    # 64 patches -> ceil(0.5*64) = 32 -> κ = 1 keeps 32 -> ceil(0.25*32) = 8; plus the class token.
    report = prune_(model, PruneConfig(method="renyi", keep_rate=(0.5, 1.0, 0.25), alpha=(2.0, math.inf, 1.0)))
    assert report.blocks == [3, 6, 9] and report.tokens_per_stage == [64, 32, 32, 8]
    assert tokens_per_layer(model) == [65] * 4 + [33] * 6 + [9] * 2
    # EViT fuses the dropped tokens into one where a stage drops any: 64 -> 32+1 = 33 -> 33 -> ceil(8.25)+1 = 10.
    report = prune_(model, PruneConfig(method="evit", keep_rate=(0.5, 1.0, 0.25)))
    assert report.tokens_per_stage == [64, 33, 33, 10]
    assert tokens_per_layer(model) == [65] * 4 + [34] * 6 + [11] * 2
    # The fine-tuning schedule sets one κ per block, or one for all (still EViT: 64 -> 32 + 1 fused).
    set_keep_rate(model, (1.0, 1.0, 0.5))
    assert tokens_per_layer(model) == [65] * 10 + [34] * 2
    set_keep_rate(model, 1.0)
    assert tokens_per_layer(model) == [65] * 12


@torch.no_grad()
def test_one_value_equals_the_same_value_in_every_block_and_saves_as_before():
    model = tiny()
    for method, alpha in (("renyi", 2.0), ("renyi", math.inf), ("shannon", 2.0), ("evit", 2.0)):
        one = PruneConfig(method=method, keep_rate=0.6, alpha=alpha)
        prune_(model, one)
        ref = model(X)
        each = PruneConfig(method=method, keep_rate=(0.6, 0.6, 0.6), alpha=(alpha,) * 3 if method == "renyi" else alpha)
        prune_(model, each)
        assert torch.equal(model(X), ref)
    # The single-value file is the one written before per-block values existed (written out by hand).
    assert PruneConfig(method="renyi", keep_rate=0.7, alpha=math.inf).to_dict() == {
        "kind": "prune", "version": 1, "method": "renyi", "keep_rate": 0.7, "alpha": "inf", "blocks": None,
        "fuse": None, "placement": "attn", "keys": "all", "seed": 0, "record_scores": False, "frozen_after": "drop"}


@torch.no_grad()
def test_per_block_config_survives_the_compressed_file_and_the_onnx_export(tmp_path):
    import onnxruntime as ort

    config = PruneConfig(method="renyi", keep_rate=(0.75, 0.5, 1.0), alpha=(math.inf, 0.5, 2.0))
    recipe = Recipe(steps=(config,))
    model = tiny()
    apply_(model, recipe, None)
    want = model(X)
    path = save_compressed(model, tmp_path / "p.safetensors", recipe)
    assert read_recipe(path) == recipe
    loaded = load(path, tiny())
    assert state_of(loaded).prune.config == config
    assert torch.equal(loaded(X), want)
    onnx = export_onnx(loaded, tmp_path / "p.onnx").path
    got = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(None, {"images": X.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    # A recipe file (JSON, infinity written as "inf") reads back to the same config.
    (tmp_path / "r.json").write_text(recipe.to_json())
    assert read_recipe(tmp_path / "r.json") == recipe


def test_bad_per_block_values_are_refused_in_one_line():
    with pytest.raises(EamError, match="keep_rate gives 2 values for the 3 pruning blocks"):
        PruneConfig(keep_rate=(0.5, 0.7), blocks=(3, 6, 9))
    with pytest.raises(EamError, match="applies to method .renyi. only"):
        PruneConfig(method="shannon", alpha=(1.0, 2.0, 3.0))
    with pytest.raises(EamError, match="outside"):
        PruneConfig(keep_rate=(0.5, 0.0, 0.7))
    model = tiny()
    with pytest.raises(EamError, match="alpha gives 4 values for the 3 pruning blocks") as e:
        prune_(model, PruneConfig(method="renyi", alpha=(1.0, 2.0, 3.0, 4.0)))
    assert "\n" not in str(e.value) and state_of(model).prune is None


class _Labels(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return X[0], 0


def test_the_search_finds_the_known_answer_of_a_constructed_case():
    """A made-up top-1 that only reads the pruning state: pruning block 9 at all costs 50 points, κ at block 3
    costs 0.1·(1 − κ), and order ∞ at block 3 earns 1. The budget is κ = 0.5 in both blocks.

    By hand: from (1, 1), the moves are (0.5, 1) at 99.95 and (1, 0.5) at 50: take (0.5, 1), whose patch tokens
    (64 -> 32 -> 32) still cost more than the budget's (64 -> 32 -> 16). Then (0.25, 1) at 99.925 beats
    (0.5, 0.5) at 49.95 and is within the budget (64 -> 16 -> 16). Orders: block 3 takes ∞ (+1); block 9
    prunes nothing and keeps order 1. The uniform config scores 50 - 0.05 + 0: the per-block one is chosen.
    """
    def made_up(model, dataset, indices, **kw):
        st = state_of(model).prune
        rates = st.keep_rate if isinstance(st.keep_rate, tuple) else (st.keep_rate,) * 2
        orders = st.order if isinstance(st.order, tuple) else (st.order,) * 2
        top1 = 100.0 - (50.0 if rates[1] < 1 else 0.0) - 0.1 * (1 - rates[0])
        top1 += 1.0 if orders[0] == math.inf else 0.0
        return {"top1": top1, "top1_err": 100 - top1, "top5": 100.0, "top5_err": 0.0, "num_images": 4}

    model = tiny()
    sweep = PerBlockSweepConfig(prune=PruneConfig(method="renyi", keep_rate=0.5, blocks=(3, 9)),
                                keep_rates=(0.5, 0.25), alphas=(1.0, math.inf))
    res = per_block_sweep(model, EvalData(_Labels()), sweep, EvalData(_Labels()), progress=False,
                          evaluate_fn=made_up)
    assert res.config == PruneConfig(method="renyi", keep_rate=(0.25, 1.0), alpha=(math.inf, 1.0), blocks=(3, 9))
    assert res.uniform == PruneConfig(method="renyi", keep_rate=0.5, alpha=1.0, blocks=(3, 9))
    phases = [(r["search_phase"], r["keep_rate"], r["alpha"]) for r in res.rows]
    assert phases == [("start", "1,1", "1,1"), ("descend", "0.5,1", "1,1"), ("descend", "1,0.5", "1,1"),
                      ("descend", "0.25,1", "1,1"), ("descend", "0.5,0.5", "1,1"), ("order", "0.25,1", "inf,1"),
                      ("uniform", 0.5, 1.0), ("final", 0.5, 1.0), ("final", "0.25,1", "inf,1")]
    assert [r.get("chosen") for r in res.rows[-2:]] == [False, True]
    assert all(r["gmacs"] <= res.budget_gmacs for r in res.rows if r["search_phase"] == "final")
    assert state_of(model).prune is None  # the model is left unpruned


def test_the_search_refuses_a_budget_the_grid_cannot_reach():
    sweep = PerBlockSweepConfig(prune=PruneConfig(method="shannon", keep_rate=0.3), keep_rates=(0.5,))
    with pytest.raises(EamError, match="smallest κ 0.5"):
        per_block_sweep(tiny(), EvalData(_Labels()), sweep, progress=False)
    with pytest.raises(EamError, match="apply to method .renyi. only"):
        PerBlockSweepConfig(prune=PruneConfig(method="evit"), alphas=(1.0, 2.0))


def test_cli_refuses_bad_per_block_values_with_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "--prune", "renyi", "--keep-rate", "0.5,0.5")
    assert code == 2 and err.strip().startswith("eamvit: error: keep_rate gives 2 values for the 3 pruning blocks")
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "sweep", "--per-block", "--out", tmp_path / "s")
    assert code == 2 and "--per-block cannot apply without --prune" in err and not (tmp_path / "s").exists()
    code, _, err = run(capsys, "sweep", "--prune", "--per-block", "--methods", "shannon,evit", "--out", tmp_path / "s")
    assert code == 2 and "one method" in err and not (tmp_path / "s").exists()
    (tmp_path / "q.json").write_text(json.dumps(Recipe(steps=()).to_dict()))
    code, _, err = run(capsys, "optimize", "--prune-recipe", tmp_path / "q.json", "--out", tmp_path / "o")
    assert code == 2 and "give a recipe of one pruning step" in err


def test_cli_per_block_sweep_writes_a_recipe_that_eval_reproduces(capsys, tmp_path):
    out = tmp_path / "pb"
    code, stdout, err = run(capsys, "sweep", "--prune", "--per-block", "--methods", "renyi:1,renyi:inf",
                            "--keep-rates", "0.5", "--budget-keep-rate", "0.75", "--calib-size", "48",
                            "--num-samples", "48", "--batch-size", "48", "--out", out)
    assert code == 0, err
    rows = json.loads((out / "per_block.json").read_text())
    recipe = read_recipe(out / "per_block_recipe.json")
    chosen = next(r for r in rows if r["search_phase"] == "final" and r["chosen"])
    assert {r["scored_on"] for r in rows} == {"calibration", "evaluation"}
    code, stdout, err = run(capsys, "eval", "--recipe", out / "per_block_recipe.json", "--num-samples", "48",
                            "--batch-size", "48", "--out", tmp_path / "e")
    assert code == 0, err
    row = json.loads((tmp_path / "e.json").read_text())[0]
    assert row["top1"] == chosen["top1"] and row["keep_rate"] == chosen["keep_rate"]
    assert row["gmacs"] == chosen["gmacs"] and recipe.step("prune").method == "renyi"


def test_optimize_searches_a_per_block_recipe_alone_and_stacked():
    from eamvit.experiments.optimize_space import Candidate, combinations, recipe_options, single_candidates

    per_block = PruneConfig(method="renyi", keep_rate=(0.5, 0.5, 0.25), alpha=(math.inf, math.inf, 1.0))
    plain = single_candidates(12, "onnxruntime", "small")
    singles = single_candidates(12, "onnxruntime", "small", prunes=(per_block,))
    added = [c for c in singles if c.label not in {p.label for p in plain}]
    assert [c.label for c in added] == ["renyi-k0.5,0.5,0.25-ainf,inf,1"]
    assert added[0].recipe.steps == (per_block,)
    # Every single within the budget: the per-block point is stacked with each quantization and freezing,
    # beside (not instead of) the space's smallest surviving κ.
    stacks = combinations([(c, True) for c in singles])
    with_it = [c for c in stacks if per_block in c.recipe.steps]
    assert len(with_it) == len([c for c in stacks if PruneConfig(method="evit", keep_rate=0.5, blocks=(6, 9))
                                in c.recipe.steps]) > 0
    # The command that rebuilds it, as a user types it (written out by hand).
    assert recipe_options(added[0].recipe) == ["--prune", "renyi", "--keep-rate", "0.5,0.5,0.25",
                                               "--alpha", "inf,inf,1"]
    assert isinstance(added[0], Candidate)


def test_finetuning_moves_every_block_along_the_one_schedule():
    from torch.utils.data import Subset

    from eamvit.methods.data import DigitsDataset
    from eamvit.methods.finetune import FinetuneConfig, finetune

    torch.manual_seed(0)
    model = eamvit.create_model("vit_tiny_patch16_224", model_kwargs=dict(
        img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=2))
    targets = (0.5, 0.7, 0.9)
    prune_(model, PruneConfig(method="renyi", keep_rate=targets, alpha=(2.0, math.inf, 1.0)))
    cfg = FinetuneConfig(epochs=2, lr=1e-3, min_lr=1e-4, batch_size=16, keep_warmup_epochs=0.5, keep_decay_epochs=1.0)
    res = finetune(model, Subset(DigitsDataset("train", img_size=16), range(48)), cfg, progress=False)
    first, last = res["history"]
    names = [f"keep_rate_block{b}" for b in state_of(model).prune.blocks]
    assert [last[n] for n in names] == list(targets)
    # Mid-schedule, every block has gone the same fraction of its way from 1 to its target.
    fractions = [(1 - first[n]) / (1 - t) for n, t in zip(names, targets)]
    assert 0 < fractions[0] < 1 and fractions == pytest.approx([fractions[0]] * 3)
