"""The search space of ``eamvit optimize``: candidates in a fixed order (never depending on measured times), and
the commands that rebuild one. Design: ``docs/architecture-experiments.md``, "optimize_space".
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional, Sequence, get_args

from torch import nn

from eamvit.errors import EamError
from eamvit.experiments.prune_sweep import pruned_gflops
from eamvit.methods.export import ExportConfig, Target, default_target
from eamvit.methods.finetune import FinetuneConfig
from eamvit.methods.freeze import FreezeConfig
from eamvit.methods.merge import MergeConfig, r_for_gmacs
from eamvit.methods.prune import PruneConfig, setting_text
from eamvit.methods.recipe import Recipe
from eamvit.methods.repq import RepQConfig
from eamvit.ops.scores import default_blocks

Runtime = Literal["onnxruntime", "openvino", "torch"]
RUNTIMES = get_args(Runtime)
Space = Literal["standard", "small"]
SPACES = get_args(Space)
# Pruning κ and freezing τ of the standard space; `small` keeps a few of them (the demo, tests).
KEEP_RATES = {"standard": (0.9, 0.7, 0.5), "small": (0.7, 0.5)}
PRUNE_METHODS = {"standard": ("shannon", "evit"), "small": ("evit",)}
FREEZE = {"standard": (("head", 0.25), ("head", 0.5), ("row", 0.25), ("row", 0.5)), "small": (("head", 0.25),)}
# Token merging (ToMe, entropy-guided) at the r matching pruning's GMACs at each κ; none in `small` (the demo's).
MERGE_SELECTIONS = {"standard": ("tome", "entropy"), "small": ()}
_MERGE_NAMES = {"tome": "tome", "entropy": "entropy-merge"}


@dataclass(frozen=True)
class NncfInt8:
    """NNCF's int8 quantization (``nncf.quantize``, TRANSFORMER) of a point's fp32 export, in OpenVINO: a part of a
    search point, not a recipe step (:func:`_candidate` turns it into :attr:`Candidate.nncf`)."""


NNCF = NncfInt8()


@dataclass(frozen=True)
class Candidate:
    """One point of the search.

    Args:
        recipe: the compression steps, applied in PyTorch.
        export: how the file is written (``None``: the PyTorch runtime, nothing exported).
        nncf: the fp32 export is then quantized by NNCF into an OpenVINO IR, which is what is measured
            and shipped (OpenVINO only; the recipe then has no quantization step).
        finetune: the weights are first fine-tuned with the recipe's token reduction applied (its pruning or
            merging step), and the whole recipe then applied to them (``None``: the model's own weights).
    """

    recipe: Recipe
    export: Optional[ExportConfig]
    label: str
    nncf: bool = False
    finetune: Optional[FinetuneConfig] = None

    def identity(self) -> dict[str, Any]:
        """What makes two candidates the same measurement (the cache key's part)."""
        out = {"recipe": self.recipe.to_dict(), "export": self.export.to_dict() if self.export else None}
        # Each named only when set: the keys of points measured before NNCF or fine-tuning existed stay valid.
        out.update({"nncf": True} if self.nncf else {})
        return {**out, "finetune": self.finetune.to_dict()} if self.finetune is not None else out

    @property
    def reduction(self):
        """The recipe's token-reduction step (pruning or merging), or ``None``."""
        return self.recipe.step("prune") or self.recipe.step("merge")

    @property
    def techniques(self) -> int:
        """How many techniques the point applies: its recipe's steps, and NNCF (0: the reference)."""
        return len(self.recipe.steps) + self.nncf


def _quant_options(space: str, seed: int) -> list[tuple[str, RepQConfig, ExportConfig]]:
    """RepQ-ViT int8 QDQ with asymmetric (uint8) and symmetric (int8) activations, and 4-bit weights only."""
    int8 = RepQConfig(w_bits=8, a_bits=8, seed=seed)
    out = [("int8", int8, ExportConfig()), ("int8-sym", int8, ExportConfig(symmetric_activations=True))]
    if space == "standard":  # activations stay float in MatMulNBits graphs; 8 is what the simulation keeps
        out.append(("w4-weight-only", RepQConfig(w_bits=4, a_bits=8, seed=seed), ExportConfig(scheme="weight-only")))
    return out


def _openvino_quant_options(seed: int) -> list[tuple[str, Any, ExportConfig]]:
    """NNCF's int8 of the fp32 export (what an OpenVINO user would pick), and RepQ-ViT int8 calibrated for OpenVINO."""
    repq = Target(form="openvino").export_config()
    return [("nncf-int8", NNCF, ExportConfig()), ("repq-int8", RepQConfig(w_bits=8, a_bits=8, seed=seed), repq)]


def late_blocks(depth: int) -> tuple[int, ...]:
    """The default pruning blocks in the second half of the network: fewer tokens lost early."""
    return tuple(b for b in default_blocks(depth) if b >= depth // 2)


def _prune_options(space: str, depth: int) -> list[tuple[str, PruneConfig]]:
    blocks: list[Optional[tuple[int, ...]]] = [None] if space == "standard" else []
    late = late_blocks(depth)
    if late and late != tuple(default_blocks(depth)):
        blocks.append(late)
    configs = [PruneConfig(method=method, keep_rate=k, blocks=where)
               for method, where, k in itertools.product(PRUNE_METHODS[space], blocks, KEEP_RATES[space])]
    return [(prune_name(c), c) for c in configs]


def _number(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def prune_name(config: PruneConfig) -> str:
    """A pruning point's name: method, keep rate(s), the Rényi order(s) of ``renyi``, blocks other than the default
    (``renyi-k0.5,0.5,0.25-ainf,inf,1``)."""
    name = f"{config.method}-k{_number(setting_text(config.keep_rate))}"
    if config.method == "renyi":
        name += f"-a{_number(setting_text(config.alpha))}"
    return name + (f"@{','.join(map(str, config.blocks))}" if config.blocks else "")


def merge_options(model: nn.Module, space: str = "standard") -> list[tuple[str, MergeConfig]]:
    """The merging points of ``space``: ToMe and entropy-guided merging, in every block and in the
    :func:`late_blocks` only, at the ``r`` whose executed GMACs come closest to Shannon pruning's at each κ of
    the space in the same blocks; none for a model that cannot merge or whose MACs are not modelled."""
    if space not in SPACES:
        raise EamError(f"unknown search space {space!r}; use one of {', '.join(SPACES)}")
    depth = len(getattr(model, "blocks", ()))
    late = late_blocks(depth) if depth else ()
    wheres: list[Optional[tuple[int, ...]]] = [None] + ([late] if late else [])
    out: list[tuple[str, MergeConfig]] = []
    try:
        for selection, where, k in itertools.product(MERGE_SELECTIONS[space], wheres, KEEP_RATES[space]):
            target = pruned_gflops(model, PruneConfig(method="shannon", keep_rate=k, blocks=where))
            cfg = r_for_gmacs(model, target, MergeConfig(selection=selection, blocks=where))[0]
            name = f"{_MERGE_NAMES[selection]}-r{cfg.r}" + (f"@{','.join(map(str, where))}" if where else "")
            if cfg.r > 0 and all(n != name for n, _ in out):  # two κ can match one r on a small model
                out.append((name, cfg))
    except EamError:
        return []
    return out


def _candidate(parts: Sequence[tuple[str, Any]], export: Optional[ExportConfig],
               finetune: Optional[FinetuneConfig] = None) -> Candidate:
    stage = {RepQConfig: 0, NncfInt8: 0, FreezeConfig: 1, PruneConfig: 2, MergeConfig: 2}
    parts = sorted(parts, key=lambda p: stage[type(p[1])])
    nncf = any(isinstance(s, NncfInt8) for _, s in parts)
    # A quantized point is calibrated for the export it is measured in: its saved state scores what its file does.
    quantized = any(isinstance(s, RepQConfig) for _, s in parts)
    target = Target.of(export) if quantized and export is not None else None
    return Candidate(Recipe(steps=tuple(s for _, s in parts if not isinstance(s, NncfInt8)), target=target), export,
                     " + ".join(name for name, _ in parts) or "fp32", nncf=nncf, finetune=finetune)


def finetuned(cand: Candidate, config: FinetuneConfig) -> Candidate:
    """``cand`` (a token-reduction point) on weights fine-tuned for its reduction, labelled ``+ft``."""
    if cand.reduction is None:
        raise EamError(f"{cand.label} neither prunes nor merges tokens: there is no reduction to fine-tune for")
    return replace(cand, finetune=config, label=f"{cand.label}+ft")


def reference(runtime: str) -> Candidate:
    """The unmodified model (its fp32 export for ONNX Runtime and OpenVINO): the top-1 and speed every point is
    measured against."""
    return Candidate(Recipe(), None if runtime == "torch" else ExportConfig(), "fp32")


def single_candidates(depth: int, runtime: str, space: str = "standard", seed: int = 0,
                      merges: Sequence[tuple[str, MergeConfig]] = (),
                      prunes: Sequence[PruneConfig] = ()) -> list[Candidate]:
    """Every single technique, in order: quantization (ONNX Runtime and OpenVINO; PyTorch only simulates it, never
    faster), pruning (the space's, then ``prunes``), merging, freezing.

    Args:
        depth: transformer blocks of the model (where pruning can happen).
        space: ``"standard"`` or ``"small"`` (a handful of points).
        seed: the run's seed (RepQ-ViT's calibration subset, random freezing).
        merges: the merging points, named (:func:`merge_options` of the model).
        prunes: further pruning points (``optimize --prune-recipe``), each named by :func:`prune_name`.
    """
    if runtime not in RUNTIMES:
        raise EamError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if space not in SPACES:
        raise EamError(f"unknown search space {space!r}; use one of {', '.join(SPACES)}")
    quant = {"onnxruntime": _quant_options(space, seed), "openvino": _openvino_quant_options(seed)}.get(runtime, [])
    out = [_candidate([(n, q)], e) for n, q, e in quant]
    plain = ExportConfig() if runtime != "torch" else None
    out += [_candidate([p], plain) for p in _prune_options(space, depth)]
    out += [_candidate([(prune_name(p), p)], plain) for p in prunes]
    out += [_candidate([m], plain) for m in merges]
    out += [_candidate([(f"{g}-t{t:g}", FreezeConfig(tau=t, granularity=g, seed=seed))], plain)
            for g, t in FREEZE[space]]
    return out


_Item = tuple[str, Any, Optional[ExportConfig], Optional[FinetuneConfig]]  # a single's name, step, export, tuning


def _survivors(singles: Sequence[tuple[Candidate, bool]]) -> dict[str, list[_Item]]:
    """Per stage (``quant``, ``freeze``, ``reduce``: pruning or merging), the surviving singles worth stacking; a
    fine-tuned reduction competes with the post-training ones of its kind."""
    best: dict[tuple, tuple[float, _Item]] = {}
    for cand, ok in singles:
        if not ok or cand.techniques != 1:
            continue
        step = NNCF if cand.nncf else cand.recipe.steps[0]
        # Per key the point that keeps the least work: the smallest κ, the largest r, the largest τ.
        if isinstance(step, PruneConfig) and step.is_per_block:  # its own point: no κ to compare
            key, work = ("reduce", "prune", step), 0.0
        elif isinstance(step, PruneConfig):
            key, work = ("reduce", "prune", step.method, step.blocks), step.keep_rate
        elif isinstance(step, MergeConfig):
            key, work = ("reduce", "merge", step.selection, step.blocks), -step.r
        elif isinstance(step, FreezeConfig):
            key, work = ("freeze", step.granularity), -step.tau
        else:
            key, work = ("quant", cand.label), 0.0
        if key not in best or work < best[key][0]:
            best[key] = (work, (cand.label, step, cand.export, cand.finetune))
    out: dict[str, list] = {"quant": [], "freeze": [], "reduce": []}
    for key, (_, item) in best.items():  # insertion order: the singles' order
        out[key[0]].append(item)
    return out


def combinations(singles: Sequence[tuple[Candidate, bool]]) -> list[Candidate]:
    """Stacks of the surviving singles (``(candidate, within budget)`` in search order): every pair of
    stages, then all three, each stack quantize → freeze → prune or merge."""
    surv = _survivors(singles)
    out = []
    for stages in (("quant", "reduce"), ("quant", "freeze"), ("freeze", "reduce"), ("quant", "freeze", "reduce")):
        for items in itertools.product(*(surv[s] for s in stages)):
            export = next((e for _, step, e, _ in items if isinstance(step, RepQConfig)), None)
            if export is not None and export.runtime == "openvino" and any(isinstance(s, MergeConfig) for _, s, _, _ in items):
                continue  # no OpenVINO form (merge.OPENVINO_REPQ_MERGE); NNCF int8 stacks with merging instead
            if export is None:
                export = next((e for _, _, e, _ in items), None)
            tuned = next((t for *_, t in items if t is not None), None)  # the reduction's: the stack's weights
            out.append(_candidate([(n, s) for n, s, _, _ in items], export, tuned))
    return out


def recipe_options(recipe: Recipe) -> list[str]:
    """The ``eamvit compress`` options whose recipe is ``recipe``, its target included (the other settings
    are the defaults)."""
    out: list[str] = []
    q, f, p, m = recipe.step("quant"), recipe.step("freeze"), recipe.step("prune"), recipe.step("merge")
    if q is not None:
        out += ["--quant", q.KIND, "--w-bits", str(q.w_bits), "--a-bits", str(q.a_bits)]
        if q.calib_size != RepQConfig.calib_size:
            out += ["--quant-calib-size", str(q.calib_size)]
        t = recipe.target
        if t is not None:
            out += ["--target", t.form] if t.form != default_target(q).form else []
            out += ["--softmax", t.softmax] if t.softmax != Target.softmax else []
            out += ["--symmetric-activations"] if t.symmetric_activations else []
            out += ["--symmetric-weights"] if t.symmetric_weights else []
    if f is not None:
        out += ["--tau", f"{f.tau:g}", "--granularity", f.granularity]
    if p is not None:
        out += ["--prune", p.method, "--keep-rate", _number(setting_text(p.keep_rate))]
        out += ["--alpha", _number(setting_text(p.alpha))] if p.method == "renyi" else []
        if p.blocks is not None:
            out += ["--prune-blocks", ",".join(map(str, p.blocks))]
    if m is not None:
        out += ["--merge", m.selection, "--merge-r", ",".join(map(str, m.r)) if isinstance(m.r, tuple) else str(m.r)]
        out += ["--merge-inflect", f"{m.inflect:g}"] if m.inflect else []
        out += ["--merge-blocks", ",".join(map(str, m.blocks))] if m.blocks is not None else []
        out += ["--merge-alpha", f"{m.alpha:g}"] if m.alpha is not None else []
        out += ["--no-prop-attn"] if not m.prop_attn else []
    return out
