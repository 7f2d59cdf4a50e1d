"""Quantization-aware students (Brevitas behind one adapter): ``quantize(model, spec)``
returns a torch.fx GraphModule whose quantizers are nodes; ``describe(student)`` tables per
layer the weight bits, input bits and the onnxruntime kernel that will run it.

``quant_layers`` / ``act_quants`` read a student back as integer codes and scales (the
exporter's contract, see ``_inspect``); ``calibrate`` sets activation ranges from data for
post-training quantization; ``bake_integer_bias`` folds the eval-mode integer-bias
rounding into plain biases for tracing.
"""

from ._brevitas import bake_integer_bias
from ._describe import Description, LayerDescription, describe
from ._inspect import ActQuantInfo, QuantLayerInfo, act_quants, quant_layers
from ._quantize import calibrate, quantize
from ._spec import ACT_BITS, SCALE_RULES, WEIGHT_BITS, QuantSpec

__all__ = ["ACT_BITS", "SCALE_RULES", "WEIGHT_BITS", "ActQuantInfo", "Description",
           "LayerDescription", "QuantLayerInfo", "QuantSpec", "act_quants", "bake_integer_bias",
           "calibrate", "describe", "quant_layers", "quantize"]
