"""ONNX front end: an .onnx file -> layer graph, with onnx + numpy only (no torch).

Shapes come from ONNX shape inference with the batch dimension set to 1; shape arithmetic the
exporter left to run time (``x.size()``-computed views, Resize sizes) is constant-folded at
batch 1 with onnx's reference evaluator and inferred again. What each op is comes from
``lowbit._backend.ONNX_FOOTPRINT``. Weight bit widths are
the element types of the initializers as stored (INT2 = 2 bits, packed four per byte; INT4 = 4;
INT8 = 8; FLOAT = 32), so the weight bytes reported are the bytes the file holds. A layer's
weight initializers are everything constant that feeds its weight and bias inputs (through
DequantizeLinear, Cast, Reshape, ...): the largest is the weight codes, other floats are scales,
other integers zero points. An initializer shared by several layers is counted once. Constants
that feed activation quantizers (their scale and zero point) are not weights, nor are int64
shape constants. Trit-packed ternary weights (lowbit's default) count 1.6 bits per code, and
their shared decoding table once, at the first layer that uses it.
MatMulNBits (com.microsoft) layers count their codes at the node's ``bits``, the padding of
the last block along K as stored bytes (not parameters), block scales, zero points and bias.
Constant tensors that element-wise ops and normalisations read (a position embedding added to
the tokens, a layer scale, LayerNorm's scale and shift) are their parameters; scalars and
Constant-node literals are not. A product of two activations (attention's MatMul) costs its
MACs; a Gather with constant indices (``qkv[0]``) is a view; ``x * f(x)`` chains (GELU's Erf,
SiLU's Sigmoid + Mul) are one element-wise op, as in PyTorch.
An activation tensor's bits are those of the narrowest QuantizeLinear applied to it in place
(an integer Clip to constant bounds [lo, hi] narrows it to ceil(log2(hi - lo + 1)) bits),
otherwise its own element type (32 for float).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

from .. import _integrity
from .._backend import NBITS_DOMAIN, NBITS_OP, ONNX_FOOTPRINT, ONNX_NORMS
from .._onnx_meta import TRITS_BITS, TRITS_TABLE
from ..errors import FootprintError
from ._graph import (
    ADD,
    AFFINE,
    CONCAT,
    CONV,
    FP32,
    INPUT,
    LINEAR,
    MATMUL,
    UNARY,
    Graph,
    Op,
    Param,
    fuse,
)

_BITS = {TensorProto.FLOAT: 32, TensorProto.DOUBLE: 64, TensorProto.FLOAT16: 16,
         TensorProto.BFLOAT16: 16, TensorProto.INT64: 64, TensorProto.UINT64: 64,
         TensorProto.INT32: 32, TensorProto.UINT32: 32, TensorProto.INT16: 16,
         TensorProto.UINT16: 16, TensorProto.INT8: 8, TensorProto.UINT8: 8,
         TensorProto.BOOL: 8, TensorProto.INT4: 4, TensorProto.UINT4: 4,
         TensorProto.INT2: 2, TensorProto.UINT2: 2, TensorProto.FLOAT8E4M3FN: 8,
         TensorProto.FLOAT8E4M3FNUZ: 8, TensorProto.FLOAT8E5M2: 8,
         TensorProto.FLOAT8E5M2FNUZ: 8, TensorProto.FLOAT4E2M1: 4}
_FLOATS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
SUPPORTED = sorted(ONNX_FOOTPRINT)


def load(model: str | Path | onnx.ModelProto,
         input_shape: tuple[int, ...] | None = None, allow_modified: bool = False) -> Graph:
    """Read an ONNX model (path or proto) into a layer graph at batch 1; a lowbit export whose
    weights or graph changed since export is refused unless ``allow_modified``."""
    source = str(model) if not isinstance(model, onnx.ModelProto) else model.graph.name
    proto = _read(model, allow_modified) if not isinstance(model, onnx.ModelProto) else model
    if not proto.graph.node:
        raise FootprintError(f"{source}: the ONNX graph has no nodes (not an ONNX model?)")
    unknown = sorted({f"{n.op_type} (node {n.name or '?'})" for n in proto.graph.node
                      if n.op_type not in ONNX_FOOTPRINT or n.domain not in (
                          "", "ai.onnx", NBITS_DOMAIN if n.op_type == NBITS_OP else "")})
    if unknown:
        raise FootprintError(f"{source}: cannot account for {len(unknown)} op(s): "
                             f"{', '.join(unknown[:12])}{' ...' if len(unknown) > 12 else ''}; "
                             f"supported ops: {', '.join(SUPPORTED)}")
    proto = _unit_batch(proto, source, input_shape)
    return _build(proto, source)


def _read(path: str | Path, allow_modified: bool) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise FootprintError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, external data OSError, ...
        raise FootprintError(f"{path}: not a readable ONNX file ({str(exc)[:120]})") from None
    _integrity.check(path, {p.key: p.value for p in proto.metadata_props}, allow_modified)
    return proto


def _unit_batch(proto: onnx.ModelProto, source: str,
                input_shape: tuple[int, ...] | None) -> onnx.ModelProto:
    """A copy with batch 1 (and ``input_shape`` if given) on the inputs, shapes inferred."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    del m.graph.value_info[:]
    inits = {i.name for i in m.graph.initializer}
    n_inputs = len(m.graph.input)
    for i, value in enumerate([*m.graph.input, *m.graph.output]):
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        if i < n_inputs:
            if not dims:
                raise FootprintError(f"{source}: input {value.name!r} has no shape information;"
                                     f" export with a static input shape")
            if input_shape is not None:
                if len(input_shape) != len(dims) - 1:
                    raise FootprintError(f"{source}: input {value.name!r} has {len(dims)} dims, "
                                         f"input_shape {tuple(input_shape)} gives "
                                         f"{len(input_shape)} + batch")
                for d, v in zip(dims[1:], input_shape, strict=True):
                    d.dim_value = int(v)
            free = [d.dim_param or "?" for d in dims[1:] if not d.dim_value]
            if free:
                raise FootprintError(f"{source}: input {value.name!r} has symbolic dims "
                                     f"{free}; pass input_shape=(C, H, W) / --input-shape")
        if dims:
            dims[0].dim_value = 1
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)
        # sizes computed at run time, known at batch 1; outputs of contrib ops
        while _fold_shapes(m.graph) or _nbits_shapes(m.graph):
            m = onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError, ValidationError
        raise FootprintError(f"{source}: ONNX shape inference failed: "
                             f"{str(exc).splitlines()[0][:200]}") from None
    return m


