"""Load timm models (by name, with kwargs), checkpoints and the model's own preprocessing."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from torch import nn

from eamvit.modules.attention import instrument
from eamvit.errors import EamError

_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")


@dataclass
class ModelSpec:
    """What identifies a model's weights; stored in every map and quantized-state file.

    Args:
        name: timm model name.
        model_kwargs: keyword overrides passed to ``timm.create_model``.
        checkpoint_sha256: SHA-256 of the checkpoint file, if weights came from one.
        pretrained: weights from the timm / Hugging Face cache.
    """

    name: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint_sha256: Optional[str] = None
    pretrained: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hc
        prev = hc.HF_HUB_OFFLINE
        hc.HF_HUB_OFFLINE = True
    except Exception:  # pragma: no cover - hub not installed
        hc, prev = None, None
    try:
        yield
    finally:
        if hc is not None:
            hc.HF_HUB_OFFLINE = prev
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _cache_locations(name: str) -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except Exception:  # pragma: no cover
        HF_HUB_CACHE = "~/.cache/huggingface/hub"
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        cfg = timm.models.get_pretrained_cfg(name)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    except Exception:
        repo = None
    where = f"the Hugging Face cache {HF_HUB_CACHE}" + (f" (repo {repo})" if repo else "")
    return f"{where} or the torch hub folder {hub_dir}"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pth``/``.pt`` without running pickled code.

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``, EMA variants) and a DDP
    ``module.`` prefix are removed.
    """
    p = Path(path)
    if not p.is_file():
        raise EamError(f"checkpoint {p} does not exist; pass the path of a .pth/.pt/.safetensors state dict")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd: Any = load_file(str(p), device="cpu")
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise EamError(f"checkpoint {p} holds pickled objects that are not plain tensors, and eamvit does not execute "
                       "pickled code; re-save it as a state dict or .safetensors") from None
    except Exception as e:  # corrupt or truncated files raise many different types
        raise EamError(f"cannot read checkpoint {p} ({type(e).__name__}); it is corrupt or not a "
                       ".pth/.pt/.safetensors state dict") from None
    for _ in range(3):
        if isinstance(sd, dict):
            key = next((k for k in _WRAPPER_KEYS if isinstance(sd.get(k), dict)), None)
            if key is None:
                break
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EamError(f"checkpoint {p} is not a state dict of tensors (nor one wrapped in 'state_dict' or 'model')")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load ``sd`` into ``model``; any missing, unexpected or mis-shaped key is one clear error."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {k}: checkpoint {tuple(sd[k].shape)} "
                         f"vs model {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise EamError(f"checkpoint {source} does not fit the model: " + "; ".join(parts)
                       + "; pass the --model / --model-kwargs it was trained with")
    model.load_state_dict(sd, strict=True)


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: Optional[str | os.PathLike] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Create a timm model, load its weights and instrument its attention.

    Args:
        name: timm model name, e.g. ``deit_tiny_patch16_224``.
        pretrained: load weights from the local timm / Hugging Face cache (never downloads).
        checkpoint: a state-dict file (``.pth``, ``.pt`` or ``.safetensors``).
        model_kwargs: overrides for ``timm.create_model`` (``img_size``, ``num_classes``, ...).
        device: device to put the model on.

    Returns:
        The model in eval mode, with ``model.eam_spec`` (a :class:`ModelSpec`) attached.
    """
    kwargs = dict(model_kwargs or {})
    if pretrained and checkpoint:
        raise EamError("give either --pretrained or --checkpoint, not both")
    if not timm.is_model(name):
        raise EamError(f"unknown timm model '{name}'; list candidates with timm.list_models('*vit*') "
                       "or timm.list_models('swin*')")
    try:
        if pretrained:
            with _hub_offline():
                model = timm.create_model(name, pretrained=True, **kwargs)
        else:
            model = timm.create_model(name, pretrained=False, **kwargs)
    except EamError:
        raise
    except TypeError as e:
        raise EamError(f"model '{name}' rejected --model-kwargs {kwargs}: {e}") from None
    except Exception as e:
        if pretrained:
            raise EamError(f"no cached pretrained weights for '{name}' (offline: {type(e).__name__}); expected in "
                           f"{_cache_locations(name)}; copy them there or pass --checkpoint FILE") from None
        raise EamError(f"cannot create model '{name}' with {kwargs}: {e}") from None
    spec = ModelSpec(name=name, model_kwargs=kwargs, pretrained=pretrained)
    instrument(model)  # fails early, with the supported families, for e.g. resnet50
    if checkpoint:
        load_state_dict_strict(model, read_state_dict(checkpoint), str(checkpoint))
        spec.checkpoint_sha256 = file_sha256(checkpoint)
    model.eam_spec = spec
    return model.to(device).eval()


def model_spec(model: nn.Module) -> ModelSpec:
    spec = getattr(model, "eam_spec", None)
    if spec is None:
        spec = ModelSpec(name=type(model).__name__)
        model.eam_spec = spec
    return spec


def num_prefix_tokens(model: nn.Module) -> int:
    """Class + distillation (+ register) tokens before the patch tokens; 0 for Swin."""
    return int(getattr(model, "num_prefix_tokens", 0))


def patch_grid(model: nn.Module) -> Optional[tuple[int, int]]:
    pe = getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    return tuple(grid) if grid is not None else None


def data_config(model: nn.Module, overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The model's own preprocessing (timm data config), with overrides.

    The input size follows the model's ``img_size`` and ``in_chans`` when they were overridden at
    creation, since the pretrained config still describes the original model.

    Args:
        model: a timm model.
        overrides: any of ``input_size``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``,
            ``interpolation`` (``None`` values are ignored).
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    in_chans = getattr(getattr(pe, "proj", None), "in_channels", cfg["input_size"][0])
    if img is not None:
        cfg["input_size"] = (in_chans, int(img[0]), int(img[1]))
    for key, val in (overrides or {}).items():
        if val is not None:
            cfg[key] = tuple(val) if isinstance(val, list) else val
    chans = cfg["input_size"][0]
    for key in ("mean", "std"):
        if len(cfg[key]) != chans:
            # A grayscale model made from an RGB config: one channel with the average statistic.
            cfg[key] = tuple([sum(cfg[key]) / len(cfg[key])] * chans)
    return cfg
