"""``quantize(model, spec)``: a float CNN -> a torch.fx GraphModule quantization-aware student.

Default ternary scale rule: "twn" (exact TWN, see the adapter's module docstring). Neither
rule wins beyond noise in ``benchmarks/quant_rules.py`` (README), so the default is the one
with no extra parameters, no initialisation to get wrong and a closed form the exporter and
the papers share: "twn". "learned" remains a spec option (LSQ-style per-channel range).

The float model is traced once (torch.fx), canonicalised by Brevitas' passes
(functional calls and ``x.mean((2, 3))`` to modules, shared stateless modules duplicated per
call site) plus lowbit's own (in-place ops to out-of-place, ``torch.relu``/``x.relu()``/
SiLU/GELU/... calls to modules), checked (anything else is refused by name, with the source
line), and every quantizer becomes a node of the returned graph (``print(student.graph)``):

- ``input_quant``: signed 8-bit, on the network input;
- each ReLU/ReLU6/Hardtanh(0, c) call site: a QuantReLU (unsigned ``act_bits``; the clip c
  caps its learned range, so the quantizer's clamp is the clip);
- each SiLU/Hardswish/GELU/LeakyReLU/Sigmoid/Hardsigmoid call site: the float activation,
  then ``<act>.output_quant`` (``act_bits``, unsigned for Sigmoid/Hardsigmoid);
- ``<bn>.output_quant`` / ``<layer>_quant`` (signed ``residual_bits``) after a conv/linear
  (or its BatchNorm) whose
  output no quantizer covers: residual-add inputs, linear bottlenecks, the input of a float
  activation; so onnxruntime runs the layer as an integer kernel;
- ``<m>.output_quant`` / ``<node>_quant`` (signed ``requant_bits``) after a float op (pooling,
  add, mul, cat) that feeds a conv/linear: requantization for the next integer kernel;
- ``<layer>_integer_bias`` (:class:`~lowbit.quant._brevitas.IntegerBias`) after a layer (or
  its BatchNorm) that consumes quantized codes: the eval-mode int32 bias rounding.

Module paths of the float model are kept, so state-dict keys are those of the float model
plus the quantizers'.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import traceback
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import _ops
from .._ckptfile import arch_of
from ..errors import QuantizeError
from . import _brevitas
from ._attention import sdpa_module, split_multihead
from ._spec import QuantSpec

# the registry's forms (``_ops.FUNCTION_FORMS``/``METHOD_FORMS``): in-place and method
# arithmetic to its function, activation calls to their modules (with Brevitas' own map)
_INPLACE = {f: g for f, g in _ops.FUNCTION_FORMS.items() if not isinstance(g, type)}
_INPLACE_METHODS = {m: g for m, g in _ops.METHOD_FORMS.items() if not isinstance(g, type)}
_MORE_FUNCTIONS = tuple((f, c) for f, c in _ops.FUNCTION_FORMS.items() if isinstance(c, type)
                        and c in _ops.MODULES and _ops.MODULES[c].role in (_ops.RELU,
                                                                           _ops.FLOAT_ACT))
_MORE_METHODS = tuple((m, c) for m, c in _ops.METHOD_FORMS.items() if isinstance(c, type))


def quantize(model: nn.Module, spec: QuantSpec | None = None, *, copy_weights: bool = True,
             **spec_fields) -> fx.GraphModule:
    """A quantization-aware GraphModule copy of ``model`` (``model`` itself is left untouched).

    Every Conv1d/Conv2d (incl. grouped/depthwise) and Linear becomes a Brevitas QuantConv1d/
    QuantConv2d/QuantLinear with per-output-channel weight scales at ``spec.bits_for(name,
    first=, last=)`` bits (first/last: the first and the last conv/linear in forward order);
    quantizers are inserted as listed in the module docstring; BatchNorm stays float.
    ``copy_weights=True`` starts from the float weights (Apprentice scheme C); False starts
    from fresh PyTorch init and reset BatchNorm (scheme B). ``spec_fields`` build or amend
    the spec: ``quantize(m, weight_bits=4)``. Raises QuantizeError for a model torch.fx cannot
    trace or a layer/op lowbit cannot quantize, naming it.
    """
    if spec is None:
        spec = QuantSpec(**spec_fields)
    elif spec_fields:
        spec = dataclasses.replace(spec, **spec_fields)
    if getattr(model, "lowbit_quant", None) is not None:
        raise QuantizeError("model is already a quantized student (it carries lowbit_quant); "
                            "quantize its float model instead")
    gm = trace(model)
    _canonicalise(gm)
    _check_supported(gm)
    order = _weighted_order(gm)
    unknown = [name for name, _ in spec.overrides if name not in order]
    if unknown:
        raise QuantizeError(f"overrides name layers the model does not have: "
                            f"{', '.join(unknown)}; quantizable layers: {', '.join(order)}")
    for name in order:
        bits = spec.bits_for(name, first=name == order[0], last=name == order[-1])
        gm.set_submodule(name, _brevitas.quant_layer(gm.get_submodule(name), bits,
                                                     spec.scale_rule, copy_weights))
    if not copy_weights:
        for m in gm.modules():
            if _ops.MODULES.get(type(m), None) is not None and \
                    _ops.MODULES[type(m)].role == _ops.NORM:
                m.reset_parameters()
    _insert_quantizers(gm, spec)
    gm.graph.lint()
    gm.recompile()
    gm.lowbit_quant = spec
    gm.lowbit_arch = dict(arch_of(model))  # how to rebuild the float model it came from
    return gm


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping the registry's leaf modules (``lowbit._ops.is_leaf``) as one
    call each, and its named functions (``_ops.named_functions``) as a call of their module."""

    def __init__(self, functions: tuple[object, ...] = ()) -> None:
        super().__init__(autowrap_functions=functions)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _ops.is_leaf(m) or super().is_leaf_module(m, qualname)

    def create_proxy(self, kind, target, args, kwargs, *rest, **more):  # noqa: ANN001, ANN201
        if kind == "call_function" and target is F.scaled_dot_product_attention:
            module = sdpa_module(args, kwargs)  # traced through: its matmuls and softmax
            name = self._free_name("scaled_dot_product_attention")
            self.root.add_module(name, module)
            if self.submodule_paths is not None:  # the tracer's cache of module paths
                self.submodule_paths.update((m, f"{name}.{sub}".rstrip("."))
                                            for sub, m in module.named_modules())
            return self.call_module(module, module.forward, args[:3], {})
        module = _ops.module_form(target, args, kwargs) if kind == "call_function" else None
        if module is None:
            return super().create_proxy(kind, target, args, kwargs, *rest, **more)
        name = self._free_name(target.__name__)
        self.root.add_module(name, module)
        return super().create_proxy("call_module", name, args[:1], {}, *rest, **more)

    def _free_name(self, base: str) -> str:
        return next(f"{base}_{i}" for i in itertools.count()
                    if not hasattr(self.root, f"{base}_{i}"))


