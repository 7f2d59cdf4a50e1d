"""Graph rewrites from the traced float graph to lowbit's packed ONNX, one class per effect.

Each is a qonnx ``Transformation``: ``apply(model) -> (model, changed)`` over a qonnx
``ModelWrapper``, run with ``model.transform(Rewrite(...))`` until nothing changes. Applied in
order by ``lowbit.export._build``: ``RemoveStaticGraphInputs`` (qonnx) ->
:class:`FoldBatchNorm` -> :class:`FoldWeightTransposes` -> :class:`PackWeights` ->
:class:`QuantizeBias` ->
:class:`QuantizeActivations` -> :class:`SetOpset` -> :class:`ShareConstants` ->
:class:`DropDefaultAttributes` -> :class:`ShortenNames`; then, where residual adds are kept in
float, :class:`FloatResidualAdds` on the finished graph. Rewrites that name tensors record
them (``FoldBatchNorm.factors``, ``QuantizeActivations.codes``, ``ShortenNames.renamed``):
the exporter carries identities instead of finding tensors again by value.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation

from .. import _intmath
from .. import _onnx_meta as meta
from .._backend import (
    SAME_SINCE_18,
    SIGNED_OFFSET,
    UNSIGNED_WEIGHTS,
    activation_range,
    weight_axis,
)
from .._intmath import channel_shape
from ..errors import ExportError
from ._pack import make_tensor, trits_table
from ._trace import DOMAIN


def _weight_axis(node: onnx.NodeProto) -> int:
    """Output-channel axis of the weight (input 1) of a layer node (``lowbit._backend``)."""
    return weight_axis(node.op_type, next((a.i for a in node.attribute if a.name == "transB"), 0))


def _is_layer(node: onnx.NodeProto | None) -> bool:
    """Whether ``node`` is a conv/linear the exporter quantizes (Conv or Gemm)."""
    return node is not None and node.op_type in _LAYERS


_LAYERS = ("Conv", "Gemm", "MatMul")  # MatMul: a Linear on more than two dims


class FoldBatchNorm(Transformation):
    """Fold an inference BatchNormalization into the Conv/Gemm that alone feeds it.

    BN(y) = (y - mean) * f + beta with f = gamma / sqrt(var + eps), so the layer gets weight
    W * f (per output channel) and bias (b - mean) * f + beta; computed in float64. ``factors``
    keeps f (float64) per weight name: :class:`PackWeights` scales the layer's own scales by
    it instead of recovering them from the folded weight.
    """

    def __init__(self) -> None:
        super().__init__()
        self.factors: dict[str, np.ndarray] = {}

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        for bn in model.get_nodes_by_op_type("BatchNormalization"):
            layer = model.find_producer(bn.input[0])
            if not _is_layer(layer) or \
                    model.get_tensor_fanout(bn.input[0]) != 1:
                continue
            w = model.get_initializer(layer.input[1])
            params = [model.get_initializer(n) for n in bn.input[1:5]]
            if w is None or any(p is None for p in params) or \
                    model.get_tensor_fanout(layer.input[1]) != 1:
                continue
            eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
            bias = model.get_initializer(layer.input[2]) if len(layer.input) > 2 else None
            f, folded = _intmath.fold_batchnorm(bias, *params, eps)
            axis = _weight_axis(layer)
            self.factors[layer.input[1]] = f
            model.set_initializer(layer.input[1], (w.astype(np.float64) *
                                                   f.reshape(channel_shape(w.ndim, axis))
                                                   ).astype(np.float32))
            bias_name = layer.input[1].rsplit(".", 1)[0] + ".bias"
            if len(layer.input) > 2:
                bias_name = layer.input[2]
            else:
                layer.input.append(bias_name)
            model.set_initializer(bias_name, folded.astype(np.float32))
            layer.output[0] = bn.output[0]
            model.graph.node.remove(bn)
            return model, True
        return model, False


class FoldWeightTransposes(Transformation):
    """Fold the ``Transpose`` of a 2-d weight initializer in ``names`` into the initializer.

    torch exports a Linear applied to more than two dims (channels-last MLPs, ConvNeXt's) as
    MatMul(x, Transpose(W)); with the transpose folded, the MatMul reads ``W.T`` [in, out] by
    the weight's own name, so :class:`PackWeights` packs it (output channels on axis 1).
    ``transposed`` lists the weights folded so.
    """

    def __init__(self, names: frozenset[str]) -> None:
        super().__init__()
        self.names, self.transposed = names, set()

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        for node in model.get_nodes_by_op_type("Transpose"):
            w = model.get_initializer(node.input[0])
            if node.input[0] not in self.names or w is None or w.ndim != 2 or \
                    node.input[0] in self.transposed:
                continue
            name = node.input[0]
            model.set_initializer(name, np.ascontiguousarray(w.T))
            for user in model.find_consumers(node.output[0]):
                user.input[:] = [name if x == node.output[0] else x for x in user.input]
            model.graph.node.remove(node)
            self.transposed.add(name)
            return model, True
        return model, False


def check_codes(w: np.ndarray, q: np.ndarray, s: np.ndarray, axis: int, name: str) -> None:
    """Refuse a float weight ``w`` that is not ``q * s`` per channel (to 1e-5 relative): the
    layer's codes and scales do not describe the traced weight."""
    w64 = w.astype(np.float64)
    err = np.abs(w64 - _intmath.dequantize(q, s, axis, np.float64)).max(initial=0)
    if err > 1e-5 * max(np.abs(w64).max(initial=0), 1e-30):
        raise ExportError(f"{name}: weights are not integer codes times a per-channel scale "
                          f"(max error {err:.3g}); is the layer quantized per output channel?")


TRITS_TABLE = meta.TRITS_TABLE


def _decode_trits(model: ModelWrapper, src: str, shape: tuple[int, ...], name: str) -> str:
    """Nodes turning the trit bytes ``src`` into int8 codes of ``shape``; returns their output.

    Cast(bytes, INT32) -> Gather(table [243, 5], .) -> [m, 5] -> Reshape [5m] -> Slice [:n]
    -> Reshape ``shape`` (Gather takes int32/int64 indices only):
    all inputs are initializers, so onnxruntime folds the chain at load (weights decode once)
    and the int8 DequantizeLinear that follows fuses into integer kernels like the Cast form.
    """
    if model.get_initializer(TRITS_TABLE) is None:
        model.set_initializer(TRITS_TABLE, trits_table())
        model.set_initializer("trits_flat", np.array([-1], np.int64))
        model.set_initializer("trits_start", np.array([0], np.int64))
    model.set_initializer(name + "_n", np.array([int(np.prod(shape))], np.int64))
    model.set_initializer(name + "_shape", np.array(shape, np.int64))
    x = name + "_t0"
    model.graph.node.append(helper.make_node("Cast", [src], [x], to=TensorProto.INT32))
    model.graph.node.append(helper.make_node("Gather", [TRITS_TABLE, x], [name + "_t1"]))
    x = name + "_t1"
    for i, args in enumerate([["trits_flat"], ["trits_start", name + "_n"],
                              [name + "_shape"]], start=2):
        op = "Slice" if len(args) == 2 else "Reshape"
        model.graph.node.append(helper.make_node(op, [x, *args], [f"{name}_t{i}"]))
        x = f"{name}_t{i}"
    return x


class PackWeights(Transformation):
    """Replace float weights by packed integer codes and a per-channel DequantizeLinear.

    ``codes`` maps a weight initializer name to (int8 codes, storage "int2"|"int4"|"int8"|
    "uint8"|"trits", float32 per-channel scale of the student's layer; trits are decoded
    in-graph by :func:`_decode_trits`, uint8 codes + 128 carry zero point 128:
    ``lowbit._backend``'s overflow rule). ``factors``: the BatchNorm factor f folded into each
    weight (:class:`FoldBatchNorm`); the channel scale is scale * f (checked against the folded
    float weight), a negative one (negative BN gamma) flips the channel's codes so every
    stored scale is positive (``lowbit._intmath.stored_scale``).
    ``cast=True`` inserts ``Cast(to=INT8)`` after an INT2/INT4 initializer: onnxruntime folds
    it at load time, leaving the int8 DequantizeLinear pattern its QDQ fusion turns into
    integer kernels (QLinearConv), while the file still holds 2/4-bit weights.
    """

    def __init__(self, codes: dict[str, tuple[np.ndarray, str, np.ndarray]],
                 factors: dict[str, np.ndarray], cast: bool = True) -> None:
        super().__init__()
        self.codes, self.factors, self.cast = codes, factors, cast

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        for node in model.graph.node:
            if not _is_layer(node) or node.input[1] not in self.codes:
                continue
            name = node.input[1]
            w = model.get_initializer(name)
            if w is None:
                continue
            q, storage, scale = self.codes[name]
            q = np.asarray(q).astype(np.int8)
            axis = _weight_axis(node)
            if q.shape != w.shape:
                raise ExportError(f"{name}: codes of shape {q.shape} for a weight {w.shape}")
            s = np.asarray(scale, np.float64) * self.factors.get(name, 1.0)
            check_codes(w, q, s, axis, name)
            sign = np.where(s < 0, -1, 1).astype(np.int8)
            q = q * sign.reshape(channel_shape(q.ndim, axis))
            model.del_initializer(name)
            # the packed weight is named by its layer: "layer1.0.conv1.weight" -> "layer1.0.conv1"
            src = name.removesuffix(".weight")
            model.graph.initializer.append(make_tensor(src, q, storage))
            model.set_initializer(name + "_scale", _intmath.stored_scale(q, s, axis))
            args = [name + "_scale"]
            if storage == "trits":
                src = _decode_trits(model, src, q.shape, name)
            elif storage == UNSIGNED_WEIGHTS:  # codes + 128: the zero point says so
                model.set_initializer(name + "_zp", np.full(s.shape, SIGNED_OFFSET, np.uint8))
                args.append(name + "_zp")
            elif self.cast and storage != "int8":
                model.graph.node.append(helper.make_node("Cast", [src], [name + "_i8"],
                                                         to=TensorProto.INT8))
                src = name + "_i8"
            model.graph.node.append(helper.make_node(
                "DequantizeLinear", [src, *args], [name], axis=axis))
            return model, True  # ModelWrapper.transform's cleanup re-sorts the nodes
        return model, False


class QuantizeBias(Transformation):
    """Store the bias of each layer that consumes quantized codes as int32 + DequantizeLinear.

    ``input_scales`` maps a weight name (the DequantizeLinear output PackWeights leaves) to
    the float32 scale s_in of the quantizer feeding that layer. The bias (BatchNorm already
    folded) becomes round(b / (s_in * s_w[c])) as int32, the form integer kernels add to
    their accumulator; stated in the file, onnxruntime fuses it as is instead of rounding the
    float bias itself, and the student's eval mode rounds the same way (``IntegerBias``).
    The bias scale is ``Mul(s_in, s_w)`` of the initializers already there (onnxruntime
    folds it at load), not a third per-channel float vector.
    """

    def __init__(self, input_scales: dict[str, np.float32]) -> None:
        super().__init__()
        self.input_scales = input_scales

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        for node in model.graph.node:
            if not _is_layer(node) or len(node.input) < 3 or \
                    node.input[1] not in self.input_scales:
                continue
            bias = model.get_initializer(node.input[2])
            dq = model.find_producer(node.input[1])
            if bias is None or dq is None or dq.op_type != "DequantizeLinear":
                continue
            s_in = np.float32(self.input_scales[node.input[1]])
            step = _intmath.bias_step(s_in, model.get_initializer(dq.input[1]))
            codes = _intmath.bias_codes(bias, step)
            name = node.input[2]
            model.set_initializer(name + "_int", codes)
            model.set_initializer(name + "_s_in", np.asarray(s_in, np.float32))
            model.del_initializer(name)
            model.graph.node.append(helper.make_node(
                "Mul", [name + "_s_in", dq.input[1]], [name + "_scale"]))
            model.graph.node.append(helper.make_node(
                "DequantizeLinear", [name + "_int", name + "_scale"], [name], axis=0))
            return model, True
        return model, False


class FloatResidualAdds(Transformation):
    """Write each Add of two dequantized tensors (a residual add) as the equivalent ``Sum``.

    onnxruntime fuses DequantizeLinear -> Add -> QuantizeLinear into QLinearAdd, whose
    requantization is less precise than float: some output codes differ by one from exact
    rounding, and the flips propagate (README, Known limitations). It leaves ``Sum``
    unfused, so the add runs in float between the integer convolutions (still fused),
    exactly as the student computes it, at some latency (``benchmarks/runtime_speed.py``).
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        for node in model.graph.node:
            producers = [model.find_producer(x) for x in node.input]
            if node.op_type == "Add" and all(p is not None and p.op_type == "DequantizeLinear"
                                             for p in producers):
                node.op_type = "Sum"
        return model, False


def _attr(node: onnx.NodeProto, name: str):
    return helper.get_attribute_value(next(a for a in node.attribute if a.name == name))


class QuantizeActivations(Transformation):
    """Lower each ``lowbit::ActQuant`` to QuantizeLinear [-> Clip] -> DequantizeLinear.

    Every activation is stored as uint8 codes (``lowbit._backend.activation_range``):
    unsigned codes c as is (the saturation at 0
    is the ReLU), signed codes c as c + 128 (zero point 128), the form onnxruntime's x86
    integer kernels take (its own int8 -> uint8 conversion skips a quantizer whose codes
    feed two ops, or pass a Clip, and the conv before it then stays float). QuantizeLinear
    saturates to the 8-bit range; for fewer bits a Clip on the codes narrows it to
    [qmin, qmax] (+ 128 if signed), so y = clamp(round(x / s), qmin, qmax) * s exactly.
    ``codes`` maps each quantizer's name to the tensor of its stored codes (the
    QuantizeLinear output): the identity ``locate`` reads the file's codes by.
    """

    def __init__(self) -> None:
        super().__init__()
        self.codes: dict[str, str] = {}

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        for node in model.graph.node:
            if node.domain != DOMAIN or node.op_type != "ActQuant":
                continue
            name, bits, signed = _attr(node, "name"), _attr(node, "bits"), _attr(node, "signed")
            name = name.decode() if isinstance(name, bytes) else name
            scale = np.asarray(_attr(node, "scale"), np.float32)
            zp = np.asarray(_attr(node, "zero_point"))
            dtype = np.uint8
            lo, hi = activation_range(bits, bool(signed))
            per_channel = scale.size > 1
            zp = (zp + (SIGNED_OFFSET if signed else 0)).astype(dtype)
            if not per_channel:
                scale, zp = scale[0], zp[0]
            model.set_initializer(name + ".scale", np.asarray(scale, np.float32))
            qargs = [name + ".scale"]
            if zp.any():  # an absent zero point means uint8 zero: saves bytes
                model.set_initializer(name + ".zero_point", np.asarray(zp, dtype))
                qargs.append(name + ".zero_point")
            kw = {"axis": 1} if per_channel else {}
            idx = model.get_node_index(node)
            x, y = node.input[0], node.output[0]
            new = [helper.make_node("QuantizeLinear", [x, *qargs], [name + ".q"], **kw)]
            codes = self.codes[name] = name + ".q"
            if bits < 8:
                model.set_initializer(name + ".qmin", np.asarray(lo, dtype))
                model.set_initializer(name + ".qmax", np.asarray(hi, dtype))
                new.append(helper.make_node("Clip", [codes, name + ".qmin", name + ".qmax"],
                                            [name + ".qc"]))
                codes = name + ".qc"
            new.append(helper.make_node("DequantizeLinear", [codes, *qargs], [y], **kw))
            model.graph.node.remove(node)
            for i, n in enumerate(new):
                model.graph.node.insert(idx + i, n)
            return model, True
        return model, False


class SetOpset(Transformation):
    """Declare the target opset (and the IR version it needs); drop the ``lowbit`` domain.

    Refuses (ExportError) ops whose semantics changed after the opset the graph was traced at.
    """

    def __init__(self, opset: int, traced_at: int) -> None:
        super().__init__()
        self.opset, self.traced_at = opset, traced_at

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        if self.opset > self.traced_at:
            changed = sorted({n.op_type for n in model.graph.node
                              if n.op_type not in SAME_SINCE_18 and
                              onnx.defs.get_schema(n.op_type, self.opset).since_version >
                              self.traced_at})
            if changed:
                raise ExportError(f"ops {', '.join(changed)} changed meaning after opset "
                                  f"{self.traced_at}; export with --opset {self.traced_at}")
        left = [n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")]
        if left:
            raise ExportError(f"non-standard ops left in the graph: {', '.join(left)}")
        del model.model.opset_import[:]
        model.model.opset_import.append(helper.make_opsetid("", self.opset))
        model.model.ir_version = helper.find_min_ir_version_for(
            [helper.make_opsetid("", self.opset)])
        return model, False


class ShareConstants(Transformation):
    """Merge initializers with identical type, shape and bytes (e.g. the zero points and clip
    bounds every 4-bit activation has) into one. Run last: qonnx's cleanup un-shares them."""

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        g = model.graph
        first: dict[bytes, str] = {}
        alias: dict[str, str] = {}
        for t in list(g.initializer):
            anonymous = onnx.TensorProto()
            anonymous.CopyFrom(t)
            anonymous.ClearField("name")
            key = anonymous.SerializeToString(deterministic=True)
            if key in first:
                alias[t.name] = first[key]
                g.initializer.remove(t)
            else:
                first[key] = t.name
        for node in g.node:
            node.input[:] = [alias.get(x, x) for x in node.input]
        return model, False


