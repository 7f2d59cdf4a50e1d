"""``describe(student)``: per layer, the real weight bits, input bits and onnxruntime kernel.

Read from the student's graph, by the rules onnxruntime's QDQ fusion applies on the CPU
(default optimisation level, onnxruntime 1.2x): a conv whose input is a quantizer's codes
and whose output (after its BatchNorm) goes straight into a quantizer runs as QLinearConv;
anything else runs in float, and the row says why. Linear layers run as float Gemm
(onnxruntime fuses QGemm only for weights with an explicit zero point, which lowbit's int8
weights do not carry: ``lowbit._backend.integer_kernel``); their weights are still stored at
their bits. Float activations (SiLU,
GELU, ...) run in float between quantizers; Sigmoid and LeakyReLU have integer lookup
kernels (QLinearSigmoid, QLinearLeakyRelu). ``lowbit.export`` counts the kernels of the
optimised graph and notes every conv/linear left in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from .._backend import INTEGER_KERNELS
from . import _brevitas
from ._quantize import (
    ADDS,
    FLOAT_ACTIVATIONS,
    MULS,
    is_quantizer,
    layer_end,
    quantized_downstream,
    source,
)

# float activation -> what onnxruntime runs between its quantizers
_ACTIVATION_KERNELS = {nn.SiLU: "float Sigmoid+Mul", nn.Hardswish: "float HardSwish",
                       nn.GELU: "float Erf (GELU)", nn.Hardsigmoid: "float HardSigmoid",
                       nn.Sigmoid: "QLinearSigmoid", nn.LeakyReLU: "QLinearLeakyRelu"}


@dataclass(frozen=True)
class LayerDescription:
    """One row of :func:`describe`."""

    name: str  # module path in the student, or fx node name of an add/mul
    op: str  # Conv1d, Conv2d, Linear, SiLU, add, ...
    weight_bits: int | None  # None: no weights
    input_bits: int | None  # bits of the codes the op reads; None: float input
    kernel: str  # what onnxruntime runs (an integer kernel's name, or "float ... (why)")

    @property
    def integer(self) -> bool:
        return self.kernel in INTEGER_KERNELS


class Description(tuple):
    """The rows of :func:`describe`; ``str()`` is a table."""

    def __str__(self) -> str:
        head = ("layer", "op", "w bits", "in bits", "onnxruntime kernel")
        rows = [head] + [(r.name, r.op, "-" if r.weight_bits is None else str(r.weight_bits),
                          "float" if r.input_bits is None else str(r.input_bits), r.kernel)
                         for r in self]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True))
                         + "  " + row[4] for row in rows)


def _bits(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """Bits of the codes ``node``'s value is held in (None: float)."""
    node = source(gm, node)
    if not is_quantizer(gm, node):
        return None
    return _brevitas.act_params(gm.get_submodule(node.target))[0]


def _weighted_row(gm: fx.GraphModule, node: fx.Node) -> LayerDescription:
    m = gm.get_submodule(node.target)
    op = type(m).__name__.removeprefix("Quant")
    _, _, w_bits = _brevitas.weight_codes(m)
    in_bits = _bits(gm, node.args[0])
    end, _ = layer_end(gm, node)
    while end.users and len(end.users) == 1 and \
            isinstance(_module(gm, next(iter(end.users))), _brevitas.IntegerBias):
        end = next(iter(end.users))
    out_quantized = quantized_downstream(gm, end)
    logits = all(u.op == "output" for u in end.users)
    if in_bits is None:
        kernel = f"float {op} (input not quantized: add requant_bits)"
    elif op == "Linear":
        kernel = "float Gemm (onnxruntime fuses QGemm only for weights with a zero point)"
    elif out_quantized:
        kernel = "QLinearConv"
    elif logits:
        kernel = f"float {op} (float logits: onnxruntime fuses only a conv whose output is " \
                 f"quantized)"
    else:
        kernel = f"float {op} (output not quantized: add residual_bits/requant_bits)"
    return LayerDescription(node.target, op, w_bits, in_bits, kernel)


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def describe(student: fx.GraphModule) -> Description:
    """Every conv/linear, float activation and residual add/mul of a lowbit student, in forward
    order, with its real weight bits, input bits and the onnxruntime kernel that runs it."""
    if not isinstance(student, fx.GraphModule) or getattr(student, "lowbit_quant", None) is None:
        raise TypeError("describe() takes a student made by lowbit.quantize")
    rows = []
    for node in student.graph.nodes:
        m = _module(student, node)
        if m is not None and _brevitas.is_quant_layer(m):
            rows.append(_weighted_row(student, node))
        elif m is not None and type(m) in FLOAT_ACTIVATIONS:
            rows.append(LayerDescription(node.target, type(m).__name__, None,
                                         _bits(student, node.args[0]),
                                         _ACTIVATION_KERNELS[type(m)]))
        elif node.op == "call_function" and node.target in ADDS | MULS:
            ins = [_bits(student, a) for a in node.args[:2] if isinstance(a, fx.Node)]
            op = "add" if node.target in ADDS else "mul"
            integer = all(b is not None for b in ins) and \
                all(is_quantizer(student, u) for u in node.users)
            kernel = f"QLinear{op.capitalize()}" if integer else f"float {op.capitalize()}"
            rows.append(LayerDescription(node.name, op, None,
                                         min((b for b in ins if b), default=None), kernel))
    return Description(rows)
