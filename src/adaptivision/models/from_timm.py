"""``from_timm``: an AdaptiVision model that reuses the weights of a timm ViT/DeiT of any size.

Every ViT weight keeps its name (AdaptiVision is a ``VisionTransformer`` subclass), so the
source's state dict loads as it is; only the modules AdaptiVision adds start fresh, and they
start neutral: AFA's ``v`` and CMTF's ``W_o`` are zero, so AFA is plain attention and CMTF adds
nothing until trained. DTC clusters each image's own tokens (``clustering='image'``, the default
here); a calibration batch gives it the complexity statistics that choose each image's K (and,
with ``clustering='paper'``, seeds the shared centroids by k-means++). Off the shelf, the model is
therefore the source ViT run on condensed tokens; fine-tune it with ``adaptivision train
--init-from``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer

from .adaptivision import AdaptiVision

# module prefixes / names that AdaptiVision adds to a ViT (absent from any timm checkpoint)
ADDED = ("dtc.", "cmtf.", "guidance_embed.", "guidance_tokens", "align_head.", "reducer.", ".modulator.")


def vit_kwargs(vit: VisionTransformer) -> dict:
    """The constructor arguments that rebuild ``vit``'s architecture."""
    blk = vit.blocks[0]
    return dict(
        img_size=vit.patch_embed.img_size, patch_size=vit.patch_embed.patch_size,
        in_chans=vit.patch_embed.proj.in_channels, num_classes=vit.num_classes, global_pool=vit.global_pool,
        embed_dim=vit.embed_dim, depth=len(vit.blocks), num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / vit.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
        qk_norm=not isinstance(blk.attn.q_norm, nn.Identity),
        init_values=blk.ls1.gamma.detach().mean().item() if isinstance(blk.ls1, LayerScale) else None,
        class_token=vit.cls_token is not None, reg_tokens=vit.num_reg_tokens, no_embed_class=vit.no_embed_class,
        pre_norm=not isinstance(vit.norm_pre, nn.Identity), fc_norm=not isinstance(vit.fc_norm, nn.Identity),
        dynamic_img_size=vit.dynamic_img_size,
    )


def is_added(key: str) -> bool:
    return key.startswith(ADDED) or any(a in key for a in ADDED if a.startswith("."))


def from_timm(vit: nn.Module, images: Optional[torch.Tensor] = None, **options) -> AdaptiVision:
    """AdaptiVision with ``vit``'s weights. ``options``: any :class:`adaptivision.ModelOptions`
    (``k_min=``, ``k_max=``, ``tau=``, ``condense_at=``, ``afa=``, …). ``images`` (B, C, H, W),
    normalised as the ViT expects: calibration batch that seeds the centroids and the complexity
    statistics (without it, learned centroids keep their fixed random start and every image gets
    mid-range K). Defaults here: ``clustering='image'``, ``condense_at=1`` and ``prop_attn=True``
    (docs/results.md).
    """
    if not isinstance(vit, VisionTransformer) or isinstance(vit, AdaptiVision):
        raise TypeError(f"from_timm takes a timm VisionTransformer (ViT, DeiT, ...), got {type(vit).__name__}")
    ref = next(vit.parameters())
    # off the shelf, each image's own clusters keep the ViT's accuracy where the paper's shared soft
    # centroids lose 27 points at 2/3 of its GMACs (docs/results.md, "How DTC should cluster")
    options.setdefault("clustering", "image")
    # after one block the tokens are better mixed: on two trained dense ViTs, condensing after
    # block 1 kept more accuracy than at block 0 at every GMACs level measured (docs/results.md)
    if len(vit.blocks) > 1:
        options.setdefault("condense_at", 1)
    # a ViT trained on patches attends to a super-token as to one patch: log(mass) on the logits gives
    # back what it merged (off the shelf it keeps 0.3-0.8 points more with either assignment, on every
    # model measured: docs/results.md, "Proportional attention off the shelf"), so it stays on here
    # even for the soft per-image preset, which trains better without it
    options.setdefault("prop_attn", True)
    model = AdaptiVision(**vit_kwargs(vit), **options).to(ref.device, ref.dtype)
    own, src = model.state_dict(), vit.state_dict()
    unexpected = sorted(set(src) - set(own))
    missing = sorted(k for k in set(own) - set(src) if not is_added(k))
    shapes = sorted(k for k in set(own) & set(src) if own[k].shape != src[k].shape)
    if unexpected or missing or shapes:
        raise ValueError(f"{type(vit).__name__} does not map onto AdaptiVision: not in AdaptiVision {unexpected[:8]}, "
                         f"missing from the ViT {missing[:8]}, shape mismatch {shapes[:8]}")
    model.load_state_dict(src, strict=False)
    if getattr(vit, "pretrained_cfg", None):
        model.pretrained_cfg = dict(vit.pretrained_cfg)
    if images is not None and len(model.dtc):
        calibrate(model, images)
    return model.train(vit.training)


@torch.no_grad()
def calibrate(model: AdaptiVision, images: torch.Tensor) -> None:
    """Seed the centroids by k-means++ on ``images``' tokens and set the complexity statistics
    from the same batch (one forward in training mode, no gradient, no budget jitter)."""
    model.init_clusters(images)
    jitter = [d.budget_jitter for d in model.dtc.values()]
    was_training = model.training
    try:
        for d in model.dtc.values():
            d.budget_jitter = 0.0
            d.stats_seen.fill_(False)
        model.train()
        model(images)
    finally:
        for d, j in zip(model.dtc.values(), jitter, strict=True):
            d.budget_jitter = j
        model.train(was_training)
