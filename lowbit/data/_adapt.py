"""The one adapter from what users hold to what lowbit's loops read: :func:`as_data`.

Accepted: a lowbit :class:`Dataset`, a data spec string (``cifar10:DIR``, ``digits``,
``FILE.npz``), ``(inputs, labels)`` arrays or tensors, a ``torch.utils.data.Dataset``
yielding ``(input, label)`` (read once into memory), or a ``DataLoader`` (its batches, order
and transforms are used as they come, each epoch). Inputs are uint8 raw pixels (normalised
with per-channel statistics, recorded for the exported file) or floats of any rank (used as
they are, nothing recorded).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import _datafiles
from .._datafiles import DataError
from ._datasets import Dataset, inputs_info, load
from ._loader import normalize

READ_BATCH = 512  # examples per read when a torch Dataset is read into memory


class Stream:
    """A user's ``DataLoader`` yielding ``(inputs, labels)`` batches, used as it comes.

    lowbit's batch size, shuffling, seed and augmentation do not apply: the loader's own
    do. uint8 inputs need ``mean``/``std``; float inputs are used as they are.
    """

    def __init__(self, loader: DataLoader, *, name: str = "dataloader",
                 split: str = "validation", classes: tuple[str, ...] | None = None,
                 mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None) -> None:
        self.source, self.name, self.split, self.classes = loader, name, split, classes
        self.mean, self.std = mean, std
        x, _ = self._pair(next(iter(loader), None))
        _datafiles.check_inputs(name, x.dtype == torch.uint8, x.is_floating_point(),
                                tuple(x.shape), mean, std)
        self.input_shape = tuple(x.shape[1:])
        self.augments = False

    def _pair(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise DataError(f"{self.name}: expected a DataLoader of (inputs, labels) batches, "
                            f"got {'no batch' if batch is None else type(batch).__name__}")
        x, y = (torch.as_tensor(v) for v in batch)
        return x, y

    def __len__(self) -> int:
        dataset = getattr(self.source, "dataset", None)
        try:
            return len(dataset)
        except TypeError:  # an iterable-style dataset: count by reading
            return sum(len(y) for _, y in self.loader(1))

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def info(self) -> dict[str, Any]:
        """As :meth:`Dataset.info`."""
        return inputs_info(self)

    def loader(self, batch_size: int, *, train: bool = False, seed: int = 0,
               shard: tuple[int, int] = (0, 1)) -> _StreamLoader:
        """The user's batches, normalised; ``batch_size``, ``train`` and ``seed`` are the
        loader's own (data-parallel runs shard with a ``DistributedSampler``)."""
        return _StreamLoader(self)


class _StreamLoader:
    """Epoch iterator over a :class:`Stream` (``set_epoch`` reaches a DistributedSampler)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.stream.source, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.stream.source)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.stream
        for batch in s.source:
            x, y = s._pair(batch)
            yield normalize(x, s.mean, s.std), y.long()


Data = Dataset | Stream
Stats = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std)
DataLike = Any  # anything as_data accepts; see the module docstring


def as_data(data: DataLike, *, name: str | None = None, split: str = "validation",
            classes: tuple[str, ...] | None = None, normalize: bool = True,
            augment: bool | None = None, stats: Stats | None = None) -> Data:
    """``data`` as a :class:`Dataset` (in memory) or :class:`Stream` (a ``DataLoader``).

    ``name``/``split``/``classes`` describe data that does not carry them (arrays, torch
    datasets). uint8 pixels are standardised with ``stats`` (``(mean, std)`` per channel:
    the training data's, or a model's, so that validation data is normalised as the model
    expects), else with their dataset's or their own per-channel statistics;
    ``normalize=False`` feeds them as floats 0..255 (recorded as mean 0, std 1).
    ``augment``: see :class:`Dataset` (``False`` turns lowbit's crop + flip off).
    """
    if isinstance(data, str):
        data = load(data)
    elif isinstance(data, _datafiles.Arrays):
        data = Dataset.from_arrays(data)
    if isinstance(data, Dataset):
        if stats is not None and data.images.dtype == torch.uint8:
            data = replace(data, mean=stats[0], std=stats[1])
        return data if augment is None else replace(data, augment=augment)
    if isinstance(data, Stream):
        return data
    label = name or type(data).__name__
    if isinstance(data, DataLoader):
        mean, std = stats if stats is not None else (None, None)
        return Stream(data, name=label, split=split, classes=classes, mean=mean, std=std)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
                for v in data)
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        x, y = _read(data, label)
    else:
        raise DataError(f"{label}: expected a lowbit Dataset, a data spec (cifar10:DIR, "
                        f"digits, FILE.npz), (inputs, labels) arrays, a torch Dataset of "
                        f"(input, label) pairs or a DataLoader")
    return _tensors(x, y, label, split, classes, normalize, augment, stats)


def _read(dataset: torch.utils.data.Dataset, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(input, label)`` pairs of a map-style torch Dataset, stacked."""
    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=READ_BATCH, shuffle=False):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise DataError(f"{name}: expected (input, label) pairs, got "
                            f"{type(batch).__name__} items")
        xs.append(torch.as_tensor(batch[0]))
        ys.append(torch.as_tensor(batch[1]))
    if not xs:
        raise DataError(f"{name}: the dataset is empty")
    return torch.cat(xs), torch.cat(ys)


def _tensors(x: torch.Tensor, y: torch.Tensor, name: str, split: str,
             classes: tuple[str, ...] | None, normalize: bool, augment: bool | None,
             stats: Stats | None) -> Dataset:
    if y.is_floating_point() or y.ndim != 1:
        raise DataError(f"{name}: labels must be integer class indices [N], got {y.dtype} "
                        f"{tuple(y.shape)}")
    if x.is_floating_point():
        x, mean, std = x.float(), None, None
    elif x.dtype == torch.uint8 and x.ndim >= 2:
        channels = x.shape[1]
        if not normalize:
            mean, std = (0.0,) * channels, (1.0,) * channels
        else:
            mean, std = stats if stats is not None else _datafiles.channel_stats(x.numpy())
    else:
        raise DataError(f"{name}: inputs must be uint8 raw pixels or floats, got {x.dtype}")
    return Dataset(name, x, y.long(), classes, mean, std, split, augment)


def stats_of(data: Data | dict[str, Any]) -> Stats | None:
    """The ``(mean, std)`` that ``data`` (or a checkpoint's data dict) normalises with, to
    normalise other data of the same model alike (``None``: inputs used as they are)."""
    mean, std = (data.get("mean"), data.get("std")) if isinstance(data, dict) else \
        (data.mean, data.std)
    return None if mean is None else (tuple(mean), tuple(std))
