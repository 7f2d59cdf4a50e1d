"""The one normalisation formula for raw pixels (numpy only): loader, runtime and exported graph.

A model's inputs are uint8 pixels standardised per channel, ``x = (pixel - mean) / std``
with ``mean``/``std`` on the 0..255 scale, computed in float32 (the subtraction, then one
correctly rounded division). Every uint8 value of channel ``c`` therefore has one float32
image, ``table(mean, std)[c, pixel]``: the training loader (torch indexes this table), the
runtime (numpy) and a raw-uint8-input ONNX file (a Gather on it) all read that table, so
they feed a model bit-identical inputs. (Multiplying by ``1 / std`` instead gives another
float32 for about a third of the values.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LEVELS = 256  # uint8 pixel values


def _standardize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 ``(x - mean) / std`` with per-channel stats on dim 1 of ``x``."""
    per_channel = (1, -1, *[1] * (x.ndim - 2))
    return (x.astype(np.float32) - np.asarray(mean, np.float32).reshape(per_channel)) \
        / np.asarray(std, np.float32).reshape(per_channel)


def table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 ``[C, 256]``: row ``c`` is ``(v - mean[c]) / std[c]`` for pixel values 0..255."""
    levels = np.broadcast_to(np.arange(LEVELS, dtype=np.float32), (1, len(mean), LEVELS))
    return _standardize(levels, mean, std)[0]


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``[N, C, ...]`` -> float32 ``(x - mean) / std`` per channel (dim 1): uint8 pixels by
    :func:`table` lookup, other values (floats on the 0..255 scale) by the same arithmetic."""
    if x.dtype != np.uint8:
        return _standardize(x, mean, std)
    lut = table(mean, std)
    out = np.empty(x.shape, np.float32)
    for c in range(x.shape[1]):
        out[:, c] = lut[c][x[:, c]]
    return out
