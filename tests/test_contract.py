"""One file, the same answer on every CPU: the overflow rule, the saturating-kernel model
against onnxruntime, and the gate's proof on exported files (``lowbit._backend``,
``lowbit._intmath.accumulate``, ``lowbit.export._contract``)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from lowbit import _backend, _intmath
from lowbit import _onnx_meta as meta
from lowbit.export import export
from lowbit.export._build import build_onnx
from lowbit.export._contract import check_kernels
from lowbit.export._verify import locate
from lowbit.quant import QuantSpec, bake_integer_bias, calibrate, quantize

NO_VNNI = _backend.cpu_features()["u8s8"] == "int16 pairs"  # this CPU's uint8 x int8 kernels


def _qlinear_conv(x: np.ndarray, w: np.ndarray, w_zp: int, pads: list[int]) -> np.ndarray:
    """onnxruntime's QLinearConv (x zero point 128, scales 0.05 * 0.01 -> 2, y zero point 128)
    on stored uint8 inputs ``x`` and stored weights ``w`` (int8, or uint8 with ``w_zp``)."""
    c = w.shape[0]
    inits = [numpy_helper.from_array(np.float32(0.05), "xs"),
             numpy_helper.from_array(np.uint8(128), "xz"), numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.full(c, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.full(c, w_zp, w.dtype), "wz"),
             numpy_helper.from_array(np.float32(2.0), "ys"),
             numpy_helper.from_array(np.uint8(128), "yz")]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"],
                            ["y"], pads=pads)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.UINT8, list(x.shape))], [helper.make_tensor_value_info(
            "y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0].astype(np.int64)


def _model_codes(x: np.ndarray, w: np.ndarray, w_zp: int, pad: int, kernel: str) -> np.ndarray:
    """The same QLinearConv from ``_intmath``: accumulate, subtract the zero points' terms,
    requantize in float32 (round half to even), add the output zero point, saturate."""
    n, _, h, wd = x.shape
    cols = _intmath.im2col(x, w.shape[2:], pads=(pad,) * 4, pad_value=128)
    b = w.astype(np.int64).transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
    acc = _intmath.accumulate(cols, b, kernel) - 128 * b.sum(0) - w_zp * cols.sum(1)[:, None] \
        + cols.shape[1] * 128 * w_zp
    y = np.round(acc.astype(np.float32) * np.float32(0.05 * 0.01 / 2.0)) + 128
    oh, ow = h + 2 * pad - w.shape[2] + 1, wd + 2 * pad - w.shape[3] + 1
    return np.clip(y, 0, 255).astype(np.int64).reshape(n, oh, ow, -1).transpose(0, 3, 1, 2)


def test_known_answer_x255_w127():
    """Two products 255 * 127 = 64,770 overflow an int16 pair; the int32 reference holds them,
    and lowbit's storage for such a layer (uint8 + 128) gives that answer on this CPU."""
    a, b = np.full((1, 2), 255), np.full((2, 1), 127)
    assert _intmath.accumulate(a, b, "int32")[0, 0] == 64_770
    assert _intmath.accumulate(a, b, "u8s8")[0, 0] == _intmath.INT16_MAX
    w = np.full((1, 2, 1, 1), 127, np.int8)
    assert _backend.weight_storage(w, 255, "int8") == "uint8"  # the rule moves it to uint8
    assert _backend.weight_storage(w, 127, "int8") == "int8"  # 7-bit inputs keep int8
    assert _backend.weight_storage(w, 255, "int4") == "int4"  # the ladder decides the rest
    x = np.full((1, 2, 1, 1), 255, np.uint8)  # code 127 at zero point 128
    exact = _model_codes(x, w, 0, 0, "int32")
    stored = (w.astype(np.int16) + 128).astype(np.uint8)
    np.testing.assert_array_equal(_qlinear_conv(x, stored, 128, [0] * 4), exact)
    got = _qlinear_conv(x, w, 0, [0] * 4)  # what int8 storage gives on this CPU
    np.testing.assert_array_equal(got, _model_codes(x, w, 0, 0, "u8s8" if NO_VNNI else "int32"))


@pytest.mark.parametrize("channels", [3, 5, 8])
def test_saturating_model_reproduces_onnxruntime(channels):
    """On this CPU onnxruntime's QLinearConv equals the model of its kernel family: int16
    pairs along (row, column, channel) without VNNI, int32 with; and uint8 + 128 weights equal
    the int32 model on every CPU."""
    rng = np.random.default_rng(channels)
    x = rng.integers(0, 256, (2, channels, 6, 6)).astype(np.uint8)
    w = rng.integers(-127, 128, (4, channels, 3, 3)).astype(np.int8)
    exact, saturated = (_model_codes(x, w, 0, 1, k) for k in _intmath.KERNELS)
    assert (exact != saturated).any()  # the data overflows int16 pairs
    got = _qlinear_conv(x, w, 0, [1] * 4)
    np.testing.assert_array_equal(got, saturated if NO_VNNI else exact)
    stored = (w.astype(np.int16) + 128).astype(np.uint8)
    np.testing.assert_array_equal(_qlinear_conv(x, stored, 128, [1] * 4), exact)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-127, 127), min_size=2, max_size=9), st.integers(0, 255))
