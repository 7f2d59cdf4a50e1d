"""lowbit.quant: model surgery, ternary/4-bit rules, checkpoints, gradients, export contract."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit import _checkpoint, models
from lowbit.data import digits
from lowbit.quant import QuantSpec, act_quants, calibrate, quant_layers, quantize


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16),
                         nn.ReLU(), nn.Linear(16, 10))


def depthwise() -> nn.Module:
    """MobileNet-style: stem, depthwise 3x3 + pointwise 1x1, ReLU6, classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


CASES = {  # name -> (float model factory, input shape)
    "resnet20": (lambda: models.create("resnet20"), (2, 3, 16, 16)),
    "digits_cnn": (lambda: models.create("digits_cnn"), (4, 1, 8, 8)),
    "mlp": (mlp, (4, 1, 8, 8)),
    "depthwise": (depthwise, (4, 3, 16, 16)),
}


def _trained_student(name: str, spec: QuantSpec, steps: int = 3) -> tuple[nn.Module, tuple]:
    """A student after a few SGD steps (ranges initialised, BN statistics moved), in eval."""
    make, shape = CASES[name]
    torch.manual_seed(0)
    student = quantize(make(), spec)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    student.train()
    for _ in range(steps):
        x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
        loss = F.cross_entropy(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.eval(), shape


@pytest.mark.parametrize("name", list(CASES))
def test_every_conv_linear_relu_is_replaced(name):
    make, shape = CASES[name]
    model = make()
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    n_acts = sum(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in model.modules())
    before = copy.deepcopy(model.state_dict())
    student = quantize(model)
    replaced = [n for n, m in model.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.ReLU, nn.ReLU6))]
    assert all(type(student.get_submodule(n)).__module__.startswith("brevitas.")
               for n in replaced)
    layers = quant_layers(student)
    assert len(layers) == n_layers
    acts = act_quants(student)
    # ResNet20: 9 blocks' second BatchNorm and 2 projection shortcuts feed residual adds;
    # the global pool feeding the classifier is requantized (all but the MLP have one)
    n_residual = {"resnet20": 12, "mlp": 0}.get(name, 1)
    assert [a.name for a in acts][0] == "input_quant"
    assert len(acts) == n_acts + 1 + n_residual
    assert (acts[0].bits, acts[0].signed) == (8, True)
    residual = [a for a in acts if a.name.endswith(".output_quant")]
    assert len(residual) == n_residual and all((a.bits, a.signed) == (8, True)
                                               for a in residual)
    assert all((a.bits, a.signed) == (4, False) for a in acts[1:] if a not in residual)
    # first conv/linear and the classifier stay 8-bit, the rest is ternary
    assert layers[0].weight_bits == 8 and layers[-1].weight_bits == 8
    assert {info.weight_bits for info in layers[1:-1]} <= {2}
    assert student(torch.randn(shape)).shape == (shape[0], 10)
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(model.get_submodule(n)).__module__.startswith("torch.") for n in replaced)


def test_depthwise_groups_and_copied_weights_are_kept():
    model = depthwise()
    student = quantize(model, weight_bits=8)
    dw = student.get_submodule("3")  # names are kept (input_quant runs first in a Sequential)
    assert dw.groups == 8 and dw.weight.shape == (8, 1, 3, 3)
    assert torch.equal(dw.weight, model[3].weight)
    fresh = quantize(model, weight_bits=8, copy_weights=False)
    assert not torch.equal(fresh.get_submodule("3").weight, model[3].weight)


def test_twn_rule_on_hand_made_weight():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -0.5, 0.9, 0.2], [1.0, -1.0, 0.1, 0.0]]))
    # row 0: delta = 0.7 * 0.425 = 0.2975 -> keeps -0.5, 0.9: alpha = 0.7
    # row 1: delta = 0.7 * 0.525 = 0.3675 -> keeps 1.0, -1.0: alpha = 1.0
    student = quantize(nn.Sequential(lin), weight_bits=2, first_bits=None, last_bits=None)
    (info,) = quant_layers(student)
    assert info.weight_bits == 2 and info.int_weight.dtype == torch.int8
    assert info.int_weight.tolist() == [[0, -1, 1, 0], [1, -1, 0, 0]]
    torch.testing.assert_close(info.scale, torch.tensor([0.7, 1.0]))


