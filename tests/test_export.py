"""lowbit.export: packers, graph rewrites, ORT/qonnx vs PyTorch agreement, CLI errors."""

from __future__ import annotations

import io
import json
import pickle

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from onnx import TensorProto, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.general import RemoveStaticGraphInputs

from lowbit import _checkpoint, models
from lowbit import _onnx_meta as meta
from lowbit.cli import export_main
from lowbit.data import normalize
from lowbit.distill import train as lowbit_train
from lowbit.export import (
    ExportError,
    Thresholds,
    check_kernels,
    export,
    make_tensor,
    pack_int2,
    pack_int4,
    pack_trits,
    read_tensor,
    unpack_int2,
    unpack_int4,
    unpack_trits,
)
from lowbit.export._prepare import onnx_runner
from lowbit.export._rewrites import FoldBatchNorm
from lowbit.export._trace import trace
from lowbit.export._verify import RANDOM, compare
from lowbit.quant import calibrate, quantize


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a busy 2-core CI box OpenMP spinning makes these small models
    ~10x slower with two threads (measured: 46 s vs 3.5 s to train the digits CNN)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ packers


def test_pack_hand_computed_bytes():
    codes = np.array([1, -1, 0, 1, -2])
    # INT2: 1 -> 01, -1 -> 11, 0 -> 00, 1 -> 01, first code in the low bits: 0b01_00_11_01
    assert pack_int2(codes) == bytes([0x4D, 0x02])
    # INT4: low nibble first: (-1, 1) -> 0xF1, (1, 0) -> 0x10, (_, -2) -> 0x0E
    assert pack_int4(codes) == bytes([0xF1, 0x10, 0x0E])
    # trits: digits t+1 = (2, 0, 1, 2, 1) -> 2 + 0*3 + 1*9 + 2*27 + 1*81 = 146
    assert pack_trits(np.array([1, -1, 0, 1, 0])) == bytes([146])


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="2-bit range"):
        pack_int2(np.array([2]))
    with pytest.raises(ValueError, match="4-bit range"):
        pack_int4(np.array([-9]))
    with pytest.raises(ValueError, match="trits"):
        pack_trits(np.array([2]))


@settings(max_examples=60, deadline=None)
@given(arrays(np.int8, array_shapes(min_dims=1, max_dims=4, max_side=7),
              elements=st.integers(-2, 1)))
def test_int2_round_trip_matches_onnx(codes):
    data = pack_int2(codes)
    assert len(data) == -(-codes.size // 4)
    np.testing.assert_array_equal(unpack_int2(data, codes.size), codes.reshape(-1))
    # the layout is the one onnx itself writes for ml_dtypes.int2
    assert numpy_helper.from_array(codes.astype(ml_dtypes.int2)).raw_data == data
    t = make_tensor("w", codes, "int2")
    np.testing.assert_array_equal(read_tensor(t), codes)
    np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int8), codes)


@settings(max_examples=60, deadline=None)
@given(arrays(np.int8, array_shapes(min_dims=1, max_dims=4, max_side=7),
              elements=st.integers(-8, 7)))
