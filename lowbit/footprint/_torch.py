"""PyTorch front end: an ``nn.Module`` (float, or a lowbit Brevitas student) -> layer graph.

The model is traced with ``torch.fx`` (Brevitas layers are leaves, so their quantizer internals
stay opaque) and run once at batch 1 to record every output shape. Float models hold weights
and activations at 32 bits. A lowbit student (``model.lowbit_quant`` set) reports each
conv/linear at the bits ``lowbit.quant.quant_layers`` gives (one fp32 scale per output channel)
and each activation quantizer at the bits ``lowbit.quant.act_quants`` gives. Tensors the model
reads directly (fx get_attr: a position embedding, a layer scale, ``F.layer_norm``'s weight)
are parameters of the op that reads them; a product of two activations (``q @ k^T``) costs
``out_elements * K`` MACs.
"""

from __future__ import annotations

import math
import re

import torch
import torch.fx as fx
import torch.nn as nn

from .. import _ops
from .._backend import UNSIGNED_WEIGHTS
from .._onnx_meta import TRITS_BITS, TRITS_TABLE_ELEMENTS
from ..errors import FootprintError
from ..quant import IntegerBias
from ._graph import (
    ADD,
    AFFINE,
    CONCAT,
    CONV,
    FP32,
    INPUT,
    LINEAR,
    MATMUL,
    UNARY,
    Graph,
    Op,
    Param,
    fuse,
)


