"""Segmentation metrics: confusion matrix and mean IoU (the standard ADE20K / Cityscapes mIoU)."""
from __future__ import annotations

import torch


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(C, C) counts, rows = target class, columns = predicted class; ``ignore_index`` pixels skipped."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (t.max() >= num_classes or t.min() < 0):
        raise ValueError(f"target labels must be in [0, {num_classes}) or {ignore_index}, got {t.min()}..{t.max()}")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).view(num_classes, num_classes)


def iou(conf: torch.Tensor) -> torch.Tensor:
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class absent from both target and prediction."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(conf: torch.Tensor) -> float:
    """Mean over the classes that occur (in target or prediction), in percent."""
    return 100 * float(iou(conf).nanmean())
