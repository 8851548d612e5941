"""A timm features_only backbone inside a user's dense-prediction module, calibrated through forward_loop.

References are independent of the wrapper path: the bare backbone through the dataset path, the
unmodified wrapper, RepQ-ViT calibrated from an images tensor, hand-counted histograms.
"""
from __future__ import annotations


import pytest
import timm
import torch
from torch import nn
from torch.utils.data import TensorDataset

import eamvit
from eamvit.errors import EamError
from eamvit.modules.quantizers import set_quant_enabled
from eamvit.ops.entropy import AttentionHistogram
from eamvit.methods.state import state_of

TINY_BACKBONES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), False),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=16,
                                                  depths=(2, 2), num_heads=(2, 2)), True),
}


class DenseModel(nn.Module):
    """A user's segmentation-style model: a timm features_only backbone and a conv head."""

    def __init__(self, backbone: nn.Module, channels_last: bool):
        super().__init__()
        self.backbone = backbone
        self.channels_last = channels_last  # timm's Swin features are NHWC
        self.head = nn.Conv2d(backbone.feature_info.channels()[-1], 3, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)[-1]
        return self.head(f.permute(0, 3, 1, 2) if self.channels_last else f)


def backbone(kind: str, seed: int = 0) -> tuple[nn.Module, bool]:
    name, kwargs, nhwc = TINY_BACKBONES[kind]
    torch.manual_seed(seed)
    return timm.create_model(name, features_only=True, out_indices=(0, 1), **kwargs).eval(), nhwc


def dense(kind: str, seed: int = 0) -> DenseModel:
    bb, nhwc = backbone(kind, seed)
    torch.manual_seed(seed + 1)
    return DenseModel(bb, nhwc).eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def loop_over(x: torch.Tensor, batch: int, calls: list | None = None):
    def forward_loop(model: nn.Module) -> None:
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
            if calls is not None:
                calls.append(i)
    return forward_loop


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_loop_maps_equal_dataset_maps_of_the_bare_backbone(kind):
    x = images(6)
    bare, _ = backbone(kind)
    ds = TensorDataset(x, torch.zeros(6, dtype=torch.long))
    ref = eamvit.compute_entropy_maps(bare, ds, bits=6, batch_size=4, progress=False)
    model = dense(kind)
    got = eamvit.compute_entropy_maps(model, forward_loop=loop_over(x, 4), bits=6, progress=False)
    # Several passes (one layer each) read the loop again and give the same maps.
    per_layer = AttentionHistogram.nbytes(tuple(ref.entropy[0].shape), 6, torch.iinfo(torch.int32).max)
    split = eamvit.compute_entropy_maps(model, forward_loop=loop_over(x, 4), bits=6, progress=False,
                                        options=eamvit.CalibOptions(max_memory=per_layer))
    assert got.num_layers == ref.num_layers >= 2 and got.meta["num_images"] == 6
    # The token layout recorded is the backbone's own (timm's ViT: a class token and a 4x4 grid).
    want = (1, [4, 4]) if kind == "vit" else (0, [16, 16])
    assert (got.meta["num_prefix_tokens"], got.meta["grid"]) == (ref.meta["num_prefix_tokens"], ref.meta["grid"]) == want
    for maps in (got, split):
        for l in range(ref.num_layers):
            assert torch.equal(maps.entropy[l], ref.entropy[l]) and torch.equal(maps.mean[l], ref.mean[l])
            assert (maps.masked[l] is None) == (ref.masked[l] is None)


def test_counts_widen_past_uint8():
    # 300 images do not fit uint8 counts: the histogram starts narrow and widens as they arrive.
    attn = torch.rand(300, 2, 3, 3)
    acc = AttentionHistogram((2, 3, 3), 2, 1)
    for part in attn.split(100):
        acc.reserve(acc.count + part.shape[0])
        acc.update(part)
    bins = (attn * 4).floor().clamp(0, 3).long()
    brute = torch.stack([(bins == k).sum(0) for k in range(4)])
    assert torch.equal(acc.histogram().long(), brute)


