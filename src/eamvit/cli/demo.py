"""``demo`` and ``train-digits``."""
from __future__ import annotations

from pathlib import Path

from eamvit.io import check_output_file
from eamvit.cli.common import parse_device, require_modules


def cmd_train_digits(args) -> None:
    from eamvit.experiments.digits import DigitsConfig, train_digits

    check_output_file(args.out)  # before minutes of training
    config = DigitsConfig(epochs=args.epochs, seed=args.seed)
    res = train_digits(args.out, config, device=parse_device(args.device))
    print(f"wrote {args.out}: test top-1 {res['top1']:.2f}%")


def draw_figure(figure) -> None:
    """Draw one :class:`~eamvit.experiments.demo_run.Figure` of the demo with its :mod:`eamvit.plots` function."""
    from eamvit.plots import entropy, optimize, prune, quant, speed

    plot = next(getattr(m, figure.plot) for m in (entropy, speed, quant, prune, optimize) if hasattr(m, figure.plot))
    plot(*figure.args, **figure.kwargs)


def cmd_demo(args) -> None:
    require_modules("eamvit demo")  # its optimize and export steps need them: fail now, not after minutes of work
    import torch

    from eamvit.experiments.demo import run_demo

    # The digits ViT is tiny (0.015 GMACs): splitting its small matrices over threads costs more than it
    # saves, and a busy machine makes every extra thread wait (one thread: 96 s; two: 280 s, same load).
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run_demo(out=Path(args.out), retrain=args.retrain, checkpoint=args.checkpoint,
                 device=parse_device(args.device), epochs=args.epochs, full=args.full, draw=draw_figure)
    finally:
        torch.set_num_threads(before)


def register(sub) -> None:
    """Add this group's sub-commands to the ``eamvit`` parser."""
    s = sub.add_parser("demo", help="train/load the digits ViT, calibrate, sweep, write figures and a report")
    s.add_argument("--out", default="eamvit-demo", help="output folder")
    s.add_argument("--retrain", action="store_true", help="train the digits ViT instead of loading the shipped one")
    s.add_argument("--checkpoint", default=None, help="this digits checkpoint instead of the shipped one (default: "
                   "eamvit/assets/digits_vit.safetensors in the installed package)")
    s.add_argument("--epochs", type=int, default=80, help="training epochs with --retrain")
    s.add_argument("--full", action="store_true", help="also run the slow parts (minutes more on CPU): the global "
                   "scope, freezing vs pruning at measured speed, frozen fine-tuning, RepQ-ViT vs ADFQ-ViT vs PMQ, and "
                   "the export table (fp32, int8, 4-bit weight-only in PyTorch and ONNX Runtime, its own int8)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps ... (auto: cuda if available, else cpu)")
    s.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads: one is the fastest for the tiny "
                   "digits ViT (its top-1 values are the same with two)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("train-digits", help="train the demo ViT on scikit-learn's digits")
    s.add_argument("--out", default="digits_vit.safetensors",
                   help="checkpoint to write (the bundled one is never overwritten)")
    s.add_argument("--epochs", type=int, default=80, help="passes over the 1437 training digits")
    s.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and augmentation")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto = cuda if available")
    s.set_defaults(func=cmd_train_digits)

