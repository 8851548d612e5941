"""Histograms, entropy and means against independent NumPy references."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import eamvit
from eamvit.ops.entropy import AttentionHistogram, Scratch, entropy_from_counts, histogram_bins, kl_from_counts
from eamvit.errors import EamError

from conftest import FailOnce, TINY_SWIN, TINY_VIT, make


def numpy_entropy(samples: np.ndarray, bits: int) -> np.ndarray:
    """Eq. 12-13 entry by entry with np.histogram (its last bin is closed, so 1.0 lands in it)."""
    edges = np.linspace(0.0, 1.0, (1 << bits) + 1)
    flat = samples.reshape(samples.shape[0], -1)
    out = np.empty(flat.shape[1])
    for e in range(flat.shape[1]):
        hist, _ = np.histogram(flat[:, e], bins=edges)
        p = hist[hist > 0] / flat.shape[0]
        out[e] = -(p * np.log2(p)).sum()
    return out.reshape(samples.shape[1:])


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_entropy_and_mean_match_numpy(bits):
    g = torch.Generator().manual_seed(bits)
    a = torch.softmax(torch.randn(37, 2, 5, 5, generator=g) * 2, dim=-1)
    a[3, 0, 0, 0] = 1.0  # an exact 1.0 must land in the last bin
    h = AttentionHistogram((2, 5, 5), bits, max_count=37)
    for chunk in a.split(8):
        h.update(chunk)
    ref = numpy_entropy(a.double().numpy(), bits)
    np.testing.assert_allclose(h.entropy().numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(h.mean().numpy(), a.double().mean(0).numpy(), atol=1e-6)
    assert int(h.histogram().sum()) == 37 * 50


@pytest.mark.parametrize("threads", [1, 3])
def test_counts_shared_out_to_threads_match_numpy(threads):
    """Large enough for the helper threads to split the rows; Swin's window layout, exact 1.0, 0 and 1/2^b."""
    g = torch.Generator().manual_seed(threads)
    a = torch.softmax(torch.randn(21, 4, 6, 32, 32, generator=g) * 3, dim=-1)
    a[0, 0, 0, 0] = 0.0
    a[0, 0, 0, 0, 5] = 1.0
    a[1, 1, 1, 1, :4] = torch.tensor([1 / 64, 3 / 64, 0.5, 63 / 64])
    scratch = Scratch(threads)
    assert scratch.parts(10 * a[0].numel()) == threads
    h = AttentionHistogram((4, 6, 32, 32), 6, max_count=21, scratch=scratch)
    g2 = AttentionHistogram((4, 6, 32, 32), 6, max_count=21, scratch=scratch)  # shares (and reuses) the buffers
    for chunk in a.split(10):
        h.update(chunk)
        g2.update(chunk.flip(0))
    scratch.close()
    x = a.double().numpy().reshape(21, -1)
    bins = np.minimum(np.floor(x * 64), 63).astype(np.int64)  # eq. 12's bins, last one closed
    ref = np.zeros((64, x.shape[1]), dtype=np.int64)
    np.add.at(ref, (bins, np.broadcast_to(np.arange(x.shape[1]), x.shape)), 1)
    np.testing.assert_array_equal(h.histogram().reshape(64, -1).numpy(), ref)
    np.testing.assert_array_equal(g2.histogram().reshape(64, -1).numpy(), ref)


def test_histogram_edges():
    x = torch.tensor([0.0, 0.25 - 1e-6, 0.25, 0.5, 0.75, 1.0])
    assert histogram_bins(x, 2).tolist() == [0, 0, 1, 2, 3, 3]
    assert histogram_bins(torch.tensor([0.5, 1.0]), 1).tolist() == [1, 1]
    assert histogram_bins(torch.tensor([1 / 256, 255 / 256, 1.0]), 8).tolist() == [1, 255, 255]


def test_entropy_known_values():
    counts = torch.tensor([[4, 2, 1], [0, 2, 1], [0, 0, 1], [0, 0, 1]])  # bins x entries, M = 4
    h = entropy_from_counts(counts, 4)
    assert h.tolist() == pytest.approx([0.0, 1.0, 2.0])


def test_kl_zero_for_same_and_positive_for_different():
    p = torch.tensor([[10, 0], [0, 10]])
    assert kl_from_counts(p, p).abs().max() < 1e-12
    q = torch.tensor([[5, 10], [5, 0]])
    kl = kl_from_counts(p, q, eps=0.0 + 1e-9)
    assert kl[0] == pytest.approx(1.0, abs=1e-6)  # p = (1, 0), q = (0.5, 0.5): log2(2) = 1 bit


