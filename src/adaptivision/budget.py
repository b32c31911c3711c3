"""Token budgets, in one place: parse a budget, apply it to any model, match a GMACs target.

A budget is one ``key=value``: for DTC ``gmacs`` (mean GMACs per image), ``mean_k``, ``bias``
(the knob itself) or ``k`` (one fixed K for every image, also below the trained ``k_min``); for
the baselines ``tome_r`` (ToMe's merges per block) or ``keep_ratio`` (random, DynamicViT, EViT).
Calibrated budgets are measured on a batch of images and then fixed. Every search is :func:`bisect`.

Layering: this module uses the layers, the baselines and :mod:`.profile`, never the model
class (which calls it for ``AdaptiVision.set_token_budget``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import yaml

from .profile import profile
from .reduction import EViTBlock, HourglassStage, ImportanceStage, RandomKeep, ToFeStage, ToMeBlock

DTC_KEYS = ("gmacs", "mean_k", "bias", "k")
KNOB_KEYS = ("tome_r", "keep_ratio")
BUDGET_KEYS = DTC_KEYS  # what a model spec (NAME:key=value) treats as a budget, not a model option


def _number(what: str, key: str, value) -> float:
    # nan would calibrate to nothing and be silently ignored
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what}: {key}={value!r} is not a finite number")
    return value


def parse_budget(text: str) -> dict:
    """``'gmacs=1.3'`` -> ``{'gmacs': 1.3}`` (any of DTC_KEYS and KNOB_KEYS)."""
    key, sep, value = text.partition("=")
    if not sep or key not in DTC_KEYS + KNOB_KEYS:
        raise ValueError(f"--budget {text!r}: expected one of {', '.join(k + '=' for k in DTC_KEYS + KNOB_KEYS)}")
    return {key: _number(f"--budget {text!r}", key, yaml.safe_load(value))}


def parse_spec(spec: str) -> tuple[str, dict, dict]:
    """``NAME[:key=value...]`` -> (name, model kwargs, budget)."""
    name, *opts = spec.split(":")
    kwargs, budget = {}, {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise ValueError(f"model spec {spec!r}: expected NAME:key=value, got {opt!r}")
        (budget if key in BUDGET_KEYS else kwargs)[key] = yaml.safe_load(value)
    for key, v in budget.items():
        _number(f"model spec {spec!r}", key, v)
    if len(budget) > 1:
        raise ValueError(f"model spec {spec!r}: give one budget of {', '.join(BUDGET_KEYS)}")
    return name, kwargs, budget


def bisect(measure: Callable[[float], float], target: float, lo: float, hi: float, steps: int) -> tuple:
    """The x in [lo, hi] whose ``measure(x)`` (increasing in x) came closest to ``target``: (x, value)."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        val = measure(mid)
        if best is None or abs(val - target) < abs(best[1] - target):
            best = (mid, val)
        lo, hi = (mid, hi) if val < target else (lo, mid)
    return best


def reduction_of(model: nn.Module) -> str:
    opts = getattr(model, "opts", None)
    return opts.reduction if opts is not None else "none"


def set_infer_k_step(model: nn.Module, step: Optional[int]) -> None:
    """Per-image K on the grid of ``step`` at inference in every DTC stage of ``model`` (None: each stage's
    training ``k_step``). The weights are unchanged: it only decides how K is rounded, so how many groups
    a batch splits into (docs/model.md, ``infer_k_step``)."""
    first_dtc(model)  # names a model without DTC
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise ValueError(f"infer_k_step={step!r}: expected None or an integer >= 1")
    for stage in model.dtc.values():
        stage.infer_k_step = step
    model.opts.infer_k_step = step


def first_dtc(model: nn.Module):
    if not len(getattr(model, "dtc", None) or ()):
        raise ValueError("this model has no DTC stage (condense_at=None): there is no token budget")
    return next(iter(model.dtc.values()))


def set_knob(model: nn.Module, value: float) -> None:
    """DTC: the budget bias; ToMe: r per block; the others: the keep ratio."""
    method = reduction_of(model)
    if method == "dtc":
        first_dtc(model).budget_bias = float(value)
        return
    if method == "none":
        raise ValueError("reduction='none' has no budget knob")
    for m in model.modules():
        if isinstance(m, ToMeBlock):
            m.r = int(value)
        elif isinstance(m, (EViTBlock, HourglassStage, ImportanceStage, RandomKeep, ToFeStage)):
            m.keep_ratio = float(value)


