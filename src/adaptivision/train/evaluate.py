"""Evaluation (top-1/top-5 over a whole data set, reduced across processes) and measurement
(params, GMACs, mean K, images/s) of a trained model."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..guidance import Guidance
from ..profile import profile
from ..timing import autocast, throughput
from .build import guidance_kwargs
from .distributed import Dist, all_sum


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, d: Dist, amp: str = "none",
             class_indices: Optional[list] = None, guide: Optional[Guidance] = None,
             guidance_mode: str = "normal") -> dict:
    """Top-1/top-5 (%) and loss over the whole data set (reduced across processes).
    ``class_indices`` scores a 1000-way head on a class subset (ImageNet-A/R); ``guide`` and
    ``guidance_mode`` (normal | missing | shuffled | random) give a guided model its inputs."""
    model.eval()
    correct1 = correct5 = loss_sum = n = skipped = 0.0
    idx = torch.tensor(class_indices, device=d.device) if class_indices is not None else None
    for x, y, skip in loader:
        skipped += skip
        if x is None:
            continue
        x, y = x.to(d.device), y.to(d.device)
        with autocast(amp, d.device):
            logits = model(x, **guidance_kwargs(guide, x, guidance_mode)).float()
        if idx is not None:
            logits = logits[:, idx]
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(1).sum().item()
        n += len(y)
    correct1, correct5, loss_sum, n, skipped = all_sum([correct1, correct5, loss_sum, n, skipped], d)
    if n == 0:
        raise RuntimeError("evaluation saw no readable image")
    return dict(top1=100 * correct1 / n, top5=100 * correct5 / n, loss=loss_sum / n, images=int(n),
                skipped=int(skipped))


@torch.inference_mode()
def measure(model: nn.Module, images: torch.Tensor, batch: int, device: torch.device, repeats: int = 10,
            guide: Optional[Guidance] = None) -> dict:
    """Params (M), mean GMACs over ``images`` (each with its own K, CMTF counted with the
    guidance the model is given), mean K and images/s (the model alone, guidance precomputed, on these images)."""
    model = model.to(device).eval()
    images = images.to(device)
    prof = profile(model, images, **guidance_kwargs(guide, images))
    tp = throughput(model, tuple(images.shape[1:]), batch, device, repeats=repeats, images=images)
    return dict(params_m=prof["params"] / 1e6, gmacs=prof["gmacs"], mean_k=prof.get("mean_k"),
                img_per_s=tp["img_per_s"])