_SMALL = 64  # constants up to this many elements can take part in shape arithmetic


def _nbits_shapes(g: onnx.GraphProto) -> bool:
    """Shapes of MatMulNBits outputs, which ONNX shape inference does not know: A's with the
    last dim N. Whether any was added."""
    types = {v.name: v.type.tensor_type for v in [*g.input, *g.value_info, *g.output]}
    added = False
    for n in (n for n in g.node if n.op_type == NBITS_OP):
        dims = _dims(types.get(n.input[0]))
        if dims and _dims(types.get(n.output[0])) is None:
            g.value_info.append(onnx.helper.make_tensor_value_info(
                n.output[0], _elem(types[n.input[0]]), [*dims[:-1], _attr(n, "N", 0)]))
            added = True
    return added


def _fold_shapes(g: onnx.GraphProto) -> bool:
    """Constant-fold the shape arithmetic of ``g`` in place (onnx's reference evaluator):
    each Shape of a tensor whose shape is inferred, and every node computed from such shapes
    and from small int64 initializers and Constant nodes (Gather, Div, Concat, Cast, ...)
    becomes an initializer, so Reshape and Resize read constant sizes and scales (weight
    decoding, from other initializers, stays). Whether anything was folded."""
    types = {v.name: v.type.tensor_type for v in [*g.input, *g.value_info, *g.output]}
    known = {i.name: numpy_helper.to_array(i) for i in g.initializer
             if math.prod(i.dims) <= _SMALL}
    folded: set[str] = set()
    literals: set[str] = set()  # Constant nodes' outputs (Resize scales, axes)
    for n in g.node:
        ins = [t for t in n.input if t]
        dims = _dims(types.get(n.input[0])) if n.op_type == "Shape" else None
        if n.op_type == "Constant" or (ins and all(t in known for t in ins) and all(
                t in folded or t in literals or known[t].dtype == np.int64 for t in ins)):
            values = ReferenceEvaluator(n).run(None, {t: known[t] for t in ins})
            (literals if n.op_type == "Constant" else folded).update(n.output)
            known.update((t, v) for t, v in zip(n.output, values, strict=True)
                         if n.op_type != "Constant" or v.size <= _SMALL)
        elif dims and min(dims) > 0:
            known[n.output[0]] = np.array(dims[_attr(n, "start", 0):_attr(n, "end", len(dims))],
                                          np.int64)
            folded.add(n.output[0])
    if not folded:
        return False
    keep = [n for n in g.node if not set(n.output) <= folded]
    read = {t for n in keep for t in n.input} | {v.name for v in g.output}
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(numpy_helper.from_array(np.asarray(known[t]), t)
                         for t in sorted(folded & read))
    return True


