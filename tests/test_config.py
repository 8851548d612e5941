"""The config base: versioned round trip, refusal of foreign or newer configs."""
from dataclasses import dataclass

import pytest

from eamvit.config import Config
from eamvit.errors import EamError


@dataclass
class Demo(Config):
    KIND = "demo"
    VERSION = 2
    bits: int = 4
    percentiles: tuple[float, ...] = (0.999, 0.9999)
    alpha: float = 2.0

    def validate(self):
        if self.bits < 1:
            raise EamError("bits must be positive")
        return self


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
