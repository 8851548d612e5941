"""The options shared by the commands and the configs they build.

Building these imports neither torch nor timm, so ``eamvit --help`` stays instant. An option that can be
refused defaults to ``None``, "not given"; its help names the config's default, which then applies.
"""
from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

from eamvit.choices import (AGGREGATES, ENTROPY_KEYS, GRANULARITIES, MERGE_SELECTIONS, PLACEMENTS, PRUNE_METHODS,
                            SCOPES, SELECTIONS, VALUE_QUANTIZERS)
from eamvit.errors import EamError


def listed(parse, what: str, empty: bool = True, per_block: bool = False):
    """An argument type reading values separated by commas with ``parse`` (``empty``: none is allowed;
    ``per_block``: one value stands for itself, several are a tuple, one per block)."""
    def read(text: str):
        try:
            values = [parse(t) for t in text.replace(",", " ").split()]
        except (ValueError, argparse.ArgumentTypeError):
            values = None
        if values is None or not (values or empty):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values if not per_block else values[0] if len(values) == 1 else tuple(values)
    return read


def alpha_arg(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity", "∞"):
        return float("inf")
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a Rényi order such as 0.5, 2 or inf, got {text!r}") from None


floats = listed(float, "numbers separated by commas")
ints = listed(int, "integers separated by commas")
orders_arg = listed(alpha_arg, "Rényi orders such as 0.5,1,2,inf", empty=False)
r_values = listed(int, "a number of tokens or one per merging block", empty=False, per_block=True)


def per_block_arg(parse, what: str):
    return listed(parse, f"{what}, or one per pruning block such as 0.9,0.7,0.5", empty=False, per_block=True)


def _granularity(text: str) -> str:
    if text not in GRANULARITIES:
        raise ValueError(text)
    return text


granularities = listed(_granularity, f"granularities from {','.join(GRANULARITIES)}", empty=False)


def parse_model_kwargs(items: Sequence[str]) -> dict:
    """``["img_size=16", "depths=(2,2)"]`` -> ``{"img_size": 16, "depths": (2, 2)}`` (Python literals, else strings)."""
    import ast

    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not key.strip().isidentifier():
            raise EamError(f"--model-kwargs takes KEY=VALUE pairs such as img_size=16, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="timm model name (default: the bundled digits ViT)")
    g.add_argument("--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE",
                   help="timm.create_model overrides, e.g. img_size=16 num_classes=10; keys that load weights are "
                        "refused: use --checkpoint (default: none)")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--pretrained", action="store_true", default=None, help="weights from the local timm / HF cache")
    w.add_argument("--checkpoint", default=None, help="state dict file (.pth, .pt, .safetensors); eamvit's carry "
                   "the preprocessing they were trained with, used by default")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or mps (default: cuda if available)")


DATA_DEFAULTS = {"data": "digits", "seed": 0}  # options every command reads: a value, not "not given"
SEE_ABOVE = "(default: see above)"


def add_data_args(p: argparse.ArgumentParser, calib: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=DATA_DEFAULTS["data"],
                   help="ImageFolder root (ImageNet val layout) or 'digits' (scikit-learn's bundled digits)")
    g.add_argument("--num-samples", type=int, default=None,
                   help="evaluate on a seeded random subset of this size (default: all)")
    if calib:
        g.add_argument("--calib-data", default=None, help="ImageFolder for calibration (default: the digits "
                       "training split, else a seeded held-out part of --data that evaluation skips; calibrate: all "
                       "of --data)")
        g.add_argument("--calib-size", type=int, default=None,
                       help="calibration images, at most half of a held-out part; what a command saves records "
                            "them, and evaluating it never scores them (default: min(512, available), calibrate: all)")
    g.add_argument("--seed", type=int, default=DATA_DEFAULTS["seed"], help="seed of the subsets and random freezing")
    g.add_argument("--batch-size", type=int, default=64, help="images per batch")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0: the main process)")
    g.add_argument("--strict-images", action="store_true", help="fail on an unreadable image instead of skipping it")
    t = p.add_argument_group("preprocessing overrides (default: the config the checkpoint carries, else the "
                             "model's timm data config; --data digits: resized, never cropped, mean/std 0.5)")
    t.add_argument("--img-size", type=int, default=None, help="input side in pixels, a multiple of the patch size, "
                   f"for models that accept it (else --model-kwargs img_size=N) {SEE_ABOVE}")
    t.add_argument("--crop-pct", type=float, default=None, help=f"center-crop fraction in (0, 1], 1: none {SEE_ABOVE}")
    t.add_argument("--crop-mode", default=None, choices=["center", "squash", "border"],
                   help=f"how the crop is taken {SEE_ABOVE}")
    t.add_argument("--mean", type=float, nargs="+", default=None, help=f"per-channel mean, or one for all {SEE_ABOVE}")
    t.add_argument("--std", type=float, nargs="+", default=None, help=f"per-channel std (> 0), or one {SEE_ABOVE}")
    t.add_argument("--interpolation", default=None, choices=["bilinear", "bicubic", "nearest", "random"],
                   help=f"resize interpolation {SEE_ABOVE}")


def add_entropy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("entropy maps")
    g.add_argument("--maps", default=None, help="entropy maps from `eamvit calibrate` (default: calibrate now)")
    g.add_argument("--bits", type=int, default=None, help="histogram bits b: 2^b bins on [0, 1] (1..16) (default: 8)")
    g.add_argument("--max-memory", default=None, help="histogram memory budget, e.g. 2G; more passes if needed "
                   "(default: no limit, one pass)")


def add_freeze_args(p: argparse.ArgumentParser, sweep: bool = False, saved: bool = True) -> None:
    """Freezing options: the τ grid of ``sweep`` (``sweep``) or one τ, and ``--frozen`` (``saved``; not for
    ``finetune``, which makes one)."""
    g = p.add_argument_group("freezing")
    if sweep:
        g.add_argument("--granularity", type=granularities, default=None,
                       help="sweep freezing by these units (e.g. entry,row,head) at measured speed next to token "
                            "pruning, into speed_sweep.* (default: none, the entry-level entropy vs random sweep)")
    else:
        g.add_argument("--granularity", choices=GRANULARITIES, default=None,
                       help="what is frozen: entry (the paper), row (a query token's row, all heads; ViT only) or "
                            "head; rows and heads skip their work (default entry)")
    g.add_argument("--aggregate", choices=AGGREGATES, default=None,
                   help="how a row's or head's entry entropies rank it (default mean)")
    if sweep:
        g.add_argument("--taus", type=floats, default=[round(0.1 * i, 1) for i in range(10)],
                       help="sparsity levels, e.g. 0,0.1,0.2 (default 0..0.9)")
        g.add_argument("--scopes", nargs="+", choices=SCOPES, default=["head"],
                       help="where τ applies in the entropy vs random sweep (--granularity: entries per head, "
                            "rows and heads per layer)")
        g.add_argument("--seeds", type=int, default=3, help="random-freezing seeds averaged per point")
    else:
        g.add_argument("--tau", type=float, default=None,
                       help="fraction of attention entries to freeze, [0, 1] (default: 0.0)")
        if saved:
            g.add_argument("--frozen", default=None, help="the same as --state with frozen attention of `eamvit "
                           "finetune --tau` (frozen.safetensors) (default: none, freeze from --maps/--tau)")
        g.add_argument("--scope", choices=SCOPES, default=None,
                       help="where the τ fraction is taken (default: head for entries, layer for rows and heads)")
        g.add_argument("--selection", choices=SELECTIONS, default=None,
                       help="freeze the lowest-entropy entries, or random ones (the baseline) (default: entropy)")
    g.add_argument("--value-bits", type=int, default=None,
                   help="bits of the frozen attention values (default: fp32, not quantized)")
    g.add_argument("--value-quantizer", choices=VALUE_QUANTIZERS, default=None,
                   help="quantizer of the frozen values with --value-bits (default: uniform)")


FREEZE_SETTINGS = ("tau", "granularity", "aggregate", "scope", "selection", "value_bits", "value_quantizer")
# What a saved freeze (--frozen) already holds: options that would freeze afresh.
FREEZE_OPTIONS = (*FREEZE_SETTINGS, "maps", "bits", "max_memory")
SWEEP_METHODS = "shannon,renyi:0.5,renyi:2,renyi:3,renyi:inf,evit,random,tome,entropy-merge"
SWEEP_KEEP_RATES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
# `sweep --granularity` times every point against a copy: a short pruning side keeps it to minutes.
SPEED_METHODS = "shannon,evit,tome,entropy-merge"
SPEED_KEEP_RATES = [0.7, 0.5]


def add_prune_args(p: argparse.ArgumentParser, sweep: bool = False, method: Optional[str] = None) -> None:
    """Token-pruning options: the κ × method grid of ``sweep --prune`` (``sweep``) or one method (``--prune``
    defaults to ``method``)."""
    g = p.add_argument_group("token pruning")
    if sweep:
        g.add_argument("--prune", action="store_true", help="sweep token pruning (keep rate x method), not freezing")
        g.add_argument("--keep-rates", type=floats, default=None, help="keep rates, e.g. 0.9,0.7,0.5 (default: "
                       f"0.9..0.3 with --prune; {','.join(map(str, SPEED_KEEP_RATES))} with --granularity, widen it "
                       "with e.g. --keep-rates 0.9,0.8,0.7,0.6,0.5,0.4,0.3)")
        g.add_argument("--methods", default=None,
                       help="comma-separated: pruning by shannon, renyi:ORDER, evit or random; merging by tome or "
                            "entropy-merge[:ORDER], at the r matching Shannon pruning's GMACs at each keep rate "
                            f"(default: {SWEEP_METHODS} with --prune; {SPEED_METHODS} with --granularity, widen it with e.g. "
                            "--methods shannon,renyi:2,evit,random,tome)")
        g.add_argument("--no-throughput", action="store_true", default=None,
                       help="skip the images/s measurement of --prune")
        g.add_argument("--throughput-batch", type=int, default=None, help="images per timed forward (default: 32)")
        g.add_argument("--throughput-reps", type=int, default=None, help="timed forwards per point after warm-up; "
                       "rows carry their median and quartiles (default: 10)")
    else:
        g.add_argument("--prune", choices=PRUNE_METHODS, default=method,
                       help="prune patch tokens with this score" + ("" if method else " (default: no pruning)"))
        g.add_argument("--keep-rate", type=per_block_arg(float, "a keep rate"), default=None,
                       help="keep rate κ in (0, 1], or one per pruning block, e.g. 0.9,0.7,0.5 (default: 0.7)")
        g.add_argument("--alpha", type=per_block_arg(alpha_arg, "a Rényi order"), default=None,
                       help="Rényi order of --prune renyi (0, 0.5, 2, inf...), or one per pruning block (default: 2)")
    g.add_argument("--prune-blocks", type=ints, default=None,
                   help="0-based pruning blocks (default: 3,6,9 of 12, scaled to the depth)")
    g.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="fuse dropped tokens into one (default: on for EViT only)")
    g.add_argument("--placement", choices=PLACEMENTS, default=None,
                   help="prune after the attention residual (attn, EViT) or after the whole block (default: attn)")
    g.add_argument("--entropy-keys", choices=ENTROPY_KEYS, default=None, help="entropy of the whole attention row "
                   "(all) or of its patch keys renormalised (patches) (default: all)")


