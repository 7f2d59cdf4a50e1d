"""Quantization-aware students (Brevitas behind one adapter): ``quantize(model, spec)``.

``quant_layers`` / ``act_quants`` read a student back as integer codes and scales (the
exporter's contract, see ``_inspect``); ``calibrate`` (running mean of batch max) and
``calibrate_ranges`` (max, percentile or MSE, see ``_calibrate``) set activation ranges from
data for post-training quantization; ``bake_integer_bias`` folds the eval-mode integer-bias
rounding into plain biases for tracing.
"""

from ._brevitas import bake_integer_bias
from ._calibrate import CALIB_METHODS, PTQConfig, calibrate_ranges
from ._inspect import ActQuantInfo, QuantLayerInfo, act_quants, quant_layers
from ._quantize import calibrate, quantize
from ._spec import ACT_BITS, SCALE_RULES, WEIGHT_BITS, QuantSpec

__all__ = ["ACT_BITS", "CALIB_METHODS", "PTQConfig", "SCALE_RULES", "WEIGHT_BITS",
           "ActQuantInfo", "QuantLayerInfo", "QuantSpec", "act_quants", "bake_integer_bias",
           "calibrate", "calibrate_ranges", "quant_layers", "quantize"]