def test_count_dtype_is_small():
    h = AttentionHistogram((2, 3, 3), 8, max_count=200)
    assert h.counts.element_size() == 1
    h = AttentionHistogram((2, 3, 3), 8, max_count=1000)
    assert h.counts.element_size() == 2


def test_bits_out_of_range():
    with pytest.raises(EamError, match="1..16"):
        AttentionHistogram((1, 2, 2), 17, 10)
    with pytest.raises(EamError):
        AttentionHistogram((1, 2, 2), 0, 10)


def _dataset(n=20, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.zeros(n, dtype=torch.long))


def test_maps_match_brute_force_on_model():
    model = make(TINY_VIT)
    ds = _dataset(11)
    maps = eamvit.compute_entropy_maps(model, ds, bits=4, batch_size=4, progress=False)
    # Independent path: timm's own explicit attention, recomputed by hand from the module weights.
    store = []
    for blk in model.blocks:
        def hook(mod, inp, out, store=store):
            x = inp[0]
            B, N, C = x.shape
            qkv = mod.qkv(x).reshape(B, N, 3, mod.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, _ = qkv.unbind(0)
            store.append(torch.softmax(q @ k.transpose(-2, -1) * mod.scale, -1))
        blk.attn.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.stack([ds[i][0] for i in range(11)]))
    for l, a in enumerate(store):
        np.testing.assert_allclose(maps.entropy[l].numpy(), numpy_entropy(a.double().numpy(), 4), atol=1e-5)
        np.testing.assert_allclose(maps.mean[l].numpy(), a.double().mean(0).numpy(), atol=1e-6)
    assert maps.meta["num_images"] == 11


def test_multipass_is_bit_identical():
    model = make(TINY_VIT)
    ds = _dataset(9)
    one = eamvit.compute_entropy_maps(model, ds, bits=6, batch_size=4, progress=False)
    per_layer = AttentionHistogram.nbytes(tuple(one.entropy[0].shape), 6, 9)
    many = eamvit.compute_entropy_maps(model, ds, bits=6, batch_size=4, progress=False,
                                       options=eamvit.CalibOptions(max_memory=per_layer, keep_histograms=True))
    for l in range(one.num_layers):
        assert torch.equal(one.entropy[l], many.entropy[l])
        assert torch.equal(one.mean[l], many.mean[l])


def test_max_memory_too_small_is_clear_error():
    model = make(TINY_VIT)
    with pytest.raises(EamError, match="max-memory"):
        eamvit.compute_entropy_maps(model, _dataset(4), bits=8, progress=False,
                                    options=eamvit.CalibOptions(max_memory=1000))


def test_memory_needed_is_printed(capsys):
    model = make(TINY_VIT)
    eamvit.compute_entropy_maps(model, _dataset(4), bits=8, progress=False)
    assert "histograms need" in capsys.readouterr().err


def test_swin_windows_are_separate_variables_and_masked_entries_have_zero_entropy():
    model = make(TINY_SWIN)
    maps = eamvit.compute_entropy_maps(model, _dataset(6), bits=8, batch_size=3, progress=False)
    # 32 px / patch 2 = 16x16 tokens, window 4 -> 16 windows of 16 tokens; stage 2: 8x8 -> 4 windows
    assert [tuple(e.shape) for e in maps.entropy] == [(16, 2, 16, 16)] * 2 + [(4, 2, 16, 16)] * 2
    assert maps.masked[0] is None and maps.masked[1] is not None  # second block of a stage is shifted
    masked = maps.masked[1].unsqueeze(1).expand_as(maps.entropy[1])
    assert masked.any()
    assert maps.entropy[1][masked].abs().max() == 0
    assert maps.mean[1][masked].abs().max() < 1e-6


def test_save_load_roundtrip_and_wrong_model(tmp_path):
    model = make(TINY_VIT)
    maps = eamvit.compute_entropy_maps(model, _dataset(5), bits=5, progress=False,
                                       options=eamvit.CalibOptions(meta={"seed": 7}))
    maps.save(tmp_path / "m.safetensors")
    back = eamvit.EntropyMaps.load(tmp_path / "m.safetensors")
    assert back.meta["bits"] == 5 and back.meta["seed"] == 7 and back.meta["num_images"] == 5
    assert all(torch.equal(a, b) for a, b in zip(maps.entropy, back.entropy))
    back.check_model(model)
    other = make(TINY_SWIN)
    with pytest.raises(EamError, match="recompute"):
        back.check_model(other)