PRUNE_OPTIONS = ("prune", "keep_rate", "alpha", "prune_blocks", "fuse", "placement", "entropy_keys")
MERGE_OPTIONS = ("merge", "merge_r", "merge_inflect", "merge_blocks", "merge_alpha", "no_prop_attn")


def add_merge_args(p: argparse.ArgumentParser) -> None:
    """Token-merging options (eamvit.methods.merge): ToMe or entropy-guided merging, exclusive with --prune."""
    g = p.add_argument_group("token merging (instead of token pruning)")
    g.add_argument("--merge", choices=MERGE_SELECTIONS, default=None,
                   help="merge patch tokens: tome (ToMe's bipartite matching on the keys) or entropy (the "
                        "highest-entropy tokens into their most similar ones) (default: no merging)")
    g.add_argument("--merge-r", type=r_values, default=None, metavar="R", help="patch tokens each merging block "
                   "merges, or one per block, e.g. 12,8,4,0 (at most half a block's) (default: 8)")
    g.add_argument("--merge-inflect", type=float, default=None, metavar="I",
                   help="ToMe's schedule of one --merge-r in [-1, 1]: 0 the same r everywhere, -1 from 2r down "
                        "to 0, 1 increasing; the mean stays r (default: 0)")
    g.add_argument("--merge-blocks", type=ints, default=None, metavar="BLOCKS",
                   help="0-based merging blocks (default: every block that can merge, as ToMe)")
    g.add_argument("--merge-alpha", type=alpha_arg, default=None, metavar="ORDER",
                   help="Rényi order of --merge entropy's scores (default: Shannon)")
    g.add_argument("--no-prop-attn", action="store_true", default=None,
                   help="leave out ToMe's proportional attention (log token size added to the scores)")


