"""``quantize`` and ``compare``, and the quantization options of ``eval``, ``export``, ``compress`` and ``sweep``
(see docs/architecture-cli.md)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eamvit.methods.state import state_of, step_config
from eamvit.choices import (ADFQ_ALPHA_FC1, ADFQ_CALIB_SIZE, ADFQ_ITERATIONS, ATTN_QUANTIZERS, COMPARE_METHODS,
                            QUANT_METHODS)
from eamvit.errors import EamError
from eamvit.io import check_output_file, ensure_writable_dir, output_lock
from eamvit.cli.common import data_splits, flag, load_model
from eamvit.cli.options import (add_data_args, add_model_args, add_target_args, given_values, refuse_given,
                                target_from_args)

if TYPE_CHECKING:  # building the parser (eamvit --help) must not import torch
    from torch import nn
    from torch.utils.data import Dataset

    from eamvit.config import Config
    from eamvit.methods.data import Splits
    from eamvit.methods.repq import RepQConfig


def add_quant_args(p: argparse.ArgumentParser, command: str = "eval") -> None:
    """``--quant`` (``quantize``: ``--method``), the bits and each method's options of ``command``: ``"eval"``
    (also ``export`` and ``compress``), ``"sweep"`` or ``"quantize"``."""
    g = p.add_argument_group("quantization (RepQ-ViT, ADFQ-ViT or PMQ post-training quantization)")
    if command == "quantize":
        g.add_argument("--method", dest="quant", choices=QUANT_METHODS, default="repq",
                       help="quantization method (default repq: RepQ-ViT)")
    else:
        g.add_argument("--quant", choices=QUANT_METHODS, default=None,
                       help="quantize the model first (default: full precision)")
        g.add_argument("--quant-state", default=None, help=("the same as --state with a" if command == "eval" else
                       "load a") + " quantized state of `eamvit quantize`, not calibrating anew (default: none)")
    g.add_argument("--w-bits", type=int, default=None, help="weight bits, 2..8 (default 4)")
    g.add_argument("--a-bits", type=int, default=None, help="activation bits, 2..8 (default 4)")
    g.add_argument("--quant-calib-size", type=int, default=None,
                   help="calibration images of RepQ-ViT (one batch) and PMQ (default 32, as both papers)")
    g.add_argument("--attn-quantizer", choices=ATTN_QUANTIZERS, default=None,
                   help=f"RepQ-ViT post-softmax quantizer (default {ATTN_QUANTIZERS[0]}, as RepQ-ViT)")
    g.add_argument("--no-reparam", action="store_true", default=None,
                   help="keep post-LayerNorm inputs per channel (no scale reparameterization)")
    g.add_argument("--adfq-iterations", type=int, default=None, help="ADFQ-ViT reconstruction iterations per module "
                   f"(the reference code's; the paper uses 3000) (default: {ADFQ_ITERATIONS})")
    g.add_argument("--adfq-calib-size", type=int, default=None,
                   help=f"ADFQ-ViT calibration images (default: {ADFQ_CALIB_SIZE})")
    for name, what in (("poq", "the outlier-aware quantizer"), ("slq", "the shift-log quantizer"),
                       ("amo", "module-wise reconstruction")):
        g.add_argument(f"--adfq-no-{name}", action="store_true", default=None, help=f"ADFQ-ViT without {what}")
    g.add_argument("--adfq-alpha-fc1", type=float, default=None, help="ADFQ-ViT outlier threshold of fc1 inputs "
                   f"(the reference code's; the paper says 10) (default: {ADFQ_ALPHA_FC1})")
    g.add_argument("--adfq-checkpoint-dir", default=None,
                   help="folder for resumable per-module ADFQ-ViT checkpoints (default: none, no resume)")
    g.add_argument("--pmq-config", default=None,
                   help='PMQ bits as W/A/P[(MP)], e.g. "8/8/4(MP)" (default: --w-bits/--a-bits/--a-bits(MP))')
    g.add_argument("--pmq-budget-mb", type=float, default=None,
                   help="PMQ size budget of the quantized weights in MB (default: all weights at W bits)")
    if command == "sweep":
        g.add_argument("--frozen-bits", type=int, default=None,
                       help="bits of the quantized frozen values (default: --a-bits)")


def _bits(args: argparse.Namespace) -> dict[str, int]:
    """``--w-bits`` and ``--a-bits``, else the command's default bits."""
    from eamvit.methods.quantize import default_bits

    return {k: default_bits(args.command == "export") if v is None else v
            for k, v in (("w_bits", args.w_bits), ("a_bits", args.a_bits))}


