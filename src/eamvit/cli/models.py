"""``models``: which timm attention families eamvit serves, and with which verbs."""
from __future__ import annotations

import argparse

from eamvit.io import write_text

# docs/families.md: this text around the table that the adapters give.
_PAGE = """# Supported families

What each timm attention family supports, as `eamvit models` prints it. The table is read from the
attention adapters (`src/eamvit/modules/vit_swin.py` and `src/eamvit/modules/families.py`); a verb a
family lacks is refused in one line before any work. After changing an adapter, regenerate this page
with `eamvit models --write docs/families.md` (`tests/test_models.py` fails while this page and the command disagree).

\"maps\" and the freezing columns read the post-softmax map of every attention layer; the families
other than ViT/DeiT and Swin v1 run timm's own forward with its fused kernel off only while
something observes or overwrites their attention. \"executed heads\": frozen heads get no scores and
no softmax, only their frozen map times their values (the kept heads run timm's fused kernel where
timm has one); the other families simulate frozen heads.

{table}

A timm backbone inside your own model (a detector or segmenter around `timm.create_model(...,
features_only=True)`) is served the same way: maps, freezing and RepQ-ViT act on any `nn.Module`
that contains supported attention (see \"Models that are not classifiers\" in
[design.md](design.md)).
"""


def cmd_models(args: argparse.Namespace) -> None:
    """Print the table, or write it with its prose (``_PAGE``) as the families page ``--write`` names."""
    from eamvit.modules.attention import models_table

    if args.write:
        write_text(args.write, _PAGE.format(table=models_table()))
        print(f"wrote {args.write}")
    else:
        print(models_table())


def register(sub) -> None:
    """Add this group's sub-commands to the ``eamvit`` parser."""
    s = sub.add_parser("models", help="print the supported timm model families and the verbs each supports, as a "
                       "markdown table read from the attention adapters")
    s.add_argument("--write", default=None, metavar="PAGE", help="write the whole families page (docs/families.md) "
                   "instead of printing the table (default: print)")
    s.set_defaults(func=cmd_models)
