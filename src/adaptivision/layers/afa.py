"""AdaptiveFocus Attention, AFA (paper 3.3, eqs. 4-7; DESIGN.md §1).

Eq. 6 modulates the attention logits elementwise, ``softmax((Q K^T / sqrt(d)) ⊙ M) V``, with
``M`` predicted from the pooled tokens (eq. 5). A full ``(K+1)^2`` output is heavy and
unstable, so ``M = 1 + sum_r u_r v_r^T`` (low rank), and since

    (Q K^T) ⊙ (1 + sum_r u_r v_r^T) = Q~ K~^T,  Q~ = [Q, u_1∘Q, ...],  K~ = [K, v_1∘K, ...]

the modulated attention runs on the fused ``scaled_dot_product_attention`` with
``scale = 1/sqrt(d)`` (the head width of Q, not of Q~).

The block and attention are converted in place from timm's ``Block``/``Attention`` (ToMe's
approach: subclass and swap ``__class__``), so every timm weight keeps its name and value.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, trunc_normal_
from timm.models.vision_transformer import Block

from .attention import attention_inputs, attention_output, attn_width
from .tokens import Context, Group


class ModulationPredictor(nn.Module):
    """``f_m`` of eq. 5: pooled tokens ``G`` (B, D) -> ``u, v`` (B, R, T_max)."""

    def __init__(self, dim: int, *, max_tokens: int, rank: int = 1, hidden: Optional[int] = None):
        super().__init__()
        if max_tokens < 1 or rank < 1 or (hidden is not None and hidden < 1):
            raise ValueError(f"Invalid max_tokens={max_tokens!r}, rank={rank!r} or hidden={hidden!r}; allowed: >= 1.")
        hidden = hidden or max(dim // 4, 8)
        self.max_tokens, self.rank = max_tokens, rank
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc_u = nn.Linear(hidden, rank * max_tokens)
        self.fc_v = nn.Linear(hidden, rank * max_tokens)
        trunc_normal_(self.fc1.weight, std=0.02)
        nn.init.zeros_(self.fc1.bias)
        # M starts at 1 (plain attention): v = 0. u must not also be 0, or the bilinear
        # u v^T would have zero gradient in both factors forever; u starts at 1.
        trunc_normal_(self.fc_u.weight, std=0.02)
        nn.init.ones_(self.fc_u.bias)
        nn.init.zeros_(self.fc_v.weight)
        nn.init.zeros_(self.fc_v.bias)

    def forward(self, x: torch.Tensor, mass: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        if T > self.max_tokens:
            raise ValueError(f"AFA got {T} tokens but was built for at most {self.max_tokens}")
        if mass is None:
            g = x.mean(1)                                                           # (B, D) eq. 5 Pool
        else:
            w = mass.to(x.dtype).unsqueeze(-1)                                      # (B, T, 1)
            g = (w * x).sum(1) / w.sum(1).clamp_min(1e-6)                           # (B, D) mass-weighted mean
        h = self.act(self.fc1(g))                                                   # (B, hidden)
        u = self.fc_u(h).view(B, self.rank, self.max_tokens)[..., :T]               # (B, R, T)
        v = self.fc_v(h).view(B, self.rank, self.max_tokens)[..., :T]               # (B, R, T)
        return u, v


def modulation_matrix(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Explicit ``M = 1 + sum_r u_r v_r^T``, (B, T, T). For tests and pictures only."""
    return 1 + torch.einsum("brt,brs->bts", u, v)


