"""Load timm models (by name, with kwargs), checkpoints and the model's own preprocessing."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional
from unittest import mock

import huggingface_hub.constants as hc  # a dependency of timm
import timm
import torch
from safetensors import safe_open
from torch import nn

from timm.data import resolve_data_config

from eamvit.io import save_tensors
from eamvit.methods.state import state_of
from eamvit.modules.attention import attention_layers, input_size, instrument, layer_shapes
from eamvit.modules.quantizers import Quantizer
from eamvit.errors import EamError

_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")
# timm.create_model keys that load weights (or a config that does) behind eamvit's checks.
_WEIGHT_KWARGS = frozenset({"checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                            "pretrained_strict", "cache_dir"})
PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
CHECKPOINT_FORMAT = "eamvit-checkpoint/1"

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_MODEL = "eamvit-digits-vit"
"""``create_model`` name of the bundled digits ViT (a small timm ViT trained on scikit-learn's digits)."""
BUNDLED_ASSET = _ASSETS / "digits_vit.safetensors"
BUNDLED_CONFIG = _ASSETS / "digits_vit.json"


@dataclass
class ModelSpec:
    """What identifies a model's weights (timm name and kwargs, checkpoint digest, or timm's pretrained
    weights); stored in every map and quantized-state file."""

    name: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint_sha256: Optional[str] = None
    pretrained: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def weights(self) -> str:
        """Where the weights came from: ``checkpoint``, ``pretrained`` or ``random``."""
        return "checkpoint" if self.checkpoint_sha256 else "pretrained" if self.pretrained else "random"

    def same_model(self, other: dict[str, Any]) -> bool:
        # Compare as JSON sees them: a saved (2, 2) comes back as [2, 2].
        norm = lambda d: json.loads(json.dumps(d or {}))
        return (other.get("name") == self.name and norm(other.get("model_kwargs")) == norm(self.model_kwargs)
                and other.get("checkpoint_sha256") == self.checkpoint_sha256
                and bool(other.get("pretrained")) == self.pretrained)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _hub_offline():
    """Make Hugging Face Hub look only at its local cache while creating a pretrained model."""
    with mock.patch.dict(os.environ, HF_HUB_OFFLINE="1"), mock.patch.object(hc, "HF_HUB_OFFLINE", True):
        yield


def _cache_locations(name: str) -> str:
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        repo = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
    except Exception:
        repo = None
    where = f"the Hugging Face cache {hc.HF_HUB_CACHE}" + (f" (repo {repo})" if repo else "")
    return f"{where} or the torch hub folder {hub_dir}"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """``(state dict, data config or None)`` of a ``.safetensors`` or ``.pth``/``.pt`` file, running no pickled code.

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``, EMA variants) and a DDP
    ``module.`` prefix are removed. The data config is the one :func:`save_checkpoint` stored (a
    safetensors metadata entry, or a ``"data_config"`` entry next to the wrapped state dict).
    """
    p = Path(path)
    if p.is_dir():
        raise EamError(f"--checkpoint {p} is a folder; pass the state-dict file inside it (.pth/.pt/.safetensors)")
    if not p.is_file():
        raise EamError(f"--checkpoint {p} does not exist; pass the path of a .pth/.pt/.safetensors state dict")
    cfg: Any = None
    try:
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt", device="cpu") as f:
                sd: Any = {k: f.get_tensor(k) for k in f.keys()}
                cfg = json.loads((f.metadata() or {}).get("eamvit", "{}")).get("data_config")
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A readable torch archive whose pickle names classes: objects, not plain tensors. Anything
        # else (random bytes, a truncated file) is simply not a checkpoint.
        if zipfile.is_zipfile(p):
            raise EamError(f"checkpoint {p} holds pickled objects that are not plain tensors, and eamvit does not "
                           "execute pickled code; re-save it as a state dict or .safetensors") from None
        raise EamError(f"cannot read checkpoint {p}: it is not a .pth/.pt/.safetensors state dict "
                       "(corrupt, truncated or another kind of file)") from None
    except Exception as e:  # corrupt or truncated files raise many different types
        raise EamError(f"cannot read checkpoint {p} ({type(e).__name__}): it is not a .pth/.pt/.safetensors "
                       "state dict (corrupt, truncated or another kind of file)") from None
    for _ in range(3):
        key = next((k for k in _WRAPPER_KEYS if isinstance(sd, dict) and isinstance(sd.get(k), dict)), None)
        if key is None:
            break
        cfg = sd["data_config"] if isinstance(sd.get("data_config"), dict) else cfg
        sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EamError(f"checkpoint {p} is not a state dict of tensors (nor one wrapped in 'state_dict' or 'model')")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, (cfg if isinstance(cfg, dict) else None)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, data_cfg: Optional[dict[str, Any]] = None,
                    extra: Optional[dict[str, Any]] = None) -> Path:
    """Write ``model``'s weights as safetensors (atomically) with its data config, which loading then follows.

    Args:
        data_cfg: the preprocessing the model was trained with (default: :func:`data_config` of the model).
        extra: more JSON metadata to store (e.g. the test accuracy measured after training).
    """
    cfg = preprocessing(data_cfg if data_cfg is not None else data_config(model))
    meta = {**(extra or {}), "format": CHECKPOINT_FORMAT, "model": model_spec(model).to_dict(), "data_config": cfg}
    save_tensors(path, {k: v.detach() for k, v in model.state_dict().items()}, meta)
    return Path(path)


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load ``sd`` into ``model``; any missing, unexpected or mis-shaped key is one clear error."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(shapes)} shape mismatch(es), e.g. {k}: checkpoint {tuple(sd[k].shape)} vs model "
             f"{tuple(own[k].shape)}" for k in shapes[:1]]
    parts += [f"{len(keys)} {what} key(s), e.g. {keys[0]}" for keys, what in ((missing, "missing"),
                                                                            (unexpected, "unexpected")) if keys]
    if parts:
        raise EamError(f"checkpoint {source} does not fit the model: " + "; ".join(parts)
                       + "; pass the --model / --model-kwargs it was trained with")
    model.load_state_dict(sd, strict=True)


