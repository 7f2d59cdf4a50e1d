"""Raw uint8 pixel input (``lowbit.export(..., input="uint8")``): a file any onnxruntime app feeds.

The float-input graph starts ``input`` float32 ``[N, C, H, W]`` (already normalised) ->
QuantizeLinear -> stored codes (uint8: a signed code + 128, ``lowbit._backend``) ->
DequantizeLinear -> first conv. :class:`RawPixelInput` replaces its head by a lookup::

    input uint8 [N, C, H, W]  (layout "nhwc": [N, H, W, C] -> Transpose)
      -> Cast(int64) -> Add(256 * c) -> Gather(table [C * 256]) -> stored codes

where ``table[256 * c + v]`` is the student's own input quantizer (``input_quant``, which
every lowbit student has) applied to channel ``c``'s normalised pixel value ``v``
(``lowbit._pixels.table``): the file computes exactly the codes the student computes, by
construction. Only Transpose, Cast, Add and Gather: every onnxruntime
runs it (CPU, mobile, onnxruntime-web), and the DequantizeLinear -> Conv it feeds still fuses
into an integer kernel. ``examples/raw_pixels.py`` feeds such a file from plain onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation

from .. import _pixels
from .._choices import INPUTS, LAYOUTS
from ..errors import ExportError

TABLE = "pixel_table"  # the Gather's lookup initializer


def check_form(dtype: str, layout: str, data: dict) -> None:
    """Refuse an unknown input form (``dtype``: export's ``input``), NHWC off images, raw
    pixels without the model's stats."""
    if dtype not in INPUTS:
        raise ExportError(f"input must be one of {INPUTS}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise ExportError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if dtype == "float":
        if layout != "nchw":
            raise ExportError("layout='nhwc' is for raw pixel input: pass input='uint8' too")
        return
    if data.get("mean") is None:
        raise ExportError("input='uint8' builds the model's normalisation into the file, but "
                          "no mean/std is known: pass data= the model was trained on (uint8 "
                          "pixels)")
    if layout == "nhwc" and len(data["input_shape"]) != 3:
        raise ExportError(f"layout='nhwc' is for images [C, H, W]; the model takes "
                          f"{data['input_shape']}")


def lookup(student: nn.Module, data: dict, zero_point: int) -> np.ndarray:
    """uint8 ``[C * 256]`` table from pixel (+ 256 c) to the stored input code the first
    layer reads: the student's ``input_quant`` code + ``zero_point`` (the file's storage)."""
    from ..quant import act_quants

    values = _pixels.table(data["mean"], data["std"])  # [C, 256]
    x = torch.from_numpy(values).reshape(1, *values.shape, *[1] * (len(data["input_shape"]) - 2))
    with torch.no_grad():  # the student's own quantizer, on every value a pixel can take
        y = student.get_submodule("input_quant")(x).double().numpy().reshape(values.shape)
    scale = np.asarray(act_quants(student)[0].scale, np.float64)
    stored = np.round(y / (scale.reshape(-1, 1) if scale.size > 1 else scale)) + zero_point
    if not ((stored >= 0) & (stored <= 255)).all():
        raise ExportError("input_quant's codes do not fit the file's uint8 storage")
    return stored.astype(np.uint8).reshape(-1)


class RawPixelInput(Transformation):
    """Make the graph input raw uint8 pixels: a lookup in ``table`` (see the module
    docstring) replaces the input's QuantizeLinear [-> Clip] by the codes it stores."""

    def __init__(self, table: np.ndarray, layout: str = "nchw") -> None:
        super().__init__()
        self.table, self.layout = table, layout

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        g = model.graph
        inp = g.input[0]
        name, dims = inp.name, list(inp.type.tensor_type.shape.dim)
        channels = len(self.table) // _pixels.LEVELS
        (quant,) = model.find_consumers(name)
        dropped, target = [quant], quant.output[0]
        after = model.find_consumers(target) or []
        if len(after) == 1 and after[0].op_type == "Clip":
            dropped, target = [quant, after[0]], after[0].output[0]
        for node in dropped:
            g.node.remove(node)
        offsets = (np.arange(channels, dtype=np.int64) * _pixels.LEVELS).reshape(
            1, channels, *[1] * (len(dims) - 2))
        g.initializer.extend([numpy_helper.from_array(self.table, TABLE),
                              numpy_helper.from_array(offsets, f"{TABLE}_offsets")])
        pixels, head = name, []
        if self.layout == "nhwc":  # [N, H, W, C] -> [N, C, H, W]
            head.append(helper.make_node("Transpose", [name], [f"{name}_nchw"],
                                         perm=[0, 3, 1, 2]))
            pixels, dims = f"{name}_nchw", [dims[0], *dims[2:], dims[1]]
        head += [helper.make_node("Cast", [pixels], [f"{name}_int"], to=TensorProto.INT64),
                 helper.make_node("Add", [f"{name}_int", f"{TABLE}_offsets"],
                                  [f"{name}_index"]),
                 helper.make_node("Gather", [TABLE, f"{name}_index"], [target], axis=0)]
        for i, node in enumerate(head):
            g.node.insert(i, node)
        inp.type.tensor_type.elem_type = TensorProto.UINT8
        del inp.type.tensor_type.shape.dim[:]
        inp.type.tensor_type.shape.dim.extend(dims)
        used = {t for n in g.node for t in n.input}
        for init in [t for t in g.initializer if t.name not in used]:
            g.initializer.remove(init)  # the QuantizeLinear's scale, zero point, Clip bounds
        return model, False


def raw_pixel_graph(proto: onnx.ModelProto, student: nn.Module, data: dict, layout: str,
                    ) -> onnx.ModelProto:
    """``proto`` taking raw uint8 pixels in ``layout`` (see the module docstring)."""
    inits = {t.name: t for t in proto.graph.initializer}
    name = proto.graph.input[0].name
    consumers = [n for n in proto.graph.node if name in n.input]
    if len(consumers) != 1 or consumers[0].op_type != "QuantizeLinear":
        raise ExportError(f"input='uint8' reads the input through the student's input "
                          f"quantizer, but the graph feeds its input to "
                          f"{[n.op_type for n in consumers]}")
    zp = consumers[0].input[2] if len(consumers[0].input) > 2 else ""
    table = lookup(student, data, int(numpy_helper.to_array(inits[zp])) if zp else 0)
    model = ModelWrapper(proto, make_deepcopy=True, fix_missing_initializer_valueinfo=False)
    out = model.transform(RawPixelInput(table, layout), cleanup=False).model
    onnx.checker.check_model(out, full_check=True)
    return out


def pixel_feed(data: dict, layout: str):
    """``x -> pixels``: the uint8 pixels (in ``layout``) whose normalised values are the float
    batch ``x``, recovered exactly from ``lowbit._pixels.table``, so the gate runs the raw file
    on the very inputs the student gets."""
    values = _pixels.table(data["mean"], data["std"])  # [C, 256], increasing per channel

    def feed(x: np.ndarray) -> np.ndarray:
        pixels = np.empty(x.shape, np.uint8)
        for c in range(x.shape[1]):
            index = np.minimum(np.searchsorted(values[c], x[:, c]), _pixels.LEVELS - 1)
            if not np.array_equal(values[c][index], x[:, c]):
                raise ExportError("input='uint8' verifies on pixels: the verification inputs "
                                  "are not uint8 pixels normalised by the model's mean/std "
                                  "(give uint8 data, or none for random pixels)")
            pixels[:, c] = index
        return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1)) if layout == "nhwc" \
            else pixels

    return feed
