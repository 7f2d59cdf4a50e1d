"""Post-training calibration of activation ranges: max, percentile and MSE.

The three methods users know from onnxruntime's and Brevitas' calibrators, for a student
that will not be trained (post-training quantization). Each activation quantizer with range
``r`` and ``b`` bits uses the scale ``s = r / qmax`` (``qmax = 2^b - 1`` unsigned,
``2^(b-1) - 1`` signed) and computes ``clamp(round(x / s), qmin, qmax) * s``; calibration
picks ``r`` from the quantizer's inputs over the calibration batches:

    max         r = max |x|                      (nothing clipped; coarse steps when outliers)
    percentile  r = the ``percentile``-th percentile of |x|   (clips the rarest outliers)
    mse         r minimising mean (fake-quant(x; r) - x)^2 over a grid of 100 ranges up to max

Two passes: the first sets every range to its running mean of batch max |x| (so each
quantizer sees inputs quantized as they will be), the second reads the quantizers' inputs
and sets each range by ``method``. Percentile and MSE use a seeded sample of at most
``SAMPLE`` values per quantizer and batch, and at most ``MAX_VALUES`` in all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .._choices import CALIB_METHODS
from .._progress import bar as progress_bar
from ..errors import UsageError
from ._brevitas import act_ranges
from ._kernels import fake_quant

SAMPLE = 1 << 15  # values kept per quantizer and batch for percentile / MSE
MAX_VALUES = 1 << 17  # values per quantizer the percentile / MSE search reads
MSE_GRID = 100  # candidate ranges for MSE, evenly spaced in (0, max]


@dataclass(frozen=True)
class PTQConfig:
    """How a float model is quantized post-training (``lowbit-export CKPT --bits N``).

    method: activation-range calibration, one of :data:`CALIB_METHODS`.
    calib: calibration examples, at least one (one batch of ``batch_size`` or fewer).
    batch_size: examples per calibration batch.
    percentile: for ``method="percentile"``: the percentile of |x| taken as the range.
    max_drop: warn when the quantized file's top-1 accuracy is more than this fraction below
        the float model's (0.02: two points) on the labelled verification data.
    """

    method: str = "max"
    calib: int = 512
    batch_size: int = 128
    percentile: float = 99.99
    max_drop: float = 0.02

    def __post_init__(self) -> None:
        if self.method not in CALIB_METHODS:
            raise UsageError(f"calibration method must be one of {', '.join(CALIB_METHODS)}, "
                             f"got {self.method!r}")
        if self.calib < 1 or self.batch_size < 1:
            raise UsageError(f"calibration needs at least one example in batches of at least "
                             f"one (calib={self.calib}, batch_size={self.batch_size}); a model "
                             f"calibrated on nothing keeps arbitrary activation ranges")
        if not 50 < self.percentile <= 100:
            raise UsageError(f"percentile must be in (50, 100], got {self.percentile}")
        if not (math.isfinite(self.max_drop) and 0 <= self.max_drop <= 1):
            raise UsageError(f"max_drop must be a fraction in [0, 1], got {self.max_drop}")


def choose_range(values: torch.Tensor, peak: float, qmax: float, method: str,
                 percentile: float = 99.99) -> float:
    """The range ``r`` that ``method`` picks for samples ``values`` whose max |x| is ``peak``.

    ``qmax`` is the quantizer's largest code; the codes are signed (``qmin = -qmax - 1``)
    when ``values`` has negatives (an unsigned quantizer never sees any).
    """
    if method == "max" or peak <= 0:
        return peak
    if values.numel() > MAX_VALUES:
        gen = torch.Generator().manual_seed(0)
        values = values[torch.randperm(values.numel(), generator=gen)[:MAX_VALUES]]
    if method == "percentile":
        k = max(1, math.ceil(percentile / 100 * values.numel()))
        return float(values.abs().float().kthvalue(k).values)
    qmin = -qmax - 1 if bool((values < 0).any()) else 0.0
    grid = torch.linspace(peak / MSE_GRID, peak, MSE_GRID)[:, None]  # [G, 1]
    x = values.float()[None]  # [1, S]
    err = (fake_quant(x, grid / qmax, qmin, qmax) - x).pow(2).mean(1)  # [G]
    return float(grid[int(err.argmin()), 0])


@torch.no_grad()
def calibrate_ranges(student: nn.Module, batches: Iterable[torch.Tensor],
                     method: str = "max", percentile: float = 99.99, seed: int = 0,
                     progress: bool = False) -> nn.Module:
    """Set every activation range of ``student`` from ``batches`` of normalised inputs by
    ``method`` (module docstring); weights and BatchNorm statistics are untouched (eval
    mode) and later training does not re-initialise the ranges. ``progress``: a bar over
    the two passes (on a terminal only). Returns ``student``."""
    if method not in CALIB_METHODS:
        raise UsageError(f"calibration method must be one of {', '.join(CALIB_METHODS)}, "
                         f"got {method!r}")
    batches = list(batches)
    if not batches:
        raise UsageError("calibration needs at least one batch of inputs")
    ranges = act_ranges(student)
    was_training = student.training
    student.eval()
    gen = torch.Generator().manual_seed(seed)
    peaks = {id(r): 0.0 for r in ranges}
    samples: dict[int, list[torch.Tensor]] = {id(r): [] for r in ranges}
    qmax: dict[int, float] = {}

    def observe(module: nn.Module, args: tuple) -> None:
        x, threshold = args[0].detach().flatten(), args[1]
        qmax[id(module)] = float(threshold)
        peaks[id(module)] = max(peaks[id(module)], float(x.abs().max()) if x.numel() else 0.0)
        if method != "max" and x.numel():
            keep = torch.randint(0, x.numel(), (min(SAMPLE, x.numel()),), generator=gen)
            samples[id(module)].append(x[keep].float())

    for r in ranges:  # pass 1: running mean of batch max, as LearnedRange initialises itself
        r.seen.zero_()
        r.calibrating = True
    hooks = []
    bar = progress_bar(total=2 * len(batches), desc="calibrating", unit="batch",
                       enabled=progress)
    try:
        for x in batches:
            student(x)
            bar.update()
        for r in ranges:
            r.calibrating = False
        hooks = [r.register_forward_pre_hook(observe) for r in ranges]
        for x in batches:  # pass 2: the quantizers' inputs, with pass-1 ranges upstream
            student(x)
            bar.update()
    finally:
        bar.close()
        for h in hooks:
            h.remove()
        for r in ranges:
            r.calibrating = False
            r.seen.clamp_(min=r.init_steps)
        student.train(was_training)
    for r in ranges:
        if id(r) not in qmax:
            continue  # a quantizer the inputs never reached keeps its pass-1 range
        values = torch.cat(samples[id(r)]) if samples[id(r)] else torch.zeros(1)
        r.value.fill_(choose_range(values, peaks[id(r)], qmax[id(r)], method, percentile))
    return student


def calibration_batches(calib: Any, ptq: PTQConfig | None = None,
                        stats: tuple | None = None) -> list[torch.Tensor]:
    """The first ``ptq.calib`` examples of ``calib`` in normalised batches of
    ``ptq.batch_size`` (default ``PTQConfig()``): ``calib`` is a tensor of normalised inputs
    or anything ``lowbit.data.as_data`` takes (uint8 pixels normalised with ``stats``)."""
    ptq = ptq or PTQConfig()
    if isinstance(calib, torch.Tensor):
        return list(calib.float()[:ptq.calib].split(ptq.batch_size))
    from ..data import Dataset, as_data

    calib = as_data(calib, split="train", stats=stats)
    if isinstance(calib, Dataset):  # lowbit's batches: no augmentation, the first examples
        calib = calib.subset(ptq.calib)
    batches, n = [], 0
    for x, _ in calib.loader(ptq.batch_size):
        batches.append(x[:ptq.calib - n])
        n += len(batches[-1])
        if n >= ptq.calib:
            break
    if n == 0:
        raise UsageError("the calibration data holds no examples")
    return batches


def calibrate_data(student: nn.Module, calib: Any, ptq: PTQConfig | None = None,
                   stats: tuple | None = None, progress: bool = False) -> tuple[nn.Module, int]:
    """Calibrate ``student``'s activation ranges as ``ptq`` says on data ``calib`` (see
    :func:`calibration_batches`); returns the student and the number of examples used."""
    ptq = ptq or PTQConfig()
    batches = calibration_batches(calib, ptq, stats)
    return calibrate_ranges(student, batches, ptq.method, ptq.percentile,
                            progress=progress), sum(len(b) for b in batches)

