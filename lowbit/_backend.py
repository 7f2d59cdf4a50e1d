"""onnxruntime's CPU execution provider as lowbit's files rely on it: one description.

Torch- and onnx-free (numpy only): the exporter, ``describe``, the gate and the runtime read it.

- **Kernels.** onnxruntime fuses DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv
  (integer codes in, integer codes out); the op names below are those of its optimised graph.
- **Fused patterns** (:data:`ONNX_OPS`): per ONNX op, the integer kernel onnxruntime fuses
  DequantizeLinear -> op -> QuantizeLinear into (Conv: QLinearConv; Gemm: QGemm only with
  a weight zero point, :func:`integer_kernel`; Add, Mul, Sigmoid, LeakyRelu: their QLinear
  kernels), or that it moves the Q/DQ pair across the op, which changes no code (MaxPool,
  views, Transpose, Split, nearest Resize); anything else runs in float.
- **Opsets** (:data:`STORAGE_FLOORS`, :data:`MIN_ONNXRUNTIME`): INT2 from opset 25, INT4
  from 21, per-axis DequantizeLinear from 13 (lowbit's floor); the oldest onnxruntime that
  loads each.
- **Activations** are stored as uint8 codes: unsigned codes as they are, signed codes + 128
  (zero point 128), the form its x86 integer kernels take.
- **Weights** take the opset's narrowest packed type (:func:`storage_for`), ternary as trits,
  and are decoded at load into int8 codes; or, where the overflow rule below says so, uint8
  codes + 128 (zero point 128).
- **The overflow rule.** onnxruntime's integer GEMM (MLAS) accumulates uint8 activations
  times weights per CPU family:

  ========================================  =================  ============================
  family                                    uint8 x int8       uint8 x uint8
  ========================================  =================  ============================
  x86 SSE4.1 / AVX2 / AVX-512 without VNNI  pairs of products  widened to int16, int32 sums
                                            summed into a
                                            saturating int16
                                            (``pmaddubsw``)
  x86 AVX-VNNI / AVX512-VNNI                int32 (vpdpbusd)   int32
  ARM64 NEON, dot product, i8mm             int32              int32
  WebAssembly SIMD                          int32 (widened)    int32
  ========================================  =================  ============================

  Adjacent products along the reduction axis K (for QLinearConv: kernel row, kernel column,
  input channel, the NHWC order it runs in) form the pairs. A layer is exact on every family
  when its int32 accumulator cannot overflow and, stored as int8, no pair of products can
  leave int16 for any input code it can receive (:func:`kernel_bound`). Where that pair
  bound fails (8-bit weights beyond +-64 fed by 8-bit codes), the weights are stored as
  uint8 with zero point 128 and run in the uint8 x uint8 kernels, exact everywhere, at the
  same size; everywhere else the int8 path stays (``lowbit._intmath.accumulate`` models both).
- **MatMulNBits** (``com.microsoft``, in every onnxruntime wheel; lowbit's ``linear_kernel=
  "nbits"``): Y = A @ ((B - 2^(bits-1)) * scale)^T + bias with 2/4/8-bit codes B packed in
  blocks of ``block_size`` along K (layout: ``lowbit.export._nbits``). Its float input A is
  computed as given at ``accuracy_level`` 0/1 (fp32: exact up to float rounding; 2-bit weights
  then take a slow dequantize-and-GEMM fallback), or at level 4 quantized on the fly per block
  to int8 (symmetric, scale = max|A_block| / 127) with int32 sums where MLAS has such a kernel
  (x86 AVX2 and later, ARM64). The session entry :data:`LUT_GEMM` = "1" runs 2-bit layers
  that :func:`lut_gemm_applies` to through MLAS' table-lookup (T-MAC) kernels instead, which
  quantize A their own way. Neither int8 path reproduces a statically quantized student
  bit for bit: :func:`nbits_exact`.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _intmath


@dataclass(frozen=True)
class OnnxOp:
    """What onnxruntime's CPU provider does with one ONNX op between quantizers:
    ``integer`` the kernel it fuses DQ -> op -> Q into (None: none), ``keeps_codes`` that it
    moves the Q/DQ pair across the op (the op moves codes unchanged), ``weight_axis`` the
    output-channel axis of a weight input (input 1), ``weight_zero_point`` that the fusion
    needs an explicit weight zero point."""

    integer: str | None = None
    keeps_codes: bool = False
    weight_axis: int | None = None
    weight_zero_point: bool = False


_KEEPS = OnnxOp(keeps_codes=True)
ONNX_OPS: dict[str, OnnxOp] = {
    "Conv": OnnxOp("QLinearConv", weight_axis=0),
    "ConvTranspose": OnnxOp(weight_axis=1),
    "MatMul": OnnxOp("MatMulIntegerToFloat", weight_axis=1),  # output left in float
    "Gemm": OnnxOp("QGemm", weight_axis=0, weight_zero_point=True),  # axis 0: transB=1
    "Add": OnnxOp("QLinearAdd"), "Mul": OnnxOp("QLinearMul"),
    "Sigmoid": OnnxOp("QLinearSigmoid"), "LeakyRelu": OnnxOp("QLinearLeakyRelu"),
    **dict.fromkeys(("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                     "Split", "Slice", "Gather", "Expand", "Resize", "Identity"), _KEEPS),
}
DEFAULT_OPSET, MIN_OPSET = 25, 13  # 13: per-axis DequantizeLinear
STORAGE_FLOORS = (("int2", 25), ("int4", 21), ("int8", MIN_OPSET))  # lowest opset per type
# the oldest onnxruntime that loads a lowbit file of at least this opset (measured with each
# release from 1.20): 25 (IR 13, INT2), 21 (IR 10, INT4), below (INT8 weights, trits)
MIN_ONNXRUNTIME = ((25, "1.24.1"), (21, "1.23"), (MIN_OPSET, "1.20"))


# ONNX ops whose schema changes between opset 18 (the trace's) and 25 only add element types
# or attributes whose defaults keep the opset-18 meaning (Resize 19: antialias, aspect
# policy), or that have not changed since, so a graph traced at opset 18 means the same at
# any later opset.
SAME_SINCE_18 = frozenset({
    "Conv", "ConvTranspose", "Gemm", "Add", "Sub", "Mul", "Div", "Relu", "Clip", "Flatten",
    "Reshape", "GlobalAveragePool", "AveragePool", "MaxPool", "Concat", "QuantizeLinear",
    "DequantizeLinear", "Cast", "Identity", "Constant", "Transpose", "Squeeze", "Unsqueeze",
    "Shape", "Gather", "Pad", "Softmax", "MatMul", "BatchNormalization", "Sigmoid",
    "ReduceMean", "Slice", "HardSwish", "HardSigmoid", "LeakyRelu", "Erf",
    "InstanceNormalization", "Resize",
    # element types added since 18 (Equal 19: string; ConstantOfShape 20-25: float8 ... int4)
    "ConstantOfShape", "Equal"})


def min_onnxruntime(opset: int) -> str:
    """The oldest onnxruntime that loads a lowbit export at ``opset``."""
    return next(v for floor, v in MIN_ONNXRUNTIME if opset >= floor)


def weight_axis(op_type: str, trans_b: int = 0) -> int:
    """Output-channel axis of the weight (input 1) of a ``op_type`` node (Gemm: by transB)."""
    if op_type == "Gemm":
        return 0 if trans_b else 1
    return ONNX_OPS[op_type].weight_axis


def fused_kernel(op_type: str) -> str | None:
    """The integer kernel onnxruntime fuses a quantized ``op_type`` into (None: float)."""
    op = ONNX_OPS.get(op_type)
    return None if op is None else op.integer


# onnxruntime ops that run a conv/linear on integer codes, and the float ones
INTEGER_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger",
                             "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
FLOAT_KERNELS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul",
                           "FusedMatMul"})

NBITS_OP, NBITS_DOMAIN = "MatMulNBits", "com.microsoft"
NBITS_BITS = (2, 4, 8)  # weight bits MatMulNBits takes
NBITS_MIN_BLOCK = 16  # block_size: a power of two, at least 16
ACCURACY_FP32, ACCURACY_INT8 = 1, 4  # MatMulNBits accuracy_level: float A, or int8 per block
LUT_GEMM = "mlas.use_lut_gemm"  # session config entry ("1": table-lookup 2-bit kernels)

# What each ONNX op is in ``lowbit.footprint``'s layer graph (the kinds of
# ``lowbit.footprint._graph``, which the registry's ``footprint`` field also names): the ONNX
# ops of the registry's entries (``lowbit._ops``, tested to agree) and the ONNX-only ones
# (quantizers, casts, GELU's Erf chain, shape arithmetic). MatMul is a product of two
# activations unless its second input is constant (then a linear layer); Gather is a select
# (a view) with constant indices, a lookup in a constant table otherwise; None: the op
# computes shapes and indices, not activations.
ONNX_FOOTPRINT: dict[str, str | None] = {
    "Conv": "conv", "ConvTranspose": "conv", "Gemm": "linear", "MatMul": "matmul",
    NBITS_OP: "linear", "BatchNormalization": "affine", "Concat": "concat",
    **dict.fromkeys(("Add", "Sub", "Mul", "Div", "Sum"), "add"),  # lowbit writes adds as Sum
    **dict.fromkeys(("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                     "ReduceMean", "ReduceMax", "Resize"), "pool"),
    **dict.fromkeys(("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Split",
                     "Slice", "Identity", "Gather", "Expand"), "view"),
    **dict.fromkeys(("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid",
                     "HardSwish", "Elu", "Selu", "Softplus", "Softmax", "LogSoftmax", "Gelu",
                     "Erf", "Dropout", "Cast", "QuantizeLinear", "DequantizeLinear", "Neg",
                     "Abs", "Sqrt", "Exp", "Round", "Floor", "Ceil", "LayerNormalization",
                     "InstanceNormalization", "GroupNormalization"), "unary"),
    **dict.fromkeys(("Shape", "Size", "Constant"), None),
}
# normalisations whose inputs 1 and 2 are their per-channel scale and shift
ONNX_NORMS = frozenset({"LayerNormalization", "InstanceNormalization", "GroupNormalization"})

SIGNED_OFFSET = 128  # signed activation codes (and uint8-stored weights) are stored + 128
UNSIGNED_WEIGHTS = "uint8"  # storage name of weights stored as uint8 codes + 128


def activation_range(bits: int, signed: bool) -> tuple[int, int]:
    """(lowest, highest) stored uint8 value of ``bits``-bit activation codes."""
    lo, hi = _intmath.code_range(bits, signed)
    offset = SIGNED_OFFSET if signed else 0
    return lo + offset, hi + offset


def storage_for(bits: int, opset: int, ternary_storage: str = "trits") -> str:
    """How ``bits``-bit weight codes are stored at ``opset``: trits for ternary (unless
    ``ternary_storage="int"``), else the narrowest packed type onnxruntime runs:

        weight bits  opset >= 25   21..24   13..20
        2 (ternary)  INT2          INT4     INT8
        4            INT4          INT4     INT8
        8            INT8          INT8     INT8
    """
    if bits == 2 and ternary_storage == "trits":
        return "trits"
    return next(kind for kind, floor in STORAGE_FLOORS
                if int(kind[3:]) >= bits and opset >= floor)


@dataclass(frozen=True)
class KernelBound:
    """The worst accumulations an integer layer can reach for stored inputs up to ``x_max``:
    ``pair`` the largest |sum of two products| an int8-weight (u8s8) kernel forms (None for
    uint8 weights, whose kernels widen to int16 first), ``int32`` the largest |accumulator|."""

    x_max: int
    pair: int | None
    int32: int

    @property
    def exact(self) -> bool:
        """True when no kernel family can overflow: the file computes the same everywhere."""
        return (self.pair is None or self.pair <= _intmath.INT16_MAX) and \
            self.int32 <= _intmath.INT32_MAX

    def __str__(self) -> str:
        pair = "" if self.pair is None else \
            f"pairs of products up to {self.pair:,} (int16 holds {_intmath.INT16_MAX:,}), "
        return f"inputs up to {self.x_max}: {pair}accumulator up to {self.int32:,}"


def kernel_bound(w_stored: np.ndarray, x_max: int, axis: int = 0) -> KernelBound:
    """:class:`KernelBound` of a layer whose stored weights are ``w_stored`` (int8 codes, or
    uint8 codes + 128; output channels along ``axis``) and whose stored inputs lie in
    [0, ``x_max``]: any pairing of products along K, so it holds for every kernel's packing."""
    w = np.moveaxis(np.asarray(w_stored), axis, 0).reshape(np.shape(w_stored)[axis], -1)
    signed = np.issubdtype(w.dtype, np.signedinteger)
    w = w.astype(np.int64)
    return KernelBound(int(x_max), _intmath.pair_peak(w, x_max) if signed else None,
                       int(x_max * np.abs(w).sum(1).max(initial=0)))


