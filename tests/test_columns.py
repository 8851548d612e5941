"""One results row shape: every writer's CSV names its columns from the one documented vocabulary.

Each command runs once on the bundled digits ViT and ``--data digits``; the headers are checked
against :data:`eamvit.columns.COLUMNS`, against the names the issue found disagreeing (written out
here by hand, not taken from the code), and against docs/design.md's list of the vocabulary.
"""
import csv
import re
from pathlib import Path

import pytest
import torch

from eamvit.cli.main import main
from eamvit.columns import COLUMNS, HEAD

# Names that meant two things, or one thing under two names, before the one vocabulary.
RETIRED = {"gflops", "size_mb", "frozen_value_bits", "values", "precision", "sparsity", "method", "spread"}
# The columns of timm validate.py's results, in its order (timm/validate.py).
TIMM = ["model", "top1", "top1_err", "top5", "top5_err", "num_images", "skipped_images", "param_count",
        "img_size", "crop_pct", "interpolation"]

COMMANDS = {
    "eval_freeze": ["eval", "--calib-size", "64", "--tau", "0.5", "--granularity", "head",
                    "--out", "{out}/eval_freeze"],
    "eval_prune": ["eval", "--prune", "evit", "--keep-rate", "0.7", "--out", "{out}/eval_prune"],
    "eval_merge": ["eval", "--merge", "entropy", "--merge-r", "6", "--merge-alpha", "inf", "--out", "{out}/eval_merge"],
    "eval_quant": ["eval", "--quant", "repq", "--out", "{out}/eval_quant"],
    "sweep": ["sweep", "--calib-size", "64", "--taus", "0,0.5", "--seeds", "2", "--out", "{out}/freeze"],
    "speed_sweep": ["sweep", "--calib-size", "64", "--granularity", "head", "--taus", "0.5", "--methods", "evit",
                    "--keep-rates", "0.5", "--throughput-reps", "3", "--throughput-batch", "8", "--out", "{out}/speed"],
    "prune_sweep": ["sweep", "--prune", "--methods", "shannon,tome", "--keep-rates", "0.7", "--no-throughput",
                    "--out", "{out}/prune"],
    "quant_sweep": ["sweep", "--calib-size", "64", "--quant", "repq", "--taus", "0.2", "--seeds", "1",
                    "--out", "{out}/quant"],
    "compare": ["compare", "--methods", "fp,repq", "--settings", "8/8", "--out", "{out}/compare"],
}
CSV = {"eval_freeze": "eval_freeze.csv", "eval_prune": "eval_prune.csv", "eval_merge": "eval_merge.csv",
       "eval_quant": "eval_quant.csv",
       "sweep": "freeze/sweep.csv", "speed_sweep": "speed/speed_sweep.csv", "prune_sweep": "prune/prune_sweep.csv",
       "quant_sweep": "quant/sweep.csv", "compare": "compare/compare.csv"}


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """``{writer: (header, rows)}`` of every CSV of results rows, from the commands and the demo's tables."""
    out = tmp_path_factory.mktemp("columns")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: threads only compete
    try:
        for name, args in COMMANDS.items():
            code = main([a.format(out=out) for a in args] + ["--data", "digits", "--num-samples", "60"])
            assert code == 0, name
        tables = {name: _read(out / path) for name, path in CSV.items()}
        tables.update(_api_tables(out))
    finally:
        torch.set_num_threads(threads)
    return tables


def _api_tables(out: Path) -> dict:
    """The demo's frozen fine-tune and export tables, written as the demo writes them."""
    from eamvit.experiments.digits import load_demo_model
    from eamvit.experiments.export_table import _row
    from eamvit.io import save_tensors
    from eamvit.experiments.frozen_finetune import frozen_finetune_table
    from eamvit.experiments.results import write_table
    from eamvit.experiments.runner import EvalData
    from eamvit.methods.calibrate import compute_entropy_maps
    from eamvit.methods.data import DigitsDataset, digits_data_config
    from eamvit.methods.finetune import FinetuneConfig

    model = load_demo_model()
    train, test = DigitsDataset("train"), DigitsDataset("test")
    small = torch.utils.data.Subset(train, range(64))
    maps = compute_entropy_maps(model, small, bits=8, progress=False)
    cfg = {**digits_data_config(16), "source": "digits"}
    rows = frozen_finetune_table(model, small, EvalData(torch.utils.data.Subset(test, range(60)), batch_size=256,
                                                        data_config=cfg), maps, taus=(0.5,),
                                 selections=("entropy",), config=FinetuneConfig(epochs=1, lr=1e-4, batch_size=64))
    write_table(out / "frozen_finetune", rows)
    # The export table's row builder on the PyTorch row (the whole table exports ONNX files: test_demo.py).
    save_tensors(out / "fp32.safetensors", dict(model.state_dict()), {})
    x, y = test.images[:60], test.targets[:60]
    predict = lambda: model(x)  # noqa: E731
    with torch.inference_mode():
        write_table(out / "export", [_row(model, "fp32", "PyTorch", predict, y, out / "fp32.safetensors", 3)])
    return {"frozen_finetune": _read(out / "frozen_finetune.csv"), "export": _read(out / "export.csv")}


