"""A plain dense-prediction training loop (``fit``: AdamW, timm's cosine schedule with warm-up),
segmentation's loss (cross-entropy on the upsampled logits with ``ignore_index=255``) and mIoU
evaluation; used by ``adaptivision segment``, ``adaptivision detect`` and
``benchmarks/mosaic_segmentation.py``."""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler

from ..profile import profile
from .metrics import confusion, mean_iou

IGNORE = 255


def fit(model, backbone, ds, steps: int, batch: int, loss_fn: Callable, lr: float = 1e-3, seed: int = 0,
        log: Callable = print, weight_decay: float = 0.05, log_every: int = 50):
    """``steps`` AdamW updates (cosine schedule, 10% warm-up) on random batches of ``ds``;
    ``loss_fn(model, items)`` gives the loss of a list of items; ``backbone``: the ViT inside
    ``model`` (learned centroids are seeded from its tokens). Returns the model in eval mode."""
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {steps}, {batch}")
    if getattr(backbone, "dtc", None) is not None and len(backbone.dtc):  # centroids from real tokens
        backbone.init_clusters(torch.stack([ds[i][0] for i in range(min(64, len(ds)))]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 10)
    sched = CosineLRScheduler(opt, t_initial=steps, warmup_t=warm, warmup_lr_init=lr / warm, lr_min=0.0,
                              t_in_epochs=False)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(ds), (batch,), generator=g).tolist()
        loss = loss_fn(model, [ds[i] for i in idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step_update(step + 1)
        if step % log_every == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    return model.eval()


def segmentation_loss(model, items: list) -> torch.Tensor:
    x, y = zip(*items, strict=True)
    return F.cross_entropy(model(torch.stack(x)), torch.stack(y), ignore_index=IGNORE)


def train_segmenter(model, ds, steps: int, batch: int, lr: float = 1e-3, seed: int = 0,
                    log: Callable = print, weight_decay: float = 0.05, log_every: int = 50):
    """``steps`` updates on random batches of ``ds`` ((image, mask) pairs); returns the model in eval mode."""
    return fit(model, model.backbone, ds, steps, batch, segmentation_loss, lr, seed, log, weight_decay, log_every)


@torch.no_grad()
def evaluate_segmenter(model, ds, num_classes: int, batch: int = 50) -> dict:
    """mIoU (%) over ``ds`` and the mean GMACs per image (decoder included)."""
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for i in range(0, len(ds), batch):
        x, y = zip(*(ds[j] for j in range(i, min(i + batch, len(ds)))), strict=True)
        conf += confusion(model(torch.stack(x)).argmax(1), torch.stack(y), num_classes, IGNORE)
    x = torch.stack([ds[j][0] for j in range(min(64, len(ds)))])
    return dict(miou=mean_iou(conf), gmacs=profile(model, x)["gmacs"], images=len(ds))
