"""The verification gate: an exported graph must reproduce the PyTorch student.

Reported per export: top-1 agreement between the exported model and the student, the largest
absolute logit difference, and that difference in units of the output quantization step.
The output step of class c is ``s_a * max_j |W[c, j]|``: the largest change of logit c that
one flipped code of the last activation quantizer (scale s_a) can cause through the last
layer W.

The logit bound is gated on the median input, the largest difference is reported: the
student and the file round the same values in float32 in different orders, so a value
within ~1e-7 of a rounding boundary lands on the neighbouring code on a minority of inputs,
and one flipped code deep in the network moves the logits by many output steps (more often
at 8-bit activations, whose finer codes meet more boundaries; README gives the figures). A
wrong graph is off on every input. For the same reason an input whose student's top two
classes lie within the logit bound (``max_steps`` output steps) is a near-tie: the file may
pick either class, and such an input counts as agreeing (the count is reported). The
allowance is capped: at most ``max_near_ties`` of the inputs (1% by default: 3 of 359 digits
test images, 20 of 2,000 CIFAR ones) are excused as near-ties, so the plain agreement itself
must reach ``min_agreement - max_near_ties``. A file that disagrees on a quarter of the
inputs (a graph that computes another network whose logits happen to be flat, e.g. a wrong
step) cannot pass by calling its flips ties.

Two onnxruntime runs are gated alike: ``onnx`` at the basic optimisation level (float
kernels: the file's reference semantics, which the student reproduces up to float rounding)
and ``onnx-int`` at the default level, where onnxruntime fuses the QDQ patterns into integer
kernels (QLinearConv, and QLinearAdd unless residual adds are kept in float) that
requantize on their own; where QLinearAdd misses the gate, ``residual_add="auto"`` keeps the
adds in float (``FloatResidualAdds``).

On random inputs (no verification data given) the gate is the logit bound alone: noise drives
a trained network to near-tied logits, where float rounding alone flips top-1 while every
logit stays in bounds (README gives the figures), so agreement there is reported, not
gated; real data gates both.

When the gate fails, ``locate`` says where: the first activation quantizer whose codes
differ, and whether the differing codes sat at rounding ties (float rounding) or not (a
wrong graph).

A non-finite logit on either side (NaN or inf, e.g. from a NaN BatchNorm statistic) fails the
gate, whatever the agreement: NaN compares as neither larger nor smaller, so without this
rule two all-NaN rows would "agree" and a NaN difference would vanish in ``max``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .. import _intmath
from .._progress import bar as progress_bar
from ..errors import ExportError, UsageError

RANDOM = "random"  # the source name of the gate's default inputs (no data given)


@dataclass(frozen=True)
class Thresholds:
    """Pass when agreement >= ``min_agreement`` and the median input's largest logit difference
    is <= ``max_steps`` output steps (see the module docstring for why the median). Near-ties
    count as agreeing on at most ``max_near_ties`` of the inputs (rounded up)."""

    min_agreement: float = 0.999
    max_steps: float = 4.0
    max_near_ties: float = 0.01

    def __post_init__(self) -> None:
        for name in ("min_agreement", "max_near_ties"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.max_steps >= 0:
            raise UsageError(f"max_steps must be >= 0, got {self.max_steps}")


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
    nonfinite: int = 0  # inputs with a NaN/inf logit from the exported model
    nonfinite_student: int = 0  # ... from the PyTorch student
    top1_gated: bool = True  # False on random inputs: agreement reported, not gated
    median_steps: float = 0.0  # the median input's largest difference (the gated bound)
    near_ties: int = 0  # inputs whose top-1 differs where the student's own margin is in bounds
    ties_counted: int = 0  # ... of which counted as agreeing (the capped allowance)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        bad = [f"{n} from the {side}" for n, side in ((self.nonfinite, "exported model"),
                                                      (self.nonfinite_student, "student")) if n]
        why = f" (non-finite logits on {', '.join(bad)} of the inputs)" if bad else ""
        if self.near_ties:
            capped = (f", {self.ties_counted} counted as agreeing (the cap)"
                      if self.ties_counted < self.near_ties and self.top1_gated else "")
            why += (f" ({self.near_ties} other input(s) at near-ties: the student's top two "
                    f"classes within the logit bound{capped})")
        if not self.top1_gated:
            why += " (agreement not gated on random inputs: pass verification data)"
        return (f"{self.format}: top-1 agreement {self.agreement:.2%} on {self.n} {self.source} "
                f"inputs, max logit diff {self.max_diff:.3g} ({self.max_steps:.2f} output steps; "
                f"median input {self.median_steps:.2f})"
                f" -> {verdict}{why}")


def compare(fmt: str, source: str, student: torch.nn.Module,
            run: Callable[[np.ndarray], np.ndarray], inputs: torch.Tensor, step: np.ndarray,
            thresholds: Thresholds, batch_size: int = 256, progress: bool = True,
            ) -> Verification:
    """Run the student and ``run`` (the exported graph) on ``inputs`` batch by batch.

    ``progress``: a bar on stderr while it runs (only on a terminal).
    """
    agree, ties, max_diff, bad_out, bad_ref = 0, 0, 0.0, 0, 0
    steps: list[np.ndarray] = []  # per input: its largest difference in output steps
    step = np.asarray(step, np.float64)
    if not (np.isfinite(step).all() and (step > 0).all()):  # e.g. a NaN activation scale
        step = np.full_like(step, np.nan)
    bar = progress_bar(total=len(inputs), desc=f"verifying {fmt}", unit="img",
                       enabled=progress)
    with torch.no_grad(), bar:
        for i in range(0, len(inputs), batch_size):
            x = inputs[i:i + batch_size]
            ref = student(x).float().numpy()
            out = run(x.numpy())
            if out.shape != ref.shape:
                raise ExportError(f"{fmt}: output shape {out.shape}, student gives {ref.shape}")
            finite_out, finite_ref = np.isfinite(out).all(1), np.isfinite(ref).all(1)
            bad_out += int((~finite_out).sum())
            bad_ref += int((~finite_ref).sum())
            top_ref, top_out = ref.argmax(1), out.argmax(1)
            same = (top_out == top_ref) & finite_out & finite_ref
            agree += int(same.sum())
            rows = np.arange(len(ref))
            margin = (ref[rows, top_ref] - ref[rows, top_out]) / np.maximum(step[top_ref],
                                                                            step[top_out])
            ties += int((~same & finite_out & finite_ref
                         & (margin <= thresholds.max_steps)).sum())
            diff = np.abs(out.astype(np.float64) - ref)
            diff[~np.isfinite(diff)] = np.inf
            max_diff = max(max_diff, float(diff.max(initial=0)))
            per_input = (diff / step).max(1, initial=0)
            steps.append(np.where(np.isnan(per_input), np.inf, per_input))
            bar.update(len(x))
    n = len(inputs)
    agreement = agree / n if n else 1.0
    per_input = np.concatenate(steps) if steps else np.zeros(1)
    max_steps, median_steps = float(per_input.max()), float(np.median(per_input))
    top1 = source != RANDOM  # see the module docstring
    counted = min(ties, int(np.ceil(thresholds.max_near_ties * n - 1e-9)))
    passed = (bad_out == 0 and bad_ref == 0 and median_steps <= thresholds.max_steps
              and ((agree + counted) / max(n, 1) >= thresholds.min_agreement or not top1))
    return Verification(fmt, source, n, agreement, max_diff, max_steps, passed, bad_out, bad_ref,
                        top1, median_steps, ties, counted)


def locate(student: torch.nn.Module, proto, acts, codes: dict[str, str],
           inputs: torch.Tensor, optimization: str = "basic", feed=None) -> str:
    """Where the file first departs from the student on ``inputs``: the first activation
    quantizer, in graph order, whose codes differ, how many and by how much, and how many
    of those sit at a rounding tie in the student (float rounding) rather than off (a wrong
    graph). "" when every quantizer agrees. Runs the file at ``optimization`` ("basic":
    float kernels; "all": the integer kernels onnxruntime fuses, whose outputs are the codes)
    on ``feed(inputs)`` (a raw-pixel-input file: the pixels; default: the inputs).

    ``acts`` are the exporter's ``Act``; ``codes`` maps each quantizer's name to the tensor of
    its stored codes in ``proto`` (``Built.codes``, carried from the rewrite that made it).
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from ..runtime import session_options

    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producers = {out: (i, n) for i, n in enumerate(proto.graph.node) for out in n.output}
    where = {a.name: producers[codes[a.name]] for a in acts
             if codes.get(a.name) in producers}  # act name -> (graph index, QuantizeLinear)
    if not where:
        return ""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    names = [codes[name] for name in where]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    sess = ort.InferenceSession(probe.SerializeToString(),
                                session_options(optimization=optimization),
                                providers=["CPUExecutionProvider"])
    x = inputs.numpy() if feed is None else feed(inputs.numpy())
    file_codes = dict(zip(where, sess.run(names, {sess.get_inputs()[0].name: x}), strict=True))

    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # act name -> (input, output)
    hooks = [student.get_submodule(name).register_forward_hook(
        lambda m, i, o, name=name: seen.__setitem__(name, (i[0].detach(), o.detach())))
        for name in where]
    try:
        with torch.no_grad():
            student(inputs)
    finally:
        for h in hooks:
            h.remove()
    by_act = {a.name: a for a in acts}
    for name in sorted(where, key=lambda n: where[n][0]):  # graph order
        act = by_act[name]
        lo, hi = _intmath.code_range(act.bits, act.signed)
        node = where[name][1]  # the file's own zero point (absent: 0)
        zero = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else 0
        got = np.clip(file_codes[name].astype(np.int64) - np.int64(zero), lo, hi)
        x, y = (t.float().numpy() for t in seen[name])
        scale = np.asarray(act.scale, np.float32)
        scale = scale.reshape(1, -1, *[1] * (x.ndim - 2)) if scale.ndim else scale
        want = np.round(y / scale)
        off = got != want
        if got.shape != want.shape or off.any():
            if got.shape != want.shape:
                return f"quantizer {name}: file shape {got.shape}, student {want.shape}"
            t = (x if act.signed else np.maximum(x, 0)) / scale
            ties = int((np.abs(t - np.floor(t) - 0.5) < 1e-3)[off].sum())
            bad = int((~np.isfinite(want))[off].sum())
            far = np.abs(got - want)[off & np.isfinite(want)]
            how = [f"off by up to {int(far.max())}, {ties} at a rounding tie"] if far.size else []
            how += [f"{bad} non-finite in the student"] if bad else []
            return (f"first difference at quantizer {name}: {int(off.sum())} of {off.size} "
                    f"codes, " + ", ".join(how))
    return ""
