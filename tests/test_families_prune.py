"""Token pruning in the flat-token families beyond ViT (EVA02, BEiT, CaiT, ConViT), held against timm.

The tiny seeded configs are test_families.py's. Every reference is timm's own unmodified model (or
timm's own blocks run by hand on the kept tokens); no expected value comes from eamvit.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from timm.layers.pos_embed_sincos import apply_keep_indices_nlc, apply_rot_embed_cat

from eamvit.errors import EamError
from conftest import tokens_out
from eamvit.methods.prune import PruneConfig, kept_indices, prune_, unprune_
from eamvit.modules.attention import PRUNE_CLASSES
from eamvit.ops.positions import gather_rope
from test_families import _pair
from eamvit.methods.state import state_of

# family: (methods it supports, its first default pruning block, prefix tokens inside its blocks)
PRUNED = {"eva02": (("shannon", "renyi", "evit", "random"), 0, 1),
          "beit": (("shannon", "renyi", "evit", "random"), 0, 1),
          "cait": (("shannon", "renyi", "random"), 0, 0),
          "convit": (("shannon", "renyi", "evit", "random"), 1, 1)}


def _cases():
    return [(f, m) for f, (methods, _, _) in PRUNED.items() for m in methods]


@pytest.mark.parametrize("family,method", _cases())
def test_keep_rate_one_is_timm_and_unprune_restores_timm_classes(family, method):
    reference, model, x = _pair(family)
    with torch.no_grad():
        want = reference(x)
        prune_(model, PruneConfig(method=method, keep_rate=1.0))
        assert torch.equal(model(x), want)
    assert any(type(b) in PRUNE_CLASSES for b in model.blocks)
    unprune_(model)
    assert [type(b) for b in model.blocks] == [type(b) for b in reference.blocks]


@pytest.mark.parametrize("family,method", [c for c in _cases() if c[1] in ("shannon", "evit")])
@pytest.mark.parametrize("keep_rate", [0.5, 0.7])
def test_tokens_per_stage_follow_ceil_keep_rate(family, method, keep_rate):
    reference, model, x = _pair(family)
    first, prefix = PRUNED[family][1], PRUNED[family][2]
    before = tokens_out(reference, x)
    prune_(model, PruneConfig(method=method, keep_rate=keep_rate, blocks=[first]))
    after = tokens_out(model, x)
    n = before[first] - prefix  # patch tokens at the pruning block
    kept = math.ceil(keep_rate * n) + (1 if method == "evit" else 0)
    assert after[:first] == before[:first]
    assert after[first:] == [prefix + kept] * (len(before) - first)


class _Softmaxes(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.out = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") == "softmax":
            self.out.append(out)
        return out


def _timm_attention(reference, block, x):
    """timm's own post-softmax map at ``block``: its attention rerun, unfused, on the inputs it received."""
    attn = reference.blocks[block].attn
    got = {}
    hook = attn.register_forward_hook(lambda m, a, kw, out: got.update(args=a, kwargs=kw), with_kwargs=True)
    with torch.no_grad():
        reference(x)
    hook.remove()
    attn.fused_attn = False
    mode = _Softmaxes()
    with torch.no_grad(), mode:
        attn(*got["args"], **got["kwargs"])
    assert len(mode.out) == 1
    return mode.out[0].double()


@pytest.mark.parametrize("family,method", [c for c in _cases() if c[1] != "random"])
def test_kept_tokens_are_brute_force_top_k_of_timm_attention(family, method):
    reference, model, x = _pair(family)
    first, prefix = PRUNED[family][1], PRUNED[family][2]
    a = _timm_attention(reference, first, x)  # (B, H, N, N)
    p = a[:, :, prefix:, :]
    if method == "evit":
        scores, best = a[:, :, 0, prefix:].mean(1), True
    elif method == "shannon":
        scores, best = (-(p * p.clamp_min(1e-300).log()).sum(-1)).mean(1), False
    else:  # Rényi order 2
        scores, best = (-(p ** 2).sum(-1).log()).mean(1), False
    n = scores.shape[1]
    k = math.ceil(0.5 * n)
    prune_(model, PruneConfig(method=method, keep_rate=0.5, blocks=[first], alpha=2.0))
    with torch.no_grad():
        model(x)
    got = kept_indices(model)[0]
    for i in range(x.shape[0]):
        order = sorted(range(n), key=lambda j: -scores[i, j].item() if best else scores[i, j].item())
        margin = abs(scores[i, order[k - 1]] - scores[i, order[k]]).item()
        assert margin > 1e-9  # no near-tie at the cut, so the comparison is meaningful
        assert set(got[i][got[i] >= 0].tolist()) == set(order[:k])


