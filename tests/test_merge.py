"""Token merging (ToMe, entropy-guided), held against hand computations, an independent brute-force
ToMe written here with plain loops over tokens on timm's unmodified blocks, timm itself (r = 0) and
ONNX Runtime. No expected value comes from eamvit's own output.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from eamvit.methods.state import state_of

from eamvit.errors import EamError
from conftest import tokens_out
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


# ---------------------------------------------------------------------------------- the model, brute force

import copy  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402

from eamvit.methods.merge import MergeConfig, merge_, merge_state, unmerge_  # noqa: E402
from eamvit.modules.attention import MERGE_CLASSES  # noqa: E402


def _widen(model):
    """timm's initialisation gives nearly uniform random-weight attention; wider weights give maps and
    keys that differ from token to token (no near-ties in the matching)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "pos" not in name:
                p.normal_(0.0, 1.5 / math.sqrt(p[0].numel()))
    return model


def _vit(name="deit_tiny_patch16_224", depth=4, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    m = timm.create_model(name, img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=depth, num_heads=2,
                          **kw)
    return _widen(m).to(dtype).eval()


def _images(n=2, dtype=torch.float64, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _brute_attention(attn, x, sizes):
    """timm's Attention by hand for one image, with ``log size`` added to every query's score of each key."""
    N, C = x.shape
    H = attn.num_heads
    d = C // H
    qkv = attn.qkv(x).view(N, 3, H, d)
    out = torch.zeros(N, H, d, dtype=x.dtype)
    for h in range(H):
        q, k, v = qkv[:, 0, h], qkv[:, 1, h], qkv[:, 2, h]
        for i in range(N):
            s = torch.stack([(q[i] * k[j]).sum() * d ** -0.5 + math.log(sizes[j]) for j in range(N)])
            p = torch.exp(s - s.max())
            p = p / p.sum()
            out[i, h] = sum(p[j] * v[j] for j in range(N))
    return attn.proj(out.reshape(N, C)), qkv[:, 1]  # and the keys (N, H, d)


def _cos(a, b):
    a, b = a.detach(), b.detach()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _brute_tome_choice(keys, prefix, r):
    """ToMe's bipartite matching from its definition, token by token: (merged {a: b}, A tokens that stay)."""
    N = len(keys)
    feats = [keys[t].mean(0) for t in range(N)]  # the keys averaged over heads
    side_a = [t for t in range(N) if t % 2 == 0]
    side_b = [t for t in range(N) if t % 2 == 1 and t >= prefix]
    best = {}
    for a in side_a:
        if a < prefix:
            continue
        sims = [(_cos(feats[a], feats[b]), b) for b in side_b]
        best[a] = max(sims)
    ranked = sorted(best, key=lambda a: -best[a][0])
    return {a: best[a][1] for a in ranked[:r]}


def _brute_entropy_choice(attn_rows, keys, prefix, r):
    """Entropy-guided merging from its definition: the r highest-entropy patch tokens join their most
    similar remaining patch token."""
    N = len(keys)
    feats = [keys[t].mean(0) for t in range(N)]
    entropy = {t: sum(-sum(p * math.log(p) for p in row[t].tolist() if p > 0) for row in attn_rows) / len(attn_rows)
               for t in range(prefix, N)}
    ranked = sorted(entropy, key=lambda t: -entropy[t])
    gone, stay = ranked[:r], sorted(ranked[r:])
    return {t: max(stay, key=lambda s: _cos(feats[t], feats[s])) for t in gone}


def _brute_merge(model, x, rs, prefix, selection="tome"):
    """Run timm's unmodified blocks one image at a time, merging by hand between attention and MLP.

    Returns the logits, per merging block the kept input patch tokens in output order, and the final sizes.
    """
    logits, kept_all, sizes_all = [], [], []
    for img in x:
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(img[None]))))[0]
        sizes = [1.0] * t.shape[0]
        kept_img = []
        for blk, r in zip(model.blocks, rs):
            h = blk.norm1(t)
            y, keys = _brute_attention(blk.attn, h, sizes)
            t = t + blk.ls1(y)
            N = t.shape[0]
            r = min(r, (N - prefix) // 2 if selection == "tome" else N - prefix - 1)
            if r > 0:
                if selection == "tome":
                    into = _brute_tome_choice(keys, prefix, r)
                    order = [a for a in range(N) if a % 2 == 0 and a not in into] + \
                            [b for b in range(N) if b % 2 == 1]
                    order = [u for u in order if u < prefix] + [u for u in order if u >= prefix]
                else:
                    into = _brute_entropy_choice(_attention_rows(blk.attn, h, sizes), keys, prefix, r)
                    order = [u for u in range(N) if u not in into]
                groups = {u: [u] for u in order}
                for a, b in into.items():
                    groups[b].append(a)
                t = torch.stack([sum(t[u] * sizes[u] for u in groups[o]) / sum(sizes[u] for u in groups[o])
                                 for o in order])
                sizes = [sum(sizes[u] for u in groups[o]) for o in order]
                kept_img.append([o - prefix for o in order[prefix:]])
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        logits.append(model.forward_head(model.norm(t[None]))[0])
        kept_all.append(kept_img)
        sizes_all.append(sizes)
    return torch.stack(logits), kept_all, sizes_all


def _attention_rows(attn, x, sizes):
    """Per head, the post-softmax rows (N, N) of timm's attention with the size bias, by hand."""
    N, C = x.shape
    H, d = attn.num_heads, C // attn.num_heads
    qkv = attn.qkv(x).view(N, 3, H, d)
    rows = []
    for h in range(H):
        s = (qkv[:, 0, h] @ qkv[:, 1, h].T) * d ** -0.5 + torch.tensor([math.log(z) for z in sizes], dtype=x.dtype)
        rows.append(torch.softmax(s, -1))
    return rows


@pytest.mark.parametrize("name,prefix,schedule", [
    ("deit_tiny_patch16_224", 1, dict(r=3)),
    ("deit_tiny_patch16_224", 1, dict(r=3, inflect=-1.0)),
    ("deit_tiny_distilled_patch16_224", 2, dict(r=(5, 0, 2, 9))),
])
def test_tome_equals_brute_force_on_timm_blocks(name, prefix, schedule):
    reference = _vit(name)
    model = copy.deepcopy(reference)
    x = _images()
    report = merge_(model, MergeConfig(**schedule))
    with torch.no_grad():
        got = model(x)
        want, kept, sizes = _brute_merge(reference, x, report.r, prefix)
    st = merge_state(model)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    merged_at = [s for s, r in enumerate(report.r) if r]
    for i in range(x.shape[0]):
        assert [st.kept[s][i].tolist() for s in merged_at] == kept[i]
        assert st.size[i].tolist() == sizes[i]
    assert st.tokens[-1] == report.tokens[-1] == len(sizes[0])
    assert (st.size[:, :prefix] == 1).all()  # the class (and distillation) token was never merged
    assert not torch.allclose(got, reference(x), atol=1e-3)  # merging mattered


def test_gradients_through_merging_equal_brute_force():
    """Fine-tuning a merged model: the weights' gradients are the brute force's (the matching itself is
    not differentiated, as in ToMe; the size-weighted means are)."""
    reference = _vit()
    model = copy.deepcopy(reference)
    x = _images()
    report = merge_(model.train(), MergeConfig(r=3))
    model(x).square().sum().backward()
    _brute_merge(reference.train(), x, report.r, 1)[0].square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_entropy_merging_equals_brute_force():
    reference = _vit()
    model = copy.deepcopy(reference)
    x = _images()
    report = merge_(model, MergeConfig(r=4, selection="entropy"))
    with torch.no_grad():
        got = model(x)
        want, kept, sizes = _brute_merge(reference, x, report.r, 1, selection="entropy")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    st = merge_state(model)
    for i in range(x.shape[0]):
        assert [k[i].tolist() for k in st.kept] == kept[i] and st.size[i].tolist() == sizes[i]


@pytest.mark.parametrize("selection", ["tome", "entropy"])
def test_r_zero_is_timm_exactly_and_unmerge_restores_timm(selection):
    reference = _vit(dtype=torch.float32)
    model = copy.deepcopy(reference)
    x = _images(dtype=torch.float32)
    with torch.no_grad():
        want = reference(x)
        merge_(model, MergeConfig(r=0, selection=selection))
        assert all(type(b) in MERGE_CLASSES for b in model.blocks)
        assert torch.equal(model(x), want)
        merge_(model, MergeConfig(r=2, selection=selection))
        assert not torch.equal(model(x), want)
    unmerge_(model)
    assert state_of(model).merge is None and [type(b) for b in model.blocks] == [type(b) for b in reference.blocks]
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_proportional_attention_off_merges_without_the_bias():
    reference = _vit()
    model = copy.deepcopy(reference)
    merge_(model, MergeConfig(r=3, prop_attn=False))
    x = _images()
    with torch.no_grad():
        got = model(x)
    merge_(model, MergeConfig(r=3))
    with torch.no_grad():
        assert not torch.allclose(got, model(x), atol=1e-6)


# ---------------------------------------------------------------------------------------------- families

from torch.overrides import TorchFunctionMode  # noqa: E402

from timm.layers.pos_embed_sincos import apply_keep_indices_nlc  # noqa: E402

from test_families import FAMILIES, _pair  # noqa: E402

# family: (its first block that can merge, prefix tokens inside its blocks)
MERGING = {"eva02": (0, 1), "beit": (0, 1), "cait": (0, 0), "convit": (1, 1)}
# ConViT with a block after its first MHSA block, so that a merge there reaches the class token.
TABLE = {**FAMILIES, "convit": (lambda: timm.create_model("convit_tiny", img_size=32, patch_size=8, depth=3,
                                                          local_up_to_layer=1, embed_dim=32, num_heads=2,
                                                          num_classes=5), 32, {"GPSA", "MHSA"})}


@pytest.mark.parametrize("family", sorted(MERGING))
@pytest.mark.parametrize("selection", ["tome", "entropy"])
def test_families_merge_where_they_prune(family, selection):
    reference, model, x = _pair(family, TABLE)
    first, prefix = MERGING[family]
    before = tokens_out(reference, x)
    with torch.no_grad():
        want = reference(x)
        merge_(model, MergeConfig(r=0, selection=selection))
        assert torch.equal(model(x), want)
    report = merge_(model, MergeConfig(r=3, selection=selection))
    assert report.blocks[0] == first
    expect, n = before[:first], before[first]
    for _ in range(len(before) - first):  # ToMe merges at most half the patch tokens; entropy leaves one
        n -= min(3, (n - prefix) // 2 if selection == "tome" else n - prefix - 1)
        expect.append(n)
    assert tokens_out(model, x) == expect and report.tokens == [before[first]] + expect[first:]
    with torch.no_grad():
        got = model(x)
    assert not torch.allclose(got, want, atol=1e-4)
    assert (merge_state(model).size[:, :prefix] == 1).all()
    unmerge_(model)
    assert not any(type(b) in MERGE_CLASSES for b in model.modules()) and state_of(model).merge is None
    with torch.no_grad():
        assert torch.equal(model(x), want)


class _Keys(TorchFunctionMode):
    """The key operand of the first matmul (timm computes q·kᵀ), as (B, H, N, d)."""

    def __init__(self):
        super().__init__()
        self.keys = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.keys is None and getattr(func, "__name__", "") in ("matmul", "__matmul__"):
            self.keys = args[1].transpose(-2, -1)
        return func(*args, **(kwargs or {}))


def test_eva02_merged_tokens_keep_their_destinations_rope():
    """ToMe at block 0 without proportional attention: block 1 is timm's own block on the merged tokens,
    with the RoPE of the tokens that stayed gathered by timm's patch-dropout helper."""
    reference, model, x = _pair("eva02")
    merge_(model, MergeConfig(r=4, blocks=(0,), prop_attn=False))
    with torch.no_grad():
        got = model(x)
        m = reference
        t, rope = m._pos_embed(m.patch_embed(x))
        t = m.norm_pre(t)
        blk = m.blocks[0]
        h = blk.norm1(t)
        blk.attn.fused_attn = False
        mode = _Keys()
        with mode:
            y = blk.attn(h, rope=rope)
        t = t + y
        merged, keep = [], []
        for i in range(x.shape[0]):
            into = _brute_tome_choice(mode.keys[i].transpose(0, 1), 1, 4)
            N = t.shape[1]
            order = [u for u in range(N) if u % 2 == 0 and u not in into] + [u for u in range(N) if u % 2 == 1]
            groups = {u: [u] for u in order}
            for a, b in into.items():
                groups[b].append(a)
            merged.append(torch.stack([t[i, groups[o]].mean(0) for o in order]))
            keep.append([o - 1 for o in order[1:]])
        t = torch.stack(merged)
        t = t + blk.mlp(blk.norm2(t))
        kept = torch.tensor(keep)
        for b in m.blocks[1:]:
            t = b(t, rope=apply_keep_indices_nlc(t, rope, kept).unsqueeze(1))
        want = m.forward_head(m.norm(t))
    assert merge_state(model).kept[0].tolist() == keep
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_refusals_are_one_line():
    for family, match in (("xcit", "token merging does not apply to XCiT"),
                          ("swinv2", "token merging does not support Swin v2.*`eamvit models`"),
                          ("twins", "token merging does not support Twins")):
        _, model, _ = _pair(family)
        with pytest.raises(EamError, match=match) as e:
            merge_(model, MergeConfig())
        assert "\n" not in str(e.value) and state_of(model).merge is None
    _, convit, _ = _pair("convit")
    with pytest.raises(EamError, match="block 0 of this ConViT model cannot merge: its GPSA"):
        merge_(convit, MergeConfig(blocks=(0,)))
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=2,
                             embed_dim=16, depths=(1, 1), num_heads=(1, 1), num_classes=3)
    with pytest.raises(EamError, match="token merging does not apply to Swin:"):
        merge_(swin, MergeConfig())
    vit = _vit(dtype=torch.float32)
    from eamvit.methods.prune import PruneConfig, prune_

    prune_(vit, PruneConfig(keep_rate=0.5))
    with pytest.raises(EamError, match="already has token pruning applied.*unprune_"):
        merge_(vit, MergeConfig())
    vit = _vit(dtype=torch.float32)
    merge_(vit, MergeConfig())
    with pytest.raises(EamError, match="already has token merging applied.*unmerge_"):
        prune_(vit, PruneConfig())


@pytest.mark.parametrize("cfg, match", [
    (dict(r=-1), "r -1 must be a whole number"),
    (dict(r=2.5), "field r must be an int or a tuple of ints"),
    (dict(r=(1, -2)), "tokens to merge -2"),
    (dict(r=()), "lists no tokens"),
    (dict(inflect=1.5), "inflect 1.5 is outside"),
    (dict(r=(1, 2), inflect=-1.0), "leave inflect at 0"),
    (dict(selection="bipartite"), "selection 'bipartite' is not one of tome, entropy"),
    (dict(alpha=2.0), "applies to selection='entropy' only"),
    (dict(selection="entropy", alpha=-1.0), "alpha=-1.0 must be ≥ 0"),
    (dict(r=(1, 2)), "r gives 2 values for 4 merging blocks"),
    (dict(blocks=(4,)), "merging block 4 is outside the model's 4 blocks"),
    (dict(blocks=(1, 1)), "repeat a block"),
    (dict(frozen_after="keep"), "frozen_after 'keep'"),
])
def test_bad_configs_are_one_line(cfg, match):
    model = _vit(dtype=torch.float32)
    with pytest.raises(EamError, match=match) as e:
        merge_(model, MergeConfig(**cfg))
    assert "\n" not in str(e.value) and state_of(model).merge is None


def test_config_round_trip_and_rebuild_from_the_config_alone():
    cfg = MergeConfig(r=[2, 1, 0, 3], selection="entropy", alpha=math.inf, blocks=[0, 1, 2, 3])
    assert cfg.r == (2, 1, 0, 3) and hash(cfg)
    d = cfg.to_dict()
    assert d["kind"] == "merge" and d["alpha"] == "inf" and d["r"] == [2, 1, 0, 3]
    back = MergeConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    with pytest.raises(Exception):
        cfg.r = 3  # frozen
    a, b = _vit(dtype=torch.float32), _vit(dtype=torch.float32)
    merge_(a, cfg)
    merge_(b, MergeConfig.from_dict(merge_state(a).config.to_dict()))
    x = _images(dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


# ---------------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("name,cfg", [
    ("deit_tiny_patch16_224", MergeConfig(r=3)),
    ("deit_tiny_distilled_patch16_224", MergeConfig(r=(4, 0, 2, 3))),
    ("deit_tiny_patch16_224", MergeConfig(r=2, selection="entropy", alpha=2.0)),
    ("deit_tiny_patch16_224", MergeConfig(r=3, selection="entropy")),  # Shannon: from q and k in the export
])
def test_merged_export_equals_pytorch_in_onnx_runtime(name, cfg, tmp_path):
    from eamvit.methods.export import export_onnx
    from eamvit.methods.export_runtime import onnx_session

    model = _vit(name, dtype=torch.float32)
    merge_(model, cfg)
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    x = _images(5, dtype=torch.float32)  # traced at batch 2: the batch axis stays dynamic
    with torch.no_grad():
        want = model(x)
    got = onnx_session(path, threads=1).run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    assert json.loads(__import__("onnx").load(str(path)).metadata_props[0].value)["merge"] == cfg.to_dict()


