"""Bring your own model: torchvision-style networks go quantize -> distill -> export -> run.

Each architecture of ``zoo_torchvision`` (small widths, torchvision's structure), at ternary
and 4-bit weights: ``quantize`` gives a GraphModule whose quantizers are nodes (no hooks),
a few distillation steps on synthetic data, ``export`` passes its two-run gate, every conv
runs as QLinearConv in onnxruntime's optimised graph (Linear layers run as float Gemm,
which ``describe`` states), ``Session`` runs the file, and ``footprint`` reads both.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import zoo_torchvision as zoo

import lowbit
from lowbit import _onnx_meta as meta
from lowbit.errors import QuantizeError
from lowbit.export import export
from lowbit.export._export import optimized_graph
from lowbit.footprint import footprint
from lowbit.quant import act_quants, describe, quantize
from lowbit.runtime import Session

ARCHS = zoo.ARCHS
CONVS = (nn.Conv1d, nn.Conv2d)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantize_distill_export_run(arch, bits, tmp_path):
    _, shape, classes = ARCHS[arch]
    data = zoo.synthetic_data(shape, classes)
    teacher = zoo.teacher(arch, data)
    student = quantize(teacher, weight_bits=bits)
    # the student is a graph: every quantizer a node, nothing in hooks
    assert isinstance(student, fx.GraphModule)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in student.modules())
    called = {n.target for n in student.graph.nodes if n.op == "call_module"}
    assert {a.name for a in act_quants(student)} <= called
    student, _ = lowbit.distill(student, teacher, data, epochs=1, batch_size=32, lr=0.01,
                                progress=False)
    student.eval()
    x = (data.images[:1].float() - 127.5) / 64
    path = tmp_path / f"{arch}.onnx"
    result = export(student, path, example_input=x, formats=("onnx",), data=data)
    assert result.verification["onnx"].passed and result.verification["onnx-int"].passed
    # every conv is an integer kernel in onnxruntime's optimised graph; linears are float Gemm
    n_convs = sum(isinstance(m, CONVS) for m in teacher.modules())
    n_linears = sum(isinstance(m, nn.Linear) for m in teacher.modules())
    ops = [n.op_type for n in optimized_graph(onnx.load(path)).node]
    assert "Conv" not in ops and "FusedConv" not in ops
    assert ops.count("QLinearConv") == n_convs
    assert result.kernels == {"integer": n_convs, "float": n_linears}
    # describe() and the file's metadata state the same, layer by layer
    rows = [r for r in describe(student) if r.weight_bits is not None]
    assert [r.integer for r in rows] == [r.op != "Linear" for r in rows]
    assert all(r.input_bits in (4, 8) for r in rows)
    assert {r.weight_bits for r in rows[1:-1]} == {bits}
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert list(json.loads(props[meta.STORAGE])) == [r.name for r in rows]
    assert json.loads(props[meta.LAYERS]) == [[r.weight_bits, r.input_bits, int(r.integer)]
                                              for r in rows]
    # lowbit.runtime runs the file on raw pixels like the student on normalised ones
    logits = Session(path).run(data.images[:8].numpy())
    with torch.no_grad():
        ref = student((data.images[:8].float() - 127.5) / 64).numpy()
    np.testing.assert_array_equal(logits.argmax(1), ref.argmax(1))
    # the footprint reads the student and the file alike
    a, b = footprint(student, (1, 8), input_shape=shape), footprint(path, (1, 8))
    assert _packed_weight_bytes(a) == _packed_weight_bytes(b) > 0
    assert a.weight_bytes == b.weight_bytes
    assert a.peak_activation_bytes(8) > 0 and b.peak_activation_bytes(8) > 0


def _packed_weight_bytes(report) -> int:
    return sum(p.nbytes for layer in report.graph.layers for p in layer.params
               if p.role == "weight")


def test_shared_relu_gets_one_quantizer_per_call_site():
    student = quantize(zoo.resnet18())
    relus = [n.target for n in student.graph.nodes if n.op == "call_module"
             and n.target.startswith("layer1.0.relu")]
    assert relus == ["layer1.0.relu", "layer1.0.relu_1"]  # called twice in BasicBlock
    assert student.get_submodule("layer1.0.relu") is not student.get_submodule("layer1.0.relu_1")


def test_functional_activations_are_quantized():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = torch.relu(self.c1(x))
            x = self.c2(x).relu()
            x = nn.functional.silu(self.c3(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    student = quantize(Net())
    kinds = {r.name: (r.op, r.input_bits) for r in describe(student)}
    assert kinds["c2"] == ("Conv2d", 4) and kinds["c3"] == ("Conv2d", 4)  # after the ReLUs
    silu = next(r for r in describe(student) if r.op == "SiLU")
    assert silu.input_bits == 8 and silu.kernel.startswith("float")  # c3's output quantizer


def test_relu6_keeps_its_clip():
    student = quantize(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), nn.Flatten(),
                                     nn.Linear(4, 2)), weight_bits=8, act_bits=8)
    relu6 = student.get_submodule("1")
    with torch.no_grad():  # a range learned beyond 6 is capped at the clip
        relu6.act_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl.value.fill_(20.0)
    x = torch.tensor([[[[100.0]], [[3.0]], [[-1.0]], [[7.0]]]])
    with torch.no_grad():
        y = relu6.eval()(x)
    assert float(y.max()) == pytest.approx(6.0) and float(y.min()) == 0.0


def test_untraceable_model_is_refused_with_its_line():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.conv(x)
            return x

    with pytest.raises(QuantizeError, match=r"torch\.fx cannot trace Branchy at .*"
                                            r"test_your_model\.py:\d+: if x\.sum\(\) > 0"):
        quantize(Branchy())


@pytest.mark.parametrize("op,name", [(lambda x: torch.tanh(x), "tanh"),
                                     (lambda x: x.exp(), "exp")])
def test_unsupported_op_is_refused_by_name_before_training(op, name):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return op(self.conv(x))

    with pytest.raises(QuantizeError, match=rf"{name}.*test_your_model\.py"):
        quantize(Net())


class _Inception(nn.Module):
    """Two branches concatenated (GoogLeNet-style) before a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b2 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 8, 1, bias=False),
                                nn.BatchNorm2d(8), nn.ReLU())
        self.mix = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x)], 1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.mix(x).relu(), 1), 1))


