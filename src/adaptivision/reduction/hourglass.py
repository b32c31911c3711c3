"""Hourglass baseline (Liang et al., 2022, "Expediting large-scale vision transformer for dense
prediction without fine-tuning"): cluster the patch grid into a coarser grid of super-tokens
after block alpha, run the later blocks on them, reconstruct the patch grid for dense heads.

Token clustering (read from the reference code, Expedit-LargeScale-Vision-Transformer): the
patch tokens as an H x W map; the centres start as its adaptive average pool to an h x w grid;
each iteration is a *local* soft k-means step: a patch may join only the centres within
``window // 2`` grid cells of the cell it starts in, its weights are a softmax over those
centres of ``-distance / tau``, and each centre becomes the weighted mean of its patches (the
weights detached, as in the reference). [CLS] is kept apart. No parameters: it works on a
trained dense ViT without fine-tuning. Token reconstruction (dense outputs): patch i receives
the final super-tokens weighted by ``exp(-|z_i - s_k|^2 / tau)`` between its features before
clustering and the super-tokens right after it, kept for its ``top_k`` nearest centres.

Where this differs from the reference, and why: distances are measured in DTC's assignment
space (LayerNorm'd tokens, ``adaptivision.layers.dtc``) with ``tau`` a divisor as in eq. 2, so
one temperature serves every width (the reference multiplies raw distances by a per-model
constant); reconstruction weights are normalised to sum 1 (the reference L2-normalises them,
which scales a reconstructed token by up to sqrt(top_k)), so K = N gives the tokens back; the
budget knob is ``keep_ratio`` (h = w = round(sqrt(keep_ratio * N))), the grid of a square image.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.dtc import grid_cells, grid_centers, normed_space, window_mask
from ..layers.tokens import Context, Group


def grid_side(keep_ratio: float, n: int) -> int:
    """Side h of the h x h centre grid for ``keep_ratio`` of ``n`` patches (1 <= h <= sqrt(n))."""
    side = math.isqrt(n)
    return max(1, min(side, round(math.sqrt(keep_ratio * n))))


def cluster_grid(z: torch.Tensor, h: int, iters: int = 5, tau: float = 20.0, window: int = 5):
    """Hourglass's token clustering of patch tokens z (B, N, D), N a square: returns super-tokens
    s (B, h*h, D), their soft mass (B, h*h) and the weights a (B, N, h*h) (rows sum to 1)."""
    B, N, D = z.shape
    side = math.isqrt(N)
    if side * side != N:
        raise ValueError(f"reduction='hourglass' clusters a square patch grid; got {N} patches")
    zs = normed_space(z)                                                                   # (B, N, D)
    mu = grid_centers(zs, h * h, (side, side))                                       # (B, K, D) grid start
    mask = window_mask(h * h, (side, side), window, z.device)                        # (N, K)
    a = F.one_hot(grid_cells(h * h, (side, side), z.device), h * h).float().expand(B, -1, -1)  # (B, N, K) the pool's cells
    for _ in range(iters):
        d2 = torch.cdist(zs, mu).pow(2)                                              # (B, N, K)
        a = torch.softmax((-d2 / tau).masked_fill(~mask, float("-inf")), dim=-1)     # (B, N, K)
        w = a.detach()  # the reference detaches the weights of the centre update
        mu = torch.einsum("bnk,bnd->bkd", w, zs) / w.sum(1).clamp_min(1e-6).unsqueeze(-1)  # (B, K, D)
    # super-tokens in the tokens' own space: the weighted mean of the raw tokens, with the weights
    # detached as the reference's centre update (the gradient reaches the tokens, not the weights)
    w = a.detach()
    s = torch.einsum("bnk,bnd->bkd", w, z.float()) / w.sum(1).clamp_min(1e-6).unsqueeze(-1)  # (B, K, D)
    return s.to(z.dtype), w.sum(1), w


def reconstruction(z_pre: torch.Tensor, s0: torch.Tensor, tau: float = 20.0, top_k: int = 3) -> torch.Tensor:
    """Hourglass's token reconstruction weights (B, N, K): ``exp(-|z_i - s0_k|^2 / tau)`` for the
    ``top_k`` nearest super-tokens of each patch, normalised to sum 1 (distances in the
    assignment space; z_pre (B, N, D) before clustering, s0 (B, K, D) right after)."""
    d2 = torch.cdist(normed_space(z_pre), normed_space(s0)).pow(2)                              # (B, N, K)
    k = min(top_k, d2.shape[-1])
    logits = (-d2 / tau)
    keep = logits >= logits.topk(k, dim=-1).values[..., -1:]                        # (B, N, K) top-k
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)


class HourglassStage(nn.Module):
    """Token clustering before one block (the baseline's stage), token reconstruction for unpooling."""

    def __init__(self, *, keep_ratio: float, iters: int = 5, tau: float = 20.0, window: int = 5, top_k: int = 3):
        super().__init__()
        if not 0 < keep_ratio <= 1 or iters < 0 or tau <= 0 or window < 1 or window % 2 == 0 or top_k < 1:
            raise ValueError(f"Invalid Hourglass options keep_ratio={keep_ratio!r}, iters={iters!r}, tau={tau!r}, "
                             f"window={window!r} (odd), top_k={top_k!r}")
        self.keep_ratio, self.iters, self.tau, self.window, self.top_k = keep_ratio, iters, tau, window, top_k

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch tokens z (b, N, D) -> super-tokens (b, K, D), mass (b, K), weights (b, N, K)."""
        return cluster_grid(z, grid_side(self.keep_ratio, z.shape[1]), self.iters, self.tau, self.window)

    def forward_groups(self, groups: list[Group], ctx: Context) -> list[Group]:
        return [self._group(grp, ctx) for grp in groups]

    def _group(self, grp: Group, ctx: Context) -> Group:
        P = ctx.num_prefix
        z = grp.x[:, P:]                                                             # (b, N, D)
        s, m, _ = self(z)                                                            # (b, K, D), (b, K)
        mass = torch.cat([m.new_ones(m.shape[0], P), m], dim=1)                      # (b, P+K)
        tracked = {}
        if ctx.dense:  # unpooled through the reconstruction weights (no skip: that is DTC's)
            r = reconstruction(z, s, self.tau, self.top_k)                          # (b, N, K)
            tracked = dict(assign=grp.assign + (r,), skips=grp.skips + (None,))
        return grp.replace(x=torch.cat([grp.x[:, :P], s], dim=1), mass=mass, prop_attn=ctx.prop_attn, **tracked)


def attach(blocks, opts, dim: int, num_prefix: int) -> dict:
    """reduction='hourglass': one clustering stage before the first of ``opts.reduce_blocks``."""
    return {str(opts.reduce_blocks[0]): HourglassStage(keep_ratio=opts.keep_ratio)}
