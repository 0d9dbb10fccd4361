"""Batch inference under torchrun: two Gloo processes on the CPU write what one process writes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from leukolab.cli.main import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commands(run: str, data: str, out: str) -> list[list[str]]:
    """``predict`` of a run (with TTA) and of a folder of images, and ``embed`` of the same images."""
    return [["predict", run, data, "--out", f"{out}/pred.csv", "--tta", "--batch-size", "4", "--no-progress"],
            ["embed", run, data, "--out", f"{out}/feats.npz", "--batch-size", "4", "--no-progress",
             "--device", "cpu"]]


def _worker(rank: int, world: int, port: int, run: str, data: str, out: str) -> None:
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""})
    torch.set_num_threads(1)
    import torch.distributed as dist

    for args in _commands(run, data, out):
        assert main(args) == 0, args
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_two_processes_predict_and_embed_exactly_what_one_process_does(
    tiny_run: Path, wbc_small: Path, tmp_path: Path
) -> None:
    data = wbc_small / "eosinophil"  # 30 images: 15 per rank, in batches of 4 (the last one short)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir()
    sharded.mkdir()
    torch.set_num_threads(1)
    for args in _commands(str(tiny_run), str(data), str(single)):
        assert main(args) == 0, args
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_run), str(data), str(sharded)), nprocs=2)
    assert sorted(p.name for p in sharded.iterdir()) == ["feats.npz", "pred.csv"]  # rank 0 wrote, once

    one, two = pd.read_csv(single / "pred.csv"), pd.read_csv(sharded / "pred.csv")
    assert len(one) == 30 and one["path"].is_monotonic_increasing
    pd.testing.assert_frame_equal(one, two, check_exact=False, atol=1e-6, rtol=0)  # same rows, same order
    assert (one["predicted"] == two["predicted"]).all()

    a, b = np.load(single / "feats.npz", allow_pickle=False), np.load(sharded / "feats.npz", allow_pickle=False)
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        if a[key].dtype.kind == "f":
            np.testing.assert_allclose(a[key], b[key], atol=1e-5, rtol=0)
            assert a[key].shape[0] == 30
        else:
            assert (a[key] == b[key]).all(), key
