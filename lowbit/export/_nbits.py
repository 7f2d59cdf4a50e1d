"""Linear layers as onnxruntime's ``com.microsoft.MatMulNBits``: 2/4/8-bit weights read directly.

``export(..., linear_kernel="nbits")`` builds the usual packed QDQ graph, then
:class:`LinearToMatMulNBits` replaces each eligible Linear layer's Gemm (and its weight's
DequantizeLinear and decoding) by one MatMulNBits node; everything else stays as it was.

Layout (the contrib op's schema, checked against onnxruntime 1.32)::

    B       uint8 [N, n_blocks, block_size * bits / 8]: row n holds output channel n's K codes
            in blocks of ``block_size`` along K (the last block padded with weight 0), each
            block packed low bits first (``_pack.pack_bits``): 2-bit code k of a block in bits
            2(k % 4)..2(k % 4) + 1 of byte k // 4, the first code in the two least significant
            bits; 4-bit: code 2j in the low nibble, 2j + 1 in the high one; 8-bit: one a byte.
    codes   stored as u = code + 2^(bits - 1), the op's default zero point (no zero_points
            input): ternary {-1, 0, 1} -> {1, 2, 3}, 4-bit [-7, 7] -> [1, 15].
    scales  float32 [N, n_blocks]: the layer's per-channel scale repeated over its blocks.
    bias    the Gemm's bias tensor as it was (input 5).

For example ternary codes [1, -1, 0, 1] are stored [3, 1, 2, 3], byte 0b11_10_01_11 = 0xE7.

Arithmetic (``lowbit._backend``): at ``accuracy_level`` 4 onnxruntime quantizes each input
block to int8 on the fly, and the LUT kernels (session entry ``mlas.use_lut_gemm``) quantize
it their own way, so the file approximates the statically quantized student rather than
reproducing it: its gate is a stated bound (:data:`BOUND`), recorded in the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation

from .._backend import (
    ACCURACY_FP32,
    ACCURACY_INT8,
    LUT_GEMM,
    NBITS_BITS,
    NBITS_DOMAIN,
    NBITS_MIN_BLOCK,
    NBITS_OP,
    lut_gemm_applies,
    nbits_exact,
    nbits_zero_point,
)
from .._intmath import weight_range
from ..errors import ExportError
from ._contract import _layer_name
from ._pack import pack_bits, read_tensor, unpack_bits, unpack_trits
from ._verify import Thresholds

# The gate of a file whose MatMulNBits layers quantize activations on their own: top-1
# agreement with the student and the median input's largest logit error in output steps
# (see _verify), set from measurements (benchmarks/results/linear_kernels.md).
BOUND = Thresholds(min_agreement=0.99, max_steps=16.0, max_near_ties=0.01)


@dataclass(frozen=True)
class NBits:
    """How ``linear_kernel="nbits"`` runs Linear layers: MatMulNBits ``block_size`` (a power
    of two >= 16) and ``accuracy_level`` (4: int8 activations per block, 1: float); layers of
    at least ``min_weights`` weights take it (smaller ones stay Gemm); ``lut_gemm`` records
    that the file runs (and is verified) with the LUT kernels on; ``bound`` gates the file
    when any layer does not compute in float (``lowbit._backend.nbits_exact``)."""

    block_size: int = 64
    accuracy_level: int = ACCURACY_INT8
    min_weights: int = 1 << 14
    lut_gemm: bool = False
    bound: Thresholds = field(default=BOUND)

    def __post_init__(self) -> None:
        b = self.block_size
        if b < NBITS_MIN_BLOCK or b & (b - 1):
            raise ExportError(f"nbits block_size must be a power of two >= {NBITS_MIN_BLOCK}, "
                              f"got {b}")
        if self.accuracy_level not in (0, ACCURACY_FP32, ACCURACY_INT8):
            raise ExportError(f"nbits accuracy_level must be 0, {ACCURACY_FP32} (float) or "
                              f"{ACCURACY_INT8} (int8), got {self.accuracy_level}")
        if self.min_weights < 0:
            raise ExportError(f"nbits min_weights must be >= 0, got {self.min_weights}")

    def session_config(self) -> dict[str, str]:
        """The onnxruntime session config entries the file is meant to run with."""
        return {LUT_GEMM: "1"} if self.lut_gemm else {}


def pack_nbits(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """MatMulNBits' B, uint8 [N, n_blocks, block_size * bits / 8], of signed weight ``codes``
    [N, K] (layout in the module docstring)."""
    codes = np.asarray(codes)
    lo, hi = weight_range(bits)
    if not np.issubdtype(codes.dtype, np.integer) or codes.ndim != 2 or \
            (codes.size and (codes.min() < lo or codes.max() > hi)):
        raise ValueError(f"expected integer codes [N, K] in [{lo}, {hi}], got {codes.dtype} "
                         f"{codes.shape}")
    n, k = codes.shape
    blocks = -(-k // block_size)
    u = np.full((n, blocks * block_size), nbits_zero_point(bits), np.int64)
    u[:, :k] = codes.astype(np.int64) + nbits_zero_point(bits)
    return pack_bits(u, bits).reshape(n, blocks, block_size * bits // 8)


def unpack_nbits(b: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_nbits`: int8 codes [N, ``k``]."""
    b = np.asarray(b, np.uint8)
    per_row = b.shape[1] * b.shape[2] * 8 // bits
    u = unpack_bits(b, b.shape[0] * per_row, bits).reshape(b.shape[0], per_row)[:, :k]
    return (u.astype(np.int16) - nbits_zero_point(bits)).astype(np.int8)