def trace(model: nn.Module) -> fx.GraphModule:
    """The float model as ``quantize`` reads it: a torch.fx trace of a deep copy of ``model``
    with its attention written out as layers (``_attention``; the same function), or a
    QuantizeError with the offending line."""
    copied = copy.deepcopy(model)
    split_multihead(copied)
    tracer = _Tracer(_ops.named_functions(model))
    tracer.record_stack_traces = True
    try:
        graph = tracer.trace(copied)
    except QuantizeError:
        raise
    except Exception as exc:  # noqa: BLE001  (any untraceable forward: refused, named)
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if "/torch/" not in f.filename and "/lowbit/quant/" not in f.filename]
        where = f" at {frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}" \
            if frames else ""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizeError(f"torch.fx cannot trace {type(model).__name__}{where} ({reason}); "
                            f"lowbit quantizes models as graphs: make forward free of "
                            f"data-dependent control flow") from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _canonicalise(gm: fx.GraphModule) -> None:
    """Functional calls to modules, one stateless module per call site, no in-place ops."""
    with warnings.catch_warnings():  # brevitas.graph warns on import (deprecated brevitas.fx,
        warnings.simplefilter("ignore")  # optional fast_hadamard_transform)
        from brevitas.graph.base import MethodToModule
        from brevitas.graph.standardize import (
            DuplicateSharedStatelessModule,
            TorchFunctionalToModule,
        )
    _split_norm_act(gm)
    TorchFunctionalToModule(TorchFunctionalToModule.FN_TO_MODULE_MAP + _MORE_FUNCTIONS).apply(gm)
    for method, cls in _MORE_METHODS:
        MethodToModule(method, cls).apply(gm)
    for node in gm.graph.nodes:  # F.relu(input=x) and the like: the tensor positional
        if node.op == "call_module" and "input" in node.kwargs:
            kwargs = dict(node.kwargs)
            node.args, node.kwargs = (kwargs.pop("input"), *node.args), kwargs
    _mean_to_pool(gm)
    DuplicateSharedStatelessModule().apply(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _INPLACE:
            node.target = _INPLACE[node.target]
        elif node.op == "call_method" and node.target in _INPLACE_METHODS and \
                not node.kwargs and len(node.args) == 2:
            node.op, node.target = "call_function", _INPLACE_METHODS[node.target]
    for m in gm.modules():
        if getattr(m, "inplace", False):
            m.inplace = False  # a quantizer after it needs the float value intact
    gm.recompile()


def _split_norm_act(gm: fx.GraphModule) -> None:
    """A BatchNorm fused with its activation (``lowbit._ops.split_norm_act``) -> the plain
    BatchNorm at the same path, then its activation as ``<path>.act``: the BatchNorm folds
    into the conv before it and the activation is quantized like any other."""
    for node in list(gm.graph.nodes):
        parts = _ops.split_norm_act(gm.get_submodule(node.target)) \
            if node.op == "call_module" else None
        if parts is None:
            continue
        bn, act = parts
        gm.set_submodule(node.target, bn)
        # a child of the BatchNorm: the state-dict keys stay those of the fused module
        _insert_after(gm, node, f"{node.target}.act", act)
    gm.recompile()


def _mean_to_pool(gm: fx.GraphModule) -> None:
    """``x.mean((2, 3))`` / ``torch.mean(x, -1)`` over all spatial dims -> AdaptiveAvgPool +
    flatten (Brevitas' MeanMethodToAdaptiveAvgPool2d leaves the 4-d output in place, and
    knows no 1-d case)."""
    for node in list(gm.graph.nodes):
        if not ((node.op == "call_method" and node.target == "mean") or
                (node.op == "call_function" and node.target is torch.mean)):
            continue
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        pool = {frozenset({2, 3}): nn.AdaptiveAvgPool2d, frozenset({-1, -2}): nn.AdaptiveAvgPool2d,
                frozenset({2}): nn.AdaptiveAvgPool1d, frozenset({-1}): nn.AdaptiveAvgPool1d
                }.get(frozenset(dims))
        if pool is None:
            continue  # left for _check_supported to refuse by name
        name = f"{node.name}_pool"
        gm.add_submodule(name, pool(1))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node.args[0],))
        out = new
        if not keepdim:
            with gm.graph.inserting_after(new):
                out = gm.graph.call_function(torch.flatten, (new, 1))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    gm.recompile()


