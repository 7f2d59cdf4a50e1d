"""``quantize(model, spec)``: model surgery that turns a float CNN into a QAT student.

Default ternary scale rule: "twn" (exact TWN, see the adapter's module docstring). Measured
with ``benchmarks/quant_rules.py`` (2 loaded CPU cores, so short runs): digits_cnn, 4 QAT
epochs from a 98.3% float model: twn 98.3%, learned 98.1%; ResNet20 from a 68.2% float
checkpoint, 60 steps of batch 64 on CIFAR-10: twn 75.7%, learned 77.5% (1,000 test images,
standard error ~1.3 points). Neither rule wins beyond noise, so the default is the one with
no extra parameters, no initialisation to get wrong and a closed form the exporter and the
papers share: "twn". "learned" remains a spec option (LSQ-style per-channel range).

Two things make the student compute what its integer deployment computes (both found by a
torch.fx trace of the float model; a model fx cannot trace gets neither):

- residual adds: each input of an ``add`` that comes straight from a BatchNorm/conv/linear
  gets a signed ``spec.residual_bits`` quantizer (``<module>.output_quant``, a forward
  hook), so onnxruntime runs the conv before it as an integer kernel (QLinearConv) instead
  of in float (measured on ResNet20: 21 of 21 convs fused instead of 10);
- integer bias: a layer whose input is a quantizer's output (through max-pool/flatten) gets
  an :class:`~lowbit.quant._brevitas.IntegerBias` hook (on the BatchNorm after it, if any)
  that rounds the folded bias to int32 at s_in * s_w in eval mode, as integer kernels do.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn

from ..errors import QuantizeError
from . import _brevitas
from ._spec import QuantSpec

_QUANTIZED = (nn.Conv2d, nn.Linear)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6)
_FLOAT_OK = (nn.BatchNorm1d, nn.BatchNorm2d)  # kept float; the exporter folds them


def quantize(model: nn.Module, spec: QuantSpec | None = None, *, copy_weights: bool = True,
             **spec_fields) -> nn.Module:
    """A quantization-aware copy of ``model`` (``model`` itself is left untouched).

    Every Conv2d (incl. grouped/depthwise) and Linear becomes a Brevitas QuantConv2d /
    QuantLinear with per-output-channel weight scales at ``spec.bits_for(name, first=,
    last=)`` bits, where first/last are the first conv/linear and the last conv/linear in
    forward order; ReLU/ReLU6 become unsigned ``act_bits`` QuantReLU (ReLU6's clip at 6 is
    replaced by the learned range); a signed 8-bit ``input_quant`` runs on the input (a
    forward pre-hook; in an ``nn.Sequential`` it becomes the first child);
    BatchNorm stays float. ``copy_weights=True`` starts from the float weights (Apprentice
    scheme C); False starts from fresh PyTorch init and reset BatchNorm (scheme B).
    ``spec_fields`` build or amend the spec: ``quantize(m, weight_bits=4)``.
    """
    if spec is None:
        spec = QuantSpec(**spec_fields)
    elif spec_fields:
        spec = dataclasses.replace(spec, **spec_fields)
    if getattr(model, "lowbit_quant", None) is not None:
        raise QuantizeError("model is already a quantized student (it carries lowbit_quant); "
                            "quantize its float model instead")
    _check_supported(model)
    roles = _roles(model, residual=spec.residual_bits is not None)
    order = roles.order
    if not order:
        raise QuantizeError("model has no Conv2d or Linear layer to quantize")
    unknown = [name for name, _ in spec.overrides if name not in order]
    if unknown:
        raise QuantizeError(f"overrides name layers the model does not have: {', '.join(unknown)}; "
                            f"quantizable layers: {', '.join(order)}")

    student = copy.deepcopy(model)
    replaced: dict[int, nn.Module] = {}  # a module reachable under two names is replaced once
    for name, m in list(student.named_modules(remove_duplicate=False)):
        if id(m) in replaced:
            _replace(student, name, replaced[id(m)])
        elif isinstance(m, _QUANTIZED):
            bits = spec.bits_for(name, first=name == order[0], last=name == order[-1])
            new = _brevitas.quant_layer(m, bits, spec.scale_rule, copy_weights)
            replaced[id(m)] = new
            _replace(student, name, new)
        elif isinstance(m, _ACTIVATIONS):
            replaced[id(m)] = _brevitas.quant_relu(spec.act_bits)
            _replace(student, name, replaced[id(m)])
        elif isinstance(m, _FLOAT_OK) and not copy_weights:
            m.reset_parameters()
    input_q = _brevitas.signed_quant(spec.input_bits)
    if isinstance(student, nn.Sequential) and type(student).forward is nn.Sequential.forward:
        # a Sequential runs its children in order: put input_quant first (names are kept,
        # positions shift by one)
        student._modules = {"input_quant": input_q, **student._modules}
    else:
        student.input_quant = input_q
        student.register_forward_pre_hook(_quantize_input)
    for name in roles.residual:
        student.get_submodule(name).output_quant = _brevitas.signed_quant(spec.residual_bits)
    for layer, (act, bn) in roles.bias_inputs.items():  # before output_quant: it sees the sum
        owner = student.get_submodule(bn or layer)
        owner.register_forward_hook(_brevitas.IntegerBias(
            student.get_submodule(act), student.get_submodule(layer),
            student.get_submodule(bn) if bn else None))
    for name in roles.residual:
        student.get_submodule(name).register_forward_hook(_quantize_output)
    student.lowbit_bias_inputs = {layer: act for layer, (act, _) in roles.bias_inputs.items()}
    student.lowbit_quant = spec
    if hasattr(model, "lowbit_arch"):
        student.lowbit_arch = copy.deepcopy(model.lowbit_arch)
    return student


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the student sees its input through ``input_quant``."""
    return (module.input_quant(args[0]), *args[1:])


