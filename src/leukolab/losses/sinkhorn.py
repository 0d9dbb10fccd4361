"""Sinkhorn–Knopp centring of teacher outputs (SwAV, used by DINOv2 as ``sinkhorn_knopp_teacher``).

Instead of subtracting a running centre, the teacher's scores ``exp(logits / T)``
are alternately normalised so that every prototype receives the same total
weight (``1/K`` of the batch) and every sample is a distribution. After the last
iteration the rows sum to 1 exactly and the prototype totals are balanced to
within the few iterations' precision (DINOv2 uses 3). Under DDP the sums run
over all processes (``all_reduce``), so the balance is over the global batch.
Not in torch, timm or torchvision; lightly's SwAV ``sinkhorn`` is the same algorithm, but lightly is not a
dependency and DINOv2's variant (counts over the global batch, 1/K row targets) is a dozen lines.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _ddp() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Balanced assignments ``(N, K)`` of ``N`` teacher rows to ``K`` prototypes (rows sum to 1), float32.

    ``N`` is this process's share of the batch; under DDP the prototype balance is over all processes.
    An empty input returns an empty ``(0, K)`` tensor.
    """
    x = logits.detach().float() / float(temperature)
    n_local, k = x.shape
    count = torch.tensor(float(n_local), device=x.device)
    # exp(x - shift) with shift the middle of the global range: the shift cancels in the first normalisation
    # (DINOv2 has none, so exp overflows once scores pass ~88); one value for all processes keeps sums comparable
    ends = torch.stack([x.max(), -x.min()]) if n_local else torch.full((2,), float("-inf"), device=x.device)
    if _ddp():
        dist.all_reduce(count)
        dist.all_reduce(ends, op=dist.ReduceOp.MAX)
    if n_local == 0:
        return x
    q = torch.exp(x - (ends[0] - ends[1]) / 2).t()  # (K, N)
    total = q.sum()
    if _ddp():
        dist.all_reduce(total)
    q /= total
    for _ in range(int(n_iterations)):
        rows = q.sum(dim=1, keepdim=True)  # weight per prototype, made 1/K
        if _ddp():
            dist.all_reduce(rows)
        q /= rows.clamp_min(torch.finfo(q.dtype).tiny)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)  # weight per sample, made 1/N
        q /= count
    q *= count  # columns sum to 1: each sample's assignment is a distribution
    return q.t()