def _module_path(name: str) -> str:
    """'/layer2/layer2.0/shortcut/shortcut.0/Conv' -> 'layer2.0.shortcut.0' (torch's scope
    names; '/Add' -> ''); other names are kept."""
    if not name.startswith("/"):
        return name
    path: list[str] = []
    for p in [p for p in name.split("/") if p][:-1]:
        if path and p.startswith(path[-1] + "."):
            path[-1] = p
        else:
            path.append(p)
    return ".".join(path)


def _constants(g: onnx.GraphProto, types: dict) -> tuple[dict, set[str], dict]:
    """(constant tensors -> (dims, element type), shape-plumbing tensors, producer per tensor):
    initializers, Constant outputs and what is computed from constants alone."""
    consts = {i.name: (tuple(i.dims), i.data_type) for i in g.initializer}
    producer: dict[str, onnx.NodeProto] = {}
    meta: set[str] = set()
    for n in g.node:
        for t in n.output:
            producer[t] = n
        ins = [t for t in n.input if t]
        if n.op_type == "Constant":
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            dims = tuple(value.dims) if value is not None else ()
            consts[n.output[0]] = (dims, value.data_type if value is not None else 1)
        elif ONNX_FOOTPRINT.get(n.op_type, "") is None or (
                ins and all(t in consts or t in meta for t in ins)
                and any(t in meta for t in ins)):
            meta.update(n.output)
        elif ins and all(t in consts for t in ins):
            for t in n.output:  # constant subgraph (DequantizeLinear of weights, Cast, ...)
                consts[t] = (_dims(types.get(t)) or (), _elem(types.get(t)))
    return consts, meta, producer


