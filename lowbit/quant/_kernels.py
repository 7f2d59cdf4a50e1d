"""Fused fake-quantization kernels for QAT: one pass over an activation instead of ten.

An activation quantizer runs ``round(x / s)``, a clamp and a multiply forward, and a handful
of comparisons, a ``where`` and a reduction backward; in eager PyTorch each is a full pass
over the tensor, and together they cost more than the convolutions of a CPU QAT step.
``torch.compile`` (inductor) fuses each direction into one loop for CIFAR-sized tensors.
The math is computed in float32 whatever the input dtype (bf16 autocast included) and is
bit-identical between the compiled and the eager kernels (``tests/test_kernels.py``; only
the order of the scale gradient's sum differs); where inductor cannot compile (no C++
compiler, an unsupported platform) the eager kernels run instead, with one log line, and
:func:`kernel_status` says which kernels run and why. Set ``LOWBIT_EAGER_KERNELS=1`` to skip
compilation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

_log = logging.getLogger("lowbit")


def fake_quant(x: torch.Tensor, scale: torch.Tensor, qmin: torch.Tensor | float,
               qmax: torch.Tensor | float, relu: bool = False) -> torch.Tensor:
    """clamp(round(x / s), qmin, qmax) * s in float32, returned in ``x``'s dtype: the
    quantizer of the integer contract (``lowbit._intmath.quantize_codes`` times s) in torch,
    for the student, the exporter's trace and calibration alike. ``relu``: of max(x, 0),
    i.e. a ReLU in front fused into the same pass."""
    t = x.float().clamp_min(0.0) if relu else x.float()
    return (torch.round(t / scale).clamp(qmin, qmax) * scale).to(x.dtype)


def fake_quant_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                        qmin: torch.Tensor, qmax: torch.Tensor, relu: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ gradients (Esser et al. 2020) of :func:`fake_quant` w.r.t. x and s.

    dy/dx = 1 inside [qmin, qmax] (straight-through round), 0 where clipped;
    dy/ds = round(x/s) - x/s inside, the clipped code (qmin or qmax) outside. ``relu``: of
    fake_quant(max(x, 0)), as ReLU's backward composes: dy/dx = 0 also where x <= 0 (x == 0
    included, where a straight-through clamp alone would pass the gradient).
    """
    xf = x.float()
    t = (xf.clamp_min(0.0) if relu else xf) / scale
    inside = (t >= qmin) & (t <= qmax)
    if relu:
        inside = inside & (xf > 0)
    g = grad.float()
    q = torch.round(t).clamp(qmin, qmax)
    grad_s = (g * torch.where(inside, q - t, q)).sum()
    return torch.where(inside, g, 0.0).to(x.dtype), grad_s


# Below this many elements a pass is cheap and compiling (seconds per process) costs more than
# it saves: small models (digits, tests) run the eager kernels, CIFAR-sized activations fused.
FUSE_MIN_ELEMENTS = 1 << 18
_EAGER = {"forward": fake_quant, "backward": fake_quant_backward}
_fused: dict[str, Callable] = {}  # the kernel each name runs once first asked for
_why_eager: dict[str, str] = {}  # name -> why it runs eager (a compile failure's message)


def kernel_status() -> dict[str, str]:
    """What each kernel ("forward", "backward") runs for CIFAR-sized tensors: "compiled",
    "eager (LOWBIT_EAGER_KERNELS=1)", "eager (<the compile failure>)", or "not built yet"."""
    status = {}
    for name in _EAGER:
        if name in _why_eager:
            status[name] = f"eager ({_why_eager[name]})"
        elif name not in _fused:
            status[name] = "not built yet"
        else:
            status[name] = "compiled" if _fused[name] is not _EAGER[name] else \
                "eager (LOWBIT_EAGER_KERNELS=1)"
    return status


def kernel(name: str, numel: int) -> Callable:
    """The kernel ``name`` ("forward" | "backward") for a tensor of ``numel`` elements."""
    return fused(name) if numel >= FUSE_MIN_ELEMENTS else _EAGER[name]


def compiling(numel: int) -> bool:
    """Whether a tensor of ``numel`` elements runs the compiled kernels: fusing more work into
    them (a ReLU) pays there, while in eager PyTorch it only adds passes."""
    return numel >= FUSE_MIN_ELEMENTS and fused("forward") is not _EAGER["forward"]


def fused(name: str) -> Callable:
    """The compiled kernel ``name``, or the eager one where inductor is unavailable."""
    fn = _fused.get(name)
    if fn is None:
        eager = _EAGER[name]
        fn = eager if os.environ.get("LOWBIT_EAGER_KERNELS") == "1" else \
            _with_fallback(name, torch.compile(eager, dynamic=True), eager)
        _fused[name] = fn
    return fn


def _with_fallback(name: str, compiled: Callable, eager: Callable) -> Callable:
    """``compiled``, replaced for good by ``eager`` the first time it fails to compile."""

    def run(*args: torch.Tensor):
        try:
            return compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as exc:  # inductor's failures (no C++
            # compiler: InvalidCxxCompiler inside BackendCompilerFailed); eager is exact, and
            # anything wrong with the arguments themselves raises again from it
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            _log.warning("lowbit: fused quantizer kernels unavailable (%s); using eager "
                         "PyTorch kernels (same numbers, slower QAT); "
                         "lowbit.quant.kernel_status() says so", why)
            _why_eager[name] = why
            _fused[name] = eager
            return eager(*args)

    return run
