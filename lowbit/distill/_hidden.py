"""Hidden-state and attention-map distillation (TernaryBERT, Zhang et al. 2020; BinaryBERT,
Bai et al. 2021): besides the logits, the student matches the teacher's

- hidden states: the output of each of the model's blocks (``KDConfig.hidden_layers``;
  default: :func:`default_layers`), by module path;
- attention scores: the input of each softmax inside those blocks (``q k^T / sqrt(d)``, as
  TinyBERT and TernaryBERT match them: the probabilities' squared errors are ~1/tokens^2
  smaller and vanish next to the other terms), in forward order;

each by mean squared error, summed over layers. The student keeps the float model's module
paths (``lowbit.quantize``), so a teacher of the same architecture pairs up by name. Both
are read as torch.fx graphs that return the tapped values besides the logits: the student's
own graph, sharing its modules, and the teacher traced as ``quantize`` traces it (a copy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import _ops
from ..errors import UsageError


def default_layers(model: nn.Module) -> tuple[str, ...]:
    """Module paths of the children of ``model``'s blocks: the ``nn.Sequential``/
    ``nn.ModuleList`` of two or more children of one class holding the most parameters."""
    lists = [(sum(p.numel() for p in m.parameters()), name, len(m))
             for name, m in model.named_modules()
             if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) > 1
             and len({type(c) for c in m}) == 1]
    if not lists:
        raise UsageError(f"{type(model).__name__} has no nn.Sequential or nn.ModuleList of "
                         f"blocks; name the layers whose outputs to match (hidden_layers)")
    _, prefix, size = max(lists, key=lambda item: item[0])
    return tuple(f"{prefix}.{i}" if prefix else str(i) for i in range(size))


def _graph(model: nn.Module) -> fx.GraphModule:
    """``model`` as a graph whose nodes know their module paths: a lowbit student as it is,
    anything else as ``quantize`` traces it (attention split into layers, as in the student)."""
    if getattr(model, "lowbit_quant", None) is not None or \
            getattr(model, "lowbit_taps", None) is not None:
        return model
    from ..quant import trace

    return trace(model)


def _in(node: fx.Node, path: str) -> bool:
    return path in node.meta.get("nn_module_stack", {})


def tapped(model: nn.Module, layers: Sequence[str]) -> fx.GraphModule:
    """A module whose forward returns ``(logits, hidden states, attention scores)``: the last
    value computed inside each of ``layers`` and the input of every softmax inside them
    (sharing the
    parameters of a lowbit student; of a copy of any other model)."""
    gm = _graph(model)
    nodes = list(gm.graph.nodes)
    modules = dict(gm.named_modules())
    hidden = []
    for path in layers:
        inside = [n for n in nodes if _in(n, path)]
        if not inside:
            raise UsageError(f"{type(model).__name__} computes nothing in {path!r}; its "
                             f"blocks: {', '.join(default_layers(gm))}")
        hidden.append(inside[-1])
    attention = [n for n in nodes if n.op.startswith("call_") and any(_in(n, p) for p in layers)
                 and getattr(_ops.lookup(n, modules), "onnx", None) == "Softmax"]
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, values)
    graph.output((out, [values[n] for n in hidden], [values[n.args[0]] for n in attention]))
    taps = fx.GraphModule(gm, graph, f"{type(model).__name__}Taps")
    taps.lowbit_taps = tuple(layers)
    return taps


def hidden_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]
                ) -> torch.Tensor:
    """Sum over layers of the mean squared error between student and teacher values."""
    return sum((F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher, strict=True)),
               torch.zeros(()))


def check_pairs(student: fx.GraphModule, teacher: fx.GraphModule, x: torch.Tensor) -> None:
    """Refuse tapped models whose hidden states or attention scores do not pair up in number
    and shape, before any training."""
    outs = {}
    for role, model in (("student", student), ("teacher", teacher)):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                _, hidden, attention = model(x)
        finally:
            model.train(was_training)
        outs[role] = ([tuple(h.shape) for h in hidden], [tuple(a.shape) for a in attention])
    for i, what in enumerate(("hidden states", "attention scores")):
        s, t = outs["student"][i], outs["teacher"][i]
        if s != t:
            raise UsageError(f"the student's {what} {s} do not pair with the teacher's {t}; "
                             f"hidden-state and attention losses need the same block shapes")