def _where(node: fx.Node) -> str:
    """The user's source line of ``node`` (from the trace's recorded stack), if known."""
    lines = (node.stack_trace or "").strip().splitlines()
    frames = [(lines[i].strip(), lines[i + 1].strip()) for i in range(len(lines) - 1)
              if lines[i].lstrip().startswith("File ") and "/torch/" not in lines[i]
              and "/lowbit/quant/" not in lines[i]]
    return f" ({frames[-1][0]}: {frames[-1][1]})" if frames else ""


def _refusal(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """Why lowbit cannot quantize ``node`` (None: it can): not in the op registry, or a
    registered layer built in a way lowbit cannot export."""
    op = _ops.lookup(node, modules)
    if node.op == "call_module":
        m = modules[node.target]
        what = f"layer {node.target!r} is a {type(m).__module__}.{type(m).__name__}"
        if isinstance(m, nn.Hardtanh) and type(m) is not nn.ReLU6 and m.min_val != 0:
            return what + f"(min_val={m.min_val}): only Hardtanh(0, c) is a clipped ReLU"
        if op is not None and op.role == _ops.WEIGHTED and \
                getattr(m, "padding_mode", "zeros") != "zeros":
            return what + f"(padding_mode={m.padding_mode!r}): only zero padding exports"
        if op is not None and op.role == _ops.NORM and not m.track_running_stats:
            # it normalises by batch statistics in eval mode too: nothing to fold into the
            # integer convolution before it, and the student's eval forward fails
            return what + "(track_running_stats=False): build it with " \
                "track_running_stats=True so it has running statistics to fold"
    elif node.op == "call_function":
        what = f"call {getattr(node.target, '__name__', node.target)}()"
    elif node.op == "call_method":
        what = f"method .{node.target}()"
    else:
        return None
    return None if op is not None else what


def _check_supported(gm: fx.GraphModule) -> None:
    """Refuse, by name, every layer and op lowbit cannot quantize or export."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise QuantizeError(f"the model takes {len(inputs)} inputs; lowbit quantizes models "
                            f"with exactly one input tensor")
    modules = dict(gm.named_modules())
    bad = [why + _where(node) for node in gm.graph.nodes
           for why in [_refusal(node, modules)] if why is not None]
    if bad:
        supported = ", ".join(sorted({t.__name__ for t in _ops.MODULES} |
                                     {getattr(f, "__name__", str(f)) + "()"
                                      for f in _ops.FUNCTIONS} |
                                     {"." + m + "()" for m in _ops.METHODS}))
        raise QuantizeError(f"lowbit cannot quantize {'; '.join(bad[:8])}"
                            f"{' ...' if len(bad) > 8 else ''}. Supported: {supported}")


def _role(gm: fx.GraphModule, node: fx.Node) -> str | None:
    return _ops.role(node, dict(gm.named_modules()))


def _weighted_order(gm: fx.GraphModule) -> list[str]:
    """Conv/Linear module paths in forward order; each must be called exactly once."""
    modules = dict(gm.named_modules())
    calls = [n.target for n in gm.graph.nodes
             if n.op == "call_module" and _ops.role(n, modules) == _ops.WEIGHTED]
    shared = sorted({t for t in calls if calls.count(t) > 1})
    if shared:
        raise QuantizeError(f"layers {', '.join(shared)} are called more than once (shared "
                            f"weights); lowbit quantizes each conv/linear call site as one "
                            f"integer kernel: give each call its own layer")
    if not calls:
        raise QuantizeError("model has no Conv1d, Conv2d or Linear layer to quantize")
    return calls


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_quantizer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is an activation quantizer of the student."""
    return _brevitas.is_act_quant(_module(gm, node))


def passes_codes(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` moves quantized codes without changing them (pool max, views)."""
    return _role(gm, node) == _ops.PASS


def source(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The producer of ``node``'s value, looking back through code-preserving ops."""
    while passes_codes(gm, node):
        node = node.args[0]
    return node


def quantized_downstream(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether every use of ``node`` reaches a quantizer through code-preserving ops."""
    return all(is_quantizer(gm, u) or (passes_codes(gm, u) and quantized_downstream(gm, u))
               for u in node.users)


def layer_end(gm: fx.GraphModule, layer: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """(last node of the layer's integer kernel, its BatchNorm node or None): a BatchNorm
    that alone consumes the layer is folded into it by the exporter."""
    users = list(layer.users)
    if len(users) == 1 and _role(gm, users[0]) == _ops.NORM:
        return users[0], users[0]
    return layer, None


def _insert_after(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module) -> fx.Node:
    """Insert ``module`` (registered as ``name``) after ``node``; every use of ``node`` now
    reads its output."""
    if name in dict(gm.named_modules()):
        raise QuantizeError(f"cannot add quantizer {name!r}: the model already has a module of "
                            f"that name")
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def _quant_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """``<module>.output_quant`` after a module (a child of it: the name checkpoints have
    always used), ``<layer>_quant`` after a conv/linear (Brevitas' layers have an
    ``output_quant`` of their own), ``<node>_quant`` after a function."""
    if node.op != "call_module":
        return f"{node.name}_quant"
    if _brevitas.is_quant_layer(_module(gm, node)):
        return f"{node.target}_quant"
    return f"{node.target}.output_quant"


def _insert_quantizers(gm: fx.GraphModule, spec: QuantSpec) -> None:
    graph = gm.graph
    (placeholder,) = [n for n in graph.nodes if n.op == "placeholder"]
    _insert_after(gm, placeholder, "input_quant", _brevitas.act_quant(spec.input_bits, True))
    modules = dict(gm.named_modules())
    for node in list(graph.nodes):
        op = _ops.lookup(node, modules) if node.op == "call_module" else None
        if op is not None and op.role == _ops.RELU:
            m = modules[node.target]
            clip = None if type(m) is nn.ReLU else float(getattr(m, "max_val", 6.0))
            gm.set_submodule(node.target, _brevitas.quant_relu(spec.act_bits, clip))
        elif op is not None and op.role == _ops.FLOAT_ACT:
            _insert_after(gm, node, _quant_name(gm, node),
                          _brevitas.act_quant(spec.act_bits, op.signed))
    layers = [n for n in graph.nodes if _brevitas.is_quant_layer(_module(gm, n))]
    # outputs: a layer whose output no quantizer covers gets one (residual adds always;
    # everything else when requantization is on), the network's logits excepted
    if spec.residual_bits is not None:
        for layer in layers:
            end, _ = layer_end(gm, layer)
            if quantized_downstream(gm, end) or all(u.op == "output" for u in end.users):
                continue
            feeds_add = any(_role(gm, u) == _ops.ADD for u in end.users)
            if feeds_add or spec.requant_bits is not None:
                _insert_after(gm, end, _quant_name(gm, end),
                              _brevitas.act_quant(spec.residual_bits, True))
    # inputs: a layer reading a float op's output (pooling, add, mul, cat) gets a requantizer
    if spec.requant_bits is not None:
        for layer in layers:
            src = source(gm, layer.args[0])
            if not is_quantizer(gm, src):
                _insert_after(gm, src, _quant_name(gm, src),
                              _brevitas.act_quant(spec.requant_bits, True))
    # integer bias: a layer consuming codes adds its bias as an integer kernel does
    for layer in layers:
        src = source(gm, layer.args[0])
        end, bn = layer_end(gm, layer)
        m = gm.get_submodule(layer.target)
        if is_quantizer(gm, src) and (bn is not None or m.bias is not None):
            _insert_after(gm, end, f"{layer.target}_integer_bias", _brevitas.IntegerBias(
                src.target, gm.get_submodule(src.target), m,
                None if bn is None else gm.get_submodule(bn.target)))


