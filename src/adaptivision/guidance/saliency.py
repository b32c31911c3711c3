"""Spectral-residual saliency (Hou & Zhang, CVPR 2007), batched in torch: no training, no download.

The log-amplitude spectrum of natural images is smooth; what deviates from its local average
(the *spectral residual*) marks the unexpected parts of the image. Transforming the residual
back with the original phase gives a saliency map, which is pooled to one weight per patch for
DTC (``complexity='saliency'`` and saliency-weighted super-tokens, via ``patch_weights``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


@torch.no_grad()
def spectral_residual(images: torch.Tensor, size: int = 64, sigma: float = 2.5) -> torch.Tensor:
    """images (B, C, H, W) in any normalisation -> saliency (B, H, W) in [0, 1] (max 1 per image).
    Computed at ``size`` x ``size`` as in the paper, then resized back."""
    B, _, H, W = images.shape
    g = images.float().mean(1, keepdim=True)                                        # (B, 1, H, W) grey
    g = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False)
    spec = torch.fft.fft2(g)
    log_amp = torch.log(spec.abs().clamp_min(1e-8))
    residual = log_amp - F.avg_pool2d(F.pad(log_amp, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    sal = torch.fft.ifft2(torch.exp(residual + 1j * torch.angle(spec))).abs() ** 2  # (B, 1, s, s)
    sal = _gaussian(sal, sigma * size / 64)
    sal = F.interpolate(sal, size=(H, W), mode="bilinear", align_corners=False).squeeze(1)
    sal = sal - sal.amin((1, 2), keepdim=True)
    return sal / sal.amax((1, 2), keepdim=True).clamp_min(1e-12)


def patch_saliency(images: torch.Tensor, patch_size: int, size: int = 64) -> torch.Tensor:
    """Mean saliency of each patch, (B, N) in row-major patch order (the ViT's token order)."""
    sal = spectral_residual(images, size)                                           # (B, H, W)
    return F.avg_pool2d(sal.unsqueeze(1), patch_size).flatten(1)                    # (B, N)
