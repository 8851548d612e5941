"""Run one eamvit command twice, natively and with the CPU kernels of an AVX2-only machine, and
compare every top-1 in the results it writes.

Why: float32 kernels sum in a different order with AVX-512 than with AVX2 (ATen's vectorised
kernels, oneDNN and MKL each pick their code path from the CPU). The differences are a few ulps, but
a 4-bit quantizer turns a value that sits on a rounding boundary into a different code; during
calibration such flips move every later range search, so the same command gives different
quantized models on the two kinds of CPU. On an AVX-512 machine the three libraries can be held to
their AVX2 code paths (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), which
reproduces an AVX2 machine's numbers on this one.

    python scripts/cpu_spread.py --out spread -- compare --data digits
    python scripts/cpu_spread.py --out spread -- demo --full

The command is given without ``--out``: each run writes to ``OUT/native`` and ``OUT/avx2``. Prints
one line per results row whose top-1 differs, then the number of rows compared and differing.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def run(command: list[str], out: Path, extra_env: dict[str, str]) -> None:
    env = {**os.environ, **extra_env}
    cmd = [sys.executable, "-m", "eamvit.cli", *command, "--out", str(out)]
    print("$", " ".join(f"{k}={v}" for k, v in extra_env.items()), " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode:
        sys.exit(f"cpu_spread: the command failed (see above): {' '.join(cmd[1:])}")


def top1_rows(folder: Path) -> dict[tuple[str, int], dict]:
    """``(csv file, row number) -> row`` for every CSV row with a top-1 column under ``folder``."""
    rows = {}
    for path in sorted(folder.rglob("*.csv")):
        with open(path, newline="") as f:
            for i, row in enumerate(csv.DictReader(f)):
                if row.get("top1"):
                    rows[(str(path.relative_to(folder)), i)] = row
    return rows


def label(row: dict) -> str:
    keys = ("label", "quant", "bits", "w_bits", "a_bits", "selection", "granularity", "tau", "maps", "value_bits",
            "prune", "alpha", "keep_rate", "runtime")  # settings of eamvit.columns.COLUMNS
    return " ".join(f"{k}={row[k]}" for k in keys if row.get(k) not in (None, ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the two runs' outputs")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the eamvit command after `--`")
    args = p.parse_args()
    command = [c for c in args.command if c != "--"]
    if not has_avx512():
        sys.exit("cpu_spread: this CPU has no AVX-512, so both runs would use the same kernels")
    run(command, args.out / "native", {})
    run(command, args.out / "avx2", AVX2)
    a, b = top1_rows(args.out / "native"), top1_rows(args.out / "avx2")
    differ = 0
    for key in sorted(a.keys() & b.keys()):
        if a[key]["top1"] != b[key]["top1"]:
            differ += 1
            print(f"{key[0]:28s} {label(a[key]):60s} AVX-512 {float(a[key]['top1']):6.2f}  "
                  f"AVX2 {float(b[key]['top1']):6.2f}")
    print(f"{len(a.keys() & b.keys())} rows compared, {differ} differ")


if __name__ == "__main__":
    main()
