"""The fused (torch.compile) fake-quantization kernels compute what the eager ones compute."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit import _intmath
from lowbit.quant import _kernels

RANGES = [(-128.0, 127.0), (0.0, 15.0), (-8.0, 7.0)]


def _inputs(seed: int, dtype: torch.dtype, qmin: float, qmax: float):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand((), generator=g) * 0.3 + 1e-3
    codes = torch.randint(int(qmin) - 4, int(qmax) + 5, (2048,), generator=g).float()
    # random values, exact ties (k + 0.5) * s and exact codes k * s, in and out of range
    x = torch.cat([torch.randn(4096, generator=g) * scale * qmax / 2, (codes + 0.5) * scale,
                   codes * scale]).to(dtype)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    return x, grad, scale, torch.tensor(qmin), torch.tensor(qmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qrange", RANGES)
def test_compiled_kernels_match_eager_bit_for_bit(dtype, qrange):
    for seed in range(3):
        x, grad, s, qmin, qmax = _inputs(seed, dtype, *qrange)
        y = _kernels.fused("forward")(x, s, qmin, qmax)
        assert y.dtype == dtype
        assert torch.equal(y, _kernels.fake_quant(x, s, qmin, qmax))
        gx, gs = _kernels.fused("backward")(grad, x, s, qmin, qmax)
        ex, es = _kernels.fake_quant_backward(grad, x, s, qmin, qmax)
        assert gx.dtype == dtype and torch.equal(gx, ex)
        # dy/ds is a sum over the tensor: only the summation order may differ, so the
        # tolerance scales with the sum of |terms| (each at most |grad| * max|code|)
        bound = grad.float().abs().sum() * max(abs(qrange[0]), qrange[1])
        assert abs(float(gs) - float(es)) <= 1e-6 * float(bound)


def test_forward_is_the_quantizer_formula():
    """Hand-computed: s = 0.5, 4-bit unsigned; ties round half to even; clipped at 0 and 15."""
    x = torch.tensor([-1.0, 0.24, 0.25, 0.75, 1.3, 7.5, 9.0])
    y = _kernels.fused("forward")(x, torch.tensor(0.5), torch.tensor(0.0), torch.tensor(15.0))
    assert y.tolist() == [0.0, 0.0, 0.0, 1.0, 1.5, 7.5, 7.5]


def test_lsq_gradients():
    """dy/dx passes inside the range only; dy/ds is round(t) - t inside, the clipped code out."""
    x = torch.tensor([-1.0, 0.3, 0.8, 9.0])
    s, qmin, qmax = torch.tensor(0.5), torch.tensor(0.0), torch.tensor(15.0)
    gx, gs = _kernels.fused("backward")(torch.ones(4), x, s, qmin, qmax)
    assert gx.tolist() == [0.0, 1.0, 1.0, 0.0]
    # t = -2, 0.6, 1.6, 18 -> 0 (clipped), 1 - 0.6, 2 - 1.6, 15 (clipped)
    torch.testing.assert_close(gs, torch.tensor(0.0 + 0.4 + 0.4 + 15.0))


def _relu_inputs(seed: int, dtype: torch.dtype):
    """Unsigned 4-bit inputs with exact zeros (+0 and -0), negatives, ties and clipping."""
    x, grad, s, qmin, qmax = _inputs(seed, dtype, -15.0, 15.0)
    x = torch.cat([x, torch.zeros(64, dtype=dtype), -torch.zeros(64, dtype=dtype)])
    grad = torch.cat([grad, torch.randn(128).to(dtype)])
    return x, grad, s, torch.tensor(0.0), qmax


def _relu_then_quant(kernels, grad, x, s, qmin, qmax):
    """The unfused path: ReLU (autograd) then the quantizer's kernels."""
    xr = x.clone().requires_grad_()
    r = torch.relu(xr)
    y = kernels["forward"](r.detach(), s, qmin, qmax)
    gr, gs = kernels["backward"](grad, r.detach(), s, qmin, qmax)
    r.backward(gr)
    return y, xr.grad, gs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_relu_is_relu_then_quantizer(dtype, compiled):
    """relu=True equals ReLU then the quantizer bit for bit: output, dy/dx (0 at x == 0, as
    ReLU's backward, where the quantizer alone passes it) and dy/ds."""
    kernels = {n: _kernels.fused(n) for n in ("forward", "backward")} if compiled \
        else _kernels._EAGER
    for seed in range(3):
        x, grad, s, qmin, qmax = _relu_inputs(seed, dtype)
        y0, gx0, gs0 = _relu_then_quant(kernels, grad, x, s, qmin, qmax)
        y = kernels["forward"](x, s, qmin, qmax, True)
        gx, gs = kernels["backward"](grad, x, s, qmin, qmax, True)
        assert y.dtype == gx.dtype == dtype
        assert torch.equal(y, y0) and torch.equal(gx, gx0)
        assert gx[x == 0].eq(0).all() and not gx0.eq(0).all()
        assert torch.equal(gs, gs0) if not compiled else torch.allclose(gs, gs0, rtol=1e-5)