class _Tracer(fx.Tracer):
    """Keeps Brevitas modules (and every module without children) as single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith(("brevitas", "lowbit.quant")) or \
            _ops.is_leaf(m) or super().is_leaf_module(m, qualname)


def load(model: nn.Module, input_shape: tuple[int, ...]) -> Graph:
    """Trace ``model`` into a layer graph at batch 1 for inputs of ``input_shape`` (C, H, W)."""
    source = getattr(model, "lowbit_arch", {}).get("name") or type(model).__name__
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # data-dependent control flow and the like
        raise FootprintError(f"{source}: torch.fx cannot trace the model "
                             f"({str(exc).splitlines()[0][:200]}); export it to ONNX and "
                             f"analyze the .onnx file instead") from None
    modules = dict(model.named_modules())
    storage, act_bits = _quant_bits(model)
    attrs = {n.name: _attr(model, n.target) for n in graph.nodes if n.op == "get_attr"}
    unknown = [c[1] for n in graph.nodes if n.op.startswith("call")
               for c in [_classify(n, modules, storage, act_bits, None, attrs)]
               if c[0] == "unknown"]
    if unknown:
        raise FootprintError(f"{source}: cannot account for {len(unknown)} op(s): "
                             f"{', '.join(unknown[:12])}{' ...' if len(unknown) > 12 else ''}; "
                             f"supported: Conv/Linear/BatchNorm/activations/pooling/add/cat/"
                             f"flatten and lowbit's Brevitas layers")
    shapes = _shapes(model, graph, input_shape, source)
    ops, outputs = [], []
    table_counted = False  # the trits' decoding table is stored once per model
    skipped: dict[str, list[str]] = {}  # non-tensor node -> the tensors it read
    for node in graph.nodes:
        if node.op == "output":
            outputs = _nodes(node.args)
            continue
        shape = shapes.get(node.name)
        if node.op == "placeholder":
            ops.append(Op("input", INPUT, [], node.name, shape, bits=FP32))
            continue
        if node.op == "get_attr":
            continue
        kind, name, params, macs, bits = _classify(node, modules, storage, act_bits, shape,
                                                   attrs)
        args = _nodes((node.args, node.kwargs))
        ins = [i for a in args for i in skipped.get(a, [a]) if i in shapes and i not in attrs]
        if kind is None or shape is None:  # shape queries, tuples (a split's parts)
            skipped[node.name] = ins  # a part of a split reads what the split read
            continue
        params = [*params, *_constant_params(kind, [attrs.pop(a) for a in args if a in attrs
                                                    and attrs[a] is not None])]
        if kind == MATMUL:  # [..., N, K] @ [..., K, M]: K products per output element
            macs = math.prod(shape) * shapes[ins[0]][-1]
        if storage.get(name) == "trits" and not table_counted:
            params = [*params, Param("table", TRITS_TABLE_ELEMENTS, 8)]  # decoding table, once
            table_counted = True
        ops.append(Op(name, kind, ins, node.name, shape, params, macs, bits))
    return fuse(source, ops, outputs)


def _nodes(args) -> list[str]:
    """Names of the fx nodes in (nested) call arguments, in order."""
    found: list[str] = []
    fx.node.map_arg(args, lambda a: found.append(a.name) or a)
    return found


def _attr(model: nn.Module, target: str) -> torch.Tensor | None:
    """The tensor an fx get_attr node reads (a parameter or buffer used directly)."""
    value = model
    for part in target.split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def _constant_params(kind: str, tensors: list[torch.Tensor]) -> list[Param]:
    """The stored tensors an op reads directly (a position embedding added to the tokens, a
    layer scale, ``F.layer_norm``'s weight and bias), each counted at its first use: an added
    one is a shift ("bias"), else scale then shift; scalars are hyperparameters, not counted
    (as constants in an ONNX file)."""
    tensors = [t for t in tensors if t.numel() > 1]
    if kind == AFFINE:
        return [Param("bias", t.numel(), FP32) for t in tensors]
    return _affine(tensors)


def _quant_bits(model: nn.Module) -> tuple[dict[str, str], dict[str, int]]:
    """How each conv/linear's weights are stored (``lowbit.quant.weight_storages``: as
    ``lowbit.export`` writes them) and bits per activation quantizer of a lowbit student."""
    if getattr(model, "lowbit_quant", None) is None:
        return {}, {}
    from ..quant import act_quants, weight_storages

    return weight_storages(model), {a.name: a.bits for a in act_quants(model)}


def _shapes(model: nn.Module, graph: fx.Graph, input_shape: tuple[int, ...],
            source: str) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of every fx node that yields a tensor (one batch-1 run)."""
    shapes: dict[str, tuple[int, ...]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            value = getattr(out, "value", out)  # a Brevitas QuantTensor carries .value
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                shapes[n.name] = tuple(value.shape[1:])
            return out

    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        x = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu")
        with torch.no_grad():
            Recorder(fx.GraphModule(model, graph)).run(x)
    except Exception as exc:
        raise FootprintError(f"{source}: running the model on an input of shape "
                             f"{tuple(input_shape)} failed ({str(exc).splitlines()[0][:200]}); "
                             f"check input_shape (C, H, W)") from None
    finally:
        model.train(was_training)
    return shapes


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str | None, _ops.Op | None]:
    """(kind, registry entry) of an fx node of the model as traced: the registry's (a functional
    or in-place form as the op it stands for, ``_ops.form_of``), else ``_ops.FOOTPRINT_ONLY``'s
    (no entry); kind None for sizes and indices, "unknown" for an op neither knows."""
    form = _ops.form_of(node)
    if form is None:
        op = _ops.lookup(node, modules)
        key = type(modules[node.target]) if node.op == "call_module" else node.target
    else:
        op, key = _ops.MODULES.get(form) or _ops.FUNCTIONS.get(form), form
    if op is not None:
        return op.footprint, op
    keys = key.__mro__ if isinstance(key, type) else (key,)
    return next((_ops.FOOTPRINT_ONLY[k] for k in keys if k in _ops.FOOTPRINT_ONLY), "unknown"), \
        None