def _stored_codes(t: onnx.TensorProto, storage: str, shape: tuple[int, int]) -> np.ndarray:
    """int8 codes [N, K] of a layer's packed weight initializer as the file stores them."""
    if storage == "trits":
        return unpack_trits(t.raw_data, shape[0] * shape[1]).reshape(shape)
    return read_tensor(t).reshape(shape)


@dataclass(frozen=True)
class NBitsLayer:
    """One Linear layer the rewrite can take: weight bits and [N, K] (the student's)."""

    bits: int
    shape: tuple[int, int]


class LinearToMatMulNBits(Transformation):
    """Replace each Gemm(x, DequantizeLinear(codes, scale, axis=0), bias) with transB = 1, or
    MatMul(x, DequantizeLinear(codes^T, scale, axis=1)) (a Linear over [..., K]: its bias Add
    stays), whose codes are the packed weight of a layer in ``layers`` by MatMulNBits(x, B,
    scales, bias);
    the weight's now unused nodes and initializers go. ``storage``: how each layer's codes are
    stored (read back from the file itself); the B initializer is named by its layer."""

    def __init__(self, layers: Mapping[str, NBitsLayer], storage: Mapping[str, str],
                 config: NBits) -> None:
        super().__init__()
        self.layers, self.storage, self.config = layers, storage, config

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        g = model.graph
        inits = {t.name: t for t in g.initializer}
        producers = {o: n for n in g.node for o in n.output}
        for idx, node in enumerate(g.node):
            transposed = _weight_layout(node, producers)
            if transposed is None:
                continue
            name = _layer_name(node, producers, inits, self.layers)
            if name not in self.layers:
                continue
            layer = self.layers[name]
            n, k = layer.shape
            codes = _stored_codes(inits[name], self.storage[name], (k, n) if transposed
                                  else (n, k))
            scale = model.get_initializer(producers[node.input[1]].input[1])
            if scale is None or scale.shape != (n,):
                raise ExportError(f"{name}: expected a per-channel weight scale [{n}], found "
                                  f"{None if scale is None else scale.shape}")
            b = pack_nbits(codes.T if transposed else codes, layer.bits, self.config.block_size)
            g.initializer.remove(inits[name])
            model.set_initializer(name, b)
            model.set_initializer(name + "_s", np.repeat(scale.astype(np.float32)[:, None],
                                                         b.shape[1], axis=1))
            bias = ["", "", node.input[2]] if len(node.input) > 2 and node.input[2] else []
            g.node.insert(idx, helper.make_node(
                NBITS_OP, [node.input[0], name, name + "_s", *bias], [node.output[0]],
                domain=NBITS_DOMAIN, K=k, N=n, bits=layer.bits,
                block_size=self.config.block_size, accuracy_level=self.config.accuracy_level))
            g.node.remove(node)
            _drop_dead(g)
            return model, True
        return model, False