class _Builder:
    """Reads one ONNX graph into footprint ``Op`` s: which constants are a layer's weights,
    its bias, its scales and zero points, and per node the kind, shape and bits."""

    def __init__(self, proto: onnx.ModelProto, source: str) -> None:
        g = self.g = proto.graph
        self.source = source
        self.types = {v.name: v.type.tensor_type for v in [*g.input, *g.value_info, *g.output]}
        self.consts, self.meta, self.producer = _constants(g, self.types)
        self.literals = {n.output[0] for n in g.node if n.op_type == "Constant"}
        self.inits = {i.name for i in g.initializer} | self.literals
        # scales / zero points / clip bounds of activation quantizers (a layer's int32 bias
        # scale reuses its input quantizer's scale): not weights
        self.act_consts = {t for n in g.node
                           if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Clip")
                           and n.input[0] not in self.consts for t in n.input[1:]
                           if t in self.inits}
        self.claimed: set[str] = set()

    def sources(self, t: str) -> list[str]:
        """Initializers (and Constant outputs) a constant tensor is computed from."""
        if t in self.inits:
            return [t]
        n = self.producer.get(t)
        return [s for i in (n.input if n else ()) if i for s in self.sources(i)]

    def params(self, t: str, main: str) -> list[Param]:
        """Parameters stored for a weight (main="weight") or bias (main="bias") input."""
        consts = self.consts
        everything = list(dict.fromkeys(self.sources(t)))
        # int64 initializers are shapes and indices (graph plumbing), not weight data
        found = [s for s in everything if s not in self.claimed and s != TRITS_TABLE
                 and s not in self.act_consts and consts[s][1] != TensorProto.INT64]
        self.claimed.update(found)
        # the stored codes first: integer-typed in a quantized file (the trit bytes of a small
        # layer are fewer than its float scales), else the largest tensor
        found.sort(key=lambda s: (consts[s][1] in _FLOATS and TRITS_TABLE in everything,
                                  -math.prod(consts[s][0])))
        out = []
        for i, s in enumerate(found):
            dims, elem = consts[s]
            role = main if i == 0 else ("scale" if elem in _FLOATS else "zero_point")
            if i == 0 and TRITS_TABLE in everything:  # trit bytes: count the codes they hold
                out.append(Param(role, math.prod(consts[t][0]), TRITS_BITS))
            else:
                out.append(Param(role, math.prod(dims), _BITS.get(elem, FP32)))
        if TRITS_TABLE in everything and TRITS_TABLE not in self.claimed:
            self.claimed.add(TRITS_TABLE)
            out.append(Param("table", math.prod(consts[TRITS_TABLE][0]), 8))
        return out

    def shape(self, t: str) -> tuple[int, ...] | None:
        """Per-sample shape; None unless the rank and every dim are known."""
        dims = _dims(self.types.get(t))
        return dims[1:] if dims and min(dims) > 0 else None

    def layer(self, n: onnx.NodeProto, kind: str, out_shape: tuple[int, ...]
              ) -> tuple[list[Param], int]:
        """(parameters, MACs) of a conv/linear node."""
        if n.op_type == NBITS_OP:
            return self.nbits(n, out_shape)
        ps = self.params(n.input[1], "weight") + (self.params(n.input[2], "bias")
                                                   if len(n.input) > 2 and n.input[2] else [])
        w = _dims(self.types.get(n.input[1])) or self.consts[n.input[1]][0]
        in_features = w[0] if n.op_type == "MatMul" or (
            n.op_type == "Gemm" and not _attr(n, "transB", 0)) else w[-1]
        fan_in = math.prod(w[1:])
        if n.op_type == "ConvTranspose":  # weight [C_in, C_out / g, k...]: per output value
            strides = next((list(a.ints) for a in n.attribute if a.name == "strides"), [1])
            fan_in = w[0] // _attr(n, "group", 1) * math.prod(w[2:]) // math.prod(strides)
        return ps, math.prod(out_shape) * (fan_in if kind == CONV else in_features)

    def nbits(self, n: onnx.NodeProto, out_shape: tuple[int, ...]) -> tuple[list[Param], int]:
        """(parameters, MACs) of a com.microsoft MatMulNBits node: N x K codes of ``bits``
        bits and the padding of the last block along K (stored, not parameters), block
        scales, zero points if given, bias (input 5); each output element sums K products."""
        bits, k, n_out = _attr(n, "bits", 4), _attr(n, "K", 0), _attr(n, "N", 0)
        ps = self.params(n.input[1], "weight")
        if ps and ps[0].bits == 8:  # uint8 bytes holding 8 / bits codes each
            stored = ps[0].elements * 8 // bits
            ps[0:1] = [Param("weight", n_out * k, bits)] + (
                [Param("padding", stored - n_out * k, bits)] if stored > n_out * k else [])
        for i, role in ((2, "scale"), (3, "zero_point"), (5, "bias")):
            if len(n.input) > i and n.input[i]:
                ps += self.params(n.input[i], role)
        return ps, math.prod(out_shape) * k

    def operands(self, n: onnx.NodeProto, kind: str) -> list[Param]:
        """Stored tensors an element-wise op or a normalisation reads (a shift added, a scale
        multiplied, a position embedding; a normalisation's scale and shift). Scalars are
        hyperparameters and Constant nodes literals the exporter wrote (the unit scale of
        the InstanceNormalization that GroupNorm exports as): neither is counted."""
        if n.op_type in ONNX_NORMS:
            roles = zip(n.input[1:3], ("scale", "bias"), strict=False)
        else:
            roles = [(t, "bias" if kind == AFFINE else "scale") for t in n.input]
        return [p for t, role in roles if t in self.consts and t not in self.act_consts
                and math.prod(self.consts[t][0]) > 1
                and not set(self.sources(t)) <= self.literals for p in self.params(t, role)]

    def op(self, n: onnx.NodeProto, out_shape: tuple[int, ...]) -> Op:
        """The footprint ``Op`` of a node that computes on activations."""
        out = n.output[0]
        acts = [t for t in n.input if t and t not in self.consts and t not in self.meta]
        kind, ps, macs, bits = _classify(n, acts, self.consts)
        if kind in (CONV, LINEAR):
            ps, macs = self.layer(n, kind, out_shape)
        elif kind == MATMUL:  # [..., N, K] @ [..., K, M]: K products per output element
            macs = math.prod(out_shape) * _dims(self.types.get(acts[0]))[-1]
        elif kind in (AFFINE, UNARY) and n.op_type != "BatchNormalization" and not ps:
            ps = self.operands(n, kind)
        if n.op_type == "QuantizeLinear" or (n.op_type == "Gather" and kind == UNARY):
            bits = _BITS.get(_elem(self.types.get(out)), FP32)
        elif n.op_type == "Clip" and _elem(self.types.get(out)) not in _FLOATS:
            bits = _clip_bits(n, self.g)
        name = _module_path(n.name) if n.name else out
        if kind in (ADD, CONCAT):
            name = ".".join(p for p in (name, n.op_type.lower()) if p)
        return Op(name or n.name, kind, acts, out, out_shape, ps, macs, bits)

    def graph(self) -> Graph:
        """Every node's Op, fused (``_graph.fuse``); FootprintError where shapes are missing."""
        g, consts = self.g, self.consts
        inputs = [v.name for v in g.input if v.name not in consts]
        ops = [Op(name, INPUT, [], name, self.shape(name) or (),
                  bits=_BITS.get(_elem(self.types[name]), FP32)) for name in inputs]
        missing: list[str] = []
        gated = _self_gated(g, consts)
        for n in g.node:
            if n.op_type == "Constant" or n.output[0] in consts or n.output[0] in self.meta \
                    or gated.get(n.output[0], "") is None:
                continue
            if n.op_type == "Gather" and n.input[0] not in consts and n.input[1] not in consts:
                raise FootprintError(f"{self.source}: Gather of activations by activations "
                                     f"({n.output[0]}) is not accounted; only a constant "
                                     f"table or constant indices are")
            out_shape = self.shape(n.output[0])
            if out_shape is None:
                missing.append(f"{n.output[0]} ({n.op_type})")
            elif n.output[0] in gated:  # the whole chain: one element-wise op on its input
                ops.append(Op(_module_path(n.name) or n.output[0], UNARY, [gated[n.output[0]]],
                              n.output[0], out_shape))
            else:
                ops.append(self.op(n, out_shape))
        if missing:
            raise FootprintError(f"{self.source}: no shape information for {len(missing)} "
                                 f"tensor(s): {', '.join(missing[:8])}"
                                 f"{' ...' if len(missing) > 8 else ''}; the graph needs static "
                                 f"shapes apart from the batch dimension")
        return fuse(self.source, ops, [v.name for v in g.output])


