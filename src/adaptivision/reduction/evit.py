"""EViT baseline (Liang et al., 2022): keep the patches [CLS] attends to most, fuse the rest.

At its blocks, after attention, the ``keep_ratio`` fraction of patch tokens with the highest
[CLS] attention (averaged over heads) are kept; the others are fused into one token, their
mean weighted by that attention. Selection is top-k in training too (EViT's recipe); the
gradient reaches the scores through the fused token's weights.

:class:`SaliencyBlock` is EViT's score without EViT's reduction: DTC's ``keep_salient`` reads
it from the block before its stage.
"""
from __future__ import annotations

import math

import torch

from ..layers.attention import attention_inputs, attention_output, sdpa
from ..layers.tokens import Context, Group
from .common import ReducingBlock, convert_block, gather_tokens, keep_assignment


def fuse_inattentive(x: torch.Tensor, mass: torch.Tensor, cls_attn: torch.Tensor, keep: int, num_prefix: int = 1):
    """x (B, T, D), mass (B, T), cls_attn (B, T - P) -> (B, P + keep + 1, D), new mass, kept index."""
    P = num_prefix
    idx = cls_attn.argsort(dim=1, descending=True)                                  # (B, N)
    keep_idx, drop_idx = idx[:, :keep], idx[:, keep:]
    patches, pmass = x[:, P:], mass[:, P:]
    kept = gather_tokens(patches, keep_idx)                                          # (B, keep, D)
    w = cls_attn.gather(1, drop_idx).unsqueeze(-1)                                   # (B, N-keep, 1)
    fused = (gather_tokens(patches, drop_idx) * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-12)
    x = torch.cat([x[:, :P], kept, fused], dim=1)                                    # (B, P+keep+1, D)
    m_fused = pmass.gather(1, drop_idx).sum(1, keepdim=True)                         # (B, 1)
    mass = torch.cat([mass[:, :P], pmass.gather(1, keep_idx), m_fused], dim=1)
    return x, mass, keep_idx, drop_idx


class EViTBlock(ReducingBlock):
    keep_ratio: float = 0.7

    def attend(self, x, bias):
        q, k, v, gate = attention_inputs(self.attn, x)                               # (B, H, T, d)
        out = attention_output(self.attn, sdpa(self.attn, q, k, v, bias), gate)
        logits = (q[:, :, :1] * self.attn.scale) @ k.transpose(-1, -2)               # (B, H, 1, T)
        if bias is not None:
            logits = logits + bias
        cls_attn = logits.softmax(-1)[:, :, 0, self.num_prefix:].mean(1)             # (B, N)
        return out, cls_attn

    def reduce(self, x, mass, cls_attn, track):
        N = x.shape[1] - self.num_prefix
        keep = max(1, math.ceil(self.keep_ratio * N))
        if keep >= N:
            return x, mass, None
        x, mass, keep_idx, drop_idx = fuse_inattentive(x, mass, cls_attn, keep, self.num_prefix)
        assign = None
        if track:
            assign = keep_assignment(keep_idx, N, extra=1)                            # (B, N, keep+1)
            rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
            assign[rows, drop_idx, keep] = 1.0  # dropped patches live on in the fused token
        return x, mass, assign


class SaliencyBlock(EViTBlock):
    """A block that passes every token and reports [CLS]'s attention over the patches (heads
    averaged, EViT's score) on the group (``Group.saliency``): the block before a DTC stage with
    ``keep_salient`` (:class:`adaptivision.layers.stages.ClusterStage`). Its tokens are timm's
    Block's (tests/test_clustering.py); the score costs one extra row of attention logits."""

    def reduce(self, x, mass, cls_attn, track):
        return x, mass, cls_attn  # nothing is reduced: the third output is the score, not an assignment

    def forward_group(self, grp: Group, ctx: Context) -> Group:
        x, _, score = self(grp.x, grp.log_mass, mass=grp.mass)                      # (b, P+N, D), (b, N)
        return grp.replace(x=x, saliency=score)


def attach(blocks, opts, dim: int, num_prefix: int) -> dict:
    """reduction='evit': the blocks ``opts.reduce_blocks`` keep the attended patches and fuse the rest."""
    for b in opts.reduce_blocks:
        convert_block(blocks[b], EViTBlock, keep_ratio=opts.keep_ratio, num_prefix=num_prefix)
    return {}