def _quantize_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook: a residual-add input leaves its module through ``output_quant``."""
    return module.output_quant(out)


@torch.no_grad()
def calibrate(student: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Set every activation range of ``student`` to the mean batch max |x| over ``batches``.

    For post-training quantization (a student that will not be trained): BatchNorm
    statistics and weights are untouched (eval mode), and later training does not
    re-initialise the ranges.
    """
    ranges = _brevitas.act_ranges(student)
    was_training = student.training
    student.eval()
    for r in ranges:
        r.seen.zero_()
        r.calibrating = True
    try:
        for x in batches:
            student(x)
    finally:
        for r in ranges:
            r.calibrating = False
            r.seen.clamp_(min=r.init_steps)
        student.train(was_training)
    return student


def _check_supported(model: nn.Module) -> None:
    for name, m in model.named_modules():
        _check_batchnorm(name, m)
        if isinstance(m, _QUANTIZED + _FLOAT_OK) or next(m.parameters(recurse=False), None) is None:
            continue
        raise QuantizeError(f"layer {name!r} is a {type(m).__module__}.{type(m).__name__} holding "
                            f"weights lowbit cannot quantize; supported: Conv2d (incl. grouped/"
                            f"depthwise) and Linear, with float BatchNorm1d/2d")


def _check_batchnorm(name: str, m: nn.Module) -> None:
    """A BatchNorm without running statistics normalises by batch statistics in eval mode
    too: it cannot be folded into the integer convolution before it, and the student's eval
    forward fails. Refused here, before any training."""
    if isinstance(m, _FLOAT_OK) and not m.track_running_stats:
        raise QuantizeError(f"layer {name!r} is a {type(m).__name__}(track_running_stats=False): "
                            f"it has no running statistics to fold into the layer before it; "
                            f"build it with track_running_stats=True")


_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
# ops that pass quantized codes through unchanged (onnxruntime moves DequantizeLinear past them)
_PASS_MODULES = (nn.Flatten, nn.MaxPool2d, nn.Identity, nn.Dropout)
_PASS_FUNCTIONS = {torch.flatten, torch.reshape}
_PASS_METHODS = {"flatten", "reshape", "view", "contiguous"}
_ADDS = {operator.add, operator.iadd, torch.add}


@dataclass
class _Roles:
    """What the fx graph of a float model says about its layers (names are module paths)."""

    order: list[str]  # Conv2d/Linear layers in forward order
    residual: list[str] = field(default_factory=list)  # modules feeding a residual add
    # layer -> (quantizer whose codes it consumes, BatchNorm right after it or None)
    bias_inputs: dict[str, tuple[str, str | None]] = field(default_factory=dict)


def _roles(model: nn.Module, residual: bool) -> _Roles:
    """Forward order, residual-add producers and integer-bias inputs, from a torch.fx trace.

    A model fx cannot trace falls back to registration order (forward order for
    sequential-style models) with no residual quantizers and no integer-bias emulation.
    """
    mods = dict(model.named_modules())
    layers = {name for name, m in mods.items() if isinstance(m, _QUANTIZED)}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001  (any untraceable forward: fall back, see docstring)
        return _Roles([name for name, m in mods.items() if isinstance(m, _QUANTIZED)])
    calls = [n for n in graph.nodes if n.op == "call_module"]
    roles = _Roles(list(dict.fromkeys(n.target for n in calls if n.target in layers)))
    if set(roles.order) != layers:  # a layer forward never calls: keep registration order
        roles.order = [name for name, m in mods.items() if isinstance(m, _QUANTIZED)]
    if residual:
        for node in graph.nodes:
            if node.op == "call_function" and node.target in _ADDS:
                roles.residual += [a.target for a in node.args[:2]
                                   if isinstance(a, torch.fx.Node) and a.op == "call_module"
                                   and isinstance(mods[a.target], _QUANTIZED + _BATCHNORM)]
        roles.residual = list(dict.fromkeys(roles.residual))

    def quantizer(node: torch.fx.Node) -> str | None:
        """Name of the quantizer whose output ``node`` is, looking through pass-through ops."""
        while (node.op == "call_module" and isinstance(mods[node.target], _PASS_MODULES)) or \
                (node.op == "call_function" and node.target in _PASS_FUNCTIONS) or \
                (node.op == "call_method" and node.target in _PASS_METHODS):
            node = node.args[0]
        if node.op == "placeholder":
            return "input_quant"
        if node.op == "call_module" and isinstance(mods[node.target], _ACTIVATIONS):
            return node.target
        if node.op == "call_module" and node.target in roles.residual:
            return node.target + ".output_quant"
        return None

    uses = collections.Counter(n.target for n in calls)
    for node in calls:
        if node.target not in layers or uses[node.target] != 1:
            continue
        act = quantizer(node.args[0])
        users = list(node.users)
        bn = users[0].target if len(users) == 1 and users[0].op == "call_module" and \
            isinstance(mods[users[0].target], _BATCHNORM) and \
            uses[users[0].target] == 1 else None
        if act is not None and (bn is not None or mods[node.target].bias is not None):
            roles.bias_inputs[node.target] = (act, bn)
    return roles


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
