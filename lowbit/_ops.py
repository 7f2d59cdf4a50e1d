"""The op registry: what each PyTorch layer type, function and method is to lowbit.

One entry per op, read by ``quantize`` (what it accepts and where quantizers go),
``describe`` (what onnxruntime runs and why), the exporter and ``footprint``:

- ``role``: :data:`WEIGHTED` (a conv/linear: quantized weights, becomes its Brevitas
  ``twin``), :data:`NORM` (BatchNorm: folded into the conv/linear before it),
  :data:`RELU` (becomes an unsigned activation quantizer), :data:`FLOAT_ACT` (runs in
  float, its output quantized: signed codes unless ``signed`` is False), :data:`PASS`
  (moves codes without changing them: views, max pooling, nearest upsampling, splits;
  identities in eval such as dropout and stochastic depth), :data:`FLOAT` (a float op on
  activations: averaging, normalisation; requantized before the next conv/linear),
  :data:`ADD`, :data:`MUL`, :data:`CAT` (element-wise over activations) and :data:`SHAPE`
  (computes sizes and indices, not activations);
- ``onnx``: the ONNX op it exports as (``lowbit._backend.ONNX_OPS`` says what onnxruntime's
  CPU provider runs for it);
- ``footprint``: its kind in ``lowbit.footprint``'s layer graph;
- ``why``: for a FLOAT op, the reason it is not an integer kernel, shown by ``describe``
  (pooling has none: every CNN averages in float, a row per pool would be noise).

Beside the registry: :data:`FUNCTION_FORMS` / :data:`METHOD_FORMS` (``F.relu``, ``x += y``
and the like: forms ``quantize`` rewrites into registry ops) and :data:`FOOTPRINT_ONLY` (ops
``footprint`` accounts but ``quantize`` refuses).

A new layer type is a new entry here (and, for a new ONNX op, in ``lowbit._backend``).
Torch-only (no Brevitas): the quantized twins are named, and ``lowbit.quant``'s adapter
builds them.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

WEIGHTED, NORM, RELU, FLOAT_ACT, PASS, FLOAT = "weighted", "norm", "relu", "float-act", \
    "pass", "float"
ADD, MUL, CAT, SHAPE = "add", "mul", "cat", "shape"
ROLES = (WEIGHTED, NORM, RELU, FLOAT_ACT, PASS, FLOAT, ADD, MUL, CAT, SHAPE)

# footprint kinds (lowbit.footprint._graph)
CONV, LINEAR, AFFINE, UNARY, VIEW, BINARY, CONCAT, POOL, MATMUL = "conv", "linear", \
    "affine", "unary", "view", "add", "concat", "pool", "matmul"


@dataclass(frozen=True)
class Op:
    """One registry entry (module docstring)."""

    role: str
    onnx: str
    footprint: str | None
    twin: str | None = None  # WEIGHTED: the Brevitas layer class lowbit.quant builds
    weight_axis: int | None = None  # WEIGHTED: output-channel axis of the torch weight
    signed: bool = True  # FLOAT_ACT: whether its output codes are signed
    why: str = ""  # FLOAT: why onnxruntime runs it in float

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")


_NO_INT_NORM = "onnxruntime has no integer normalisation kernel"
_SOFTMAX = Op(FLOAT, "Softmax", UNARY, why="onnxruntime has no integer softmax kernel")
# a product of two activations (attention scores, their weighting of the values): float, so
# its inputs need no quantizer of their own and the scores keep their full range
_MATMUL = Op(FLOAT, "MatMul", MATMUL, why="a product of two activations (attention) runs in "
             "float")

MODULES: dict[type, Op] = {
    nn.Conv1d: Op(WEIGHTED, "Conv", CONV, "QuantConv1d", 0),
    nn.Conv2d: Op(WEIGHTED, "Conv", CONV, "QuantConv2d", 0),
    nn.Linear: Op(WEIGHTED, "Gemm", LINEAR, "QuantLinear", 0),
    nn.BatchNorm1d: Op(NORM, "BatchNormalization", AFFINE),
    nn.BatchNorm2d: Op(NORM, "BatchNormalization", AFFINE),
    nn.ReLU: Op(RELU, "Relu", UNARY),
    nn.ReLU6: Op(RELU, "Clip", UNARY),
    nn.Hardtanh: Op(RELU, "Clip", UNARY),  # Hardtanh(0, c) only (quantize checks)
    nn.SiLU: Op(FLOAT_ACT, "Sigmoid+Mul", UNARY),
    nn.Hardswish: Op(FLOAT_ACT, "HardSwish", UNARY),
    nn.GELU: Op(FLOAT_ACT, "Erf", UNARY),
    nn.LeakyReLU: Op(FLOAT_ACT, "LeakyRelu", UNARY),
    nn.Sigmoid: Op(FLOAT_ACT, "Sigmoid", UNARY, signed=False),
    nn.Hardsigmoid: Op(FLOAT_ACT, "HardSigmoid", UNARY, signed=False),
    nn.Flatten: Op(PASS, "Flatten", VIEW),
    nn.MaxPool1d: Op(PASS, "MaxPool", POOL),
    nn.MaxPool2d: Op(PASS, "MaxPool", POOL),
    nn.Identity: Op(PASS, "Identity", UNARY),
    nn.Dropout: Op(PASS, "Identity", UNARY),  # identity in eval
    nn.AvgPool1d: Op(FLOAT, "AveragePool", POOL),  # no why: pooling needs no row
    nn.AvgPool2d: Op(FLOAT, "AveragePool", POOL),
    nn.AdaptiveAvgPool1d: Op(FLOAT, "GlobalAveragePool", POOL),
    nn.AdaptiveAvgPool2d: Op(FLOAT, "GlobalAveragePool", POOL),
    # normalisations over groups or positions: element-wise for the footprint, not foldable
    nn.GroupNorm: Op(FLOAT, "GroupNormalization", UNARY, why=_NO_INT_NORM),
    nn.LayerNorm: Op(FLOAT, "LayerNormalization", UNARY, why=_NO_INT_NORM),
    nn.Softmax: _SOFTMAX,
    nn.ConvTranspose2d: Op(FLOAT, "ConvTranspose", CONV, weight_axis=1,
                           why="lowbit keeps ConvTranspose weights in float"),
}

_VIEWS = {name: Op(PASS, onnx, VIEW) for name, onnx in (
    ("flatten", "Flatten"), ("reshape", "Reshape"), ("view", "Reshape"),
    ("contiguous", "Identity"), ("squeeze", "Squeeze"), ("unsqueeze", "Unsqueeze"),
    ("permute", "Transpose"), ("transpose", "Transpose"), ("chunk", "Split"),
    ("split", "Split"), ("unbind", "Split"), ("expand", "Expand"))}
_SHAPE = Op(SHAPE, "Shape", None)
_SELECT = Op(PASS, "Slice", VIEW)
_MEAN = Op(FLOAT, "ReduceMean", POOL)  # no why: averaging needs no row, as pooling

FUNCTIONS: dict[object, Op] = {
    operator.add: Op(ADD, "Add", BINARY), torch.add: Op(ADD, "Add", BINARY),
    operator.mul: Op(MUL, "Mul", BINARY), torch.mul: Op(MUL, "Mul", BINARY),
    torch.cat: Op(CAT, "Concat", CONCAT),
    torch.flatten: _VIEWS["flatten"], torch.reshape: _VIEWS["reshape"],
    torch.squeeze: _VIEWS["squeeze"], torch.unsqueeze: _VIEWS["unsqueeze"],
    torch.permute: _VIEWS["permute"], torch.transpose: _VIEWS["transpose"],
    torch.chunk: _VIEWS["chunk"], torch.split: _VIEWS["split"], torch.unbind: _VIEWS["unbind"],
    F.layer_norm: Op(FLOAT, "LayerNormalization", UNARY, why=_NO_INT_NORM),
    F.group_norm: Op(FLOAT, "GroupNormalization", UNARY, why=_NO_INT_NORM),
    F.softmax: _SOFTMAX, torch.softmax: _SOFTMAX,
    operator.matmul: _MATMUL, torch.matmul: _MATMUL, torch.bmm: _MATMUL,
    # a mean over tokens or channels (a spatial mean becomes global average pooling first)
    torch.mean: _MEAN,
    getattr: _SHAPE, operator.getitem: _SHAPE, operator.floordiv: _SHAPE,
}
METHODS: dict[str, Op] = {**_VIEWS, "size": _SHAPE, "dim": _SHAPE, "softmax": _SOFTMAX,
                          "mean": _MEAN}

# Forms of registry ops that ``quantize`` rewrites before it looks anything up (functional
# calls to modules, in-place and method arithmetic to out-of-place functions), so they need no
# entry of their own: each names the registry key it stands for (:func:`form_of`). The float
# model as traced still calls them, and ``lowbit.footprint`` reads it so.
FUNCTION_FORMS: dict[object, object] = {
    F.relu: nn.ReLU, torch.relu: nn.ReLU, torch.relu_: nn.ReLU, F.relu6: nn.ReLU6,
    torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid, F.hardsigmoid: nn.Hardsigmoid,
    F.silu: nn.SiLU, F.gelu: nn.GELU, F.hardswish: nn.Hardswish, torch.tanh: nn.Tanh,
    F.max_pool2d: nn.MaxPool2d, F.avg_pool2d: nn.AvgPool2d,
    F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
    operator.iadd: operator.add, operator.imul: operator.mul,
}
METHOD_FORMS: dict[str, object] = {
    "relu": nn.ReLU, "relu_": nn.ReLU, "sigmoid": nn.Sigmoid,
    "add": operator.add, "add_": operator.add, "mul": operator.mul, "mul_": operator.mul,
}

# Ops ``lowbit.footprint`` accounts (its kind for each) that lowbit does not quantize: no
# quantized twin (Conv3d) or no export path lowbit checks (Tanh, ELU, adaptive max pooling,
# subtraction). Not registry entries, so ``quantize`` refuses them by name.
FOOTPRINT_ONLY: dict[object, str] = {
    nn.Conv3d: CONV, nn.Tanh: UNARY, nn.ELU: UNARY, nn.AdaptiveMaxPool2d: POOL,
    operator.sub: BINARY,
}


def form_of(node: fx.Node) -> object | None:
    """The registry key (a module class or a function) that ``node`` calls in one of the
    :data:`FUNCTION_FORMS` / :data:`METHOD_FORMS` (None: it calls no such form)."""
    if node.op == "call_function":
        return FUNCTION_FORMS.get(node.target)
    if node.op == "call_method":
        return METHOD_FORMS.get(node.target)
    return None


_UPSAMPLE_NEAREST = Op(PASS, "Resize", POOL)
_UPSAMPLE_LINEAR = Op(FLOAT, "Resize", POOL, why="interpolated values are not codes")


def _interpolate(node: fx.Node) -> Op:
    mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
    return _UPSAMPLE_NEAREST if mode == "nearest" else _UPSAMPLE_LINEAR


# ops of libraries lowbit does not import, known by qualified class name: torchvision's
# StochasticDepth (EfficientNet, ConvNeXt) drops whole samples in training, identity in eval
NAMED_MODULES: dict[str, Op] = {
    "torchvision.ops.stochastic_depth.StochasticDepth": Op(PASS, "Identity", UNARY),
}


# functions of those libraries, known by qualified name, each traced as a call of the module
# class beside it (in the function's own module) built from the arguments between the input
# and ``training``: torchvision's stochastic_depth(x, p, mode, training) is StochasticDepth(p,
# mode)(x). The ``training`` flag torch.fx records is a constant of the model's mode when it
# was traced; the module's is the student's own, so train() applies it and eval() does not.
NAMED_FUNCTIONS: dict[str, str] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": "StochasticDepth",
}


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _function_name(f: object) -> str:
    return f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', '')}"


def named_functions(model: nn.Module) -> tuple[object, ...]:
    """The :data:`NAMED_FUNCTIONS` that ``model``'s forwards call by a global name (found in
    their modules' globals, as torch.fx's autowrap looks for them; never imported)."""
    found = {id(v): v for m in model.modules()
             for v in getattr(type(m).forward, "__globals__", {}).values()
             if inspect.isfunction(v) and _function_name(v) in NAMED_FUNCTIONS}
    return tuple(found.values())


def module_form(fn: object, args: tuple, kwargs: dict) -> nn.Module | None:
    """The module that does what ``fn(*args, **kwargs)`` does, for a :data:`NAMED_FUNCTIONS`
    function called with constant arguments (None otherwise)."""
    cls = NAMED_FUNCTIONS.get(_function_name(fn))
    if cls is None:
        return None
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    values = [v for k, v in list(bound.arguments.items())[1:] if k != "training"]
    if any(isinstance(v, (fx.Proxy, fx.Node)) for v in values):
        return None
    return fn.__globals__[cls](*values)


def is_leaf(m: nn.Module) -> bool:
    """Whether torch.fx should keep ``m`` as one call: a :data:`NAMED_MODULES` op (whose
    training branch, random and shape-dependent, is not traceable) or a BatchNorm fused
    with its activation (:func:`split_norm_act` splits it)."""
    return _qualname(m) in NAMED_MODULES or _is_norm_act(m)


def _is_norm_act(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d) and type(m) is not nn.BatchNorm2d and \
        isinstance(getattr(m, "act", None), nn.Module)


def lookup(node: fx.Node, modules: dict[str, nn.Module]) -> Op | None:
    """The registry entry of an fx node (None: lowbit does not know the op)."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Upsample):
            return _UPSAMPLE_NEAREST if m.mode == "nearest" else _UPSAMPLE_LINEAR
        found = next((MODULES[t] for t in type(m).__mro__ if t in MODULES), None)
        return found or NAMED_MODULES.get(_qualname(m))
    if node.op == "call_function":
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and \
                role(node.args[0], modules) not in (SHAPE, None):
            return _SELECT  # a part of a split, or a slice of tokens (x[:, 0]): codes
        if node.target is F.interpolate:
            return _interpolate(node)
        if node.target in _ARITHMETIC and _on_sizes(node, modules):
            return _SHAPE  # arithmetic on sizes (a head dim's d ** -0.5)
        return FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return METHODS.get(node.target)
    return None


_ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
               operator.pow)


def _on_sizes(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether every fx node ``node`` reads computes sizes (a :data:`SHAPE` op)."""
    args = [a for a in node.args if isinstance(a, fx.Node)]
    return bool(args) and all(role(a, modules) == SHAPE for a in args)


def role(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The ``role`` of an fx node's op (None: unknown, or not a call)."""
    op = lookup(node, modules)
    return None if op is None else op.role


def split_norm_act(m: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """A BatchNorm fused with its activation (timm's ``BatchNormAct2d``: a BatchNorm2d
    subclass with ``act`` and ``drop`` children) as (plain BatchNorm2d with the same state,
    the activation); None for anything else."""
    if not _is_norm_act(m):
        return None
    bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    state = {k: v for k, v in m.state_dict().items() if "." not in k}
    bn.load_state_dict(state)
    return bn.to(next(iter(state.values())).device), m.act
