"""Footprint analyzer: hand-computed numbers, PyTorch vs ONNX agreement, external checks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from lowbit import models
from lowbit.cli import main
from lowbit.footprint import FootprintError, footprint


class Tiny(nn.Module):
    """conv-BN-ReLU, a grouped conv with a residual add, pool, linear: input [2, 6, 6]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))  # [B, 4, 6, 6]
        z = self.relu2(self.conv2(y) + y)  # y stays live across conv2
        return self.fc(torch.flatten(self.pool(z), 1))


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and LayerNorm affines, so the exporter's folded biases and
    normalisation parameters are all distinct (it stores identical initializers once)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def _to_onnx(model: nn.Module, shape: tuple[int, ...], path) -> str:
    """TorchScript export (BN folded into the convs, as lowbit's exporter does)."""
    with warnings.catch_warnings():  # "legacy TorchScript-based exporter"
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model.eval(), (torch.randn(1, *shape),), str(path), dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return str(path)


def test_tiny_net_hand_computed():
    r = footprint(Tiny(), (1, 8), input_shape=(2, 6, 6))
    rows = {f.name: f for f in r.layers}
    assert [f.kind for f in r.layers] == ["input", "conv", "conv", "add", "pool", "linear"]
    # conv1: 4x2x3x3 weights + 4 bias from the folded BN; each of 4x6x6 outputs sums 2x3x3
    assert (rows["conv1"].params, rows["conv1"].macs) == (72 + 4, 144 * 18)
    # conv2 with groups=2: each output sees 4/2 input channels
    assert (rows["conv2"].params, rows["conv2"].macs) == (4 * 2 * 9 + 4, 144 * 18)
    assert (rows["fc"].params, rows["fc"].macs) == (12 + 3, 12)
    assert rows["conv1"].fused == ("conv1", "bn1", "relu1")
    assert r.params == 76 + 76 + 15 and r.macs == 2592 * 2 + 12
    assert r.weight_bytes == r.weight_bytes_fp32 == 4 * (76 + 76 + 15)
    # bytes at 2/4/8 bits: packed codes + one fp32 scale per output channel + fp32 bias
    for bits in (2, 4, 8):
        expected = 2 * (math.ceil(72 * bits / 8) + 16 + 16) + math.ceil(12 * bits / 8) + 12 + 12
        assert r.with_bits(bits, None).weight_bytes == expected
    assert r.with_bits(2, None).weight_bytes == 50 + 50 + 27
    # activations: input 72, conv1 144, conv2 144, add 144, pool 4, fc 3 elements per image
    assert [f.act_elements for f in r.layers] == [72, 144, 144, 144, 4, 3]
    assert r.activation_bytes(1) == 4 * (72 + 3 * 144 + 4 + 3)
    assert r.with_bits(None, 4).activation_bytes(1) == 36 + 3 * 72 + 2 + 2
    assert r.activation_bytes(8, fp32=True) == 8 * r.activation_bytes(1)
    # peak: at the add, y (residual), conv2's output and the sum are live together
    assert r.peak(1) == (3 * 576, "add")
    assert r.peak_activation_bytes(8) == 8 * 3 * 576
    assert r.with_bits(None, 8).peak_activation_bytes(1) == 3 * 144


def test_inplace_and_views_allocate_nothing_but_fanout_does():
    class Fan(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1, bias=False)
            self.act = nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            return self.act(y) + y  # y has two consumers: ReLU cannot run in place

    r = footprint(Fan(), 1, input_shape=(1, 2, 2))
    assert [f.kind for f in r.layers] == ["input", "conv", "unary", "add"]
    assert r.peak(1)[0] == 3 * 8 * 4


