"""The command's help: instant (no torch/timm while building the parser), every option explained with
its default, ``--version``, and one definition of every choice list."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_building_the_parser_imports_no_torch_or_timm():
    # A fresh interpreter: the test process itself has torch loaded already.
    code = ("import sys; from eamvit.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'timm', 'torchvision', 'numpy', 'matplotlib', 'sklearn') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["calibrate", "--help"], ["compare", "--help"], ["--version"]])
def test_help_and_version_run_without_torch(argv):
    # -X importtime lists every module the interpreter imported, on stderr.
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "eamvit.cli", *argv], env=_env(),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "timm"}, sorted(imported & {"torch", "timm"})
    assert out.stdout.strip()


def test_version_is_the_package_version():
    import eamvit

    out = subprocess.run([sys.executable, "-m", "eamvit.cli", "--version"], env=_env(), capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["eamvit", eamvit.__version__]


def _options():
    from eamvit.cli.main import build_parser

    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                yield name, sub, action


def test_every_option_says_what_it_does_and_its_default():
    from eamvit.cli.main import HelpFormatter

    missing, no_default = [], []
    for name, sub, action in _options():
        opt = f"{name} {action.option_strings[-1]}"
        if not (action.help or "").strip():
            missing.append(opt)
            continue
        text = HelpFormatter(prog="x")._get_help_string(action)
        flag = action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction)
        if not (flag or action.required or "default" in text):
            no_default.append(opt)  # a value option must name the value used when it is absent
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help names no default: {no_default}"


def test_formatted_help_shows_the_default_value():
    from eamvit.cli.main import build_parser

    subs = _subparsers(build_parser())
    compare = " ".join(subs["compare"].format_help().split())
    assert "(default: 5000)" in compare  # --adfq-iterations, from eamvit.choices
    assert "(default: 1024)" in compare
    plot = " ".join(subs["plot"].format_help().split())
    assert "0-based" in plot


def test_choices_are_defined_once():
    from eamvit import choices
    from eamvit.cli.main import build_parser
    from eamvit.experiments import compare
    from eamvit.methods import freeze, prune, repq

    assert freeze.SCOPES is choices.SCOPES and freeze.VALUE_QUANTIZERS is choices.VALUE_QUANTIZERS
    assert prune.METHODS is choices.PRUNE_METHODS and prune.KEYS is choices.ENTROPY_KEYS
    assert repq.ATTN_QUANTIZERS is choices.ATTN_QUANTIZERS and compare.METHODS is choices.COMPARE_METHODS
    assert repq.RepQConfig().attn_quantizer == choices.ATTN_QUANTIZERS[0]
    from eamvit.methods.adfq import ADFQConfig

    assert (ADFQConfig.iterations, ADFQConfig.calib_size) == (choices.ADFQ_ITERATIONS, choices.ADFQ_CALIB_SIZE)
    subs = _subparsers(build_parser())
    opts = {a.dest: a for a in subs["eval"]._actions}
    assert tuple(opts["scope"].choices) == choices.SCOPES
    assert tuple(opts["prune"].choices) == choices.PRUNE_METHODS
    assert tuple(opts["quant"].choices) == choices.QUANT_METHODS
    assert tuple(opts["attn_quantizer"].choices) == choices.ATTN_QUANTIZERS


def test_model_kwargs_parse_without_timm():
    from eamvit.cli.options import parse_model_kwargs
    from eamvit.cli.main import build_parser

    args = build_parser().parse_args(["eval", "--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=16",
                                      "num_classes=10", "global_pool=avg"])
    assert parse_model_kwargs(args.model_kwargs) == {"img_size": 16, "num_classes": 10, "global_pool": "avg"}


def test_every_command_help_says_what_the_command_does():
    from eamvit.cli.main import build_parser

    parser = build_parser()
    listed = " ".join(parser.format_help().split())
    for name, sub in _subparsers(parser).items():
        assert sub.description and " ".join(sub.description.split()) in listed, name
        assert " ".join(sub.description.split()) in " ".join(sub.format_help().split())


def test_help_shows_the_defaults_the_configs_apply():
    """Options that default to "not given" name in their help the value the config then uses."""
    import inspect
    import re

    from eamvit.cli.main import build_parser
    from eamvit.methods.adfq import ADFQConfig
    from eamvit.methods.calibrate import compute_entropy_maps
    from eamvit.methods.finetune import FinetuneConfig
    from eamvit.methods.freeze import FreezeConfig
    from eamvit.methods.merge import MergeConfig
    from eamvit.methods.prune import PruneConfig
    from eamvit.methods.quantize import default_bits
    from eamvit.methods.repq import RepQConfig

    prune, freeze, merge, repq, adfq = PruneConfig(), FreezeConfig(), MergeConfig(), RepQConfig(), ADFQConfig()
    want = {"eval": {"keep_rate": prune.keep_rate, "alpha": prune.alpha, "placement": prune.placement,
                     "entropy_keys": prune.keys, "tau": freeze.tau, "selection": freeze.selection,
                     "granularity": freeze.granularity, "aggregate": freeze.aggregate,
                     "value_quantizer": freeze.value_quantizer, "merge_r": merge.r, "merge_inflect": merge.inflect,
                     "w_bits": default_bits(), "a_bits": default_bits(), "quant_calib_size": repq.calib_size,
                     "attn_quantizer": repq.attn_quantizer, "adfq_iterations": adfq.iterations,
                     "adfq_calib_size": adfq.calib_size, "adfq_alpha_fc1": adfq.alpha_fc1,
                     "bits": inspect.signature(compute_entropy_maps).parameters["bits"].default},
            "export": {"w_bits": default_bits(exported=True), "a_bits": default_bits(exported=True)},
            "finetune": {"keep_warmup_epochs": FinetuneConfig.keep_warmup_epochs,
                         "keep_decay_epochs": FinetuneConfig.keep_decay_epochs}}
    subs = _subparsers(build_parser())
    for command, defaults in want.items():
        actions = {a.dest: a for a in subs[command]._actions}
        text = " ".join(subs[command].format_help().split())
        for dest, value in defaults.items():
            action = actions[dest]
            assert action.default is None, (command, dest)  # "not given" until the config fills it in
            shown = re.search(r"\(default:? ([\w.]+)", " ".join(action.help.split()))
            assert shown, (command, dest, action.help)
            same = shown[1] == str(value) or (isinstance(value, (int, float)) and float(shown[1]) == value)
            assert same, (command, dest, shown[1], value)
            assert shown[0] in text, (command, dest)  # and the formatted help prints it