# attribute values that equal the ONNX defaults (kernel_shape is inferred from the weight)
_DEFAULTS = {"Conv": {"dilations": lambda v: all(d == 1 for d in v),
                      "strides": lambda v: all(s == 1 for s in v),
                      "pads": lambda v: all(p == 0 for p in v), "group": lambda v: v == 1,
                      "kernel_shape": lambda v: True}}


class DropDefaultAttributes(Transformation):
    """Remove Conv attributes that restate ONNX defaults (a few hundred bytes per network)."""

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        for node in model.graph.node:
            defaults = _DEFAULTS.get(node.op_type, {})
            drop = [a for a in node.attribute
                    if a.name in defaults and defaults[a.name](helper.get_attribute_value(a))]
            for a in drop:
                node.attribute.remove(a)
        return model, False


_NAME_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _short_name(i: int) -> str:
    """0 -> "_0", 61 -> "_Z", 62 -> "_10", ...: base 62 after an underscore (one or two
    characters for every tensor of a CIFAR ResNet; no clash with layer or graph names)."""
    digits = ""
    while True:
        i, r = divmod(i, len(_NAME_CHARS))
        digits = _NAME_CHARS[r] + digits
        if not i:
            return "_" + digits


class ShortenNames(Transformation):
    """Short names (``_short_name``) for initializers and intermediate tensors, except graph
    inputs/outputs and the initializers in ``keep`` (the packed weights, named by layer); node
    names, doc strings, value_info and annotations of tensors that no longer exist are
    dropped: names are a visible share of a packed low-bit file. ``renamed`` maps each old
    tensor name to its new one, so what the exporter knows by name survives the shortening."""

    def __init__(self, keep: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.keep = keep
        self.renamed: dict[str, str] = {}

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        g = model.graph
        keep = set(self.keep) | {t.name for t in g.input} | {t.name for t in g.output}
        rename: dict[str, str] = {}
        for t in g.initializer:
            if t.name not in keep:
                rename[t.name] = _short_name(len(rename))
                t.name = rename[t.name]
        for node in g.node:
            for i, out in enumerate(node.output):
                if out and out not in keep:
                    rename.setdefault(out, _short_name(len(rename)))
                    node.output[i] = rename[out]
        for node in g.node:
            node.input[:] = [rename.get(x, x) for x in node.input]
            node.ClearField("name")
            node.ClearField("doc_string")
        self.renamed = rename
        # qonnx annotates tensors (finn_datatype) under names, some random, that no longer
        # exist: bytes that differ from run to run and describe nothing
        present = {t for n in g.node for t in [*n.input, *n.output]} | keep
        for q in g.quantization_annotation:
            q.tensor_name = rename.get(q.tensor_name, q.tensor_name)
        kept = [q for q in g.quantization_annotation if q.tensor_name in present]
        del g.quantization_annotation[:]
        g.quantization_annotation.extend(kept)
        del g.value_info[:]
        g.ClearField("doc_string")
        model.model.ClearField("doc_string")
        model.model.producer_name = "lowbit"
        model.model.ClearField("producer_version")
        return model, False