def _bundled(name: str, checkpoint, model_kwargs) -> tuple[str, dict[str, Any], Any, Optional[dict]]:
    """Resolve :data:`BUNDLED_MODEL` to its timm name, kwargs, checkpoint and data config."""
    if model_kwargs:
        raise EamError(f"{name} is the bundled digits ViT; --model-kwargs need a timm --model NAME")
    cfg = json.loads(BUNDLED_CONFIG.read_text())
    if checkpoint is None and not BUNDLED_ASSET.exists():
        raise EamError(f"the bundled checkpoint {BUNDLED_ASSET} is missing from the installation; reinstall "
                       "eamvit or run `eamvit train-digits --out FILE` and pass --checkpoint FILE")
    return cfg.pop("model"), cfg.pop("model_kwargs"), checkpoint if checkpoint is not None else BUNDLED_ASSET, cfg


def _timm_create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    try:
        with _hub_offline() if pretrained else contextlib.nullcontext():
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise EamError(f"model '{name}' rejected --model-kwargs {kwargs}: {e}") from None
    except Exception as e:
        if pretrained:
            raise EamError(f"no cached pretrained weights for '{name}' (offline: {type(e).__name__}); expected in "
                           f"{_cache_locations(name)}; copy them there or pass --checkpoint FILE") from None
        raise EamError(f"cannot create model '{name}' with {kwargs}: {e}") from None


