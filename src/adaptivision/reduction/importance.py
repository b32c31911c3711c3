"""DynamicViT baseline (Rao et al., 2021): a learned keep-score predictor prunes patch tokens.

Before each of its blocks (3/6/9 of 12 by default) a small MLP scores every patch from its own
feature and a policy-weighted global feature. In training nothing is removed: a hard
Gumbel-softmax decision (straight-through) masks the pruned tokens out of every later
attention (DynamicViT's masked softmax) and a ratio loss pulls the kept fraction of each stage
to ``keep_ratio ** stage``. At inference the top-k scored patches are kept and the rest dropped.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from ..layers.attention import attention_inputs, attention_output
from ..layers.tokens import Context, Group
from .common import convert_block, keep_tokens


class KeepScorePredictor(nn.Module):
    """DynamicViT's ``PredictorLG``: (B, N, D) tokens and (B, N) policy -> (B, N, 2) log-probs
    of (keep, drop)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)                                                          # (B, N, D)
        C = x.shape[-1] // 2
        p = policy.unsqueeze(-1).to(x.dtype)                                         # (B, N, 1)
        local, glob = x[..., :C], x[..., C:]
        glob = (glob * p).sum(1, keepdim=True) / p.sum(1, keepdim=True).clamp_min(1e-6)  # (B, 1, C')
        return self.out_conv(torch.cat([local, glob.expand(-1, x.shape[1], -1)], dim=-1))


class ImportanceStage(nn.Module):
    """One pruning stage. ``keep_ratio`` is the fraction of the tokens entering it that survive."""

    def __init__(self, dim: int, *, keep_ratio: float, stage: int):
        super().__init__()
        if not 0 < keep_ratio <= 1 or stage < 0:
            raise ValueError(f"Invalid keep_ratio={keep_ratio!r} or stage={stage!r}; allowed: keep_ratio in (0, 1], stage >= 0.")
        self.predictor = KeepScorePredictor(dim)
        self.keep_ratio, self.stage = keep_ratio, stage

    def num_keep(self, n: int) -> int:
        return max(1, min(n, math.ceil(self.keep_ratio * n)))

    def train_policy(self, z: torch.Tensor, policy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: (B, N) new policy (hard 0/1 values, straight-through gradient) and its ratio
        loss against the cumulative target ``keep_ratio ** (stage + 1)``."""
        logp = self.predictor(z, policy)                                             # (B, N, 2)
        keep = F.gumbel_softmax(logp, hard=True)[..., 0] * policy                    # (B, N)
        target = self.keep_ratio ** (self.stage + 1)
        return keep, (keep.mean(1) - target).pow(2).mean()

    def keep_index(self, z: torch.Tensor) -> torch.Tensor:
        """Inference: indices (B, K) of the top-scored patches, in their original order."""
        logp = self.predictor(z, z.new_ones(z.shape[:2]))                            # (B, N, 2)
        k = self.num_keep(z.shape[1])
        return logp[..., 0].topk(k, dim=1).indices.sort(dim=1)[0]                   # (B, K)

    def forward_groups(self, groups: list[Group], ctx: Context) -> list[Group]:
        return [self._group(grp, ctx) for grp in groups]

    def _group(self, grp: Group, ctx: Context) -> Group:
        P = ctx.num_prefix
        z = grp.x[:, P:]                                                             # (b, N, D)
        if not self.training:
            return keep_tokens(grp, self.keep_index(z), ctx)
        # training: mask, don't drop (DynamicViT); the mask reaches later attention as the policy
        policy = grp.policy if grp.policy is not None else z.new_ones(z.shape[:2])
        policy, loss = self.train_policy(z, policy)                                  # (b, N)
        ctx.aux_losses.append(loss)
        return grp.replace(policy=policy, mass=torch.cat([policy.new_ones(len(policy), P), policy], 1).float())


def policy_attention(attn, x: torch.Tensor, policy: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     eps: float = 1e-6) -> torch.Tensor:
    """DynamicViT's masked softmax: keys with policy 0 get no attention (except from
    themselves), and the gradient reaches the policy. x (B, T, D), policy (B, T)."""
    q, k, v, gate = attention_inputs(attn, x)                                        # (B, H, T, d)
    logits = (q * attn.scale) @ k.transpose(-2, -1)                                  # (B, H, T, T)
    if bias is not None:
        logits = logits + bias
    T = x.shape[1]
    eye = torch.eye(T, device=x.device, dtype=torch.float32)
    p = policy.float()[:, None, None, :]                                             # (B, 1, 1, T)
    p = p + (1.0 - p) * eye                                                          # (B, 1, T, T)
    logits = logits.float()
    w = (logits - logits.amax(-1, keepdim=True)).exp() * p
    w = (w + eps / T) / (w.sum(-1, keepdim=True) + eps)                              # (B, H, T, T)
    out = attn.attn_drop(w.to(v.dtype)) @ v                                          # (B, H, T, d)
    return attention_output(attn, out, gate)


class PolicyBlock(Block):
    """timm ``Block`` whose attention honours a training-time keep policy (B, T)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                policy: Optional[torch.Tensor] = None) -> torch.Tensor:
        if policy is None:  # inference: pruned tokens are already gone
            return super().forward(x, attn_mask)
        x = x + self.drop_path1(self.ls1(policy_attention(self.attn, self.norm1(x), policy, attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward_group(self, grp: Group, ctx: Context) -> Group:
        policy = None
        if grp.policy is not None:  # the prefix is never pruned
            policy = torch.cat([grp.policy.new_ones(len(grp.policy), ctx.num_prefix), grp.policy], 1)  # (b, P+N)
        return grp.replace(x=self(grp.x, grp.log_mass, policy=policy))


def attach(blocks, opts, dim: int, num_prefix: int) -> dict:
    """reduction='importance': a predictor stage before each of ``opts.reduce_blocks``; every later
    block honours the training-time keep mask."""
    at = opts.reduce_blocks
    for blk in blocks[at[0]:]:
        convert_block(blk, PolicyBlock)
    return {str(b): ImportanceStage(dim, keep_ratio=opts.keep_ratio, stage=s) for s, b in enumerate(at)}