def _unfused(student: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``student`` whose QuantReLUs run Brevitas' own ReLU-then-quantizer proxy."""
    from brevitas.proxy.runtime_quant import FusedActivationQuantProxy

    from lowbit.quant._brevitas import _ReLUQuant

    old = copy.deepcopy(student)
    for m in old.modules():
        p = getattr(m, "fused_activation_quant_proxy", None)
        if isinstance(p, _ReLUQuant):
            m.fused_activation_quant_proxy = FusedActivationQuantProxy(p.activation_impl,
                                                                       p.tensor_quant)
    return old


@pytest.mark.parametrize("fuse_min", [None, 0])
def test_student_trains_identically_with_fused_relu(monkeypatch, fuse_min):
    """A ternary student trained a few SGD steps (fp32: range-init steps, then trained ranges)
    with the fused ReLU quantizers ends with the parameters and losses of the unfused one,
    with the eager kernels (small tensors: the ReLU stays a module) and with the compiled ones
    (``fuse_min`` = 0: the ReLU runs inside the quantizer's kernel)."""
    from lowbit import models
    from lowbit.quant import quantize
    from lowbit.quant._brevitas import _ReLUQuant, act_ranges

    if fuse_min is not None:
        monkeypatch.setattr(_kernels, "FUSE_MIN_ELEMENTS", fuse_min)
    torch.manual_seed(0)
    new = quantize(models.create("digits_cnn", width=4), weight_bits=2, act_bits=4)
    assert sum(isinstance(m, _ReLUQuant) for m in new.modules()) == 3
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
               for _ in range(6)]
    for r in act_ranges(new):
        r.init_steps = 3  # 3 steps initialise the ranges from batch maxima, 3 train them
    old = _unfused(new)
    assert list(old.state_dict()) == list(new.state_dict())
    runs = []
    for model in (old, new):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                              weight_decay=5e-4)
        losses = []
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs.append((losses, model.state_dict()))
    (losses0, sd0), (losses1, sd1) = runs
    assert losses0 == losses1
    assert all(int(r.seen) == 3 for r in act_ranges(new))
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    old.eval(), new.eval()
    assert torch.equal(old(batches[0][0]), new(batches[0][0]))


def test_fused_relu_keeps_brevitas_structure():
    """The fused pair sits inside Brevitas' own proxy (whose exact type Brevitas' exporters
    dispatch on), keeps the state-dict keys and survives load_state_dict (which rebuilds it)."""
    from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector

    from lowbit import models
    from lowbit.quant import quantize
    from lowbit.quant._brevitas import _ReLUQuant

    student = quantize(models.create("digits_cnn", width=4), weight_bits=2, act_bits=4)
    keys = list(_unfused(student).state_dict())
    student.load_state_dict(student.state_dict())
    relus = [m for m in student.modules() if type(m).__name__ == "QuantReLU"]
    assert len(relus) == 3 and list(student.state_dict()) == keys
    for m in relus:
        assert type(m.act_quant) is ActQuantProxyFromInjector
        assert isinstance(m.act_quant.fused_activation_quant_proxy, _ReLUQuant)


def test_no_cxx_compiler_falls_back_to_eager_once(monkeypatch, caplog):
    """Where inductor cannot build (no C++ compiler), the first call logs one line and runs
    the eager kernel, and every later call runs the eager kernel without trying again."""

    def forward(*args):  # a function dynamo has not compiled yet in this process
        return _kernels.fake_quant(*args)

    monkeypatch.setattr(_kernels, "_EAGER", {**_kernels._EAGER, "forward": forward})
    monkeypatch.setattr(_kernels, "_fused", {})
    monkeypatch.setattr(_kernels, "_why_eager", {})
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    x, _, s, qmin, qmax = _inputs(0, torch.float32, -8.0, 7.0)
    with caplog.at_level("WARNING", logger="lowbit"):
        for y in (x, x * 2):
            assert torch.equal(_kernels.fused("forward")(y, s, qmin, qmax),
                               _kernels.fake_quant(y, s, qmin, qmax))
    assert _kernels.fused("forward") is forward
    warnings = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "InvalidCxxCompiler" in warnings[0]
    # and it is inspectable: which kernel runs, and why
    status = _kernels.kernel_status()
    assert status["forward"].startswith("eager (") and "InvalidCxxCompiler" in status["forward"]
    assert status["backward"] == "not built yet"


@settings(max_examples=200, deadline=None)
@given(x=arrays(np.float32, st.integers(1, 64), elements=st.floats(-1e4, 1e4, width=32)),
       scale=st.floats(2.0 ** -13, 2.0 ** 7, width=32),
       qrange=st.sampled_from([_intmath.code_range(b, s) for b in (2, 4, 8)
                               for s in (False, True)]))
def test_fake_quant_is_the_numpy_reference(x, scale, qrange):
    """The student's kernel (float32 division, round half to even, clamp) against the integer
    contract's numpy quantizer, value for value: codes times scale."""
    qmin, qmax = qrange
    y = _kernels.fake_quant(torch.from_numpy(x), torch.tensor(scale, dtype=torch.float32),
                            float(qmin), float(qmax))
    want = _intmath.quantize_codes(x, np.float32(scale), qmin, qmax) * np.float32(scale)
    np.testing.assert_array_equal(y.numpy(), want)
