"""Datasets held in memory as uint8 tensors: CIFAR-10/100 (official python format) and digits.

Images stay uint8 ``[N, C, H, W]`` until a batch is drawn, so a whole CIFAR training set is
150 MB and augmentation works on bytes. ``mean``/``std`` (per channel, on the 0..255 scale)
travel with the dataset into checkpoints and exported models, so inference takes raw pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import _datafiles
from .._datafiles import DataError


@dataclass(frozen=True)
class Dataset:
    """Images ``[N, C, H, W]`` uint8, labels ``[N]`` int64, and the normalisation to apply."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"{self.name}: images must be uint8 [N, C, H, W], got "
                            f"{self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, n: int) -> Dataset:
        """The first ``n`` examples (for quick runs and tests)."""
        return Dataset(self.name, self.images[:n], self.labels[:n], self.classes, self.mean,
                       self.std)

    @classmethod
    def from_arrays(cls, a: _datafiles.Arrays) -> Dataset:
        """Wrap the numpy arrays of the torch-free readers (no copy)."""
        return cls(a.name, torch.from_numpy(a.images), torch.from_numpy(a.labels), a.classes,
                   a.mean, a.std)


def cifar(name: str, path: str | Path, train: bool = True, verify: bool = True) -> Dataset:
    """Load CIFAR-10 (``name="cifar10"``) or CIFAR-100 from the python-format directory.

    ``path`` may be the ``cifar-10-batches-py`` directory itself, its parent, or the
    official ``.tar.gz``. Every file read is checked against the official md5 sum.
    """
    return Dataset.from_arrays(_datafiles.cifar(name, path, train, verify))


def cifar10(path: str | Path, train: bool = True, verify: bool = True) -> Dataset:
    """CIFAR-10 from ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``."""
    return cifar("cifar10", path, train, verify)


def cifar100(path: str | Path, train: bool = True, verify: bool = True) -> Dataset:
    """CIFAR-100 (fine labels) from ``cifar-100-python/`` or ``cifar-100-python.tar.gz``."""
    return cifar("cifar100", path, train, verify)


def digits(train: bool = True, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 real images), split train/test by ``seed``.

    Pixels 0..16 are scaled to 0..255 uint8 so every dataset looks like raw image bytes.
    """
    return Dataset.from_arrays(_datafiles.digits(train, test_fraction, seed))


def load(spec: str, train: bool = True) -> Dataset:
    """Parse a data spec as the CLI takes it: ``cifar10:DIR``, ``cifar100:DIR``, ``digits`` or
    ``FILE.npz`` (one file: ``train`` does not apply)."""
    return Dataset.from_arrays(_datafiles.load(spec, train))