def integer_kernel(op_type: str, weight_zero_point: bool) -> bool:
    """Whether onnxruntime fuses a ``op_type`` node whose input and weights are dequantized
    codes into an integer kernel: always for Conv (QLinearConv); for Gemm (QGemm) only when
    the weights' DequantizeLinear has an explicit zero point, which lowbit writes for uint8
    weights alone, so its int8 Linear layers run as float Gemm."""
    op = ONNX_OPS.get(op_type)
    return op is not None and op.integer is not None and \
        (weight_zero_point or not op.weight_zero_point)


def nbits_zero_point(bits: int) -> int:
    """MatMulNBits' default zero point, 2^(bits-1): stored codes are ``code + 2^(bits-1)``."""
    return 1 << (bits - 1)


def lut_gemm_applies(bits: int, k: int, n: int, block_size: int) -> bool:
    """Whether :data:`LUT_GEMM` takes a MatMulNBits layer [K -> N] (MLAS'
    ``MlasIsLutGemmAvailable`` in onnxruntime 1.32, on CPUs with its LUT kernels: AVX2):
    2-bit weights, blocks and K multiples of 32, N a multiple of 128."""
    return bits == 2 and block_size % 32 == 0 and k % 32 == 0 and n % 128 == 0


def nbits_exact(accuracy_level: int, lut_gemm: bool) -> bool:
    """Whether MatMulNBits computes a layer in float, as the student does up to float rounding
    (accuracy level 0/1 without the LUT kernels), rather than on int8 activations it quantizes
    per block on its own (level 4, or the LUT kernels)."""
    return accuracy_level <= ACCURACY_FP32 and not lut_gemm


