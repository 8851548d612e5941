"""The one results writer: typed rows to CSV, JSON and a markdown table with the same columns.
Design: ``docs/architecture-experiments.md``, "results".
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from eamvit.columns import HEAD
from eamvit.errors import EamError
from eamvit.io import atomic_path, write_text


@dataclass(eq=False)
class ResultRow(Mapping):
    """One evaluated configuration; reads like a dict (``row["top1"]``) in the field order of :meth:`to_dict`.

    Args:
        top1, top5: accuracy in percent (the mean over ``seeds`` evaluations).
        num_images: images evaluated (per seed).
        param_count: parameters in millions.
        mean, std: the preprocessing's, comma-joined.
        data_config_source: where the preprocessing came from (``checkpoint``, ``timm``, ``digits`` ...).
        fields: the method's fields (τ, selection, bits ...) and what it measured (frozen fraction, size ...).
        top1_std, top5_std: population standard deviation over seeds (0 for one seed).
        seeds: how many evaluations were averaged.
        images_per_s: measured throughput (median over repetitions), if timed, with its quartiles.
    """

    model: str
    top1: float
    top1_err: float
    top5: float
    top5_err: float
    num_images: int
    skipped_images: int = 0
    param_count: Optional[float] = None
    img_size: Optional[int] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    crop_mode: Optional[str] = None
    mean: Optional[str] = None
    std: Optional[str] = None
    data_config_source: Optional[str] = None
    weights: Optional[str] = None
    fields: dict[str, Any] = field(default_factory=dict)
    top1_std: float = 0.0
    top5_std: float = 0.0
    seeds: int = 1
    images_per_s: Optional[float] = None
    images_per_s_p25: Optional[float] = None
    images_per_s_p75: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        """Flat dict: :data:`~eamvit.columns.HEAD` in its order, spread over seeds, the method fields,
        throughput (if timed)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in HEAD}
        out.update(top1_std=self.top1_std, top5_std=self.top5_std, seeds=self.seeds)
        out.update(self.fields)
        if self.images_per_s is not None:
            out.update(images_per_s=self.images_per_s, images_per_s_p25=self.images_per_s_p25,
                       images_per_s_p75=self.images_per_s_p75)
        return out

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


Row = Union[ResultRow, Mapping]
Formatter = Union[str, Callable[[Any], str]]


@dataclass(frozen=True)
class Column:
    """One column of a table.

    Args:
        key: the row field (the CSV header and the JSON key).
        title: the markdown header (``key`` by default).
        fmt: markdown format: a format spec such as ``".2f"`` or ``","``, or a function of the value;
            missing values (``None``) are empty cells.
        derive: the value as a function of the whole row, for a column that no row field holds;
            ``None``: the row's ``key`` field.
    """

    key: str
    title: str = ""
    fmt: Formatter = ""
    derive: Optional[Callable[[Row], Any]] = None

    def value(self, row: Row) -> Any:
        return self.derive(row) if self.derive is not None else row.get(self.key)

    def header(self) -> str:
        return self.title or self.key

    def cell(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if callable(self.fmt):
            return self.fmt(value)
        if isinstance(value, (bool, str)) or not self.fmt:
            return str(value)
        return format(value, self.fmt)


def retitle(columns: Sequence[Column], **titles: str) -> list[Column]:
    """``columns`` with new markdown headers for some keys (``top1="digits ViT"``); the CSV/JSON keys stay."""
    unknown = set(titles) - {c.key for c in columns}
    if unknown:
        raise EamError(f"no column {sorted(unknown)} to retitle; the columns are {[c.key for c in columns]}")
    return [replace(c, title=titles[c.key]) if c.key in titles else c for c in columns]


def columns_of(rows: Sequence[Row]) -> list[Column]:
    """One plain column per field, the union over ``rows`` in first-seen order."""
    return [Column(k) for k in dict.fromkeys(k for r in rows for k in r)]


def _plain(value: Any) -> Any:
    # JSON has no infinity or NaN: write them as the strings float() reads back.
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def markdown(rows: Sequence[Row], columns: Optional[Sequence[Column]] = None) -> str:
    """A markdown table of ``rows`` (every field when ``columns`` is ``None``)."""
    columns = list(columns) if columns is not None else columns_of(rows)
    if not columns:
        raise EamError("a table needs at least one column")
    lines = ["| " + " | ".join(_esc(c.header()) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_esc(c.cell(c.value(r))) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _esc(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe inside a cell would split it


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(keys))
            w.writeheader()
            w.writerows(rows)


def write_table(stem: str | os.PathLike, rows: Sequence[Row], columns: Optional[Sequence[Column]] = None,
                formats: Sequence[str] = ("csv", "json", "md")) -> dict[str, Path]:
    """Write ``stem.csv``, ``stem.json`` and ``stem.md`` (those of ``formats``) with the same columns, atomically.

    Args:
        stem: path without extension (an extension-like suffix such as ``eval_0.2`` is kept).
        columns: the columns (every field of ``rows`` by default).

    Returns:
        ``{format: path}`` of the files written.
    """
    bad = set(formats) - {"csv", "json", "md"}
    if bad:
        raise EamError(f"unknown table formats {sorted(bad)}; use csv, json, md")
    columns = list(columns) if columns is not None else columns_of(rows)
    plain, stem = [{c.key: _plain(c.value(r)) for c in columns} for r in rows], Path(stem)
    writers = {"csv": lambda path: _write_csv(path, plain, [c.key for c in columns]),
               "json": lambda path: write_text(path, json.dumps(plain, indent=2) + "\n"),
               "md": lambda path: write_text(path, markdown(rows, columns))}
    # Append, never replace: ``--out eval_0.2`` must give eval_0.2.csv, not eval_0.csv.
    out = {fmt: stem.with_name(f"{stem.name}.{fmt}") for fmt in writers if fmt in formats}
    for fmt, path in out.items():
        writers[fmt](path)
    return out


def sweep_table(rows: Sequence[Row]) -> tuple[list[dict[str, Any]], list[Column]]:
    """The freezing sweep as one row per τ and one top-1 column per (selection, scope), with a ``±`` column
    beside selections averaged over several seeds; ``(rows, columns)`` for :func:`markdown` or :func:`write_table`."""
    cols = list(dict.fromkeys((r["selection"], r["scope"]) for r in rows))
    multi = {c for c in cols if any((r["selection"], r["scope"]) == c and r.get("seeds", 1) > 1 for r in rows)}
    columns = [Column("tau", "τ", ".1f")]
    for sel, scope in cols:
        columns.append(Column(f"{sel}_{scope}", f"{sel} ({scope})", ".2f"))
        if (sel, scope) in multi:
            columns.append(Column(f"{sel}_{scope}_std", "±", ".2f"))
    out = []
    for tau in sorted({r["tau"] for r in rows}):
        line: dict[str, Any] = {"tau": tau}
        for sel, scope in cols:
            r = next((r for r in rows if r["tau"] == tau and (r["selection"], r["scope"]) == (sel, scope)), None)
            line[f"{sel}_{scope}"] = r["top1"] if r is not None else None
            if (sel, scope) in multi:
                line[f"{sel}_{scope}_std"] = r.get("top1_std") if r is not None else None
        out.append(line)
    return out, columns


def format_sweep_table(rows: Sequence[Row]) -> str:
    """Markdown of :func:`sweep_table`: top-1 per τ (rows) and (selection, scope) (columns)."""
    return markdown(*sweep_table(rows))
