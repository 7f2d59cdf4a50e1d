"""The integer contract: the arithmetic a student emulates and its exported file computes.

One copy, torch-free (numpy), called by the student (``lowbit.quant``), the exporter
(``lowbit.export``) and the tests. All zero points are 0 (symmetric quantization).

- code ranges: unsigned b bits [0, 2^b - 1]; signed [-2^(b-1), 2^(b-1) - 1]; narrow signed
  (weights) [-(2^(b-1) - 1), 2^(b-1) - 1], so 2-bit narrow is ternary {-1, 0, 1};
- quantize-dequantize: y = clamp(round(x / s), qmin, qmax) * s, round half to even (as
  ONNX QuantizeLinear), x / s a float32 division;
- BatchNorm folding (float64): BN(y) = (y - mean) * f + beta with f = gamma / sqrt(var + eps);
  a layer (W, b) followed by BN becomes (W * f, (b - mean) * f + beta);
- int32 bias: an integer kernel adds round(b / step) clamped to int32, step = s_in * s_w[c]
  (float32 product of the input quantizer's scale and the weight scale of channel c);
- accumulation: an integer kernel sums stored input values times stored weights along K in
  int32; x86 uint8 x int8 kernels without VNNI first add each pair of adjacent products into
  a saturating int16 (``accumulate``; which kernels do so: ``lowbit._backend``).
"""

from __future__ import annotations

import numpy as np

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
INT16_MIN, INT16_MAX = -(2 ** 15), 2 ** 15 - 1
KERNELS = ("int32", "u8s8")  # exact int32 sums; int16-saturated pairs, then int32


def code_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of ``bits``-bit codes; ``narrow`` drops the most negative signed code."""
    if bits < 2 if signed else bits < 1:
        raise ValueError(f"{bits}-bit {'signed' if signed else 'unsigned'} codes do not exist")
    if not signed:
        return 0, (1 << bits) - 1
    hi = (1 << (bits - 1)) - 1
    return (-hi if narrow else -hi - 1), hi


def weight_range(bits: int) -> tuple[int, int]:
    """Codes of ``bits``-bit weights: narrow signed, {-1, 0, 1} at 2 bits (ternary)."""
    return code_range(bits, signed=True, narrow=True)


def channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    """Broadcast shape of a per-channel vector along ``axis`` of an ``ndim``-d tensor."""
    return tuple(-1 if i == axis else 1 for i in range(ndim))


def dequantize(codes: np.ndarray, scale: np.ndarray, axis: int = 0,
               dtype: type = np.float32) -> np.ndarray:
    """Weights codes * scale[c] with per-channel ``scale`` along ``axis``, computed in ``dtype``
    (float32: the student's and the file's product; float64 for bounds)."""
    codes = np.asarray(codes)
    return codes.astype(dtype) * np.asarray(scale, dtype).reshape(channel_shape(codes.ndim, axis))


def stored_scale(codes: np.ndarray, scale: np.ndarray, axis: int = 0) -> np.ndarray:
    """float32 per-channel weight scale as a file stores it: |scale| (the sign goes into the
    codes), 1 for a dead channel (no non-zero code), whose scale decodes nothing."""
    codes = np.asarray(codes)
    red = tuple(i for i in range(codes.ndim) if i != axis)
    dead = ~np.any(codes != 0, axis=red)
    return np.where(dead, 1.0, np.abs(np.asarray(scale, np.float64))).astype(np.float32)


def quantize_codes(x: np.ndarray, scale: np.ndarray | float, qmin: int, qmax: int) -> np.ndarray:
    """Integer codes clamp(round(x / scale), qmin, qmax) as float32 (float32 division)."""
    t = np.asarray(x, np.float32) / np.asarray(scale, np.float32)
    return np.clip(np.round(t), qmin, qmax).astype(np.float32)


def fold_batchnorm(bias: np.ndarray | None, gamma: np.ndarray | None, beta: np.ndarray | None,
                   mean: np.ndarray, var: np.ndarray, eps: float,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(f, folded bias) in float64: weight * f per output channel, bias (b - mean) * f + beta."""
    g = np.ones_like(mean, np.float64) if gamma is None else np.asarray(gamma, np.float64)
    f = g / np.sqrt(np.asarray(var, np.float64) + eps)
    b = np.zeros_like(f) if bias is None else np.asarray(bias, np.float64)
    b = (b - np.asarray(mean, np.float64)) * f
    if beta is not None:
        b = b + np.asarray(beta, np.float64)
    return f, b