def test_every_writer_names_its_columns_from_the_one_vocabulary(tables):
    assert set(tables) == set(CSV) | {"frozen_finetune", "export"}
    for name, (header, rows) in tables.items():
        assert rows, name
        assert header[:len(HEAD)] == list(HEAD), name  # the one head, in one order
        assert header[:len(TIMM)] == TIMM, name
        assert not set(header) - set(COLUMNS), (name, sorted(set(header) - set(COLUMNS)))
        assert not set(header) & RETIRED, (name, sorted(set(header) & RETIRED))
        assert len(header) == len(set(header)), name


def test_every_row_says_where_its_preprocessing_came_from(tables):
    for name, (_, rows) in tables.items():
        assert {r["data_config_source"] for r in rows} == {"digits"}, name
        assert all(r["model"] == "vit_tiny_patch16_224" for r in rows), name  # frozen_finetune has one too


def test_one_name_per_setting_and_blank_where_it_does_not_apply(tables):
    freeze, speed, prune, quant = (tables[k][1] for k in ("sweep", "speed_sweep", "prune_sweep", "quant_sweep"))
    # The freezing selection is `selection` in every sweep.
    assert {r["selection"] for r in freeze} == {"entropy", "random"}
    assert {r["selection"] for r in quant} == {"", "entropy", "random"}  # blank on the FP and RepQ-ViT rows
    assert [r["selection"] for r in speed] == ["", "entropy", ""]
    # Frozen-value bits are `value_bits` (32 for fp32 values).
    assert {r["value_bits"] for r in freeze} == {"32"} and {r["value_bits"] for r in quant} == {"", "32", "4"}
    # Pruning rows leave τ blank, freezing rows κ, the unmodified row both.
    assert [(r["tau"], r["keep_rate"]) for r in speed] == [("", ""), ("0.5", ""), ("", "0.5")]
    assert [(r["prune"], r["keep_rate"]) for r in prune] == [("", ""), ("shannon", "0.7"), ("", "")]
    # Merging rows name their selection `merge` and leave κ blank: the κ whose GMACs they match is its own column.
    assert [(r["merge"], r["matched_keep_rate"]) for r in prune] == [("", ""), ("", ""), ("tome", "0.7")]
    eval_merge = tables["eval_merge"][1][0]
    assert (eval_merge["merge"], eval_merge["alpha"], eval_merge["merge_r"]) == ("entropy", "inf", "6")
    assert "keep_rate" not in tables["eval_merge"][0] and "prune" not in tables["eval_merge"][0]
    # The Rényi order is `alpha` for pruning and merging alike; `tokens` counts patch tokens for both.
    assert eval_merge["tokens"] == "64-58-52-46-40" and tables["eval_prune"][1][0]["tokens"].startswith("64-")
    eval_prune, eval_freeze = tables["eval_prune"][1][0], tables["eval_freeze"][1][0]
    assert "tau" not in tables["eval_prune"][0] and eval_prune["keep_rate"] == "0.7"
    assert eval_freeze["tau"] == "0.5" and "keep_rate" not in tables["eval_freeze"][0]
    # MACs are `gmacs` wherever they are counted, with the same count for the same model.
    unmodified = float(speed[0]["gmacs"])  # six significant digits here, four decimals in the pruning sweep
    assert float(prune[0]["gmacs"]) == pytest.approx(unmodified, abs=1e-4) and float(eval_prune["gmacs"]) < unmodified
    # Sizes: compare's model_bytes is the same model size as the quantized sweep's.
    fp_compare = next(r for r in tables["compare"][1] if r["quant"] == "fp")
    fp_sweep = next(r for r in quant if r["quant"] == "fp")
    assert fp_compare["model_bytes"] == fp_sweep["model_bytes"]


def test_design_doc_lists_the_vocabulary():
    design = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    para = design[design.index("Every results row"):]
    para = para[:para.index("\n\n")]
    named = set(re.findall(r"`([a-z0-9_]+)`", para)) - {"eval", "sweep", "compare"}
    assert named and not named - set(COLUMNS), sorted(named - set(COLUMNS))
