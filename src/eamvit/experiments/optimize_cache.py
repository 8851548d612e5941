"""``points.jsonl``: the points ``eamvit optimize`` measured, one per line under a digest of what each depends
on, so that a rerun resumes. Design: ``docs/architecture-experiments.md``, "optimize_cache".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn, Optional

from eamvit.errors import EamError

CACHE = "points.jsonl"
CACHE_VERSION = 2  # 2: points carry every accuracy field of a results row
# The numbers every measured point holds since the first version; a point that could not be built holds "error".
POINT_NUMBERS = ("top1", "num_images", "speedup", "speedup_p25", "speedup_p75")
_LINE_START = '{"key": "'  # how json.dumps begins every line PointCache.add writes


def _point_problem(entry: Any) -> Optional[str]:
    """Why a parsed line of ``points.jsonl`` is not a point :meth:`PointCache.add` wrote, or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not isinstance(entry.get("point"), dict):
        return 'not {"key": ..., "point": {...}}'
    point = entry["point"]
    if not isinstance(point.get("label"), str):
        return "its point has no label"
    if "error" in point:
        return None if isinstance(point["error"], str) else "its error is not text"
    bad = [k for k in POINT_NUMBERS if not isinstance(point.get(k), (int, float)) or isinstance(point.get(k), bool)]
    return f"its point has no number {bad[0]!r}" if bad else None


class PointCache:
    """``points.jsonl``: one measured point per line, keyed by digest; a line cut short by an interruption is
    measured again, any other line that is not a point refuses the whole file."""

    def __init__(self, path: Path):
        self.path = path
        self.points: dict[str, dict[str, Any]] = {}
        text = self._text(path)
        self._cut = bool(text) and not text.endswith("\n")  # the next point must start on a line of its own
        for n, line in enumerate(text.splitlines(), 1):
            try:
                entry = json.loads(line)
            except ValueError:
                if _LINE_START.startswith(line) or line.startswith(_LINE_START):  # cut short by a kill
                    continue
                self._refuse(f"line {n} is not JSON")
            problem = _point_problem(entry)
            if problem:
                self._refuse(f"line {n}: {problem}")
            self.points[entry["key"]] = entry["point"]

    def _refuse(self, why: str) -> NoReturn:
        raise EamError(f"cannot resume from {self.path}: {why}, so it is not a cache of points eamvit optimize "
                       "wrote; delete it (its points are measured again) or choose another --out")

    def _text(self, path: Path) -> str:
        if not path.exists():
            return ""
        try:
            return path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            self._refuse(f"byte {e.start} is not text")
        except OSError as e:
            self._refuse(f"it cannot be read ({e.strerror or type(e).__name__})")

    def get(self, key: str) -> Optional[dict[str, Any]]:
        return self.points.get(key)

    def add(self, key: str, point: dict[str, Any]) -> None:
        self.points[key] = point
        with open(self.path, "a") as f:  # one line per point: an interrupted write loses that point only
            f.write(("\n" if self._cut else "") + json.dumps({"key": key, "point": point}) + "\n")
            f.flush()
        self._cut = False