@pytest.mark.parametrize("rule", ["twn", "learned"])
def test_ternary_codes_and_per_channel_scales(rule):
    student, _ = _trained_student("resnet20", QuantSpec(scale_rule=rule))
    ternary = [i for i in quant_layers(student) if i.weight_bits == 2]
    assert len(ternary) == 20  # 18 block convs + 2 projection shortcuts
    for info in ternary:
        assert set(info.int_weight.unique().tolist()) <= {-1, 0, 1}
        assert info.scale.shape == (info.int_weight.shape[0],) and (info.scale > 0).all()
        assert info.scale.dtype == torch.float32
    assert len({round(float(s), 6) for s in ternary[0].scale}) > 1  # really per channel


@pytest.mark.parametrize("rule", ["twn", "learned"])
def test_4bit_codes(rule):
    student = quantize(models.create("digits_cnn"), weight_bits=4, scale_rule=rule)
    for info in quant_layers(student)[1:-1]:
        assert info.weight_bits == 4
        codes = info.int_weight
        assert codes.min() >= -7 and codes.max() <= 7 and codes.abs().max() == 7
        w = student.get_submodule(info.name).weight.detach()
        # both rules start at scale = max|w| / 7 per channel
        torch.testing.assert_close(info.scale, w.abs().flatten(1).amax(1) / 7)


def test_first_last_policy_and_overrides():
    model = models.create("resnet20")
    spec = QuantSpec(weight_bits=4, first_bits=None, last_bits=2,
                     overrides=(("layer2.0.shortcut.0", 8),))
    bits = {i.name: i.weight_bits for i in quant_layers(quantize(model, spec))}
    assert bits["conv1"] == 4 and bits["fc"] == 2 and bits["layer2.0.shortcut.0"] == 8
    assert bits["layer3.2.conv2"] == 4
    with pytest.raises(ValueError, match="layer9.conv1"):
        quantize(model, spec, overrides=(("layer9.conv1", 8),))
    with pytest.raises(ValueError, match="supported weight bits: 2, 4, 8"):
        quantize(model, weight_bits=3)


@pytest.mark.parametrize("layer", [nn.LSTM(8, 8), nn.PReLU(3), nn.Conv3d(3, 3, 1)])
def test_unsupported_layer_is_named(layer):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), layer)
    with pytest.raises(ValueError, match=rf"layer '1' is a torch\.nn\..*{type(layer).__name__}"):
        quantize(model)


def test_checkpoint_round_trip(tmp_path):
    student, shape = _trained_student("digits_cnn", QuantSpec(scale_rule="learned"))
    data = digits(train=False)
    path = _checkpoint.save(tmp_path / "s.pt", student, data=_checkpoint.data_info(data),
                            record={})
    loaded, ckpt = _checkpoint.load_model(path)
    assert loaded.lowbit_quant == student.lowbit_quant and ckpt["quant"]["scale_rule"] == "learned"
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))
    # the loaded student goes on training without re-initialising its activation ranges
    assert [float(a.scale) for a in act_quants(loaded)] == [float(a.scale)
                                                            for a in act_quants(student)]


@pytest.mark.parametrize("rule", ["twn", "learned"])
def test_gradients_flow_and_one_step_lowers_the_loss(rule):
    torch.manual_seed(0)
    student = quantize(models.create("digits_cnn"), scale_rule=rule)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    calibrate(student, [x])
    student.train()
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    loss0 = F.cross_entropy(student(x), y)
    loss0.backward()
    for name, p in student.named_parameters():
        if name.endswith("weight") or name.endswith("scaling_impl.value"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    loss1 = F.cross_entropy(student(x), y)
    assert loss1 < loss0
    assert any(not torch.equal(before[k], v) for k, v in student.named_parameters())


def _fake_quant(x: torch.Tensor, info) -> torch.Tensor:
    """The contract: (clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale."""
    q = torch.clamp(torch.round(x / info.scale) + info.zero_point, info.qmin, info.qmax)
    return (q - info.zero_point) * info.scale


class _Act(nn.Module):
    def __init__(self, info) -> None:
        super().__init__()
        self.info = info

    def forward(self, x):
        return _fake_quant(torch.relu(x), self.info)


def _integer_bias(out: torch.Tensor, info, s_in: torch.Tensor, bn: nn.Module | None):
    """The contract's integer bias, recomputed here: out - b + round(b / step) * step."""
    b = torch.zeros(info.scale.shape, dtype=torch.float64) if info.bias is None \
        else info.bias.double()
    s = info.scale.double()
    if bn is not None:
        f = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        b, s = (b - bn.running_mean.double()) * f + bn.bias.double(), s * f
    dead = info.int_weight.flatten(1).eq(0).all(1)
    step = (s_in.float() * torch.where(dead, 1.0, s.abs()).float()).double()
    b = b.float().double()
    delta = (torch.round(b / step) * step - b).float()
    return out + delta.view((1, -1) + (1,) * (out.dim() - 2))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(scale_rule="learned"),
                                  QuantSpec(weight_bits=4, first_bits=None)])
def test_export_contract_rebuilds_the_student(name, spec):
    """Plain torch from quant_layers/act_quants equals the student's eval forward."""
    student, shape = _trained_student(name, spec)
    make, _ = CASES[name]
    ref = make().eval()
    for m_name, m in student.named_modules():  # float BatchNorm: copied as is
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            ref.get_submodule(m_name).load_state_dict(m.state_dict(), strict=False)
    with torch.no_grad():
        for info in quant_layers(student):
            layer = ref.get_submodule(info.name)
            view = (-1,) + (1,) * (info.int_weight.dim() - 1)
            layer.weight.copy_(info.int_weight.float() * info.scale.view(view))
            if info.bias is not None:
                layer.bias.copy_(info.bias)
    acts = act_quants(student)
    by_name = {a.name: a for a in acts}
    for info in quant_layers(student):
        if info.bias_input is None:
            continue
        # in these models a layer's BatchNorm, if any, is the next module registered
        mods = list(ref.named_modules())
        after = next(m for i, (n, _) in enumerate(mods) for _, m in mods[i + 1:i + 2]
                     if n == info.name) if info.name != mods[-1][0] else None
        bn = after if isinstance(after, nn.modules.batchnorm._BatchNorm) else None
        owner = bn if bn is not None else ref.get_submodule(info.name)
        owner.register_forward_hook(  # first: a residual quantizer sees the rounded bias
            lambda m, a, out, info=info, bn=bn:
            _integer_bias(out, info, by_name[info.bias_input].scale, bn))
    for info in acts[1:]:
        parent, _, child = info.name.rpartition(".")
        if child == "output_quant":  # quantizes its parent's output (signed, no ReLU)
            ref.get_submodule(parent).register_forward_hook(
                lambda m, a, out, info=info: _fake_quant(out, info))
        else:
            setattr(ref.get_submodule(parent) if parent else ref, child, _Act(info))
    x = torch.randn(shape) * 2
    with torch.no_grad():
        got = student(x)
        want = ref(_fake_quant(x, acts[0]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_calibrate_sets_ranges_from_data_and_leaves_batchnorm():
    student = quantize(models.create("digits_cnn"))
    bn_before = copy.deepcopy(student.get_submodule("features.1").state_dict())
    batches = [torch.randn(16, 1, 8, 8), 3 * torch.randn(16, 1, 8, 8)]
    calibrate(student, batches)
    mean_max = sum(float(b.abs().max()) for b in batches) / 2
    input_info = act_quants(student)[0]
    torch.testing.assert_close(float(input_info.scale), mean_max / 127)
    bn_after = student.get_submodule("features.1").state_dict()
    assert all(torch.equal(v, bn_after[k]) for k, v in bn_before.items())
    # training afterwards keeps the calibrated ranges (no re-initialisation)
    student.train()
    student(torch.randn(16, 1, 8, 8) * 100)
    torch.testing.assert_close(float(act_quants(student)[0].scale), mean_max / 127)


def test_bf16_autocast_channels_last_step():
    student = quantize(models.create("resnet20")).to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(student(x).float(), torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in student.parameters())


def test_integer_contract_hand_computed():
    """lowbit._intmath against values worked out by hand from the formulas."""
    from lowbit import _intmath as im

    assert im.code_range(4, signed=False) == (0, 15)
    assert im.code_range(8, signed=True) == (-128, 127)
    assert im.weight_range(2) == (-1, 1) and im.weight_range(4) == (-7, 7)
    with pytest.raises(ValueError):
        im.code_range(1, signed=True)
    # round half to even, then clamp: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 100 -> 15, -3 -> 0
    codes = im.quantize_codes(np.array([0.5, 1.5, 2.5, 100.0, -3.0]), 1.0, 0, 15)
    assert codes.tolist() == [0.0, 2.0, 2.0, 15.0, 0.0]
    # BN gamma 2, beta 1, mean 3, var 3, eps 1: f = 2 / sqrt(4) = 1; bias 5 -> (5 - 3) * 1 + 1
    f, b = im.fold_batchnorm(np.array([5.0]), np.array([2.0]), np.array([1.0]),
                             np.array([3.0]), np.array([3.0]), 1.0)
    assert f.tolist() == [1.0] and b.tolist() == [3.0]
    # int32 bias: step 0.5 * 0.25 = 0.125; 0.3 / 0.125 = 2.4 -> 2; huge values clamp
    step = im.bias_step(0.5, np.array([0.25, 0.25]))
    assert step.dtype == np.float32 and step.tolist() == [0.125, 0.125]
    assert im.bias_codes(np.array([0.3, 1e12]), step).tolist() == [2, 2 ** 31 - 1]
    np.testing.assert_allclose(im.bias_correction(np.array([0.3]), step[:1]), [0.25 - 0.3])


def test_old_specs_load_without_requantizers():
    """A spec from before graph mode (no requant_bits) rebuilds the student it described."""
    old = {k: v for k, v in QuantSpec().to_dict().items() if k != "requant_bits"}
    spec = QuantSpec.from_dict(old)
    assert spec.requant_bits is None and spec.residual_bits == 8
    names = {a.name for a in act_quants(quantize(models.create("resnet20"), spec))}
    assert "pool.output_quant" not in names and "layer1.0.bn2.output_quant" in names
    assert "pool.output_quant" in {a.name for a in act_quants(quantize(models.create("resnet20")))}


def _relu6_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def test_relu6_clip_survives_a_checkpoint(tmp_path):
    """Brevitas rebuilds quantizers when a state dict is loaded: the clip must come back too,
    or a loaded ReLU6 student (and the file exported from it) computes without its cap."""
    import lowbit
    from lowbit.quant._brevitas import act_ranges

    torch.manual_seed(0)
    student = quantize(_relu6_net(), weight_bits=4).eval()
    clipped = [r for r in act_ranges(student) if r.max_range is not None]
    assert [r.max_range for r in clipped] == [6.0]
    with torch.no_grad():
        clipped[0].value.fill_(10.0)  # a learned range beyond the clip: the clip decides
    x = torch.randn(16, 3, 8, 8) * 4
    want = student(x)
    lowbit.save(student, tmp_path / "s.pt")
    loaded = lowbit.load(tmp_path / "s.pt", model=_relu6_net())
    assert [r.max_range for r in act_ranges(loaded) if r.max_range is not None] == [6.0]
    assert torch.equal(loaded(x), want)


def test_one_calibration_protocol_two_meanings_of_max_named_apart():
    """``calibrate`` runs every method registered by name: "mean-max" (the mean over batches
    of the batch max |x|, how a range initialises itself) and "max" (the max over all)."""
    from lowbit.errors import UsageError
    from lowbit.quant import CALIBRATORS

    assert list(CALIBRATORS) == ["mean-max", "max", "percentile", "mse"]
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Flatten(), nn.Linear(2 * 4, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    batches = [torch.full((1, 1, 2, 2), 1.0), torch.full((1, 1, 2, 2), 3.0)]
    peaks = {}
    for method in ("mean-max", "max"):
        student = calibrate(quantize(model, weight_bits=8), batches, method)
        peaks[method] = float(act_quants(student)[0].scale) * 127  # the input quantizer's range
    assert peaks["mean-max"] == pytest.approx(2.0) and peaks["max"] == pytest.approx(3.0)
    with pytest.raises(UsageError, match="calibration method must be one of mean-max, max"):
        calibrate(quantize(model), batches, "minmax")
