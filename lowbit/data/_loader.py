"""In-memory batch loader: augmentation and normalisation on uint8 tensors, no workers.

Random crop (pad 4, crop back) and horizontal flip are done for a whole batch at once with
one gather, far cheaper than the training step it feeds, so no worker processes are needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from .. import _pixels


class Batchable(Protocol):
    """What a :class:`Loader` reads of its data (a ``lowbit.data.Dataset``, which builds its
    Loaders: named here by its fields, so the two modules do not import each other)."""

    images: torch.Tensor  # [N, ...] uint8 pixels or float inputs
    labels: torch.Tensor  # [N] int64
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @property
    def augments(self) -> bool: ...

    def __len__(self) -> int: ...


def normalize(images: torch.Tensor, mean: tuple[float, ...] | None,
              std: tuple[float, ...] | None) -> torch.Tensor:
    """``[B, C, ...]`` -> float32 ``(x - mean) / std`` with per-channel (dim 1) stats (on the
    0..255 scale for uint8 pixels: ``lowbit._pixels``, the formula the runtime and exported
    files share); without stats, float inputs pass as they are.

    The result has plain NCHW strides: a one-channel batch sliced from NHWC pixels is
    "contiguous" with a channel stride of 1, which convolutions read as channels-last, and
    then a model's ``x.view(x.size(0), -1)`` fails."""
    if mean is None:
        return images.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return torch.from_numpy(_pixels.normalize(images.numpy(), mean, std))


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4,
            flip: bool = True) -> torch.Tensor:
    """Random ``pad``-pixel-pad crop and horizontal flip of a uint8 batch ``[B, C, H, W]``."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))  # zeros, [B, C, H+2p, W+2p]
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [B, H, 1]
    cols = ox[:, None] + torch.arange(w)  # [B, W]
    if flip:
        mirrored = torch.rand(b, generator=generator) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    bidx = torch.arange(b)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around a slice: result is [B, H, W, C].
    out = padded[bidx, :, rows, cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


class Loader:
    """Iterate ``(x, y)`` batches of a :class:`Dataset`, float-normalised, augmented when
    training and ``data.augments``.

    Shuffling and augmentation draw from a generator seeded with ``seed + epoch`` (call
    :meth:`set_epoch`), so a resumed run sees exactly the batches it would have seen.
    ``shard=(rank, world)`` gives each data-parallel process its own slice of every epoch.
    """

    def __init__(self, data: Batchable, batch_size: int = 128, *, train: bool = False,
                 seed: int = 0, drop_last: bool | None = None,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.data, self.batch_size, self.train, self.seed = data, batch_size, train, seed
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world = shard
        self.epoch = 0
        self.augment = train and data.augments

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        n = len(self.data)
        if not self.train:
            order = torch.arange(n)
        else:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(n, generator=g)
        per_rank = n // self.world if self.world > 1 else n
        return order[self.rank * per_rank:(self.rank + 1) * per_rank] if self.world > 1 else order

    def __len__(self) -> int:
        n = len(self._order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch + 7919)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.data.images[idx]
            if self.augment:
                x = augment(x, g)
            yield normalize(x, self.data.mean, self.data.std), self.data.labels[idx]
