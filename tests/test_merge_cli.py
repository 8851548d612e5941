"""Token merging from the command line (issue 23 §3) on the bundled digits ViT: ``eval --merge``, ``compress``
and ``eval --state``, ``export`` and ``eval --onnx``, ``sweep --prune``'s merging rows, ``finetune --merge``
and ``optimize``'s merging points.

References: the Python API's merged model evaluated directly, ONNX Runtime running the exported graph,
token counts worked out by hand, and a brute-force scan of every ``r`` against the bisection that
matches pruning's GMACs.
"""
from __future__ import annotations

import csv
import json
import re
import shlex
from dataclasses import replace

import pytest

from eamvit.cli.main import main
from eamvit.experiments.digits import load_demo_model
from eamvit.methods.cost import count_gflops
from eamvit.methods.merge import MergeConfig, merge_, unmerge_
from eamvit.methods.prune import PruneConfig, prune_, unprune_

from conftest import run, shipped_bound, single_thread

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)

D = ["--data", "digits"]


def _top1(text: str) -> float:
    return float(re.search(r"top1=([0-9.]+)", text).group(1))


def _eval(capsys, *args) -> tuple[float, str]:
    code, out, err = run(capsys, "eval", *D, *args)
    assert code == 0, err
    return _top1(out), out


def _field(out: str, name: str) -> str:
    return re.search(rf"\b{name}=(\S+)", out).group(1)


def _gmacs_by_r(model, config: MergeConfig, top: int = 64) -> list[float]:
    """Brute force: the cost account's GMACs of ``config`` at every r in 0..top."""
    out = []
    for r in range(top + 1):
        merge_(model, replace(config, r=r))
        out.append(count_gflops(model))
        unmerge_(model)
    return out


def _pruned_gmacs(model, keep_rate: float, blocks=None) -> float:
    prune_(model, PruneConfig(method="shannon", keep_rate=keep_rate, blocks=blocks))
    g = count_gflops(model)
    unprune_(model)
    return g


def test_eval_merge_is_the_api_model_and_compress_state_scores_the_same(tmp_path, capsys):
    from eamvit.methods.data import DigitsDataset
    from eamvit.methods.evaluate import evaluate

    opts = ["--merge", "entropy", "--merge-r", "12,8,4,2", "--merge-alpha", "2", "--no-prop-attn"]
    want, out = _eval(capsys, *opts)
    # 64 patch tokens, then 12, 8, 4 and 2 fewer (entropy merging's cap, all but one, never binds here).
    assert _field(out, "tokens") == "64-52-44-40-38" and _field(out, "merge_r") == "12-8-4-2"
    assert _field(out, "merge") == "entropy" and _field(out, "alpha") == "2.0" and _field(out, "prop_attn") == "False"
    model = load_demo_model()
    merge_(model, MergeConfig(r=(12, 8, 4, 2), selection="entropy", alpha=2.0, prop_attn=False))
    assert want == pytest.approx(evaluate(model, DigitsDataset("test"), progress=False)["top1"], abs=1e-9)
    state = tmp_path / "m.safetensors"
    code, out, err = run(capsys, "compress", *D, *opts, "--out", state)
    assert code == 0, err
    got, out = _eval(capsys, "--state", state)
    assert got == want and _field(out, "tokens") == "64-52-44-40-38"


def test_fp32_export_scores_in_onnx_runtime_what_eval_scores(tmp_path, capsys):
    opts = ["--merge", "tome", "--merge-r", "9"]
    want, out = _eval(capsys, *opts)
    assert _field(out, "tokens") == "64-55-46-37-28"  # 9 per block, under ToMe's cap of half the patch tokens
    code, _, err = run(capsys, "export", *D, *opts, "--out", tmp_path / "m.onnx")
    assert code == 0, err
    got, out = _eval(capsys, "--onnx", tmp_path / "m.onnx")
    assert abs(got - want) <= 1e-9, (want, got)
    assert _field(out, "merge") == "tome" and _field(out, "merge_r") == "9" and _field(out, "tokens") == "64-55-46-37-28"


def test_int8_merged_state_exports_what_eval_scores(tmp_path, capsys):
    opts = ["--quant", "repq", "--w-bits", "8", "--a-bits", "8", "--attn-quantizer", "uniform", "--merge", "tome",
            "--merge-r", "6", "--calib-size", "128"]
    state = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "compress", *D, *opts, "--out", state)
    assert code == 0, err
    evaluated, _ = _eval(capsys, "--state", state)
    code, _, err = run(capsys, "export", *D, "--state", state, "--out", tmp_path / "m.onnx")
    assert code == 0, err
    shipped, out = _eval(capsys, "--onnx", tmp_path / "m.onnx")
    assert abs(shipped - evaluated) <= shipped_bound(), (evaluated, shipped)
    assert _field(out, "merge") == "tome" and _field(out, "w_bits") == "8"


