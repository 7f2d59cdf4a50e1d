"""Knowledge distillation into quantized students: ``lowbit.distill``.

Losses (``s``, ``t``: student and teacher logits; ``y``: labels; ``T``: temperature)::

    hinton      (1 - lam) * CE(y, s) + lam * T^2 * KL(softmax(t/T) || softmax(s/T))
    apprentice  alpha * H(y, p_T) + beta * H(y, p_S) + gamma * T^2 * H(softmax(t/T), softmax(s/T))

Hinton et al. 2015 (the T^2 factor keeps the soft gradients' scale independent of T);
Mishra & Marr 2018, "Apprentice" (defaults alpha=1, beta=0.5, gamma=0.5, T=1; its schemes):

    A  teacher and student trained jointly from their initialisations;
    B  frozen trained teacher, student from scratch;
    C  frozen trained teacher, student initialised from trained float weights, fine-tuned.

The soft weight (``lam``, or ``gamma`` for apprentice) can fall during training (GSLR, gradual
soft-loss reducing): the teacher helps early, the hard labels decide at the end.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.optimization import fuse

from .. import _checkpoint
from .._choices import GSLR_SHAPES, LOSSES, SCHEMES
from ..data import Data, DataLike, as_data
from ..errors import DataError, TrainingError, UsageError
from . import _dist
from ._hidden import check_pairs, default_layers, hidden_loss, tapped
from ._loop import Run, TrainConfig, fit, to_channels_last

SHAPES = GSLR_SHAPES


@dataclass(frozen=True)
class GSLR:
    """Gradual soft-loss reducing: the soft weight goes from ``start_value`` to ``end_value``.

    Epochs count from 0 as the training loop does: the weight is ``start_value`` up to epoch
    ``start_epoch``, ``end_value`` from epoch ``end_epoch`` on, and in between follows
    ``p = (epoch - start_epoch) / (end_epoch - start_epoch)`` linearly (``start + (end -
    start) * p``) or along a half cosine (``p`` replaced by ``(1 - cos(pi p)) / 2``).
    ``start_value=None`` starts from the config's soft weight (``lam`` or ``gamma``).
    """

    start_epoch: int
    end_epoch: int
    start_value: float | None = None
    end_value: float = 0.0
    shape: str = "linear"

    def __post_init__(self) -> None:
        if not 0 <= self.start_epoch < self.end_epoch:
            raise UsageError(f"GSLR needs 0 <= start_epoch < end_epoch, got start_epoch="
                             f"{self.start_epoch}, end_epoch={self.end_epoch}")
        if self.shape not in SHAPES:
            raise UsageError(f"GSLR shape must be one of {SHAPES}, got {self.shape!r}")
        for name in ("start_value", "end_value"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UsageError(f"GSLR {name} must be a finite number >= 0, got {value}")

    def value(self, epoch: int, start_value: float) -> float:
        """Soft weight at (0-based) ``epoch``; ``start_value`` stands in for ``None``."""
        start = start_value if self.start_value is None else self.start_value
        p = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        p = min(max(p, 0.0), 1.0)
        if self.shape == "cosine":
            p = (1 - math.cos(math.pi * p)) / 2
        return start + (self.end_value - start) * p


@dataclass(frozen=True)
class KDConfig:
    """How the student learns from the teacher (loss, weights, temperature, scheme, GSLR).

    ``teacher_grad`` (scheme A only) lets the soft term push gradients into the teacher too;
    by default the teacher learns from its own cross-entropy alone. ``teacher_precision``
    ("fp32" or "bf16"; default: the training precision) sets the frozen teacher's forward
    alone: "bf16" is much faster on CPUs with AMX, and its soft targets change only by
    bf16 rounding of the logits. ``hidden`` and ``attention`` weigh TernaryBERT's
    hidden-state and attention-score losses (``_hidden``; 0: off) over ``hidden_layers``
    (module paths; empty: the teacher's blocks).
    """

    scheme: str = "C"
    loss: str = "hinton"
    temperature: float = 1.0
    lam: float = 0.5  # hinton: weight of the soft term
    alpha: float = 1.0  # apprentice: weight of H(y, p_T), the teacher's own cross-entropy
    beta: float = 0.5  # apprentice: weight of H(y, p_S)
    gamma: float = 0.5  # apprentice: weight of the soft term H(p_T, p_S)
    gslr: GSLR | None = None
    teacher_grad: bool = False
    teacher_precision: str | None = None
    hidden: float = 0.0
    attention: float = 0.0
    hidden_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_layers", tuple(self.hidden_layers))
        if self.scheme not in SCHEMES:
            raise UsageError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.loss not in LOSSES:
            raise UsageError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UsageError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.lam <= 1:
            raise UsageError(f"lam must be in [0, 1], got {self.lam}")
        for name in ("alpha", "beta", "gamma", "hidden", "attention"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UsageError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if isinstance(self.gslr, dict):
            object.__setattr__(self, "gslr", GSLR(**self.gslr))
        if self.loss == "hinton" and self.gslr is not None and \
                max(self.gslr.start_value or 0, self.gslr.end_value) > 1:
            raise UsageError("GSLR values are hinton's lam here and must be in [0, 1]")
        if self.teacher_precision not in (None, "fp32", "bf16"):
            raise UsageError(f"teacher_precision must be 'fp32', 'bf16' or None, got "
                             f"{self.teacher_precision!r}")
        if self.teacher_precision is not None and self.scheme == "A":
            raise UsageError("teacher_precision applies to a frozen teacher (schemes B, C); "
                             "scheme A trains the teacher at the training precision")
        if self.taps and self.scheme == "A":
            raise UsageError("hidden-state and attention losses learn from a frozen teacher "
                             "(schemes B, C); scheme A trains the teacher")
        if self.teacher_grad and self.scheme != "A":
            raise UsageError(f"teacher_grad needs scheme 'A' (a jointly trained teacher); "
                             f"scheme {self.scheme!r} freezes the teacher")

    @property
    def taps(self) -> bool:
        """Whether hidden states or attention scores are matched besides the logits."""
        return self.hidden > 0 or self.attention > 0

    def soft_weight(self, epoch: int) -> float:
        """Weight of the soft term at (0-based) ``epoch``: ``lam``/``gamma``, or GSLR's value."""
        base = self.lam if self.loss == "hinton" else self.gamma
        return base if self.gslr is None else self.gslr.value(epoch, base)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for checkpoint records (``KDConfig(**d)`` rebuilds it)."""
        return asdict(self)


def hinton_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, lam: float,
                temperature: float = 1.0, teacher_grad: bool = True) -> torch.Tensor:
    """``(1-lam) CE(y, s) + lam T^2 KL(softmax(t/T) || softmax(s/T))``, batch means.

    ``teacher_grad=False`` treats the teacher's logits as constants in the soft term.
    """
    T = temperature
    t_soft = t if teacher_grad else t.detach()
    kl = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t_soft / T, 1), log_target=True,
                  reduction="batchmean")
    return (1 - lam) * F.cross_entropy(s, y) + lam * T * T * kl


def apprentice_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, alpha: float = 1.0,
                    beta: float = 0.5, gamma: float = 0.5, temperature: float = 1.0,
                    teacher_grad: bool = True) -> torch.Tensor:
    """``alpha H(y,p_T) + beta H(y,p_S) + gamma T^2 H(softmax(t/T), softmax(s/T))``.

    ``H(p, q) = -sum p log q`` (batch mean). ``teacher_grad=False`` treats the teacher's
    logits as constants in the soft term only; the ``alpha`` term is the teacher's own loss.
    """
    T = temperature
    t_soft = t if teacher_grad else t.detach()
    cross = -(F.softmax(t_soft / T, 1) * F.log_softmax(s / T, 1)).sum(1).mean()
    return alpha * F.cross_entropy(t, y) + beta * F.cross_entropy(s, y) + gamma * T * T * cross


def frozen_teacher(teacher: nn.Module, precision: str, channels_last: bool = True,
                   layers: tuple[str, ...] = ()) -> nn.Module:
    """An inference copy of a frozen teacher: BatchNorm folded into the convolutions (when fx
    can trace it), weights in ``precision`` ("bf16": cast once instead of autocast's cast at
    every call), channels-last unless told it cannot run so (``to_channels_last``). Its
    logits differ from the teacher's by rounding alone. ``layers``: it returns their hidden
    states and attention scores too (``_hidden.tapped``)."""
    frozen = copy.deepcopy(teacher).eval()
    if layers:
        frozen = tapped(frozen, layers).eval()
    try:
        traced = fx.symbolic_trace(frozen)
    except Exception:  # noqa: BLE001  (the teacher's own forward defeats fx in many ways:
        traced = None  # it runs unfused, the same numbers; fusing a traced graph may not fail)
    if traced is not None:
        frozen = fuse(traced, inplace=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    frozen = frozen.to(dtype=dtype, memory_format=torch.channels_last if channels_last
                       else torch.preserve_format)
    return frozen.requires_grad_(False)


class Taps(NamedTuple):
    """The student (what ``fit`` trains), it and the frozen teacher read through
    ``_hidden.tapped``: what hidden-state and attention losses compare."""

    student: nn.Module
    tapped_student: nn.Module
    tapped_teacher: nn.Module


def _objective(kd: KDConfig, teacher: nn.Module, taps: Taps | None = None):
    """The distillation objective for ``fit``: ``(model, x, y, epoch) -> (loss, logits, {})``.
    Schemes B and C take the :func:`frozen_teacher` copy; ``taps``: for hidden-state and
    attention losses."""
    dtype = next(teacher.parameters()).dtype

    def teacher_forward(x: torch.Tensor):
        model = teacher if taps is None else taps.tapped_teacher
        if kd.scheme == "A":
            return model(x)
        # frozen teacher: no graph, no saved activations, its own precision; clones are
        # ordinary tensors, which autograd may save for backward
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            out = model(x.to(dtype))
        if taps is None:
            return out.clone()
        t, hidden, attention = out
        return t.clone(), [h.clone() for h in hidden], [a.clone() for a in attention]

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int):
        if taps is not None and model is not taps.student:
            raise TrainingError("hidden-state and attention losses run on one process; "
                                "torchrun wraps the student")
        s, s_hidden, s_attention = (model(x), (), ()) if taps is None else \
            taps.tapped_student(x)
        w = kd.soft_weight(epoch)
        if w == 0 and kd.loss == "hinton" and kd.scheme != "A" and taps is None:
            # labels only (lam = 0, or GSLR's end): the frozen teacher's forward would be
            # multiplied by zero, so skip it; the loss and its gradient are those below, exactly
            return F.cross_entropy(s.float(), y), s, {}
        t, t_hidden, t_attention = (teacher_forward(x), (), ()) if taps is None else \
            teacher_forward(x)
        s32, t32 = s.float(), t.float()
        if kd.loss == "hinton":
            loss = hinton_loss(s32, t32, y, lam=w, temperature=kd.temperature,
                               teacher_grad=kd.teacher_grad)
            if kd.scheme == "A":
                loss = loss + F.cross_entropy(t32, y)  # the jointly trained teacher's own loss
        else:
            loss = apprentice_loss(s32, t32, y, alpha=kd.alpha, beta=kd.beta, gamma=w,
                                   temperature=kd.temperature, teacher_grad=kd.teacher_grad)
        if taps is not None:
            loss = loss + kd.hidden * hidden_loss(s_hidden, t_hidden) + \
                kd.attention * hidden_loss(s_attention, t_attention)
        return loss, s, {}

    return objective


def _taps(kd: KDConfig, student: nn.Module, inference: nn.Module, layers: tuple[str, ...],
          x: torch.Tensor) -> Taps | None:
    """The student read through ``_hidden.tapped`` at ``layers`` and the tapped frozen
    teacher ``inference``, checked to pair up on ``x``; None without hidden losses."""
    if not kd.taps:
        return None
    taps = Taps(student, tapped(student, layers), inference)
    check_pairs(taps.tapped_student, taps.tapped_teacher, x)
    return taps


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, bytes): the teacher's identity."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _load_teacher(teacher: nn.Module | str | Path,
                  allow: Collection[str]) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher module and what identifies it (arch, checkpoint path, weights hash)."""
    info: dict[str, Any] = {"path": None, "val_acc": None}
    if isinstance(teacher, (str, Path)):
        info["path"] = str(teacher)
        teacher, ckpt = _checkpoint.load_model(teacher, allow=allow)
        info["val_acc"] = ckpt["record"].get("val_acc")
    spec = getattr(teacher, "lowbit_quant", None)
    info.update(arch=getattr(teacher, "lowbit_arch", {"name": type(teacher).__name__}),
                quant=spec.to_dict() if spec is not None else None, sha256=fingerprint(teacher))
    return teacher, info


@torch.no_grad()
def _check_outputs(student: nn.Module, teacher: nn.Module, data: Data) -> None:
    """Refuse a teacher/student pair whose outputs differ in size, before any training."""
    x = next(iter(data.loader(1)))[0][:1]
    sizes = {}
    for role, model in (("student", student), ("teacher", teacher)):
        was_training = model.training
        model.eval()  # no BatchNorm or quantizer statistics are updated by this check
        try:
            out = model(x)
        except RuntimeError as exc:
            raise DataError(f"the {role} cannot run on {data.name} inputs of shape "
                            f"{tuple(x.shape[1:])}: {str(exc).splitlines()[0]}") from None
        finally:
            model.train(was_training)
        sizes[role] = tuple(out.shape[1:])
    if sizes["student"] != sizes["teacher"]:
        raise DataError(f"teacher outputs {sizes['teacher']} per example but the student "
                        f"outputs {sizes['student']}; distillation needs the same classes")


def student_for(scheme: str, model: nn.Module, spec=None, *, seed: int = 0,
                **spec_fields: Any) -> nn.Module:
    """The quantized student a scheme starts from (``model`` is left untouched).

    Scheme C quantizes ``model`` with its trained float weights copied in; A and B take only
    its architecture, freshly initialised from ``seed`` (the global random state is left
    alone). ``spec``/``spec_fields``: a ``QuantSpec``.
    """
    if scheme not in SCHEMES:
        raise UsageError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    from ..quant import quantize

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return quantize(model, spec, copy_weights=scheme == "C", **spec_fields)


# Distillation fine-tunes (scheme C starts from trained weights): a fifth of train's peak lr.
# The CLI's ``lowbit distill`` defaults come from here too.
DISTILL_CONFIG = TrainConfig(lr=0.02)
_KD_FIELDS = {f.name for f in fields(KDConfig)}
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


def distill(student: nn.Module, teacher: nn.Module | str | Path, train_data: DataLike,
            val_data: DataLike | None = None, kd: KDConfig | None = None,
            config: TrainConfig | None = None, *, out: str | Path | None = None,
            resume: bool = False, teacher_out: str | Path | None = None,
            progress: bool = True, allow: Collection[str] = (),
            **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``student`` against ``teacher`` (a module, a lowbit checkpoint path or a shipped
    checkpoint's name; ``allow``: user-code architectures its checkpoint may name).

    Returns ``(student, record)``; ``record["history"]`` has one entry per epoch with the
    soft weight and validation accuracy. ``overrides`` replace fields of ``kd`` (``scheme``,
    ``loss``, ``temperature``, ``lam``, ``alpha``, ``beta``, ``gamma``, ``gslr``,
    ``teacher_grad``, ``teacher_precision``) or of ``config`` (``epochs``, ``lr``, ...);
    ``gamma`` is Apprentice's (the step schedule's factor is ``TrainConfig(gamma=...)``).
    Without ``config`` the training settings are :data:`DISTILL_CONFIG` (``TrainConfig``'s
    defaults with lr 0.02), as on the command line.
    Build the student with :func:`student_for`. Schemes B and C freeze the teacher (eval
    mode, logits under ``torch.inference_mode``); scheme A trains it with the student and
    ``teacher_out`` saves it at the end. With ``out``, a checkpoint (and ``.json`` record) is
    written atomically every epoch; ``resume=True`` continues it exactly.
    """
    unknown = set(overrides) - _KD_FIELDS - _TRAIN_FIELDS
    if unknown:
        raise UsageError(f"unknown distill settings: {', '.join(sorted(unknown))}")
    kd = KDConfig(**{**(asdict(kd) if kd else {}),
                     **{k: v for k, v in overrides.items() if k in _KD_FIELDS}})
    cfg = TrainConfig(**{**(config or DISTILL_CONFIG).__dict__,
                         **{k: v for k, v in overrides.items()
                            if k in _TRAIN_FIELDS and k not in _KD_FIELDS}})
    if teacher_out is not None and kd.scheme != "A":
        raise UsageError(f"teacher_out saves a jointly trained teacher (scheme A); scheme "
                         f"{kd.scheme!r} leaves the teacher unchanged")
    train_data = as_data(train_data, split="train")
    teacher, teacher_info = _load_teacher(teacher, allow)
    if teacher is student:
        raise UsageError("the teacher and the student are the same module")
    _check_outputs(student, teacher, train_data)
    extra = {"teacher": teacher} if kd.scheme == "A" else {}  # fit sets its layout
    example = next(iter(train_data.loader(2)))[0]
    layout = kd.scheme == "A" or to_channels_last(teacher, example)
    layers = (kd.hidden_layers or default_layers(teacher)) if kd.taps else ()
    inference = teacher if kd.scheme == "A" else frozen_teacher(
        teacher, kd.teacher_precision or cfg.precision, layout, layers)
    taps = _taps(kd, student, inference, layers, example.to(
        memory_format=torch.channels_last) if layout and example.ndim == 4 else example)
    run = Run(student, _objective(kd, inference, taps), extra=extra,
              epoch_log=lambda epoch: {"soft_weight": kd.soft_weight(epoch)},
              channels_last=layout)
    record = {"kind": "distill", "kd": kd.to_dict(), "teacher": teacher_info}
    record = fit(run, train_data, val_data, cfg, out=out, resume=resume, record=record,
                 progress=progress)
    teacher.eval()
    rank, _ = _dist.setup()
    if teacher_out is not None and kd.scheme == "A" and rank == 0:
        _checkpoint.save(teacher_out, teacher, data=train_data.info(),
                         record={"kind": "distill-teacher", "student": str(out),
                                 "history": record["history"]})
    return student, record
