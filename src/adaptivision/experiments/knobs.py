"""The budget knob of each reduction: read, set, and match a GMACs target."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..profile import profile
from ..reduction import EViTBlock, ImportanceStage, RandomKeep, ToMeBlock


def reduction_of(model: nn.Module) -> str:
    opts = getattr(model, "opts", None)
    return opts.reduction if opts is not None else "none"


def set_knob(model: nn.Module, value: float) -> None:
    """DTC: the budget bias; ToMe: r per block; random/importance/EViT: the keep ratio."""
    red = reduction_of(model)
    if red == "dtc":
        model.set_token_budget(bias=float(value))
        return
    if red == "none":
        raise ValueError("reduction='none' has no budget knob")
    for m in model.modules():
        if isinstance(m, ToMeBlock):
            m.r = int(value)
        elif isinstance(m, (EViTBlock, ImportanceStage, RandomKeep)):
            m.keep_ratio = float(value)


def tome_r(model: nn.Module, fraction: float) -> int:
    """ToMe's r as a fraction of (patches / depth): 1.0 merges nearly every token by the end."""
    return max(1, round(fraction * model.patch_embed.num_patches / len(model.blocks)))


@torch.no_grad()
def match_gmacs(model: nn.Module, images: torch.Tensor, target: float) -> tuple[float, float]:
    """Set the knob of ``model`` so that its mean GMACs on ``images`` are closest to ``target``.
    Returns (knob, gmacs). GMACs fall as ToMe's r rises and rise with the keep ratio."""
    red = reduction_of(model)
    if red == "tome":
        best = None
        for r in range(0, model.patch_embed.num_patches // 2 + 1):
            set_knob(model, r)
            g = profile(model, images)["gmacs"]
            if best is None or abs(g - target) < abs(best[1] - target):
                best = (r, g)
            if g < target:
                break
    else:
        lo, hi, best = 0.02, 1.0, None
        for _ in range(14):
            mid = (lo + hi) / 2
            set_knob(model, mid)
            g = profile(model, images)["gmacs"]
            if best is None or abs(g - target) < abs(best[1] - target):
                best = (round(mid, 4), g)
            lo, hi = (mid, hi) if g < target else (lo, mid)
    set_knob(model, best[0])
    return best