def _build(proto: onnx.ModelProto, source: str) -> Graph:
    return _Builder(proto, source).graph()


def _classify(n: onnx.NodeProto, acts: list[str], consts: dict) -> tuple:
    """(kind, params, macs, bits) of a node that computes on activations."""
    op, kind = n.op_type, ONNX_FOOTPRINT[n.op_type]
    if kind == CONV and n.input[1] not in consts:
        raise FootprintError(f"Conv node {n.name!r}: weights computed at run time are not "
                             f"supported (input {n.input[1]!r} is not a constant)")
    if kind in (LINEAR, MATMUL) and n.input[1] in consts:
        return LINEAR, [], 0, None  # a linear layer: a product with a constant weight
    if kind in (LINEAR, MATMUL):
        if op != "MatMul" or len(acts) != 2:
            raise FootprintError(f"{op} node {n.name!r}: only products with a constant weight "
                                 f"(linear layers) or of two activations are supported")
        return MATMUL, [], 0, None
    if op == "Gather" and n.input[0] in consts:  # a lookup table (raw pixels -> input codes)
        dims, elem = consts[n.input[0]]
        return UNARY, [Param("table", math.prod(dims), _BITS.get(elem, FP32))], 0, None
    if op == "BatchNormalization":
        channels = math.prod(consts[n.input[1]][0])
        return AFFINE, [Param("scale", channels, FP32), Param("bias", channels, FP32)], 0, None
    if kind == ADD and len(acts) == 1:
        const = next(t for t in n.input if t and t not in acts)
        per_channel = math.prod(consts[const][0]) > 1 if const in consts else False
        return (AFFINE if op in ("Add", "Sub") and per_channel else UNARY), [], 0, None
    return kind, [], 0, None


