"""Names of the metadata lowbit writes into exported ONNX files (torch-free: the runtime reads it).

Every value is a string (ONNX ``metadata_props``); structured values are JSON.
"""

from __future__ import annotations

PREFIX = "lowbit."
VERSION = PREFIX + "version"  # lowbit version that wrote the file
FORMAT = PREFIX + "format"  # JSON int: the file format version (absent: written before 1)
FORMAT_VERSION = 1  # the newest format this lowbit reads and the one it writes
DIGEST = PREFIX + "digest"  # JSON {"weights", "graph"}: SHA-256 hex digests (lowbit._integrity)
WEIGHT_BITS = PREFIX + "weight_bits"  # JSON int: the student's main weight bit width
ACT_BITS = PREFIX + "act_bits"  # JSON int: activation bits after ReLU
QUANT_SPEC = PREFIX + "quant_spec"  # JSON: QuantSpec.to_dict()
STORAGE = PREFIX + "storage"  # JSON: {layer name: "trits"|"int2"|"int4"|"int8"} as stored
CLASSES = PREFIX + "classes"  # JSON list of class names (length = output size)
MEAN = PREFIX + "mean"  # JSON list: per-channel mean on the 0..255 pixel scale
STD = PREFIX + "std"  # JSON list: per-channel std on the 0..255 pixel scale
INPUT_SHAPE = PREFIX + "input_shape"  # JSON [C, H, W]
ARCH = PREFIX + "arch"  # JSON {"name", "kwargs"}
VERIFICATION = PREFIX + "verification"  # JSON list: each onnxruntime run vs PyTorch
# JSON {"exact": true when every integer layer is proven exact on every onnxruntime CPU kernel
# family, "layers": integer layers checked, "pair": the largest int16 pair sum of a uint8 x
# int8 layer (null: none), "int32": the largest accumulator, "cpu": the gate machine
# (lowbit._backend.cpu_features), "onnxruntime": its version}
KERNELS = PREFIX + "kernels"
# JSON list per conv/linear, in the order of STORAGE's layer names: [weight bits, input code
# bits or null (float input), 1 if onnxruntime runs it as an integer kernel else 0]
# (lowbit.quant.describe)
LAYERS = PREFIX + "layers"
# JSON, only in files with MatMulNBits layers (export's linear_kernel="nbits"): {"kernel",
# "layers", "storage" per layer, "block_size", "accuracy_level", "session": the onnxruntime
# session config entries the file runs and was verified with, "contract": "exact" (the
# student's arithmetic, the usual gate) or "bound" (activations quantized by the kernel; gated
# by "thresholds")}
LINEAR = PREFIX + "linear"
# JSON {"dtype": "uint8", "layout": "nchw"|"nhwc"}: the file takes raw uint8 pixels and
# normalises them itself (lowbit.export(input="uint8")); absent: normalised float32 NCHW
INPUT = PREFIX + "input"

TRITS_TABLE = "trits_table"  # int8 [243, 5] initializer that decodes trit-packed weights
TRITS_TABLE_ELEMENTS = 243 * 5
TRITS_BITS = 1.6  # bits per ternary code stored as trits: five per byte

INPUT_NAME = "input"  # float32 [N, C, H, W], already normalised (lowbit._pixels), or
# with INPUT metadata: uint8 raw pixels [N, C, H, W] or [N, H, W, C]
OUTPUT_NAME = "logits"  # float32 [N, classes]