def weight_storage(codes: np.ndarray, x_max: int | None, storage: str, kind: str = "conv",
                   axis: int = 0) -> str:
    """``storage`` (the ladder's choice), or uint8 where int8 weights fed by stored inputs up
    to ``x_max`` (None: float input, no integer kernel) could overflow a u8s8 kernel. A
    ``kind`` "linear" layer stays int8: it runs as a float Gemm (:func:`integer_kernel`);
    "matmul" (a Linear over more than two dims) runs as an integer MatMul, as a conv does."""
    if x_max is None or storage != "int8" or kind == "linear" or \
            kernel_bound(np.asarray(codes, np.int8), x_max, axis).exact:
        return storage
    return UNSIGNED_WEIGHTS


# CPU flags that decide which integer (and bf16) kernels onnxruntime and torch run
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
                "amx_bf16", "asimddp", "i8mm")


def cpu_features() -> dict[str, object]:
    """This machine as far as integer kernels go: CPU name, architecture, the
    :data:`KERNEL_FLAGS` it has, and how its uint8 x int8 kernels accumulate ("int16 pairs"
    on x86 without VNNI, else "int32"); recorded with every gate run and benchmark."""
    fields: dict[str, str] = {}
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        fields = {k.strip(): v.strip() for k, sep, v in
                  (line.partition(":") for line in first.splitlines()) if sep}
    except OSError:
        pass
    present = set((fields.get("flags") or fields.get("Features") or "").split())
    machine = platform.machine()
    x86 = machine.lower() in ("x86_64", "amd64", "i686", "x86")
    vnni = bool({"avx512_vnni", "avx_vnni"} & present)
    return {"cpu": fields.get("model name") or platform.processor() or machine,
            "machine": machine, "flags": sorted(present & set(KERNEL_FLAGS)),
            "u8s8": "int16 pairs" if x86 and not vnni else "int32"}
