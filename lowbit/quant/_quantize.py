"""``quantize(model, spec)``: model surgery that turns a float CNN into a QAT student.

Default ternary scale rule: "twn" (exact TWN, see the adapter's module docstring). Measured
with ``benchmarks/quant_rules.py`` (2 loaded CPU cores, so short runs): digits_cnn, 4 QAT
epochs from a 98.3% float model: twn 98.3%, learned 98.1%; ResNet20 from a 68.2% float
checkpoint, 60 steps of batch 64 on CIFAR-10: twn 75.7%, learned 77.5% (1,000 test images,
standard error ~1.3 points). Neither rule wins beyond noise, so the default is the one with
no extra parameters, no initialisation to get wrong and a closed form the exporter and the
papers share: "twn". "learned" remains a spec option (LSQ-style per-channel range).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable

import torch
import torch.fx
import torch.nn as nn

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
        raise ValueError("model is already a quantized student (it carries lowbit_quant); "
                         "quantize its float model instead")
    _check_supported(model)
    order = _forward_order(model)
    if not order:
        raise ValueError("model has no Conv2d or Linear layer to quantize")
    unknown = [name for name, _ in spec.overrides if name not in order]
    if unknown:
        raise ValueError(f"overrides name layers the model does not have: {', '.join(unknown)}; "
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
    input_q = _brevitas.input_quant(spec.input_bits)
    if isinstance(student, nn.Sequential) and type(student).forward is nn.Sequential.forward:
        # a Sequential runs its children in order: put input_quant first (names are kept,
        # positions shift by one)
        student._modules = {"input_quant": input_q, **student._modules}
    else:
        student.input_quant = input_q
        student.register_forward_pre_hook(_quantize_input)
    student.lowbit_quant = spec
    if hasattr(model, "lowbit_arch"):
        student.lowbit_arch = copy.deepcopy(model.lowbit_arch)
    return student


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the student sees its input through ``input_quant``."""
    return (module.input_quant(args[0]), *args[1:])


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
        if isinstance(m, _QUANTIZED + _FLOAT_OK) or next(m.parameters(recurse=False), None) is None:
            continue
        raise ValueError(f"layer {name!r} is a {type(m).__module__}.{type(m).__name__} holding "
                         f"weights lowbit cannot quantize; supported: Conv2d (incl. grouped/"
                         f"depthwise) and Linear, with float BatchNorm1d/2d")


def _forward_order(model: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear layers in the order forward calls them.

    Found by a torch.fx trace (no input needed); a model fx cannot trace falls back to
    registration order, which is forward order for sequential-style models.
    """
    layers = {name for name, m in model.named_modules() if isinstance(m, _QUANTIZED)}
    try:
        graph = torch.fx.symbolic_trace(model).graph
        order = list(dict.fromkeys(n.target for n in graph.nodes
                                   if n.op == "call_module" and n.target in layers))
        if set(order) == layers:
            return order
    except Exception:  # noqa: BLE001  (any untraceable forward: fall back, see docstring)
        pass
    return [name for name, m in model.named_modules() if isinstance(m, _QUANTIZED)]


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
