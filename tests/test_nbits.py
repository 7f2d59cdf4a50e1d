"""Linear layers as onnxruntime's MatMulNBits (``export(..., linear_kernel="nbits")``): the
packed bytes, the op reading them, the file against the student within its stated bound,
the session entries the runtime takes from the file, and the default QDQ path untouched."""

from __future__ import annotations

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

from lowbit import _onnx_meta as meta
from lowbit._backend import LUT_GEMM, NBITS_DOMAIN, NBITS_OP
from lowbit._intmath import weight_range
from lowbit.export import ExportError, NBits, export, pack_nbits, unpack_nbits
from lowbit.export._nbits import BOUND
from lowbit.quant import calibrate, quant_layers, quantize
from lowbit.runtime import Session


def test_pack_nbits_hand_computed_bytes():
    # ternary [1, -1, 0, 1] -> stored [3, 1, 2, 3], first code in the two low bits:
    # 0b11_10_01_11 = 0xE7; the block's padding is weight 0 (stored 2): 0b10_10_10_10 = 0xAA
    b = pack_nbits(np.array([[1, -1, 0, 1]]), bits=2, block_size=16)
    assert b.shape == (1, 1, 4) and b.dtype == np.uint8
    assert b.tobytes() == bytes([0xE7, 0xAA, 0xAA, 0xAA])
    # 4-bit [-7, 7, 0] -> [1, 15, 8]: low nibble first -> 0xF1, then 0x88 (8 and padding 8)
    b = pack_nbits(np.array([[-7, 7, 0]]), bits=4, block_size=16)
    assert b.tobytes() == bytes([0xF1, 0x88] + [0x88] * 6)
    # a second block and a second row: 17 codes -> two blocks of 16 per row
    b = pack_nbits(np.array([[1] * 17, [-1] * 17]), bits=2, block_size=16)
    assert b.shape == (2, 2, 4)
    assert b[0, 1].tobytes() == bytes([0xAB, 0xAA, 0xAA, 0xAA])  # 3 then padding 2s
    assert b[1, 0].tobytes() == bytes([0x55] * 4)  # stored 1 everywhere


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.integers(1, 5), st.integers(1, 70),
       st.sampled_from([16, 32, 64]), st.integers(0, 2**31 - 1))
