"""Datasets: ImageFolder trees, scikit-learn's bundled digits, calibration subsets and loaders.

Unreadable image files in an ImageFolder tree are skipped and counted (``skipped`` in every results
row), not fatal: one broken JPEG in 50 000 should not end an evaluation. ``--strict-images`` turns a
bad file into an error instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from eamvit.errors import EamError


class ImageFolderDataset(Dataset):
    """An ImageNet-style folder (``root/<class>/<image>``) read with torchvision's ImageFolder.

    Args:
        root: the folder.
        transform: a transform from :func:`eamvit.models.data_config` (timm ``create_transform``).
        grayscale: read images as one channel (models with ``in_chans=1``).
        strict: raise on an unreadable image instead of skipping it.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable, grayscale: bool = False, strict: bool = False):
        from torchvision.datasets import ImageFolder

        root = Path(root)
        if not root.is_dir():
            raise EamError(f"image folder {root} does not exist; pass an ImageNet-style folder root/<class>/<image>")
        try:
            self.folder = ImageFolder(str(root), loader=lambda p: p)
        except (FileNotFoundError, RuntimeError) as e:
            raise EamError(f"image folder {root} has no class folders with images ({e.__class__.__name__}); "
                           "expected root/<class>/<image>.jpg") from None
        self.transform = transform
        self.mode = "L" if grayscale else "RGB"
        self.strict = strict
        self.classes = self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> Optional[tuple[torch.Tensor, int]]:
        from PIL import Image

        path, target = self.folder.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert(self.mode)
        except Exception:
            if self.strict:
                raise EamError(f"cannot read image {path}; remove it or drop --strict-images to skip it") from None
            return None
        return self.transform(img), target


DIGITS_MEAN, DIGITS_STD = 0.5, 0.5


class DigitsDataset(Dataset):
    """scikit-learn's bundled 8x8 handwritten digits as ``(1, S, S)`` tensors.

    A fixed stratified 80/20 split (seed 0): 1437 training and 360 test images.

    Args:
        split: ``"train"`` or ``"test"``.
        img_size: side the 8x8 images are resized to (bilinear).
        augment: random ±1-pixel shifts (training only).
    """

    def __init__(self, split: str = "train", img_size: int = 16, augment: bool = False):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "test"):
            raise EamError(f"digits split must be 'train' or 'test', not {split!r}")
        d = load_digits()
        idx = list(range(len(d.target)))
        tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=d.target)
        sel = tr if split == "train" else te
        x = torch.tensor(d.images[sel], dtype=torch.float32).unsqueeze(1) / 16.0
        if img_size != 8:
            x = torch.nn.functional.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
        self.images = (x - DIGITS_MEAN) / DIGITS_STD
        self.targets = torch.tensor(d.target[sel], dtype=torch.long)
        self.augment = augment
        self.classes = [str(i) for i in range(10)]
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        if self.augment:
            shift = self.img_size // 8  # one original pixel
            dy, dx = torch.randint(-shift, shift + 1, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(1, 2))
        return x, int(self.targets[i])


def random_subset(dataset: Dataset, size: Optional[int], seed: int = 0, exclude: Sequence[int] = ()) -> list[int]:
    """Indices of a seeded random subset of ``size`` images (all, in order, when ``size`` is None)."""
    n = len(dataset)
    if size is None:
        return [i for i in range(n) if i not in set(exclude)]
    if size < 1:
        raise EamError(f"subset size must be at least 1, got {size}")
    pool = [i for i in range(n) if i not in set(exclude)]
    if size > len(pool):
        raise EamError(f"asked for {size} images but only {len(pool)} are available; lower --calib-size/--num-samples")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(pool), generator=g).tolist()
    return [pool[i] for i in perm[:size]]


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Every ``world``-th index from ``rank``: disjoint shards with no padding, so counts stay exact."""
    return list(indices[rank::world])


@dataclass
class Batch:
    images: torch.Tensor
    targets: torch.Tensor
    skipped: int


def _collate(items: list) -> Batch:
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    return Batch(torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), skipped)


def make_loader(dataset: Dataset, indices: Optional[Sequence[int]] = None, batch_size: int = 64,
                workers: int = 0, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A loader of :class:`Batch` over ``indices`` of ``dataset`` (in the given order unless shuffled)."""
    ds = Subset(dataset, list(indices)) if indices is not None else dataset
    g = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=_collate,
                      generator=g, persistent_workers=False)


def build_dataset(spec: str, model_cfg: Optional[dict[str, Any]] = None, split: str = "test",
                  strict_images: bool = False, img_size: int = 16) -> Dataset:
    """``"digits"`` (with ``split``) or a path to an ImageFolder tree, preprocessed for the model."""
    if spec == "digits":
        return DigitsDataset(split, img_size=img_size)
    from timm.data import create_transform

    cfg = dict(model_cfg or {})
    transform = create_transform(**{k: v for k, v in cfg.items() if k in (
        "input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}, is_training=False)
    grayscale = cfg.get("input_size", (3,))[0] == 1
    ds = ImageFolderDataset(spec, transform, grayscale=grayscale, strict=strict_images)
    if len(ds) == 0:
        raise EamError(f"image folder {spec} contains no images")
    return ds
