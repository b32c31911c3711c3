"""LeMeViT (Jiang et al., IJCAI 2024): a few learnable meta tokens stand in for the image tokens.

Read from the reference code (ViTAE-Transformer/LeMeViT, ``models/lemevit.py``) and written
anew at nano size for 28 x 28 inputs. A conv stem makes a 7 x 7 map of image tokens x; M learned
meta tokens c enter every stage through a small MLP. Block kinds:

- ``stem``: the meta tokens read the image (cross-attention, queries from c); x is unchanged;
- ``dual`` (Dual Cross-Attention): image tokens attend only to the meta tokens and the meta
  tokens only to the image tokens, so the cost is O(N M), not O(N^2); the image side's
  logits are scaled by log_N(M) as in the reference;
- ``self``: plain self-attention on x and on c, with the same weights.

Every block adds a depthwise-conv position encoding to x, and x and c share the block's norms
and MLP (as the reference). Between stages x is downsampled by a strided conv. The head sums the
mean image token and the mean meta token. Simplified here: the logit scale uses the head width
(the reference divides by the full width); no layer scale, no drop path.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["LeMeViT", "DualCrossAttention"]


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    B, T, C = t.shape
    return t.view(B, T, h, C // h).transpose(1, 2)                                   # (B, h, T, d)


def _merge(t: torch.Tensor) -> torch.Tensor:
    B, h, T, d = t.shape
    return t.transpose(1, 2).reshape(B, T, h * d)                                    # (B, T, C)


class DualCrossAttention(nn.Module):
    """Attention between image tokens x (B, N, C) and meta tokens c (B, M, C) of one kind
    (``'stem'``, ``'dual'``, ``'self'``; module docstring). Returns the updates (dx or None, dc)."""

    def __init__(self, dim: int, *, num_heads: int, kind: str):
        super().__init__()
        if kind not in ("stem", "dual", "self") or dim % num_heads:
            raise ValueError(f"Invalid kind={kind!r} or dim={dim} / num_heads={num_heads}")
        self.kind, self.num_heads = kind, num_heads
        self.qkv = nn.Linear(dim, 3 * dim)                                           # from x (all kinds)
        self.qkv_c = nn.Linear(dim, 3 * dim) if kind == "dual" else None             # from c ('dual')
        self.proj = nn.Linear(dim, dim)
        self.proj_c = nn.Linear(dim, dim) if kind == "dual" else None

    def _qkv(self, lin: nn.Linear, t: torch.Tensor):
        return [_heads(u, self.num_heads) for u in lin(t).chunk(3, dim=-1)]          # 3 x (B, h, T, d)

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        if self.kind == "self":  # the same weights on each set of tokens
            dx = _merge(F.scaled_dot_product_attention(*self._qkv(self.qkv, x)))
            dc = _merge(F.scaled_dot_product_attention(*self._qkv(self.qkv, c)))
            return self.proj(dx), self.proj(dc)
        if self.kind == "stem":  # the meta tokens read the image: queries from c, keys/values from x
            qc, _, _ = self._qkv(self.qkv, c)
            _, kx, vx = self._qkv(self.qkv, x)
            return None, self.proj(_merge(F.scaled_dot_product_attention(qc, kx, vx)))
        qx, kx, vx = self._qkv(self.qkv, x)                                          # (B, h, N, d)
        qc, kc, vc = self._qkv(self.qkv_c, c)                                        # (B, h, M, d)
        N, M, d = x.shape[1], c.shape[1], qx.shape[-1]
        scale = math.log(M, N) / math.sqrt(d) if N > 1 and M > 1 else 1 / math.sqrt(d)
        dx = F.scaled_dot_product_attention(qx, kc, vc, scale=scale)                 # image <- meta
        dc = F.scaled_dot_product_attention(qc, kx, vx)                              # meta <- image
        return self.proj(_merge(dx)), self.proj_c(_merge(dc))

    def call_macs(self, x: torch.Tensor, c: torch.Tensor) -> int:
        """QK^T and AV of this call (for ``adaptivision.profile``)."""
        (B, N, C), M = x.shape, c.shape[1]
        pairs = {"self": N * N + M * M, "stem": M * N, "dual": 2 * N * M}[self.kind]
        return 2 * B * pairs * C


class MetaBlock(nn.Module):
    def __init__(self, dim: int, *, num_heads: int, kind: str, mlp_ratio: float = 4.0):
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)                     # conditional position encoding
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = DualCrossAttention(dim, num_heads=num_heads, kind=kind)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        B, C, H, W = x.shape
        t = (x + self.pos(x)).flatten(2).transpose(1, 2)                             # (B, N, C)
        dx, dc = self.attn(self.norm1(t), self.norm1(c))
        c = c + dc
        c = c + self.mlp(self.norm2(c))                                              # (B, M, C)
        if dx is None:  # 'stem': the image tokens pass unchanged
            return x, c
        t = t + dx
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(B, C, H, W), c


class LeMeViT(nn.Module):
    """timm-style model: ``forward_features`` -> (B, N + M, C) tokens (image first),
    ``forward_head`` -> mean image token + mean meta token -> classifier."""

    def __init__(self, *, in_chans: int = 3, num_classes: int = 1000, dims=(64, 64, 96), depths=(1, 2, 2),
                 kinds=("stem", "dual", "self"), num_heads=(2, 2, 3), num_meta: int = 16, **kwargs):
        super().__init__()
        if not len(dims) == len(depths) == len(kinds) == len(num_heads):
            raise ValueError("dims, depths, kinds and num_heads need one entry per stage")
        self.num_classes, self.num_meta, self.num_features = num_classes, num_meta, dims[-1]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0] // 2, 3, 2, 1), nn.BatchNorm2d(dims[0] // 2), nn.GELU(),
                                  nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), nn.BatchNorm2d(dims[0]))
        self.meta = nn.Parameter(torch.randn(num_meta, dims[0]) * 0.02)             # (M, C0) learned meta tokens
        self.down = nn.ModuleList([nn.Identity()] + [  # no downsampling after the stem stage, as the reference
            nn.Identity() if kinds[i] == "stem" else nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1),
                                                                  nn.BatchNorm2d(dims[i + 1]))
            for i in range(len(dims) - 1)])
        prev = [dims[0]] + list(dims[:-1])
        self.meta_down = nn.ModuleList([nn.Sequential(nn.Linear(a, 4 * a), nn.LayerNorm(4 * a), nn.GELU(),
                                                      nn.Linear(4 * a, b), nn.LayerNorm(b)) for a, b in zip(prev, dims, strict=True)])
        self.stages = nn.ModuleList([nn.ModuleList([MetaBlock(d, num_heads=h, kind=k) for _ in range(n)])
                                     for d, n, k, h in zip(dims, depths, kinds, num_heads, strict=True)])
        self.norm, self.norm_c = nn.BatchNorm2d(dims[-1]), nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"meta"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)                                                             # (B, C0, H/4, W/4)
        c = self.meta.unsqueeze(0).expand(x.shape[0], -1, -1)                        # (B, M, C0)
        for down, meta_down, blocks in zip(self.down, self.meta_down, self.stages, strict=True):
            x, c = down(x), meta_down(c)
            for blk in blocks:
                x, c = blk(x, c)
        x = self.norm(x).flatten(2).transpose(1, 2)                                  # (B, N, C)
        return torch.cat([x, self.norm_c(c)], dim=1)                                 # (B, N + M, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        M = self.num_meta
        pooled = x[:, :-M].mean(1) + x[:, -M:].mean(1)                               # (B, C)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({"lemevit_nano_28.untrained": dict(
    url="", num_classes=10, input_size=(1, 28, 28), pool_size=None, crop_pct=1.0, interpolation="bicubic",
    mean=(0.2860,), std=(0.3530,), first_conv="stem.0", classifier="head", license="apache-2.0")})


@register_model
def lemevit_nano_28(pretrained: bool = False, **kwargs) -> LeMeViT:
    """LeMeViT at nano size for 28 x 28 (Tables 1-2's LeMeViT at small scale): stages stem / dual /
    self with widths 64 / 64 / 96, 16 meta tokens, image tokens 7 x 7 then 4 x 4."""
    return build_model_with_cfg(LeMeViT, "lemevit_nano_28", pretrained, **dict(dict(in_chans=1), **kwargs))