@pytest.fixture
def prune_and_merge_recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "both.json"
    path.write_text(json.dumps({"kind": "recipe", "version": 1, "steps": [PruneConfig().to_dict(),
                                                                        MergeConfig().to_dict()]}))
    return path


@pytest.mark.parametrize("args, words", [
    (["eval", "--merge-r", "4"], "--merge-r cannot apply without --merge"),
    (["eval", "--merge-blocks", "1", "--no-prop-attn"], "--merge-blocks, --no-prop-attn cannot apply without --merge"),
    (["eval", "--merge", "tome", "--prune", "shannon"], "--merge tome and --prune shannon both reduce tokens"),
    (["eval", "--merge", "tome", "--merge-alpha", "2"], "--merge-alpha cannot apply to --merge tome"),
    (["compress", "--merge", "tome", "--merge-r", "4,4"], "r gives 2 values for 4 merging blocks"),
    (["export", "--merge", "entropy", "--merge-blocks", "7"], "merging block 7 is outside the model's 4 blocks"),
    (["export", "--merge", "tome", "--opset", "15"], "needs opset 16"),
    (["eval", "--recipe", "RECIPE"], "a recipe prunes or merges tokens, not both"),
    (["eval", "--recipe", "RECIPE", "--merge", "tome"], "--merge cannot apply with --recipe"),
    (["sweep", "--prune", "--methods", "shannon,tome:2"], "ToMe has no entropy order"),
    (["sweep", "--prune", "--methods", "entropy-merge:-1"], "must be ≥ 0"),
    (["finetune", "--merge", "tome", "--keep-rate", "0.5"], "--keep-rate cannot apply to --merge tome"),
])
def test_refusals_are_one_line_and_write_nothing(args, words, tmp_path, capsys, prune_and_merge_recipe):
    out = tmp_path / ("o.onnx" if args[0] == "export" else "o.safetensors" if args[0] == "compress" else "o")
    args = [str(prune_and_merge_recipe) if a == "RECIPE" else a for a in args]
    code, _, err = run(capsys, *args, *D, "--out", out)
    assert code == 2 and err.count("\n") == 1 and err.startswith("eamvit: error:") and words in err, err
    assert list(tmp_path.iterdir()) == []


