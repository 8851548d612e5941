"""The one timer: call order, repetitions and statistics, checked by hand."""
import pytest

from eamvit.errors import EamError
from eamvit.experiments.timer import Stats, ratio_stats, time_calls


def test_calls_rotate_and_warm_up():
    order = []
    calls = [lambda: order.append("a"), lambda: order.append("b"), lambda: order.append("c")]
    times = time_calls(calls, warmup=1, reps=3)
    # one warm-up round in order, then each repetition starts one call later
    assert order == list("abc") + list("abc") + list("bca") + list("cab")
    assert [len(t) for t in times] == [3, 3, 3] and all(s >= 0 for t in times for s in t)


def test_stats_by_hand():
    s = Stats.of([4.0, 1.0, 3.0, 2.0, 5.0])
    # inclusive quartiles of 1..5: positions 1 + 0.25·4 = 2 and 1 + 0.75·4 = 4
    assert (s.median, s.p25, s.p75, s.min, s.max, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert s.spread == pytest.approx(4.0 / 3.0)
    one = Stats.of([2.5])
    assert (one.median, one.p25, one.p75, one.spread) == (2.5, 2.5, 2.5, 0.0)


def test_ratios_are_per_repetition():
    # medians 2 and 2 would say 1.0; the paired ratios say the second call is twice as fast each time
    r = ratio_stats([1.0, 2.0, 4.0], [0.5, 1.0, 2.0])
    assert r.median == 2.0 and r.min == r.max == 2.0


def test_bad_timing_is_refused():
    with pytest.raises(EamError):
        time_calls([], reps=3)
    with pytest.raises(EamError):
        ratio_stats([1.0], [1.0, 2.0])
