"""The one Brevitas adapter: quantizers, layer constructors and read-back of trained values.

Everything lowbit knows about Brevitas' injector style lives here; the rest of the package
talks in ``QuantSpec`` terms. Quantizers (per-output-channel weights, per-tensor activations):

- ternary "twn" (Li, Zhang & Liu 2016, "Ternary Weight Networks"), exactly, per output
  channel c: delta_c = 0.7 * mean_i |w_ci|, alpha_c = mean of |w_ci| over |w_ci| > delta_c,
  q_ci = alpha_c * sign(w_ci) * [|w_ci| > delta_c]. Brevitas' own ``TernaryQuant`` ties the
  threshold to a fixed fraction of the scale, so TWN is a custom ``tensor_quant`` module
  (:class:`TWNTernaryQuant`) plugged into Brevitas' weight solver; delta and alpha are
  recomputed from the float weights at every call, gradients pass straight through to w.
- ternary/int "learned": a learned per-channel range r_c (PACT/LSQ style; scale_c =
  r_c / qmax with qmax = 1 for ternary, 7 for 4-bit, 127 for 8-bit), codes
  clamp(round(w / scale), -qmax, qmax), i.e. a ternary threshold of scale_c / 2. Initialised
  when the layer is built: r_c = alpha_c of TWN for ternary, max |w_c| for 4/8 bits.
- 4/8-bit under "twn": Brevitas' per-channel abs-max statistics, scale_c = max|w_c| / qmax.
- activations (unsigned after ReLU, and the signed 8-bit network input): a learned
  per-tensor range r (scale = r / qmax, qmax = 2^b - 1 unsigned, 127 signed; signed codes
  span [-128, 127]) whose first ``ACT_INIT_STEPS`` training calls set r to the running mean
  of the batch max |x|. This replaces Brevitas' default percentile statistics (a
  ``kthvalue`` per call over its first 300 steps, most of a CPU QAT step's time) by an
  ``amax``, with the same kind of init.

Rounding everywhere is ``torch.round`` (round half to even); zero points are 0.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from brevitas.core.bit_width import BitWidthConst
from brevitas.core.function_wrapper import TensorClamp
from brevitas.inject import value
from brevitas.inject.enum import RestrictValueType, ScalingPerOutputType
from brevitas.nn import QuantConv1d, QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector, FusedActivationQuantProxy
from brevitas.quant.base import NarrowIntQuant, UintQuant
from brevitas.quant.scaled_int import Int8WeightPerChannelFloat
from brevitas.quant.solver import ActQuantSolver, WeightQuantSolver

from .. import _intmath
from . import _kernels

# Training calls whose batch max |x| initialises an activation range (Brevitas' default
# percentile init uses 300; the running mean of the max settles within a few tens).
ACT_INIT_STEPS = 50
TWN_DELTA = 0.7  # TWN's threshold factor: delta = 0.7 * E|w| (Li et al. 2016, eq. 10)
_MIN_SCALE = 1e-8  # keeps a dead channel's or an unused activation's scale positive

# ------------------------------------------------------------------ quantizer building blocks


def _out_channel_view(w: torch.Tensor) -> tuple[int, ...]:
    """Broadcast shape of a per-output-channel vector against a weight: [C, 1, 1, ...]."""
    return (w.shape[0],) + (1,) * (w.dim() - 1)


def twn_ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN codes in {-1, 0, 1} and alpha [C] of a weight with output channels on dim 0."""
    a = w.detach().abs().flatten(1)  # [C, K]
    delta = TWN_DELTA * a.mean(1, keepdim=True)  # [C, 1]
    mask = a > delta
    alpha = (a * mask).sum(1) / mask.sum(1).clamp_min(1)  # [C]
    codes = torch.sign(w.detach()) * mask.view_as(w)
    return codes, alpha.clamp_min(_MIN_SCALE)