def sharpened(model: nn.Module) -> nn.Module:
    """Larger q and k than timm's random init, whose attention is nearly uniform over tokens."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qkv.weight"):
                p.mul_(8)
    return model


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_freezing_the_wrapper(kind):
    model, ref = sharpened(dense(kind)), sharpened(dense(kind))
    x, other = images(1, seed=2), images(1, seed=3)
    with torch.no_grad():
        want, want_other = ref(x), ref(other)
    maps = eamvit.compute_entropy_maps(model, forward_loop=lambda m: m(x), bits=8, progress=False)
    eamvit.freeze_(model, maps, eamvit.FreezeConfig(tau=0.0))
    with torch.no_grad():
        assert torch.equal(model(x), want)
    # Maps of one image frozen everywhere give back that image's output, and change another's.
    eamvit.freeze_(model, maps, eamvit.FreezeConfig(tau=1.0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model(other), want_other, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_repq_through_forward_loop(kind):
    x = images(8)
    fp, by_images, model = dense(kind), dense(kind), dense(kind)
    cfg = dict(w_bits=8, a_bits=8, calib_size=4)
    eamvit.quantize_(by_images, eamvit.RepQConfig(**cfg), x[:4], progress=False)
    calls = []
    eamvit.quantize_(model, eamvit.RepQConfig(**cfg), forward_loop=loop_over(x, 4, calls), progress=False)
    assert calls == []  # stopped inside its first forward: RepQ-ViT calibrates on one batch
    assert state_of(model).reports["quant"]["calib_images"] == 4
    with torch.no_grad():
        q = model(x)
        assert torch.equal(q, by_images(x))
        want = fp(x)
        assert not torch.equal(q, want)
        # The reparameterization alone (every quantizer off) computes the full-precision function.
        set_quant_enabled(model, False)
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)


def test_save_load_quantized_wrapper(tmp_path):
    # A wrapper has no timm name to rebuild it from: the user builds it again and loads the state into it.
    x = images(4)
    model = dense("vit")
    eamvit.quantize_(model, eamvit.RepQConfig(w_bits=8, a_bits=8, calib_size=4), forward_loop=lambda m: m(x),
                     progress=False)
    eamvit.save_quantized(model, tmp_path / "q.safetensors")
    fresh = eamvit.load_quantized(dense("vit"), tmp_path / "q.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(EamError, match="other weights"):
        eamvit.load_quantized(dense("vit", seed=5), tmp_path / "q.safetensors")


def test_forward_loop_refusals():
    x = images(4)
    model = dense("vit")
    with pytest.raises(EamError, match="either a dataset or forward_loop"):
        eamvit.compute_entropy_maps(model, TensorDataset(x, torch.zeros(4, dtype=torch.long)), forward_loop=lambda m: m(x))
    with pytest.raises(EamError, match="batch_size applies to a calibration dataset"):
        eamvit.compute_entropy_maps(model, forward_loop=lambda m: m(x), batch_size=2, progress=False)
    with pytest.raises(EamError, match="never called the model"):
        eamvit.compute_entropy_maps(model, forward_loop=lambda m: None, progress=False)
    fed = []

    def shrinking(m):  # feeds fewer images on its second call
        fed.append(1)
        m(x[: 5 - len(fed)])

    one_layer = AttentionHistogram.nbytes((2, 17, 17), 8, torch.iinfo(torch.int32).max)
    with pytest.raises(EamError, match="same images each time"):
        eamvit.compute_entropy_maps(model, forward_loop=shrinking, progress=False,
                                    options=eamvit.CalibOptions(max_memory=one_layer))
    with pytest.raises(EamError, match="ADFQConfig cannot calibrate from forward_loop"):
        eamvit.quantize_(dense("vit"), eamvit.ADFQConfig(), forward_loop=lambda m: m(x), progress=False)
    fresh = dense("vit")
    with pytest.raises(EamError, match="set calib_size=4"):
        eamvit.quantize_(fresh, eamvit.RepQConfig(calib_size=32), forward_loop=lambda m: m(x), progress=False)
    assert not eamvit.methods.quantize.find_quantizers(fresh)  # refused before any surgery
