"""``models``: which timm attention families eamvit serves, and with which verbs."""
from __future__ import annotations

import argparse


def cmd_models(args: argparse.Namespace) -> None:
    from eamvit.modules.attention import models_table

    print(models_table())


def register(sub) -> None:
    """Add this group's sub-commands to the ``eamvit`` parser."""
    s = sub.add_parser("models", help="print the supported timm model families and the verbs each supports, as a "
                       "markdown table read from the attention adapters")
    s.set_defaults(func=cmd_models)
