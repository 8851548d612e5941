"""The one recipe of the command line, built for ``eval``, ``export`` and ``compress`` alike, and ``compress``
(see docs/architecture-cli.md)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Optional

from eamvit.methods.state import state_of, step_config
from eamvit.errors import EamError
from eamvit.io import check_output_file, output_lock
from eamvit.cli.common import data_splits, flag, get_maps, is_main, load_maps, load_model
from eamvit.cli.options import (FREEZE_OPTIONS, FREEZE_SETTINGS, MERGE_OPTIONS, PRUNE_OPTIONS, TARGET_OPTIONS,
                                add_data_args, add_entropy_args, add_freeze_args, add_merge_args, add_model_args,
                                add_prune_args, add_target_args, freeze_config, merge_config, prune_config,
                                refuse_given, refuse_merge_args, set_help, target_from_args, target_label)
from eamvit.cli.quant import QUANT_OPTIONS, _row, add_quant_args, calib_set, method_config

if TYPE_CHECKING:  # building the parser must not import torch
    from eamvit.methods.recipe import Recipe

# The options of the recipe's steps, which --state and --recipe hold instead.
_STEP_OPTIONS = (*QUANT_OPTIONS, "frozen", *PRUNE_OPTIONS, *MERGE_OPTIONS, *TARGET_OPTIONS)


def add_stack_args(p: argparse.ArgumentParser) -> None:
    """Every option of a compressed model (``eval``, ``export``, ``compress``): the model, the data,
    entropy maps, freezing, pruning or merging, quantization, the deployment target and the recipe."""
    for add in (add_model_args, add_data_args, add_entropy_args, add_freeze_args, add_prune_args, add_merge_args):
        add(p)
    add_quant_args(p, "eval")
    add_target_args(p)
    g = p.add_argument_group("recipe (quantize → freeze → prune or merge, in one file)")
    g.add_argument("--recipe", default=None, help="calibrate anew the recipe of this file of `eamvit compress` (or "
                   "a recipe .json) instead of the options' steps (default: none, the options' recipe)")
    g.add_argument("--state", default=None, help="a compressed model of `eamvit compress` (calibrated already), or "
                   f"a part to build on: {_PART_FILES}; the file says which (default: none, build it from the options)")


_PART_FILES = ("a quantized state of `eamvit quantize` or the frozen attention of `eamvit finetune --tau` "
               "(frozen.safetensors)")
_PARTS = {"quant": ("quant_state", "--quant-state"), "frozen": ("frozen", "--frozen")}


def resolve_state(args: argparse.Namespace) -> None:
    """Read what ``--state`` holds (before any other check): a quantized state or frozen attention
    becomes what ``--quant-state`` / ``--frozen`` give, and every message names ``--state``."""
    path = getattr(args, "state", None)
    if not path or getattr(args, "onnx", None):  # eval --onnx refuses --state itself
        return
    from eamvit.methods.recipe import artifact_kind

    kind = artifact_kind(path)
    if kind == "compressed":
        if args.command == "compress":
            raise EamError(f"--state {path} is a compressed model already; evaluate it with `eamvit eval --state "
                           f"{path}`, or give compress a quantized state or frozen attention to build on")
        return
    dest, alias = _PARTS[kind]
    if getattr(args, dest, None):
        raise EamError(f"--state {path} and {alias} {getattr(args, dest)} both give the "
                       f"{'quantization' if kind == 'quant' else 'frozen attention'}; drop one")
    setattr(args, dest, path)
    args.state = None
    args.flags = {**getattr(args, "flags", {}), dest: "--state"}


def validate_recipe_args(args: argparse.Namespace) -> None:
    """Refuse, before anything is loaded, recipe options that cannot apply (nothing is ignored silently)."""
    if getattr(args, "command", None) not in ("eval", "export", "compress") or getattr(args, "onnx", None):
        return
    if getattr(args, "state", None):
        refuse_given(args, ["recipe", *_STEP_OPTIONS, *FREEZE_OPTIONS],
                     f"with --state, which holds the whole compressed model ({args.state})")
        return
    if getattr(args, "recipe", None):
        refuse_given(args, [*_STEP_OPTIONS, *FREEZE_SETTINGS], f"with --recipe, which holds the steps ({args.recipe})")
        return
    if not args.prune:
        refuse_given(args, PRUNE_OPTIONS[1:], "without --prune (no tokens are pruned)")
    elif args.prune != "renyi":
        refuse_given(args, ["alpha"], f"to --prune {args.prune} (the Rényi order is --prune renyi's)")
    refuse_merge_args(args)
    freezes = (args.tau or 0) > 0 or getattr(args, "maps", None)
    if not freezes and not getattr(args, "frozen", None):
        refuse_given(args, [d for d in FREEZE_OPTIONS if d not in ("tau", "maps")],
                     "without --tau or --maps (nothing is frozen)")
    if args.granularity in (None, "entry"):  # FreezeConfig's default granularity is entry
        refuse_given(args, ["aggregate"], "to --granularity entry (it ranks whole rows and heads)")
    if args.value_bits is None:
        refuse_given(args, ["value_quantizer"], "without --value-bits (the frozen values stay fp32)")
    if getattr(args, "maps", None):
        refuse_given(args, ["bits", "max_memory"], "with --maps, which are computed already")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The one recipe the command line asks for: ``--recipe``, ``--state``'s, or the options' steps (not those of
    ``--quant-state`` and ``--frozen``, which are loaded, not applied)."""
    from eamvit.methods.recipe import Recipe, read_recipe

    if getattr(args, "state", None):
        return read_recipe(args.state)
    if getattr(args, "recipe", None):
        return read_recipe(args.recipe).targeted()
    steps = []
    if getattr(args, "quant", None) and not getattr(args, "quant_state", None):
        steps.append(method_config(args))
    if ((args.tau or 0) > 0 or getattr(args, "maps", None)) and not getattr(args, "frozen", None):
        steps.append(freeze_config(args))
    if args.prune:
        steps.append(prune_config(args))
    if args.merge:
        steps.append(merge_config(args))
    if getattr(args, "quant_state", None):  # calibrated already, for the target it holds
        refuse_given(args, TARGET_OPTIONS, f"with {flag(args, 'quant_state')} {args.quant_state}, which was "
                     "calibrated for its own deployment target")
        target = None
    else:
        target = target_from_args(args, steps[0] if steps and steps[0].KIND in ("repq", "adfq", "pmq") else None)
    return Recipe(steps=tuple(steps), target=target)


