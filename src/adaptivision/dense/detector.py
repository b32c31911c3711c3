"""Detection (paper Table 3): torchvision's FCOS on a ViTDet-style simple feature pyramid.

ViTDet (Li et al., 2022, "Exploring plain vision transformer backbones for object detection")
builds its pyramid from the backbone's last patch grid alone: a 2x transposed convolution, the
grid itself and a 2x max-pool, each followed by a 1x1 and a 3x3 convolution. The backbone is a
timm ViT or AdaptiVision with any ``reduction``: condensed tokens come back to the patch grid
through :func:`.segmenter.patch_grid` (``Z_rec = A S``, or Hourglass's reconstruction), as for
segmentation.

Why FCOS (Tian et al., 2019): it is anchor-free (no anchor shapes to tune for 56 x 56 canvases),
single-stage (cheap on a CPU) and torchvision keeps it. Its level ranges follow the level's
stride: a location of stride ``s`` regresses boxes whose farthest side is in ``[4s, 8s)``
(first level from 0, last to infinity), and is a positive within ``1.5 s`` of a box centre.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead

from .segmenter import patch_grid


class GridFeatures(nn.Module):
    """The backbone's last patch grid, (B, D, H/P, W/P), whatever it condensed."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_grid(self.backbone, x)                                          # (B, D, h, w)


def _conv_ln(c_in: int, c: int) -> nn.Sequential:
    """ViTDet's lateral and output convolutions, with GroupNorm (one group: LayerNorm over C, H, W)."""
    return nn.Sequential(nn.Conv2d(c_in, c, 1, bias=False), nn.GroupNorm(1, c),
                         nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(1, c))


class SimplePyramid(nn.Module):
    """Levels at strides P/2, P and 2P (P: the patch size) from the last patch grid alone.
    ``out_channels`` and an ordered dict of maps: the interface torchvision's detectors take."""

    def __init__(self, backbone: nn.Module, channels: int = 64):
        super().__init__()
        dim, self.patch = backbone.embed_dim, backbone.patch_embed.patch_size[0]
        if self.patch % 2:
            raise ValueError(f"the simple pyramid needs an even patch size (stride P/2), got {self.patch}")
        self.trunk = GridFeatures(backbone)
        self.up = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), nn.GELU())
        self.down = nn.MaxPool2d(2, ceil_mode=True)
        self.lateral = nn.ModuleList([_conv_ln(dim // 2, channels), _conv_ln(dim, channels), _conv_ln(dim, channels)])
        self.out_channels = channels

    @property
    def strides(self) -> tuple:
        return self.patch // 2, self.patch, 2 * self.patch

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        g = self.trunk(x)                                                            # (B, D, h, w)
        maps = (self.up(g), g, self.down(g))                                         # 2h, h, h/2
        return OrderedDict((str(i), lat(m)) for i, (lat, m) in enumerate(zip(self.lateral, maps, strict=True)))  # (B, C, ., .)


def build_detector(backbone: nn.Module, num_classes: int, img_size: int, in_chans: int, channels: int = 64,
                   head_convs: int = 2, score_thresh: float = 0.05) -> FCOS:
    """FCOS over :class:`SimplePyramid`. Images are expected normalised already (mean 0, std 1
    here) and at ``img_size``: the transform neither resizes nor pads them (the ViT's position
    embedding is for that size)."""
    if channels % 32:  # torchvision's head uses GroupNorm(32, C)
        raise ValueError(f"Invalid value for 'channels': {channels}; allowed: a multiple of 32")
    pyramid = SimplePyramid(backbone, channels)
    anchors = AnchorGenerator(tuple((s,) for s in pyramid.strides), ((1.0,),) * 3)    # one point per location
    head = FCOSHead(channels, 1, num_classes, num_convs=head_convs)
    return FCOS(pyramid, num_classes, min_size=img_size, max_size=img_size, image_mean=[0.0] * in_chans,
                image_std=[1.0] * in_chans, anchor_generator=anchors, head=head, score_thresh=score_thresh,
                size_divisible=pyramid.patch, detections_per_img=50)


def num_classes_of(detector: FCOS) -> int:
    return detector.head.classification_head.num_classes
