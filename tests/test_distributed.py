"""Two gloo processes on CPU give the same maps and accuracy as one process."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

import eamvit
from eamvit.methods.evaluate import evaluate

from conftest import TINY_VIT, make


def _data():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(13, 3, 32, 32, generator=g), torch.randint(0, 3, (13,), generator=g))


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = make(TINY_VIT)
        maps = eamvit.compute_entropy_maps(model, _data(), bits=6, batch_size=3, progress=False)
        acc = evaluate(model, _data(), batch_size=4, progress=False)
        if rank == 0:
            torch.save({"entropy": maps.entropy, "mean": maps.mean, "n": maps.meta["num_images"], "acc": acc}, out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "dist.pt"
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    got = torch.load(out)
    model = make(TINY_VIT)
    one = eamvit.compute_entropy_maps(model, _data(), bits=6, batch_size=3, progress=False)
    acc = evaluate(model, _data(), batch_size=4, progress=False)
    assert got["n"] == 13
    for l in range(one.num_layers):
        assert torch.equal(got["entropy"][l], one.entropy[l])  # integer histograms: exactly equal
        assert torch.allclose(got["mean"][l], one.mean[l], atol=1e-6)
    assert got["acc"]["top1"] == acc["top1"] and got["acc"]["num_images"] == 13
