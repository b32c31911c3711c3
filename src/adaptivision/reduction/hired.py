"""HiRED baseline (Arif et al., AAAI 2025), adapted to ViT classification: drop patch tokens by
[CLS] attention under a budget that is divided over image partitions.

HiRED serves high-resolution vision-language encoders that see an image as several sub-image
partitions: it gives each partition a share of the token budget in proportion to how much [CLS]
attends to it, then keeps each partition's most attended tokens and drops the rest. Here the
partitions are the four quadrants of the square patch grid, the block is one ViT block
(``reduce_at``, after its attention, as EViT), and both the budget split and the selection use
that block's [CLS] attention averaged over heads (HiRED splits by an early layer's attention and
selects by the last layer's; a classifier that drops tokens mid-network has one layer to read).
The budget is ``keep_ratio`` of the patches, split by largest remainders, at most a partition's
size each; dropped tokens are not fused (that is EViT).
"""
from __future__ import annotations

import math

import torch

from .common import convert_block, gather_tokens, keep_assignment
from .evit import EViTBlock


def quadrants(n: int) -> torch.Tensor:
    """Partition index (N,) of each patch of a square grid of ``n`` patches: its quadrant 0-3."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"reduction='hired' partitions a square patch grid; got {n} patches")
    r, c = torch.arange(n) // side, torch.arange(n) % side
    half = (side + 1) // 2
    return (r >= half).long() * 2 + (c >= half).long()


def partition_budget(share: torch.Tensor, total: int, sizes: torch.Tensor) -> torch.Tensor:
    """Split ``total`` tokens over partitions in proportion to ``share`` (B, P) (attention mass),
    at most ``sizes`` (P,) each: largest remainders, the excess of a full partition passed on.
    Returns (B, P) long, each row summing to ``total``."""
    quota = share / share.sum(1, keepdim=True).clamp_min(1e-12) * total              # (B, P)
    budget = torch.minimum(quota.floor().long(), sizes)                              # (B, P)
    rest = quota - budget                                                            # what each still asks for
    for _ in range(total):  # at most one token per step and image
        deficit = total - budget.sum(1)                                              # (B,)
        if not (deficit > 0).any():
            break
        open_ = budget < sizes                                                       # (B, P)
        pick = rest.masked_fill(~open_, -float("inf")).argmax(1)                     # (B,)
        add = (deficit > 0).long()
        budget[torch.arange(len(pick)), pick] += add
        rest[torch.arange(len(pick)), pick] -= add.to(rest.dtype)
    return budget


def hired_keep(cls_attn: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (B, keep) of the kept patches, in their original order: each quadrant keeps its
    budget of most attended patches. cls_attn: (B, N) [CLS] attention to each patch."""
    B, N = cls_attn.shape
    part = quadrants(N).to(cls_attn.device)                                          # (N,)
    onehot = torch.nn.functional.one_hot(part, 4).to(cls_attn.dtype)                 # (N, 4)
    budget = partition_budget(cls_attn @ onehot, keep, onehot.sum(0).long())         # (B, 4)
    rank = torch.empty(B, N, dtype=torch.long, device=cls_attn.device)
    for p in range(4):  # rank of each patch among its quadrant's, most attended first
        cols = (part == p).nonzero().squeeze(1)
        order = cls_attn[:, cols].argsort(dim=1, descending=True)                    # (B, n_p)
        rank[:, cols] = torch.empty_like(order).scatter_(1, order, torch.arange(len(cols), device=order.device)
                                                         .expand(B, -1))
    kept = rank < budget.gather(1, part.expand(B, -1))                               # (B, N), keep per row
    return kept.logical_not().long().argsort(dim=1, stable=True)[:, :keep]           # (B, keep) in order


class HiREDBlock(EViTBlock):
    """timm ``Block`` that drops patches after its attention, budget split over quadrants."""

    def reduce(self, x, mass, cls_attn, track):
        P, N = self.num_prefix, x.shape[1] - self.num_prefix
        keep = max(1, math.ceil(self.keep_ratio * N))
        if keep >= N:
            return x, mass, None
        idx = hired_keep(cls_attn.detach(), keep)                                    # (B, keep)
        x = torch.cat([x[:, :P], gather_tokens(x[:, P:], idx)], dim=1)               # (B, P+keep, D)
        mass = torch.cat([mass[:, :P], mass[:, P:].gather(1, idx)], dim=1)
        return x, mass, keep_assignment(idx, N) if track else None


def attach(blocks, opts, dim: int, num_prefix: int) -> dict:
    """reduction='hired': the block ``opts.reduce_blocks[0]`` drops patches after its attention."""
    convert_block(blocks[opts.reduce_blocks[0]], HiREDBlock, keep_ratio=opts.keep_ratio, num_prefix=num_prefix)
    return {}
