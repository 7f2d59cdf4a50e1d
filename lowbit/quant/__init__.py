"""Quantization-aware students (Brevitas behind one adapter): ``quantize(model, spec)``."""

from ._spec import ACT_BITS, SCALE_RULES, WEIGHT_BITS, QuantSpec

__all__ = ["ACT_BITS", "SCALE_RULES", "WEIGHT_BITS", "QuantSpec"]
