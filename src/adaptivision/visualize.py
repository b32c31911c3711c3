"""``adaptivision visualize``: what the clustering does, as pictures.

For each image: the image; its super-token partition (every patch coloured by the cluster it
gives most of its weight to, with the image's K); and the AFA modulation ``M = 1 + sum_r u_r v_r^T``
(eq. 6) of a chosen block, which shows how AFA re-weights the attention between super-tokens.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from .layers import AFABlock, modulation_matrix


@torch.no_grad()
def clustering(model, x: torch.Tensor, block: Optional[int] = None, guidance=None, patch_weights=None) -> list:
    """Per image: ``labels`` (H', W') strongest cluster of each patch, ``k``, and ``m`` (K+1, K+1)
    AFA modulation at the input of ``block`` (default: the last block), or None without AFA.
    ``guidance``/``patch_weights``: what a guided model is given (they change K and the clusters)."""
    model.eval()
    if not len(model.dtc):
        raise ValueError("this model has no DTC stage (condense_at=None): there is no clustering to show")
    first = int(next(iter(model.dtc)))
    block = len(model.blocks) - 1 if block is None else block
    if not first < block < len(model.blocks):
        raise ValueError(f"--block must be after the first condensation (block {first}) and below "
                         f"{len(model.blocks)}, got {block}")
    H, W = model.patch_embed.dynamic_feat_size(x.shape[-2:])
    out: list = [None] * x.shape[0]
    tokens = model.forward_tokens(x, guidance, patch_weights, last=block - 1)  # groups entering ``block``
    blk = model.blocks[block]
    for grp in tokens.groups:
        a = grp.assign[0]                                                            # (b, N, K) first stage
        m = None
        if isinstance(blk, AFABlock):
            u, v = blk.attn.modulator(blk.norm1(grp.x), grp.mass)                    # (b, R, T)
            m = modulation_matrix(u, v)                                              # (b, T, T)
        for j, idx in enumerate(grp.index.tolist()):
            out[idx] = dict(labels=a[j].argmax(-1).view(H, W).cpu().numpy(), k=a.shape[-1],
                            m=None if m is None else m[j].cpu().numpy())
    return out


@torch.no_grad()
def assignment_stats(model, x: torch.Tensor, **forward_kwargs) -> dict:
    """How sharp the first DTC stage's clusters are on images ``x``, means over images:
    ``top_weight`` (each patch's largest assignment weight, averaged over patches: 1 for a
    partition, 1/K for a uniform blur), ``effective_k`` (exp of the entropy of the slots' share
    of the patches: K when every slot holds N/K of them), ``light_slots`` (the share of slots
    holding less than half a patch) and ``mean_k`` (slots paid for)."""
    model.eval()
    if not len(model.dtc):
        raise ValueError("this model has no DTC stage (condense_at=None): there is no clustering to measure")
    rows = []
    for grp in model.forward_tokens(x, dense=True, **forward_kwargs).groups:
        a = grp.assign[0].float()                                                    # (b, N, K) first stage
        share = a.sum(1) / a.shape[1]                                                # (b, K) sums to 1
        entropy = -(share * share.clamp_min(1e-12).log()).sum(-1)                    # (b,)
        rows.append(torch.stack([a.max(-1).values.mean(-1), entropy.exp(),
                                 (a.sum(1) < 0.5).float().mean(-1),
                                 torch.full_like(entropy, a.shape[-1])], -1))        # (b, 4)
    mean = torch.cat(rows).mean(0).tolist()
    return dict(zip(("top_weight", "effective_k", "light_slots", "mean_k"), mean, strict=True))


def _display(img: torch.Tensor, mean, std) -> np.ndarray:
    x = img.cpu().float() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    x = x.clamp(0, 1).permute(1, 2, 0).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def save_figure(path: str, img: np.ndarray, info: dict, title: str = "", block: Optional[int] = None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if info["m"] is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4))
    axes[0].imshow(img, cmap="gray" if img.ndim == 2 else None)
    axes[0].set_title(title or "image", fontsize=8)
    h, w = img.shape[:2]
    rng = np.random.default_rng(0)  # a fixed colour per cluster index (cluster k means the same in every image)
    colours = rng.uniform(0.15, 1.0, size=(info["labels"].max() + 1, 3))
    axes[1].imshow(img, cmap="gray" if img.ndim == 2 else None)
    axes[1].imshow(colours[info["labels"]], alpha=0.6, extent=(0, w, h, 0), interpolation="nearest")
    axes[1].set_title(f"super-tokens: K = {info['k']}", fontsize=8)
    if info["m"] is not None:
        im = axes[2].imshow(info["m"], cmap="coolwarm")
        axes[2].set_title(f"AFA modulation M, block {block} (CLS first)", fontsize=8)
        fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def visualize(model, images: torch.Tensor, out: str, names: list, mean, std, block: Optional[int] = None,
              **guidance) -> list:
    """Write one PNG per image into ``out``; returns their paths. ``guidance``: ``guidance=`` and
    ``patch_weights=`` of a guided model (see :class:`adaptivision.guidance.Guidance`)."""
    os.makedirs(out, exist_ok=True)
    block = len(model.blocks) - 1 if block is None else block
    infos = clustering(model, images, block, **guidance)
    paths = []
    for img, info, name in zip(images, infos, names, strict=True):
        stem = os.path.splitext(os.path.basename(str(name)))[0]
        paths.append(save_figure(os.path.join(out, f"{stem}.png"), _display(img, mean, std), info, str(name), block))
    return paths