def needs_calibration(args: argparse.Namespace, recipe: Recipe) -> bool:
    """Whether applying ``recipe`` reads calibration images (quantizing, or maps to compute)."""
    return not getattr(args, "state", None) and (recipe.step("quant") is not None or (
        recipe.step("freeze") is not None and not getattr(args, "maps", None)))


def apply_args(args: argparse.Namespace, model, device, sp, maps=None) -> tuple[Recipe, dict[str, Any]]:
    """Build the command line's model on ``model`` in place (``--state``, or the loaded parts and the recipe
    calibrated on ``sp``); returns the whole recipe it now carries (loaded parts included) and its row fields."""
    from eamvit.methods.recipe import build_, restore_

    recipe = recipe_from_args(args)
    if getattr(args, "state", None):
        restore_(model, args.state)
        return recipe, row_fields(model, recipe, {}, state=args.state)
    calib = calib_set(sp) if recipe.step("quant") is not None else None
    provider = lambda m: get_maps(args, m, device, sp, maps=maps)
    whole, reports = build_(model, recipe, calib, quant_state=getattr(args, "quant_state", None),
                            frozen=getattr(args, "frozen", None), maps=provider, device=device, progress=True,
                            checkpoint_dir=getattr(args, "adfq_checkpoint_dir", None))
    frozen = None
    if "frozen" in reports:
        frozen = {"frozen": str(args.frozen), **{k: reports["frozen"][k] for k in ("tau", "granularity")
                                                 if reports["frozen"]}}
    return whole, row_fields(model, whole, reports, frozen=frozen)


