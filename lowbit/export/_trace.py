"""Trace a quantized student into a float ONNX graph with marked activation quantizers.

The student's eval-mode numerics (the export contract of :mod:`lowbit.quant`) are rebuilt in
plain torch: each quantized conv/linear becomes a float layer holding ``int_weight * scale``,
each activation quantizer a :class:`ActQuant` module computing

    y = clamp(round(x / scale), qmin, qmax) * scale   (zero points are 0: ``lowbit._intmath``)

with round-half-even (``torch.round``, like ONNX QuantizeLinear). The TorchScript exporter
writes each ActQuant as one ``lowbit::ActQuant`` node (attributes: scale, zero_point, bits,
signed, name) that the :class:`~lowbit.export._rewrites.QuantizeActivations` rewrite later
lowers to standard QuantizeLinear/DequantizeLinear. BatchNorm stays a node (folded later).
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn as nn

from .. import _onnx_meta as meta
from .._intmath import code_range, dequantize
from ..errors import ExportError
from ..quant import fake_quant

DOMAIN = "lowbit"
TRACE_OPSET = 18  # TorchScript export opset; SetOpset moves the graph to the target opset


@dataclass(frozen=True)
class Act:
    """One activation quantizer: per-tensor (scalar) or per-channel (axis 1) scale."""

    name: str
    bits: int
    signed: bool
    scale: np.ndarray  # float32, shape () or [C]
    zero_point: np.ndarray  # int, same shape as scale

    def __post_init__(self) -> None:
        if np.any(self.zero_point):
            raise ValueError(f"{self.name}: lowbit's integer contract has zero points 0")

    @property
    def qrange(self) -> tuple[int, int]:
        return code_range(self.bits, self.signed)


class _ActQuantFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, act: Act):
        return fake_quant(x, scale, *act.qrange)  # zero point 0 (Act's check)

    @staticmethod
    def symbolic(g, x, scale, zero_point, act: Act):
        out = g.op(f"{DOMAIN}::ActQuant", x, name_s=act.name, bits_i=act.bits,
                   signed_i=int(act.signed), scale_f=act.scale.reshape(-1).tolist(),
                   zero_point_i=act.zero_point.reshape(-1).astype(int).tolist())
        out.setType(x.type())  # same type and shape as x (else the exporter warns per node)
        return out


class ActQuant(nn.Module):
    """Fake-quantizes its input exactly as the student's activation quantizer ``act.name``."""

    def __init__(self, act: Act) -> None:
        super().__init__()
        self.act = act
        shape = (1, -1, 1, 1) if act.scale.ndim else ()
        self.register_buffer("scale", torch.tensor(act.scale, dtype=torch.float32).reshape(shape))
        self.register_buffer("zero_point",
                             torch.tensor(act.zero_point, dtype=torch.float32).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self.scale, self.zero_point
        if scale.ndim and x.ndim == 2:  # per-channel scale on [N, C] features
            scale, zp = scale.reshape(1, -1), zp.reshape(1, -1)
        return _ActQuantFn.apply(x, scale, zp, self.act)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _float_layer(old: nn.Module, info) -> nn.Module:
    """A plain Conv2d/Linear with the hyperparameters of ``old`` and weight codes * scale."""
    weight = torch.from_numpy(dequantize(info.int_weight.detach().numpy(),
                                         info.scale.detach().float().numpy()))
    bias = info.bias is not None
    if isinstance(old, (nn.Conv1d, nn.Conv2d)):
        conv = nn.Conv1d if isinstance(old, nn.Conv1d) else nn.Conv2d
        new = conv(old.in_channels, old.out_channels, old.kernel_size, old.stride,
                   old.padding, old.dilation, old.groups, bias, old.padding_mode)
    elif isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, old.out_features, bias)
    else:
        raise ExportError(f"{info.name}: cannot export a quantized {type(old).__name__} "
                          f"(supported: Conv1d, Conv2d, Linear)")
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias:
            new.bias.copy_(info.bias.detach().float())
    return new


def shadow(model: nn.Module, layers, acts: list[Act]) -> nn.Module:
    """A float copy of ``model`` computing its eval-mode quantized forward in plain torch.

    ``layers`` are :class:`lowbit.quant.QuantLayerInfo`; their modules become float layers
    with weights ``int_weight * scale`` and the ``acts`` modules become :class:`ActQuant`.
    """
    plain = copy.deepcopy(model).eval()
    for info in layers:
        _set_module(plain, info.name, _float_layer(plain.get_submodule(info.name), info))
    for act in acts:
        _set_module(plain, act.name, ActQuant(act))
    return plain


def trace(model: nn.Module, example: torch.Tensor, opset: int = TRACE_OPSET) -> onnx.ModelProto:
    """TorchScript ONNX export with BatchNorm kept, named parameters and a dynamic batch."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter's own notes (its deprecation, tracer and shape notes)
        for category in (DeprecationWarning, FutureWarning, torch.jit.TracerWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        # keep_initializers_as_inputs: no de-duplication of equal parameters (it would wire
        # them through Identity nodes); do_constant_folding=False: BatchNorm stays for
        # FoldBatchNorm and parameters keep their module names.
        torch.onnx.export(model.eval(), (example,), buf, dynamo=False, opset_version=opset,
                          input_names=[meta.INPUT_NAME], output_names=[meta.OUTPUT_NAME],
                          dynamic_axes={meta.INPUT_NAME: {0: "batch"},
                                        meta.OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=False, keep_initializers_as_inputs=True,
                          training=torch.onnx.TrainingMode.EVAL,
                          custom_opsets={DOMAIN: 1})
    return onnx.load_from_string(buf.getvalue())
