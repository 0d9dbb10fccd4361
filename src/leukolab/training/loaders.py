"""The one way a leukolab pipeline turns a dataset into a DataLoader.

Training loaders are shuffled by a seeded generator (re-seeded per epoch by the
Trainer), sharded under torchrun and, for small labelled sets, stretched to
``min_samples`` per epoch (:func:`leukolab.training.distributed.train_sampler`);
with ``balance_targets`` an epoch draws every class with equal expectation instead
(:func:`leukolab.data.balance.balanced_sampler`, sharded the same way under torchrun);
evaluation loaders keep the dataset's order. ``collate_fn`` batches samples
that do not stack: a detector's images with variable-length box lists, a MIL
model's bags of different sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from leukolab.data.balance import balanced_sampler
from leukolab.errors import LeukolabError
from leukolab.training.distributed import rank, train_sampler, world_size
from leukolab.utils.seed import worker_init


def build_loader(
    ds: Dataset, batch_size: int, *, train: bool, num_workers: int = 0, seed: int = 0, min_samples: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None, balance_targets: Sequence[int] | None = None,
) -> DataLoader:
    """A DataLoader over ``ds``; training batches are shuffled, seeded and full (last partial one dropped).

    ``collate_fn`` defaults to torch's ``default_collate`` (stacked tensors). ``balance_targets`` (the
    class index of every item of ``ds``) makes a training epoch ``max(len(ds), min_samples)`` class-balanced
    draws with replacement (``--balance oversample``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LeukolabError(f"batch size {batch_size!r} must be an integer >= 1")
    g = torch.Generator()
    g.manual_seed(seed)
    if train and balance_targets is not None:
        n_items = len(ds)  # type: ignore[arg-type]
        if len(balance_targets) != n_items:
            raise LeukolabError(f"{len(balance_targets)} balance targets for {n_items} items; expected one each")
        sampler = balanced_sampler(balance_targets, max(n_items, min_samples), seed,
                                   num_replicas=world_size(), rank=rank())
    else:
        sampler = train_sampler(ds, seed, g, min_samples) if train else None
    n = len(sampler) if sampler is not None else len(ds)  # type: ignore[arg-type]
    return DataLoader(
        ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
        drop_last=train and n > batch_size, collate_fn=collate_fn,
        num_workers=num_workers, worker_init_fn=worker_init, generator=g,
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
    )