def test_eva02_later_blocks_see_the_kept_tokens_rope():
    """Pruning after block 0, unfused: the rest equals timm's blocks on the kept tokens, with the RoPE
    gathered by timm's own patch-dropout helper."""
    reference, model, x = _pair("eva02")
    prune_(model, PruneConfig(method="shannon", keep_rate=0.5, blocks=[0], placement="block"))
    with torch.no_grad():
        got = model(x)
        keep = kept_indices(model)[0]
        m = reference
        t, rope = m._pos_embed(m.patch_embed(x))
        t = m.blocks[0](m.norm_pre(t), rope=rope)
        t = torch.cat([t[:, :1], t[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))], dim=1)
        rope_kept = apply_keep_indices_nlc(t, rope, keep).unsqueeze(1)
        for blk in m.blocks[1:]:
            t = blk(t, rope=rope_kept)
        want = m.forward_head(m.norm(t))
    assert not torch.equal(rope_kept[0, 0], rope[: keep.shape[1]])  # the gathering matters here
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_token_gets_no_rotation():
    rope = torch.randn(4, 8)
    q = torch.randn(2, 3, 2, 4)
    emb = gather_rope(rope, torch.tensor([[0, 3, -1], [0, 1, -1]]), 1)  # class, one patch, the fused token
    rotated = apply_rot_embed_cat(q, emb)
    assert torch.equal(rotated[:, :, 1], q[:, :, 1])
    assert torch.equal(rotated[0, :, 0], apply_rot_embed_cat(q[0, :, :1], rope[2:3])[:, 0])


def test_beit_later_blocks_see_the_kept_tokens_relative_bias():
    """Pruning after block 0, unfused: block 1 equals timm's block whose relative-position index is
    restricted, by hand, to the class token and the kept patches (one image at a time)."""
    reference, model, x = _pair("beit")
    # timm initialises the tables to zero (and the shared config leaves them): give them values.
    for m in (reference, model):
        for i, blk in enumerate(m.blocks):
            table = blk.attn.relative_position_bias_table
            table.data.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(i)))
    prune_(model, PruneConfig(method="shannon", keep_rate=0.5, blocks=[0], placement="block"))
    with torch.no_grad():
        got = model(x)
        keep = kept_indices(model)[0]
        m = reference
        t = m.pos_drop(m.patch_embed(x))
        t = m.blocks[0](torch.cat([m.cls_token.expand(x.shape[0], -1, -1), t], dim=1))
        for i in range(x.shape[0]):
            tokens = torch.cat([torch.zeros(1, dtype=torch.long), keep[i] + 1])
            blk = copy.deepcopy(m.blocks[1])
            n = blk.attn.window_size[0] * blk.attn.window_size[1] + 1
            index = blk.attn.relative_position_index.view(n, n)[tokens][:, tokens]
            blk.attn.relative_position_index = index.reshape(-1).contiguous()
            blk.attn.window_size = (1, tokens.numel() - 1)
            ti = blk(t[i:i + 1, tokens])
            want = m.forward_head(m.norm(ti))
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-5)


def test_refusals_are_one_line():
    _, xcit, _ = _pair("xcit")
    with pytest.raises(EamError, match="does not apply to XCiT") as e:
        prune_(xcit, PruneConfig())
    _, cait, _ = _pair("cait")
    with pytest.raises(EamError, match="class token") as e2:
        prune_(cait, PruneConfig(method="evit"))
    with pytest.raises(EamError, match="class token"):
        prune_(cait, PruneConfig(method="shannon", fuse=True))
    _, convit, _ = _pair("convit")
    with pytest.raises(EamError, match="block 0 of this ConViT model cannot prune: its GPSA") as e3:
        prune_(convit, PruneConfig(blocks=[0]))
    _, swinv2, _ = _pair("swinv2")
    with pytest.raises(EamError, match="token pruning does not support Swin v2.*`eamvit models`") as e4:
        prune_(swinv2, PruneConfig())
    for err in (e, e2, e3, e4):
        assert "\n" not in str(err.value)
    for m in (xcit, cait, convit, swinv2):
        assert state_of(m).prune is None and not any(type(b) in PRUNE_CLASSES for b in m.modules())


def test_models_table_declares_pruning_for_the_flat_token_families(capsys):
    from eamvit.cli.main import main

    assert main(["models"]) == 0
    rows = {}
    lines = capsys.readouterr().out.strip().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head, cells))
    for family in ("EVA / EVA02", "BEiT", "CaiT", "ConViT"):
        assert rows[family]["token pruning"] == "yes"
    for family in ("XCiT", "Swin v1", "Swin v2", "Twins", "MViTv2", "LeViT", "Hiera"):
        assert rows[family]["token pruning"] == "no"
