"""The cost account of executed head freezing in the families of ``modules/family_heads.py``, by hand.

There the frozen heads' q and k still come from timm's own projection and their ``A^μ·V`` is still
computed: only their scores (``q·kᵀ``) and softmax are skipped. The layer sizes below are read off the
tiny configs of ``test_families.py``, not from the code.
"""
from __future__ import annotations

import pytest
import torch

from eamvit.methods.cost import cost_account
from eamvit.modules.attention import instrument, layer_shapes, set_frozen

from test_families import _pair

# family: one (windows G, tokens N, heads H, head width d) per attention layer, by hand.
SIZES = {
    "eva02": [(1, 2 * 2 + 1, 2, 16)] * 2,  # 28 px / patch 14 = 2×2 patches + CLS, width 32 over 2 heads
    "beit": [(1, 4 * 4 + 1, 2, 16)] * 2,  # 32 px / patch 8 = 4×4 patches + CLS
    # 32 px / patch 2 = 16×16 tokens in 4×4 windows (16 of them), width 16; merged: 8×8 in 4 windows, width 32
    "swinv2": [(16, 16, 2, 8)] * 2 + [(4, 16, 2, 16)] * 2,
}


def _freeze_heads(family: str, frozen: int, execute: bool):
    """The family's model with its first ``frozen`` heads frozen in every layer (uniform maps)."""
    _, model, x = _pair(family)
    layers = instrument(model)
    for layer, shape in zip(layers, layer_shapes(model, x)):
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[..., :frozen, :, :] = True
        set_frozen(layer, mask, torch.full(shape, 1.0 / shape[-1]), "head", execute=execute)
    return model, layers


def _ops(account, layer: int) -> dict:
    return {r.op: r for r in account.rows if r.layer == layer and r.part == "attention"}


@pytest.mark.parametrize("family", sorted(SIZES))
@pytest.mark.parametrize("frozen", [1, 2])
def test_executed_heads_skip_only_their_scores_and_softmax(family, frozen):
    model, layers = _freeze_heads(family, frozen, execute=True)
    assert all(m.eam_executes_plan for m in layers)
    acc = cost_account(model)
    assert len(layers) == len(SIZES[family])
    for i, (G, N, H, d) in enumerate(SIZES[family]):
        ops = _ops(acc, i)
        assert ops["qk"].full == G * H * N * N * d and ops["softmax"].full == G * H * N * N
        assert ops["qk"].executed == G * (H - frozen) * N * N * d
        assert ops["softmax"].executed == G * (H - frozen) * N * N
        for op in ("q", "k", "v", "av", "proj"):  # projections and A^μ·V run for every head
            assert ops[op].executed == ops[op].full, op
        assert all(r.skippable == 0 for r in ops.values())
    # the whole model saves exactly the frozen heads' q·k, nothing else
    saved = sum(G * frozen * N * N * d for G, N, H, d in SIZES[family])
    assert acc.total("full") - acc.total("executed") == saved
    assert acc.total("full") == cost_account(_pair(family)[1]).total("executed")  # the untouched model


@pytest.mark.parametrize("family", sorted(SIZES))
def test_simulated_heads_report_the_executed_saving_as_skippable(family):
    model, _ = _freeze_heads(family, 1, execute=False)
    acc = cost_account(model)
    assert acc.total("executed") == acc.total("full")
    assert acc.total("skippable") == sum(G * N * N * d for G, N, H, d in SIZES[family])
    skipped = {(r.op, r.how) for r in acc.rows if r.skippable}
    assert skipped == {("qk", "executed path"), ("softmax", "executed path")}
    assert sum(r.skippable for r in acc.rows if r.op == "softmax") == sum(G * N * N for G, N, H, d in SIZES[family])


def test_unmodelled_families_are_refused_and_left_blank_in_rows(image_folder, capsys):
    """The account reads a fused qkv over one token set; elsewhere it refuses in one line, and an
    eval row leaves gmacs blank instead of printing a wrong count (or a traceback)."""
    from conftest import run

    from eamvit.errors import EamError
    from eamvit.methods.cost import modelled

    _, model, _ = _pair("cait")
    instrument(model)
    assert not modelled(model)
    with pytest.raises(EamError) as err:
        cost_account(model)
    assert "\n" not in str(err.value) and "does not model CaiT's TalkingHeadAttn" in str(err.value)
    _, eva, _ = _pair("eva02")
    instrument(eva)
    assert modelled(eva)

    kwargs = ["img_size=32", "patch_size=8", "depth=2", "depth_token_only=1", "embed_dim=32", "num_heads=2",
              "num_classes=3"]
    code, out, err = run(capsys, "eval", "--model", "cait_xxs24_224", "--model-kwargs", *kwargs,
                         "--data", str(image_folder), "--tau", "0.3", "--out", str(image_folder.parent / "r.csv"))
    assert code == 0, err
    import csv
    row = next(csv.DictReader(open(image_folder.parent / "r.csv")))
    assert row["gmacs"] == "" and row["predicted_speedup"] == "" and float(row["tau"]) == 0.3