class TWNTernaryQuant(nn.Module):
    """Brevitas ``tensor_quant``: w -> (alpha * TWN codes, alpha [C,1,..], zero point 0, 2 bits).

    The output equals the quantized weight exactly in value; its gradient is the identity
    (straight-through estimator, as in TWN), so the float weights keep learning.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bit_width = BitWidthConst(2)
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    def forward(self, w: torch.Tensor):
        with torch.no_grad():
            codes, alpha = twn_ternarize(w)
            scale = alpha.view(_out_channel_view(w))
            q = codes * scale
        return q + (w - w.detach()), scale, self.zero, self.bit_width()


class LearnedRange(nn.Module):
    """Brevitas ``scaling_impl``: a learned clipping range r, returned as scale = r / qmax.

    The first ``init_steps`` training calls (and every call while ``calibrating``) set r to
    the running mean of max |x| over those calls (averaged over ranks under DDP); afterwards
    r is a plain parameter trained by back-propagation (LSQ gradients, see ``_FakeQuant``).
    """

    def __init__(self, range_shape: tuple[int, ...], init_steps: int,
                 max_range: float | None = None) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.ones(range_shape))
        self.init_steps = init_steps
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # init calls so far
        self.calibrating = False
        # an activation's clip (ReLU6: 6) caps the range; injected (not set afterwards), since
        # Brevitas rebuilds its quantizers from the injector when a state dict is loaded
        self.max_range = max_range

    def forward(self, x: torch.Tensor, threshold: torch.Tensor,
                relu: bool = False) -> torch.Tensor:
        """``relu``: ``x`` is a ReLU's input, the range is of its output, max(x, 0)."""
        if self.calibrating or (self.training and int(self.seen) < self.init_steps):
            with torch.no_grad():
                n = int(self.seen)
                if relu:  # max |max(x, 0)| = max(max x, 0)
                    batch_max = x.detach().amax().clamp_min(0).float()
                else:
                    lo, hi = torch.aminmax(x.detach())
                    batch_max = torch.maximum(hi, -lo).float()
                if dist.is_available() and dist.is_initialized():
                    # DDP syncs gradients only: take the global batch's max so replicas agree
                    dist.all_reduce(batch_max, dist.ReduceOp.MAX)
                self.value.mul_(n / (n + 1)).add_(batch_max / (n + 1))
                self.seen += 1
        return self.range_scale(threshold)

    def range_scale(self, threshold: torch.Tensor) -> torch.Tensor:
        """scale = r / qmax, the range kept positive and under the clip (``max_range``)."""
        return self.value.clamp(_MIN_SCALE, self.max_range) / threshold