def test_parameters_of_ops_run_in_place_are_counted(tmp_path):
    """A GroupNorm (not foldable) runs in place on its conv's output and keeps its affine
    parameters; a stored tensor added to the activations (a position embedding) and a
    per-channel layer scale are parameters too, in PyTorch and in the exported file."""

    class Norms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 1)
            self.norm = nn.GroupNorm(2, 4)
            self.pos = nn.Parameter(torch.randn(4, 3, 3))
            self.gamma = nn.Parameter(torch.rand(4, 1, 1))

        def forward(self, x):
            y = torch.relu(self.norm(self.conv(x)) + self.pos)
            return self.gamma * y + x.mean(1, keepdim=True)

    torch.manual_seed(0)
    model = Norms()
    for p in model.norm.parameters():
        p.data.uniform_(0.5, 1.5)
    a = footprint(model, (1, 8), input_shape=(2, 3, 3))
    conv = a.layers[1]
    assert conv.fused == ("conv", "norm", "add", "relu", "mul")
    # 4x2 weights + 4 bias; GroupNorm 4 + 4; position 36; layer scale 4 (a scale: stored,
    # not a weight or bias element)
    assert conv.params == 8 + 4 + 4 + 36 and conv.weight_bytes == 4 * (12 + 8 + 36 + 4)
    b = footprint(_to_onnx(model, (2, 3, 3), tmp_path / "n.onnx"), (1, 8))
    _same(a, b)


def test_crossover_batch():
    r = footprint(Tiny(), (1,), input_shape=(2, 6, 6))
    one_bit = r.with_bits(32, 1)

    def acts(b):  # 1-bit activations of every tensor, rounded up to bytes per tensor
        return sum(math.ceil(e * b / 8) for e in (72, 144, 144, 144, 4, 3))

    cross = one_bit.crossover()
    assert acts(cross) > 668 >= acts(cross - 1) and cross == 11
    assert r.crossover() == 1  # fp32: activations exceed weights at once
    peak = one_bit.crossover(peak=True)
    assert one_bit.peak_activation_bytes(peak) > one_bit.weight_bytes
    assert one_bit.peak_activation_bytes(peak - 1) <= one_bit.weight_bytes


@pytest.mark.parametrize("arch,shape", [("resnet20", (3, 32, 32)), ("digits_cnn", (1, 8, 8))])
def test_pytorch_and_onnx_front_ends_agree(arch, shape, tmp_path):
    model = _randomize_bn(models.create(arch, in_channels=shape[0]))
    a = footprint(model, (1, 8), input_shape=shape)
    b = footprint(_to_onnx(model, shape, tmp_path / "m.onnx"), (1, 8))
    assert a.params == b.params == sum(
        m.weight.numel() + m.out_channels if isinstance(m, nn.Conv2d) else 0
        for m in model.modules()) + model.fc.weight.numel() + model.fc.bias.numel()
    for x, y in zip(a.layers, b.layers, strict=True):
        assert (x.name, x.kind, x.params, x.weight_bytes, x.act_elements, x.macs, x.act_bits) \
            == (y.name, y.kind, y.params, y.weight_bytes, y.act_elements, y.macs, y.act_bits)
    for bits in (None, (2, 4)):
        ra, rb = (a.with_bits(*bits), b.with_bits(*bits)) if bits else (a, b)
        assert ra.to_dict()["batch"] == rb.to_dict()["batch"]
        assert ra.weight_bytes == rb.weight_bytes and ra.macs == rb.macs


def test_bit_override_changes_bytes_as_expected():
    model = models.create("resnet20")
    r = footprint(model, (1,), input_shape=(3, 32, 32))
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for bits in (2, 4, 8):
        # every conv has a BN after it (folded into a bias); fc has its own bias
        expected = sum(math.ceil(m.weight.numel() * bits / 8) + 8 * m.weight.shape[0]
                       for m in layers)
        assert r.with_bits(bits, None).weight_bytes == expected
    assert r.with_bits(32, None).weight_bytes == r.weight_bytes_fp32 == 4 * r.params
    # every activation of resnet20 has a multiple of 8 elements: 8-bit is exactly fp32 / 4
    assert r.with_bits(None, 8).activation_bytes(1) * 4 == r.activation_bytes(1)
    assert r.with_bits(None, 8).peak_activation_bytes(64) * 4 == r.peak_activation_bytes(64)
    assert r.with_bits(None, 4).weight_bytes == r.weight_bytes  # weights untouched


@pytest.fixture(scope="module")
def digits_student():
    from lowbit.quant import QuantSpec, quantize

    torch.manual_seed(0)
    return quantize(models.create("digits_cnn"), QuantSpec(weight_bits=2, act_bits=4)).eval()