def bias_step(s_in: np.ndarray | float, s_w: np.ndarray) -> np.ndarray:
    """float32 step of an int32 bias: s_in * s_w[c] (both float32, as the file stores them)."""
    return np.float32(s_in) * np.asarray(s_w, np.float32)


def bias_codes(bias: np.ndarray, step: np.ndarray) -> np.ndarray:
    """int32 codes round(b / step), clamped to int32 (b and step taken as float64); a
    non-finite bias (a broken model, which the export gate refuses) gets code 0."""
    q = np.round(np.asarray(bias, np.float64) / np.asarray(step, np.float64))
    return np.clip(np.nan_to_num(q, nan=0.0), INT32_MIN, INT32_MAX).astype(np.int32)


def bias_correction(bias: np.ndarray, step: np.ndarray) -> np.ndarray:
    """What an integer kernel adds beyond the float bias: codes * step - b (float64)."""
    b = np.asarray(bias, np.float64)
    return bias_codes(b, step).astype(np.float64) * np.asarray(step, np.float64) - b


def pair_peak(w: np.ndarray, x_max: int) -> int:
    """Largest |x1 * w1 + x2 * w2| over two weights of one output channel (rows of ``w``,
    [channels, K]) and inputs in [0, ``x_max``]: the two largest positive weights, or the two
    most negative, times ``x_max``, whichever pairs a kernel's packing forms."""
    w = np.sort(np.asarray(w, np.int64), axis=1)
    if w.shape[1] == 0:
        return 0
    pos = np.maximum(w[:, -2:], 0).sum(1)
    neg = -np.minimum(w[:, :2], 0).sum(1)
    return int(x_max * max(pos.max(), neg.max()))


def im2col(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int] = (1, 1),
           pads: tuple[int, int, int, int] = (0, 0, 0, 0),
           dilations: tuple[int, int] = (1, 1), pad_value: int = 0) -> np.ndarray:
    """Rows [N * OH * OW, KH * KW * C] of a 2-d convolution's inputs ``x`` [N, C, H, W]
    (int64), K in the order (kernel row, kernel column, channel) the NHWC kernels run;
    ``pads`` (top, left, bottom, right) filled with ``pad_value`` (the input zero point)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    xp = np.pad(np.asarray(x, np.int64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])),
                constant_values=pad_value)
    oh = (h + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    taps = [xp[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]
    return np.stack(taps, axis=1).transpose(0, 3, 4, 1, 2).reshape(n * oh * ow, kh * kw * c)


def accumulate(a: np.ndarray, b: np.ndarray, kernel: str = "int32") -> np.ndarray:
    """sum_k a[m, k] * b[k, n] (int64) of stored inputs ``a`` [M, K] and stored weights ``b``
    [K, N]: exact ("int32"), or as an x86 uint8 x int8 kernel without VNNI ("u8s8"), which adds
    products k = 2j and 2j + 1 into an int16 that saturates, then sums those in int32."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)  # exact below 2^53, BLAS speed
    if kernel == "int32":
        return (a @ b).astype(np.int64)
    total = np.zeros((a.shape[0], b.shape[1]), np.int64)
    for j in range(0, a.shape[1], 2):
        pair = a[:, j:j + 2] @ b[j:j + 2]
        total += np.clip(pair, INT16_MIN, INT16_MAX).astype(np.int64)
    return total
