"""The one results writer: CSV, JSON and markdown of the same rows agree column by column."""
import csv
import json
import math

import pytest

from eamvit.errors import EamError
from eamvit.experiments.results import (Column, ResultRow, format_sweep_table, markdown,
                                        sweep_table, write_table)


def _md_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _read_all(files):
    with open(files["csv"], newline="") as f:
        reader = csv.DictReader(f)
        header, csv_rows = reader.fieldnames, list(reader)
    js = json.loads(files["json"].read_text())
    md = files["md"].read_text().splitlines()
    return header, csv_rows, js, md


ROWS = [
    {"method": "fp", "bits": "32/32", "top1": 98.889, "size_bytes": 821032, "alpha": None, "fused": False},
    {"method": "repq", "bits": "4/4", "top1": 97.5, "size_bytes": 149048, "alpha": math.inf, "fused": True},
]
COLUMNS = [Column("method", "Method"), Column("bits", "W/A"), Column("top1", "Top-1", ".2f"),
           Column("size_bytes", "bytes", ","), Column("alpha", "α"), Column("fused")]


def test_csv_json_markdown_have_the_same_columns_and_values(tmp_path):
    files = write_table(tmp_path / "t", ROWS, COLUMNS)
    header, csv_rows, js, md = _read_all(files)
    keys = [c.key for c in COLUMNS]
    assert header == keys
    assert all(list(r) == keys for r in js)
    assert _md_cells(md[0]) == ["Method", "W/A", "Top-1", "bytes", "α", "fused"]
    assert len(md) == 2 + len(ROWS)
    # Values read back: JSON keeps types (infinity as the string float() reads), CSV the same text.
    assert js[0] == {"method": "fp", "bits": "32/32", "top1": 98.889, "size_bytes": 821032, "alpha": None,
                     "fused": False}
    assert js[1]["alpha"] == "inf" and float(js[1]["alpha"]) == math.inf
    for c, j in zip(csv_rows, js):
        for k in keys:
            assert c[k] == ("" if j[k] is None else str(j[k])), k
    # Markdown: the same values, formatted by hand here.
    assert _md_cells(md[2]) == ["fp", "32/32", "98.89", "821,032", "", "False"]
    assert _md_cells(md[3]) == ["repq", "4/4", "97.50", "149,048", "inf", "True"]


def test_default_columns_are_every_field_and_missing_cells_are_empty(tmp_path):
    rows = [{"a": 1, "b": 2}, {"b": 3, "c": "x|y"}]
    files = write_table(tmp_path / "u", rows)
    header, csv_rows, js, md = _read_all(files)
    assert header == ["a", "b", "c"] and list(js[1]) == ["a", "b", "c"]
    assert csv_rows[1] == {"a": "", "b": "3", "c": "x|y"} and js[1]["a"] is None
    assert md[3] == "|  | 3 | x\\|y |"  # a pipe inside a cell is escaped


def test_stem_keeps_its_dots_and_formats_are_chosen(tmp_path):
    files = write_table(tmp_path / "eval_0.2", [{"a": 1}], formats=("csv", "json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_0.2.csv", "eval_0.2.json"]
    assert set(files) == {"csv", "json"}
    with pytest.raises(EamError):
        write_table(tmp_path / "x", [{"a": 1}], formats=("xlsx",))


def test_result_row_reads_like_timm_validate_rows(tmp_path):
    row = ResultRow(model="deit", top1=97.5, top1_err=2.5, top5=100.0, top5_err=0.0, num_images=360,
                    param_count=0.2, img_size=16, fields={"tau": 0.1, "selection": "random"}, top1_std=0.39,
                    seeds=3)
    d = row.to_dict()
    timm = ["model", "top1", "top1_err", "top5", "top5_err", "num_images", "skipped_images", "param_count",
            "img_size", "crop_pct", "interpolation"]  # timm validate.py's row, in its order
    assert list(d)[:len(timm)] == timm
    assert d["tau"] == 0.1 and row["selection"] == "random" and row.get("missing") is None
    assert "images_per_s" not in d
    files = write_table(tmp_path / "r", [row])
    header, csv_rows, js, md = _read_all(files)
    assert header == list(d) and js == [d]
    assert csv_rows[0]["top1_std"] == "0.39" and csv_rows[0]["crop_pct"] == ""


def test_sweep_table_by_hand():
    def r(tau, sel, top1, std=0.0, seeds=1):
        return {"tau": tau, "selection": sel, "scope": "head", "top1": top1, "top1_std": std, "seeds": seeds}

    rows = [r(0.0, "entropy", 98.889), r(0.0, "random", 98.889, 0.0, 3), r(0.5, "entropy", 98.611),
            r(0.5, "random", 82.685, 1.333, 3)]
    table, cols = sweep_table(rows)
    assert [c.header() for c in cols] == ["τ", "entropy (head)", "random (head)", "±"]
    assert format_sweep_table(rows).splitlines() == [
        "| τ | entropy (head) | random (head) | ± |", "|---|---|---|---|",
        "| 0.0 | 98.89 | 98.89 | 0.00 |", "| 0.5 | 98.61 | 82.69 | 1.33 |"]


def test_markdown_needs_columns():
    with pytest.raises(EamError):
        markdown([])


def test_retitle_renames_markdown_headers_only(tmp_path):
    from eamvit.experiments.results import retitle

    cols = [Column("method", "Method"), Column("top1", "vit_tiny_patch16_224", ".2f")]
    rows = [{"method": "RepQ-ViT", "top1": 97.2222}]
    new = retitle(cols, top1="digits ViT")
    assert markdown(rows, new).splitlines()[:3] == ["| Method | digits ViT |", "|---|---|", "| RepQ-ViT | 97.22 |"]
    write_table(tmp_path / "t", rows, new, formats=("csv",))
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "method,top1"  # the data keys stay
    with pytest.raises(EamError, match="top5"):
        retitle(cols, top5="x")


def test_export_table_reads_as_text():
    from eamvit.experiments.export_table import EXPORT_COLUMNS

    row = {"label": "fp32", "runtime": "ONNX Runtime", "top1": 98.889, "file_bytes": 1234567,
           "images_per_s": 20345.6, "images_per_s_p25": 19876.4, "images_per_s_p75": 21000.0}
    header, _, line = markdown([row], EXPORT_COLUMNS).splitlines()
    assert "file_bytes" not in header and "images_per_s" not in header and "top1 " not in header
    assert line == "| fp32 | ONNX Runtime | 98.89 | 1,234,567 | 20,346 | 19,876 | 21,000 |"
