"""Calibration of activation ranges, one protocol: ``calibrate(student, batches, method)``.

Each activation quantizer with range ``r`` and ``b`` bits uses the scale ``s = r / qmax``
(``qmax = 2^b - 1`` unsigned, ``2^(b-1) - 1`` signed) and computes
``clamp(round(x / s), qmin, qmax) * s``; calibration picks ``r`` from the quantizer's inputs
over the calibration batches, by a method registered by name (:data:`CALIBRATORS`):

    mean-max    r = mean over batches of the batch max |x|   (how a range initialises itself
                in training; a starting point for QAT)
    max         r = max |x| over all batches     (nothing clipped; coarse steps when outliers)
    percentile  r = the ``percentile``-th percentile of |x|   (clips the rarest outliers)
    mse         r minimising mean (fake-quant(x; r) - x)^2 over a grid of 100 ranges up to max

The last three are the post-training methods users know from onnxruntime's and Brevitas'
calibrators (:data:`CALIB_METHODS`). Pass 1 sets every range to its running mean of batch
max |x| (that is all of "mean-max"); so each quantizer then sees inputs quantized as they
will be, pass 2 feeds every quantizer's inputs to its :class:`Observer` (``observe``) and
sets the range it ``compute`` s. Percentile and MSE keep a seeded sample of at most
``SAMPLE`` values per quantizer and batch, and read at most ``MAX_VALUES`` in all.
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

MEAN_MAX = "mean-max"
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


class Observer:
    """One quantizer's pass-2 calibration: ``observe`` each batch of its inputs (flattened),
    then ``compute`` its range for largest code ``qmax``. This one takes max |x|."""

    def __init__(self, gen: torch.Generator, percentile: float) -> None:
        self.gen, self.percentile, self.peak = gen, percentile, 0.0

    def observe(self, x: torch.Tensor) -> None:
        self.peak = max(self.peak, float(x.abs().max()) if x.numel() else 0.0)

    def compute(self, qmax: float) -> float:
        return self.peak


class _Sampled(Observer):
    """Keeps a seeded sample of the inputs for :func:`choose_range`."""

    method = ""

    def __init__(self, gen: torch.Generator, percentile: float) -> None:
        super().__init__(gen, percentile)
        self.samples: list[torch.Tensor] = []

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        if x.numel():
            keep = torch.randint(0, x.numel(), (min(SAMPLE, x.numel()),), generator=self.gen)
            self.samples.append(x[keep].float())

    def compute(self, qmax: float) -> float:
        values = torch.cat(self.samples) if self.samples else torch.zeros(1)
        return choose_range(values, self.peak, qmax, self.method, self.percentile)


class _Percentile(_Sampled):
    method = "percentile"


class _MSE(_Sampled):
    method = "mse"


# method -> its pass-2 observer (None: pass 1 alone)
CALIBRATORS: dict[str, type[Observer] | None] = {MEAN_MAX: None, "max": Observer,
                                                 "percentile": _Percentile, "mse": _MSE}


def _pass_one(student: nn.Module, ranges: list, batches: list, bar) -> None:
    """Every range set to its running mean of batch max |x| (``LearnedRange``'s own init)."""
    for r in ranges:
        r.seen.zero_()
        r.calibrating = True
    for x in batches:
        student(x)
        bar.update()
    for r in ranges:
        r.calibrating = False


@torch.no_grad()
def calibrate(student: nn.Module, batches: Iterable[torch.Tensor], method: str = MEAN_MAX, *,
              percentile: float = 99.99, seed: int = 0, progress: bool = False) -> nn.Module:
    """Set every activation range of ``student`` from ``batches`` of normalised inputs by
    ``method`` (one of :data:`CALIBRATORS`, module docstring); weights and BatchNorm
    statistics are untouched (eval mode) and later training does not re-initialise the
    ranges. ``progress``: a bar over the passes (on a terminal only). Returns ``student``."""
    if method not in CALIBRATORS:
        raise UsageError(f"calibration method must be one of {', '.join(CALIBRATORS)}, "
                         f"got {method!r}")
    batches = list(batches)
    if not batches:
        raise UsageError("calibration needs at least one batch of inputs")
    ranges = act_ranges(student)
    observer = CALIBRATORS[method]
    gen = torch.Generator().manual_seed(seed)
    observers = {id(r): observer(gen, percentile) for r in ranges} if observer else {}
    qmax: dict[int, float] = {}

    def observe(module: nn.Module, args: tuple) -> None:
        qmax[id(module)] = float(args[1])
        observers[id(module)].observe(args[0].detach().flatten())

    was_training = student.training
    student.eval()
    hooks = []
    bar = progress_bar(total=(2 if observer else 1) * len(batches), desc="calibrating",
                       unit="batch", enabled=progress)
    try:
        _pass_one(student, ranges, batches, bar)
        if observer is not None:  # pass 2: the quantizers' inputs, pass-1 ranges upstream
            hooks = [r.register_forward_pre_hook(observe) for r in ranges]
            for x in batches:
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
        if id(r) in qmax:  # a quantizer the inputs never reached keeps its pass-1 range
            r.value.fill_(observers[id(r)].compute(qmax[id(r)]))
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
    return calibrate(student, batches, ptq.method, percentile=ptq.percentile,
                     progress=progress), sum(len(b) for b in batches)

