"""Float training of teachers (and any registered model): ``lowbit.train``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from ..data import DataLike
from ._loop import Run, TrainConfig, cross_entropy, fit


def train(model: nn.Module, train_data: DataLike, val_data: DataLike | None = None,
          config: TrainConfig | None = None, *, out: str | Path | None = None,
          resume: bool = False, progress: bool = True, **overrides: Any) -> tuple[nn.Module, dict]:
    """Train a float model with SGD + momentum; returns ``(model, record)``.

    ``train_data``/``val_data``: anything ``lowbit.data.as_data`` takes (lowbit datasets,
    ``(inputs, labels)`` arrays, torch Datasets or DataLoaders). ``overrides`` replace fields
    of ``config`` (``train(m, d, epochs=3)``). With ``out``, a checkpoint is written
    atomically every epoch; ``resume=True`` continues from it.
    """
    cfg = TrainConfig(**{**(config.__dict__ if config else {}), **overrides})
    record = fit(Run(model, cross_entropy), train_data, val_data, cfg, out=out, resume=resume,
                 record={"kind": "train"}, progress=progress)
    return model, record
