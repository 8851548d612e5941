"""Atomic file output: a reader never sees a half-written results file, map or checkpoint."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from eamvit.errors import EamError


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) or fail with a clear message."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EamError(f"cannot create output folder {p}: {e.strerror}; choose a writable --out") from None
    if not os.access(p, os.W_OK):
        raise EamError(f"output folder {p} is not writable; choose a writable --out")
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over ``path`` only on success."""
    target = Path(path)
    ensure_writable_dir(target.parent if str(target.parent) else ".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are for sharing
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Rows with possibly different keys; the header is the union in first-seen order."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in rows:
                w.writerow(r)


def write_results(stem: str | os.PathLike, rows: Sequence[dict]) -> tuple[Path, Path]:
    """Write ``stem.csv`` and ``stem.json`` with the same rows."""
    stem = Path(stem)
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    write_csv(csv_path, rows)
    write_json(json_path, list(rows))
    return csv_path, json_path


def save_tensors(path: str | os.PathLike, tensors: dict, meta: dict) -> None:
    """Atomically write ``tensors`` as safetensors with ``meta`` as JSON metadata."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"eamvit": json.dumps(meta)})


def load_tensors(path: str | os.PathLike, fmt: str, what: str, remedy: str) -> tuple[dict, dict]:
    """``(meta, tensors)`` of a file written by :func:`save_tensors` whose ``meta["format"]`` is ``fmt``.

    Args:
        path: the file.
        fmt: the expected format tag.
        what: what the file is, for messages (e.g. ``"entropy maps"``).
        remedy: how to make one (e.g. ``"compute them with `eamvit calibrate`"``).
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise EamError(f"{what} {p} do not exist; {remedy}" if what.endswith("s") else
                       f"{what} {p} does not exist; {remedy}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("eamvit", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise EamError(f"cannot read {what} {p} ({type(e).__name__}); {remedy}") from None
    if meta.get("format") != fmt:
        raise EamError(f"{p} is not an eamvit {what} file; {remedy}")
    return meta, tensors
