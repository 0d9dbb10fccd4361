"""Test-time augmentation over the 8 dihedral transforms (cells have no orientation)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


def dihedral_views(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The 8 images of the dihedral group D4 of a batch ``(B, C, H, W)``: 4 rotations by 90 degrees, each
    with and without a horizontal flip (the identity first)."""
    for flip in (False, True):
        base = torch.flip(x, dims=(-1,)) if flip else x
        for k in range(4):
            yield torch.rot90(base, k, dims=(-2, -1)) if k else base


@torch.no_grad()
def tta_probabilities(logits_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      tta: bool = True) -> torch.Tensor:
    """Softmax probabilities ``(B, K)`` of ``logits_of(x)``; with ``tta`` the mean over the 8 dihedral views.

    Probabilities (not logits) are averaged, as in Cytologia's write-up; for a model that is
    itself invariant to the dihedral group the result equals the plain prediction.
    """
    if not tta:
        return torch.softmax(logits_of(x).float(), 1)
    total = None
    for view in dihedral_views(x):
        p = torch.softmax(logits_of(view).float(), 1)
        total = p if total is None else total + p
    assert total is not None
    return total / 8.0