def test_merged_export_below_opset_16_is_refused(tmp_path):
    from eamvit.methods.export import ExportConfig, export_onnx

    model = _vit(dtype=torch.float32)
    merge_(model, MergeConfig(r=2))
    with pytest.raises(EamError, match="token merging needs opset 16.*--opset 16"):
        export_onnx(model, tmp_path / "m.onnx", ExportConfig(opset=15))
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------------------------------------- cost

def test_cost_account_counts_merged_tokens_and_the_matching_by_hand():
    from eamvit.methods.cost import cost_account

    model = _vit(dtype=torch.float32)  # 16 patches of 8×8×3, C = 32, 2 heads of 16, 4 blocks, 5 classes
    full = cost_account(model).total("executed")
    report = merge_(model, MergeConfig(r=3))
    acc = cost_account(model)
    C, d = 32, 16
    tokens = report.tokens  # 17, 14, 11, 8, 5
    assert tokens == [17, 14, 11, 8, 5]
    macs = 16 * C * 3 * 64 + C * 5  # patch embedding, head
    for n, m in zip(tokens, tokens[1:]):
        macs += n * C * 3 * C + 2 * n * n * C + n * C * C  # qkv, q·kᵀ and A·V over both heads, proj
        macs += (n + 1) // 2 * (n // 2) * d  # the bipartite similarities of the keys averaged over heads
        macs += m * C * 4 * C * 2  # the MLP on the merged tokens
    assert acc.total("executed") == macs
    assert acc.total("full") == full
    assert [r.executed for r in acc.rows if r.op == "match"] == [9 * 8 * d, 7 * 7 * d, 6 * 5 * d, 4 * 4 * d]


