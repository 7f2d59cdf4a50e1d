"""The op registry (``lowbit._ops``) and the onnxruntime description (``lowbit._backend``):
layer types real models need go quantize -> distill -> export -> run, integer where
onnxruntime fuses the pattern, float with the reason in ``describe()`` otherwise.

The models are ``zoo_registry``'s structural copies (U-Net decoder, ShuffleNetV2, ConvNeXt,
timm's EfficientNet-B0 layout with BatchNormAct2d, DenseNet).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import zoo_registry as reg
import zoo_torchvision as zoo

import lowbit
from lowbit import _backend, _ops
from lowbit.errors import QuantizeError
from lowbit.export import export
from lowbit.footprint import footprint
from lowbit.quant import describe, quantize
from lowbit.runtime import Session

# per arch: (describe row name, text its kernel column holds)
EXPECTED = {
    "unet": [("up", "float ConvTranspose (lowbit keeps ConvTranspose weights in float)"),
             ("dec.1", "float GroupNormalization (onnxruntime has no integer normalisation"),
             ("interpolate", "float Resize (interpolated values are not codes)"),
             ("mix.0", "QLinearConv")],
    "shufflenet_v2": [("stage2.1.branch2.0", "QLinearConv"),
                      ("stage2.2.branch2.0", "QLinearConv")],
    "convnext": [("features.1.block.2", "float LayerNormalization"),
                 ("features.1.block.3", "MatMulIntegerToFloat"),
                 ("features.1.block.4", "float Erf"), ("features.1.block.0", "QLinearConv")],
    "timm_efficientnet": [("bn1.act", "float Sigmoid+Mul"), ("conv_dw", "QLinearConv"),
                          ("conv_pw", "QLinearConv"), ("conv_head", "QLinearConv")],
    "densenet": [("layer1.norm1", "float BatchNormalization (not after a conv/linear"),
                 ("norm5", "float BatchNormalization"), ("layer2.conv1", "QLinearConv")],
    "stochastic_depth": [("block.0", "QLinearConv")],
}


@pytest.mark.parametrize("arch", list(reg.ARCHS))
def test_new_layer_types_quantize_distill_export_run(arch, tmp_path):
    _, shape, classes = reg.ARCHS[arch]
    data = zoo.synthetic_data(shape, classes)
    teacher = zoo.teacher(arch, data, reg.ARCHS)
    student = quantize(teacher, weight_bits=4)
    student, _ = lowbit.distill(student, teacher, data, epochs=1, batch_size=32, lr=0.01,
                                progress=False)
    student.eval()
    x = (data.images.float() - 127.5) / 64
    path = tmp_path / f"{arch}.onnx"
    result = export(student, path, example_input=x[:1], verify=x, formats=("onnx",),
                    data=data, progress=False)
    assert result.verification["onnx"].passed and result.verification["onnx-int"].passed
    rows = {r.name: r.kernel for r in result.layers}
    for name, kernel in EXPECTED[arch]:
        assert rows[name].startswith(kernel), (name, rows[name])
    # describe() and onnxruntime's optimised graph count the same integer conv/linear layers
    weighted = [r for r in result.layers if r.weight_bits is not None]
    assert result.kernels == {"integer": sum(r.integer for r in weighted),
                              "float": sum(not r.integer for r in weighted)}
    # the footprint reads the student (through the registry), and the file alike (Resize
    # sizes and size()-computed views, computed at run time, are folded at batch 1; SiLU's
    # Sigmoid + Mul is one op). The exporter schedules U-Net's and ShuffleNet's branches in
    # another order, so their peaks differ.
    a, b = footprint(student, (1,), input_shape=shape), footprint(path, (1,))
    assert a.weight_bytes > 0
    assert (a.weight_bytes, a.macs, a.activation_bytes(8)) == \
        (b.weight_bytes, b.macs, b.activation_bytes(8))
    if arch not in ("unet", "shufflenet_v2"):
        assert a.peak(8)[0] == b.peak(8)[0]
    logits = Session(path).run(data.images[:16].numpy())
    with torch.no_grad():
        ref = student(x[:16]).numpy()
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_timm_batchnorm_act_is_split_and_folded():
    """timm's BatchNormAct2d becomes its BatchNorm (folded into the conv) and its activation
    (quantized), with the state-dict keys of the fused module."""
    model = reg.TimmEfficientNetTiny().eval()
    student = quantize(model)
    assert type(student.get_submodule("bn1")) is nn.BatchNorm2d
    keys = set(student.state_dict())
    assert {k for k in model.state_dict() if k.startswith("bn1.")} <= keys
    assert not any(r.op == "BatchNorm2d" for r in describe(student))  # all folded


def test_stochastic_depth_is_identity_in_eval_and_traced_as_one_call():
    block = reg.CNBlock(8, 0.5, 0.5)
    student = quantize(block)
    called = [n.target for n in student.graph.nodes if n.op == "call_module"]
    assert "stochastic_depth" in called
    x = torch.randn(2, 8, 4, 4)
    block.eval()
    with torch.no_grad():
        assert torch.equal(block.stochastic_depth(x), x)


try:  # torchvision's own function, if it imports (a CUDA build without CUDA does not)
    from torchvision.ops import stochastic_depth as tv_stochastic_depth
except Exception:  # noqa: BLE001
    tv_stochastic_depth = None


class TorchvisionSDNet(reg.SDNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + tv_stochastic_depth(self.block(x), 0.5, "row", self.training))
        return self.fc(x.mean([2, 3]))


@pytest.mark.parametrize("net", [
    reg.SDNet, pytest.param(TorchvisionSDNet, marks=pytest.mark.skipif(
        tv_stochastic_depth is None, reason="torchvision does not import"))])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_stochastic_depth_function_follows_the_students_mode(net, mode, tmp_path):
    """``stochastic_depth(x, p, mode, self.training)`` in a forward becomes a call of its
    module, whatever the flag was when traced: the student drops rows in train(), none in
    eval(), and exports as an identity."""
    torch.manual_seed(0)
    model = getattr(net(), mode)()
    student = quantize(model, weight_bits=4)
    sd = [m for m in student.modules() if type(m).__name__ == "StochasticDepth"]
    assert len(sd) == 1 and (sd[0].p, sd[0].mode) == (0.5, "row")
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        student.eval()
        assert torch.equal(student(x), student(x))
        out = torch.randn(64, 8, 4, 4)  # what the block gives it
        assert torch.equal(sd[0](out), out)
        student.train()
        dropped = (sd[0](out) == 0).flatten(1).all(1)
    assert 0 < dropped.sum() < len(x)
    student.eval()
    path = tmp_path / "sd.onnx"
    result = export(student, path, example_input=x[:1], verify=x, formats=("onnx",),
                    progress=False)
    assert result.verification["onnx"].passed
    with torch.no_grad():
        ref = student(x[:8]).numpy()
    logits = Session(path).run(x[:8].numpy())
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_registry_ops_are_described_by_the_backend():
    """Every registered op either has an onnxruntime rule or runs in float; weighted layers
    name their Brevitas twin and weight axis; every FLOAT op's reason, if any, is a sentence."""
    for op in [*_ops.MODULES.values(), *_ops.FUNCTIONS.values(), *_ops.METHODS.values()]:
        assert op.role in _ops.ROLES
        if op.role == _ops.WEIGHTED:
            assert op.twin and op.weight_axis == 0
            assert _backend.ONNX_OPS[op.onnx].weight_axis is not None
        if op.role == _ops.PASS and op.onnx in _backend.ONNX_OPS:
            assert _backend.ONNX_OPS[op.onnx].keeps_codes