def test_prune_sweep_puts_merging_beside_pruning_at_matched_gmacs(tmp_path, capsys):
    code, _, err = run(capsys, "sweep", "--prune", *D, "--num-samples", "90", "--keep-rates", "0.7", "--methods",
                       "shannon,tome,entropy-merge", "--no-throughput", "--out", tmp_path)
    assert code == 0, err
    with open(tmp_path / "prune_sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["prune"], r["merge"]) for r in rows] == [("", ""), ("shannon", ""), ("", "tome"), ("", "entropy")]
    assert [(r["keep_rate"], r["matched_keep_rate"]) for r in rows] == [("", ""), ("0.7", ""), ("", "0.7"),
                                                                          ("", "0.7")]
    target = float(rows[1]["gmacs"])
    model = load_demo_model()
    assert _pruned_gmacs(model, 0.7) == pytest.approx(target, abs=1e-4)
    for row in rows[2:]:  # r is the closest of all r to Shannon pruning's GMACs (a brute-force scan)
        g = _gmacs_by_r(model, MergeConfig(selection=row["merge"]), top=32)
        best = min(range(len(g)), key=lambda r: (abs(g[r] - _pruned_gmacs(model, 0.7)), r))
        assert row["merge_r"] == str(best) and float(row["gmacs"]) == pytest.approx(g[best], abs=1e-4)
    # The ToMe row scores what `eval --merge tome` scores at its r on the same images.
    r = rows[2]["merge_r"]
    assert float(rows[2]["top1"]) == _eval(capsys, "--num-samples", "90", "--merge", "tome", "--merge-r", r)[0]
    assert (tmp_path / "prune_sweep.png").stat().st_size > 10_000
    md = (tmp_path / "prune_sweep.md").read_text()
    assert "| ToMe | 0.7 | " + r + " |" in md and "entropy merging" in md


def test_finetune_merge_reloads_with_the_command_it_prints(tmp_path, capsys):
    code, out, err = run(capsys, "finetune", *D, "--num-samples", "128", "--epochs", "1", "--batch-size", "128",
                         "--merge", "tome", "--merge-r", "6", "--merge-blocks", "1,2,3", "--out", tmp_path)
    assert code == 0, err
    trained = _top1(out.split("fine-tuned", 1)[1])
    identity = json.loads((tmp_path / "finetune.json").read_text())["identity"]
    assert identity["merge"]["r"] == 6 and identity["merge"]["blocks"] == [1, 2, 3] and "prune" not in identity
    reload = shlex.split(next(l for l in out.splitlines() if l.startswith("reload: "))[len("reload: "):])
    assert reload[:2] == ["eamvit", "eval"] and "--merge-blocks" in reload
    assert _eval(capsys, *reload[2:])[0] == trained  # the validation split is eval's digits test split


def test_merge_options_match_pruning_gmacs_by_brute_force():
    from eamvit.experiments.optimize_space import KEEP_RATES, late_blocks, merge_options

    model = load_demo_model()
    points = merge_options(model, "standard")
    names = [n for n, _ in points]
    assert any(n.startswith("tome-r") for n in names) and any(n.startswith("entropy-merge-r") for n in names)
    assert any(n.endswith("@2,3") for n in names) and len(set(names)) == len(names)
    assert merge_options(model, "small") == []  # the demo's space stays small
    for selection in ("tome", "entropy"):
        for blocks in (None, late_blocks(4)):
            g = _gmacs_by_r(model, MergeConfig(selection=selection, blocks=blocks))
            want = set()
            for k in KEEP_RATES["standard"]:
                target = _pruned_gmacs(model, k, blocks)
                want.add(min(range(len(g)), key=lambda r: (abs(g[r] - target), r)))
            got = {c.r for _, c in points if c.selection == selection and c.blocks == blocks}
            assert got == want - {0}, (selection, blocks)


def test_stacks_take_one_token_reducer_and_merging_stacks_with_freezing_and_int8():
    from eamvit.experiments.optimize_space import combinations, merge_options, single_candidates

    singles = single_candidates(4, "onnxruntime", "standard", merges=merge_options(load_demo_model(), "standard"))
    stacks = combinations([(c, True) for c in singles])
    kinds = [[s.KIND for s in c.recipe.steps] for c in stacks]
    assert not any("prune" in k and "merge" in k for k in kinds)
    assert ["repq", "merge"] in kinds and ["freeze", "merge"] in kinds and ["repq", "freeze", "merge"] in kinds
    # Per merging selection and blocks, the stacks take the single that merges the most.
    for c in stacks:
        m = c.recipe.step("merge")
        if m is not None:
            same = [s.recipe.steps[0].r for s in singles if s.recipe.step("merge") is not None
                    and (s.recipe.steps[0].selection, s.recipe.steps[0].blocks) == (m.selection, m.blocks)]
            assert m.r == max(same)


def test_optimize_pareto_holds_merging_points(tmp_path, monkeypatch, capsys):
    from eamvit.experiments import optimize as opt
    from eamvit.experiments.optimize_space import merge_options, single_candidates

    merges = merge_options(load_demo_model(), "standard")
    tome, cfg = min(((n, c) for n, c in merges if c.selection == "tome" and c.blocks is not None), key=lambda p: p[1].r)
    picked = [c for c in single_candidates(4, "torch", "standard", merges=merges) if c.label in (tome, "head-t0.25")]
    monkeypatch.setattr(opt, "single_candidates", lambda depth, rt, space, seed, merges=(), prunes=(): picked)
    out = tmp_path / "o"
    code, _, err = run(capsys, "optimize", *D, "--reps", "3", "--runtime", "torch", "--max-drop", "100",
                       "--space", "standard", "--out", out)
    assert code == 0, err
    with open(out / "pareto.csv", newline="") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"fp32", tome, "head-t0.25", f"head-t0.25 + {tome}"}
    for label in (tome, f"head-t0.25 + {tome}"):
        assert rows[label]["merge"] == "tome" and rows[label]["blocks"] == "2-3" and rows[label]["prune"] == ""
        assert rows[label]["merge_r"].split("-")[0] == str(cfg.r)  # later blocks may merge fewer: ToMe's cap


def test_demo_pruning_table_gains_merging_rows_and_fine_tunes_them():
    from torch.utils.data import Subset

    from eamvit.experiments.prune_sweep import SWEEP_MERGES, prune_table
    from eamvit.methods.data import DigitsDataset
    from eamvit.methods.state import state_of

    model = load_demo_model()
    train, test = Subset(DigitsDataset("train"), range(64)), Subset(DigitsDataset("test"), range(60))
    rows, md = prune_table(model, train, test, keep_rates=(0.5,), methods=[("evit", None)], finetune_epochs=1,
                           progress=False, throughput_batch=4, merges=SWEEP_MERGES)
    assert [(r["prune"], r["merge"]) for r in rows] == [(None, None), ("evit", None), (None, "tome"),
                                                          (None, "entropy")]
    assert all(r["top1_finetuned"] is not None for r in rows[1:]) and "top1_finetuned" not in rows[0].fields
    assert "| ToMe | 0.5 |" in md and "| entropy merging | 0.5 |" in md
    assert state_of(model).merge is None and state_of(model).prune is None
