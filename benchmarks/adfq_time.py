"""ADFQ-ViT W4/A4 calibration time on deit_tiny_patch16_224 (random weights) ÷ RepQ-ViT's on the same model.

The issue's setting is 128 images at 224 px and 300 reconstruction iterations per module; on a busy
CPU that takes long, so ``--images`` / ``--iters`` scale it down (the per-iteration time is printed,
so the full run can be extrapolated). RepQ-ViT calibrates on 32 images (its reference setting),
or on ``--images`` when fewer. The ratio is printed last.

    python benchmarks/adfq_time.py --images 128 --iters 300
"""
from __future__ import annotations

import argparse
import time

import torch

import eamvit
from eamvit import ADFQConfig, RepQConfig, quantize_


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.images, 3, args.img_size, args.img_size)
    kw = dict(img_size=args.img_size)

    model = eamvit.create_model("deit_tiny_patch16_224", model_kwargs=kw)
    n_repq = min(32, args.images)
    t0 = time.perf_counter()
    quantize_(model, RepQConfig(w_bits=4, a_bits=4, calib_size=n_repq), images, progress=False)
    t_repq = time.perf_counter() - t0

    model = eamvit.create_model("deit_tiny_patch16_224", model_kwargs=kw)
    cfg = ADFQConfig(w_bits=4, a_bits=4, calib_size=args.images, init_size=min(32, args.images),
                     iterations=args.iters, batch_size=min(args.batch_size, args.images))
    t0 = time.perf_counter()
    quantize_(model, cfg, images, progress=False)
    t_adfq = time.perf_counter() - t0
    units = model.eam_quant_report["units"]
    train_s = sum(u["seconds"] for u in units)
    per_iter = train_s / (len(units) * args.iters)
    print(f"deit_tiny_patch16_224 @ {args.img_size}px, random weights, {args.threads} thread(s)")
    print(f"RepQ-ViT W4/A4: {t_repq:.2f} s ({n_repq} images)")
    print(f"ADFQ-ViT W4/A4: {t_adfq:.2f} s ({args.images} images, {args.iters} iterations x {len(units)} modules, "
          f"batch {cfg.batch_size}); {per_iter * 1e3:.1f} ms per iteration (capture included)")
    print(f"ratio ADFQ/RepQ: {t_adfq / t_repq:.1f}")


if __name__ == "__main__":
    main()
