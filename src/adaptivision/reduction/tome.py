"""ToMe baseline (Bolya et al., 2023): bipartite soft matching, ``r`` tokens merged per block.

Between attention and MLP of every block, tokens are split alternately into sets A and B; each
A token's most similar B token (cosine similarity of the attention keys, averaged over heads)
is found, and the ``r`` most similar pairs are merged by a size-weighted average. Sizes are
carried as the token ``mass``, and proportional attention adds ``log(size)`` to the logits
(the model's ``prop_attn``, on by default: the reference recommends it for training, and the
baselines here are trained with it). Prefix tokens ([CLS], distillation, registers) are never
merged and stay in front in their order; without a prefix the kept tokens are not re-sorted;
``global_pool='avg'`` is timm's plain mean of the output tokens, as in the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..layers.attention import attention_inputs, attention_output, sdpa
from .common import ReducingBlock, convert_block


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int = 1):
    """Plan the merge of ``r`` tokens. metric: (B, T, C). Returns ``merge(x, reduce)`` which maps
    (B, T, C) -> (B, T - r, C) by summing ("sum") or averaging ("mean") merged tokens."""
    T = metric.shape[1]
    r = min(r, (T - num_prefix) // 2)
    if r <= 0:
        return lambda x, reduce="sum": x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        a, b = metric[:, ::2], metric[:, 1::2]                                       # (B, Ta, C), (B, Tb, C)
        scores = a @ b.transpose(-1, -2)                                             # (B, Ta, Tb)
        # prefix tokens sit at even positions 0, 2, ... < num_prefix: never sources; odd ones never targets
        scores[:, : (num_prefix + 1) // 2, :] = -float("inf")
        scores[:, :, : num_prefix // 2] = -float("inf")
        node_max, node_idx = scores.max(dim=-1)                                      # (B, Ta)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]              # (B, Ta, 1)
        unm_idx = edge_idx[:, r:]                                                    # (B, Ta - r, 1)
        if num_prefix:  # the reference sorts only then: the prefix must stay in front
            unm_idx = unm_idx.sort(dim=1)[0]
        src_idx = edge_idx[:, :r]                                                    # (B, r, 1)
        dst_idx = node_idx[..., None].gather(1, src_idx)                             # (B, r, 1)

    def merge(x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        C = x.shape[-1]
        unm = src.gather(1, unm_idx.expand(-1, -1, C))                               # (B, Ta - r, C)
        src = src.gather(1, src_idx.expand(-1, -1, C))                               # (B, r, C)
        dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, C), src, reduce=reduce)   # (B, Tb, C)
        if num_prefix < 2:
            return torch.cat([unm, dst], dim=1)                                      # (B, T - r, C)
        # several prefix tokens ([CLS], distillation, registers) alternate between A and B: put
        # them back in front in their own order, as the reference does for [CLS] + distillation
        pa, pb = (num_prefix + 1) // 2, num_prefix // 2
        prefix = torch.stack([unm[:, i // 2] if i % 2 == 0 else dst[:, i // 2] for i in range(num_prefix)], 1)
        return torch.cat([prefix, unm[:, pa:], dst[:, pb:]], dim=1)                  # (B, T - r, C)

    return merge


class ToMeBlock(ReducingBlock):
    """timm ``Block`` that merges ``r`` tokens after its attention."""

    r: int = 0

    def attend(self, x, bias):
        q, k, v, gate = attention_inputs(self.attn, x)                               # (B, H, T, d)
        return attention_output(self.attn, sdpa(self.attn, q, k, v, bias), gate), k.mean(1)  # metric (B, T, d)

    def reduce(self, x, mass, metric, track):
        merge = bipartite_soft_matching(metric, self.r, self.num_prefix)
        m = mass.unsqueeze(-1)                                                       # (B, T, 1)
        new_mass = merge(m)                                                          # (B, T-r, 1)
        x = merge(x * m.to(x.dtype)) / new_mass.to(x.dtype)                          # size-weighted mean
        assign: Optional[torch.Tensor] = None
        if track:  # where each input patch went: merge the identity
            B, T_in = mass.shape
            eye = torch.eye(T_in, device=x.device).expand(B, -1, -1)                 # (B, T_in, T_in)
            P = self.num_prefix
            assign = merge(eye).transpose(1, 2)[:, P:, P:]                            # (B, N_in, N_out)
        return x, new_mass.squeeze(-1), assign


def attach(blocks, opts, dim: int, num_prefix: int) -> dict:
    """reduction='tome': every block of ``opts.reduce_blocks`` merges ``opts.tome_r`` tokens."""
    for b in opts.reduce_blocks:
        convert_block(blocks[b], ToMeBlock, r=opts.tome_r, num_prefix=num_prefix)
    return {}
