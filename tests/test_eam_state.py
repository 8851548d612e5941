"""One typed state object per instrumented attention (``module.eam``), and files in the format eamvit
wrote before it: quantized states keep their ``…attn.eam_quant.…`` keys, frozen-attention files their
``mask.L`` / ``values.L`` tensors and per-layer plans.

The key list below is what main's code wrote before the state object for this tiny model, read from
its file.
"""
from __future__ import annotations

import torch
from safetensors import safe_open

import eamvit
from eamvit.io import save_tensors
from eamvit.methods.calibrate import compute_entropy_maps
from eamvit.methods.freeze import FROZEN_FORMAT, FreezeConfig, freeze_, load_frozen
from eamvit.methods.quantize import load_quantized, quantize_, save_quantized
from eamvit.methods.repq import RepQConfig
from eamvit.modules.adapters import EamState
from eamvit.modules.attention import instrument, observe

from conftest import TINY_SWIN, TINY_VIT, make

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
# The keys of attention layer 0 in a RepQ-ViT file of TINY_VIT as eamvit wrote them before the state object.
MAIN_REPQ_KEYS = {
    "blocks.0.attn.eam_quant.attn.delta", "blocks.0.attn.eam_quant.k.delta", "blocks.0.attn.eam_quant.k.zero_point",
    "blocks.0.attn.eam_quant.q.delta", "blocks.0.attn.eam_quant.q.zero_point", "blocks.0.attn.eam_quant.v.delta",
    "blocks.0.attn.eam_quant.v.zero_point", "blocks.0.attn.proj.bias", "blocks.0.attn.proj.input_quantizer.delta",
    "blocks.0.attn.proj.input_quantizer.zero_point", "blocks.0.attn.proj.weight.codes",
    "blocks.0.attn.proj.weight_quantizer.delta", "blocks.0.attn.proj.weight_quantizer.zero_point",
    "blocks.0.attn.qkv.bias", "blocks.0.attn.qkv.input_quantizer.delta", "blocks.0.attn.qkv.input_quantizer.zero_point",
    "blocks.0.attn.qkv.weight.codes", "blocks.0.attn.qkv.weight_quantizer.delta",
    "blocks.0.attn.qkv.weight_quantizer.zero_point"}


def _eam_attributes(layer: torch.nn.Module) -> list[str]:
    return sorted(k for k in vars(layer) if k.startswith(("eam", "_eam")))


def test_each_layer_keeps_one_state_object_and_registered_tensors():
    model = make(TINY_SWIN)
    layers = instrument(model)
    for i, layer in enumerate(layers):
        assert isinstance(layer.eam, EamState) and layer.eam.layer == i and layer.eam.adapter.family == "Swin v1"
        assert layer.eam.num_windows == (16 if i < 2 else 4)  # 16×16 tokens in 4×4 windows, then 8×8
    maps = compute_entropy_maps(model, [(X[0], 0)], batch_size=1, progress=False)
    freeze_(model, maps, FreezeConfig(tau=0.5, granularity="head"))
    with observe(model, {0: lambda a, m: None}):
        assert _eam_attributes(layers[0]) == ["eam"]  # the observer is in the state, not on the module
    for layer in layers:
        assert _eam_attributes(layer) == ["eam"]
        buffers = {n for n, _ in layer.named_buffers(recurse=False)}
        assert {"eam_frozen_mask", "eam_frozen_values", "eam_plan_keep", "eam_plan_values"} <= buffers
        assert layer.eam.plan == "head" and layer.eam.granularity == "head"
    # Buffers move with the model; none of them is written to the state dict.
    assert not any("eam" in k for k in model.state_dict())
    moved = model.to(torch.float64)
    assert moved.layers[0].blocks[0].attn.eam_plan_values.dtype == torch.float64


def test_quantized_files_keep_the_keys_eamvit_wrote_before(tmp_path):
    q = quantize_(make(TINY_VIT), RepQConfig(calib_size=4), (X, torch.zeros(4, dtype=torch.long)), progress=False)
    assert isinstance(q.blocks[0].attn.eam_quant, torch.nn.Module)  # a registered submodule
    path = save_quantized(q, tmp_path / "q.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = {k for k in f.keys() if k.startswith("blocks.0.attn.")}
    assert keys == MAIN_REPQ_KEYS
    fresh = load_quantized(make(TINY_VIT), path)
    with torch.no_grad():
        assert torch.equal(fresh(X), q(X))


def test_a_frozen_file_in_the_earlier_format_loads(tmp_path):
    model = make(TINY_VIT)
    layers = instrument(model)
    assert layers[0].eam_frozen_mask is None
    # Written by hand in the earlier format: head 1 of layer 0 frozen to a uniform map, layer 1 not frozen.
    mask = torch.zeros(2, 17, 17, dtype=torch.bool)
    mask[1] = True
    values = torch.full((2, 17, 17), 1.0 / 17)
    meta = {"format": FROZEN_FORMAT, "model": eamvit.methods.models.model_spec(model).name,
            "layers": [{"granularity": "head", "execute": True}, None], "config": None}
    save_tensors(tmp_path / "f.safetensors", {"mask.0": mask, "values.0": values}, meta)
    load_frozen(model, str(tmp_path / "f.safetensors"))
    assert layers[0].eam.plan == "head" and layers[0].eam.granularity == "head" and layers[1].eam_frozen_mask is None
    with torch.no_grad():
        got = model(X)
    # Reference: timm's unmodified model whose first attention output is recomputed by hand from its
    # weights with head 1's map replaced by the uniform one.
    reference = make(TINY_VIT)

    def by_hand(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        B, N, C = x.shape
        q, k, v = mod.qkv(x).reshape(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
        a = (q * mod.scale @ k.transpose(-2, -1)).softmax(-1)
        a[:, 1] = 1.0 / 17
        return mod.proj((a @ v).transpose(1, 2).reshape(B, N, C))

    reference.blocks[0].attn.register_forward_hook(by_hand)
    with torch.no_grad():
        want = reference(X)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
