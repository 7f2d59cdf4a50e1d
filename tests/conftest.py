"""Shared fixtures: the real CIFAR-10 and CIFAR-100 directories (via LOWBIT_DATA and
LOWBIT_CIFAR100) and small datasets."""

from __future__ import annotations

import os
import re
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
def cifar100_dir() -> Path:
    """``$LOWBIT_CIFAR100`` (a ``cifar-100-python`` directory, as ``cifar100-unpack`` writes it;
    ``make test`` sets it); tests that need it skip when it is absent."""
    root = os.environ.get("LOWBIT_CIFAR100")
    if not root or not Path(root).is_dir():
        pytest.skip("set LOWBIT_CIFAR100 to a cifar-100-python/ directory")
    return Path(root)


@pytest.fixture(scope="session")
def digits_split():
    from lowbit import data

    return data.digits(train=True), data.digits(train=False)


STAGE_LINE = re.compile(r"^\[\s*\d+\.\ds\] ")  # lowbit's progress off a terminal (stderr)


def without_stages(text: str) -> str:
    """``text`` without lowbit's stage lines: what a command said besides its progress."""
    return "\n".join(line for line in text.splitlines() if not STAGE_LINE.match(line))