def merge_config(args):
    """The one :class:`~eamvit.methods.merge.MergeConfig` of the merging options."""
    from eamvit.methods.merge import MergeConfig

    return MergeConfig(**given_values(r=args.merge_r, inflect=args.merge_inflect),
                       blocks=tuple(args.merge_blocks) if args.merge_blocks is not None else None,
                       prop_attn=not args.no_prop_attn, selection=args.merge, alpha=args.merge_alpha)


def refuse_merge_args(args) -> None:
    """Refuse merging options without ``--merge``, ``--merge`` with ``--prune``, and the Rényi order with ToMe."""
    if not getattr(args, "merge", None):
        refuse_given(args, MERGE_OPTIONS[1:], "without --merge (no tokens are merged)")
        return
    if getattr(args, "prune", None):
        raise EamError(f"--merge {args.merge} and --prune {args.prune} both reduce tokens, and a model holds one of "
                       "them; drop one")
    if args.merge != "entropy":
        refuse_given(args, ["merge_alpha"], f"to --merge {args.merge} (the Rényi order is --merge entropy's)")


def prune_options(args) -> dict:
    return given_values(blocks=args.prune_blocks, fuse=args.fuse, placement=args.placement, keys=args.entropy_keys)


def prune_config(args, method: Optional[str] = None):
    """The one :class:`~eamvit.methods.prune.PruneConfig` of the pruning options (``method``: finetune's default)."""
    from eamvit.methods.prune import PruneConfig

    return PruneConfig(method=method or args.prune, **given_values(keep_rate=args.keep_rate, alpha=args.alpha),
                       **prune_options(args))


