"""The ``eamvit`` command: thin argument parsing over the Python API.

Every user error is an :class:`~eamvit.errors.EamError`: one line on stderr, exit status 2, and no
output file is left half-written (all writes are atomic).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from eamvit.errors import EamError
from eamvit.cli.common import flush_warnings, validate_common


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``eamvit: error:`` line too (sub-commands inherit it)."""

    def error(self, message: str):
        self.exit(2, f"eamvit: error: {self.prog.removeprefix('eamvit ')}: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    from eamvit.cli import demo, entropy, prune, quant

    p = Parser(prog="eamvit", description="Entropy Attention Maps and attention-driven "
                                "compression for timm Vision Transformers")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (demo, entropy, quant, prune):
        group.register(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from eamvit.cli.quant import validate_quant_args

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_common(args)
        validate_quant_args(args)
        args.func(args)
        flush_warnings()
    except EamError as e:
        flush_warnings(show=False)
        print(f"eamvit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eamvit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