def test_registry_and_backend_agree_on_footprint_kinds():
    """The ONNX front end of ``footprint`` reads what an ONNX op is from the backend table;
    for the registry's ops it says what the registry says (an identity in eval may alias or
    run in place: both allocate nothing)."""
    from lowbit.footprint._graph import ADD, AFFINE, CONCAT, CONV, LINEAR, MATMUL, POOL, UNARY, VIEW

    kinds = {CONV, LINEAR, MATMUL, AFFINE, UNARY, VIEW, ADD, CONCAT, POOL, None}
    assert set(_backend.ONNX_FOOTPRINT.values()) <= kinds
    for op in [*_ops.MODULES.values(), *_ops.FUNCTIONS.values(), *_ops.METHODS.values()]:
        assert op.footprint in kinds
        if "+" in op.onnx:  # SiLU: Sigmoid + Mul, one element-wise op (footprint._onnx)
            continue
        kind = _backend.ONNX_FOOTPRINT[op.onnx]
        assert kind == op.footprint or (op.role == _ops.PASS and
                                         {kind, op.footprint} == {VIEW, UNARY})


@pytest.mark.parametrize("opset,ort", [(25, "1.24.1"), (24, "1.23"), (21, "1.23"),
                                       (20, "1.20"), (13, "1.20")])
