"""The layer graph both front ends build, and the fusion that turns it into the deployed graph.

A front end (PyTorch or ONNX) emits :class:`Op` s in execution order; :func:`fuse` folds them
into :class:`Layer` s the way an inference engine runs them, so the two front ends agree:

- BatchNorm directly after a conv/linear is folded into it: its scale goes into the weights,
  its shift becomes the layer's bias (``C_out`` parameters; none if the layer had one already).
  This is what ``torch.onnx.export`` and lowbit's exporter do, so a PyTorch model with BN and
  its ONNX file report the same parameters.
- Element-wise unary ops (ReLU, clip, quantize/dequantize, cast) run in place on their
  producer's output when they are its only consumer: no new tensor; a quantizer sets the
  bit width the tensor is held at.
- Views (flatten, reshape, squeeze) alias their input.
- A per-channel affine op (BatchNorm, a bias add) that cannot fold, or any other element-wise
  op with constant operands (a position embedding added to the tokens, a normalisation's
  affine parameters), runs in place like a unary op, and its parameters stay counted.
- Conv, linear, a product of two activations (attention), pooling, residual add and concat
  each produce a new activation tensor.

Torch-free: the ONNX front end uses this module without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

FP32 = 32

# Op kinds a front end emits.
INPUT = "input"  # the network input
CONV = "conv"
LINEAR = "linear"
MATMUL = "matmul"  # a product of two activations (attention scores, their weighting of values)
AFFINE = "affine"  # per-channel scale + shift (BatchNorm): folded into a preceding conv/linear
UNARY = "unary"  # element-wise, in place when possible; ``bits`` set for quantizers
VIEW = "view"  # aliases its input
ADD = "add"  # element-wise over two or more activations (residual add, mul)
CONCAT = "concat"
POOL = "pool"
WEIGHTED = (CONV, LINEAR)


@dataclass(frozen=True)
class Param:
    """One stored parameter tensor of a layer: ``role`` is weight|scale|zero_point|bias|table|
    padding (codes stored to fill a block, not parameters); ``bits`` per element may be
    fractional (trits: five ternary codes per byte, 1.6)."""

    role: str
    elements: int
    bits: float

    @property
    def nbytes(self) -> int:
        """Bytes packed densely: ``ceil(elements * bits / 8)`` (ONNX INT2/INT4 raw layout)."""
        return math.ceil(self.elements * self.bits / 8)


@dataclass
class Op:
    """One operation as a front end sees it; ``shape`` is the output shape for batch 1."""

    name: str
    kind: str
    inputs: list[str]
    output: str
    shape: tuple[int, ...]
    params: list[Param] = field(default_factory=list)
    macs: int = 0  # per sample
    bits: int | None = None  # quantizer: bits its output is held at; INPUT: input bits


@dataclass(frozen=True)
class Layer:
    """One step of the deployed graph: it allocates ``output``, of ``shape`` per sample."""

    name: str
    kind: str
    inputs: tuple[str, ...]
    output: str
    shape: tuple[int, ...]
    params: tuple[Param, ...]
    macs: int
    act_bits: int
    fused: tuple[str, ...]  # names of the ops folded into this layer

    @property
    def elements(self) -> int:
        """Output activation elements per sample."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Graph:
    """Layers in execution order, the graph outputs, and where they came from."""

    source: str
    layers: tuple[Layer, ...]
    outputs: tuple[str, ...]


def out_channels(kind: str, shape: tuple[int, ...]) -> int:
    """Output channels of a conv ([C, H, W] per sample) or linear ([..., F]) output."""
    return shape[0] if kind == CONV else shape[-1]


def fuse(source: str, ops: list[Op], outputs: list[str]) -> Graph:
    """Fold BN, in-place element-wise ops and views into the layers that an engine runs."""
    consumers: dict[str, int] = {}
    for op in ops:
        for t in op.inputs:
            consumers[t] = consumers.get(t, 0) + 1
    alias: dict[str, str] = {}  # tensor -> tensor it shares memory with
    layers: dict[str, dict] = {}  # output tensor -> mutable layer fields, in order
    inplace_ok: dict[str, bool] = {}  # a BN can still fold (nothing non-linear applied yet)

    def resolve(t: str) -> str:
        while t in alias:
            t = alias[t]
        return t

    def new_layer(op: Op, inputs: list[str], params: list[Param]) -> None:
        layers[op.output] = {"name": op.name, "kind": op.kind, "inputs": tuple(inputs),
                             "output": op.output, "shape": op.shape, "params": params,
                             "macs": op.macs, "act_bits": op.bits or FP32, "fused": [op.name]}
        inplace_ok[op.output] = op.kind in WEIGHTED

    for op in ops:
        ins = [resolve(t) for t in op.inputs]
        src = layers.get(ins[0]) if len(ins) == 1 else None
        sole = len(op.inputs) == 1 and consumers.get(op.inputs[0], 0) == 1
        if op.kind == VIEW:
            alias[op.output] = ins[0]
        elif op.kind in (UNARY, AFFINE) and src is not None and sole:
            alias[op.output] = ins[0]
            src["fused"].append(op.name)
            if op.kind == AFFINE and inplace_ok[ins[0]] and _per_channel(op, src):
                # folded: its scale goes into the weights, its shift into the bias
                if not any(p.role == "bias" for p in src["params"]):
                    src["params"].append(Param("bias", out_channels(src["kind"],
                                                                    src["shape"]), FP32))
            else:  # in place; its own parameters (a lookup table, affine ones) stay stored
                src["params"].extend(op.params)
                inplace_ok[ins[0]] = False
            if op.bits is not None:  # a quantizer sets the bits the tensor is held at
                src["act_bits"] = min(src["act_bits"], op.bits)
        else:
            new_layer(op, ins, list(op.params))
    outs = tuple(resolve(t) for t in outputs)
    return Graph(source, tuple(Layer(**{**d, "params": tuple(d["params"]),
                                        "fused": tuple(d["fused"])}) for d in layers.values()),
                 outs)


def _per_channel(op: Op, src: dict) -> bool:
    """Whether ``op``'s parameters are one per output channel of the layer ``src``."""
    channels = out_channels(src["kind"], src["shape"])
    return all(p.elements == channels for p in op.params)


def with_bits(layer: Layer, weight_bits: int | None, act_bits: int | None) -> Layer:
    """``layer`` as if its weights were stored at ``weight_bits`` and output held at
    ``act_bits`` (None keeps the model's own). Sub-32-bit weights get one fp32 scale per
    output channel when they had none; fp32 weights need no scales or zero points."""
    params = list(layer.params)
    weight = next((p for p in params if p.role == "weight"), None)  # None: shared, counted
    if weight_bits is not None and weight is not None:  # at the first layer using it
        quant = [p for p in params if p.role in ("scale", "zero_point")]
        if weight_bits >= FP32:
            quant = []
        elif not quant:
            quant = [Param("scale", out_channels(layer.kind, layer.shape), FP32)]
        params = [replace(weight, bits=weight_bits), *quant,
                  *(p for p in params if p.role == "bias")]
    return replace(layer, params=tuple(params),
                   act_bits=act_bits if act_bits is not None else layer.act_bits)
