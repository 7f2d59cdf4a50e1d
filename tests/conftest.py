"""Shared fixtures: the real CIFAR-10 directory (via LOWBIT_DATA) and small datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """``$LOWBIT_DATA/cifar-10-batches-py``; tests that need it skip when it is absent."""
    root = os.environ.get("LOWBIT_DATA")
    path = Path(root) / "cifar-10-batches-py" if root else None
    if path is None or not path.is_dir():
        pytest.skip("set LOWBIT_DATA to a directory holding cifar-10-batches-py/")
    return path


@pytest.fixture(scope="session")
def digits_split():
    from lowbit import data

    return data.digits(train=True), data.digits(train=False)