def freeze_config(args):
    """The one :class:`~eamvit.methods.freeze.FreezeConfig` of the freezing options."""
    from eamvit.methods.freeze import FreezeConfig

    return FreezeConfig(seed=args.seed, **given_values(tau=args.tau, scope=args.scope, selection=args.selection,
                                                       value_bits=args.value_bits, value_quantizer=args.value_quantizer,
                                                       granularity=args.granularity, aggregate=args.aggregate))


def given_values(**values: Any) -> dict[str, Any]:
    """The ``values`` given (not ``None``): a config built from them keeps its own defaults for the rest."""
    return {k: v for k, v in values.items() if v is not None}


def refuse_given(args, dests: Sequence[str], why: str) -> None:
    """Refuse the options among ``dests`` the command line gives (not ``None``): they cannot apply ``why``, e.g.
    ``"with --quant-state, which holds its own quantization"``."""
    bad = [d for d in dests if getattr(args, d, None) is not None]
    if bad:
        names = ", ".join("--" + d.replace("_", "-") for d in bad)
        raise EamError(f"{names} cannot apply {why}; drop {names}")


TARGET_OPTIONS = ("target", "softmax", "symmetric_activations", "symmetric_weights")


def add_target_args(p: argparse.ArgumentParser) -> None:
    """The deployment target of the recipe: where the quantized model will run."""
    g = p.add_argument_group("deployment target (what eval scores is what export writes)")
    g.add_argument("--target", default=None, metavar="{qdq,openvino,weight-only,torch}",
                   help="where the quantized model will run, calibrated with that runtime's quantizers: qdq (ONNX "
                   "int8 QuantizeLinear/DequantizeLinear, 8-bit activations), openvino (the same, symmetric, in "
                   "OpenVINO's int8 form: pip install \"eamvit[openvino]\"), weight-only (ONNX Runtime MatMulNBits, "
                   "float activations) or torch (the method's own quantizers, e.g. log√2, which ONNX cannot "
                   "express) (default: qdq for RepQ-ViT with 8-bit activations, else torch)")
    g.add_argument("--softmax", default=None, metavar="{uniform,fp32}", help="--target qdq: the log√2 softmax "
                   "quantizer has no QDQ form; ship the map 8-bit uniform on [0, Δ] (uniform, default) or fp32")
    g.add_argument("--symmetric-activations", action="store_true", default=None,
                   help="--target qdq: int8 activations with zero point 0 (TensorRT); default uint8 asymmetric")
    g.add_argument("--symmetric-weights", action="store_true", default=None,
                   help="ONNX targets: symmetric per-channel weights (zero point 0); default RepQ-ViT's asymmetric")


def target_from_args(args: argparse.Namespace, quant) -> Any:
    """The :class:`~eamvit.methods.export.Target` of the options for quantization ``quant`` (``None``: none)."""
    from eamvit.methods.export import SOFTMAX, TARGETS, default_target

    for value, allowed, flag in ((args.target, TARGETS, "--target"), (args.softmax, SOFTMAX, "--softmax")):
        if value is not None and value not in allowed:
            raise EamError(f"{flag} {value!r} is not one of {', '.join(allowed)}")
    if quant is None:
        refuse_given(args, TARGET_OPTIONS, "without a quantization (an unquantized model runs as it is everywhere)")
        return None
    return default_target(quant, **given_values(form=args.target, softmax=args.softmax,
                                                symmetric_activations=args.symmetric_activations,
                                                symmetric_weights=args.symmetric_weights))


def target_label(target) -> str:
    """``qdq``, ``qdq sym`` (symmetric activations), ``qdq softmax-fp32``, ``weight-only`` or ``torch``."""
    parts = [target.form, "sym" if target.symmetric_activations else None,
             f"softmax-{target.softmax}" if target.form == "qdq" and target.softmax != "uniform" else None,
             "sym-w" if target.symmetric_weights else None]
    return " ".join(p for p in parts if p)


def set_help(p: argparse.ArgumentParser, **texts: str) -> None:
    """Give the options ``texts`` names (by destination) the help of what they mean to this command."""
    for action in p._actions:
        action.help = texts.get(action.dest, action.help)