def tome_r(model: nn.Module, fraction: float) -> int:
    """ToMe's r as a fraction of (patches / depth): 1.0 merges nearly every token by the end."""
    return max(1, round(fraction * model.patch_embed.num_patches / len(model.blocks)))


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def set_token_budget(model: nn.Module, images: Optional[torch.Tensor] = None, mean_k: Optional[float] = None,
                     gmacs: Optional[float] = None, bias: Optional[float] = None, **forward_kwargs) -> float:
    """Set the inference budget of the first DTC stage; returns the knob it chose.

    ``bias``: set the knob directly. ``mean_k``: mean K over ``images``. ``gmacs``: mean GMACs
    per image over ``images`` (measured with :func:`adaptivision.profile`). With
    ``dynamic=False`` the knob is the fixed K itself.
    """
    if sum(v is not None for v in (mean_k, gmacs, bias)) != 1:
        raise ValueError("set_token_budget takes exactly one of mean_k=, gmacs=, bias=")
    dtc = first_dtc(model)
    if bias is not None:
        dtc.budget_bias = float(bias)
        return dtc.budget_bias
    if images is None:
        raise ValueError("set_token_budget(mean_k=|gmacs=) calibrates on a batch: pass images=")
    if mean_k is not None and not dtc.k_min <= mean_k <= dtc.k_max:
        raise ValueError(f"mean_k={mean_k} is outside this model's range [{dtc.k_min}, {dtc.k_max}]")

    def gmacs_at(**knob) -> float:
        for k, v in knob.items():
            setattr(dtc, k, v)
        return profile(model, images, **forward_kwargs)["gmacs"]

    with _eval_mode(model):
        if not dtc.dynamic:  # the knob is K itself: pick the allowed K closest to the request
            step = dtc.k_step
            cands = sorted({dtc.k_min, dtc.k_max, *range(-(-dtc.k_min // step) * step, dtc.k_max + 1, step)})
            target = mean_k if mean_k is not None else gmacs
            dtc.fixed_k = min(cands, key=lambda k: abs((k if mean_k is not None else gmacs_at(fixed_k=k)) - target))
            return float(dtc.fixed_k)
        if mean_k is not None:  # one forward for the scores, then the bias is found without the model
            dtc.budget_bias = 0.0
            model.forward_features(images, **forward_kwargs)
            score = dtc.last_score
            best = bisect(lambda b: dtc.k_from_score(score, b).float().mean().item(), mean_k, -20.0, 20.0, 30)
        else:  # 40 / 2**12 ~ 0.01 in bias
            best = bisect(lambda b: gmacs_at(budget_bias=b), gmacs, -20.0, 20.0, 12)
            if abs(best[1] - gmacs) > 0.05 * gmacs:  # never a silent miss
                lo_g, hi_g = gmacs_at(budget_bias=-20.0), gmacs_at(budget_bias=20.0)
                dtc.budget_bias = 0.0
                raise ValueError(f"gmacs={gmacs} is out of this model's reach on these images: its K range "
                                 f"[{dtc.k_min}, {dtc.k_max}] gives {lo_g:.4g} to {hi_g:.4g} GMACs")
        dtc.budget_bias = best[0]
        return best[0]


@torch.no_grad()
def match_gmacs(model: nn.Module, images: torch.Tensor, target: float) -> tuple[float, float]:
    """Set the knob of ``model`` (any reduction) so that its mean GMACs on ``images`` are closest
    to ``target``. Returns (knob, gmacs). GMACs fall as ToMe's r rises and rise with the others."""
    method = reduction_of(model)
    if method == "dtc":
        knob = set_token_budget(model, images, gmacs=target)
        return knob, profile(model, images)["gmacs"]
    if method == "tome":
        best = None
        for r in range(0, model.patch_embed.num_patches // 2 + 1):
            set_knob(model, r)
            g = profile(model, images)["gmacs"]
            if best is None or abs(g - target) < abs(best[1] - target):
                best = (r, g)
            if g < target:
                break
    else:
        def gmacs_at(ratio: float) -> float:
            set_knob(model, ratio)
            return profile(model, images)["gmacs"]
        best = bisect(gmacs_at, target, 0.02, 1.0, 14)
        best = (round(best[0], 4), best[1])
    set_knob(model, best[0])
    return best


def apply_budget(model: nn.Module, budget: dict, images: torch.Tensor, **forward_kwargs) -> None:
    """Apply one budget (see the module docstring) to ``model``; calibrated ones on ``images``
    (``forward_kwargs``: the guidance the model is evaluated with)."""
    if not budget:
        return
    (key, value), = budget.items()
    if key in KNOB_KEYS:
        set_knob(model, value)
        return
    dtc = first_dtc(model)
    if key == "k":
        # below k_min is allowed: the centres exist for any K (an image's farthest points, or a
        # prefix of the nested centroids); the model was only not trained there (docs/results.md)
        if not 1 <= int(value) <= dtc.k_max:
            raise ValueError(f"k={value} is outside this model's range [1, {dtc.k_max}] (trained on "
                             f"[{dtc.k_min}, {dtc.k_max}])")
        dtc.dynamic, dtc.fixed_k = False, int(value)
    else:
        set_token_budget(model, images, **{key: float(value)}, **forward_kwargs)


@contextlib.contextmanager
def fixed_k(model: nn.Module, k: Optional[int]):
    """Temporarily run every DTC stage of ``model`` with one K (the first stage gets ``k``,
    later stages keep their own fixed K or k_max): ONNX export needs one K per stage, or a model
    built with ``pad_k`` (per-image K in a fixed number of slots), which keeps its per-image K when
    ``k`` is None."""
    stages = list(getattr(model, "dtc", {}).values()) if hasattr(model, "dtc") else []
    saved = [(s.dynamic, s.fixed_k) for s in stages]
    if k is None and stages and all(getattr(s, "pad_k", None) for s in stages):
        yield model  # one graph already: nothing to fix
        return
    try:
        for i, s in enumerate(stages):
            if k is not None and i == 0:
                if not s.k_min <= k <= s.k_max:
                    raise ValueError(f"fixed_k={k} is outside the model's range [{s.k_min}, {s.k_max}]")
                s.fixed_k = int(k)
            elif s.dynamic and s.fixed_k is None:
                raise ValueError("ONNX export needs one K per DTC stage: pass fixed_k= (first stage), or build "
                                 "the model with dynamic=False or with pad_k= (per-image K in pad_k slots)")
            s.dynamic = False
        yield model
    finally:
        for s, (dyn, fk) in zip(stages, saved, strict=True):
            s.dynamic, s.fixed_k = dyn, fk
