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
  (float32 product of the input quantizer's scale and the weight scale of channel c).
"""

from __future__ import annotations

import numpy as np

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


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
