"""The fused (torch.compile) fake-quantization kernels compute what the eager ones compute."""

from __future__ import annotations

import pytest
import torch

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
