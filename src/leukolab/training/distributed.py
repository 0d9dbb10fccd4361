"""Multi-process training with ``torchrun`` and PyTorch DDP (no home-made launcher).

``torchrun --nproc_per_node=N -m leukolab.cli.main train ...`` starts N copies
of the command with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set. Each copy
calls :func:`init_distributed` (NCCL on GPUs, Gloo on CPU), builds the same
model, reads its own shard of the training set (``DistributedSampler``) and
lets DDP average the gradients. Only rank 0 creates the run folder and writes
files; :func:`shared_run_dir` hands its path to the other ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, Sampler

from leukolab.errors import LeukolabError

_T = TypeVar("_T")


def world_size() -> int:
    """Number of processes of this run (1 without ``torchrun``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise LeukolabError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}; expected an integer (set by torchrun)") from None


def rank() -> int:
    """This process's rank (0 without ``torchrun``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its machine (picks its GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the process that writes files."""
    return rank() == 0


def init_distributed(device: str = "auto") -> bool:
    """Join the process group ``torchrun`` set up; returns whether the run is distributed.

    Idempotent. NCCL when the run uses CUDA, Gloo otherwise (CPU DDP works too).
    """
    if world_size() <= 1:
        return False
    if not dist.is_available():
        raise LeukolabError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dist.is_initialized():
        return True
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank())
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        if var not in os.environ:
            raise LeukolabError(f"WORLD_SIZE > 1 but {var} is not set; start multi-process runs with torchrun")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def broadcast_from_main(make: Callable[[], _T]) -> _T:
    """Run ``make()`` on rank 0 only and give its result to every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return make()
    box: list[object] = [make() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def shared_run_dir(make: Callable[[], Path]) -> Path:
    """The run folder: created by rank 0 (``make``), the same path on every rank."""
    return Path(broadcast_from_main(lambda: str(make())))


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def train_sampler(
    dataset: Dataset, seed: int, generator: torch.Generator, min_samples: int = 0
) -> Sampler | None:
    """The sampler of a training loader; ``None`` means plain ``shuffle=True``.

    Under torchrun: a :class:`DistributedSampler` (each rank its own shard,
    reshuffled per epoch by ``set_epoch``). Otherwise, when ``min_samples``
    exceeds the data set, a :class:`RandomSampler` drawing that many samples
    (whole reshuffled passes, then a partial one) with ``generator``.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if world_size() > 1:
        return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed,
                                  drop_last=n >= world_size())
    if min_samples > n:
        return RandomSampler(dataset, num_samples=min_samples, generator=generator)
    return None


def shard(items: Sequence[_T]) -> list[_T]:
    """This rank's share of ``items`` for sharded inference: every ``world_size()``-th item from ``rank()``
    (all of them without torchrun). :func:`gather_shards` puts the results back in input order."""
    return list(items[rank()::world_size()])


def gather_shards(part: list[_T], total: int) -> list[_T] | None:
    """Merge the per-rank results of :func:`shard` back into input order: the full list on rank 0,
    ``None`` on the other ranks (only rank 0 writes). Without torchrun, ``part`` itself."""
    if not (dist.is_available() and dist.is_initialized()) or world_size() == 1:
        return part
    parts: list[list[_T]] | None = [[] for _ in range(world_size())] if is_main() else None
    dist.gather_object(part, parts, dst=0)
    if parts is None:
        return None
    merged: list[_T] = [None] * total  # type: ignore[list-item]
    for r, chunk in enumerate(parts):
        merged[r::world_size()] = chunk
    return merged
