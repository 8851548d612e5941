"""The method comparison on the sweep runner: its numbers equal a direct quantize + evaluate, one size per model."""
import copy

import pytest

from eamvit.experiments.compare import CompareConfig, compare, markdown_table
from eamvit.experiments.quant_sweep import QuantSweepConfig, quant_sweep
from eamvit.experiments.runner import EvalData
from eamvit.experiments.size import model_size
from eamvit.methods.evaluate import evaluate
from eamvit.methods.quantize import quantize_
from eamvit.methods.repq import RepQConfig

from conftest import TINY_VIT, make
from test_runner import Images


def test_compare_rows_equal_direct_quantization_and_sizes_agree_across_tables():
    fp = make(TINY_VIT)
    calib, test = Images(12, seed=0), Images(10, seed=1)
    repq = RepQConfig(calib_size=8)
    cfg = CompareConfig(methods=("fp", "repq"), settings=((4, 4),), repq=repq, batch_size=16)
    rows = compare(lambda: fp, calib, test, cfg)
    assert [(r["quant"], r["bits"]) for r in rows] == [("fp", "32/32"), ("repq", "4/4")]

    q = quantize_(copy.deepcopy(fp), repq, calib)
    assert rows[1]["top1"] == evaluate(q, test, progress=False)["top1"]
    assert rows[0]["top1"] == evaluate(fp, test, progress=False)["top1"]
    assert rows[1]["top1_delta"] == pytest.approx(rows[1]["top1"] - rows[0]["top1"], abs=1e-3)
    assert rows[0]["model_bytes"] == 4 * sum(p.numel() for p in fp.parameters())
    assert rows[1]["model_bytes"] == model_size(q).model_bytes

    # The quantized sweep reports the same RepQ-ViT model with the same bytes.
    res = quant_sweep(fp, EvalData(test, batch_size=16), calib, repq,
                      QuantSweepConfig(taus=(0.0,), random_seeds=(0,), maps=("quant",), values=("quant",),
                                       entropy_bits=4), progress=False)
    swept = next(r for r in res["rows"] if r["quant"] == "repq" and r["selection"] is None)
    assert swept["model_bytes"] == rows[1]["model_bytes"] and swept["top1"] == rows[1]["top1"]

    md = markdown_table(rows).splitlines()
    assert md[0] == "| Method | W/A(/P) | Size (MB) | Acc (Top-1) | Δ top-1 | Calib. (s) |"
    assert md[3].startswith(f"| RepQ-ViT | 4/4 | {rows[1]['model_bytes'] / 1e6:.3f} | {rows[1]['top1']:.2f} |")


def test_compare_with_freezing_adds_the_frozen_fraction():
    fp = make(TINY_VIT)
    cfg = CompareConfig(methods=("repq",), settings=((6, 6),), repq=RepQConfig(calib_size=8), freeze_sparsity=0.3,
                        entropy_bits=4, batch_size=16)
    rows = compare(lambda: fp, Images(12, seed=0), Images(6, seed=1), cfg)
    assert rows[0]["tau"] == 0.3 and rows[0]["frozen_fraction"] == pytest.approx(0.3, abs=0.02)
    assert rows[0]["top1_delta"] is None  # no full-precision row to compare with
    assert "EAM τ" in markdown_table(rows)
