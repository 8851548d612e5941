"""One compressed model: a :class:`Recipe` of steps, :func:`apply_` to apply it, one file to keep it.

A recipe is an ordered list of the existing configs: at most one quantization
(:class:`~eamvit.methods.repq.RepQConfig`, :class:`~eamvit.methods.adfq.ADFQConfig` or
:class:`~eamvit.methods.pmq.PMQConfig`), then at most one
:class:`~eamvit.methods.freeze.FreezeConfig`, then at most one
:class:`~eamvit.methods.prune.PruneConfig`. The order is fixed because it is the only one the
pieces compose in: maps computed after quantization are the quantized model's (EAM_4bits), and
pruning drops the frozen maps of the layers after its first block, which freezing after it could
not know.

:func:`save_compressed` writes the whole stack to one safetensors file (written by
:func:`eamvit.io.save_tensors`, so it carries a digest): the recipe, the quantized state with its
weights packed at their bit width (:func:`~eamvit.methods.quantize.quantized_content`), the frozen
masks and values (:func:`~eamvit.methods.freeze.frozen_content`), the data config and the records of
the images that calibrated it. Pruning has no state beyond its config. :func:`load` rebuilds the
model with the logits of the one that was saved.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.methods import calibrate, quantize
from eamvit.methods.calibrate import EntropyMaps
from eamvit.methods.freeze import FreezeConfig, freeze_, frozen_content, restore_frozen
from eamvit.methods.prune import PruneConfig, prune_
from eamvit.methods.quantize import config_type, quantized_content, restore_quantized

COMPRESSED_FORMAT = "eamvit-compressed/1"
_REMEDY = "write one with `eamvit compress`"
_STAGES = ("quant", "freeze", "prune")  # the one order the steps compose in


def step_stage(step: Config) -> str:
    """``"quant"``, ``"freeze"`` or ``"prune"``: which part of the stack ``step`` is."""
    if isinstance(step, FreezeConfig):
        return "freeze"
    if isinstance(step, PruneConfig):
        return "prune"
    return "quant"


def _step_from_dict(d: Any) -> Config:
    if not isinstance(d, dict):
        raise EamError(f"a recipe step must be a JSON object, not {type(d).__name__}; {_REMEDY}")
    kind = d.get("kind")
    if kind == FreezeConfig.KIND:
        return FreezeConfig.from_dict(d)
    if kind == PruneConfig.KIND:
        return PruneConfig.from_dict(d)
    return config_type(kind).from_dict(d)


@dataclass(frozen=True)
class Recipe(Config):
    """An ordered list of compression steps (module docstring).

    Args:
        steps: the configs, in the order quantization, freezing, pruning (each at most once).
    """

    steps: tuple[Config, ...] = ()

    KIND = "recipe"
    VERSION = 1

    def _check(self) -> None:
        stages = [step_stage(s) for s in self.steps]
        if stages != sorted(stages, key=_STAGES.index) or len(set(stages)) != len(stages):
            raise EamError(f"recipe steps {' → '.join(stages)} are not in the order quantize → freeze → prune "
                           "with each at most once; write them in that order")

    def step(self, stage: str) -> Optional[Config]:
        """The step of ``stage`` (``"quant"``, ``"freeze"``, ``"prune"``), ``None`` when there is none."""
        return next((s for s in self.steps if step_stage(s) == stage), None)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "version": self.VERSION, "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        """The recipe :meth:`to_dict` wrote, every step checked.

        Raises:
            EamError: not a recipe, a newer version, or a step this eamvit does not know.
        """
        if not isinstance(d, dict) or d.get("kind") != cls.KIND:
            raise EamError(f"expected a recipe, found {d.get('kind') if isinstance(d, dict) else type(d).__name__!r}; "
                           f"{_REMEDY}")
        version, unknown = d.get("version", 1), sorted(set(d) - {"kind", "version", "steps"})
        if not isinstance(version, int) or version > cls.VERSION:
            raise EamError(f"recipe version {version} is newer than this eamvit understands (version {cls.VERSION}); "
                           "upgrade eamvit")
        if unknown or not isinstance(d.get("steps"), list):
            raise EamError(f"recipe has {'unknown field(s) ' + ', '.join(unknown) if unknown else 'no list of steps'}; "
                           "it was written by another eamvit version")
        return cls(steps=tuple(_step_from_dict(s) for s in d["steps"]))


def value_deltas(model: nn.Module, value_quantizer: str) -> Optional[list]:
    """Per-layer Δ of the post-softmax quantizer for log-quantized frozen values of a quantized model."""
    from eamvit.methods.repq import attn_deltas

    cfg = getattr(model, "eam_quant_config", None)
    if cfg is None or value_quantizer not in ("log2", "logsqrt2") or cfg.attn_quantizer == "uniform":
        return None
    return attn_deltas(model)


MapsSource = Union[EntropyMaps, Callable[[nn.Module], EntropyMaps], None]


def apply_(model: nn.Module, recipe: Recipe, calib: Any, *, maps: MapsSource = None,
           device: torch.device | str | None = None, progress: bool = False,
           checkpoint_dir: Optional[str] = None) -> dict[str, Any]:
    """Apply ``recipe``'s steps to ``model`` in place, in order.

    Args:
        model: an instrumented full-precision model (``create_model``).
        recipe: the :class:`Recipe`.
        calib: calibration images (dataset or tensor) for quantization and for maps computed here.
        maps: the freezing step's entropy maps, or a function of the model (as it is after
            quantization) that returns them; ``None`` computes them on ``calib`` (8-bit histograms).
        device: where calibration runs.
        progress: progress bars.
        checkpoint_dir: resumable ADFQ-ViT checkpoints.

    Returns:
        ``{stage: report}``: the quantization config, the :class:`~eamvit.methods.freeze.FreezeReport`
        and the :class:`~eamvit.methods.prune.PruneReport` of the steps applied.
    """
    reports: dict[str, Any] = {}
    for step in recipe.steps:
        stage = step_stage(step)
        if stage == "quant":
            # Through the modules: what quantizes and what computes maps is one function, wherever it is called.
            quantize.quantize_(model, step, calib, device=device, progress=progress, checkpoint_dir=checkpoint_dir)
            reports[stage] = step
        elif stage == "freeze":
            m = maps(model) if callable(maps) else maps
            if m is None:
                m = calibrate.compute_entropy_maps(model, calib, device=device, progress=progress)
            reports[stage] = freeze_(model, m, step, value_deltas=value_deltas(model, step.value_quantizer))
        else:
            reports[stage] = prune_(model, step)
    return reports


def build_(model: nn.Module, recipe: Recipe, calib: Any, *, quant_state: Optional[str | os.PathLike] = None,
           frozen: Optional[str | os.PathLike] = None, maps: MapsSource = None,
           device: torch.device | str | None = None, progress: bool = False,
           checkpoint_dir: Optional[str] = None) -> tuple[Recipe, dict[str, Any]]:
    """:func:`apply_` with parts of the stack loaded from files instead of made now.

    The order is the one of :func:`apply_`: the quantization (``quant_state`` loaded, or the step
    applied), then the frozen attention (``frozen`` loaded on the quantized model, whose values it
    replaces, or the freezing step), then pruning.

    Args:
        model: an instrumented full-precision model.
        recipe: the steps made now; it has no quantization step with ``quant_state`` and no freezing
            step with ``frozen``.
        calib: calibration images of the quantization step.
        quant_state: a quantized state of :func:`~eamvit.methods.quantize.save_quantized`.
        frozen: frozen attention of :func:`~eamvit.methods.freeze.save_frozen`.
        maps, device, progress, checkpoint_dir: as for :func:`apply_`.

    Returns:
        ``(recipe, reports)``: the whole recipe ``model`` now carries (the loaded parts as steps) and
        :func:`apply_`'s reports, with ``"frozen"``: the loaded freezing settings (``{}`` when the
        file has none).
    """
    from eamvit.methods.freeze import load_frozen
    from eamvit.methods.quantize import load_quantized

    for path, stage in ((quant_state, "quant"), (frozen, "freeze")):
        if path is not None and recipe.step(stage) is not None:
            raise EamError(f"{path} holds the {stage} step already; drop that step from the recipe")
    if quant_state is not None:
        load_quantized(model, quant_state)
    quant = Recipe(steps=tuple(s for s in recipe.steps if step_stage(s) == "quant"))
    rest = Recipe(steps=tuple(s for s in recipe.steps if step_stage(s) != "quant"))
    reports = apply_(model, quant, calib, device=device, progress=progress, checkpoint_dir=checkpoint_dir)
    loaded = None
    if frozen is not None:  # after quantizing: its values replace the quantized model's maps
        loaded = load_frozen(model, str(frozen)).get("config") or {}
        reports["frozen"] = loaded
    reports.update(apply_(model, rest, None, maps=maps, device=device, progress=progress))
    freeze = (FreezeConfig(**loaded) if loaded else FreezeConfig()) if loaded is not None else rest.step("freeze")
    steps = (getattr(model, "eam_quant_config", None), freeze, rest.step("prune"))
    return Recipe(steps=tuple(s for s in steps if s is not None)), reports


def artifact_kind(path: str | os.PathLike) -> str:
    """What the eamvit file at ``path`` holds, by its format tag: ``"compressed"`` (:func:`save_compressed`),
    ``"quant"`` (a quantized state) or ``"frozen"`` (frozen attention); the file is checked as loading it is.

    Raises:
        EamError: a missing or unreadable file, another kind of file, or one modified after eamvit wrote it.
    """
    from eamvit.io import load_tensors
    from eamvit.methods.freeze import FROZEN_FORMAT
    from eamvit.methods.quantize import FORMAT as QUANT_FORMAT

    kinds = {COMPRESSED_FORMAT: "compressed", QUANT_FORMAT: "quant", FROZEN_FORMAT: "frozen"}
    meta, _ = load_tensors(path, tuple(kinds), "compressed model", "give a file of `eamvit compress`, a quantized "
                           "state of `eamvit quantize` or the frozen.safetensors of `eamvit finetune --tau`")
    return kinds[meta["format"]]


def save_compressed(model: nn.Module, path: str | os.PathLike, recipe: Recipe) -> Path:
    """Write ``model``, compressed by ``recipe``, to one safetensors file (module docstring).

    Raises:
        EamError: the model does not carry what the recipe says (e.g. a quantization step on an
            unquantized model).
    """
    from eamvit.io import save_tensors
    from eamvit.methods.models import data_config, model_spec, preprocessing

    have = {"quant": getattr(model, "eam_quant_config", None) is not None,
            "prune": getattr(model, "eam_prune", None) is not None}
    for stage, present in have.items():
        if present != (recipe.step(stage) is not None):
            raise EamError(f"the model is {'' if present else 'not '}{'quantized' if stage == 'quant' else 'pruned'} "
                           f"but the recipe has {'no' if present else 'a'} {stage} step; apply the recipe with apply_")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format": COMPRESSED_FORMAT, "recipe": recipe.to_dict(),
                            "model": model_spec(model).to_dict(),
                            "data_config": preprocessing(data_config(model)),
                            "calibration": list(getattr(model, "eam_calibration", None) or [])}
    for stage, content in (("quant", quantized_content if have["quant"] else None),
                           ("freeze", frozen_content if recipe.step("freeze") else None)):
        if content is not None:
            part, meta[stage] = content(model)
            tensors.update({f"{stage}/{k}": v for k, v in part.items()})
    save_tensors(path, tensors, meta)
    return Path(path)


def read_compressed(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a file written by :func:`save_compressed`, or one clear :class:`EamError`."""
    from eamvit.io import load_tensors

    return load_tensors(path, COMPRESSED_FORMAT, "compressed model", _REMEDY)