def test_int4_round_trip_matches_onnx(codes):
    data = pack_int4(codes)
    assert len(data) == -(-codes.size // 2)
    np.testing.assert_array_equal(unpack_int4(data, codes.size), codes.reshape(-1))
    assert numpy_helper.from_array(codes.astype(ml_dtypes.int4)).raw_data == data
    np.testing.assert_array_equal(read_tensor(make_tensor("w", codes, "int4")), codes)


@settings(max_examples=60, deadline=None)
@given(arrays(np.int8, array_shapes(min_dims=1, max_dims=3, max_side=9),
              elements=st.integers(-1, 1)))
def test_trits_round_trip(codes):
    data = pack_trits(codes)
    assert len(data) == -(-codes.size // 5) and max(data, default=0) <= 242
    np.testing.assert_array_equal(unpack_trits(data, codes.size), codes.reshape(-1))


def test_every_code_value_round_trips():
    for bits, pack, unpack in [(2, pack_int2, unpack_int2), (4, pack_int4, unpack_int4)]:
        codes = np.arange(-(1 << (bits - 1)), 1 << (bits - 1))
        np.testing.assert_array_equal(unpack(pack(codes), codes.size), codes)


# ------------------------------------------------------------------ rewrites


def _ort(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_fold_batchnorm_before_after():
    torch.manual_seed(0)
    model = models.create("digits_cnn").eval()
    for m in model.modules():  # non-trivial statistics, some negative gammas
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(-1.5, 1.5)
    x = torch.randn(4, 1, 8, 8)
    before = ModelWrapper(trace(model, x[:1])).transform(RemoveStaticGraphInputs())
    after = before.transform(FoldBatchNorm())
    assert before.get_nodes_by_op_type("BatchNormalization")
    assert not after.get_nodes_by_op_type("BatchNormalization")
    y0, y1 = _ort(before.model, x.numpy()), _ort(after.model, x.numpy())
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y1, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ exports vs PyTorch


@pytest.fixture(scope="module")
def digits_float(digits_split):
    """A digits CNN trained for a few epochs (margins like a real model, unlike random init)."""
    train, _ = digits_split
    model, _ = lowbit_train(models.create("digits_cnn"), train, epochs=4, batch_size=128,
                            lr=0.1, progress=False)
    return model.eval()


def _student(model: nn.Module, bits: int, x: torch.Tensor) -> nn.Module:
    return calibrate(quantize(model, weight_bits=bits), [x]).eval()


def _check_file(path, n_in: tuple[int, ...]) -> onnx.ModelProto:
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    assert proto.ir_version <= 13  # what onnxruntime 1.24.1 (pyproject's floor) loads
    assert [i.name for i in proto.graph.input] == [meta.INPUT_NAME]
    assert [o.name for o in proto.graph.output] == [meta.OUTPUT_NAME]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    for batch in (1, 5):  # and it really runs at any batch
        out = _ort(proto, np.random.default_rng(0).standard_normal((batch, *n_in), np.float32))
        assert out.shape[0] == batch
    # exact on every CPU: the file says so, and the proof holds when re-run on the file alone
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props[meta.KERNELS])["exact"]
    x = np.random.default_rng(1).standard_normal((2, *n_in), np.float32)
    checks = check_kernels(proto, x)
    assert all(c.passed for c in checks)
    return proto


@pytest.mark.parametrize("bits,ternary,name,storage,nbytes", [
    (2, "trits", "trits", TensorProto.UINT8, -(-32 * 16 * 9 // 5)),  # five codes per byte
    (2, "int", "int2", TensorProto.INT2, 32 * 16 * 9 // 4),
    (4, "trits", "int4", TensorProto.INT4, 32 * 16 * 9 // 2)])
def test_digits_export_agrees(digits_float, digits_split, tmp_path, bits, ternary, name,
                              storage, nbytes):
    train, test = digits_split
    student = _student(digits_float, bits, normalize(train.images[:256], train.mean, train.std))
    out = tmp_path / "d.onnx"
    result = export(student, out, verify=test, data=test, formats=("onnx",),
                    thresholds=Thresholds(min_agreement=0.99), ternary_storage=ternary)
    check = result.verification["onnx"]
    assert check.passed and check.n == len(test) and check.agreement >= 0.99
    proto = _check_file(out, (1, 8, 8))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props[meta.WEIGHT_BITS]) == bits
    recorded = json.loads(props[meta.VERIFICATION])
    assert [v["format"] for v in recorded] == ["onnx", "onnx-int"]
    assert recorded[0]["agreement"] == check.agreement
    assert json.loads(props[meta.MEAN]) == list(test.mean)
    storages = json.loads(props[meta.STORAGE])
    assert storages["features.3"] == name
    # first/last stay 8-bit; fed by the 8-bit input the first conv could overflow x86's
    # uint8 x int8 kernels without VNNI, so it is stored as uint8 + 128 (lowbit._backend);
    # the classifier runs as a float Gemm and keeps int8
    assert (storages["features.0"], storages["fc"]) == ("uint8", "int8")
    packed = {t.name: t for t in proto.graph.initializer}
    assert packed["features.3"].data_type == storage
    # what lands on disk is packed: 32*16*3*3 codes
    assert len(packed["features.3"].raw_data) == nbytes
    # the three convs and the classifier (after the requantized pool) read quantized
    # codes: their biases (BatchNorm folded) are int32
    int_biases = [t for t in proto.graph.initializer if t.data_type == TensorProto.INT32]
    assert sorted(t.dims[0] for t in int_biases) == [10, 16, 32, 64]
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    # the file reproduces the student outside the gate too
    x = normalize(test.images[:64], test.mean, test.std)
    ref = student(x).detach().numpy()
    assert (_ort(proto, x.numpy()).argmax(1) == ref.argmax(1)).mean() >= 0.98


def test_residual_add_forms(tmp_path):
    """float: residual adds as Sum (onnxruntime leaves them unfused); integer: Add (fused into
    QLinearAdd); the 21 convs and the classifier (behind the pool's requantizer) read
    quantized codes and get int32 biases either way."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    student = _checkpoint.load_model(models.pretrained("resnet20_cifar10_ternary"))[0]
    gate = Thresholds(min_agreement=0.9)  # integer adds round differently (see FloatResidualAdds)
    ops = {}
    for form in ("float", "integer"):
        export(student, tmp_path / f"{form}.onnx", example_input=x[:1], formats=("onnx",),
               verify=x, thresholds=gate, residual_add=form)
        proto = onnx.load(str(tmp_path / f"{form}.onnx"))
        ops[form] = [n.op_type for n in proto.graph.node]
        int32 = {t.name for t in proto.graph.initializer if t.data_type == TensorProto.INT32}
        assert sum(n.op_type == "DequantizeLinear" and n.input[0] in int32
                   for n in proto.graph.node) == 22  # (equal zero biases share bytes)
    assert ops["float"].count("Sum") == ops["integer"].count("Add") == 9
    assert "Add" not in ops["float"] and "Sum" not in ops["integer"]
    with pytest.raises(ExportError, match="residual_add"):
        export(student, tmp_path / "x.onnx", example_input=x[:1], residual_add="fast")


class _DepthwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True)
        self.pw = nn.Conv2d(8, 16, 1)
        self.act2 = nn.ReLU6()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.act2(self.pw(self.dw(self.act(self.bn(self.stem(x))))))
        return self.head(x.mean((2, 3)))


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 32),
                                 nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("make,shape", [(_DepthwiseNet, (3, 12, 12)), (_MLP, (3, 4, 4))])
@pytest.mark.parametrize("bits", [2, 4])
def test_other_architectures_agree(tmp_path, make, shape, bits):
    # random init: near-tied logits, hence 95 % (see the ResNet20 note)
    torch.manual_seed(1)
    model = make().eval()
    x = torch.randn(64, *shape)
    student = _student(model, bits, x)
    result = export(student, tmp_path / "m.onnx", example_input=x[:1], formats=("onnx",),
                    verify=torch.randn(128, *shape), thresholds=Thresholds(min_agreement=0.95))
    assert result.verification["onnx"].passed, result.verification["onnx"]
    _check_file(tmp_path / "m.onnx", shape)


def test_opset_ladder(digits_float, digits_split, tmp_path):
    train, test = digits_split
    student = _student(digits_float, 2, normalize(train.images[:256], train.mean, train.std))
    for opset, dtype in [(21, TensorProto.INT4), (17, TensorProto.INT8)]:
        out = tmp_path / f"o{opset}.onnx"
        result = export(student, out, opset=opset, data=test, verify=test, formats=("onnx",),
                        thresholds=Thresholds(min_agreement=0.99), ternary_storage="int")
        proto = _check_file(out, (1, 8, 8))
        assert proto.opset_import[0].version == opset
        assert {t.name: t.data_type for t in proto.graph.initializer}["features.3"] == dtype
        assert set(result.storage.values()) == ({"int4", "int8", "uint8"} if opset == 21
                                                 else {"int8", "uint8"})
    # trits need no sub-byte type: the same bytes at any opset
    result = export(student, tmp_path / "t13.onnx", opset=13, data=test, verify=test,
                    formats=("onnx",), thresholds=Thresholds(min_agreement=0.99))
    assert result.storage["features.3"] == "trits" and result.verification["onnx-int"].passed
    with pytest.raises(ExportError, match="opset 12"):
        export(student, tmp_path / "x.onnx", opset=12, data=test)


def test_qonnx_executes_like_pytorch(digits_float, digits_split, tmp_path):
    from qonnx.core.onnx_exec import execute_onnx

    train, test = digits_split
    student = _student(digits_float, 2, normalize(train.images[:256], train.mean, train.std))
    result = export(student, tmp_path / "d.onnx", data=test, verify=test,
                    thresholds=Thresholds(min_agreement=0.99))
    assert result.paths["qonnx"] == tmp_path / "d.qonnx.onnx"
    assert result.verification["qonnx"].passed
    model = ModelWrapper(str(result.paths["qonnx"]))
    assert model.get_nodes_by_op_type("Quant")
    x = normalize(test.images[:3], test.mean, test.std)
    got = np.concatenate([execute_onnx(model, {model.graph.input[0].name: x[i:i + 1].numpy()}
                                       )[model.graph.output[0].name] for i in range(3)])
    np.testing.assert_allclose(got, student(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_failed_gate_writes_nothing(digits_float, digits_split, tmp_path):
    train, test = digits_split
    student = _student(digits_float, 4, normalize(train.images[:256], train.mean, train.std))
    out = tmp_path / "d.onnx"
    # nothing can match to 0 output steps once BatchNorm is folded (float reordering)
    with pytest.raises(ExportError, match="verification failed, nothing written"):
        export(student, out, data=test, verify=test, thresholds=Thresholds(1.0, 0.0))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def checkpoints(digits_float, digits_split, tmp_path_factory):
    train, test = digits_split
    root = tmp_path_factory.mktemp("ckpt")
    info = _checkpoint.data_info(test)
    _checkpoint.save(root / "float.pt", digits_float, data=info, record={})
    student = _student(digits_float, 4, normalize(train.images[:256], train.mean, train.std))
    _checkpoint.save(root / "student4.pt", student, data=info, record={})
    return root


def _cli(capsys, *argv):
    code = export_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exports_student(checkpoints, tmp_path, capsys):
    out = tmp_path / "s.onnx"
    code, stdout, err = _cli(capsys, checkpoints / "student4.pt", "-o", out, "--format", "onnx",
                             "--data", "digits", "--min-agreement", "0.99", "--ort")
    assert code == 0, err
    assert "top-1 agreement" in stdout and out.is_file()
    # the per-layer table: digits_cnn's three convs as QLinearConv, the classifier float
    assert stdout.count("QLinearConv") == 3 and "fc  " in stdout
    assert "onnxruntime kernels: 3 integer, 1 float conv/linear" in stdout
    _check_file(out, (1, 8, 8))
    # --ort: onnxruntime's ORT format next to it, same predictions through the runtime
    from lowbit.runtime import Session

    ort_file = out.with_suffix(".ort")
    assert ort_file.is_file() and f"ort: {ort_file}" in stdout
    x = np.random.default_rng(0).integers(0, 17, (16, 1, 8, 8), dtype=np.uint8)
    np.testing.assert_array_equal(Session(ort_file).predict(x), Session(out).predict(x))


def test_cli_layer_widths(checkpoints, tmp_path, capsys):
    """--first-bits / --last-bits / --layer-bits set which layers stay wider (post-training),
    shown per layer; a student keeps its own and says so."""
    out = tmp_path / "w.onnx"
    code, stdout, err = _cli(capsys, checkpoints / "float.pt", "--bits", "2", "--first-bits", "4",
                             "--last-bits", "same", "--layer-bits", "features.3=8", "-o", out,
                             "--format", "onnx", "--data", "digits", "--max-drop", "1")
    assert code == 0, err
    spec = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}[meta.QUANT_SPEC])
    assert (spec["first_bits"], spec["last_bits"], spec["overrides"]) == \
        (4, None, [["features.3", 8]])
    storage = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}[meta.STORAGE])
    assert storage["features.0"] == "int4" and storage["fc"] == "trits"
    assert storage["features.3"] in ("int8", "uint8")  # 8-bit: the overflow rule decides
    assert "integer arithmetic:" in stdout and "exact on every onnxruntime CPU" in stdout
    code, _, err = _cli(capsys, checkpoints / "student4.pt", "--first-bits", "2", "-o",
                        tmp_path / "x.onnx", "--data", "digits")
    assert code == 2 and "first_bits = 8 but 2 was asked" in err
    with pytest.raises(SystemExit) as exc:  # argparse's own one-line error
        _cli(capsys, checkpoints / "float.pt", "--bits", "2", "--layer-bits", "fc3")
    assert exc.value.code == 2 and "LAYER=BITS" in capsys.readouterr().err


def test_cli_float_checkpoint_is_quantized_with_warning(checkpoints, tmp_path, capsys):
    out = tmp_path / "f.onnx"
    code, stdout, err = _cli(capsys, checkpoints / "float.pt", "--bits", "8", "-o", out,
                             "--format", "onnx", "--calib", "256", "--data", "digits")
    assert "lowbit distill" in err and "post-training" in err
    assert code == 0, err  # the file reproduces the post-training student: it passes the gate
    assert out.is_file() and stdout.count("-> passed") == 2
    _check_file(out, (1, 8, 8))


def _bad_files(root, good):
    (root / "pickle.pt").write_bytes(pickle.dumps({"x": io.StringIO("not a tensor")}))
    data = good.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "garbage.pt").write_bytes(b"\x00\x01not a checkpoint")
    torch.save(models.create("digits_cnn").state_dict(), root / "foreign.pt")
    torch.save({"format": "lowbit.checkpoint", "version": 99}, root / "version.pt")


@pytest.mark.parametrize("name,message", [
    ("pickle.pt", "refused to unpickle"), ("truncated.pt", "corrupt or truncated"),
    ("garbage.pt", "refused to unpickle"), ("foreign.pt", "not a lowbit checkpoint"),
    ("version.pt", "version 99"), ("missing.pt", "no such file")])
def test_cli_bad_checkpoints(checkpoints, tmp_path, capsys, name, message):
    _bad_files(tmp_path, checkpoints / "student4.pt")
    out = tmp_path / "out.onnx"
    code, _, err = _cli(capsys, tmp_path / name, "--bits", "4", "-o", out, "--data", "digits")
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "out.qonnx.onnx").exists()


def test_cli_bits_contradiction(checkpoints, tmp_path, capsys):
    out = tmp_path / "x.onnx"
    code, _, err = _cli(capsys, checkpoints / "student4.pt", "--bits", "2", "-o", out,
                        "--data", "digits")
    assert code == 2 and "4-bit student" in err and "2-bit" in err
    assert not out.exists()


def test_cli_bad_verify_data(checkpoints, tmp_path, capsys):
    out = tmp_path / "x.onnx"
    code, _, err = _cli(capsys, checkpoints / "student4.pt", "-o", out, "--verify-data",
                        "cifar10:/nonexistent")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()


def test_random_inputs_gate_the_logit_bound_not_top1(tmp_path):
    """Noise drives a trained network to near-tied logits: the shipped ternary ResNet20 may
    flip top-1 on some of 256 random inputs while the logits stay within the bound. Without
    verification data the gate is that bound alone (agreement reported), and it gates: a
    file off by more on every input fails."""
    student, ckpt = _checkpoint.load_model(models.pretrained("resnet20_cifar10_ternary"))
    result = export(student, tmp_path / "r.onnx", data=ckpt["data"], formats=("onnx",),
                    thresholds=Thresholds(min_agreement=1.0))
    checks = result.verification.values()
    assert all(c.passed and not c.top1_gated and c.median_steps < 1 for c in checks)
    assert "not gated on random inputs" in str(result.verification["onnx"])
    x = torch.randn(16, 3, 32, 32)
    run = onnx_runner(onnx.load(str(tmp_path / "r.onnx")), "all")
    off = compare("onnx", RANDOM, student, lambda a: run(a) + 5.0, x, np.ones(10),
                  Thresholds(min_agreement=1.0), progress=False)  # top-1 unchanged
    assert off.median_steps > 4 and not off.passed


class _HeadReLUFirst(nn.Module):
    """Registers its head ReLU first and uses it last, right before ``fc``; the residual add
    feeding conv3 gets a requantizer (``add_quant``) that the student registers last."""

    def __init__(self) -> None:
        super().__init__()
        self.relu_head = nn.ReLU()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        z = self.bn3(self.conv3(y + self.bn2(self.conv2(y))))
        return self.fc(self.relu_head(z).flatten(1))


def test_output_step_is_the_quantizer_feeding_the_last_layer(tmp_path):
    """The gate's unit is s_a * max_j |W_fc[c, j]| with s_a the scale of the quantizer whose
    codes fc reads (relu_head), not of the last quantizer registered."""
    from lowbit.export._build import build_onnx
    from lowbit.quant import act_quants, bake_integer_bias, output_feed, quant_layers

    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    student = quantize(_HeadReLUFirst(), weight_bits=4)
    calibrate(student, [x])
    assert output_feed(student) == ("fc", "relu_head")
    scales = {a.name: float(a.scale) for a in act_quants(student)}
    assert list(scales)[-1] != "relu_head"  # registration order puts another quantizer last
    fc = next(i for i in quant_layers(student) if i.name == "fc")
    w_max = (fc.int_weight.double() * fc.scale.double()[:, None]).abs().amax(1).numpy()
    built = build_onnx(bake_integer_bias(student), x[:1])
    np.testing.assert_allclose(built.step, scales["relu_head"] * w_max, rtol=1e-12)
    assert not np.allclose(built.step, scales[list(scales)[-1]] * w_max)
    result = export(student, tmp_path / "h.onnx", example_input=x[:1], verify=x,
                    formats=("onnx",), progress=False)
    assert result.verification["onnx"].passed


def _stored_weight_scales(proto: onnx.ModelProto, layers) -> dict[str, np.ndarray]:
    """Per layer, the scale of the DequantizeLinear its packed weight (named by the layer)
    reaches, following the decoding nodes (Cast, trits Gather/Slice/Reshape) forward."""
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    found = {}
    for name in layers:
        tensor = name
        while True:
            node = next(n for n in proto.graph.node if tensor in n.input)
            if node.op_type == "DequantizeLinear":
                found[name] = consts[node.input[1]]
                break
            tensor = node.output[0]
    return found


def test_stored_weight_scales_are_the_students_integer_bias_scales():
    """The file stores each layer's own scale (times its BatchNorm factor): exactly the one
    the student's IntegerBias rounds its bias with, so both compute the same int32 bias
    (recovered by least squares from the folded weight, conv1's differed by an ulp)."""
    from lowbit import _intmath
    from lowbit.export._build import build_onnx
    from lowbit.quant import bake_integer_bias

    model = _checkpoint.load_model("resnet20_cifar10_ternary")[0]
    built = build_onnx(bake_integer_bias(model), torch.zeros(1, 3, 32, 32))
    biases = {name.removesuffix("_integer_bias"): m for name, m in model.named_modules()
              if name.endswith("_integer_bias")}
    stored = _stored_weight_scales(built.proto, biases)
    acts = {a.name: a.scale for a in built.acts}
    assert "conv1" in biases and len(stored) == len(biases) > 10
    for name, m in biases.items():
        step = _intmath.bias_step(acts[m.act_name], stored[name])
        np.testing.assert_array_equal(step, m.folded()[1], err_msg=name)


def test_the_same_student_builds_the_same_bytes():
    """No run-dependent names: qonnx's annotations of tensors that no longer exist (random
    names, a few KB on a ResNet-20) are dropped with the old names."""
    from lowbit.export._build import build_onnx
    from lowbit.quant import bake_integer_bias

    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    student = calibrate(quantize(_HeadReLUFirst(), weight_bits=2), [x])
    first, second = (build_onnx(bake_integer_bias(student), x[:1]).proto for _ in range(2))
    assert first.SerializeToString() == second.SerializeToString()
    tensors = {t for n in first.graph.node for t in [*n.input, *n.output]}
    assert all(q.tensor_name in tensors for q in first.graph.quantization_annotation)