def quant_config(args: argparse.Namespace) -> RepQConfig:
    """The :class:`RepQConfig` the arguments ask for."""
    from eamvit.methods.repq import RepQConfig

    return RepQConfig(**_bits(args), seed=getattr(args, "seed", 0), reparam=not args.no_reparam,
                      **given_values(calib_size=args.quant_calib_size, attn_quantizer=args.attn_quantizer))


def method_config(args: argparse.Namespace) -> Config:
    """The config of ``--quant`` / ``--method`` (RepQ-ViT, ADFQ-ViT or PMQ)."""
    from eamvit.methods import adfq, pmq

    seed = getattr(args, "seed", 0)
    if getattr(args, "quant", None) == "adfq":
        return adfq.ADFQConfig(**_bits(args), **given_values(iterations=args.adfq_iterations,
                                                             calib_size=args.adfq_calib_size,
                                                             alpha_fc1=args.adfq_alpha_fc1),
                               poq=not args.adfq_no_poq, slq=not args.adfq_no_slq, amo=not args.adfq_no_amo, seed=seed)
    if getattr(args, "quant", None) == "pmq":
        text = args.pmq_config or "{w_bits}/{a_bits}/{a_bits}(MP)".format(**_bits(args))
        return pmq.PMQConfig.from_string(text, size_budget_mb=args.pmq_budget_mb, seed=seed,
                                         **given_values(calib_size=args.quant_calib_size))
    return quant_config(args)


def _row(model: nn.Module) -> dict[str, Any]:
    """Result-row fields of a quantized model."""
    cfg = step_config(model, "quant")
    row: dict[str, Any] = {"quant": cfg.KIND, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits}
    if cfg.KIND == "pmq":
        row["bits"] = cfg.label
        report = state_of(model).reports.get("quant")
        if report:
            # Not model_bytes: PMQ's budget counts only the weights it quantizes, at their bits.
            row["pmq_weight_mb"] = round(report["chosen_size_mb"], 4)
    return row


# Options of calibrating a quantized model, by the methods they apply to.
_CALIBRATION = {"w_bits": QUANT_METHODS, "a_bits": QUANT_METHODS, "quant_calib_size": ("repq", "pmq"),
                "attn_quantizer": ("repq",), "no_reparam": ("repq",),
                **{o: ("adfq",) for o in ("adfq_iterations", "adfq_calib_size", "adfq_no_poq", "adfq_no_slq",
                                          "adfq_no_amo", "adfq_alpha_fc1", "adfq_checkpoint_dir")},
                "pmq_config": ("pmq",), "pmq_budget_mb": ("pmq",)}
# Those a recipe (--recipe, --state) holds, --adfq-checkpoint-dir aside.
QUANT_OPTIONS = ("quant", "quant_state", *(o for o in _CALIBRATION if o != "adfq_checkpoint_dir"))


def validate_quant_args(args: argparse.Namespace) -> None:
    """Refuse, before anything is loaded, quantization options that are bad or that cannot apply."""
    if not hasattr(args, "w_bits"):
        return
    if getattr(args, "quant_state", None):
        refuse_given(args, ["quant", *_CALIBRATION],
                     f"with {flag(args, 'quant_state')}, which holds a model quantized already ({args.quant_state})")
    elif not getattr(args, "quant", None):
        refuse_given(args, [*_CALIBRATION, "frozen_bits"], "without --quant (the model stays full precision)")
    else:
        option = "--method" if getattr(args, "command", None) == "quantize" else "--quant"
        refuse_given(args, [o for o, methods in _CALIBRATION.items() if args.quant not in methods],
                     f"to {option} {args.quant}")
        if args.quant == "pmq" and args.pmq_config:
            refuse_given(args, ["w_bits", "a_bits"], "with --pmq-config, which sets the PMQ bits")
    if getattr(args, "quant", None) in ("adfq", "pmq"):
        if getattr(args, "command", None) == "sweep":
            raise EamError("sweep --quant supports repq; use `eamvit eval --quant adfq|pmq` or `eamvit compare`")
        method_config(args)
    if getattr(args, "quant_state", None) and not Path(args.quant_state).is_file():
        raise EamError(f"--quant-state {args.quant_state} does not exist; make one with `eamvit quantize`")
    quant_config(args)
    if getattr(args, "frozen_bits", None) is not None:
        from eamvit.modules.quantizers import check_quant_bits

        check_quant_bits(args.frozen_bits, "--frozen-bits")


