"""Shared tiny models and data: everything here runs on CPU in seconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import eamvit

# Tiny models: one thread is faster than two fighting over a busy 2-core machine.
torch.set_num_threads(1)

TINY_VIT = ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=2, num_heads=2))
TINY_DISTILLED = ("deit_tiny_distilled_patch16_224",
                  dict(img_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=2, num_heads=2))
TINY_SWIN = ("swin_tiny_patch4_window7_224",
             dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
                  num_classes=3))


def make(spec, seed=0):
    torch.manual_seed(seed)
    return eamvit.create_model(spec[0], model_kwargs=dict(spec[1]))


@pytest.fixture
def tiny_vit():
    return make(TINY_VIT)


@pytest.fixture
def tiny_swin():
    return make(TINY_SWIN)


def write_image_folder(root, classes=("cat", "dog", "emu"), per_class=4, size=40, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "images")


def single_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine two threads are far slower.
    Test modules of tiny training runs use it as an autouse, module-scoped fixture."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The tiny ViT as command-line options (the model of TINY_VIT).
MODEL = ["--model", TINY_VIT[0], "--model-kwargs", "img_size=32", "patch_size=8", "num_classes=3",
         "embed_dim=32", "depth=2", "num_heads=2"]


def run(capsys, *args):
    """``eamvit ARGS`` in this process: ``(exit status, stdout, stderr)``."""
    from eamvit.cli.main import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def models_rows() -> dict:
    """`eamvit models`' table as {family: {column: cell}}, read back from its markdown."""
    from eamvit.modules.attention import models_table

    lines = models_table().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
        rows[cells["family"]] = cells
    return rows


def shipped_bound() -> float:
    """Top-1 points by which ONNX Runtime's int8 kernels may score the exported file away from the PyTorch
    model with the same quantizers: 0.3 (the bound the README states). On x86 CPUs without VNNI, where its u8·s8
    kernels saturate, the default export stores uint8 weights, which its u8·u8 kernels multiply exactly."""
    return 0.3


class FailOnce(torch.utils.data.Dataset):
    """Raises KeyboardInterrupt the first time item ``fail_at`` is read, like a killed job."""

    def __init__(self, base, fail_at):
        self.base, self.fail_at, self.failed = base, fail_at, False

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i == self.fail_at and not self.failed:
            self.failed = True
            raise KeyboardInterrupt
        return self.base[i]


def tokens_out(model, x):
    """Tokens leaving each block, seen by forward hooks."""
    seen = []
    hooks = [b.register_forward_hook(lambda mod, args, out: seen.append(out.shape[1])) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen
