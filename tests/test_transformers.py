"""Transformers: ternary/4-bit Linear layers over tokens, LayerNorm, GELU and softmax
attention (hand-written, ``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention``)
go quantize -> distill (with TernaryBERT's hidden-state and attention-map losses) -> export
-> run, gated like any student; MatMulNBits takes Linear layers over tokens too.

The models are small structural copies: lowbit's ``vit_tiny`` (timm/nanoGPT-style attention),
torchvision's ViT encoder (``nn.MultiheadAttention``, class token) and timm's ViT attention
(``F.scaled_dot_product_attention`` on ``qkv.unbind(0)``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit import _ops, models
from lowbit.distill import KDConfig, TrainConfig, student_for
from lowbit.distill._hidden import check_pairs, default_layers, tapped
from lowbit.distill._loop import _optimizer
from lowbit.errors import UsageError
from lowbit.export import NBits, export
from lowbit.quant import calibrate, describe, quantize, trace
from lowbit.runtime import Session


class TorchvisionViT(nn.Module):
    """torchvision's VisionTransformer at a few channels: conv patches, a class token
    expanded and concatenated, position embedding, EncoderBlocks with
    ``nn.MultiheadAttention(batch_first=True)``, ``x[:, 0]`` into the head."""

    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, 8, 8)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=0.1, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1),
                                 nn.Linear(2 * dim, dim))
        self.ln = nn.LayerNorm(dim)
        self.heads = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embedding
        h = self.ln_1(x)
        h, _ = self.self_attention(h, h, h, need_weights=False)
        x = x + h
        x = x + self.mlp(self.ln_2(x))
        return self.heads(self.ln(x)[:, 0])


class TimmAttentionNet(nn.Module):
    """timm's ``Attention`` (fused path) on conv patches: ``qkv.unbind(0)`` into
    ``F.scaled_dot_product_attention``, mean over tokens into the head."""

    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        return self.head((x + self.proj(o.transpose(1, 2).reshape(b, n, c))).mean(dim=1))


def _vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    return models.create("vit_tiny", **{"dim": 32, "depth": 2, "heads": 2, **kw}).eval()


def _student(model: nn.Module, x: torch.Tensor, **spec) -> fx.GraphModule:
    student = quantize(model, **{"weight_bits": 2, "act_bits": 8, **spec})
    calibrate(student, [x])
    return student.eval()


def test_vit_student_exports_verified_and_runs_everywhere(tmp_path):
    """The acceptance path: a ternary ViT student is exported, passes the gate, runs in
    lowbit's Session and in plain onnxruntime, and every Linear over tokens is an integer
    MatMul checked by the arithmetic contract."""
    x = torch.randn(48, 3, 32, 32)
    student = _student(_vit(), x)
    path = tmp_path / "vit.onnx"
    result = export(student, path, example_input=x[:1], verify=x, formats=("onnx",),
                    progress=False)
    assert all(v.passed for v in result.verification.values())
    rows = {r.name: r.kernel for r in result.layers}
    assert rows["blocks.0.attn.qkv"] == rows["blocks.1.mlp.2"] == "MatMulIntegerToFloat"
    assert rows["softmax"].startswith("float Softmax (onnxruntime has no integer softmax")
    assert rows["matmul"].startswith("float MatMul (a product of two activations")
    assert rows["blocks.0.norm1"].startswith("float LayerNormalization")
    # attention products are not conv/linear layers: 8 Linear over tokens + the patch conv
    # are integer, the 2-d head is a float Gemm (no weight zero point)
    assert result.kernels == {"integer": 9, "float": 1}
    checked = {c.layer for c in result.contract}
    assert {f"blocks.{i}.attn.{p}" for i in (0, 1) for p in ("qkv", "proj")} <= checked
    assert all(c.passed and c.accumulators > 0 for c in result.contract
               if c.layer != "patch_embed")
    with torch.no_grad():
        ref = student(x[:8]).numpy()
    got = Session(path).run(x[:8].numpy())
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    raw = plain.run(None, {plain.get_inputs()[0].name: x[:8].numpy()})[0]
    np.testing.assert_allclose(got, raw, rtol=0, atol=0)
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("net", [TorchvisionViT, TimmAttentionNet])
def test_library_attention_is_split_into_quantizable_layers(net, tmp_path):
    """nn.MultiheadAttention and scaled_dot_product_attention become Linear layers with the
    module's own weights and hand-written softmax attention: the same function."""
    torch.manual_seed(0)
    model = net().eval()
    x = torch.randn(32, 3, 32, 32)
    gm = trace(model).eval()
    assert not any(isinstance(m, nn.MultiheadAttention) for m in gm.modules())
    assert not any(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    student = _student(model, x, weight_bits=4)
    names = {n for n, _ in student.named_modules()}
    if net is TorchvisionViT:
        assert {f"self_attention.{p}_proj" for p in ("q", "k", "v", "out")} <= names
    result = export(student, tmp_path / "m.onnx", example_input=x[:1], verify=x,
                    formats=("onnx",), progress=False)
    assert all(v.passed for v in result.verification.values())


def test_masked_attention_is_refused_by_name():
    class Masked(TimmAttentionNet):
        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            return self.head(F.scaled_dot_product_attention(x, x, x, is_causal=True).mean(1))

    with pytest.raises(lowbit.LowbitError, match="unmasked attention"):
        quantize(Masked().eval())


def test_integer_matmul_weights_follow_the_overflow_rule(tmp_path):
    """8-bit weights of a Linear over tokens run in an integer MatMul: where int8 could
    overflow x86's int16 pairs they are stored uint8 + 128, as convolutions are."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, 32, 32)
    student = _student(TimmAttentionNet().eval(), x, weight_bits=8)
    result = export(student, tmp_path / "w8.onnx", example_input=x[:1], verify=x,
                    formats=("onnx",), progress=False)
    assert result.storage["qkv"] == "uint8" and result.storage["head"] == "int8"
    assert all(c.passed for c in result.contract)


def test_matmul_nbits_takes_linear_layers_over_tokens(tmp_path):
    x = torch.randn(32, 3, 32, 32)
    student = _student(_vit(), x)
    path = tmp_path / "nbits.onnx"
    result = export(student, path, example_input=x[:1], verify=x, formats=("onnx",),
                    progress=False, linear_kernel="nbits",
                    nbits=NBits(min_weights=0, accuracy_level=1))
    assert result.kernels["nbits"] == 9 and result.linear["contract"] == "exact"
    assert all(v.passed for v in result.verification.values())
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("MatMulNBits") == 9 and "MatMul" in ops  # attention stays MatMul
    assert Session(path).run(x[:4].numpy()).shape == (4, 10)


def test_hidden_state_and_attention_taps_pair_teacher_and_student():
    teacher = _vit()
    x = torch.randn(4, 3, 32, 32)
    student = _student(teacher, x)
    assert default_layers(teacher) == ("blocks.0", "blocks.1")
    s, t = tapped(student, default_layers(teacher)), tapped(teacher, default_layers(teacher))
    check_pairs(s, t, x)
    logits, hidden, attention = t(x)
    torch.testing.assert_close(logits, teacher(x))
    assert [h.shape for h in hidden] == [(4, 64, 32)] * 2
    assert [a.shape for a in attention] == [(4, 2, 64, 64)] * 2
    # the scores the softmax reads (what TernaryBERT matches), not its probabilities
    torch.testing.assert_close(attention[0].softmax(-1).sum(-1), torch.ones(4, 2, 64))
    assert not torch.allclose(attention[0].sum(-1), torch.ones(4, 2, 64))
    with pytest.raises(UsageError, match="do not pair"):
        check_pairs(s, tapped(_vit(dim=48), ("blocks.0", "blocks.1")), x)


def test_distill_with_hidden_losses_trains_and_records_them(tmp_path):
    teacher = _vit()
    torch.manual_seed(1)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    losses = {}
    for weight in (0.0, 10.0):
        student = student_for("C", teacher, weight_bits=2, act_bits=8)
        _, record = lowbit.distill(student, teacher, (x, y), kd=KDConfig(
            hidden=weight, attention=weight), config=TrainConfig(
            epochs=1, batch_size=32, optimizer="adamw", lr=1e-3), progress=False,
            out=tmp_path / f"s{weight}.pt")
        assert record["kd"]["hidden"] == weight
        losses[weight] = record["history"][0]["train_loss"]
    assert losses[10.0] > losses[0.0]  # the hidden terms are in the objective
    # the checkpoint rebuilds the student (the registered ViT, quantized the same way)
    loaded, _ = lowbit.load_model(tmp_path / "s10.0.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x[:4]), student.eval()(x[:4]))


def test_adamw_decays_weights_not_biases_or_norms():
    params = list(_vit().parameters())
    opt = _optimizer(TrainConfig(optimizer="adamw", weight_decay=0.05), params)
    assert isinstance(opt, torch.optim.AdamW)
    decayed, kept = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and kept["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in kept["params"])
    with pytest.raises(UsageError, match="optimizer"):
        TrainConfig(optimizer="adam")


def test_size_arithmetic_is_shape_not_activation():
    gm = fx.symbolic_trace(lambda q: q * q.size(-1) ** -0.5)
    modules = dict(gm.named_modules())
    roles = {n.name: _ops.role(n, modules) for n in gm.graph.nodes if n.op != "placeholder"}
    assert roles["pow_1"] == _ops.SHAPE and roles["mul"] == _ops.MUL
    assert describe(quantize(_vit())) is not None
