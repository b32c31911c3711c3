"""Random baseline: keep ``K`` random patch tokens per image, drop the rest (a lower bound that any
content-aware reducer must beat at the same cost)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..layers.tokens import Context, Group
from .common import keep_tokens


class RandomKeep(nn.Module):
    """Chooses which patches survive. In evaluation the draw is seeded, so results repeat."""

    def __init__(self, *, keep_ratio: float, seed: int = 0):
        super().__init__()
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"Invalid value for 'keep_ratio': {keep_ratio!r}; allowed: a float in (0, 1].")
        self.keep_ratio, self.seed = keep_ratio, seed

    def num_keep(self, n: int) -> int:
        return max(1, min(n, math.ceil(self.keep_ratio * n)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, N, D) -> sorted indices of the kept patches (B, K)."""
        B, N = z.shape[:2]
        if self.training:
            noise = torch.rand(B, N, device=z.device)
        else:
            g = torch.Generator().manual_seed(self.seed)
            noise = torch.rand(B, N, generator=g).to(z.device)
        return noise.argsort(dim=1)[:, : self.num_keep(N)].sort(dim=1)[0]           # (B, K)

    def forward_groups(self, groups: list[Group], ctx: Context) -> list[Group]:
        return [keep_tokens(grp, self(grp.x[:, ctx.num_prefix:]), ctx) for grp in groups]


def attach(blocks, opts, dim: int, num_prefix: int) -> dict:
    """reduction='random': one stage before the first of ``opts.reduce_blocks``."""
    return {str(opts.reduce_blocks[0]): RandomKeep(keep_ratio=opts.keep_ratio)}