def test_pair_peak_is_the_worst_pairing(row, x_max):
    """The bound is reached by some pair of weights and exceeded by none."""
    worst = max(abs(x_max * (a * (a > 0) + b * (b > 0))) for a, b in
                itertools.combinations(row, 2))
    worst = max(worst, max(abs(x_max * (a * (a < 0) + b * (b < 0))) for a, b in
                           itertools.combinations(row, 2)))
    assert _intmath.pair_peak(np.array([row]), x_max) == worst


class Net(nn.Module):
    """Small CNN with an 8-bit first conv fed by the 8-bit input: the layer that overflows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def w8a8():
    """A W8A8 student (8-bit weights everywhere, 8-bit activations), its file and inputs."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8) * 1.5
    student = calibrate(quantize(Net().eval(), QuantSpec(weight_bits=8, act_bits=8)), [x])
    return student, x


def test_w8a8_export_is_exact_everywhere(w8a8, tmp_path):
    student, x = w8a8
    result = export(student, tmp_path / "m.onnx", example_input=x[:1], verify=x,
                    formats=("onnx",), progress=False)
    assert result.storage["conv1"] == "uint8" and result.storage["conv2"] == "uint8"
    by_layer = {c.layer: c for c in result.contract}
    assert set(by_layer) == {"conv1", "conv2"} and all(c.passed for c in result.contract)
    assert by_layer["conv1"].bound.pair is None  # uint8 weights: no int16 pairs
    props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    record = json.loads(props[meta.KERNELS])
    assert record["exact"] and record["layers"] == 2 and record["cpu"]["machine"]
    # the integer kernels of this CPU give the float kernels' codes exactly
    sess = {lvl: ort.InferenceSession(str(tmp_path / "m.onnx"), _opts(lvl),
                                      providers=["CPUExecutionProvider"]) for lvl in ("basic",
                                                                                     "all")}
    out = {lvl: s.run(None, {"input": x.numpy()})[0] for lvl, s in sess.items()}
    np.testing.assert_allclose(out["all"], out["basic"], atol=1e-5)


def _opts(level: str) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    return so


def _as_int8(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The file with its uint8 + 128 weights rewritten as int8 codes and no zero point: what
    an exporter without the overflow rule writes."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        t = inits.get(node.input[0])
        if node.op_type == "DequantizeLinear" and t is not None and len(node.input) > 2 and \
                t.data_type == TensorProto.UINT8 and len(t.dims) > 1:
            codes = numpy_helper.to_array(t).astype(np.int16) - 128
            t.CopyFrom(numpy_helper.from_array(codes.astype(np.int8), t.name))
            del node.input[2]
    return out


def test_int8_storage_of_an_overflowing_layer_is_refused_on_every_cpu(w8a8, tmp_path):
    """The proof and the model read the file alone: an int8-weight file is refused here
    whatever this CPU's kernels do, naming the layer, the bound and the fix."""
    student, x = w8a8
    export(student, tmp_path / "m.onnx", example_input=x[:1], verify=x, formats=("onnx",),
           progress=False)
    bad = _as_int8(onnx.load(tmp_path / "m.onnx"))
    checks = {c.layer: c for c in check_kernels(bad, x[:4].numpy(), ["conv1", "conv2"])}
    assert not checks["conv1"].passed and checks["conv1"].weights == "int8"
    assert checks["conv1"].bound.pair > _intmath.INT16_MAX
    assert checks["conv1"].saturated > 0  # the model sees it on real inputs too
    assert "conv1 (int8 weights): inputs up to 255: pairs of products up to" in \
        str(checks["conv1"]) and "uint8 with zero point 128" in str(checks["conv1"])
    if NO_VNNI:  # and here onnxruntime's integer kernels really differ, located at "all"
        built = build_onnx(bake_integer_bias(student), x[:1])  # the same names as the file
        where = locate(student, bad, built.acts, built.codes, x[:16], "all")
        assert where.startswith("first difference at quantizer relu1"), where
        # float kernels are exact
        assert locate(student, bad, built.acts, built.codes, x[:16], "basic") == ""


@pytest.mark.parametrize("bits", [2, 4])
def test_low_bit_layers_keep_int8_kernels(bits):
    """Ternary and 4-bit weights cannot overflow a pair (2 * 255 * 7 < 32,767): int8 stays."""
    codes = np.full((4, 16, 3, 3), _intmath.weight_range(bits)[1], np.int8)
    assert _backend.kernel_bound(codes, 255).exact
    assert _backend.weight_storage(codes, 255, "int8") == "int8"
