"""Fine-tuning a pruned model (resume gives the same weights), sweeps, the demo table and figures."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Subset

import eamvit
from eamvit.methods.data import DigitsDataset
from eamvit.errors import EamError
from eamvit.methods.finetune import CHECKPOINT, FinetuneConfig, finetune, keep_rate_at
from eamvit.experiments.prune_sweep import prune_sweep, prune_table
from eamvit.experiments.runner import EvalData, Timing
from eamvit.methods.prune import PruneConfig, kept_patch_masks, prune_, prune_state, token_entropies
from eamvit.methods.state import state_of

KW = dict(img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=2)




def small_model():
    torch.manual_seed(0)
    return eamvit.create_model("vit_tiny_patch16_224", model_kwargs=KW)


@pytest.fixture(scope="module")
def digits():
    train = DigitsDataset("train", img_size=16, augment=True)
    test = DigitsDataset("test", img_size=16)
    return Subset(train, range(48)), Subset(test, range(40))


def _cfg(**kw):
    base = dict(epochs=2, lr=1e-3, min_lr=1e-4, warmup_epochs=0.5, batch_size=16, mixup=0.8, cutmix=1.0,
                keep_warmup_epochs=0.5, keep_decay_epochs=1.0)
    return FinetuneConfig(**{**base, **kw})


def test_resume_gives_the_same_weights(tmp_path, digits):
    train, _ = digits
    pc = PruneConfig(method="random", keep_rate=0.5)  # random keeps a generator: its state must resume too
    a = small_model()
    prune_(a, pc)
    ra = finetune(a, train, _cfg(), out_dir=tmp_path / "a", progress=False)

    b = small_model()
    prune_(b, pc)
    rb1 = finetune(b, train, _cfg(), out_dir=tmp_path / "b", stop_after=1, progress=False)
    assert rb1["epochs_done"] == 1 and (tmp_path / "b" / CHECKPOINT).is_file()
    assert not (tmp_path / "b" / "finetuned.safetensors").exists()
    c = small_model()  # a fresh process: new model, same options
    prune_(c, pc)
    rc = finetune(c, train, _cfg(), out_dir=tmp_path / "b", progress=False)
    assert rc["epochs_done"] == 2 and rc["history"] == ra["history"]
    # 48 images / 16 = 3 steps an epoch; after epoch 1 (step 3 of 6) the cosine over the 4.5 steps after
    # the 1.5-step warm-up is 1.5 steps in; after epoch 2 it has reached min_lr.
    assert ra["history"][0]["lr"] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 1.5 / 4.5)))
    assert ra["history"][1]["lr"] == pytest.approx(1e-4)
    # κ: 1 for 1.5 steps, then a cosine to 0.5 over 3 steps: at step 3 halfway, 0.75; then the target.
    assert [h["keep_rate"] for h in ra["history"]] == [pytest.approx(0.75), 0.5]
    for (k, va), vc in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.equal(va, vc), k
    assert prune_state(c).keep_rate == 0.5
    # The checkpoint's weights load as a plain timm state dict.
    d = eamvit.create_model("vit_tiny_patch16_224", model_kwargs=KW, checkpoint=tmp_path / "b" / CHECKPOINT)
    assert torch.equal(d.state_dict()["head.weight"], c.state_dict()["head.weight"])
    assert (tmp_path / "b" / "finetuned.safetensors").is_file()


def test_resume_refuses_other_options(tmp_path, digits):
    train, _ = digits
    m = small_model()
    prune_(m, PruneConfig(keep_rate=0.5))
    finetune(m, train, _cfg(epochs=2, mixup=0.0, cutmix=0.0), out_dir=tmp_path, stop_after=1, progress=False)
    m2 = small_model()
    prune_(m2, PruneConfig(keep_rate=0.7))
    with pytest.raises(EamError, match="different prune configuration"):
        finetune(m2, train, _cfg(epochs=2, mixup=0.0, cutmix=0.0), out_dir=tmp_path, progress=False)
    r = finetune(m2, train, _cfg(epochs=1, mixup=0.0, cutmix=0.0), out_dir=tmp_path, resume=False, progress=False)
    assert r["epochs_done"] == 1


def test_finetune_bad_input(digits):
    train, _ = digits
    with pytest.raises(EamError, match="not pruned"):
        finetune(small_model(), train, _cfg(), progress=False)
    m = small_model()
    prune_(m, PruneConfig())
    with pytest.raises(EamError, match="epochs"):
        finetune(m, train, _cfg(epochs=0), progress=False)
    with pytest.raises(EamError, match="lr"):
        finetune(m, train, _cfg(lr=-1.0), progress=False)


def test_schedules_follow_evit():
    cfg = FinetuneConfig(epochs=10, lr=1e-3, min_lr=1e-5, warmup_epochs=1, warmup_lr=0.0,
                         keep_warmup_epochs=2, keep_decay_epochs=4)
    assert keep_rate_at(19, 10, 0.7, cfg) == 1.0
    assert keep_rate_at(20, 10, 0.7, cfg) == pytest.approx(1.0)
    assert keep_rate_at(40, 10, 0.7, cfg) == pytest.approx(0.85)
    assert keep_rate_at(60, 10, 0.7, cfg) == 0.7
    assert keep_rate_at(0, 10, 0.7, FinetuneConfig()) == 0.7  # EViT's fine-tuning: the target from the start


def test_sweep_and_table(digits, tmp_path):
    _, test = digits
    m = small_model()
    rows = prune_sweep(m, EvalData(test), keep_rates=(0.7, 0.5), methods=[("shannon", None), ("renyi", math.inf),
                                                                          ("evit", None)],
                       timing=Timing(batch_size=4, warmup=1, reps=3), progress=False)
    assert [r["prune"] for r in rows] == [None, "shannon", "renyi", "evit"] * 1 + ["shannon", "renyi", "evit"]
    assert rows[0]["keep_rate"] is None and all("tau" not in r for r in rows)  # blank where they do not apply
    assert rows[2]["alpha"] == "inf" and rows[1]["tokens"] == "64-45-32-23"
    assert all(r["gmacs"] < rows[0]["gmacs"] for r in rows[1:]) and all(r["images_per_s"] > 0 for r in rows)
    assert state_of(m).prune is None

    train, _ = digits
    rows, md = prune_table(m, train, test, keep_rates=(0.5,), methods=[("evit", None)], finetune_epochs=1,
                           progress=False, throughput_batch=4)
    assert "top1_finetuned" in rows[1] and md.count("\n") == 4 and "EViT" in md

    from eamvit.plots.prune import plot_entropy_histograms, plot_kept_patches, plot_top1_vs_gmacs

    plot_top1_vs_gmacs(rows, tmp_path / "tradeoff.png")
    masks = kept_patch_masks(m, test[0][0], [PruneConfig(keep_rate=0.5), PruneConfig(method="evit", keep_rate=0.5)])
    assert list(masks) == ["Shannon", "EViT"] and [int(k.sum()) for k in masks["Shannon"]] == [32, 16, 8]
    plot_kept_patches(test[0][0], masks, tmp_path / "kept.png", mean=[0.5], std=[0.5])
    plot_entropy_histograms(token_entropies(m, torch.stack([test[i][0] for i in range(4)]), (1.0, 2.0, math.inf)),
                            tmp_path / "hist.png")
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("tradeoff.png", "kept.png", "hist.png"))
    assert state_of(m).prune is None



def test_fusion_weights_receive_gradients():
    """EViT back-propagates through the class-token attention it uses as fusion weights."""
    from eamvit.ops.scores import fuse_dropped

    torch.manual_seed(0)
    patches = torch.randn(2, 6, 4)
    weights = torch.rand(2, 6, requires_grad=True)
    keep = torch.tensor([[0, 2, 3], [1, 4, 5]])
    fused = fuse_dropped(patches, weights, keep)
    (g,) = torch.autograd.grad(fused.sum(), weights)
    # d/dw_j of Σ_dropped w_j·x_j is Σ_c x_jc for dropped j, 0 for kept j.
    want = patches.sum(-1).scatter(1, keep, 0.0)
    assert torch.allclose(g, want)
