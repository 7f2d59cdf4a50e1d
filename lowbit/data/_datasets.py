"""Datasets held in memory: uint8 images (CIFAR-10/100, digits, .npz) or float inputs of any rank.

Images stay uint8 ``[N, C, H, W]`` until a batch is drawn, so a whole CIFAR training set is
150 MB and augmentation works on bytes. ``mean``/``std`` (per channel, on the 0..255 scale)
travel with the dataset into checkpoints and exported models, so inference takes raw pixels.
Float inputs (``[N, C, L]`` sequences, ``[N, F]`` features, already-normalised images) are
fed to the model as they are, and no normalisation is recorded, unless ``mean``/``std`` are
given.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .. import _datafiles
from .._choices import VALIDATION_SIZE
from .._datafiles import DataError
from ._loader import Loader


@dataclass(frozen=True)
class Dataset:
    """Inputs ``images`` ``[N, ...]`` (uint8 raw pixels or float32), labels ``[N]`` int64.

    ``mean``/``std``: per-channel (dim 1) normalisation applied to every batch (required for
    uint8, ``None`` for floats used as they are). ``split`` names what the examples are
    ("train", "test", "validation", ...): runs report it next to every accuracy.
    ``augment``: pad-4 random crop + horizontal flip of training batches; ``None`` does it
    for uint8 images of at least 16x16 pixels (CIFAR), ``False`` never.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    split: str = "train"
    augment: bool | None = None

    def __post_init__(self) -> None:
        _datafiles.check_inputs(self.name, self.images.dtype == torch.uint8,
                                self.images.is_floating_point(), tuple(self.images.shape),
                                self.mean, self.std)
        if self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.images)} inputs but labels of shape "
                            f"{tuple(self.labels.shape)}")
        if self.augment and not self._is_image():
            raise DataError(f"{self.name}: augmentation (pad-4 crop + flip) needs uint8 images "
                            f"[N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")

    def _is_image(self) -> bool:
        return self.images.dtype == torch.uint8 and self.images.ndim == 4

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def augments(self) -> bool:
        """Whether training batches are augmented (see ``augment``)."""
        if self.augment is not None:
            return self.augment
        return self._is_image() and self.images.shape[-1] >= 16  # no crops on 8x8 digits

    def subset(self, n: int) -> Dataset:
        """The first ``n`` examples (for quick runs and tests)."""
        return replace(self, images=self.images[:n], labels=self.labels[:n])

    def holdout(self, size: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """``(rest, validation)``: a seeded random ``size`` examples (or fraction, when below
        1) held out of these for validation."""
        if not (0 < size < 1 or (size >= 1 and size == int(size))):
            raise DataError(f"validation size must be a count >= 1 or a fraction in (0, 1), "
                            f"got {size}")
        n_val = max(1, round(len(self) * size)) if size < 1 else int(size)
        if n_val >= len(self):
            raise DataError(f"{self.name}: {len(self)} examples are too few to hold out "
                            f"{n_val:,} for validation")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        rest, val = order[n_val:].sort().values, order[:n_val].sort().values
        held = f"validation ({n_val:,} held out of {self.name} {self.split}, seed {seed})"
        return (replace(self, images=self.images[rest], labels=self.labels[rest]),
                replace(self, images=self.images[val], labels=self.labels[val], split=held))

    def info(self) -> dict[str, Any]:
        """What a model trained on this data needs to know about its inputs."""
        return inputs_info(self)

    def loader(self, batch_size: int, *, train: bool = False, seed: int = 0,
               shard: tuple[int, int] = (0, 1)):
        """Batches of normalised float inputs and labels (see :class:`lowbit.data.Loader`)."""
        return Loader(self, batch_size, train=train, seed=seed, shard=shard)

    @classmethod
    def from_arrays(cls, a: _datafiles.Arrays) -> Dataset:
        """Wrap the numpy arrays of the torch-free readers (no copy)."""
        return cls(a.name, torch.from_numpy(a.images), torch.from_numpy(a.labels), a.classes,
                   a.mean, a.std, a.split)


def validation_split(train: Dataset, size: float | None = None, seed: int = 0
                     ) -> tuple[Dataset, Dataset]:
    """``(rest, validation)``: what lowbit selects on, held out of the training data so the
    test split is only reported (``size``: a count, a fraction below 1, or None for
    ``VALIDATION_SIZE`` capped at a tenth of the data)."""
    return train.holdout(size or min(VALIDATION_SIZE, len(train) // 10), seed)


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


def inputs_info(data: Any) -> dict[str, Any]:
    """What a model trained on ``data`` needs to know about its inputs (checkpoints, ONNX
    metadata): mean/std are ``None`` when inputs are used as they are; ``examples`` lets a
    resumed run check that it trains on the same set (``--limit``)."""
    return {"name": data.name, "classes": None if data.classes is None else list(data.classes),
            "mean": None if data.mean is None else list(data.mean),
            "std": None if data.std is None else list(data.std),
            "input_shape": list(data.input_shape), "examples": len(data)}
