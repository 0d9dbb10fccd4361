"""torchrun-style DDP on CPU (Gloo): two processes, one run folder, gradients averaged."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from leukolab.data.synthetic import make_wbc_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str, result_dir: str) -> None:
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    import torch.distributed as dist

    from leukolab.pipelines import classify

    seen: list[int] = []
    original = classify.make_loader

    def spy(*args, **kwargs):  # record how many training samples this rank reads per epoch
        loader = original(*args, **kwargs)
        if kwargs.get("train"):
            seen.append(len(loader.sampler))  # type: ignore[arg-type]
        return loader

    classify.make_loader = spy
    from leukolab.training import loop

    trainers = []
    original_fit = loop.Trainer.fit

    def fit(self, *args, **kwargs):  # keep this rank's trainer to compare its live weights
        trainers.append(self)
        return original_fit(self, *args, **kwargs)

    loop.Trainer.fit = fit
    run = classify.train_classifier(out, overrides={
        "data.path": data, "data.img_size": 32, "data.batch_size": 8, "model.backbone": "resnet10t",
        "model.drop_path": 0.0, "optim.warmup_epochs": 0, "train.epochs": 2, "train.progress": False,
        "train.device": "cpu", "data.check_images": False, "seed": 0,
    })
    # this rank's live weights: identical on every rank only if DDP averaged the gradients
    total = sum(float(p.detach().double().sum()) for p in trainers[0].objective.parameters())
    Path(result_dir, f"rank{rank}.txt").write_text(f"{run}\n{seen[0]}\n{total!r}\n")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_two_cpu_processes_train_one_run_on_sharded_data(tmp_path: Path) -> None:
    data = make_wbc_dataset(tmp_path / "data", 12, size=32, seed=0, difficulty=0.0, progress=False)
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(tmp_path / "runs"), str(results)), nprocs=2)
    lines = [(results / f"rank{r}.txt").read_text().split("\n") for r in (0, 1)]
    assert lines[0][0] == lines[1][0]  # both ranks wrote into the same run folder ...
    assert len(list((tmp_path / "runs").iterdir())) == 1  # ... and there is only one
    run = Path(lines[0][0])
    assert (run / "last.pt").is_file() and (run / "history.csv").is_file() and (run / "config.yaml").is_file()
    import pandas as pd

    splits = pd.read_csv(run / "splits.csv")
    n_train = int((splits["split"] == "train").sum())
    assert int(lines[0][1]) == int(lines[1][1]) == n_train // 2  # each rank reads its half
    assert lines[0][2] == lines[1][2]  # same weights after training on different shards
    from leukolab.checkpoints import load_checkpoint

    assert len(load_checkpoint(run / "last.pt")["history"]) == 2
