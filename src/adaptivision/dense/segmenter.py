"""Segmenter (Strudel et al., 2021) heads on any backbone with ``forward_intermediates``.

AdaptiVision's super-tokens are restored to the patch grid through the assignment
(``Z_rec = A S``, :meth:`AdaptiVision.forward_intermediates`), so the heads see a ViT-shaped
(B, D, H/P, W/P) map whatever the backbone condensed; the logits are upsampled to the input.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block


def patch_grid(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's last block, normed, on the full patch grid: (B, D, H/P, W/P)."""
    last = len(backbone.blocks) - 1
    return backbone.forward_intermediates(x, indices=[last], norm=True, intermediates_only=True)[0]


class LinearDecoder(nn.Module):
    """Segmenter's linear decoder: one linear map per patch."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                                # (B, D, h, w)
        return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)                 # (B, C, h, w)


class MaskTransformer(nn.Module):
    """Segmenter's mask transformer: learned class embeddings attend jointly with the patches;
    each class mask is the scalar product of L2-normalised patch and class embeddings."""

    def __init__(self, dim: int, num_classes: int, width: int = 192, depth: int = 2, heads: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(dim, width)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, width))
        trunc_normal_(self.cls_emb, std=0.02)
        self.blocks = nn.Sequential(*[Block(width, heads, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.proj_patch = nn.Linear(width, width, bias=False)
        self.proj_classes = nn.Linear(width, width, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                                # (B, D, h, w)
        B, _, h, w = x.shape
        t = self.proj_dec(x.flatten(2).transpose(1, 2))                              # (B, N, W)
        t = torch.cat([t, self.cls_emb.expand(B, -1, -1)], dim=1)                    # (B, N+C, W)
        t = self.norm(self.blocks(t))
        patches, classes = t[:, : h * w], t[:, h * w:]                               # (B, N, W), (B, C, W)
        patches = F.normalize(self.proj_patch(patches), dim=-1)
        classes = F.normalize(self.proj_classes(classes), dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))                    # (B, N, C)
        return masks.transpose(1, 2).reshape(B, self.num_classes, h, w)             # (B, C, h, w)


class Segmenter(nn.Module):
    """``backbone`` (a timm ViT or AdaptiVision, any ``reduction``) + a Segmenter decoder."""

    def __init__(self, backbone: nn.Module, num_classes: int, decoder: str = "linear", **decoder_kwargs):
        super().__init__()
        if decoder not in ("linear", "mask"):
            raise ValueError(f"Invalid value for 'decoder': {decoder!r}; allowed: 'linear', 'mask'.")
        self.backbone = backbone
        dim = backbone.embed_dim
        self.decoder = LinearDecoder(dim, num_classes) if decoder == "linear" else \
            MaskTransformer(dim, num_classes, **decoder_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(patch_grid(self.backbone, x))                          # (B, C, h, w)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