def create_model(
    name: str = BUNDLED_MODEL,
    *,
    pretrained: bool = False,
    checkpoint: Optional[str | os.PathLike] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Create a timm model in eval mode, load its weights and instrument its attention (its preprocessing:
    :func:`data_config`).

    Args:
        name: timm model name or :data:`BUNDLED_MODEL` (the default): the bundled digits ViT with its weights.
        pretrained: load weights from the local timm / Hugging Face cache (never downloads).
        model_kwargs: overrides for ``timm.create_model`` (``img_size``, ``num_classes``, ...); keys
            that make timm load weights itself (``checkpoint_path``, ``pretrained_cfg``...) are refused.
    """
    ckpt_cfg = None
    if name == BUNDLED_MODEL:
        if pretrained:
            raise EamError(f"{name} has no timm pretrained weights; drop --pretrained")
        name, model_kwargs, checkpoint, ckpt_cfg = _bundled(name, checkpoint, model_kwargs)
    kwargs = dict(model_kwargs or {})
    bad = sorted(set(kwargs) & _WEIGHT_KWARGS)
    if bad:
        raise EamError(f"--model-kwargs {bad[0]} would load weights past eamvit's checks (strict keys, checkpoint "
                       "hash); pass the file with --checkpoint FILE or use --pretrained")
    if pretrained and checkpoint:
        raise EamError("give either --pretrained or --checkpoint, not both")
    if not timm.is_model(name):
        raise EamError(f"unknown timm model '{name}'; list candidates with timm.list_models('*vit*') "
                       "or timm.list_models('swin*')")
    sd = None
    if checkpoint:  # read first: a bad file is reported before a big model is built
        sd, own_cfg = read_checkpoint(checkpoint)
        ckpt_cfg = own_cfg or ckpt_cfg
    model = _timm_create(name, pretrained, kwargs)
    spec = ModelSpec(name=name, model_kwargs=kwargs, pretrained=pretrained)
    instrument(model)  # fails early, with the supported families, for e.g. resnet50
    if sd is not None:
        load_state_dict_strict(model, sd, str(checkpoint))
        spec.checkpoint_sha256 = file_sha256(checkpoint)
    state_of(model).spec = spec
    if ckpt_cfg is not None:
        state_of(model).data_config = {**_checked(model, preprocessing(ckpt_cfg), "checkpoint"), "source": "checkpoint"}
    return model.to(device).eval()


def model_spec(model: nn.Module) -> ModelSpec:
    st = state_of(model)
    if st.spec is None:
        st.spec = ModelSpec(name=type(model).__name__)
    return st.spec


def check_same_model(model: nn.Module, theirs: Any, made: str, remedy: str) -> None:
    """Refuse a file whose metadata ``theirs`` names another model than ``model`` (name, kwargs, weights);
    ``made``: the file and its verb (``"quantized state X was made"``)."""
    spec = model_spec(model)
    theirs = theirs if isinstance(theirs, dict) else {}
    if not spec.same_model(theirs):
        def show(d: dict) -> str:  # the weights too: two files of one architecture differ only there
            ck = d.get("checkpoint_sha256")
            weights = f" checkpoint {ck[:12]}" if ck else " pretrained" if d.get("pretrained") else " random weights"
            return f"{d.get('name')} {d.get('model_kwargs') or ''}".strip() + weights
        raise EamError(f"{made} for {show(theirs)}, not for {show(spec.to_dict())}; {remedy}")


def num_prefix_tokens(model: nn.Module) -> int:
    """Class + distillation (+ register) tokens before the patch tokens; 0 for Swin."""
    return int(getattr(model, "num_prefix_tokens", 0))


def patch_grid(model: nn.Module) -> Optional[tuple[int, int]]:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return tuple(grid) if grid is not None else None


def _own_attention_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """Attention shapes of one forward of a blank image at the model's own size, with every quantizer
    off (an uncalibrated one would otherwise calibrate itself on that image) and token pruning at
    κ = 1 (maps describe the unpruned model; pruning decides later which of them still apply)."""
    qs = [(q, q.enabled) for q in model.modules() if isinstance(q, Quantizer)]
    pruning = state_of(model).prune
    keep_rate = pruning.keep_rate if pruning is not None else None
    p = next(model.parameters())
    try:
        for q, _ in qs:
            q.enabled = False
        if pruning is not None:
            pruning.keep_rate = 1.0
        return layer_shapes(model, torch.zeros(1, *data_config(model)["input_size"], device=p.device, dtype=p.dtype))
    finally:
        for q, was in qs:
            q.enabled = was
        if pruning is not None:
            pruning.keep_rate = keep_rate


def check_attention_shapes(model: nn.Module, shapes: list, what: str, remedy: str) -> None:
    """Refuse per-layer attention shapes ``shapes`` (of maps, frozen masks; None: nothing stored) made on another
    architecture, naming ``what`` and the ``remedy``. The heads are compared always, the token count only when
    the model takes one input size (a model that takes other sizes has as many tokens as its input gives)."""
    layers = attention_layers(model)
    pe = getattr(model, "patch_embed", None)
    # Token counts are fixed only behind a strict patch embedding (ViT, Swin); others follow the input.
    dynamic = bool(getattr(model, "dynamic_img_size", False)) or not getattr(pe, "strict_img_size", False)
    own = _own_attention_shapes(model) if not dynamic else None
    for l, (s, m) in enumerate(zip(shapes, layers)):
        if s is None:
            continue
        s = tuple(s)
        heads = getattr(m, "num_heads", None) or getattr(m, "heads", None)  # Hiera names it `heads`
        if len(s) < 3 or (heads is not None and s[-3] != heads):
            raise EamError(f"{what}: layer {l} has shape {s}, not {heads} heads as the model; {remedy}")
        if own is not None and s != tuple(own[l]):
            raise EamError(f"{what}: layer {l} has shape {s} ({s[-1]} tokens) but the model's attention is "
                           f"{tuple(own[l])} ({own[l][-1]} tokens); {remedy}")


def preprocessing(cfg: dict[str, Any]) -> dict[str, Any]:
    """Only the preprocessing keys of a data config, as JSON-friendly lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in PREPROCESSING_KEYS}


