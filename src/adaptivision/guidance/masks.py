"""Mask guidance (DESIGN.md §1): per-pixel label maps pooled to patches.

A label map (B, H, W) with C classes becomes, per patch, the fraction of its pixels in each class
(B, N, C). As CMTF tokens every class is one token, its footprint over the patches (B, C, N);
as DTC weights, the fraction of each patch that is not background (class 0).

Where a data set has no label maps (classification), :func:`foreground_masks` gives a two-class
map (background / object) by Otsu's threshold on the grey image, which suits single-object
data such as Fashion-MNIST, Chest X-rays or product photos; a segmentation model's output or
annotations can be passed instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_label_fractions(labels: torch.Tensor, num_classes: int, patch_size: int,
                          ignore_index: int = 255) -> torch.Tensor:
    """labels (B, H, W) integer -> (B, N, C): fraction of each patch's pixels in each class
    (pixels labelled ``ignore_index`` count for no class). N in row-major patch order."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got {tuple(labels.shape)}")
    H, W = labels.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"label map {H}x{W} is not divisible into {patch_size}-pixel patches")
    labels = labels.long()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(f"label map holds values outside [0, {num_classes}) other than ignore_index={ignore_index}")
    valid = labels != ignore_index
    onehot = F.one_hot(labels.where(valid, 0), num_classes) * valid.unsqueeze(-1)    # (B, H, W, C)
    frac = F.avg_pool2d(onehot.permute(0, 3, 1, 2).float(), patch_size)              # (B, C, h, w)
    return frac.flatten(2).transpose(1, 2)                                           # (B, N, C)


@torch.no_grad()
def foreground_masks(images: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """images (B, C, H, W), any normalisation -> (B, H, W) long, 1 = object, 0 = background.

    Otsu's threshold per image on the grey levels; the object is the side of the threshold that
    covers less of the image border (bright items on black, or dark items on white)."""
    g = images.float().mean(1)                                                       # (B, H, W)
    lo, hi = g.amin((1, 2), keepdim=True), g.amax((1, 2), keepdim=True)
    q = ((g - lo) / (hi - lo).clamp_min(1e-12) * (bins - 1)).round().long()          # (B, H, W) in [0, bins)
    hist = F.one_hot(q.flatten(1), bins).sum(1).float()                              # (B, bins)
    p = hist / hist.sum(1, keepdim=True)
    w0 = p.cumsum(1)                                                                 # weight below t (incl.)
    levels = torch.arange(bins, dtype=p.dtype, device=p.device)
    m0 = (p * levels).cumsum(1)
    mean = m0[:, -1:]
    between = (mean * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)               # (B, bins)
    t = between[:, :-1].argmax(1).view(-1, 1, 1)                                     # (B, 1, 1)
    above = q > t                                                                    # (B, H, W)
    border = torch.cat([above[:, 0], above[:, -1], above[:, :, 0], above[:, :, -1]], dim=1).float()
    flip = border.mean(1) > 0.5                                                      # (B,) object is dark
    return (above ^ flip.view(-1, 1, 1)).long()
