"""One save / load for every method: packed codes, identical logits, size, bad files; one calibration input."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import eamvit
from eamvit.errors import EamError
from eamvit.io import save_tensors
from eamvit.methods.adfq import ADFQConfig
from eamvit.methods.data import make_loader, random_subset
from eamvit.methods.pmq import PMQConfig
from eamvit.methods.quantize import load_quantized, quantize_, save_quantized
from eamvit.methods.repq import RepQConfig
from eamvit.modules.quant_layers import PatchBitsQuantizer

from conftest import TINY_VIT, make
from eamvit.methods.state import state_of

X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
CONFIGS = {
    "repq": RepQConfig(calib_size=8),
    "adfq": ADFQConfig(calib_size=8, init_size=8, iterations=4, batch_size=4),
    "pmq": PMQConfig.from_string("4/8/4(MP)", calib_size=8),
}


@pytest.fixture(scope="module")
def quantized():
    return {k: quantize_(make(TINY_VIT), cfg, (X, Y), progress=False) for k, cfg in CONFIGS.items()}


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["eamvit"]), {k: f.get_tensor(k) for k in f.keys()}


def _write(path, meta, tensors):
    """A changed state re-signed with eamvit's digest: the checks behind the digest must catch it."""
    save_tensors(path, tensors, meta)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_reload_gives_identical_logits(quantized, tmp_path, method):
    q = quantized[method]
    path = save_quantized(q, tmp_path / "q.safetensors")
    fresh = load_quantized(make(TINY_VIT), path)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    assert state_of(fresh).steps["quant"] == state_of(q).steps["quant"]
    meta, tensors = _read(path)
    # Every quantized weight is stored as codes, never as float.
    for key, info in meta["packed"].items():
        assert key not in tensors and tensors[key + ".codes"].dtype == torch.uint8
    linears = [n for n, m in q.named_modules() if hasattr(m, "weight_quantizer")]
    assert {k[: -len(".weight")] for k in meta["packed"]} == set(linears)


def test_pmq_mixed_precision_and_patch_bits_survive(quantized, tmp_path):
    q = quantized["pmq"]
    wbits = {m.weight_quantizer.bits for m in q.modules() if hasattr(m, "weight_quantizer")}
    assert len(wbits) > 1  # really mixed: the test covers several packed widths
    path = save_quantized(q, tmp_path / "pmq.safetensors")
    fresh = load_quantized(make(TINY_VIT), path)
    got = {n: m.weight_quantizer.bits for n, m in fresh.named_modules() if hasattr(m, "weight_quantizer")}
    assert got == {n: m.weight_quantizer.bits for n, m in q.named_modules() if hasattr(m, "weight_quantizer")}
    pb = [m for m in fresh.modules() if isinstance(m, PatchBitsQuantizer)]
    assert pb and all(torch.equal(a.token_bits, b.token_bits)
                      for a, b in zip(pb, [m for m in q.modules() if isinstance(m, PatchBitsQuantizer)]))


def test_codes_are_the_quantized_weights(quantized, tmp_path):
    """Independent check of the packing: unpack one 4-bit weight by hand (two codes per byte)."""
    q = quantized["repq"]
    meta, tensors = _read(save_quantized(q, tmp_path / "q.safetensors"))
    lin = q.blocks[0].mlp.fc1
    packed = tensors["blocks.0.mlp.fc1.weight.codes"]
    assert packed.numel() == lin.weight.numel() // 2
    codes = torch.stack([packed & 0xF, packed >> 4], 1).reshape(lin.weight.shape).float()
    wq = lin.weight_quantizer
    want = (codes - wq.zero_point[:, None]) * wq.delta[:, None]
    with torch.no_grad():
        assert torch.equal(want, wq(lin.weight))