def test_concatenated_branches_run_as_integer_kernels(tmp_path):
    data = zoo.synthetic_data((3, 16, 16), 10)
    torch.manual_seed(0)
    teacher = _Inception().eval()
    student, _ = lowbit.distill(quantize(teacher), teacher, data, epochs=1, batch_size=32,
                                lr=0.01, progress=False)
    assert "cat_quant" in {n.target for n in student.graph.nodes if n.op == "call_module"}
    result = export(student.eval(), tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 16, 16),
                    formats=("onnx",), data=data)
    assert result.kernels == {"integer": 4, "float": 1}  # four convs; the classifier's Gemm


@pytest.mark.parametrize("act,kernel", [(nn.GELU, "float Erf"),
                                        (nn.LeakyReLU, "QLinearLeakyRelu")])
def test_gelu_and_leaky_relu_keep_the_convs_integer(act, kernel, tmp_path):
    data = zoo.synthetic_data((3, 16, 16), 10)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(),
                            nn.Conv2d(8, 8, 3, padding=1), act(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(8, 10)).eval()
    student, _ = lowbit.distill(quantize(teacher, weight_bits=4), teacher, data, epochs=1,
                                batch_size=32, lr=0.01, progress=False)
    rows = {r.name: r for r in describe(student)}
    assert rows["2"].kernel == rows["4"].kernel == kernel and rows["2"].input_bits == 8
    result = export(student.eval(), tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 16, 16),
                    formats=("onnx",), data=data)
    assert result.kernels == {"integer": 2, "float": 1}
    ops = [n.op_type for n in optimized_graph(onnx.load(tmp_path / "m.onnx")).node]  # as described
    assert ops.count("QLinearLeakyRelu" if act is nn.LeakyReLU else "Erf") == 2
