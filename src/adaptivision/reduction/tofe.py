"""ToFe baseline (Zhang, Zhang and Guo, 2025, "ToFe: Lagged token freezing and reusing for
efficient vision transformer inference", arXiv 2507.16260): tokens are frozen, not dropped, and
reused later.

Before each of its stages (blocks depth/4, depth/2, 3depth/4 by default) a prediction module
(DynamicViT's keep-score MLP) picks the ``keep_ratio ** (s + 1)`` fraction of *all* patch tokens
that the stage's blocks process; the others are frozen: they skip those blocks and keep their
values. At the next stage the tokens frozen in the last one are first brought up to date by an
approximation module (a residual bottleneck MLP standing in for the blocks they skipped), then
every patch token, frozen or not, competes again: a token frozen early can be reused later.

Tokens stay in patch order: a block gathers the active tokens (with [CLS]), runs, and scatters
them back, so the frozen ones cost nothing and the patch grid is always whole (dense outputs
need no unpooling). Training is DynamicViT's: nothing is gathered, a hard Gumbel-softmax
decision (straight-through) masks frozen tokens out of attention and keeps their old values,
and a budget loss pulls each stage's active fraction to its target.

Simplified from the paper (no public code was found): the budget term is on the active
fraction of each stage (a proxy of its FLOPs), the approximation module is one residual MLP
per stage, and tokens frozen at the last stage are not recovered before the head (classification
reads [CLS]; dense outputs see their values from the time they were frozen).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from ..layers.tokens import Context, Group
from .common import convert_block, gather_tokens
from .importance import KeepScorePredictor, policy_attention


class ToFeStage(nn.Module):
    """Stage ``stage``: recover the tokens frozen in the previous stage (``approx``; none before
    the first stage), then choose the tokens this stage's blocks process."""

    def __init__(self, dim: int, *, keep_ratio: float, stage: int):
        super().__init__()
        if not 0 < keep_ratio <= 1 or stage < 0:
            raise ValueError(f"Invalid keep_ratio={keep_ratio!r} or stage={stage!r}; allowed: keep_ratio in (0, 1], stage >= 0.")
        self.keep_ratio, self.stage = keep_ratio, stage
        self.predictor = KeepScorePredictor(dim)
        self.approx = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim // 4), nn.GELU(),
                                    nn.Linear(dim // 4, dim)) if stage > 0 else None

    def target(self) -> float:
        """Fraction of all patch tokens active in this stage."""
        return self.keep_ratio ** (self.stage + 1)

    def num_active(self, n: int) -> int:
        return max(1, min(n, math.ceil(self.target() * n)))

    def recover(self, z: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
        """z (b, N, D) with the approximation's update added where ``frozen`` (b, N) is 1."""
        if self.approx is None:
            return z
        return z + frozen.unsqueeze(-1).to(z.dtype) * self.approx(z)                   # (b, N, D)

    def forward_groups(self, groups: list[Group], ctx: Context) -> list[Group]:
        return [self._group(grp, ctx) for grp in groups]

    def _group(self, grp: Group, ctx: Context) -> Group:
        P = ctx.num_prefix
        z = grp.x[:, P:]                                                             # (b, N, D)
        ones = z.new_ones(z.shape[:2])                                               # (b, N)
        if self.training:  # mask, don't gather: the decision gets its gradient through attention
            if grp.policy is not None:
                z = self.recover(z, 1 - grp.policy)
            keep = F.gumbel_softmax(self.predictor(z, ones), hard=True)[..., 0]     # (b, N) 0/1
            ctx.aux_losses.append((keep.mean(1) - self.target()).pow(2).mean())
            return grp.replace(x=torch.cat([grp.x[:, :P], z], 1), policy=keep, active=None)
        if grp.active is not None and self.approx is not None:
            frozen = torch.ones_like(ones).scatter(1, grp.active, 0.0)               # (b, N)
            idx = frozen.argsort(dim=1, descending=True, stable=True)[:, : z.shape[1] - grp.active.shape[1]]  # (b, F)
            z = z.scatter(1, idx.unsqueeze(-1).expand(-1, -1, z.shape[-1]),
                          self.recover(gather_tokens(z, idx), torch.ones_like(idx, dtype=z.dtype)))
        scores = self.predictor(z, ones)[..., 0]                                     # (b, N)
        active = scores.topk(self.num_active(z.shape[1]), dim=1).indices.sort(1)[0]  # (b, k)
        return grp.replace(x=torch.cat([grp.x[:, :P], z], 1), active=active, policy=None)


class ToFeBlock(Block):
    """timm ``Block`` that processes only the active patch tokens (and the prefix); frozen ones
    pass unchanged."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        if keep is None:  # every token given is active
            return super().forward(x, attn_mask)
        # training: frozen tokens (keep 0) are no keys of attention and keep their values
        y = x + self.drop_path1(self.ls1(policy_attention(self.attn, self.norm1(x), keep, attn_mask)))
        y = y + self.drop_path2(self.ls2(self.mlp(self.norm2(y))))
        w = keep.unsqueeze(-1).to(x.dtype)                                           # (b, T, 1)
        return w * y + (1 - w) * x

    def forward_group(self, grp: Group, ctx: Context) -> Group:
        P = ctx.num_prefix
        if grp.active is not None:  # inference: gather, run, scatter back
            idx = grp.active                                                         # (b, k)
            out = self(torch.cat([grp.x[:, :P], gather_tokens(grp.x[:, P:], idx)], 1))  # (b, P+k, D)
            z = grp.x[:, P:].scatter(1, idx.unsqueeze(-1).expand(-1, -1, out.shape[-1]), out[:, P:])
            return grp.replace(x=torch.cat([out[:, :P], z], 1))                      # (b, P+N, D)
        keep = None
        if grp.policy is not None:  # the prefix is always active
            keep = torch.cat([grp.policy.new_ones(len(grp.policy), P), grp.policy], 1)  # (b, P+N)
        return grp.replace(x=self(grp.x, keep=keep))


def attach(blocks, opts, dim: int, num_prefix: int) -> dict:
    """reduction='tofe': a freezing stage before each of ``opts.reduce_blocks``; every later block
    runs on the active tokens only."""
    at = opts.reduce_blocks
    for blk in blocks[at[0]:]:
        convert_block(blk, ToFeBlock)
    return {str(b): ToFeStage(dim, keep_ratio=opts.keep_ratio, stage=s) for s, b in enumerate(at)}