def test_w4_state_is_at_most_a_sixth_of_fp32(tmp_path):
    spec = ("deit_tiny_patch16_224", dict(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=2,
                                          num_heads=3))
    fp = make(spec)
    fp32_path = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in fp.state_dict().items()}, str(fp32_path))
    fp32_bytes = sum(v.numel() * 4 for v in fp.state_dict().values())
    q = quantize_(copy.deepcopy(fp), RepQConfig(calib_size=4), X[:4], progress=False)
    path = save_quantized(q, tmp_path / "w4.safetensors")
    size = path.stat().st_size
    assert size <= fp32_bytes / 6 and size <= fp32_path.stat().st_size / 6


def test_bad_files(quantized, tmp_path):
    good = save_quantized(quantized["adfq"], tmp_path / "a.safetensors")
    meta, tensors = _read(good)
    with pytest.raises(EamError, match="does not exist"):
        load_quantized(make(TINY_VIT), tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(good.read_bytes()[:200])
    with pytest.raises(EamError, match="cannot read"):
        load_quantized(make(TINY_VIT), tmp_path / "junk.safetensors")
    other = eamvit.create_model(TINY_VIT[0], model_kwargs={**TINY_VIT[1], "depth": 3})
    with pytest.raises(EamError, match="was made for"):
        load_quantized(other, good)
    # ADFQ's per-token (POQ) step missing: its tensors are not all there.
    poq = next(k for k in tensors if k.endswith("qkv.input_quantizer.delta"))
    _write(tmp_path / "m.safetensors", meta, {k: v for k, v in tensors.items() if k != poq})
    with pytest.raises(EamError, match="does not fit.*missing"):
        load_quantized(make(TINY_VIT), tmp_path / "m.safetensors")
    bad = dict(tensors, **{"blocks.0.norm1.weight": tensors["blocks.0.norm1.weight"][:-1]})
    _write(tmp_path / "s.safetensors", meta, bad)
    with pytest.raises(EamError, match="shape mismatch"):
        load_quantized(make(TINY_VIT), tmp_path / "s.safetensors")
    codes = "blocks.0.mlp.fc1.weight.codes"
    _write(tmp_path / "c.safetensors", meta, dict(tensors, **{codes: tensors[codes][:-1]}))
    with pytest.raises(EamError, match="does not fit"):
        load_quantized(make(TINY_VIT), tmp_path / "c.safetensors")
    _write(tmp_path / "k.safetensors", {**meta, "method": "pmq"}, tensors)
    with pytest.raises(EamError, match="expected a pmq config"):
        load_quantized(make(TINY_VIT), tmp_path / "k.safetensors")


def test_print_shows_bits_and_granularity(quantized):
    text = str(quantized["repq"])
    assert "bits=4, granularity=channel" in text and "bits=4, granularity=tensor" in text
    assert "token_bits=" in str(quantized["pmq"])
    assert "granularity=token" in str(quantized["adfq"])


class _Items(torch.utils.data.Dataset):
    def __len__(self):
        return len(X)

    def __getitem__(self, i):
        return X[i], int(Y[i])


def _deltas(model):
    return [b.clone() for n, b in model.named_buffers() if n.endswith("delta")]


def test_every_calibration_input_gives_the_same_model():
    ds = _Items()
    idx = random_subset(ds, 6, seed=0)
    cfg = RepQConfig(calib_size=6)
    ref = _deltas(quantize_(make(TINY_VIT), cfg, ds, progress=False))  # a dataset: seeded subset
    loader = make_loader(ds, idx, batch_size=4)  # eamvit Batch
    pairs = torch.utils.data.DataLoader(torch.utils.data.Subset(torch.utils.data.TensorDataset(X, Y), idx),
                                        batch_size=5)  # (images, targets) lists
    for calib in (loader, pairs, X[idx]):
        got = _deltas(quantize_(make(TINY_VIT), cfg, calib, progress=False))
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_calibration_is_streamed():
    taken = []

    def batches():
        for i in range(0, 8, 2):
            taken.append(i)
            yield X[i:i + 2], Y[i:i + 2]
        raise AssertionError("read past the images the method needs")

    quantize_(make(TINY_VIT), RepQConfig(calib_size=4), batches(), progress=False)
    assert taken == [0, 2]
