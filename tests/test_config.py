"""The config base: versioned round trip, refusal of foreign or newer configs."""
from dataclasses import dataclass

import pytest

from eamvit.config import Config
from eamvit.errors import EamError


@dataclass(frozen=True)
class Demo(Config):
    KIND = "demo"
    VERSION = 2
    bits: int = 4
    percentiles: tuple[float, ...] = (0.999, 0.9999)
    alpha: float = 2.0

    def _check(self):
        if self.bits < 1:
            raise EamError("bits must be positive")


def test_round_trip_through_json_keeps_types():
    import json

    c = Demo(bits=3, percentiles=(0.5,), alpha=float("inf"))
    d = json.loads(c.to_json())
    assert d["kind"] == "demo" and d["version"] == 2 and d["alpha"] == "inf"
    back = Demo.from_dict(d)
    assert back == c and isinstance(back.percentiles, tuple)


@pytest.mark.parametrize("d, match", [
    ({"kind": "other"}, "expected a demo config"),
    ({"kind": "demo", "version": 3}, "newer"),
    ({"kind": "demo", "version": 2, "device": "cuda"}, "unknown field"),
    ({"kind": "demo", "version": 2, "bits": 0}, "bits must be positive"),
    ([1, 2], "JSON object"),
])
def test_bad_dicts_are_refused(d, match):
    with pytest.raises(EamError, match=match):
        Demo.from_dict(d)


# --------------------------------------------------------------------------- types checked at construction

import dataclasses
from typing import Literal, Optional


@dataclass(frozen=True)
class Typed(Config):
    KIND = "typed"
    count: int = 1
    rate: float = 0.5
    flag: bool = False
    name: str = "a"
    bits: Optional[int] = None
    mode: Literal["x", "y"] = "x"
    rates: tuple[float, ...] = ()
    pairs: tuple[tuple[int, int], ...] = ()


@pytest.mark.parametrize("kw, message", [
    (dict(count="4"), "typed config field count must be an int, not the string '4'"),
    (dict(count=True), "typed config field count must be an int, not the bool True"),
    (dict(count=2.0), "typed config field count must be an int, not the number 2.0"),
    (dict(rate=False), "typed config field rate must be a number, not the bool False"),
    (dict(rate="0.5"), "typed config field rate must be a number, not the string '0.5'"),
    (dict(flag=1), "typed config field flag must be true or false, not the int 1"),
    (dict(name=3), "typed config field name must be a string, not the int 3"),
    (dict(bits="4"), "typed config field bits must be an int, not the string '4'"),
    (dict(mode="z"), "typed config field mode must be one of x, y, not the string 'z'"),
    (dict(rates=(0.5, "a")), "typed config field rates must be a tuple of numbers, not the tuple (0.5, 'a')"),
    (dict(rates=0.5), "typed config field rates must be a tuple of numbers, not the number 0.5"),
    (dict(pairs=((1, 2, 3),)), "typed config field pairs must be a tuple of tuples (int, int), not the tuple ((1, 2, 3),)"),
])
def test_a_value_of_the_wrong_type_is_refused_with_one_line(kw, message):
    with pytest.raises(EamError) as e:
        Typed(**kw)
    assert str(e.value) == message


def test_what_the_annotations_allow_is_accepted():
    t = Typed(count=3, rate=2, bits=None, mode="y", rates=[1, 0.5], pairs=[[1, 2]])
    assert t.rate == 2 and type(t.rate) is int  # an int is a number; kept as given, so files do not change
    assert t.rates == (1, 0.5) and t.pairs == ((1, 2),)  # lists (JSON's tuples) become tuples
    assert Typed(bits=4).bits == 4


def test_configs_are_frozen_and_replace_checks_again():
    t = Typed()
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.count = 2
    assert dataclasses.replace(t, count=5).count == 5
    with pytest.raises(EamError, match="field count must be an int"):
        dataclasses.replace(t, count="5")
    with pytest.raises(EamError, match="bits must be positive"):
        dataclasses.replace(Demo(), bits=0)


def test_from_dict_checks_types_too():
    with pytest.raises(EamError, match="typed config field mode must be one of x, y, not the int 1"):
        Typed.from_dict({"kind": "typed", "mode": 1})


# --------------------------------------------------------------------------- every eamvit config