def _scale_rows(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[u_1∘x, ..., u_R∘x] along the feature axis: x (B, H, T, d), u (B, R, T) -> (B, H, T, R*d)."""
    y = u.to(x.dtype)[:, None, :, :, None] * x.unsqueeze(2)                         # (B, H, R, T, d)
    return y.permute(0, 1, 3, 2, 4).flatten(3)                                       # (B, H, T, R*d)


def _use_sdpa(impl: str, x: torch.Tensor) -> bool:
    """``impl='auto'``: fused SDPA for Q~K~^T off CPU (CUDA's memory-efficient kernel takes a
    value width different from the query/key width); the explicit form on CPU and in export."""
    if impl != "auto":
        return impl == "sdpa"
    return x.device.type != "cpu" and not torch.onnx.is_in_onnx_export()


class AdaptiveFocusAttention(Attention):
    """timm ``Attention`` whose logits are modulated by the low-rank ``M`` (eq. 6)."""

    modulator: ModulationPredictor
    impl: str = "auto"  # 'auto' | 'sdpa' (Q~K~^T, fused) | 'explicit' (M materialised); same result

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                mass: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v, gate = attention_inputs(self, x)                                   # 3 x (B, H, T, d)
        u, w = self.modulator(x, mass)                                              # (B, R, T) each
        if _use_sdpa(self.impl, q):
            # Q~ = [Q, u_1∘Q, ..., u_R∘Q], K~ = [K, v_1∘K, ...], so that Q~K~^T = (QK^T) ⊙ M
            q_aug = torch.cat([q, _scale_rows(q, u)], dim=-1)                        # (B, H, T, d(R+1))
            k_aug = torch.cat([k, _scale_rows(k, w)], dim=-1)                        # (B, H, T, d(R+1))
            out = F.scaled_dot_product_attention(
                q_aug, k_aug, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                dropout_p=self.attn_drop.p if self.training else 0.0)               # (B, H, T, d)
        else:
            out = self._explicit_chunked(q, k, v, u, w, attn_mask, is_causal)       # (B, H, T, d)
        return attention_output(self, out, gate)                                    # (B, T, D)

    CHUNK_ELEMENTS = 3 * 2 ** 19  # logits per chunk (6 MiB fp32): cache-sized, measured best on CPU

    def _explicit_chunked(self, q, k, v, u, w, attn_mask, is_causal) -> torch.Tensor:
        """Inference: images in chunks whose (b, H, T, T) logits stay in cache (1.45x faster at
        B=64, T=129 on this CPU, docs/performance.md). Training: one piece, for autograd."""
        B, H, T, _ = q.shape
        step = max(1, self.CHUNK_ELEMENTS // (H * T * T))
        if torch.is_grad_enabled() or step >= B:
            return self._explicit(q, k, v, u, w, attn_mask, is_causal)
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])                               # (B, H, T, d)
        for i in range(0, B, step):
            j = slice(i, i + step)
            mask = attn_mask[j] if attn_mask is not None and attn_mask.shape[0] == B else attn_mask
            out[j] = self._explicit(q[j], k[j], v[j], u[j], w[j], mask, is_causal)
        return out

    def _explicit(self, q, k, v, u, w, attn_mask, is_causal) -> torch.Tensor:
        """Eq. 6 with M materialised once per image, (B, 1, T, T), and shared by the heads.

        On CPU the fused kernel only takes equal head widths, so Q~K~^T (width d(R+1)) falls
        back to PyTorch's unfused path, 2-5x slower than this (docs/performance.md)."""
        T = q.shape[-2]
        m = torch.baddbmm(u.new_ones(1, 1, 1), u.transpose(1, 2), w)                 # (B, T, T) M of eq. 6
        m = (m * self.scale).unsqueeze(1).to(q.dtype)                               # (B, 1, T, T)
        attn = torch.matmul(q, k.transpose(-2, -1))                                 # (B, H, T, T)
        # inference: in place, one pass less over the (B, H, T, T) logits
        attn = attn * m if torch.is_grad_enabled() else attn.mul_(m)
        if is_causal:
            attn = attn.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        if attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
        attn = self.attn_drop(attn.softmax(dim=-1))
        return torch.matmul(attn, v)

    def attention_macs(self, batch: int, tokens: int) -> int:
        """Multiply-accumulates of the attention products: Q~K~^T is (R+1) x QK^T, plus AV."""
        return (self.modulator.rank + 2) * batch * tokens * tokens * attn_width(self)


class AFABlock(Block):
    """timm ``Block`` with AFA attention; ``post_norm`` gives eq. 7's ``LN(S + MHSA(S))``."""

    post_norm: bool = False

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                mass: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.post_norm:  # eq. 7 literally, then the MLP the same way
            x = self.norm1(x + self.drop_path1(self.ls1(self.attn(x, attn_mask, is_causal, mass=mass))))
            return self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask, is_causal, mass=mass)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


    def forward_group(self, grp: Group, ctx: Context) -> Group:
        """The trunk's protocol (:mod:`.tokens`): AFA's f_m sees each token's mass."""
        return grp.replace(x=self(grp.x, grp.log_mass, mass=grp.mass))


def make_afa_block(block: Block, max_tokens: int, rank: int = 1, hidden: Optional[int] = None,
                   post_norm: bool = False) -> AFABlock:
    """Turn a timm ``Block`` into an ``AFABlock`` in place; its weights are kept as they are."""
    if type(block) is not Block or type(block.attn) is not Attention:
        raise TypeError(f"AFA converts timm Block/Attention, got {type(block).__name__}/"
                        f"{type(block.attn).__name__}")
    dim = block.attn.qkv.in_features
    ref = block.attn.qkv.weight
    block.__class__ = AFABlock
    block.post_norm = post_norm
    block.attn.__class__ = AdaptiveFocusAttention
    block.attn.modulator = ModulationPredictor(dim, max_tokens=max_tokens, rank=rank, hidden=hidden).to(ref.device, ref.dtype)
    return block