def test_student_bits_and_lowbit_onnx(digits_student, tmp_path):
    from lowbit.export import Thresholds, export

    a = footprint(digits_student, (1, 8), input_shape=(1, 8, 8))
    # first/last 8-bit; ternary stored as trits, five codes per byte
    assert [f.weight_bits for f in a.layers if f.weight_bits] == [8, 1.6, 1.6, 8]
    assert [f.act_bits for f in a.layers][:4] == [8, 4, 4, 4]  # 8-bit input, 4-bit ReLUs
    path = tmp_path / "student.onnx"
    # random weights: near-tied logits make the exporter's top-1 gate moot here
    export(digits_student, path, example_input=torch.zeros(1, 1, 8, 8), formats=("onnx",),
           thresholds=Thresholds(min_agreement=0.0))
    b = footprint(path, (1, 8))
    for x, y in zip(a.layers, b.layers, strict=True):
        assert (x.kind, x.params, x.weight_bits, x.weight_bytes, x.act_bits, x.macs) \
            == (y.kind, y.params, y.weight_bits, y.weight_bytes, y.act_bits, y.macs)
    for batch in ("1", "8"):  # the exporter has its own node names: all but the name agree
        da, db = a.to_dict()["batch"][batch], b.to_dict()["batch"][batch]
        assert da.pop("peak_at") == "features.3" and db.pop("peak_at")
        assert da == db
    # Against the file itself: every initializer's stored bytes, minus the constants of the
    # activation quantizers (Q/DQ/Clip applied to a run-time tensor), are the weight bytes.
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    assert all(not i.int32_data and len(i.raw_data) for i in inits.values())  # packed raw
    const = set(inits)
    for n in proto.graph.node:
        if all(t in const for t in n.input if t):
            const.update(n.output)
    act_consts = {t for n in proto.graph.node if n.op_type in
                  ("QuantizeLinear", "DequantizeLinear", "Clip") and n.input[0] not in const
                  for t in n.input[1:] if t in inits}
    trits = [inits[n] for n in ("features.3", "features.6")]  # the ternary layers
    assert all(i.data_type == TensorProto.UINT8 for i in trits)
    assert [len(i.raw_data) for i in trits] == [math.ceil(32 * 16 * 9 / 5),
                                                  math.ceil(64 * 32 * 9 / 5)]
    shapes = {n for n, i in inits.items() if i.data_type == TensorProto.INT64}
    assert b.weight_bytes == sum(len(i.raw_data) for n, i in inits.items()
                                 if n not in act_consts | shapes)


def test_resnet_student_front_ends_agree(tmp_path):
    """Residual-add quantizers (forward hooks fx does not see) and trits count alike in the
    PyTorch student and in its exported ONNX."""
    from lowbit.export import Thresholds, export
    from lowbit.quant import calibrate, quantize

    model = _randomize_bn(models.create("resnet20"))  # init BNs fold to shared zero biases
    x = torch.randn(8, 3, 32, 32)
    student = calibrate(quantize(model), [x]).eval()
    path = tmp_path / "r.onnx"
    export(student, path, example_input=x[:1], formats=("onnx",), verify=x,
           thresholds=Thresholds(min_agreement=0.0, max_steps=1e9))  # random net: no gate
    a, b = footprint(student, (1, 8), input_shape=(3, 32, 32)), footprint(path, (1, 8))
    assert a.weight_bytes == b.weight_bytes
    for batch in ("1", "8"):
        da, db = a.to_dict()["batch"][batch], b.to_dict()["batch"][batch]
        da.pop("peak_at"), db.pop("peak_at")
        assert da == db
    # 8-bit residual-add inputs: the peak is 4-bit/8-bit tensors, not fp32 ones
    assert a.peak_activation_bytes(1) == 32 * 1024


def _same(a, b) -> None:
    """Two footprints of one model agree on every number but the layer names."""
    assert (a.params, a.weight_bytes, a.macs) == (b.params, b.weight_bytes, b.macs)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert (x.kind, x.params, x.weight_bits, x.weight_bytes, x.act_bits, x.act_elements,
                x.macs) == (y.kind, y.params, y.weight_bits, y.weight_bytes, y.act_bits,
                            y.act_elements, y.macs), (x.name, y.name)
    for batch in map(str, a.batch_sizes):
        da, db = a.to_dict()["batch"][batch], b.to_dict()["batch"][batch]
        da.pop("peak_at"), db.pop("peak_at")
        assert da == db