def restore_(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Rebuild on a fresh ``model`` the compressed model saved at ``path``; returns the file's metadata.

    Raises:
        EamError: the file is not a compressed model, was made for another model, or does not fit.
    """
    from eamvit.methods.data import add_calibration
    from eamvit.methods.models import model_spec

    meta, tensors = read_compressed(path)
    recipe = Recipe.from_dict(meta.get("recipe"))
    if not model_spec(model).same_model(meta.get("model") or {}):
        name = (meta.get("model") or {}).get("name")
        raise EamError(f"compressed model {path} was made for {name} with other weights, not for this model; "
                       "give the model it was made from, or compress this one with `eamvit compress`")
    part = lambda stage: {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(stage + "/")}
    if recipe.step("quant") is not None:
        restore_quantized(model, meta.get("quant") or {}, part("quant"), path)
    if recipe.step("freeze") is not None:
        restore_frozen(model, meta.get("freeze") or {}, part("freeze"), str(path))
    if recipe.step("prune") is not None:
        prune_(model, recipe.step("prune"))
    add_calibration(model, meta.get("calibration") or [])
    return meta


def load(path: str | os.PathLike, model: Optional[nn.Module] = None,
         device: torch.device | str | None = None) -> nn.Module:
    """The compressed model saved at ``path`` (:func:`save_compressed`), logits equal to the saved one's.

    Args:
        path: the file.
        model: the full-precision model it was made from; ``None`` creates it from the name stored in
            the file (the bundled model, a model whose weights need no checkpoint file).
        device: where to create it.
    """
    from eamvit.methods.models import BUNDLED_MODEL, create_model, model_spec

    if model is None:
        spec = read_compressed(path)[0].get("model") or {}
        model = create_model(BUNDLED_MODEL, device=device)  # the one model whose weights eamvit carries
        if not model_spec(model).same_model(spec):
            model = create_model(spec.get("name"), model_kwargs=spec.get("model_kwargs") or {},
                                 pretrained=bool(spec.get("pretrained")), device=device)
    restore_(model, path)
    return model.eval()


def read_recipe(path: str | os.PathLike) -> Recipe:
    """The recipe in ``path``: a compressed model (:func:`save_compressed`) or a ``.json`` of :meth:`Recipe.to_json`."""
    p = Path(path)
    if p.suffix == ".json":
        try:
            return Recipe.from_dict(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            raise EamError(f"cannot read recipe {p} ({type(e).__name__}); {_REMEDY}") from None
    return Recipe.from_dict(read_compressed(p)[0].get("recipe"))
