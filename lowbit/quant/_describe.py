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

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .. import _ops
from .._backend import INTEGER_KERNELS, fused_kernel
from . import _brevitas
from ._quantize import is_quantizer, layer_end, quantized_downstream, source


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
    elif op == "Linear" and _rank(node.args[0]) > 2:  # exported as MatMul
        kernel = fused_kernel("MatMul")
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


def _rank(node: fx.Node) -> int:
    """Dims of ``node``'s value as the last shape propagation saw it (2 when unknown)."""
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else 2


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _folded(gm: fx.GraphModule, norm: fx.Node, modules: dict) -> bool:
    """Whether the exporter folds BatchNorm ``norm`` into the conv/linear before it."""
    layer = norm.args[0]
    return isinstance(layer, fx.Node) and layer.op == "call_module" and \
        _brevitas.is_quant_layer(modules[layer.target]) and layer_end(gm, layer)[1] is norm


def _row(gm: fx.GraphModule, node: fx.Node, modules: dict) -> LayerDescription | None:
    """The row of one node (None: not described): conv/linear, float activation, add/mul,
    and float ops onnxruntime has no integer kernel for (the registry's reason)."""
    m = modules.get(node.target) if node.op == "call_module" else None
    if m is not None and _brevitas.is_quant_layer(m):
        return _weighted_row(gm, node)
    op = _ops.lookup(node, modules)
    if op is None:
        return None
    name = node.target if m is not None else node.name
    if op.role == _ops.FLOAT_ACT:
        return LayerDescription(name, type(m).__name__, None, _bits(gm, node.args[0]),
                                fused_kernel(op.onnx) or f"float {op.onnx}")
    if op.role in (_ops.ADD, _ops.MUL):
        ins = [_bits(gm, a) for a in node.args[:2] if isinstance(a, fx.Node)]
        integer = all(b is not None for b in ins) and \
            all(is_quantizer(gm, u) for u in node.users)
        kernel = fused_kernel(op.onnx) if integer else f"float {op.onnx}"
        return LayerDescription(name, op.role, None, min((b for b in ins if b), default=None),
                                kernel)
    if op.role == _ops.NORM and not _folded(gm, node, modules):
        return LayerDescription(name, type(m).__name__, None, _bits(gm, node.args[0]),
                                f"float {op.onnx} (not after a conv/linear: nothing to fold "
                                f"it into)")
    if op.role == _ops.FLOAT and op.why:
        what = type(m).__name__ if m is not None else getattr(node.target, "__name__", op.onnx)
        arg = node.args[0] if node.args else None
        return LayerDescription(name, what, None,
                                _bits(gm, arg) if isinstance(arg, fx.Node) else None,
                                f"float {op.onnx} ({op.why})")
    return None


def describe(student: fx.GraphModule, example_input: torch.Tensor | None = None
             ) -> Description:
    """Every conv/linear, float activation, residual add/mul and float op without an integer
    kernel of a lowbit student, in forward order, with its real weight bits, input bits and
    the onnxruntime kernel that runs it. With ``example_input`` the shapes are propagated
    first, so a Linear applied to more than two dims (exported as MatMul) is told apart."""
    if not isinstance(student, fx.GraphModule) or getattr(student, "lowbit_quant", None) is None:
        raise TypeError("describe() takes a student made by lowbit.quantize")
    if example_input is not None:
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad():
                ShapeProp(student).propagate(example_input)
        finally:
            student.train(was_training)
    modules = dict(student.named_modules())
    return Description(row for node in student.graph.nodes
                       if (row := _row(student, node, modules)) is not None)