class _FakeQuant(torch.autograd.Function):
    """y = clamp(round(x / s), qmin, qmax) * s with LSQ gradients (``_kernels``).

    One fused function instead of Brevitas' chain of ~40 elementwise passes per activation
    and step; the numbers equal Brevitas' RescalingIntQuant.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: torch.Tensor,
                qmax: torch.Tensor, relu: bool):
        ctx.save_for_backward(x, scale, qmin, qmax)
        ctx.relu = relu
        return _kernels.kernel("forward", x.numel())(x, scale, qmin, qmax, relu)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale, qmin, qmax = ctx.saved_tensors
        backward = _kernels.kernel("backward", x.numel())
        grad_x, grad_s = backward(grad, x, scale, qmin, qmax, ctx.relu)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_s.reshape(scale.shape) if ctx.needs_input_grad[1] else None,
                None, None, None)


class FakeQuantAct(nn.Module):
    """Brevitas activation ``tensor_quant``: x -> (fake-quantized x, scale, 0, bit width).

    Signed codes span [-2^(b-1), 2^(b-1) - 1], unsigned [0, 2^b - 1]; the scale is the
    learned range over qmax (2^(b-1) - 1 signed, 2^b - 1 unsigned), as in Brevitas.
    """

    def __init__(self, scaling_impl: nn.Module, bit_width_impl: nn.Module, signed: bool) -> None:
        super().__init__()
        self.scaling_impl = scaling_impl
        self.msb_clamp_bit_width_impl = bit_width_impl
        self.qmin, self.qmax = map(float, _intmath.code_range(int(bit_width_impl()), signed))
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        self.register_buffer("threshold", torch.tensor(self.qmax), persistent=False)
        self.register_buffer("code_min", torch.tensor(self.qmin), persistent=False)

    def forward(self, x: torch.Tensor, relu: bool = False):
        """``relu``: quantize max(x, 0) in the same pass (see :class:`_ReLUQuant`)."""
        scale = self.scaling_impl(x, self.threshold, relu)
        y = _FakeQuant.apply(x, scale, self.code_min, self.threshold, relu)
        return y, scale, self.zero, self.msb_clamp_bit_width_impl()


class _ReLUQuant(FusedActivationQuantProxy):
    """QuantReLU's ReLU + quantizer, the ReLU fused into the quantizer's kernel in training.

    Same numbers as ReLU then quantizer, forward and backward (gradient 0 at x == 0, as
    ReLU's; the range initialises from the ReLU's output max), two passes over the activation
    fewer per step where the compiled kernels run. In eval mode, during calibration and with
    the eager kernels the ReLU runs as a module, so the calibration hooks on the range see the
    ReLU's output, as before.
    """

    def forward(self, x: torch.Tensor):
        tq = self.tensor_quant
        if self.training and not tq.scaling_impl.calibrating and _kernels.compiling(x.numel()):
            return tq(x, relu=True)
        return tq(self.activation_impl(x))


def _fuse_relu(proxy: ActQuantProxyFromInjector, _incompatible_keys=None) -> None:
    """Run a QuantReLU's ReLU + quantizer as :class:`_ReLUQuant`; also a load_state_dict
    post-hook, as Brevitas rebuilds the pair on load. The proxy keeps its type (Brevitas'
    exporters dispatch on it) and the state-dict keys are unchanged."""
    p = proxy.fused_activation_quant_proxy
    if type(p) is FusedActivationQuantProxy and type(p.activation_impl) is nn.ReLU \
            and isinstance(p.tensor_quant, FakeQuantAct):
        proxy.fused_activation_quant_proxy = _ReLUQuant(p.activation_impl, p.tensor_quant)


class _TWNWeight(NarrowIntQuant, WeightQuantSolver):
    tensor_quant = TWNTernaryQuant
    bit_width = 2
    scaling_per_output_type = ScalingPerOutputType.CHANNEL


class _StatsWeight(Int8WeightPerChannelFloat):
    """Per-channel abs-max scale, narrow symmetric; the bit width is set per layer."""


class _LearnedWeight(NarrowIntQuant, WeightQuantSolver):
    scaling_impl = LearnedRange
    scaling_per_output_type = ScalingPerOutputType.CHANNEL
    restrict_scaling_type = RestrictValueType.FP
    init_steps = 0  # initialised from the weights by ``quant_layer``
    tensor_clamp_impl = TensorClamp  # LSQ: clipped weights pass their gradient to the range

    @value
    def range_shape(scaling_per_output_channel_shape):
        return scaling_per_output_channel_shape


class _UnsignedAct(UintQuant, ActQuantSolver):
    tensor_quant = FakeQuantAct
    scaling_impl = LearnedRange
    scaling_per_output_type = ScalingPerOutputType.TENSOR
    restrict_scaling_type = RestrictValueType.FP
    range_shape = ()
    init_steps = ACT_INIT_STEPS
    max_range = None


class _SignedAct(_UnsignedAct):
    signed = True  # Brevitas' IntQuant differs from UintQuant by this alone


# ------------------------------------------------------------------------ layer constructors


def _weight_quant(bits: int, scale_rule: str):
    if scale_rule == "learned":
        return _LearnedWeight.let(bit_width=bits)
    if bits == 2:
        return _TWNWeight
    return _StatsWeight.let(bit_width=bits)


_QUANT_TWINS = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}


def quant_layer(layer: nn.Conv1d | nn.Conv2d | nn.Linear, bits: int, scale_rule: str,
                copy_weights: bool) -> QuantConv1d | QuantConv2d | QuantLinear:
    """A Brevitas twin of a Conv1d/Conv2d/Linear with ``bits``-bit per-channel weights."""
    wq = _weight_quant(bits, scale_rule)
    bias = layer.bias is not None
    if type(layer) in _QUANT_TWINS:
        new = _QUANT_TWINS[type(layer)](
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, layer.groups, bias=bias,
            padding_mode=layer.padding_mode, weight_quant=wq)
    else:
        new = QuantLinear(layer.in_features, layer.out_features, bias=bias, weight_quant=wq)
    new.to(layer.weight.device, layer.weight.dtype)
    if copy_weights:
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            if bias:
                new.bias.copy_(layer.bias)
    if scale_rule == "learned":
        init_weight_range(new)
    return new


def init_weight_range(layer: QuantConv1d | QuantConv2d | QuantLinear) -> None:
    """Set a learned per-channel weight range from the current weights (see module doc)."""
    impl = layer.weight_quant.tensor_quant.scaling_impl
    w = layer.weight.detach()
    bits = int(layer.weight_quant.tensor_quant.msb_clamp_bit_width_impl())
    r = twn_ternarize(w)[1] if bits == 2 else w.abs().flatten(1).amax(1)
    with torch.no_grad():
        impl.value.copy_(r.clamp_min(_MIN_SCALE).view_as(impl.value))


def quant_relu(bits: int, clip: float | None = None) -> QuantReLU:
    """ReLU followed by unsigned ``bits``-bit quantization with a learned per-tensor range;
    ``clip`` (ReLU6: 6) caps the range, so the quantizer's own clamp is the activation's clip:
    clamp(round(min(x, c) / s), 0, qmax) = clamp(round(x / s), 0, qmax) when qmax * s <= c."""
    q = QuantReLU(act_quant=_UnsignedAct.let(bit_width=bits, max_range=clip))
    _fuse_relu(q.act_quant)
    q.act_quant.register_load_state_dict_post_hook(_fuse_relu)
    return q


def act_quant(bits: int, signed: bool) -> QuantIdentity:
    """``bits``-bit quantization with a learned per-tensor range (signed codes for the network
    input, residual adds and requantization, unsigned for outputs known to be >= 0)."""
    return QuantIdentity(act_quant=(_SignedAct if signed else _UnsignedAct).let(bit_width=bits))


# -------------------------------------------------------------------- integer bias (deploy)


class IntegerBias(nn.Module):
    """In eval mode, the bias an integer kernel adds: a node of its own in the student graph.

    A conv/linear that consumes an activation quantizer's codes runs in onnxruntime as an
    integer kernel (QLinearConv, QGemm): its bias, with the following BatchNorm folded in, is
    stored as int32 codes at scale s_in * s_w[c] (lowbit's ``QuantizeBias`` rewrite). Placed
    after the layer (or after its BatchNorm), this module adds round(b / step) * step - b per
    channel to the eval output (``lowbit._intmath.bias_correction``), so evaluation, the
    export gate and the deployed model compute the same numbers; training keeps the float
    bias (the difference is under half an accumulator step). ``bake_integer_bias`` moves the
    correction into the bias and turns the module into the identity.

    The quantizer, layer and BatchNorm it reads are the student's own modules, referenced, not
    registered, so their state appears once in the state dict.
    """

    def __init__(self, act_name: str, act: nn.Module, layer: nn.Module,
                 bn: nn.Module | None) -> None:
        super().__init__()
        self.act_name = act_name  # the quantizer whose codes the layer consumes
        object.__setattr__(self, "parts", (act, layer, bn))
        self.baked = False

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        if self.training or self.baked:
            return out
        shape = [1] * out.dim()
        shape[-1 if isinstance(self.parts[1], nn.Linear) else 1] = -1  # a Linear's: the last
        return out + self.correction().to(out.device, out.dtype).view(shape)

    @torch.no_grad()
    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(float64 bias with BatchNorm folded in, float32 integer step s_in * s_w per channel),
        as the exporter stores them: folding in float64, stored values in float32."""
        act, layer, bn = self.parts
        codes, s_w, _ = weight_codes(layer)
        bias = None if layer.bias is None else layer.bias.double().cpu().numpy()
        s = s_w.double().cpu().numpy()
        b = np.zeros_like(s) if bias is None else bias
        if bn is not None:
            f, b = _intmath.fold_batchnorm(
                bias, *(None if t is None else t.double().cpu().numpy() for t in
                        (bn.weight, bn.bias, bn.running_mean, bn.running_var)), bn.eps)
            s = s * f
        s = _intmath.stored_scale(codes.cpu().numpy(), s)  # as the file stores it
        step = _intmath.bias_step(act_scale(act).cpu().numpy(), s)
        return b.astype(np.float32).astype(np.float64), step

    def correction(self) -> torch.Tensor:
        """round(b / step) * step - b per output channel (float64)."""
        return torch.from_numpy(_intmath.bias_correction(*self.folded()))


def bake_integer_bias(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose :class:`IntegerBias` nodes are the identity: each correction is
    added to the bias of the layer's BatchNorm (beta) or of the layer itself."""
    baked = copy.deepcopy(model).eval()
    for m in baked.modules():
        if isinstance(m, IntegerBias) and not m.baked:
            _, layer, bn = m.parts
            owner = bn if bn is not None else layer
            delta = m.correction().float()
            with torch.no_grad():
                if owner.bias is None:
                    owner.bias = nn.Parameter(delta)
                else:
                    owner.bias.add_(delta.to(owner.bias.dtype))
            m.baked = True
    return baked


# ------------------------------------------------------------------------------- read-back


def is_quant_layer(m: nn.Module) -> bool:
    return isinstance(m, (QuantConv1d, QuantConv2d, QuantLinear))


def is_act_quant(m: nn.Module) -> bool:
    return isinstance(m, (QuantReLU, QuantIdentity))


@torch.no_grad()
def weight_codes(layer: QuantConv1d | QuantConv2d | QuantLinear,
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Eval-mode (int8 codes shaped like the weight, float32 scale [C], bits) of a layer."""
    was_training = layer.training
    layer.eval()
    try:
        qt = layer.quant_weight()
        codes = torch.round(qt.value / qt.scale).to(torch.int8)
        scale = qt.scale.detach().float().reshape(-1).expand(layer.weight.shape[0]).clone()
        return codes, scale, int(qt.bit_width)
    finally:
        layer.train(was_training)


def _act_tensor_quant(m: QuantReLU | QuantIdentity) -> FakeQuantAct:
    return m.act_quant.fused_activation_quant_proxy.tensor_quant


@torch.no_grad()
def act_scale(m: QuantReLU | QuantIdentity) -> torch.Tensor:
    """Float32 scalar scale of an activation quantizer, read without running it (running it
    would feed a dummy input to a range that is still being calibrated)."""
    tq = _act_tensor_quant(m)
    return tq.scaling_impl.range_scale(tq.threshold).float().reshape(())


@torch.no_grad()
def act_params(m: QuantReLU | QuantIdentity) -> tuple[int, bool, torch.Tensor, torch.Tensor]:
    """Eval-mode (bits, signed, float32 scalar scale, zero point 0) of an activation quantizer."""
    tq = _act_tensor_quant(m)
    bits = int(tq.msb_clamp_bit_width_impl())
    return bits, tq.qmin < 0, act_scale(m), torch.zeros(())


def act_ranges(model: nn.Module) -> list[LearnedRange]:
    """The learned activation ranges of a student (what ``calibrate`` initialises)."""
    return [_act_tensor_quant(m).scaling_impl for m in model.modules() if is_act_quant(m)]
