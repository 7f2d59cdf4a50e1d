"""Attention written out as the layers lowbit quantizes one by one.

``nn.MultiheadAttention`` keeps its projections in one packed parameter and runs a fused
kernel, and ``F.scaled_dot_product_attention`` is one call: neither has Linear layers or a
softmax to put quantizers around. :func:`split_attention` replaces them in a traced model by
the same computation written as timm and nanoGPT write it (q/k/v ``nn.Linear`` layers with
the module's weights, ``(q * d^-0.5) @ k^T``, softmax, ``@ v``, the output projection), which
lowbit's tracer follows. Module paths stay: ``attn.q_proj``, ``attn.k_proj``,
``attn.v_proj``, ``attn.out_proj``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import QuantizeError


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            dropout: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d)) v over [..., tokens, d] and the attention map."""
    attn = dropout(((q * q.size(-1) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1))
    return attn @ v, attn


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` (no masks, no bias_k/bias_v, no zero attention) with its
    packed projections as four Linear layers holding the same weights."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise QuantizeError("nn.MultiheadAttention with add_bias_kv or add_zero_attn: "
                                "lowbit splits plain multi-head attention only")
        e, bias = mha.embed_dim, mha.in_proj_bias is not None
        self.heads, self.batch_first = mha.num_heads, mha.batch_first
        self.q_proj = nn.Linear(e, e, bias)
        self.k_proj = nn.Linear(mha.kdim, e, bias)
        self.v_proj = nn.Linear(mha.vdim, e, bias)
        weights = mha.in_proj_weight.chunk(3) if mha._qkv_same_embed_dim else \
            (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if bias else (None,) * 3
        with torch.no_grad():
            for proj, w, b in zip((self.q_proj, self.k_proj, self.v_proj), weights, biases,
                                  strict=True):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
        self.out_proj = nn.Linear(e, e, mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())
        self.dropout = nn.Dropout(mha.dropout)
        self.to(mha.out_proj.weight.device)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise QuantizeError("nn.MultiheadAttention with a mask: lowbit quantizes "
                                "unmasked attention only")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n, e = query.shape
        h = self.heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, E] -> [B, heads, L, E / heads]
            return x.reshape(b, x.size(1), h, e // h).transpose(1, 2)

        out, attn = _attend(heads(self.q_proj(query)), heads(self.k_proj(key)),
                            heads(self.v_proj(value)), self.dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, e))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(dim=1) if average_attn_weights else attn


class ScaledDotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention(q, k, v, dropout_p=p)`` (no mask, default scale)."""

    def __init__(self, dropout_p: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _attend(q, k, v, self.dropout)[0]


_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}


def sdpa_module(args: tuple, kwargs: dict) -> ScaledDotProductAttention:
    """The module a ``F.scaled_dot_product_attention(*args, **kwargs)`` call becomes (called
    with ``args[:3]``); refused for masks, a custom scale and grouped queries."""
    given = dict(zip(_SDPA_DEFAULTS, args[3:], strict=False)) | kwargs
    odd = {k: v for k, v in given.items() if k != "dropout_p" and v != _SDPA_DEFAULTS.get(k)}
    if odd:
        raise QuantizeError(f"scaled_dot_product_attention with {odd}: lowbit splits "
                            f"unmasked attention at the default scale only")
    return ScaledDotProductAttention(float(given.get("dropout_p", 0.0)))


def split_multihead(model: nn.Module) -> None:
    """Replace every ``nn.MultiheadAttention`` of ``model`` (in place) by its
    :class:`SplitAttention`."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.MultiheadAttention):
            model.set_submodule(name, SplitAttention(m))
