"""The verification gate: an exported graph must reproduce the PyTorch student.

Reported per export: top-1 agreement between the exported model and the student, the largest
absolute logit difference, and that difference in units of the output quantization step.
The output step of class c is ``s_a * max_j |W[c, j]|``: the largest change of logit c that
one flipped code of the last activation quantizer (scale s_a) can cause through the last
layer W.

Two onnxruntime runs are gated alike: ``onnx`` at the basic optimisation level (float
kernels: the file's reference semantics, which the student reproduces up to float rounding)
and ``onnx-int`` at the default level, where onnxruntime fuses the QDQ patterns into integer
kernels (QLinearConv, and QLinearAdd unless residual adds are kept in float) that
requantize on their own. Measured on the shipped ternary and 4-bit ResNet20 students over the
CIFAR-10 test set: 100 % and 100 %; QLinearAdd dropped the second to 99.4 % on one 1-epoch
student, where ``residual_add="auto"`` keeps the adds in float (``FloatResidualAdds``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Thresholds:
    """Pass when agreement >= ``min_agreement`` and max |diff| <= ``max_steps`` output steps."""

    min_agreement: float = 0.999
    max_steps: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")


@dataclass(frozen=True)
class Verification:
    """How one exported file compares with the student on ``n`` inputs from ``source``."""

    format: str
    source: str
    n: int
    agreement: float
    max_diff: float
    max_steps: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"{self.format}: top-1 agreement {self.agreement:.2%} on {self.n} {self.source} "
                f"inputs, max logit diff {self.max_diff:.3g} ({self.max_steps:.2f} output steps)"
                f" -> {verdict}")


def compare(fmt: str, source: str, student: torch.nn.Module,
            run: Callable[[np.ndarray], np.ndarray], inputs: torch.Tensor, step: np.ndarray,
            thresholds: Thresholds, batch_size: int = 256) -> Verification:
    """Run the student and ``run`` (the exported graph) on ``inputs`` batch by batch."""
    agree, max_diff, max_steps = 0, 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            x = inputs[i:i + batch_size]
            ref = student(x).float().numpy()
            out = run(x.numpy())
            if out.shape != ref.shape:
                raise ValueError(f"{fmt}: output shape {out.shape}, student gives {ref.shape}")
            diff = np.abs(out.astype(np.float64) - ref)
            diff[~np.isfinite(diff)] = np.inf  # a NaN output must fail the gate
            agree += int((out.argmax(1) == ref.argmax(1)).sum())
            max_diff = max(max_diff, float(diff.max(initial=0)))
            max_steps = max(max_steps, float((diff / step).max(initial=0)))
    n = len(inputs)
    agreement = agree / n if n else 1.0
    passed = agreement >= thresholds.min_agreement and max_steps <= thresholds.max_steps
    return Verification(fmt, source, n, agreement, max_diff, max_steps, passed)
