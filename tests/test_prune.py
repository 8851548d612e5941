"""Token pruning: entropy scores, token counts, exactness at κ = 1, index tracing, EViT fusion, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from eamvit.methods.state import state_of

import eamvit
import eamvit.modules.attention
from eamvit.modules.attention import layer_shapes
from eamvit.errors import EamError
from eamvit.methods.cost import count_gflops
from eamvit.methods.prune import (PruneConfig, kept_indices, kept_masks, parse_methods, prune_,
                                  prune_state, set_keep_rate, token_entropies, unprune_)
from eamvit.modules.prune_block import PruneBlock
from eamvit.ops.scores import (attention_entropy, class_attention, default_blocks, entropy_from_qk, evit_scores,
                               fuse_dropped, kept_count, prune_tokens, row_entropy, take_rows, token_counts,
                               trace_indices)

TINY = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=48, num_heads=3)  # 8x8 = 64 patches, 12 blocks
GRID14 = dict(img_size=56, patch_size=4, num_classes=10, embed_dim=48, num_heads=3)  # 14x14 = 196 patches




def tiny(name: str = "deit_tiny_patch16_224", **kw):
    torch.manual_seed(0)
    return eamvit.create_model(name, model_kwargs={**TINY, **kw})


def random_attention(B=2, H=3, N=7, zeros=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, H, N, N, generator=g, dtype=dtype) * 2
    if zeros:  # exact zeros must count as 0·log 0 = 0 and leave the support
        a[0, 0, 1, 2] = -math.inf
        a[1, 2, 3, :3] = -math.inf
    return a.softmax(-1)


def brute_entropy(attn: np.ndarray, alpha: float, P: int, keys: str) -> np.ndarray:
    B, H, N, _ = attn.shape
    out = np.zeros((B, N - P))
    for b in range(B):
        for i in range(P, N):
            hs = []
            for h in range(H):
                p = attn[b, h, i, :].copy()
                if keys == "patches":
                    p = p[P:] / p[P:].sum()
                nz = p[p > 0]
                if alpha == 1:
                    hs.append(-sum(x * math.log(x) for x in nz))
                elif alpha == 0:
                    hs.append(math.log(len(nz)))
                elif math.isinf(alpha):
                    hs.append(-math.log(max(nz)))
                else:
                    hs.append(math.log(sum(x ** alpha for x in nz)) / (1 - alpha))
            out[b, i - P] = sum(hs) / H
    return out


# ------------------------------------------------------------------------------------------------ scores

@pytest.mark.parametrize("keys", ["all", "patches"])
@pytest.mark.parametrize("P", [1, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0, 3.0, math.inf])
def test_entropy_matches_brute_force(alpha, P, keys):
    a = random_attention()
    got = attention_entropy(a, alpha, P, keys)
    ref = brute_entropy(a.numpy(), alpha, P, keys)
    assert got.shape == (2, 7 - P)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)


def test_renyi_limits():
    a = random_attention(zeros=False)
    shannon = attention_entropy(a, 1.0)
    for eps in (1e-4, -1e-4):
        torch.testing.assert_close(attention_entropy(a, 1.0 + eps), shannon, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(attention_entropy(a, 400.0), attention_entropy(a, math.inf), rtol=2e-2, atol=1e-2)
    # Rényi entropy does not increase with the order.
    orders = [0.0, 0.5, 1.0, 2.0, 3.0, 10.0, math.inf]
    hs = torch.stack([attention_entropy(a, o) for o in orders])
    assert (hs[1:] <= hs[:-1] + 1e-9).all()


def test_entropy_extremes_and_float32():
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    for alpha in (0.5, 1.0, 2.0, math.inf):
        h = row_entropy(p, alpha)
        torch.testing.assert_close(h, torch.tensor([0.0, math.log(4)]), atol=1e-6, rtol=0)
    a = random_attention(dtype=torch.float32)
    torch.testing.assert_close(attention_entropy(a, 2.0), attention_entropy(a.double(), 2.0).float(), rtol=1e-5,
                               atol=1e-5)


def test_evit_scores_are_cls_row_mean():
    a = random_attention()
    torch.testing.assert_close(evit_scores(a, 2), a[:, :, 0, 2:].mean(1))


@pytest.mark.parametrize("keys", ["all", "patches"])
@pytest.mark.parametrize("alpha", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("bias", [False, True])
def test_export_form_scores_from_queries_and_keys_equal_the_map_s(alpha, keys, bias):
    """The export form's scores (from q and k, the map never read) against the map's, brute force."""
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    b = torch.randn(2, 1, 1, 9, generator=g, dtype=torch.float64) if bias else None
    scale = 4 ** -0.5
    s = (q * scale) @ k.transpose(-2, -1)
    attn = (s if b is None else s + b).softmax(-1)
    got = entropy_from_qk(q, k, scale, alpha, 2, keys, bias=b)
    np.testing.assert_allclose(got.numpy(), brute_entropy(attn.numpy(), alpha, 2, keys), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(class_attention(q, k, scale)[:, :, 0], s.softmax(-1)[:, :, 0])


def test_row_take_and_elementwise_fusion_equal_gather_and_product():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 10, 5, generator=g), torch.rand(3, 10, generator=g)
    idx = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(3)])
    torch.testing.assert_close(take_rows(x, idx), torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, 5)), rtol=0,
                               atol=0)
    dropped = torch.ones(3, 10).scatter(1, idx, 0.0)
    want = torch.einsum("bn,bnc->bc", w * dropped, x).unsqueeze(1)
    for elementwise in (False, True):
        torch.testing.assert_close(fuse_dropped(x, w, idx, elementwise), want)


# ------------------------------------------------------------------------------------------------ counts

def test_token_counts_formula():
    assert token_counts(196, 0.7, 3) == [196, 138, 97, 68]
    assert token_counts(196, 0.7, 3, fuse=True) == [196, 139, 99, 71]
    assert token_counts(196, 1.0, 3, fuse=True) == [196] * 4
    assert kept_count(5, 0.01) == 1
    assert default_blocks(12) == (3, 6, 9)
    assert default_blocks(6) == (1, 3, 4)
    assert default_blocks(2) == (0, 1)


@pytest.mark.parametrize("method,counts", [("shannon", [196, 138, 97, 68]), ("renyi", [196, 138, 97, 68]),
                                           ("random", [196, 138, 97, 68]), ("evit", [196, 139, 99, 71])])
def test_tokens_per_stage_in_the_model(method, counts):
    torch.manual_seed(0)
    model = eamvit.create_model("deit_tiny_patch16_224", model_kwargs=GRID14)
    report = prune_(model, PruneConfig(method=method, keep_rate=0.7))
    assert report.blocks == [3, 6, 9] and report.tokens_per_stage == counts
    shapes = layer_shapes(model, torch.randn(2, 3, 56, 56))
    seen = [s[-1] - 1 for s in shapes]  # tokens each attention layer saw, class token excluded
    # Pruning sits after the attention of blocks 3, 6, 9: their attention still sees the previous count.
    assert seen == [counts[0]] * 4 + [counts[1]] * 3 + [counts[2]] * 3 + [counts[3]] * 2
    assert [k.shape[1] for k in kept_indices(model)] == counts[1:]


def test_placement_block_prunes_after_the_mlp():
    model = tiny()
    prune_(model, PruneConfig(keep_rate=0.5, placement="block", blocks=[3]))
    shapes = layer_shapes(model, torch.randn(1, 3, 32, 32))
    assert [s[-1] for s in shapes] == [65] * 4 + [33] * 8


# ------------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("method", ["shannon", "renyi", "evit", "random"])
def test_keep_rate_one_is_exactly_the_original(method):
    model = tiny()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        prune_(model, PruneConfig(method=method, keep_rate=1.0))
        out = model(x)
    assert torch.equal(out, ref)
    assert all(type(model.blocks[b]) is PruneBlock for b in (3, 6, 9))
    unprune_(model)
    assert state_of(model).prune is None and all(type(b).__name__ == "Block" for b in model.blocks)


def test_pruning_changes_outputs_and_only_pruning_blocks_materialise_attention():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    prune_(model, PruneConfig(keep_rate=0.5))
    layers = eamvit.modules.attention.attention_layers(model)
    calls = []
    orig = type(layers[0])._eam_post_softmax

    def spy(self, attn, groups, mask):
        calls.append(self.eam.layer)
        return orig(self, attn, groups, mask)

    type(layers[0])._eam_post_softmax = spy
    try:
        with torch.no_grad():
            model(x)
    finally:
        type(layers[0])._eam_post_softmax = orig
    assert calls == [3, 6, 9]
    assert all(l.eam.observer is None for l in layers)  # the capture is removed after each call


def test_keep_rate_can_change_between_forwards():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        prune_(model, PruneConfig(keep_rate=0.5))
        a = model(x)
        set_keep_rate(model, 1.0)
        b = model(x)
    assert not torch.equal(a, ref) and torch.equal(b, ref)
    assert [k.shape[1] for k in kept_indices(model)] == [64, 64, 64]


# ------------------------------------------------------------------------------------------------ prefix tokens

def test_class_and_distillation_tokens_always_kept():
    x = torch.randn(1, 6, 4)
    attn = torch.zeros(1, 1, 6, 6)
    attn[0, 0, :2, 0] = 1.0  # class and distillation rows one-hot: entropy 0, the lowest of all
    for i, spread in enumerate([2, 1, 3, 4]):
        attn[0, 0, 2 + i, :spread] = 1.0 / spread
    out, keep, scores = prune_tokens(x, attn, "shannon", num_prefix=2, k=2)
    assert torch.equal(out[:, :2], x[:, :2])
    assert keep.tolist() == [[1, 0]]
    assert torch.equal(out[:, 2:], x[:, [3, 2]])
    assert scores.shape == (1, 4)

    model = tiny("deit_tiny_distilled_patch16_224")
    prune_(model, PruneConfig(keep_rate=0.3))
    assert prune_state(model).num_prefix == 2
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.shape[1] == 2 + token_counts(64, 0.3, 3)[-1]


def test_class_token_survives_in_the_model():
    model = tiny()
    prune_(model, PruneConfig(keep_rate=0.3, blocks=[0]))
    cls_in = []
    model.blocks[1].register_forward_pre_hook(lambda m, a: cls_in.append(a[0][:, 0].clone()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        unprune_(model)
        ref = model.blocks[0](model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x)))))
    torch.testing.assert_close(cls_in[0], ref[:, 0])  # the class token's value is untouched by pruning


# ------------------------------------------------------------------------------------------------ tracing

def test_index_tracing_on_hand_made_attention_maps():
    # Stage 0: 6 patches, entropies set by how many keys each row spreads over.
    spread0 = [3, 1, 5, 2, 6, 4]  # patch i attends uniformly to spread0[i] keys -> entropy log(spread)
    def attention_for(spread):
        n = len(spread)
        a = torch.zeros(1, 1, n + 1, n + 1)
        a[0, 0, 0, :] = 1.0 / (n + 1)
        for i, s in enumerate(spread):
            a[0, 0, i + 1, :s] = 1.0 / s
        return a

    x0 = torch.arange(7.0).view(1, 7, 1)
    _, keep0, _ = prune_tokens(x0, attention_for(spread0), "shannon", 1, kept_count(6, 0.5))
    assert keep0.tolist() == [[1, 3, 0]]  # lowest entropy first: spreads 1, 2, 3
    spread1 = [2, 1, 3]                    # stage-1 tokens are original patches 1, 3, 0
    _, keep1, _ = prune_tokens(x0[:, :4], attention_for(spread1), "shannon", 1, kept_count(3, 0.5))
    assert keep1.tolist() == [[1, 0]]
    traced = trace_indices([keep0, keep1], 6, fuse=False)
    assert [t.tolist() for t in traced] == [[[1, 3, 0]], [[3, 1]]]
    fused = trace_indices([keep0, torch.tensor([[3, 0]])], 6, fuse=True)
    assert [t.tolist() for t in fused] == [[[1, 3, 0, -1]], [[-1, 1, -1]]]


def test_kept_indices_and_masks_in_the_model():
    model = tiny()
    prune_(model, PruneConfig(method="renyi", alpha=2.0, keep_rate=0.6, record_scores=True))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    idx = kept_indices(model)
    st = prune_state(model)
    assert torch.equal(idx[0], torch.topk(st.scores[0], idx[0].shape[1], largest=False).indices)
    for prev, cur in zip([torch.arange(64).expand(2, -1)] + idx[:-1], idx):
        for b in range(2):
            assert set(cur[b].tolist()) <= set(prev[b].tolist()) and len(set(cur[b].tolist())) == cur.shape[1]
    masks = kept_masks(model)
    assert [m.shape for m in masks] == [(2, 8, 8)] * 3
    assert [int(m[0].sum()) for m in masks] == token_counts(64, 0.6, 3)[1:]


# ------------------------------------------------------------------------------------------------ EViT fusion

def test_evit_fusion_against_hand_computation():
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [1.0, -1.0]]])
    attn = torch.zeros(1, 2, 5, 5)
    attn[0, 0, 0] = torch.tensor([0.2, 0.1, 0.4, 0.2, 0.1])
    attn[0, 1, 0] = torch.tensor([0.0, 0.3, 0.2, 0.4, 0.1])
    # class-token attention to patches, mean of heads: [0.2, 0.3, 0.3, 0.1]
    out, keep, _ = prune_tokens(x, attn, "evit", 1, k=2, fuse=True)
    assert sorted(keep[0].tolist()) == [1, 2]
    expected_fused = 0.2 * x[0, 1] + 0.1 * x[0, 4]  # dropped patches 0 and 3, not normalised
    torch.testing.assert_close(out[0, -1], expected_fused)
    assert torch.equal(out[0, 0], x[0, 0]) and out.shape == (1, 4, 2)
    no_fuse, _, _ = prune_tokens(x, attn, "evit", 1, k=2)
    assert no_fuse.shape == (1, 3, 2)


# ------------------------------------------------------------------------------------------------ freezing

def _maps(model):
    from eamvit.methods.calibrate import EntropyMaps
    from eamvit.methods.models import model_spec

    shapes = layer_shapes(model, torch.randn(1, 3, 32, 32))
    g = torch.Generator().manual_seed(0)
    return EntropyMaps(entropy=[torch.rand(s, generator=g) for s in shapes],
                       mean=[torch.full(s, 1.0 / s[-1]) for s in shapes], masked=[None] * len(shapes),
                       meta={"model": model_spec(model).to_dict()})


def test_frozen_maps_apply_only_before_the_first_pruning_block():
    from eamvit.methods.freeze import FreezeConfig, freeze_

    model = tiny()
    maps = _maps(model)
    freeze_(model, maps, FreezeConfig(tau=0.3))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert prune_(model, PruneConfig(keep_rate=1.0)).unfrozen_layers == []
        assert torch.equal(model(x), ref)  # κ = 1 keeps every frozen map and the exact outputs
    report = prune_(model, PruneConfig(keep_rate=0.5))
    assert report.unfrozen_layers == [4, 5, 6, 7, 8, 9, 10, 11]
    layers = eamvit.modules.attention.attention_layers(model)
    assert all(l.eam_frozen_mask is not None for l in layers[:4])
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    freeze_(model, maps, FreezeConfig(tau=0.3))  # re-freezing every layer after pruning
    with pytest.raises(EamError, match="frozen EAM maps"):
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
    with pytest.raises(EamError, match="frozen EAM maps"):
        prune_(model, PruneConfig(keep_rate=0.5, frozen_after="refuse"))


# ------------------------------------------------------------------------------------------------ cost, figures data

def test_gflops_drop_with_pruning():
    model = tiny()
    full = count_gflops(model)
    prune_(model, PruneConfig(keep_rate=0.5))
    assert count_gflops(model) < 0.8 * full
    assert count_gflops(model, macs=False) == pytest.approx(2 * count_gflops(model))


def test_token_entropies_shapes():
    model = tiny()
    ent = token_entropies(model, torch.randn(2, 3, 32, 32), alphas=(1.0, math.inf), layers=[0, 11])
    assert set(ent) == {1.0, math.inf} and [e.shape for e in ent[1.0]] == [(128,), (128,)]
    assert (ent[math.inf][0] <= ent[1.0][0] + 1e-6).all()


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("cfg,match", [
    (dict(keep_rate=0.0), r"keep rate 0.0 is outside \(0, 1\]"),
    (dict(keep_rate=1.5), "outside"),
    (dict(keep_rate=float("nan")), "outside"),
    (dict(method="renyi", alpha=-1.0), "alpha=-1.0 must be ≥ 0"),
    (dict(blocks=[3, 12]), "pruning block 12 is outside the model's 12 blocks"),
    (dict(blocks=[-1]), "outside"),
    (dict(blocks=[2, 2]), "repeat"),
    (dict(method="tome"), "prune config field method must be one of shannon, renyi, evit, random, not the string .tome."),
    (dict(placement="mlp"), "prune config field placement must be one of attn, block"),
])
def test_bad_config_is_one_clear_line(cfg, match):
    model = tiny()
    with pytest.raises(EamError, match=match) as e:
        prune_(model, PruneConfig(**cfg))
    assert "\n" not in str(e.value)
    assert state_of(model).prune is None


def test_swin_is_refused():
    model = eamvit.create_model("swin_tiny_patch4_window7_224", model_kwargs=dict(
        img_size=56, embed_dim=24, depths=(1, 1), num_heads=(1, 1), window_size=7, num_classes=10))
    with pytest.raises(EamError, match="token pruning does not apply to Swin:"):
        prune_(model, PruneConfig())


def test_not_pruned_and_bad_method_strings():
    model = tiny()
    with pytest.raises(EamError, match="not pruned"):
        kept_indices(model)
    with pytest.raises(EamError, match="needs an order"):
        parse_methods("shannon,renyi")
    with pytest.raises(EamError, match="Rényi order"):
        parse_methods("renyi:x")
    assert parse_methods("shannon, renyi:inf,evit") == [("shannon", None), ("renyi", math.inf), ("evit", None)]


def test_prune_config_round_trip():
    from eamvit.methods.finetune import FinetuneConfig

    cfg = PruneConfig(method="renyi", alpha=math.inf, blocks=(1, 5), fuse=True, keep_rate=0.5)
    d = cfg.to_dict()
    assert d["kind"] == "prune" and d["alpha"] == "inf" and d["blocks"] == [1, 5]
    assert PruneConfig.from_dict(d) == cfg
    with pytest.raises(EamError, match="expected a prune config"):
        PruneConfig.from_dict(FinetuneConfig().to_dict())
    ft = FinetuneConfig(epochs=3, keep_decay_epochs=1.5, grad_clip=1.0)
    assert FinetuneConfig.from_dict(ft.to_dict()) == ft