def _weight_layout(node: onnx.NodeProto, producers: dict) -> bool | None:
    """How a conv/linear node reads a per-channel dequantized weight: False for Gemm(x, W)
    with transB = 1 (W [N, K]), True for MatMul(x, W) (W [K, N]: a Linear over more than two
    dims), None for anything MatMulNBits cannot take."""
    if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2:
        return None
    dq = producers.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) > 2:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        dq_axis = {a.name: helper.get_attribute_value(a) for a in dq.attribute}.get("axis", 1)
        return True if dq_axis == 1 else None
    if attrs.get("transB") != 1 or attrs.get("transA", 0) or \
            attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    return False


def _drop_dead(g: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads, then initializers nothing reads."""
    while True:
        used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)


def nbits_layers(layers, config: NBits) -> dict[str, NBitsLayer]:
    """The student's Linear layers (``quant_layers`` infos) that take MatMulNBits under
    ``config``: bits MatMulNBits stores and at least ``min_weights`` weights."""
    return {i.name: NBitsLayer(i.weight_bits, tuple(i.int_weight.shape)) for i in layers
            if i.kind == "linear" and i.weight_bits in NBITS_BITS
            and i.int_weight.numel() >= config.min_weights}


def use_matmul_nbits(proto: onnx.ModelProto, layers, storage: Mapping[str, str],
                     config: NBits) -> tuple[onnx.ModelProto, dict]:
    """``proto`` (a built lowbit graph) with its eligible Linear layers as MatMulNBits, and
    the record the file's metadata keeps (``meta.LINEAR``): layers and their storage
    ("nbits2"/"nbits4"/"nbits8"), block size, accuracy level, session entries, and whether
    the file computes the student's arithmetic ("exact") or is gated by a bound ("bound")."""
    chosen = nbits_layers(layers, config)
    model = ModelWrapper(proto, make_deepcopy=True, fix_missing_initializer_valueinfo=False)
    model = model.transform(LinearToMatMulNBits(chosen, storage, config), cleanup=False)
    out = model.model
    found = {n.input[1] for n in out.graph.node if n.op_type == NBITS_OP}
    if found != set(chosen):
        raise ExportError(f"MatMulNBits: layers {sorted(set(chosen) - found)} are not a "
                          f"Gemm on their packed weights in the exported graph")
    if found and not any(o.domain == NBITS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(NBITS_DOMAIN, 1))
    exact = all(nbits_exact(config.accuracy_level, config.lut_gemm and lut_gemm_applies(
        c.bits, c.shape[1], c.shape[0], config.block_size)) for c in chosen.values())
    record = {"kernel": NBITS_OP, "layers": sorted(chosen),
              "storage": {name: f"nbits{c.bits}" for name, c in sorted(chosen.items())},
              "block_size": config.block_size, "accuracy_level": config.accuracy_level,
              "session": config.session_config(), "contract": "exact" if exact else "bound",
              "thresholds": asdict(config.bound) if not exact else None}
    return out, record


def summary(record: Mapping) -> str:
    """One line on a file's MatMulNBits layers (``meta.LINEAR`` record) and its contract."""
    bits = ", ".join(f"{name}: {int(st[5:])}-bit" for name, st in record["storage"].items())
    session = "".join(f"; session {k}={v}" for k, v in record["session"].items())
    t = record["thresholds"]
    gate = ("exact: computed in float, the usual gate" if t is None else
            f"bound: int8 activations per block, gated at top-1 agreement >= "
            f"{t['min_agreement']:.0%} and the median input within {t['max_steps']:g} output "
            f"steps")
    return (f"MatMulNBits: {len(record['layers'])} Linear layer(s) ({bits}), block "
            f"{record['block_size']}, accuracy level {record['accuracy_level']}{session}; "
            f"contract {gate}")
