"""What the token-reduction baselines share: blocks that reduce tokens between attention and MLP.

A reducing block is a timm ``Block`` converted in place (as AFA does, ToMe-style: subclass and
swap ``__class__``, no upstream forward code copied). Its ``forward`` takes and returns the
token ``mass`` (patches per token, prefix included) and, when ``track`` is set (dense outputs),
the assignment (b, N_in, N_out) of its input patch tokens to its output patch tokens, so that
dense outputs can be unpooled exactly as for DTC (``Z_rec = A S``). In the trunk it takes and
returns token groups (``forward_group``, the protocol of :mod:`adaptivision.layers.tokens`).
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block

from ..layers.tokens import Context, Group, gather_tokens


def keep_assignment(idx: torch.Tensor, n_in: int, extra: int = 0) -> torch.Tensor:
    """One-hot (B, N_in, K + extra) assignment of kept patches (dropped ones map nowhere)."""
    B, K = idx.shape
    a = torch.zeros(B, n_in, K + extra, device=idx.device)                        # (B, N_in, K+extra)
    a[torch.arange(B, device=idx.device).unsqueeze(1), idx, torch.arange(K, device=idx.device)] = 1.0
    return a


def keep_tokens(grp: Group, idx: torch.Tensor, ctx: Context) -> Group:
    """The group with only the patch tokens ``idx`` (b, K) kept (pruning: random, DynamicViT)."""
    P = ctx.num_prefix
    z = grp.x[:, P:]                                                                 # (b, N, D)
    mass = None if grp.mass is None else torch.cat([grp.mass[:, :P], grp.mass[:, P:].gather(1, idx)], 1)
    tracked = {}
    if ctx.dense:  # where each patch went, for unpooling
        tracked = dict(assign=grp.assign + (keep_assignment(idx, z.shape[1]),), skips=grp.skips + (None,))
    return grp.replace(x=torch.cat([grp.x[:, :P], gather_tokens(z, idx)], dim=1),  # (b, P+K, D)
                       mass=mass, policy=None, prop_attn=ctx.prop_attn, **tracked)


class ReducingBlock(Block):
    """Base of the blocks that reduce tokens; ``reduce`` is what each baseline defines."""

    num_prefix: int = 1      # [CLS] etc.: never merged or dropped

    def attend(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, object]:
        """Attention branch and what ``reduce`` needs from it (default: nothing)."""
        return self.attn(x, bias), None

    def reduce(self, x, mass, info, track: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                mass: Optional[torch.Tensor] = None, track: bool = False):
        if mass is None:
            mass = x.new_ones(x.shape[:2], dtype=torch.float32)                      # (B, T)
        y, info = self.attend(self.norm1(x), attn_mask)
        x = x + self.drop_path1(self.ls1(y))
        x, mass, assign = self.reduce(x, mass, info, track)                          # fewer tokens
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, mass, assign

    def forward_group(self, grp: Group, ctx: Context) -> Group:
        x, mass, a = self(grp.x, grp.log_mass, mass=grp.mass, track=ctx.dense)
        tracked = {} if a is None else dict(assign=grp.assign + (a,), skips=grp.skips + (None,))
        return grp.replace(x=x, mass=mass, prop_attn=ctx.prop_attn, **tracked)


def convert_block(block: Block, cls: type, **attrs) -> Block:
    """Turn a plain timm ``Block`` into ``cls`` in place (its weights are kept as they are)."""
    if type(block) is not Block or type(block.attn) is not Attention:
        raise TypeError(f"{cls.__name__} converts timm Block/Attention, got {type(block).__name__}/"
                        f"{type(block.attn).__name__}")
    block.__class__ = cls
    for k, v in attrs.items():
        setattr(block, k, v)
    return block
