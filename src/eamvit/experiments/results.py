"""The one results writer: typed rows to CSV, JSON and markdown with the same columns."""
from __future__ import annotations

from typing import Sequence


def format_sweep_table(rows: Sequence[dict]) -> str:
    """Markdown table: one row per τ, one column per (selection, scope)."""
    cols = []
    for r in rows:
        c = (r["selection"], r["scope"])
        if c not in cols:
            cols.append(c)
    taus = sorted({r["tau"] for r in rows})
    head = "| τ | " + " | ".join(f"{s} ({sc})" for s, sc in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for t in taus:
        cells = []
        for s, sc in cols:
            r = next((r for r in rows if r["tau"] == t and r["selection"] == s and r["scope"] == sc), None)
            if r is None:
                cells.append("")
            elif r.get("top1_std"):
                cells.append(f"{r['top1']:.2f} ± {r['top1_std']:.2f}")
            else:
                cells.append(f"{r['top1']:.2f}")
        lines.append(f"| {t:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