def calib_set(sp: Splits, who: str = "RepQ-ViT") -> Dataset:
    """The calibration images of ``sp`` as one dataset (``who`` needs them: the refusal names it)."""
    from torch.utils.data import Subset

    if sp.calib_set is None:
        raise EamError(f"{who} needs calibration images; pass --calib-data or use a dataset with a training split")
    return Subset(sp.calib_set, list(sp.calib_indices)) if sp.calib_indices is not None else sp.calib_set


def cmd_quantize(args: argparse.Namespace) -> None:
    """``eamvit quantize``: calibrate with ``--method`` and save the quantized state (packed codes)."""
    from eamvit.methods.quantize import save_quantized
    from eamvit.methods.recipe import Recipe, apply_

    out = check_output_file(args.out)
    cfg = method_config(args)
    recipe = Recipe(steps=(cfg,), target=target_from_args(args, cfg))
    with output_lock(out):  # a second run writing the same --out fails instead of overwriting this one's
        model, _ = load_model(args)
        sp = data_splits(args, model, need_calib=True, scores=False)
        apply_(model, recipe, calib_set(sp), progress=True, checkpoint_dir=args.adfq_checkpoint_dir)
        save_quantized(model, out)
    name = {"repq": "RepQ-ViT", "adfq": "ADFQ-ViT", "pmq": "PMQ"}[cfg.KIND]
    print(f"wrote {out} ({out.stat().st_size:,} bytes): {name} W{cfg.w_bits}/A{cfg.a_bits} for target "
          f"{recipe.target.form}, calibrated on {cfg.calib_size} images (seed {cfg.seed}); load it with --state {out}")


def _cmd_compare(args: argparse.Namespace) -> None:
    """``eamvit compare``: the table, CSV + JSON and markdown in ``--out``."""
    from eamvit.experiments.compare import CompareConfig, compare, markdown_table
    from eamvit.experiments.results import write_table
    from eamvit.methods import adfq, pmq

    split = lambda text: tuple(s.strip() for s in text.split(",") if s.strip())  # noqa: E731
    settings = tuple((d["w_bits"], d["a_bits"]) for d in map(pmq.parse_bits_config, split(args.settings)))
    cfg = CompareConfig(methods=split(args.methods), settings=settings, pmq_budgets=split(args.pmq_budgets),
                        adfq=adfq.ADFQConfig(iterations=args.adfq_iterations, calib_size=args.adfq_calib_size),
                        freeze_sparsity=args.freeze_sparsity, batch_size=args.batch_size)
    out = ensure_writable_dir(args.out)
    model, device = load_model(args)
    sp = data_splits(args, model, need_calib=True)
    rows = compare(lambda: model, calib_set(sp, "compare"), sp.eval_set, cfg, device=device,
                   test_indices=sp.eval_indices, data_config=sp.data_config)
    write_table(out / "compare", rows)
    print(f"{rows[0]['model']}:\n{markdown_table(rows)}")
    print(f"wrote {out / 'compare.csv'}, {out / 'compare.json'}, {out / 'compare.md'}")


def register(sub) -> None:
    """Add this group's sub-commands to the ``eamvit`` parser."""
    s = sub.add_parser("quantize", help="post-training quantization (RepQ-ViT, ADFQ-ViT or PMQ); saves the "
                       "quantized state with weights packed at their bit width")
    add_model_args(s)
    add_data_args(s)
    add_quant_args(s, "quantize")
    add_target_args(s)
    s.add_argument("--out", required=True, help="quantized state to write (.safetensors)")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("compare", help="FP vs RepQ-ViT vs ADFQ-ViT vs PMQ: top-1, size, calibration time (CSV, "
                       "markdown)")
    add_model_args(s)
    add_data_args(s)
    g = s.add_argument_group("comparison")
    g.add_argument("--methods", default=",".join(COMPARE_METHODS), help="comma-separated methods, among the default's")
    g.add_argument("--settings", default="4/4,6/6", help="comma-separated W/A settings, one row per method each")
    g.add_argument("--pmq-budgets", default="", help='extra PMQ rows, one per W/A/P[(MP)] configuration, e.g. '
                   '"8/8/4(MP),6/6/6(MP)" (default: none)')
    g.add_argument("--adfq-iterations", type=int, default=ADFQ_ITERATIONS,
                   help="ADFQ-ViT reconstruction iterations per module (the reference code's; the paper uses 3000)")
    g.add_argument("--adfq-calib-size", type=int, default=ADFQ_CALIB_SIZE, help="ADFQ-ViT calibration images")
    g.add_argument("--freeze-sparsity", type=float, default=None,
                   help="EAM sparsity τ frozen on top of every quantized row (default: no freezing)")
    g.add_argument("--out", default="eamvit-compare", help="output folder (compare.csv/json, compare.md)")
    s.set_defaults(func=_cmd_compare)
