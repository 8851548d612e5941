"""The datasets eamvit reads: ImageNet-style folders of image files (an unreadable file is skipped and
counted, not fatal, unless ``--strict-images``) and scikit-learn's bundled digits."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import Dataset

from eamvit.errors import EamError


class ImageFolderDataset(Dataset):
    """An ImageNet-style folder (``root/<class>/<image>``) read with torchvision's ImageFolder.

    Args:
        transform: a transform from :func:`eamvit.models.data_config` (timm ``create_transform``).
        grayscale: read images as one channel (models with ``in_chans=1``).
        strict: raise on an unreadable image instead of skipping it.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable, grayscale: bool = False, strict: bool = False):
        from torchvision.datasets import ImageFolder

        self.root = root = Path(root)
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

    def _read(self, path: str) -> Any:
        """The image at ``path`` in the model's mode (raises whatever PIL raises on a bad file)."""
        from PIL import Image

        with Image.open(path) as im:
            return im.convert(self.mode)

    def __getitem__(self, i: int) -> Optional[tuple[torch.Tensor, int]]:
        path, target = self.folder.samples[i]
        try:
            img = self._read(path)
        except Exception:
            if self.strict:
                raise EamError(f"cannot read image {path}; remove it or drop --strict-images to skip it") from None
            return None
        return self.transform(img), target

    def require_readable(self) -> None:
        """Refuse a folder none of whose files is an image (nothing to skip to); a good folder costs one image."""
        first: Optional[tuple[str, Exception]] = None
        for path, _ in self.folder.samples:
            try:
                self._read(path)
                return
            except Exception as e:
                if self.strict:
                    raise EamError(f"cannot read image {path}; remove it or drop --strict-images to skip it") from None
                first = first or (path, e)
        path, e = first  # type: ignore[misc]  # the folder has files (checked by the caller)
        why = str(e).replace(f"'{path}'", "").replace(str(path), "").strip(" :") or type(e).__name__
        raise EamError(f"no image in {self.root} can be read: all {len(self)} files fail (the first, {path}: "
                       f"{why}); give a folder of images (JPEG, PNG, ...) as root/<class>/<image>")


DIGITS_MEAN, DIGITS_STD = 0.5, 0.5


class DigitsDataset(Dataset):
    """scikit-learn's bundled 8x8 handwritten digits as ``(1, img_size, img_size)`` tensors (a fixed stratified
    80/20 split), scaled to [0, 1], minus ``mean``, over ``std``; ``augment``: random ±1-pixel shifts.

    Args:
        interpolation: ``bilinear`` (how the bundled model was trained), ``bicubic`` or ``nearest``.
    """

    def __init__(self, split: str = "train", img_size: int = 16, augment: bool = False, mean: float = DIGITS_MEAN,
                 std: float = DIGITS_STD, interpolation: str = "bilinear"):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "test"):
            raise EamError(f"digits split must be 'train' or 'test', not {split!r}")
        d = load_digits()
        tr, te = train_test_split(list(range(len(d.target))), test_size=0.2, random_state=0, stratify=d.target)
        sel = tr if split == "train" else te
        x = torch.tensor(d.images[sel], dtype=torch.float32).unsqueeze(1) / 16.0
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise EamError(f"digits are resized with bilinear, bicubic or nearest interpolation, not {interpolation!r}")
        if not std > 0:
            raise EamError(f"--std must be positive, got {std}")
        if img_size != 8:
            align = {} if interpolation == "nearest" else {"align_corners": False}
            x = torch.nn.functional.interpolate(x, size=(img_size, img_size), mode=interpolation, **align)
        self.images = (x - mean) / std
        self.targets = torch.tensor(d.target[sel], dtype=torch.long)
        self.augment = augment
        self.split = split
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
