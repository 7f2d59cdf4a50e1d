"""The arithmetic contract, checked on the file itself: the same answer on every CPU.

For every conv/linear whose input and weights are both dequantized codes and that onnxruntime
runs as an integer kernel (``lowbit._backend.integer_kernel``), read from the file alone: the
stored weights and their zero point, and the highest stored input code (the Clip after the
input's QuantizeLinear, or the top entry of the lookup a raw-pixel input is read through,
else the storage type's). Then

- the proof (``lowbit._backend.kernel_bound``): for *any* input, no kernel family
  can overflow, the int32 accumulator nor, for int8 weights, the int16 pairs of x86's
  uint8 x int8 kernels without VNNI;
- the model (``lowbit._intmath.accumulate``): on a few real inputs, the layer's accumulators
  in exact int32 and as that saturating kernel computes them must be equal.

Neither depends on the CPU the gate runs on, so a file that would be wrong on some CPU family
is refused on every CPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .. import _intmath
from .._backend import ONNX_OPS, KernelBound, integer_kernel, kernel_bound

_LAYERS = ("Conv", "Gemm", "MatMul")
_CODE_TYPES = {onnx.TensorProto.UINT8: 255}  # stored input type -> highest stored value


@dataclass(frozen=True)
class KernelCheck:
    """One integer layer of a file: its weight storage type, the proof's bound, and how many
    accumulators the saturating u8s8 model changed on the checked inputs (of how many)."""

    layer: str
    weights: str  # "int8" (uint8 x int8 kernels) or "uint8" (uint8 x uint8)
    bound: KernelBound
    saturated: int
    accumulators: int

    @property
    def passed(self) -> bool:
        return self.bound.exact and self.saturated == 0

    def __str__(self) -> str:
        where = (f"; on the verification inputs x86's uint8 x int8 kernels without VNNI "
                 f"change {self.saturated:,} of {self.accumulators:,} accumulators"
                 if self.saturated else "")
        fix = ("" if self.passed else
               ": its int32 accumulator can overflow (split the layer)"
               if self.bound.int32 > _intmath.INT32_MAX else
               ": store its weights as uint8 with zero point 128 (lowbit's exporter does, "
               "unless the file was altered) or feed it codes of 7 bits or fewer")
        return f"{self.layer} ({self.weights} weights): {self.bound}{where}{fix}"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _layer_name(node: onnx.NodeProto, producers: dict, inits: dict, names: Iterable[str]) -> str:
    """The packed weight initializer named by its layer that feeds ``node``'s weights, else
    the node's output name."""
    names, todo, seen = set(names), [node.input[1]], set()
    while todo:
        t = todo.pop(0)
        if t in names and t in inits:
            return t
        if t in seen or t not in producers:
            continue
        seen.add(t)
        todo.extend(producers[t].input)
    return node.output[0]


def _accumulators(node: onnx.NodeProto, x: np.ndarray, w: np.ndarray, x_zp: int,
                  ) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """(stored inputs [M, K], stored weights [K, N]) blocks of the layer's GEMMs, one per
    group, as its kernel forms them; None where the layer's shape is not modelled."""
    a = _attrs(node)
    if node.op_type in ("Gemm", "MatMul"):
        if x.ndim < 2 or w.ndim != 2:
            return None
        # MatMul over [..., K] inputs (a Linear over tokens): one GEMM of all rows
        return [(x.reshape(-1, x.shape[-1]), w.T if a.get("transB", 0) else w)]
    if x.ndim == 3:  # Conv1d: one row of height 1
        x, w = x[:, :, None], w[:, :, None]
        pads = a.get("pads", [0, 0])
        a = {**a, "pads": [0, pads[0], 0, pads[1]], "strides": [1, *a.get("strides", [1])],
             "dilations": [1, *a.get("dilations", [1])]}
    if x.ndim != 4 or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    group = a.get("group", 1)
    cin, cout = w.shape[1], w.shape[0] // group
    blocks = []
    for g in range(group):
        cols = _intmath.im2col(x[:, g * cin:(g + 1) * cin], w.shape[2:],
                               tuple(a.get("strides", [1, 1])), tuple(a.get("pads", [0] * 4)),
                               tuple(a.get("dilations", [1, 1])), pad_value=x_zp)
        wg = w[g * cout:(g + 1) * cout].transpose(2, 3, 1, 0).reshape(-1, cout)
        blocks.append((cols, wg))
    return blocks


def _highest_code(src: onnx.NodeProto | None, value) -> int:
    """The highest code a layer's stored input can hold, as its producer bounds it: a Clip
    (fewer bits: its upper bound) or a lookup table (raw pixel input: its top entry)."""
    if src is not None and src.op_type == "Clip" and len(src.input) > 2 and \
            value(src.input[2]) is not None:
        return int(value(src.input[2]))
    if src is not None and src.op_type == "Gather" and value(src.input[0]) is not None:
        return int(value(src.input[0]).max())
    return 255


