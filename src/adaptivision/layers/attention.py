"""The one adaptation of timm's ``Attention.forward`` that AFA and every baseline share.

timm's forward (``timm.layers.Attention``, 1.0.31) is, in order:

    gate   = sigmoid(W_gate x)                      (only with gated=True; timm >= 1.0.28)
    q, k, v = split(W_qkv x) into heads; q, k = q_norm(q), k_norm(k)      (qk_norm)
    out    = softmax(q k^T * scale + mask) v        (fused SDPA or explicit)
    out    = proj_drop(proj(norm(merge(out)) * gate))                     (scale_norm, gate)

A reduction changes only the middle line (AFA modulates the logits, DynamicViT masks keys by a
policy, EViT also needs [CLS]'s attention row, ToMe the keys), so the first and last lines live
here: :func:`attention_inputs` and :func:`attention_output`. ``tests/test_parity.py`` checks each
block against timm's at its neutral setting (AFA with M = 1, ToMe r = 0, EViT keep 1.0,
DynamicViT with every token kept), with qk_norm, scale_norm, LayerScale and the gate, on the
oldest supported timm and the current one. Older timm has no ``attn_dim`` (< 1.0.23) or
``gate`` (< 1.0.28): both are read with a fallback.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention


def attn_width(attn: Attention) -> int:
    """H * d, the width of the merged heads (``attn.attn_dim`` from timm 1.0.23 on)."""
    return getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)


def attention_inputs(attn: Attention, x: torch.Tensor):
    """x (B, T, D) -> q, k, v (B, H, T, d) with the q/k norms applied, and the output gate
    (B, T, H*d) or None."""
    B, T, _ = x.shape
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None                           # (B, T, H*d)
    q, k, v = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v, gate


def attention_output(attn: Attention, out: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, H, T, d) attention values -> the attention branch's output (B, T, D)."""
    B, H, T, d = out.shape
    out = attn.norm(out.transpose(1, 2).reshape(B, T, H * d))                        # (B, T, H*d)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def sdpa(attn: Attention, q, k, v, bias: Optional[torch.Tensor], is_causal: bool = False) -> torch.Tensor:
    """timm's fused attention with an additive bias (proportional attention), (B, H, T, d)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale, is_causal=is_causal,
                                          dropout_p=attn.attn_drop.p if attn.training else 0.0)