def test_pack_nbits_round_trips(bits, n, k, block, seed):
    lo, hi = weight_range(bits)
    codes = np.random.default_rng(seed).integers(lo, hi + 1, (n, k)).astype(np.int8)
    b = pack_nbits(codes, bits, block)
    assert b.shape == (n, -(-k // block), block * bits // 8)
    np.testing.assert_array_equal(unpack_nbits(b, k, bits), codes)


def test_pack_nbits_refuses_codes_out_of_range():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        pack_nbits(np.array([[2, 0]]), bits=2, block_size=16)


def _one_layer(codes: np.ndarray, scale: np.ndarray, bits: int, block: int, level: int) -> bytes:
    n, k = codes.shape
    b = pack_nbits(codes, bits, block)
    s = np.repeat(scale[:, None], b.shape[1], axis=1).astype(np.float32)
    node = helper.make_node(NBITS_OP, ["A", "B", "S"], ["Y"], domain=NBITS_DOMAIN, K=k, N=n,
                            bits=bits, block_size=block, accuracy_level=level)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT,
                                                                     ["M", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                          [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                               helper.make_opsetid(NBITS_DOMAIN, 1)]
                             ).SerializeToString()


@pytest.mark.parametrize("bits,n,k,block", [(2, 8, 100, 32), (4, 16, 64, 16), (8, 4, 40, 32),
                                            (2, 128, 256, 64)])
def test_onnxruntime_reads_the_layout(bits, n, k, block):
    # accuracy level 1 computes in float: the product of exactly the codes we packed
    rng = np.random.default_rng(bits + k)
    lo, hi = weight_range(bits)
    codes = rng.integers(lo, hi + 1, (n, k)).astype(np.int8)
    scale = rng.uniform(0.5, 2, n).astype(np.float32)
    a = rng.standard_normal((3, k)).astype(np.float32)
    sess = ort.InferenceSession(_one_layer(codes, scale, bits, block, 1),
                                providers=["CPUExecutionProvider"])
    want = a.astype(np.float64) @ (codes * scale[:, None].astype(np.float64)).T
    np.testing.assert_allclose(sess.run(None, {"A": a})[0], want, rtol=1e-5, atol=1e-4)


def _mlp_student(width: int = 128, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A ternary MLP student fitted a little to a separable task, so its logits are not ties."""
    torch.manual_seed(seed)
    x = torch.randn(512, 32)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4] > 0).long()
    net = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                        nn.Linear(width, 4))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    student = quantize(net.eval(), weight_bits=2)
    calibrate(student, [x[:256]])
    opt = torch.optim.Adam(student.parameters(), 1e-3)
    student.train()
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(student(x), y).backward()
        opt.step()
    return student.eval(), x


@pytest.fixture(scope="module")
def mlp():
    return _mlp_student()


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node]


def test_nbits_file_within_its_bound(mlp, tmp_path):
    student, x = mlp
    out = tmp_path / "m.onnx"
    result = export(student, out, example_input=x[:1], formats=("onnx",), verify=x[:256],
                    linear_kernel="nbits", nbits=NBits(min_weights=0), progress=False)
    # every Linear is a MatMulNBits: 8-bit first and last layer, ternary in between
    assert _ops(out).count(NBITS_OP) == 3 and "Gemm" not in _ops(out)
    assert result.linear["storage"] == {"0": "nbits8", "2": "nbits2", "4": "nbits8"}
    assert result.linear["contract"] == "bound"
    assert result.linear["thresholds"]["min_agreement"] == BOUND.min_agreement
    assert all(v.passed for v in result.verification.values())
    assert result.linear_kernels == (
        "MatMulNBits: 3 Linear layer(s) (0: 8-bit, 2: 2-bit, 4: 8-bit), block 64, accuracy "
        "level 4; contract bound: int8 activations per block, gated at top-1 agreement >= 99% "
        "and the median input within 16 output steps")
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(props[meta.LINEAR]) == result.linear
    assert json.loads(props[meta.STORAGE])["2"] == "nbits2"
    # the bound, checked on inputs the gate did not see, through the runtime
    held_out = x[256:]
    got = Session(out).run(held_out.numpy())
    with torch.no_grad():
        want = student(held_out).numpy()
    assert (got.argmax(1) == want.argmax(1)).mean() >= BOUND.min_agreement - 0.02
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # int8 activations: ~1%
    assert np.abs(got - want).max() > 0  # ... and not the student's arithmetic


def test_nbits_in_float_is_exact_and_gated_as_usual(mlp, tmp_path):
    student, x = mlp
    out = tmp_path / "f.onnx"
    result = export(student, out, example_input=x[:1], formats=("onnx",), verify=x[:128],
                    linear_kernel="nbits",
                    nbits=NBits(min_weights=0, accuracy_level=1, block_size=32),
                    progress=False)
    assert result.linear["contract"] == "exact" and result.linear["thresholds"] is None
    assert result.linear_kernels.endswith("contract exact: computed in float, the usual gate")
    with torch.no_grad():
        want = student(x[128:]).numpy()
    np.testing.assert_allclose(Session(out).run(x[128:].numpy()), want, atol=1e-4)


@pytest.mark.parametrize("bits,opset,ternary_storage", [(2, 25, "int"), (2, 17, "int"),
                                                       (4, 25, "trits"), (4, 20, "trits")])
def test_every_weight_storage_is_read_back(tmp_path, bits, opset, ternary_storage):
    # INT2 + Cast, INT8, INT4 + Cast, INT8: the codes the file stores become B, exactly
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 48), nn.ReLU(),
                        nn.Linear(48, 5))
    student = quantize(net.eval(), weight_bits=bits).eval()
    x = torch.randn(64, 24)
    out = tmp_path / "w.onnx"
    result = export(student, out, example_input=x[:1], formats=("onnx",), opset=opset,
                    ternary_storage=ternary_storage, linear_kernel="nbits", progress=False,
                    nbits=NBits(min_weights=0, accuracy_level=1, block_size=16))
    assert result.linear["storage"]["2"] == f"nbits{bits}"
    assert result.verification["onnx"].median_steps < 1e-3  # float compute: rounding only
    b = numpy_helper.to_array(next(t for t in onnx.load(out).graph.initializer
                                   if t.name == "2"))
    codes = next(i for i in quant_layers(student) if i.name == "2").int_weight.numpy()
    np.testing.assert_array_equal(unpack_nbits(b, 40, bits), codes)


def test_small_layers_stay_gemm(mlp, tmp_path):
    student, x = mlp
    out = tmp_path / "s.onnx"
    result = export(student, out, example_input=x[:1], formats=("onnx",), verify=x[:64],
                    linear_kernel="nbits", nbits=NBits(min_weights=128 * 128),
                    progress=False)
    assert result.linear["layers"] == ["2"]  # 128 x 128; 32 x 128 and 128 x 4 stay Gemm
    assert _ops(out).count(NBITS_OP) == 1 and _ops(out).count("Gemm") == 2


def test_runtime_takes_the_lut_entry_from_the_file(mlp, tmp_path):
    student, x = mlp  # the 128 x 128 ternary layer is one the LUT kernels take
    out = tmp_path / "lut.onnx"
    result = export(student, out, example_input=x[:1], formats=("onnx",), verify=x[:256],
                    linear_kernel="nbits", nbits=NBits(min_weights=0, lut_gemm=True),
                    progress=False)
    assert result.linear["session"] == {LUT_GEMM: "1"}
    assert all(v.passed for v in result.verification.values())
    s = Session(out)
    assert s.config == {LUT_GEMM: "1"}
    plain = Session(out, config={})
    assert plain.config == {}
    # the LUT kernels quantize activations their own way: the entry took effect
    assert not np.array_equal(s.run(x[:64].numpy()), plain.run(x[:64].numpy()))


def test_default_path_has_no_matmul_nbits(mlp, tmp_path):
    student, x = mlp
    paths = [tmp_path / "d.onnx", tmp_path / "q.onnx"]
    export(student, paths[0], example_input=x[:1], formats=("onnx",), verify=x[:64],
           progress=False)
    result = export(student, paths[1], example_input=x[:1], formats=("onnx",), verify=x[:64],
                    linear_kernel="qdq", progress=False)
    assert result.linear == {}
    protos = [onnx.load(p) for p in paths]
    for p in protos:
        assert NBITS_OP not in [n.op_type for n in p.graph.node]
        assert [o.domain for o in p.opset_import] == [""]
        assert meta.LINEAR not in {m.key for m in p.metadata_props}
        del p.graph.quantization_annotation[:]  # qonnx names these at random
    assert protos[0].graph == protos[1].graph
    assert Session(paths[0]).config == {}


def test_bad_options_are_refused(mlp, tmp_path):
    student, x = mlp
    with pytest.raises(ExportError, match="linear_kernel"):
        export(student, tmp_path / "x.onnx", example_input=x[:1], linear_kernel="lut")
    with pytest.raises(ExportError, match="power of two"):
        NBits(block_size=48)
    with pytest.raises(ExportError, match="accuracy_level"):
        NBits(accuracy_level=2)
    assert not (tmp_path / "x.onnx").exists()


def test_footprint_reads_matmul_nbits(mlp, tmp_path):
    """A MatMulNBits file's footprint: the parameters and MACs of the student, the bytes of
    the file (codes at the node's bits with the last block's padding, block scales, bias)."""
    from lowbit.footprint import footprint

    student, x = mlp
    out = tmp_path / "fp.onnx"
    export(student, out, example_input=x[:1], formats=("onnx",), verify=x[:64],
           linear_kernel="nbits", nbits=NBits(min_weights=0), progress=False)
    a, b = footprint(student, (1, 8), input_shape=(32,)), footprint(out, (1, 8))
    assert [f.weight_bits for f in b.layers if f.weight_bits] == [8, 2, 8]
    assert (a.params, a.macs) == (b.params, b.macs)
    assert [f.macs for f in b.layers if f.macs] == [32 * 128, 128 * 128, 128 * 4]
    # 32 -> 128 in blocks of 64: each row one block, 32 codes of it padding; a block scale
    # per row; the int32 bias and its fp32 scale
    assert b.layers[1].weight_bytes == 128 * 64 + 128 * 4 + 128 * 4 + 128 * 4
    assert b.layers[2].weight_bytes == 128 * 128 * 2 // 8 + 128 * 2 * 4 + 128 * 4 + 128 * 4
    # the file holds exactly these bytes, besides the activation quantizers' scalars
    inits = onnx.load(out).graph.initializer
    assert b.weight_bytes == sum(len(i.raw_data) for i in inits if i.dims)
    # the same activation tensors at the same bits
    assert (a.activation_bytes(8), a.peak(8)[0]) == (b.activation_bytes(8), b.peak(8)[0])