def _integer_layers(g: onnx.GraphProto, inits: dict, producers: dict, value
                    ) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto, int]]:
    """(layer node, input DequantizeLinear, weight DequantizeLinear, highest input code) of
    every layer onnxruntime runs as an integer kernel."""

    def dq(name: str) -> onnx.NodeProto | None:
        """The DequantizeLinear whose codes reach ``name``, through ops that onnxruntime moves
        the Q/DQ pair across (views: the codes are the same, rearranged)."""
        node = producers.get(name)
        while node is not None and node.op_type in ONNX_OPS and \
                ONNX_OPS[node.op_type].keeps_codes and node.op_type != "Resize":
            node = producers.get(node.input[0])
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    found = []
    for node in g.node:
        if node.op_type not in _LAYERS or len(node.input) < 2:
            continue
        dx, dw = dq(node.input[0]), dq(node.input[1])
        if dx is None or dw is None or \
                not integer_kernel(node.op_type, len(dw.input) > 2 and bool(dw.input[2])):
            continue
        zp = dx.input[2] if len(dx.input) > 2 and dx.input[2] else None
        if zp is not None and (zp not in inits or inits[zp].data_type not in _CODE_TYPES):
            continue  # not the uint8 codes lowbit's files feed integer kernels
        x_max = _CODE_TYPES[inits[zp].data_type] if zp else 255  # no zero point: uint8
        found.append((node, dx, dw, min(x_max, _highest_code(producers.get(dx.input[0]),
                                                             value))))
    return found


def _codes_at(node: onnx.NodeProto, dx: onnx.NodeProto) -> str:
    """The tensor to read a layer's input codes from (see ``check_kernels``)."""
    return dx.input[0] if node.input[0] == dx.output[0] else node.input[0]


def check_kernels(proto: onnx.ModelProto, inputs: np.ndarray, names: Iterable[str] = (),
                  ) -> tuple[KernelCheck, ...]:
    """:class:`KernelCheck` of every integer layer of ``proto``, the model run on ``inputs``
    (a few: float kernels at onnxruntime's "disabled" level, the file's own semantics).
    ``names``: layer names of the packed weights, to name the layers."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}

    def value(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    found = _integer_layers(g, inits, producers, value)
    if not found:
        return ()
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    # a layer's input codes: its DequantizeLinear's input, or, past views, the layer's float
    # input (exactly (code - zero point) * scale) quantized back
    wanted = list(dict.fromkeys(t for node, dx, dw, _ in found
                                for t in (_codes_at(node, dx), dw.input[0]) if t not in inits))
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in wanted)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = dict(zip(wanted, sess.run(wanted, {g.input[0].name: inputs}), strict=True))
    for t in (dw.input[0] for _, _, dw, _ in found):
        if t in inits:
            got[t] = value(t)
    checks = []
    for node, dx, dw, x_max in found:
        w = np.asarray(got[dw.input[0]])
        x_zp = np.unique(value(dx.input[2]) if len(dx.input) > 2 and dx.input[2] else 0)
        axis = _attrs(dw).get("axis", 1)
        bound = kernel_bound(w, x_max, axis % max(w.ndim, 1))
        saturated = total = 0
        # the pairs a uint8 x int8 kernel forms, of stored values (zero points are
        # subtracted afterwards, exactly); uint8 weights are widened to int16 first: exact
        if np.issubdtype(w.dtype, np.signedinteger) and x_zp.size == 1:
            x = np.asarray(got[_codes_at(node, dx)])
            if _codes_at(node, dx) != dx.input[0]:
                x = np.rint(x / value(dx.input[1])) + x_zp[0]
            x = x.astype(np.int64)
            for a, b in _accumulators(node, x, w.astype(np.int64), int(x_zp[0])) or ():
                exact = _intmath.accumulate(a, b, "int32")
                saturated += int((_intmath.accumulate(a, b, "u8s8") != exact).sum())
                total += exact.size
        checks.append(KernelCheck(_layer_name(node, producers, inits, names),
                                  "int8" if np.issubdtype(w.dtype, np.signedinteger) else "uint8",
                                  bound, saturated, total))
    return tuple(checks)


def summary(checks: Iterable[KernelCheck]) -> str:
    """One line: how many integer layers are proven exact on every CPU, and by which storage."""
    checks = list(checks)
    unsigned = [c.layer for c in checks if c.weights == "uint8"]
    kept = f"; uint8 + 128 weights (overflow rule): {', '.join(unsigned)}" if unsigned else ""
    bad = [c.layer for c in checks if not c.passed]
    verdict = (f"NOT exact on every CPU: {', '.join(bad)}" if bad else
               "exact on every onnxruntime CPU kernel family (x86 with and without VNNI, "
               "ARM64, WebAssembly)")
    return f"integer arithmetic: {len(checks)} integer layer(s) {verdict}{kept}"