def _configs():
    """``(class, a field given a value of the wrong type, a field given a value out of range, that range's words)``."""
    from eamvit.experiments.compare import CompareConfig
    from eamvit.experiments.digits import DigitsConfig
    from eamvit.experiments.optimize import OptimizeConfig
    from eamvit.experiments.per_block_sweep import PerBlockSweepConfig
    from eamvit.experiments.quant_sweep import QuantSweepConfig
    from eamvit.experiments.runner import Timing
    from eamvit.methods.adfq import ADFQConfig
    from eamvit.methods.export import ExportConfig, Target
    from eamvit.methods.merge import MergeConfig
    from eamvit.methods.finetune import FinetuneConfig
    from eamvit.methods.freeze import FreezeConfig
    from eamvit.methods.pmq import PMQConfig
    from eamvit.methods.prune import PruneConfig
    from eamvit.methods.recipe import Recipe
    from eamvit.methods.repq import RepQConfig
    from eamvit.methods.train import TrainConfig

    return [
        (FreezeConfig, dict(value_bits="4"), "freeze config field value_bits must be an int, not the string '4'",
         dict(tau=1.5), r"outside \[0, 1\]"),
        (FreezeConfig, dict(scope="row"), "freeze config field scope must be one of head, layer, global",
         dict(value_bits=17), "outside 1..16"),
        (PruneConfig, dict(keep_rate="0.7"),
         "prune config field keep_rate must be a number or a tuple of numbers, not the string '0.7'",
         dict(keep_rate=0.0), r"outside \(0, 1\]"),
        (PruneConfig, dict(blocks=(3, "6")), "prune config field blocks must be a tuple of ints",
         dict(alpha=-1.0), "must be ≥ 0"),
        (RepQConfig, dict(w_bits=4.0), "repq config field w_bits must be an int, not the number 4.0",
         dict(w_bits=9), "out of range"),
        (RepQConfig, dict(attn_quantizer="log3"), "repq config field attn_quantizer must be one of logsqrt2, log2, uniform",
         dict(calib_size=0), "positive number of images"),
        (ADFQConfig, dict(poq="yes"), "adfq config field poq must be true or false, not the string 'yes'",
         dict(warmup=1.0), r"fraction in \[0, 1\)"),
        (PMQConfig, dict(mixed=1), "pmq config field mixed must be true or false, not the int 1",
         dict(bit_choices=()), "bit_choices is empty"),
        (PMQConfig, dict(metric="grad"), "pmq config field metric must be one of fisher, hessian",
         dict(size_budget_mb=0.0), "positive size in MB"),
        (ExportConfig, dict(opset="17"), "export config field opset must be an int, not the string '17'",
         dict(block_size=48), "power of two"),
        (MergeConfig, dict(r=2.5), "merge config field r must be an int or a tuple of ints",
         dict(inflect=1.5), "outside \\[-1, 1\\]"),
        (Target, dict(form="onnx"), "target config field form must be one of torch, qdq, openvino, weight-only",
         dict(form="torch", symmetric_activations=True), "setting of an ONNX target"),
        (TrainConfig, dict(epochs=True), "train config field epochs must be an int, not the bool True",
         dict(label_smoothing=1.0), "below 1"),
        (FinetuneConfig, dict(keep_decay_epochs="2"), "finetune config field keep_decay_epochs must be a number",
         dict(keep_warmup_epochs=-1.0), "must be ≥ 0"),
        (DigitsConfig, dict(lr=None), "digits-train config field lr must be a number, not None",
         dict(batch_size=0), "at least 1"),
        (Recipe, dict(steps=({"kind": "freeze"},)), "recipe config field steps must be a tuple of Config objects",
         dict(steps=(PruneConfig(), FreezeConfig())), "quant → freeze → prune"),
        (Recipe, dict(steps=FreezeConfig()), "recipe config field steps must be a tuple of Config objects, not a freeze",
         dict(steps=(FreezeConfig(), FreezeConfig())), "each at most once"),
        (CompareConfig, dict(methods=("fp", "int8")), "compare config field methods must be a tuple of values among fp",
         dict(methods=()), "non-empty"),
        (CompareConfig, dict(repq=ADFQConfig()), "compare config field repq must be a RepQConfig, not an adfq config",
         dict(settings=((9, 4),)), "out of range"),
        (QuantSweepConfig, dict(maps=("int8",)), "quant-sweep config field maps must be a tuple of values among fp, quant",
         dict(taus=(1.5,)), r"outside \[0, 1\]"),
        (OptimizeConfig, dict(runtime="tensorrt"), "optimize config field runtime must be one of onnxruntime, openvino, torch",
         dict(reps=2), "at least 3"),
        (Timing, dict(reps=3.5), "timing config field reps must be an int, not the number 3.5",
         dict(warmup=-1), "warmup ≥ 0"),
        (PerBlockSweepConfig, dict(keep_rates=0.5), "per-block-sweep config field keep_rates must be a tuple of numbers",
         dict(prune=PruneConfig(keep_rate=(0.5, 0.7))), "one keep rate and one Rényi order"),
    ]


@pytest.mark.parametrize("case", range(23))  # every case of _configs()
def test_every_config_refuses_a_wrong_type_and_a_bad_value_when_built(case):
    cls, wrong, wrong_message, bad, bad_match = _configs()[case]
    cls()  # the defaults are valid
    with pytest.raises(EamError) as e:
        cls(**wrong)
    assert str(e.value).startswith(wrong_message) and "\n" not in str(e.value)
    with pytest.raises(EamError, match=bad_match):
        cls(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cls(), dataclasses.fields(cls)[0].name, None)


def test_the_case_list_covers_every_config():
    import eamvit.experiments.compare, eamvit.experiments.digits, eamvit.experiments.optimize  # noqa: F401
    import eamvit.experiments.quant_sweep, eamvit.methods.finetune, eamvit.methods.export  # noqa: F401
    import eamvit.methods.recipe, eamvit.experiments.per_block_sweep  # noqa: F401

    def subclasses(c):
        return {c} | {s for d in c.__subclasses__() for s in subclasses(d)}

    ours = {c for c in subclasses(Config) if c.__module__.startswith("eamvit.")} - {Config}
    assert ours == {c[0] for c in _configs()}