# ------------------------------------------------------------------------- the attention instrumentation

def _self_attention(family):
    """One plain self-attention (or class attention) module of a tiny model, as timm built it."""
    if family == "vit":
        return _vit(dtype=torch.float32).blocks[0].attn, 32, False
    if family == "convit":
        return _pair("convit", TABLE)[0].blocks[1].attn, 64, False
    ref = _pair("cait")[0]
    return (ref.blocks_token_only[0].attn, 32, True) if family == "cait_class" else (ref.blocks[0].attn, 32, False)


@pytest.mark.parametrize("family", ["vit", "cait", "cait_class", "convit"])
def test_size_bias_equals_attention_over_repeated_tokens(family):
    """Proportional attention's definition: a key of size s weighs as s copies of it. The biased layer on
    distinct tokens equals timm's own layer on the tokens repeated by their sizes (rows of the originals)."""
    from eamvit.modules.attention import bias_scores

    attn, C, class_only = _self_attention(family)
    x = torch.randn(1, 6, C, generator=torch.Generator().manual_seed(3))
    sizes = torch.tensor([1, 2, 1, 3, 1, 2])
    repeated = x.repeat_interleave(sizes, dim=1)
    firsts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
    with torch.no_grad():
        want = attn(repeated)
        want = want if class_only else want[:, firsts]
        with bias_scores(attn, {0: size_bias(sizes[None].float())}):
            got = attn(x)
        plain = attn(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3) and attn.eam.score_bias is None