def test_resume_gives_the_same_maps(tmp_path):
    model = make(TINY_VIT)
    base = _dataset(12)
    full = eamvit.compute_entropy_maps(model, base, bits=6, batch_size=2, progress=False)
    ds = FailOnce(base, fail_at=9)
    partial = tmp_path / "maps.partial"
    with pytest.raises(KeyboardInterrupt):
        eamvit.compute_entropy_maps(model, ds, bits=6, batch_size=2, progress=False,
                                    options=eamvit.CalibOptions(resume_path=partial, checkpoint_every=2))
    assert partial.exists()
    resumed = eamvit.compute_entropy_maps(model, ds, bits=6, batch_size=2, progress=False,
                                          options=eamvit.CalibOptions(resume_path=partial, checkpoint_every=2))
    assert not partial.exists()
    assert resumed.meta["num_images"] == 12
    for l in range(full.num_layers):
        assert torch.equal(full.entropy[l], resumed.entropy[l])
        assert torch.allclose(full.mean[l], resumed.mean[l], atol=1e-7)


def test_swin_maps_reload_for_the_same_model(tmp_path):
    model = make(TINY_SWIN)  # tuple kwargs (depths=(2, 2)) come back from JSON as lists
    maps = eamvit.compute_entropy_maps(model, _dataset(2), bits=4, progress=False)
    maps.save(tmp_path / "s.safetensors")
    eamvit.EntropyMaps.load(tmp_path / "s.safetensors").check_model(model)


def test_readme_api_example_on_the_bundled_model():
    """The README's Python example, verbatim but on the bundled digits ViT and its data."""
    import eamvit

    model = eamvit.create_model(eamvit.BUNDLED_MODEL)            # or a timm name with pretrained=True / checkpoint=
    cfg = eamvit.data_config(model)                              # the preprocessing its checkpoint carries
    calib = eamvit.build_dataset("digits", cfg, split="train")
    test = eamvit.build_dataset("digits", cfg, split="test")
    maps = eamvit.compute_entropy_maps(model, calib, bits=8, progress=False)
    before = eamvit.evaluate(model, test, progress=False)
    report = eamvit.freeze_(model, maps, eamvit.FreezeConfig(tau=0.2, scope="head"))
    after = eamvit.evaluate(model, test, progress=False)

    # Against independent references: the accuracy measured when the model was trained (98.89 %, in
    # its file's metadata) and a hand count of argmax hits; τ is the frozen fraction.
    with torch.no_grad():
        eamvit.unfreeze_(model)
        hits = (model(test.images).argmax(-1) == test.targets).sum().item()
    assert before["top1"] == round(100 * hits / len(test), 3) == 98.889
    assert abs(report.frozen_fraction - 0.2) < 0.01 and maps.meta["num_images"] == 1437
    assert 90 <= after["top1"] <= 100


def test_kill_9_during_calibration_resumes_bit_identically(tmp_path):
    """SIGKILL a `calibrate --resume` once its .partial exists; the rerun cleans the killed run's
    temporaries and ends with exactly the maps of an uninterrupted run (computed here, in-process)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from safetensors.torch import load_file

    from eamvit.methods.data import random_subset

    src = str(Path(eamvit.__file__).parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "m.safetensors"
    cmd = [sys.executable, "-m", "eamvit.cli", "calibrate", "--calib-size", "120", "--batch-size", "2", "--bits", "6",
           "--resume", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "m.safetensors.partial"
    deadline = time.time() + 300
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not out.exists()
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    model = eamvit.create_model(eamvit.BUNDLED_MODEL)
    train = eamvit.build_dataset("digits", eamvit.data_config(model), split="train")
    ref = eamvit.compute_entropy_maps(model, train, indices=random_subset(train, 120, seed=0), bits=6, batch_size=2,
                                      progress=False)
    got = load_file(str(out))
    for l in range(ref.num_layers):
        assert torch.equal(got[f"entropy.{l}"], ref.entropy[l]) and torch.equal(got[f"mean.{l}"], ref.mean[l])
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no .partial, no temporaries