def _self_gated(g: onnx.GraphProto, consts: dict) -> dict[str, str | None]:
    """Element-wise functions of one activation that ONNX spells as ``x * f(x)`` (or
    ``x + f(x)``), ``f`` a chain of element-wise ops each read once: GELU as torch exports it,
    ``x * (erf(x / sqrt(2)) + 1)`` (times 0.5 after), SiLU as ``x * sigmoid(x)``. In PyTorch
    each is one op that runs in place; here: the product's output -> x, the chain's -> None."""
    producer = {t: n for n in g.node for t in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for t in n.input:
            readers[t] = readers.get(t, 0) + 1

    def chain(x: str, y: str) -> list[str] | None:  # y = f(x): the tensors of f, or None
        found = []
        while y != x:
            n = producer.get(y)
            ins = [t for t in n.input if t and t not in consts] if n is not None else []
            if len(ins) != 1 or readers.get(y) != 1 or \
                    ONNX_FOOTPRINT.get(n.op_type) not in (UNARY, ADD):
                return None
            found.append(y)
            y = ins[0]
        return found

    gated: dict[str, str | None] = {}
    for n in g.node:
        acts = [t for t in n.input if t and t not in consts]
        if ONNX_FOOTPRINT.get(n.op_type) != ADD or len(acts) != 2:
            continue
        for x, y in (acts, acts[::-1]):
            inner = chain(x, y)
            if inner:
                gated.update(dict.fromkeys(inner))
                gated[n.output[0]] = x
                break
    return gated


def _clip_bits(n: onnx.NodeProto, g: onnx.GraphProto) -> int | None:
    """Bits of integer codes clipped to constant [lo, hi]: ``ceil(log2(hi - lo + 1))``.

    lowbit's exporter holds 4-bit activation codes in uint8 and clips them to 0..15."""
    inits = {i.name: i for i in g.initializer}
    bounds = [inits.get(t) for t in n.input[1:3]]
    if len(bounds) != 2 or None in bounds:
        return None
    lo, hi = (int(numpy_helper.to_array(b)) for b in bounds)
    return max(1, math.ceil(math.log2(hi - lo + 1))) if hi > lo else 1


def _dims(t) -> tuple[int, ...] | None:
    if t is None or not t.HasField("shape"):
        return None
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    return dims


def _elem(t) -> int:
    return t.elem_type if t is not None else TensorProto.FLOAT


def _attr(n: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in n.attribute if a.name == name), default)