def test_vit_student_front_ends_agree(tmp_path):
    """A ternary ViT student and its exported file: the position embedding (a parameter added
    to the tokens) is stored, attention's activation products cost their MACs, the exported
    shape arithmetic, head selects (Gather), LayerNorm, GELU's Erf chain and ReduceMean are
    accounted alike."""
    from lowbit.export import Thresholds, export
    from lowbit.quant import calibrate, quantize

    dim, heads, tokens = 32, 2, 64
    model = _randomize_bn(models.create("vit_tiny", dim=dim, depth=2, heads=heads))
    x = torch.randn(8, 3, 32, 32)
    student = calibrate(quantize(model, weight_bits=2, act_bits=8), [x]).eval()
    a = footprint(student, (1, 8), input_shape=(3, 32, 32))
    rows = {f.name: f for f in a.layers}
    # patch embedding: 32x3x4x4 8-bit weights (uint8 + 128 by the overflow rule: 32 zero
    # points), 32 scales, 32 biases, and the 64x32 position table added to its tokens
    assert rows["patch_embed"].params == dim * 48 + dim + tokens * dim
    assert rows["patch_embed"].weight_bytes == dim * 48 + dim + 4 * (2 * dim + tokens * dim)
    # q k^T: heads x N x N scores of d products each; attn v: heads x N x d of N products
    products = [f for f in a.layers if f.kind == "matmul"]
    assert [f.macs for f in products] == [heads * tokens * tokens * (dim // heads)] * 4
    assert [f.act_elements for f in products[:2]] == [heads * tokens * tokens, tokens * dim]
    # both LayerNorm affines of each block, and the final one (in place on the token mean)
    norms = [f for f in a.layers if f.kind == "unary"] + [rows["mean"]]
    assert [f.weight_bytes for f in norms] == [8 * dim] * 5
    path = tmp_path / "vit.onnx"
    export(student, path, example_input=x[:1], formats=("onnx",), verify=x, progress=False,
           thresholds=Thresholds(min_agreement=0.0, max_steps=1e9))  # random net: no gate
    _same(a, footprint(path, (1, 8)))


def test_checkpoint_path_reads_its_input_shape(digits_student, tmp_path, capsys):
    from lowbit import _checkpoint, data

    path = tmp_path / "student.pt"
    _checkpoint.save(path, digits_student, data=_checkpoint.data_info(data.digits(train=False)),
                     record={})
    direct = footprint(digits_student, (1, 8), input_shape=(1, 8, 8))
    assert footprint(path, (1, 8)).to_dict()["batch"] == direct.to_dict()["batch"]
    assert main(["footprint", str(path), "--batch-size", "4"]) == 0
    row = next(line.split() for line in capsys.readouterr().out.splitlines()
               if line.startswith("features.6 "))
    # 64x32x3x3 ternary codes as trits, 5 per byte + 64 fp32 scales + 64 (folded BN) biases
    assert row[1:5] == ["conv", f"{64 * 32 * 9 + 64:,}", "1.6",
                        f"{math.ceil(64 * 32 * 9 / 5) + 512:,}"]


def test_qonnx_inference_cost_agrees_at_batch_1(digits_student, tmp_path):
    from brevitas.export import export_qonnx
    from qonnx.util.inference_cost import inference_cost

    from lowbit.quant import bake_integer_bias

    path = tmp_path / "student_qonnx.onnx"
    # as lowbit's QONNX export does: eval-mode integer-bias hooks baked into plain biases
    export_qonnx(bake_integer_bias(digits_student), torch.zeros(1, 1, 8, 8), str(path))
    cost = inference_cost(str(path), discount_sparsity=False, cost_breakdown=True)["node_cost"]
    theirs = [cost[k] for k in cost if k.startswith(("Conv", "Gemm", "MatMul"))]
    ours = [f for f in footprint(digits_student, 1, input_shape=(1, 8, 8)).layers
            if f.weight_bits]
    assert len(theirs) == len(ours) == 4
    for q, f in zip(theirs, ours, strict=True):
        assert q["total_mem_w_elems"] == f.weight_elements
        # qonnx counts 2-bit codes where lowbit stores ternary ones as 1.6-bit trits
        assert q["total_mem_w_bits"] == f.weight_elements * (2 if f.weight_bits == 1.6
                                                             else f.weight_bits)
        assert q["total_mem_o_elems"] == f.act_elements  # qonnx holds them at 32-bit accums
        assert q["total_macs"] == f.macs


def _graph(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_unknown_ops_are_listed(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    model = _graph([helper.make_node("Hardmax", ["x"], ["h"], name="hm"),
                    helper.make_node("LpNormalization", ["h"], ["y"], name="lp")], [x], [y])
    with pytest.raises(FootprintError, match=r"2 op\(s\): Hardmax \(node hm\), "
                                             r"LpNormalization \(node lp\)"):
        footprint(model)

    class Rnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = nn.Embedding(5, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.nn.functional.softsign(self.emb(x)))

    with pytest.raises(FootprintError, match=r"2 op\(s\): emb \(Embedding\), .*softsign"):
        footprint(Rnn(), input_shape=(3,))


def test_bad_batch_bits_and_missing_shapes():
    with pytest.raises(FootprintError, match="positive integers, got \\[1, 0\\]"):
        footprint(Tiny(), (1, 0), input_shape=(2, 6, 6))
    with pytest.raises(FootprintError, match="weight_bits must be an integer from 1 to 32"):
        footprint(Tiny(), 1, weight_bits=0, input_shape=(2, 6, 6))
    with pytest.raises(FootprintError, match="needs input_shape"):
        footprint(Tiny())
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    s = helper.make_tensor_value_info("s", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    dynamic = _graph([helper.make_node("Reshape", ["x", "s"], ["r"]),
                      helper.make_node("Relu", ["r"], ["y"])], [x, s], [y])
    with pytest.raises(FootprintError, match="no shape information for 2 tensor"):
        footprint(dynamic)
    no_shape = _graph([helper.make_node("Relu", ["x"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], [y])
    with pytest.raises(FootprintError, match="input 'x' has no shape information"):
        footprint(no_shape)
    sym = _graph([helper.make_node("Relu", ["x"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C"])], [y])
    with pytest.raises(FootprintError, match=r"symbolic dims \['C'\]"):
        footprint(sym)
    assert footprint(sym, input_shape=(5,)).activation_bytes(2) == 2 * 5 * 4  # ReLU in place


def test_onnx_front_end_does_not_import_torch(tmp_path):
    path = _to_onnx(Tiny(), (2, 6, 6), tmp_path / "tiny.onnx")
    code = (f"import sys, lowbit; r = lowbit.footprint({path!r}, (1, 8)); "
            f"assert 'torch' not in sys.modules, 'torch imported'; print(r.params)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 76 + 76 + 15


def test_cli_table_json_plot_and_errors(tmp_path, capsys):
    path = _to_onnx(_randomize_bn(Tiny()), (2, 6, 6), tmp_path / "tiny.onnx")
    out_json, fig = tmp_path / "r.json", tmp_path / "fig.png"
    assert main(["footprint", path, "--batch-size", "1", "8", "--json", str(out_json),
                 "--plot", str(fig)]) == 0
    text = capsys.readouterr().out
    assert "add " in text and "ternary" in text and "crossover" in text
    doc = json.loads(out_json.read_text())
    assert doc["as_is"]["params"] == 167 and set(doc["precisions"]) == {
        "fp32", "8-bit", "4-bit", "ternary"}
    assert doc["precisions"]["ternary"]["weight_bits"] == 2
    assert doc["as_is"]["batch"]["8"]["peak_activation_bytes"] == 8 * 3 * 576
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["footprint", path, "--bits", "2/4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc["precisions"]) == ["2/4"]
    assert doc["precisions"]["2/4"]["weight_bytes"] == 50 + 50 + 27
    for argv, message in [(["--batch-size", "0"], "expected an integer >= 1"),
                          (["--bits", "x"], "expected W or W/A")]:
        with pytest.raises(SystemExit) as exc:
            main(["footprint", path, *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert main(["footprint", str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["footprint", "resnet20"]) == 2
    assert "--input-shape" in capsys.readouterr().err
