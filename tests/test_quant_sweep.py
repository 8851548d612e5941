"""KL divergence maps, the quantized EAM sweep, Table 1, the size report and the Fig. 4/5 plots."""
import copy
import math

import pytest
import torch

from eamvit.errors import EamError
from eamvit.methods.kl import cls_row_grid, compute_kl_maps, kl_maps, per_head_stats
from eamvit.methods.quantize import quantize_
from eamvit.methods.repq import RepQConfig
from eamvit.experiments.quant_sweep import QuantSweepConfig, quant_sweep, size_table, table1
from eamvit.experiments.results import markdown
from eamvit.experiments.runner import EvalData
from eamvit.experiments.size import model_size

from conftest import TINY_SWIN, TINY_VIT, make


class Images(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_kl_by_hand():
    # One entry, 2 bins: p = [1, 0], q = [1/2, 1/2] -> D_KL = 1 bit (smoothing eps is negligible).
    p = torch.tensor([[2], [0]], dtype=torch.uint8)
    q = torch.tensor([[1], [1]], dtype=torch.uint8)
    kl = kl_maps([p], [q], eps=1e-9)[0]
    assert kl.shape == (1,) and kl.item() == pytest.approx(1.0, abs=1e-6)
    assert kl_maps([p], [p])[0].item() == 0.0
    with pytest.raises(EamError):
        kl_maps([p], [torch.zeros(4, 1, dtype=torch.uint8)])


def test_per_head_stats_and_cls_grid():
    kl = [torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 5, 5), torch.zeros(3, 5, 5)]
    mean, mx = per_head_stats(kl)
    assert mean.shape == (2, 3) and math.isnan(mean[0, 2])
    assert mean[0, 0] == 12.0 and mx[0, 1] == 49.0 and mx[1, 2] == 0.0
    g = cls_row_grid(kl[0], num_prefix=1)
    assert g.shape == (2, 2, 2) and g[1, 0, 0] == 26.0  # head 1, row 0, column 1
    assert cls_row_grid(torch.zeros(4, 2, 5, 5)) is None  # Swin: no CLS token


def test_kl_maps_of_two_models():
    fp = make(TINY_VIT)
    ds = Images(12, seed=0)
    same = compute_kl_maps(fp, copy.deepcopy(fp), ds, bits=4, progress=False)
    assert all(float(k.abs().max()) == 0.0 for k in same.kl)
    q = quantize_(copy.deepcopy(fp), RepQConfig(calib_size=8), ds)
    res = compute_kl_maps(fp, q, ds, bits=4, progress=False)
    assert all(k.min() >= -1e-6 for k in res.kl) and max(float(k.max()) for k in res.kl) > 0
    mean, mx = res.per_head()
    assert mean.shape == (2, 2) and (mx >= mean).all()
    assert res.cls_rows(0).shape == (2, 4, 4)
    assert len(res.summary()) == 4
    assert res.quant.meta["quant"]["w_bits"] == 4


def _sweep(spec, taus=(0.0, 0.1, 0.2), **kw):
    fp = make(spec)
    kw.setdefault("random_seeds", (0, 1))
    return fp, quant_sweep(fp, EvalData(Images(10, seed=1), batch_size=16), Images(12, seed=0), RepQConfig(calib_size=8),
                           QuantSweepConfig(taus=taus, entropy_bits=4, **kw), progress=False)


def test_quant_sweep_rows_table_and_sizes(tmp_path):
    fp, res = _sweep(TINY_VIT)
    rows = res["rows"]
    keys = {(r["quant"], r["selection"], r["maps"], r["value_bits"]) for r in rows}
    assert keys == {("fp", None, None, None), ("repq", None, None, None), ("repq", "entropy", "fp", 32),
                    ("repq", "entropy", "fp", 4), ("repq", "entropy", "quant", 32), ("repq", "entropy", "quant", 4),
                    ("repq", "random", "quant", 4)}
    assert len(rows) == 3 * 7
    repq = next(r for r in rows if r["quant"] == "repq" and r["selection"] is None)
    fpr = next(r for r in rows if r["quant"] == "fp")
    for r in rows:
        if r["tau"] == 0.0 and r["selection"] and r["value_bits"] == 32:
            assert r["top1"] == repq["top1"]  # τ = 0 freezes nothing
        if r["tau"] == 0.2 and r["selection"]:
            assert r["frozen_fraction"] == pytest.approx(0.2, abs=0.01)
            assert r["entries_skipped"] > 0 and r["qk_macs_skipped"] == r["entries_skipped"] * 16
    # Sizes: 4-bit weights shrink the model; 4-bit frozen values take 1/8 of fp32 ones.
    assert repq["model_bytes"] < fpr["model_bytes"] / 3
    assert fpr["model_bytes"] == sum(p.numel() * 4 for p in fp.parameters())
    f32 = next(r for r in rows if r["tau"] == 0.2 and r["maps"] == "quant" and r["value_bits"] == 32)
    f4 = next(r for r in rows if r["tau"] == 0.2 and r["maps"] == "quant" and r["value_bits"] == 4)
    mask = (f32["attention_entries"] + 7) // 8
    assert f32["frozen_map_bytes"] - mask == f32["entries_skipped"] * 4
    assert f4["frozen_map_bytes"] - mask == (f4["entries_skipped"] * 4 + 7) // 8
    table = res["table"]
    assert "| Full-Precision | 32/32 |" in table and "| RepQ-ViT | 4/4 |" in table
    assert "τ=10%" in table and "τ=20%" in table
    assert markdown(*size_table(rows)).count("\n") > 5
    from eamvit.plots.quant import plot_kl_cls, plot_kl_per_head, plot_quant_sweep

    plot_quant_sweep(rows, tmp_path / "fig5.png")
    plot_kl_per_head(res["kl"], tmp_path / "fig4a.png")
    plot_kl_cls(res["kl"], 0, tmp_path / "fig4b.png")
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("fig5.png", "fig4a.png", "fig4b.png"))


def test_quant_sweep_on_swin():
    _, res = _sweep(TINY_SWIN, taus=(0.5,), random_seeds=(0,), maps=("quant",), values=("quant",))
    r = next(r for r in res["rows"] if r["tau"] == 0.5 and r["selection"] == "entropy")
    assert r["frozen_fraction"] == pytest.approx(0.5, abs=0.01)
    assert res["kl"].cls_rows(0) is None


def test_table_without_tau_rows_and_bad_config():
    rows = [{"quant": "fp", "selection": None, "maps": None, "value_bits": None, "tau": 0.0, "bits": "32/32",
             "top1": 90.0}]
    assert "EAM" not in markdown(*table1(rows, "m"))
    with pytest.raises(EamError):
        QuantSweepConfig(taus=(1.5,))
    with pytest.raises(EamError):
        QuantSweepConfig(maps=("int8",))


def test_model_bytes_counts_bits():
    fp = make(TINY_VIT)
    q = quantize_(copy.deepcopy(fp), RepQConfig(calib_size=4, w_bits=8), torch.randn(4, 3, 32, 32))
    b = model_size(q).to_dict()
    from eamvit.methods.repq import QuantConv2d, QuantLinear

    nw = sum(m.weight.numel() for m in q.modules() if isinstance(m, (QuantLinear, QuantConv2d)))
    assert b["weight_bytes"] == nw  # 8 bits = 1 byte per weight
    assert b["model_bytes"] == b["weight_bytes"] + b["fp32_param_bytes"] + b["quant_param_bytes"]
