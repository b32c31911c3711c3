"""Cross-Modal Token Fusion, CMTF (paper 3.4, eqs. 8-10; DESIGN.md §1).

Super-tokens (queries) attend to guidance tokens ``G_t`` (keys/values), which never enter
self-attention. Eq. 10 as written, ``S + sigmoid(A_c W_g)``, adds a positive constant to every
token even with no useful guidance: it is kept as ``gate='paper'``; the default ``'gated'`` is
the gated residual ``S + sigmoid(A_c W_g) ⊙ (A_c W_o)`` with ``W_o`` zero-initialised, so CMTF
starts as the identity.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_


class CrossModalTokenFusion(nn.Module):
    def __init__(self, dim: int, *, num_heads: int, gate: str = "gated", qkv_bias: bool = True):
        super().__init__()
        if gate not in ("gated", "paper"):
            raise ValueError(f"Invalid value for 'gate': {gate!r}; allowed: 'gated' or 'paper'.")
        if dim % num_heads:
            raise ValueError(f"CMTF dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.gate_mode = num_heads, dim // num_heads, gate
        self.norm = nn.LayerNorm(dim)  # pre-norm on the queries, as in every other block
        self.q = nn.Linear(dim, dim, bias=qkv_bias)      # W_Qc
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # [W_Kc, W_Vc]
        self.w_g = nn.Linear(dim, dim)                  # W_g
        self.w_o = nn.Linear(dim, dim) if gate == "gated" else None
        for m in (self.q, self.kv, self.w_g):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        if self.w_o is not None:
            nn.init.zeros_(self.w_o.weight)
            nn.init.zeros_(self.w_o.bias)

    def cross_attention(self, s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Eqs. 8-9, multi-head: ``A_c = softmax(Q K^T / sqrt(d_k)) V``. s (B, T, D), g (B, M, D)."""
        B, T, D = s.shape
        H, d = self.num_heads, self.head_dim
        q = self.q(self.norm(s)).view(B, T, H, d).transpose(1, 2)                  # (B, H, T, d)
        k, v = self.kv(g).view(B, g.shape[1], 2, H, d).permute(2, 0, 3, 1, 4)      # 2 x (B, H, M, d)
        a = F.scaled_dot_product_attention(q, k, v)                                 # (B, H, T, d)
        return a.transpose(1, 2).reshape(B, T, D)                                   # (B, T, D)

    def forward(self, s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Eq. 10. s: (B, T, D) tokens; g: (B, M, D) guidance tokens (already in width D)."""
        a = self.cross_attention(s, g)                                              # (B, T, D)
        gate = torch.sigmoid(self.w_g(a))                                           # (B, T, D)
        if self.w_o is None:
            return s + gate                                                         # eq. 10 as written
        return s + gate * self.w_o(a)

    def attention_macs(self, batch: int, tokens: int, guidance_tokens: int) -> int:
        return 2 * batch * tokens * guidance_tokens * self.num_heads * self.head_dim