def _model_input(model: nn.Module) -> tuple[Optional[int], Optional[tuple[int, int]], bool]:
    """``(channels, (height, width), takes other sizes)`` of the images ``model`` reads; None where
    its patch embedding does not say."""
    pe = getattr(model, "patch_embed", None)
    img = input_size(model)  # as the family's adapter reads the built model
    # The first convolution sees the image (VOLO's patch embedding has a stem before its ``proj``).
    first = next((m for m in pe.modules() if isinstance(m, nn.Conv2d)), None) if isinstance(pe, nn.Module) else None
    dynamic = bool(getattr(model, "dynamic_img_size", False)) or not getattr(pe, "strict_img_size", True)
    return (first.in_channels if first is not None else None,
            (int(img[0]), int(img[1])) if img is not None else None, dynamic)


def _timm_config(model: nn.Module) -> dict[str, Any]:
    cfg = resolve_data_config({}, model=model)
    chans, img, _ = _model_input(model)
    in_chans = chans if chans is not None else cfg["input_size"][0]
    if img is not None:  # the pretrained config still describes the original model
        cfg["input_size"] = (in_chans, int(img[0]), int(img[1]))
    for key in ("mean", "std"):
        if len(cfg[key]) != in_chans:
            # A grayscale model made from an RGB pretrained config: one channel with the average statistic.
            cfg[key] = tuple([sum(cfg[key]) / len(cfg[key])] * in_chans)
    return cfg


