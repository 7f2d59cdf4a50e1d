"""What a trained student computes, as plain tensors: the contract the exporter builds on.

Numeric contract (eval mode), checked by ``tests/test_quant.py`` against the student itself
to 1e-5 relative:

- each conv/linear computes with weight = ``int_weight * scale.view(-1, 1, ...)`` and its
  float ``bias``; BatchNorm layers are plain float BatchNorm (eval statistics);
- each activation quantizer (the network input first, under the name ``"input_quant"``,
  then every quantized ReLU under its own module name) outputs
  ``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale`` with
  ``round`` = ``torch.round`` (round half to even), ``x / scale`` a float32 division,
  qmin, qmax = 0, 2^bits - 1 when unsigned and -2^(bits-1), 2^(bits-1) - 1 when signed;
  a ReLU's quantizer sees ReLU(x) (the same thing for unsigned codes);
- an output quantizer ``m.output_quant`` (listed with the others) quantizes the output of
  ``m`` (a conv/linear/BatchNorm feeding a residual add, a float activation, a pooling);
  ``<layer>_quant`` that of a conv/linear without BatchNorm, ``<node>_quant`` that of a
  functional op (add, mul, cat) feeding a conv/linear;
- the arithmetic (code ranges, BatchNorm folding, int32 bias) is ``lowbit._intmath``;
- a layer with ``bias_input`` set consumes that quantizer's codes and runs as an integer
  kernel: its bias b (the following BatchNorm folded in, in float64, then float32) becomes
  round(b / step) * step with step = s_in * s_w[c] in float32 (s_w[c] = |scale * BN factor|,
  1 for a channel without codes), clamped to int32;
- scales are per tensor (float32 scalars) for activations and per output channel (float32
  [out_channels]) for weights; every zero point is 0.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from .._backend import activation_range, storage_for, weight_storage
from .._intmath import code_range
from . import _brevitas


@dataclass(frozen=True)
class QuantLayerInfo:
    """One quantized Conv2d/Linear: integer weight codes and per-output-channel scales."""

    name: str  # module path in the student, e.g. "layer1.0.conv1"
    kind: str  # "conv" | "linear"
    weight_bits: int  # 2 (ternary), 4 or 8
    int_weight: torch.Tensor  # int8 codes shaped like the weight; ternary {-1,0,1}, 4-bit [-7,7]
    scale: torch.Tensor  # float32 [out_channels]: weight = int_weight * scale.view(-1, 1, ...)
    bias: torch.Tensor | None  # float32 [out_channels], float in training
    bias_input: str | None = None  # quantizer feeding the layer: integer bias (module doc)


@dataclass(frozen=True)
class ActQuantInfo:
    """One activation quantizer: per-tensor scale, zero point 0 (see the module contract)."""

    name: str  # "input_quant", "relu", "layer1.0.relu1", ...
    bits: int
    signed: bool
    scale: torch.Tensor  # float32 scalar (per tensor)
    zero_point: torch.Tensor  # float32 scalar, always 0

    @property
    def qmin(self) -> int:
        return code_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return code_range(self.bits, self.signed)[1]


def quant_layers(model: nn.Module) -> list[QuantLayerInfo]:
    """Every quantized conv/linear of a student, in module order, with eval-mode values."""
    infos = []
    bias_inputs = {name.removesuffix("_integer_bias"): m.act_name
                   for name, m in model.named_modules() if isinstance(m, _brevitas.IntegerBias)}
    for name, m in model.named_modules():
        if _brevitas.is_quant_layer(m):
            codes, scale, bits = _brevitas.weight_codes(m)
            bias = None if m.bias is None else m.bias.detach().float().clone()
            infos.append(QuantLayerInfo(name, "linear" if isinstance(m, nn.Linear) else "conv",
                                        bits, codes, scale, bias, bias_inputs.get(name)))
    return infos


def act_quants(model: nn.Module) -> list[ActQuantInfo]:
    """Every activation quantizer of a student, ``input_quant`` first, then module order."""
    found = [(name, m) for name, m in model.named_modules() if _brevitas.is_act_quant(m)]
    found.sort(key=lambda nm: nm[0] != "input_quant")  # stable: the rest keep module order
    return [ActQuantInfo(name, *_brevitas.act_params(m)) for name, m in found]


def weight_storages(model: nn.Module, opset: int = 25, ternary_storage: str = "trits",
                    integer_linear: Collection[str] = ()) -> dict[str, str]:
    """How ``lowbit.export`` stores each layer's codes at ``opset``: the ladder, and uint8 +
    128 where an integer kernel fed by the layer's input codes could overflow
    (``lowbit._backend``). ``integer_linear``: Linear layers that run as integer kernels
    (applied over more than two dims: MatMul), not as float Gemm."""
    acts = {a.name: a for a in act_quants(model)}
    storage = {}
    for info in quant_layers(model):
        act = acts.get(info.bias_input)
        x_max = None if act is None else activation_range(act.bits, act.signed)[1]
        storage[info.name] = weight_storage(
            info.int_weight.numpy(), x_max,
            storage_for(info.weight_bits, opset, ternary_storage),
            "matmul" if info.name in integer_linear else info.kind)
    return storage


def output_feed(student: fx.GraphModule) -> tuple[str, str | None]:
    """(the last conv/linear in forward order, the activation quantizer whose codes reach its
    input, looking back through any op; None when none does): the gate's output step is that
    quantizer's scale through that layer, whatever order the modules were registered in."""
    modules = dict(student.named_modules())
    layers = [n for n in student.graph.nodes
              if n.op == "call_module" and _brevitas.is_quant_layer(modules[n.target])]
    if not layers:
        raise ValueError("the student has no quantized conv/linear layer")
    node = layers[-1].args[0]
    while isinstance(node, fx.Node) and node.op != "placeholder":
        if node.op == "call_module" and _brevitas.is_act_quant(modules[node.target]):
            return layers[-1].target, node.target
        node = node.args[0] if node.args else None
    return layers[-1].target, None
