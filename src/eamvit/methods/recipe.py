"""One compressed model: a :class:`Recipe` of steps (at most one quantization, then freezing, then pruning
or merging: the only order they compose in), :func:`apply_` to apply it, one file to keep it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from eamvit.methods.state import state_of, step_config
from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.methods import freeze, merge, prune, quantize  # noqa: F401 (each registers its recipe step)
from eamvit.io import load_tensors, save_tensors
from eamvit.methods.calibrate import EntropyMaps
from eamvit.methods.data import add_calibration
from eamvit.methods.export import Target, default_target
from eamvit.methods.models import (BUNDLED_MODEL, check_same_model, create_model, data_config, model_spec,
                                   preprocessing)
from eamvit.methods.steps import StepInputs, config_of_kind, handler_of, stage_order, stages as all_stages

COMPRESSED_FORMAT = "eamvit-compressed/1"
_REMEDY = "write one with `eamvit compress`"


def _step_from_dict(d: Any) -> Config:
    if not isinstance(d, dict):
        raise EamError(f"a recipe step must be a JSON object, not {type(d).__name__}; {_REMEDY}")
    return config_of_kind(d.get("kind")).from_dict(d)


@dataclass(frozen=True)
class Recipe(Config):
    """An ordered list of compression steps.

    Args:
        steps: the configs, one per stage, in the stages' order (quantization, freezing, pruning, then
            any registered step by its order).
        target: the :class:`~eamvit.methods.export.Target` the model is made for: the quantization is
            given that runtime's quantizers right after calibration, so what is evaluated is what is
            shipped; ``None``: the quantizers as the method calibrates them (PyTorch).
    """

    steps: tuple[Config, ...] = ()
    target: Optional[Target] = None

    KIND = "recipe"
    VERSION = 1

    def _check(self) -> None:
        stages = [handler_of(s).stage for s in self.steps]
        if stages != sorted(stages, key=stage_order) or len(set(stages)) != len(stages):
            raise EamError(f"recipe steps {' → '.join(stages)} are not in the order {' → '.join(all_stages())} "
                           "with each at most once; write them in that order")
        if self.target is not None:
            self.target.check_quant(self.step("quant"))
        if self.target is not None and self.target.form == "openvino" and {"quant", "merge"} <= set(stages):
            raise EamError(merge.OPENVINO_REPQ_MERGE)
        if "prune" in stages and "merge" in stages:
            raise EamError("a recipe prunes or merges tokens, not both (a model's blocks do one of them); "
                           "drop one step")

    def targeted(self) -> "Recipe":
        """The recipe to calibrate anew: one that quantizes and names no target is made for its quantization's
        :func:`~eamvit.methods.export.default_target`."""
        quant = self.step("quant")
        return self if self.target is not None or quant is None else Recipe(self.steps, default_target(quant))

    def step(self, stage: str) -> Optional[Config]:
        """The step of ``stage`` (``"quant"``, ``"freeze"``, ``"prune"`` ...), ``None`` when there is none."""
        return next((s for s in self.steps if handler_of(s).stage == stage), None)

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.KIND, "version": self.VERSION, "steps": [s.to_dict() for s in self.steps]}
        return {**d, "target": self.target.to_dict()} if self.target is not None else d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        """The recipe :meth:`to_dict` wrote, every step checked."""
        if not isinstance(d, dict) or d.get("kind") != cls.KIND:
            raise EamError(f"expected a recipe, found {d.get('kind') if isinstance(d, dict) else type(d).__name__!r}; "
                           f"{_REMEDY}")
        version, unknown = d.get("version", 1), sorted(set(d) - {"kind", "version", "steps", "target"})
        if not isinstance(version, int) or version > cls.VERSION:
            raise EamError(f"recipe version {version} is newer than this eamvit understands (version {cls.VERSION}); "
                           "upgrade eamvit")
        if unknown or not isinstance(d.get("steps"), list):
            raise EamError(f"recipe has {'unknown field(s) ' + ', '.join(unknown) if unknown else 'no list of steps'}; "
                           "it was written by another eamvit version")
        target = Target.from_dict(d["target"]) if d.get("target") is not None else None
        return cls(steps=tuple(_step_from_dict(s) for s in d["steps"]), target=target)


MapsSource = Union[EntropyMaps, Callable[[nn.Module], EntropyMaps], None]


def apply_(model: nn.Module, recipe: Recipe, calib: Any, *, maps: MapsSource = None,
           device: torch.device | str | None = None, progress: bool = False,
           checkpoint_dir: Optional[str] = None) -> dict[str, Any]:
    """Apply ``recipe``'s steps to ``model`` in place, in order; returns ``{stage: that step's report}``.

    Args:
        calib: calibration images (dataset or tensor) for quantization and for maps computed here.
        maps: the freezing step's entropy maps, or a function of the model (as it is after
            quantization) that returns them; ``None`` computes them on ``calib`` (8-bit histograms).
        checkpoint_dir: resumable ADFQ-ViT checkpoints.
    """
    inputs = StepInputs(calib=calib, maps=maps, device=device, progress=progress, checkpoint_dir=checkpoint_dir,
                        target=recipe.target)
    reports: dict[str, Any] = {}
    for step in recipe.steps:
        handler = handler_of(step)
        reports[handler.stage] = handler.apply(model, step, inputs)
        state_of(model).steps[handler.stage] = step
        state_of(model).reports[handler.stage] = reports[handler.stage]
    return reports


def build_(model: nn.Module, recipe: Recipe, calib: Any, *, quant_state: Optional[str | os.PathLike] = None,
           frozen: Optional[str | os.PathLike] = None, maps: MapsSource = None,
           device: torch.device | str | None = None, progress: bool = False,
           checkpoint_dir: Optional[str] = None) -> tuple[Recipe, dict[str, Any]]:
    """:func:`apply_` with the quantization (``quant_state`` of :func:`~eamvit.methods.quantize.save_quantized`)
    or the frozen attention (``frozen`` of :func:`~eamvit.methods.freeze.save_frozen`, loaded on the quantized
    model, whose values it replaces) loaded from files instead of made now; ``recipe`` holds only the steps
    made now. Returns the whole recipe ``model`` now carries and :func:`apply_`'s reports, with ``"frozen"``:
    the loaded freezing settings (``{}`` when the file has none)."""
    for path, stage in ((quant_state, "quant"), (frozen, "freeze")):
        if path is not None and recipe.step(stage) is not None:
            raise EamError(f"{path} holds the {stage} step already; drop that step from the recipe")
    if quant_state is not None:
        quantize.load_quantized(model, quant_state)
        if recipe.target is not None and recipe.target != state_of(model).target:
            raise EamError(f"{quant_state} was calibrated for target {getattr(state_of(model).target, 'form', 'torch')}, "
                           f"not {recipe.target.form}; quantize again for that target, or drop --target")
    quant = Recipe(steps=tuple(s for s in recipe.steps if handler_of(s).stage == "quant"), target=recipe.target)
    rest = Recipe(steps=tuple(s for s in recipe.steps if handler_of(s).stage != "quant"))
    reports = apply_(model, quant, calib, device=device, progress=progress, checkpoint_dir=checkpoint_dir)
    if frozen is not None:  # after quantizing: its values replace the quantized model's maps
        reports["frozen"] = freeze.load_frozen(model, str(frozen)).get("config") or {}
    reports.update(apply_(model, rest, None, maps=maps, device=device, progress=progress))
    return recipe_of(model), reports


def recipe_of(model: nn.Module) -> Recipe:
    """The recipe ``model`` carries: every step applied to it or restored on it, in order."""
    steps = state_of(model).steps  # by stage
    return Recipe(steps=tuple(steps[s] for s in sorted(steps, key=stage_order)), target=state_of(model).target)


def artifact_kind(path: str | os.PathLike) -> str:
    """What the eamvit file at ``path`` holds, by its format tag: ``"compressed"`` (:func:`save_compressed`),
    ``"quant"`` (a quantized state) or ``"frozen"`` (frozen attention); the file is checked as loading it is."""
    kinds = {COMPRESSED_FORMAT: "compressed", quantize.FORMAT: "quant", freeze.FROZEN_FORMAT: "frozen"}
    meta, _ = load_tensors(path, tuple(kinds), "compressed model", "give a file of `eamvit compress`, a quantized "
                           "state of `eamvit quantize` or the frozen.safetensors of `eamvit finetune --tau`")
    return kinds[meta["format"]]


def save_compressed(model: nn.Module, path: str | os.PathLike, recipe: Recipe) -> Path:
    """Write ``model``, compressed by ``recipe`` (which must be what it carries), to one safetensors file."""
    have, want = set(state_of(model).steps), {handler_of(s).stage for s in recipe.steps}
    if have != want:
        raise EamError(f"the model carries the steps {', '.join(sorted(have)) or 'none'} but the recipe has "
                       f"{', '.join(sorted(want)) or 'none'}; apply the recipe with apply_")
    if recipe.target != state_of(model).target:
        raise EamError(f"the model was made for target {getattr(state_of(model).target, 'form', None)} but the recipe "
                       f"names {getattr(recipe.target, 'form', None)}; apply the recipe with apply_")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format": COMPRESSED_FORMAT, "recipe": recipe.to_dict(),
                            "model": model_spec(model).to_dict(),
                            "data_config": preprocessing(data_config(model)),
                            "calibration": list(state_of(model).calibration)}
    for step in recipe.steps:
        handler = handler_of(step)
        if handler.content is not None:
            part, meta[handler.stage] = handler.content(model, step)
            tensors.update({f"{handler.stage}/{k}": v for k, v in part.items()})
    save_tensors(path, tensors, meta)
    return Path(path)


def read_compressed(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a file written by :func:`save_compressed`, or one clear :class:`EamError`."""
    return load_tensors(path, COMPRESSED_FORMAT, "compressed model", _REMEDY)


def restore_(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Rebuild on a fresh ``model`` the compressed model saved at ``path``; returns the file's metadata."""
    meta, tensors = read_compressed(path)
    recipe = Recipe.from_dict(meta.get("recipe"))
    check_same_model(model, meta.get("model"), f"compressed model {path} was made",
                     "give the model it was made from, or compress this one with `eamvit compress`")
    stages = {handler_of(s).stage: s for s in recipe.steps}
    stray = sorted({k.split("/", 1)[0] for k in tensors} - set(stages))
    if stray:
        raise EamError(f"compressed model {path} holds the state of a {stray[0]} step that its recipe does not have; "
                       f"the file was edited: {_REMEDY} again")
    for stage, step in stages.items():
        handler = handler_of(step)
        if handler.content is not None and not isinstance(meta.get(stage), dict):
            raise EamError(f"compressed model {path} has a {stage} step but not its state; {_REMEDY} again")
        part = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(stage + "/")}
        handler.restore(model, step, meta.get(stage) or {}, part, str(path))
        state_of(model).steps[stage] = step
    if recipe.step("quant") is not None and recipe.target != state_of(model).target:
        raise EamError(f"compressed model {path}: its recipe's target is not the one its quantized state was made for; "
                       f"the file was edited: {_REMEDY} again")
    state_of(model).target = recipe.target
    add_calibration(model, meta.get("calibration") or [], f"compressed model {path}")
    return meta


def load(path: str | os.PathLike, model: Optional[nn.Module] = None,
         device: torch.device | str | None = None) -> nn.Module:
    """The compressed model saved at ``path`` (:func:`save_compressed`), logits equal to the saved one's, rebuilt
    on ``model`` (the full-precision model it was made from; ``None``: created from the name in the file)."""
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
