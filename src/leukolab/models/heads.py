"""Classification heads, registered by name in :data:`leukolab.registry.HEADS`."""

from __future__ import annotations

from torch import nn

from leukolab.registry import HEADS


@HEADS.register("linear")
def linear_head(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Dropout then one linear layer."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


@HEADS.register("mlp")
def mlp_head(in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.1) -> nn.Module:
    """A two-layer perceptron with GELU."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )
