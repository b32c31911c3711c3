"""The training objective (paper 3.6, eqs. 12-15; DESIGN.md §1).

``L = L_CE + lambda_1 L_cluster + lambda_2 L_align`` as one module that returns every term, so
the engine can log them. With a teacher (``distill_weight`` alpha > 0) the task term becomes
``(1 - alpha) L_CE + alpha L_distill`` (not in the paper: a lever of docs/results.md). The
model hands over what the terms need in ``aux`` (see
``AdaptiVision.forward(..., return_aux=True)``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers.dtc import soft_assign


def cluster_loss(terms: Sequence[tuple], detach_tokens: bool = True) -> torch.Tensor:
    """Eq. 14, ``sum_k a_ik ||z_i - mu_k||^2``, averaged over every image and token.

    ``terms``: ``(zs, mu, tau)`` per group of images (``zs`` (B, N, D) in DTC's assignment space,
    ``mu`` (K, D) or (B, K, D)). With ``detach_tokens`` the gradient reaches only the centroids:
    pulling the tokens onto the centroids would let the embedding collapse (loss -> 0, no content).
    """
    total, count = None, 0
    for zs, mu, tau in terms:
        if detach_tokens:
            zs = zs.detach()
        a, d2 = soft_assign(zs, mu, tau)                                            # (B, N, K) each
        s = (a * d2).sum(-1).sum()                                                  # sum over k, i, images
        total = s if total is None else total + s
        count += zs.shape[0] * zs.shape[1]
    if total is None:
        raise ValueError("cluster_loss needs at least one DTC stage (the model has condense_at=None)")
    return total / count


def align_loss(z: torch.Tensor, g: torch.Tensor, temperature: float = 0.07,
               ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 15, InfoNCE with in-batch negatives and cosine similarity.

    z: (B, E) projected visual features; g: (B, E) the guidance embedding of each image.
    ``ids`` (B,) (e.g. class labels): rows with the same id share one embedding, so the
    negatives are the *other* ids in the batch (no image is pushed away from its own class).
    """
    z = F.normalize(z.float(), dim=-1)
    g = F.normalize(g.float(), dim=-1)
    if ids is None:
        target = torch.arange(z.shape[0], device=z.device)
        cand = g                                                                    # (B, E)
    else:
        uniq, target = torch.unique(ids, return_inverse=True)                       # (U,), (B,)
        onehot = target.unsqueeze(1) == torch.arange(uniq.shape[0], device=z.device)  # (B, U)
        cand = g[onehot.int().argmax(0)]                                            # (U, E) first row of each id
    logits = z @ cand.t() / temperature                                             # (B, B|U)
    return F.cross_entropy(logits, target)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0, kind: str = "soft") -> torch.Tensor:
    """Knowledge distillation from a teacher's logits, both (B, C). ``'soft'``: Hinton et al.'s
    ``tau^2 KL(softmax(t / tau) || softmax(s / tau))`` per image; ``'hard'``: DeiT's cross-entropy
    to the teacher's argmax (here on the one class head: no distillation token)."""
    teacher = teacher.detach().float()
    if kind == "hard":
        return F.cross_entropy(student.float(), teacher.argmax(-1))
    if kind != "soft":
        raise ValueError(f"Invalid value for 'distill_kind': {kind!r}; allowed: 'soft' or 'hard'.")
    log_p = F.log_softmax(student.float() / tau, -1)                                # (B, C)
    log_q = F.log_softmax(teacher / tau, -1)                                        # (B, C)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * tau * tau


class AdaptiVisionLoss(nn.Module):
    """Eq. 12. ``base`` is the task loss (default cross-entropy, eq. 13; pass timm's
    ``SoftTargetCrossEntropy`` for Mixup targets or ``LabelSmoothingCrossEntropy``)."""

    def __init__(self, lambda_cluster: float = 0.0, lambda_align: float = 0.0,
                 align_temperature: float = 0.07, detach_tokens: bool = True,
                 base: Optional[nn.Module] = None, lambda_reduction: float = 2.0,
                 distill_weight: float = 0.0, distill_tau: float = 1.0, distill_kind: str = "soft"):
        super().__init__()
        for name, v in (("lambda_cluster", lambda_cluster), ("lambda_align", lambda_align)):
            if v < 0:
                raise ValueError(f"Invalid value for '{name}': {v!r}; allowed: a float >= 0.")
        if align_temperature <= 0:
            raise ValueError(f"Invalid value for 'align_temperature': {align_temperature!r}; allowed: > 0.")
        self.lambda_cluster, self.lambda_align = lambda_cluster, lambda_align
        self.align_temperature, self.detach_tokens = align_temperature, detach_tokens
        self.base = base if base is not None else nn.CrossEntropyLoss()
        self.lambda_reduction = lambda_reduction  # DynamicViT's ratio-loss weight (its paper: 2.0)
        self.distill_weight, self.distill_tau, self.distill_kind = distill_weight, distill_tau, distill_kind

    def forward(self, logits: torch.Tensor, target: torch.Tensor, aux: Optional[dict] = None,
                guidance_targets: Optional[torch.Tensor] = None,
                guidance_ids: Optional[torch.Tensor] = None, teacher_logits: Optional[torch.Tensor] = None) -> dict:
        ce = self.base(logits, target)
        out = {"ce": ce, "loss": ce}
        if self.distill_weight > 0:
            if teacher_logits is None:
                raise ValueError("distill_weight > 0 needs teacher_logits (the teacher's outputs on the same images)")
            out["distill"] = distill_loss(logits, teacher_logits, self.distill_tau, self.distill_kind)
            out["loss"] = (1 - self.distill_weight) * ce + self.distill_weight * out["distill"]
        if self.lambda_cluster > 0:
            if not aux or not aux.get("cluster"):
                raise ValueError("lambda_cluster > 0 needs the model's aux outputs from a model with DTC "
                                 "(call model(x, return_aux=True))")
            out["cluster"] = cluster_loss(aux["cluster"], self.detach_tokens)
            out["loss"] = out["loss"] + self.lambda_cluster * out["cluster"]
        if aux is not None and aux.get("reduction") is not None and self.lambda_reduction > 0:
            out["reduction"] = aux["reduction"]  # the baseline's own training term (DynamicViT's ratio, ToFe's budget)
            out["loss"] = out["loss"] + self.lambda_reduction * out["reduction"]
        if self.lambda_align > 0:
            if aux is None or aux.get("align") is None:
                raise ValueError("lambda_align > 0 needs a model built with align_dim=... and its aux outputs")
            if guidance_targets is None:
                raise ValueError("lambda_align > 0 needs guidance_targets (the guidance embedding per image)")
            out["align"] = align_loss(aux["align"], guidance_targets, self.align_temperature, guidance_ids)
            out["loss"] = out["loss"] + self.lambda_align * out["align"]
        return out