def row_fields(model, recipe: Recipe, reports: dict[str, Any], state: Optional[str] = None,
               frozen: Optional[tuple] = None) -> dict[str, Any]:
    """Result-row fields of ``model`` compressed by ``recipe`` (``reports``: :func:`~eamvit.methods.recipe.apply_`'s;
    ``state``: the ``--state`` file it was rebuilt from; ``frozen``: the fields of ``--frozen``, if it froze)."""
    from eamvit.experiments.prune_sweep import merged_fields
    from eamvit.methods.cost import count_gflops, modelled
    from eamvit.methods.prune import setting_text, token_counts

    freeze = recipe.step("freeze")
    extra: dict[str, Any] = {"tau": freeze.tau} if freeze is not None else {}  # blank where nothing is frozen
    if state:
        extra["state"] = str(state)
    if step_config(model, "quant") is not None:
        extra.update(_row(model))
        if state_of(model).target is not None:
            extra["target"] = target_label(state_of(model).target)
    if frozen:
        extra.update(frozen)
    elif freeze is not None:
        extra.update(_freeze_fields(model, freeze, reports.get("freeze")))
    gmacs = lambda: round(count_gflops(model), 4) if modelled(model) else None  # noqa: E731
    prune = recipe.step("prune")
    if prune is not None:
        grid, rep = state_of(model).prune.grid, reports.get("prune")
        tokens = rep.tokens_per_stage if rep is not None else token_counts(
            grid[0] * grid[1] if grid else 0, prune.keep_rate, len(state_of(model).prune.blocks), prune.fuse_tokens)
        extra.update(prune=prune.method, keep_rate=setting_text(prune.keep_rate), tokens="-".join(map(str, tokens)),
                     gmacs=gmacs())
        if rep is not None:
            extra["unfrozen_layers"] = len(rep.unfrozen_layers)
        if prune.method == "renyi":
            extra["alpha"] = setting_text(prune.alpha)
    if recipe.step("merge") is not None:
        extra.update(merged_fields(model), gmacs=gmacs())
        rep = reports.get("merge")
        if rep is not None:
            extra["unfrozen_layers"] = len(rep.unfrozen_layers)
    return extra


def _freeze_fields(model, freeze, rep) -> dict[str, Any]:
    from eamvit.methods.cost import cost_account, modelled

    # Blank where the MAC account does not model the family's attention (never a wrong count).
    acct = cost_account(model) if modelled(model) else None
    out = {"scope": freeze.resolved_scope, "selection": freeze.selection, "granularity": freeze.granularity,
           "gmacs": round(acct.gmacs, 4) if acct else None,
           "predicted_speedup": round(acct.predicted_speedup, 4) if acct else None}
    if rep is not None:
        out.update(frozen_fraction=round(rep.frozen_fraction, 6), frozen_window_masked=rep.frozen_window_masked)
    out["value_bits"] = freeze.value_bits if freeze.value_bits else 32
    return out


def cmd_compress(args: argparse.Namespace) -> None:
    """``eamvit compress``: apply the recipe and write the whole compressed model to one file."""
    from eamvit.methods.recipe import save_compressed

    out = check_output_file(args.out)
    recipe = recipe_from_args(args)
    if not recipe.steps and not getattr(args, "quant_state", None) and not getattr(args, "frozen", None):
        raise EamError("compress needs a step: --quant, --tau/--maps, --prune, --merge, --recipe, or --state with a "
                       "quantized state or frozen attention")
    with output_lock(out):
        model, device = load_model(args)
        maps = load_maps(args, model)
        sp = data_splits(args, model, need_calib=needs_calibration(args, recipe), maps=maps, scores=False)
        whole, fields = apply_args(args, model, device, sp, maps)
        if is_main():
            save_compressed(model, out, whole)
            steps = " → ".join(s.KIND for s in whole.steps)
            print(f"wrote {out} ({out.stat().st_size:,} bytes): {steps}, {summary(fields)}; evaluate it with "
                  f"`eamvit eval --state {out}`, export it with `eamvit export --state {out} --out model.onnx`")


def summary(fields: dict[str, Any]) -> str:
    """The fields of :func:`row_fields` that a written file's line names."""
    shown = ("quant", "w_bits", "a_bits", "tau", "granularity", "frozen", "prune", "keep_rate", "merge", "merge_r",
             "tokens")
    return ", ".join(f"{k}={v}" for k, v in fields.items() if k in shown)


def register(sub) -> None:
    """Add ``compress`` to the ``eamvit`` parser."""
    s = sub.add_parser("compress", help="quantize, freeze and prune or merge in one go and write the whole compressed "
                       "model to one file (.safetensors) for `eval --state` and `export --state`")
    add_stack_args(s)  # a compressed model has nothing left to compress:
    set_help(s, state=f"a part to build on: {_PART_FILES}; the file says which (default: none)")
    s.add_argument("--out", required=True, help="compressed model to write (.safetensors)")
    s.set_defaults(func=cmd_compress)