def test_keys_stage_sees_timm_keys():
    from eamvit.modules.attention import observe

    attn, C, _ = _self_attention("vit")
    x = torch.randn(2, 5, C)
    seen = []
    with torch.no_grad(), observe(attn, {0: lambda k, mask: seen.append(k)}, stage="keys"):
        attn(x)
    want = attn.qkv(x).view(2, 5, 3, 2, 16)[:, :, 1].transpose(1, 2)  # (B, H, N, d)
    torch.testing.assert_close(seen[0], want)
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=2,
                             embed_dim=16, depths=(1, 1), num_heads=(1, 1), num_classes=3)
    with pytest.raises(EamError, match="token merging does not apply to Swin"):
        with observe(swin, {0: lambda k, mask: None}, stage="keys"):
            pass


def test_frozen_maps_after_the_first_merging_block_are_dropped_or_refused():
    from eamvit.modules.attention import attention_layers, set_frozen

    model = _vit(dtype=torch.float32)
    layers = attention_layers(model)
    mask = torch.zeros(2, 17, 17, dtype=torch.bool)
    mask[:, 3, 4] = True
    for l in (0, 2):
        set_frozen(layers[l], mask, torch.full((2, 17, 17), 0.5))
    with pytest.raises(EamError, match=r"layers \[2\] have frozen EAM maps after the first merging block 0"):
        merge_(model, MergeConfig(r=2, frozen_after="refuse"))
    assert layers[2].eam_frozen_mask is not None and state_of(model).merge is None
    assert merge_(model, MergeConfig(r=0)).unfrozen_layers == []  # r = 0 changes no token: nothing dropped
    report = merge_(model, MergeConfig(r=2))
    assert report.unfrozen_layers == [2]
    assert layers[0].eam_frozen_mask is not None and layers[2].eam_frozen_mask is None
    with torch.no_grad():
        model(_images(dtype=torch.float32))  # block 0 still sees all 17 tokens: its frozen map applies
