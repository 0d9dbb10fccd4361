"""Shared fixtures: small synthetic data sets made once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from leukolab.data.synthetic import make_wbc_dataset

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def wbc_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 images per class, 32 px, easy: enough for a 4-epoch run to beat chance."""
    return make_wbc_dataset(tmp_path_factory.mktemp("wbc") / "data", 30, size=32, seed=0, difficulty=0.0,
                            progress=False)


@pytest.fixture(scope="session")
def tiny_run(wbc_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-epoch resnet10t run on ``wbc_small``."""
    from leukolab.pipelines.classify import train_classifier

    out = tmp_path_factory.mktemp("runs")
    return train_classifier(out, overrides=_tiny_overrides(wbc_small))


def _tiny_overrides(data: Path, **extra: object) -> dict[str, object]:
    """Config overrides of a fast CPU training run."""
    base: dict[str, object] = {
        "data.path": str(data), "data.img_size": 32, "data.batch_size": 16, "model.backbone": "resnet10t",
        "model.drop_path": 0.0, "optim.lr": 1e-3, "optim.warmup_epochs": 0, "train.epochs": 4,
        "train.progress": False, "train.keep_last": 1, "seed": 0,
    }
    base.update(extra)
    return base


@pytest.fixture(scope="session")
def tiny_overrides() -> Callable[..., dict[str, object]]:
    """``tiny_overrides(data, **extra)`` -> overrides of a fast CPU training run."""
    return _tiny_overrides