def _checked(model: nn.Module, cfg: dict[str, Any], source: str, origin: Optional[str] = None) -> dict[str, Any]:
    """``cfg`` (from ``source``: ``overrides``, ``checkpoint``, ..., read from ``origin``, for messages) with
    tuples, mean/std of the model's channel count, every value validated."""
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    what = origin or ("the options" if source == "overrides" else f"the {source}'s data config")
    crop = cfg.get("crop_pct")
    if crop is not None and not (isinstance(crop, (int, float)) and 0 < crop <= 1):
        raise EamError(f"crop_pct {crop} from {what} must be in (0, 1] (1 = no crop; --crop-pct)")
    if cfg.get("crop_mode") not in (None, "center", "squash", "border"):
        raise EamError(f"crop_mode {cfg['crop_mode']!r} from {what} must be center, squash or border")
    if cfg.get("interpolation") not in (None, "bilinear", "bicubic", "nearest", "random"):
        raise EamError(f"interpolation {cfg['interpolation']!r} from {what} must be bilinear, bicubic or nearest")
    chans = _check_input_size(model, cfg.get("input_size"), what)
    for key in ("mean", "std"):
        vals = tuple(float(v) for v in cfg[key])
        if len(vals) == 1:
            vals = vals * chans
        elif len(vals) != chans:
            raise EamError(f"{key} {list(vals)} from {what} has {len(vals)} values but the model reads {chans} "
                           f"channel(s); give 1 or {chans} (--{key})")
        if key == "std" and any(not v > 0 for v in vals):
            raise EamError(f"--std must be positive, got {list(vals)}")
        cfg[key] = vals
    return cfg


def _check_input_size(model: nn.Module, size: Any, what: str) -> int:
    """The channel count of ``size`` (a data config's ``input_size``), refused unless ``model`` takes it."""
    chans, img, dynamic = _model_input(model)
    ok = isinstance(size, tuple) and len(size) == 3 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    if ok and chans is not None:
        ok = size[0] == chans and (img is None or dynamic or tuple(size[1:]) == img)
    if not ok:
        takes = f"{chans}x{img[0]}x{img[1]} images" if chans is not None and img is not None and not dynamic \
            else f"{chans}-channel images" if chans is not None else "channels x height x width"
        shown = list(size) if isinstance(size, tuple) else size
        raise EamError(f"input_size {shown!r} from {what} is not what the model takes ({takes}); use the model "
                       "it was made for, or create it again from this one")
    return size[0]


def _input_size(model: nn.Module, cfg: dict[str, Any], img_size: int) -> tuple[int, int, int]:
    """The input size for ``--img-size``: the model's own unless it accepts other sizes."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (1, 1))
    own = tuple(cfg["input_size"][1:])
    if not isinstance(img_size, int) or img_size < 1:
        raise EamError(f"--img-size must be a positive number of pixels, got {img_size}")
    if img_size % int(patch[0]):
        raise EamError(f"--img-size {img_size} is not a multiple of the model's patch size {int(patch[0])}")
    if (img_size, img_size) != own and not _model_input(model)[2]:
        raise EamError(f"--img-size {img_size}: this model takes {own[0]}x{own[1]} images only; create it for "
                       f"another size with --model-kwargs img_size={img_size}")
    return (int(cfg["input_size"][0]), img_size, img_size)


def data_config(model: nn.Module, overrides: Optional[dict[str, Any]] = None,
                origin: Optional[str] = None) -> dict[str, Any]:
    """The model's own preprocessing, with overrides (like timm's ``resolve_data_config``).

    The base is the config the model's checkpoint carried (:func:`save_checkpoint`, the bundled digits ViT),
    else timm's pretrained config for the model name with the input size and ``in_chans`` the built model
    takes. ``cfg["source"]`` says which (``checkpoint``, ``timm``, or ``overrides`` when any was applied).

    Args:
        overrides: any of ``img_size`` and :data:`PREPROCESSING_KEYS` (``None`` values are ignored); every
            value is validated.
        origin: what the overrides were read from, for messages (default: the command's options).
    """
    own = state_of(model).data_config
    cfg = dict(own) if own is not None else {**_timm_config(model), "source": "timm"}
    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "img_size" in ov:
        ov["input_size"] = _input_size(model, cfg, ov.pop("img_size"))
    unknown = sorted(set(ov) - set(PREPROCESSING_KEYS))
    if unknown:
        raise EamError(f"unknown preprocessing override {unknown[0]!r}; use one of {', '.join(PREPROCESSING_KEYS)}")
    cfg.update(ov)
    source = "overrides" if ov else cfg.pop("source", "timm")
    cfg.pop("source", None)
    return {**_checked(model, cfg, source, origin if ov else None), "source": source}
