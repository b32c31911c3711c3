"""Cost counting as the token-reduction papers count it (DESIGN.md §3).

"GFLOPs" in these papers are multiply-accumulates (timm's tables: deit_small 4.61, vit_base 17.58
GMACs at 224²). ``torch.utils.flop_counter`` counts 2·MACs and misses attention on CPU, fvcore
misses SDPA, so we count MACs ourselves with forward hooks: every ``nn.Linear`` and convolution
(transposed too) on the shapes it actually sees, plus the matrix products inside attention, CMTF and
DTC. Hooks see each group of images with its own K, so the mean over a batch is the mean over images of
their own cost. Norms, activations, softmax and additions are not counted (nor are they in the
papers' figures). The hand formula is in docs/model.md.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention

from .layers import AdaptiveFocusAttention, CrossModalTokenFusion, DynamicTokenClustering
from .layers.attention import attn_width
from .reduction import EViTBlock, HourglassStage, ReducingBlock, ToMeBlock


def module_macs(m: nn.Module, args: tuple, kwargs: dict, out) -> int:
    """MACs of one call of ``m`` (its own work, not its children's); 0 for modules we don't count."""
    if isinstance(m, nn.Linear):
        return args[0].numel() // m.in_features * m.in_features * m.out_features
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return out.numel() * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, nn.ConvTranspose2d):  # every input pixel scatters a (C_out, kh, kw) kernel
        kh, kw = m.kernel_size
        return args[0].numel() * (m.out_channels // m.groups) * kh * kw
    if isinstance(m, AdaptiveFocusAttention):  # before Attention: it is a subclass
        B, T = args[0].shape[:2]
        return m.attention_macs(B, T)
    if isinstance(m, Attention):  # QK^T and AV
        B, T = args[0].shape[:2]
        return 2 * B * T * T * attn_width(m)
    if isinstance(m, ReducingBlock):  # it calls its attention's layers, not its forward
        B, T = args[0].shape[:2]
        macs = 2 * B * T * T * attn_width(m.attn)
        if isinstance(m, ToMeBlock):  # bipartite matching: cosine scores of the two halves
            macs += B * (T // 2) * (T - T // 2) * m.attn.head_dim
        if isinstance(m, EViTBlock):  # [CLS] attention row, all heads
            macs += B * T * attn_width(m.attn)
        return macs
    if hasattr(m, "call_macs"):  # a module that counts its own products (LeMeViT's attention)
        return m.call_macs(*args, **kwargs)
    if isinstance(m, WindowAttention):  # Swin: QK^T and AV inside each window, (B * windows, N, C)
        B, N, C = args[0].shape
        return 2 * B * N * N * C
    if isinstance(m, CrossModalTokenFusion):
        (s, g) = args[:2]
        return m.attention_macs(s.shape[0], s.shape[1], g.shape[1])
    if isinstance(m, DynamicTokenClustering):
        z, k = args[0], args[2]
        B, N, D = z.shape
        # distances + condensation, and each soft k-means step (centroid update + distances)
        macs = (2 + 2 * m.iters) * B * N * k * D
        if m.centers == "fps":  # the image's token-to-token distances that farthest-point sampling reads
            macs += B * N * N * D
        elif m.centers == "grid":  # each centre is the mean of its cell: every token added once
            macs += B * N * D
        if m.dynamic and m.complexity == "entropy":  # assignment to all K_max centroids for the score
            macs += B * N * m.k_max * D
        return macs
    if isinstance(m, HourglassStage):  # distances and centre updates per iteration, the final mean
        z, (s, _, _) = args[0], out
        B, N, D = z.shape
        return (2 * m.iters + 1) * B * N * s.shape[1] * D
    return 0


@torch.no_grad()
def profile(model: nn.Module, images: torch.Tensor, **forward_kwargs) -> dict:
    """Params and mean MACs per image of ``model`` on ``images`` (each image with its own K).

    Returns ``params`` (count), ``gmacs`` (mean GMACs per image) and, for AdaptiVision models,
    ``mean_k`` (mean number of super-tokens per stage). Runs in eval mode and restores the mode.
    """
    total = [0]

    def hook(m, args, kwargs, out):
        total[0] += module_macs(m, args, kwargs, out)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        model(images, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    B = images.shape[0]
    result = dict(params=sum(p.numel() for p in model.parameters()), gmacs=total[0] / B / 1e9, images=B)
    ks: Optional[torch.Tensor] = getattr(model, "last_num_clusters", None)
    if ks is not None and ks.numel():
        result["mean_k"] = ks.float().mean(0).tolist()
    return result
