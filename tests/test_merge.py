"""Token merging (ToMe, entropy-guided), held against hand computations, an independent brute-force
ToMe written here with plain loops over tokens on timm's unmodified blocks, timm itself (r = 0) and
ONNX Runtime. No expected value comes from eamvit's own output.
"""
from __future__ import annotations

import math

import pytest
import torch

from eamvit.errors import EamError
from eamvit.ops.merge import (bipartite_plan, entropy_plan, merge_count, merge_schedule, merge_tokens, size_bias,
                              token_counts)


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64).unsqueeze(0)


# ---------------------------------------------------------------------------------------------- ops, by hand

# One class token, then patches p0..p3. Alternation: A = (cls, p1, p3), B = (p0, p2).
# Unit features: p0 = (1, 0), p2 = (0, 1); p1 = (3, 4)/5 → cos 0.6 to p0, 0.8 to p2; p3 = (2, 0) → cos 1 to p0.
FEATURES_1 = _t([[1, 0], [1, 0], [3, 4], [0, 1], [2, 0]])
VALUES_1 = _t([[10], [1], [2], [3], [5]])


def test_bipartite_one_step_by_hand():
    plan = bipartite_plan(FEATURES_1, 1, num_prefix=1)
    # p3's match (cos 1) beats p1's (0.8): p3 joins p0. Output: cls, p1 (unmerged A), p0 (+p3), p2.
    assert plan.keep.tolist() == [[1, 0, 2]] and plan.src.tolist() == [[3]] and plan.dst.tolist() == [[1]]
    x, size = merge_tokens(VALUES_1, None, plan, num_prefix=1)
    assert x.flatten().tolist() == [10, 2, (1 + 5) / 2, 3]
    assert size.flatten().tolist() == [1, 1, 2, 1]
    # With sizes already there (p3 stands for 3 tokens): (1·1 + 5·3) / 4.
    x, size = merge_tokens(VALUES_1, _t([1, 1, 1, 1, 3]), plan, num_prefix=1)
    assert x.flatten().tolist() == [10, 2, 4, 3] and size.flatten().tolist() == [1, 1, 4, 1]


def test_bipartite_two_steps_and_the_cap_by_hand():
    plan = bipartite_plan(FEATURES_1, 2, num_prefix=1)
    # Then p1 (0.8) joins p2. No A patch token stays: cls, p0 (+p3), p2 (+p1).
    assert plan.keep.tolist() == [[0, 2]] and plan.src.tolist() == [[3, 1]] and plan.dst.tolist() == [[0, 1]]
    x, size = merge_tokens(VALUES_1, None, plan, num_prefix=1)
    assert x.flatten().tolist() == [10, 3, 2.5] and size.flatten().tolist() == [1, 2, 2]
    assert merge_count(5, 1, 3) == 2 and merge_count(5, 1, 3, "entropy") == 3 and merge_count(5, 1, -1) == 0
    with pytest.raises(EamError, match="at most half"):
        bipartite_plan(FEATURES_1, 3, num_prefix=1)


def test_class_and_distillation_tokens_are_neither_merged_nor_merged_into():
    # cls, dist, p0..p3: A = (cls, p0, p2), B = (dist, p1, p3). dist equals p0 exactly (cos 1) but is
    # protected; p0's best is then p3 (cos 1/√1.04), p2's is p1 (cos 1), so p2 joins p1.
    feats = _t([[0, 1], [1, 0], [1, 0], [0, 1], [0, 1], [1, 0.2]])
    plan = bipartite_plan(feats, 1, num_prefix=2)
    assert plan.keep.tolist() == [[0, 1, 3]] and plan.src.tolist() == [[2]] and plan.dst.tolist() == [[1]]
    x, size = merge_tokens(_t([[10], [20], [1], [2], [4], [8]]), None, plan, num_prefix=2)
    assert x.flatten().tolist() == [10, 20, 1, 3, 8] and size.flatten().tolist() == [1, 1, 1, 2, 1]
    # Two steps: p0 joins p3 as well.
    plan = bipartite_plan(feats, 2, num_prefix=2)
    assert plan.keep.tolist() == [[1, 3]] and sorted(plan.src.tolist()[0]) == [0, 2]


def test_bipartite_without_prefix_tokens():
    # p0..p3: A = (p0, p2), B = (p1, p3); p2 = p3 exactly (cos 1) beats p0 → p1 (cos 0.8).
    feats = _t([[3, 4], [0, 1], [1, 0], [1, 0]])
    plan = bipartite_plan(feats, 1, num_prefix=0)
    assert plan.keep.tolist() == [[0, 1, 3]] and plan.src.tolist() == [[2]] and plan.dst.tolist() == [[2]]


def test_entropy_plan_by_hand():
    # cls, p0..p3; entropies 0.5, 2.0, 0.1, 1.5: p1 (highest) goes first, then p3.
    feats = _t([[5, 5], [1, 0], [0.9, 0.1], [0, 1], [0.1, 1]])
    scores = torch.tensor([[0.5, 2.0, 0.1, 1.5]])
    plan = entropy_plan(feats, scores, 1, num_prefix=1)
    # p1 = (0.9, 0.1) is closest to p0 among the kept p0, p2, p3.
    assert plan.keep.tolist() == [[0, 2, 3]] and plan.src.tolist() == [[1]] and plan.dst.tolist() == [[0]]
    plan = entropy_plan(feats, scores, 2, num_prefix=1)
    # p1 → p0, p3 = (0.1, 1) → p2; the class token (equally close to everything) is never a destination.
    assert plan.keep.tolist() == [[0, 2]] and plan.src.tolist() == [[1, 3]] and plan.dst.tolist() == [[0, 1]]
    x, size = merge_tokens(_t([[10], [1], [2], [3], [4]]), _t([1, 2, 1, 1, 1]), plan, num_prefix=1)
    assert x.flatten().tolist() == [10, (1 * 2 + 2 * 1) / 3, (3 + 4) / 2] and size.flatten().tolist() == [1, 3, 2]
    with pytest.raises(EamError, match="at least one must stay"):
        entropy_plan(feats, scores, 4, num_prefix=1)


def test_size_bias_is_proportional_attention():
    # One query, keys (a, b): b stands for 3 identical tokens. softmax(s + log size) equals the
    # attention over the 4 unmerged tokens with b's weight summed.
    s = torch.tensor([0.3, -0.2], dtype=torch.float64)
    size = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    bias = size_bias(size)
    assert bias.shape == (1, 1, 1, 2) and torch.allclose(bias.flatten(), torch.tensor([0.0, math.log(3)],
                                                                                      dtype=torch.float64))
    got = torch.softmax(s + bias.flatten(), -1)
    e = [math.exp(0.3), math.exp(-0.2)]
    assert torch.allclose(got, torch.tensor([e[0], 3 * e[1]], dtype=torch.float64) / (e[0] + 3 * e[1]))


def test_schedules_by_hand():
    assert merge_schedule(8, 0.0, 12) == [8] * 12
    # ToMe's decreasing schedule (r, −1): 2r down to 0 in a straight line, truncated.
    assert merge_schedule(8, -1.0, 12) == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    assert merge_schedule(4, 1.0, 3) == [0, 4, 8] and merge_schedule(5, -1.0, 1) == [10]
    # 197 tokens (1 + 196), r = 100 capped at ⌊196/2⌋ = 98, then ⌊98/2⌋ = 49.
    assert token_counts(197, 1, [100, 100, 0]) == [197, 99, 50, 50]