def _classify(node: fx.Node, modules: dict[str, nn.Module], storage: dict[str, str],
              act_bits: dict[str, int], shape: tuple[int, ...] | None,
              attrs: dict[str, torch.Tensor | None]) -> tuple:
    """(kind, name, params, macs, bits) of one fx node; kind "unknown" if unsupported.
    ``attrs``: the tensors of the model's get_attr nodes (constants, not activations)."""
    kind, op = _kind(node, modules)
    if kind is None:  # sizes and indices: no tensor
        return None, node.name, [], 0, None
    if node.op == "call_module":
        name, m = node.target, modules[node.target]
        if name in act_bits:
            return UNARY, name, [], 0, act_bits[name]
        if isinstance(m, IntegerBias):  # the student's integer bias: folded, in place
            return UNARY, name, [], 0, None
        if kind in (CONV, LINEAR):
            axis = 0 if op is None else op.weight_axis
            return (*_weighted(name, m, storage.get(name), shape, kind, axis), None)
        if kind == AFFINE:  # BatchNorm: running statistics fold to a scale and shift
            c = m.num_features
            return AFFINE, name, [Param("scale", c, FP32), Param("bias", c, FP32)], 0, None
        if kind != "unknown":  # a normalisation's affine parameters, not its quantizer's
            return kind, name, _affine(m.parameters(recurse=False)), 0, None
        return "unknown", f"{name} ({type(m).__name__})", [], 0, None
    form = _ops.form_of(node)
    target = node.target if form is None or isinstance(form, type) else form  # iadd: add
    base = re.sub(r"_$", "", getattr(target, "__name__", str(target)))  # a method: its name
    if kind == ADD:
        kind = _one_activation(node, base, attrs)
    if kind == CONCAT:
        base = CONCAT  # torch.cat, named as the ONNX front end names Concat
    stack = list((node.meta.get("nn_module_stack") or {}).keys())
    name = f"{stack[-1]}.{base}" if stack else base
    return kind, name if kind != "unknown" else f"{node.name} ({base})", [], 0, None


def _one_activation(node: fx.Node, base: str, attrs: dict[str, torch.Tensor | None]) -> str:
    """The kind of an element-wise op over activations and constants: ADD over two or more
    activations; on one, an added constant tensor is a shift (AFFINE: it folds into a
    conv/linear when per channel, as ONNX's Add of an initializer does); else UNARY (x * 2)."""
    args = [a for a in node.args if isinstance(a, fx.Node)]
    consts = [attrs.get(a.name) for a in args if a.op == "get_attr"]
    if len(args) - len(consts) >= 2:
        return ADD
    shift = base in ("add", "sub") and any(t is not None and t.numel() > 1 for t in consts)
    return AFFINE if shift else UNARY


def _affine(params) -> list[Param]:
    """A normalisation's per-channel scale and shift (fp32), if it has them."""
    return [Param(role, p.numel(), FP32) for role, p in zip(("scale", "bias"), params,
                                                              strict=False)]


# bits per stored code (lowbit.export's storage names); uint8 codes carry a zero point too
_STORED_BITS = {"trits": TRITS_BITS, "int2": 2, "int4": 4, "int8": 8, UNSIGNED_WEIGHTS: 8}


def _weighted(name: str, m: nn.Module, storage: str | None, shape: tuple[int, ...] | None,
              kind: str, axis: int) -> tuple:
    """(kind, name, params, MACs) of a conv/linear; ``storage`` None means a float layer;
    ``axis``: the output-channel axis of its weight (1: transposed)."""
    n_out = m.weight.shape[axis]
    params = [Param("weight", m.weight.numel(), _STORED_BITS[storage] if storage else FP32)]
    if storage is not None:
        params.append(Param("scale", n_out, FP32))
    if storage == UNSIGNED_WEIGHTS:
        params.append(Param("zero_point", n_out, 8))
    if m.bias is not None:
        params.append(Param("bias", m.bias.numel(), FP32))
    out = math.prod(shape) if shape else 0
    fan_in = math.prod(m.weight.shape[1:])  # C_in / groups * kernel, or in_features
    if axis == 1:  # transposed: each output takes C_in / groups * kernel / stride^2 products
        fan_in = m.weight.shape[0] // m.groups * math.prod(m.weight.shape[2:]) // \
            math.prod(m.stride)
    return kind, name, params, out * fan_in
