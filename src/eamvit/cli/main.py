"""The ``eamvit`` command: thin argument parsing over the Python API; every user error is one line on stderr and
exit status 2 (see docs/architecture-cli.md)."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Optional, Sequence

import eamvit

from eamvit.errors import EamError
from eamvit.cli.common import flush_warnings, validate_common


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``eamvit: error:`` line too (sub-commands inherit it)."""

    def error(self, message: str):
        self.exit(2, f"eamvit: error: {self.prog.removeprefix('eamvit ')}: {message}; see `{self.prog} --help`\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append ``(default: X)`` to an option's help unless the text names its default; never to flags and
    options without a value, whose help says in words what happens without them (``None`` says nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if quiet or action.required or "default" in text:
            return text
        if isinstance(action.default, (list, tuple)):  # as typed on the command line, not a Python list
            return f"{text} (default: {' '.join(str(v) for v in action.default)})"
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``eamvit`` parser; building it imports neither torch nor timm, so ``--help`` is instant."""
    from eamvit.cli import demo, entropy, export, models, optimize, prune, quant, recipe

    p = Parser(prog="eamvit", formatter_class=HelpFormatter,
               description="Entropy Attention Maps and attention-driven compression for timm Vision Transformers")
    p.add_argument("--version", action="version", version=f"%(prog)s {eamvit.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=functools.partial(Parser, formatter_class=HelpFormatter))
    for group in (demo, entropy, quant, prune, recipe, export, optimize, models):
        group.register(sub)
    for choice in sub._choices_actions:  # `eamvit COMMAND --help` opens with the line `eamvit --help` lists
        sub.choices[choice.dest].description = sub.choices[choice.dest].description or choice.help
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from eamvit.cli.quant import validate_quant_args
    from eamvit.cli.recipe import resolve_state, validate_recipe_args
    from eamvit.io import remove_created_dirs

    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    remove_created_dirs(keep=True)  # only this command's folders are its to remove
    try:
        resolve_state(args)  # first: what --state holds decides which checks apply
        validate_common(args)
        validate_recipe_args(args)
        validate_quant_args(args)
        args.func(args)
        flush_warnings()
    except EamError as e:
        flush_warnings(show=False)
        remove_created_dirs()
        print(f"eamvit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        remove_created_dirs()
        print("eamvit: interrupted", file=sys.stderr)
        return 130
    remove_created_dirs(keep=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
