"""RepQ-ViT on tiny ViT / DeiT-distilled / Swin models: structure, reparameterization, save/load, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eamvit
from eamvit.modules.attention import attention_layers
from eamvit.errors import EamError
from eamvit.modules.quantizers import LogSqrt2Quantizer, UniformQuantizer, find_quantizers, set_quant_enabled
from eamvit.methods.quantize import load_quantized, quantize_, save_quantized
from eamvit.methods.repq import QuantConv2d, QuantLinear, RepQConfig, attn_deltas, prepare_, reparam_pairs

from conftest import TINY_DISTILLED, TINY_SWIN, TINY_VIT, make
from eamvit.methods.state import state_of

SPECS = {"vit": TINY_VIT, "distilled": TINY_DISTILLED, "swin": TINY_SWIN}


def _images(n=8, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _cfg(**kw):
    kw.setdefault("calib_size", 8)
    return RepQConfig(**kw)


@pytest.fixture(scope="module")
def quantized():
    """Each tiny model in FP and W4/A4 (calibrated once for the module)."""
    out = {}
    for name, spec in SPECS.items():
        fp = make(spec)
        q = quantize_(copy.deepcopy(fp), _cfg(), _images())
        out[name] = (fp, q)
    return out


@pytest.mark.parametrize("name", list(SPECS))
def test_reparameterization_keeps_fp_outputs(quantized, name):
    fp, q = quantized[name]
    x = _images(6, seed=1)
    with torch.no_grad():
        ref = fp(x)
        set_quant_enabled(q, False)
        try:
            out = q(x)
        finally:
            set_quant_enabled(q, True)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    # ... while the weights really were rescaled.
    norm, lin = reparam_pairs(q)[0]
    norm0, _ = reparam_pairs(fp)[0]
    assert not torch.allclose(norm.weight, norm0.weight)


@pytest.mark.parametrize("name", list(SPECS))
def test_what_is_quantized(quantized, name):
    fp, q = quantized[name]
    cfg = state_of(q).steps["quant"]
    linears = [m for m in q.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is QuantLinear for m in linears)  # head included
    convs = [m for m in q.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is QuantConv2d for m in convs)
    for c in convs:  # the image: 8 bits per tensor; conv weights per output channel
        assert c.input_quantizer.bits == 8 and c.input_quantizer.delta.dim() == 0
        assert c.weight_quantizer.delta.shape == (c.out_channels,)
    for m in linears:
        assert m.weight_quantizer.bits == cfg.w_bits and m.weight_quantizer.delta.shape == (m.out_features,)
        assert m.input_quantizer.bits == cfg.a_bits and m.input_quantizer.delta.dim() == 0
    for layer in attention_layers(q):
        qz = layer.eam_quant
        assert isinstance(qz.attn, LogSqrt2Quantizer) and qz.attn.bits == 4
        assert all(isinstance(getattr(qz, n), UniformQuantizer) for n in "qkv")
        assert qz.scale_first == (name == "swin")  # ViT: (q @ kᵀ) * scale, as RepQ-ViT
    assert all(qq.inited for qq in find_quantizers(q))
    assert len(attn_deltas(q)) == len(attention_layers(q))
    # LayerNorm arithmetic is not quantized: no quantizer lives inside a LayerNorm.
    assert not any(isinstance(m, nn.LayerNorm) and list(m.children()) for m in q.modules())


def test_reparam_targets_are_means_and_float_zero_point():
    fp = make(TINY_VIT)
    q = copy.deepcopy(fp)
    pairs = prepare_(q, _cfg())
    with torch.no_grad():
        q(_images())
    norm, lin = pairs[0]
    d_c, zp_c = lin.input_quantizer.delta.clone(), lin.input_quantizer.zero_point.clone()
    assert d_c.shape == (lin.in_features,)
    from eamvit.methods.repq import reparameterize_

    reparameterize_(pairs)
    assert lin.input_quantizer.granularity == "tensor"
    assert torch.allclose(lin.input_quantizer.delta, d_c.mean())
    assert torch.allclose(lin.input_quantizer.zero_point, zp_c.mean())  # not rounded
    r = d_c / d_c.mean()
    assert torch.allclose(norm.weight, reparam_pairs(fp)[0][0].weight / r, rtol=1e-6)


def test_swin_patch_merging_channel_is_last_dim():
    from timm.models.swin_transformer import PatchMerging

    q = make(TINY_SWIN)
    merges = [m for m in q.modules() if isinstance(m, PatchMerging)]
    assert merges
    seen = {}
    merges[0].reduction.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    pairs = prepare_(q, _cfg())
    assert any(lin is merges[0].reduction for _, lin in pairs)
    assert merges[0].reduction.bias is None
    with torch.no_grad():
        q(_images())
    x = seen["x"]
    assert x.dim() == 4  # NHWC
    iq = merges[0].reduction.input_quantizer
    assert iq.delta.shape == (x.shape[-1],) == (merges[0].reduction.in_features,)
    one = UniformQuantizer(4)
    one(x[..., 5])
    assert torch.allclose(one.delta, iq.delta[5])
    from eamvit.methods.repq import reparameterize_

    reparameterize_(pairs)
    assert merges[0].reduction.bias is not None  # created for the shift b


def test_sequential_calibration_sees_quantized_upstream():
    q = make(TINY_VIT)
    fp = copy.deepcopy(q)
    fc2 = q.blocks[1].mlp.fc2
    seen = {}
    fc2.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    prepare_(q, _cfg())
    x = _images()
    with torch.no_grad():
        q(x)
    expect = UniformQuantizer(4)
    expect(seen["x"])
    assert torch.equal(expect.delta, fc2.input_quantizer.delta)
    fp_in = {}
    fp.blocks[1].mlp.fc2.register_forward_pre_hook(lambda m, a: fp_in.setdefault("x", a[0]))
    with torch.no_grad():
        fp(x)
    assert not torch.equal(fp_in["x"], seen["x"])  # upstream quantization changed the activations


def test_w8a8_close_to_fp_on_tiny_models(quantized):
    for name, spec in SPECS.items():
        fp = quantized[name][0]
        q = quantize_(copy.deepcopy(fp), _cfg(w_bits=8, a_bits=8), _images())
        x = _images(6, seed=2)
        with torch.no_grad():
            cos = F.cosine_similarity(q(x), fp(x), dim=1)
        assert cos.min() > 0.97, name


def test_w8a8_cosine_on_digits_model():
    from eamvit.methods.data import DigitsDataset
    from eamvit.experiments.digits import load_demo_model

    fp = load_demo_model()  # the shipped checkpoint: a missing one must fail, not skip

    train, test = DigitsDataset("train", img_size=16), DigitsDataset("test", img_size=16)
    q = quantize_(copy.deepcopy(fp), RepQConfig(w_bits=8, a_bits=8), train)
    x = torch.stack([test[i][0] for i in range(64)])
    with torch.no_grad():
        cos = F.cosine_similarity(q(x), fp(x), dim=1)
    assert cos.mean() >= 0.99


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_save_load_identity(quantized, tmp_path, name):
    fp, q = quantized[name]
    path = tmp_path / "q.safetensors"
    save_quantized(q, path)
    fresh = make(SPECS[name])
    load_quantized(fresh, path)
    x = _images(5, seed=3)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    assert state_of(fresh).steps["quant"] == state_of(q).steps["quant"]


def test_load_for_another_model_fails(quantized, tmp_path):
    path = tmp_path / "q.safetensors"
    save_quantized(quantized["vit"][1], path)
    other = eamvit.create_model(TINY_VIT[0], model_kwargs={**TINY_VIT[1], "depth": 3})
    with pytest.raises(EamError, match="was made for"):
        load_quantized(other, path)
    with pytest.raises(EamError, match="was made for"):
        load_quantized(make(TINY_SWIN), path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(EamError, match="cannot read"):
        load_quantized(make(TINY_VIT), tmp_path / "junk.safetensors")
    with pytest.raises(EamError, match="does not exist"):
        load_quantized(make(TINY_VIT), tmp_path / "missing.safetensors")


@pytest.mark.parametrize("kw", [dict(w_bits=1), dict(w_bits=9), dict(a_bits=0), dict(a_bits=16),
                                dict(input_bits=12), dict(calib_size=0), dict(attn_quantizer="fp8")])
def test_bad_config(kw):
    with pytest.raises(EamError):
        quantize_(make(TINY_VIT), RepQConfig(**kw), _images())


def test_too_few_calibration_images():
    with pytest.raises(EamError, match="calibration needs 32 images but 8"):
        quantize_(make(TINY_VIT), RepQConfig(), _images(8))

    class Tiny(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.zeros(3, 32, 32), 0

    with pytest.raises(EamError, match="calibration set has 5"):
        quantize_(make(TINY_VIT), _cfg(), Tiny())


def test_quantize_twice_and_save_unquantized_fail(tmp_path):
    q = quantize_(make(TINY_VIT), _cfg(), _images())
    with pytest.raises(EamError, match="already quantized"):
        quantize_(q, _cfg(), _images())
    with pytest.raises(EamError, match="not quantized"):
        save_quantized(make(TINY_VIT), tmp_path / "x.safetensors")


def test_calibration_from_dataset_is_seeded():
    class DS(torch.utils.data.Dataset):
        def __init__(self):
            self.x = _images(20, seed=5)

        def __len__(self):
            return 20

        def __getitem__(self, i):
            return self.x[i], 0

    a = quantize_(make(TINY_VIT), _cfg(seed=0), DS())
    b = quantize_(make(TINY_VIT), _cfg(seed=0), DS())
    c = quantize_(make(TINY_VIT), _cfg(seed=1), DS())
    da = a.blocks[0].mlp.fc2.input_quantizer.delta
    assert torch.equal(da, b.blocks[0].mlp.fc2.input_quantizer.delta)
    assert not torch.equal(da, c.blocks[0].mlp.fc2.input_quantizer.delta)


def test_vit_scale_order_option():
    q = quantize_(make(TINY_VIT), _cfg(vit_scale_first=True), _images())
    assert all(l.eam_quant.scale_first for l in attention_layers(q))