def test_opset_floors(opset, ort):
    assert _backend.min_onnxruntime(opset) == ort
    kinds = [_backend.storage_for(b, opset, "int") for b in (2, 4, 8)]
    assert kinds == [["int8", "int4", "int2"][(opset >= 21) + (opset >= 25)],
                     "int4" if opset >= 21 else "int8", "int8"]
    assert _backend.storage_for(2, opset) == "trits"  # trits: any opset lowbit writes


def test_forms_and_footprint_only_ops_are_no_second_registry():
    """Each functional/in-place form names a registry op (or a footprint-only one) and is no
    entry itself; footprint-only ops are not in the registry, so quantize refuses them."""
    registered = {*_ops.MODULES, *_ops.FUNCTIONS}
    for form, key in [*_ops.FUNCTION_FORMS.items(), *_ops.METHOD_FORMS.items()]:
        assert form not in registered and form not in _ops.METHODS, form
        assert key in registered or key in _ops.FOOTPRINT_ONLY, (form, key)
    assert not set(_ops.FOOTPRINT_ONLY) & registered
    with pytest.raises(QuantizeError, match="Tanh"):
        quantize(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh()))


# constructor/call arguments of the forms' ops that need some
_FORM_ARGS = {nn.MaxPool2d: (2,), nn.AvgPool2d: (2,), nn.AdaptiveAvgPool2d: (1,)}


class _Call(nn.Module):
    """A conv, then one op on its output (and the input, for a binary op)."""

    def __init__(self, call, binary: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.call, self.binary = call, binary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.call(y, x) if self.binary else self.call(y)


def _form_and_op(form, key) -> tuple[nn.Module, nn.Module]:
    """(a net calling ``form``, the same net calling the op it stands for)."""
    binary = key in _ops.FUNCTIONS
    args = _FORM_ARGS.get(key, ())
    if isinstance(form, str):
        call = lambda y, *other: getattr(y, form)(*other, *args)  # noqa: E731
    else:
        call = lambda y, *other: form(y, *other, *args)  # noqa: E731
    return _Call(call, binary), _Call(key(*args) if isinstance(key, type) else key, binary)


@pytest.mark.parametrize("form,key", [*_ops.FUNCTION_FORMS.items(), *_ops.METHOD_FORMS.items()],
                         ids=str)
def test_footprint_reads_each_form_as_the_registry_op_it_stands_for(form, key):
    """``footprint``'s kind of a form is the registry's kind of its op (footprint-only ops:
    ``_ops.FOOTPRINT_ONLY``'s), and a net calling the form accounts as the net calling the op."""
    from lowbit.footprint._torch import _kind

    entry = _ops.MODULES.get(key) or _ops.FUNCTIONS.get(key)
    expected = _ops.FOOTPRINT_ONLY[key] if entry is None else entry.footprint
    nets = _form_and_op(form, key)
    for net in nets:
        graph = torch.fx.symbolic_trace(net).graph
        modules = dict(net.named_modules())
        called = [n for n in graph.nodes if n.op.startswith("call") and n.target != "conv"]
        assert [_kind(n, modules) for n in called] == [(expected, entry)]
    a, b = (footprint(net, (1, 8), input_shape=(2, 4, 4)) for net in nets)
    assert (a.weight_bytes, a.macs, a.peak_activation_bytes(8)) == \
        (b.weight_bytes, b.macs, b.peak_activation_bytes(8))
    assert [(f.kind, f.params, f.act_elements, f.macs, len(f.fused)) for f in a.layers] == \
        [(f.kind, f.params, f.act_elements, f.macs, len(f.fused)) for f in b.layers]
