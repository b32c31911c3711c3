"""A plain dense-prediction training loop (``fit``: AdamW, timm's cosine schedule with warm-up),
segmentation's loss (cross-entropy on the upsampled logits with ``ignore_index=255``) and mIoU
evaluation; used by ``adaptivision segment``, ``adaptivision detect`` and
``benchmarks/mosaic_segmentation.py``."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler

from ..checkpoint import atomic_write, rng_state, set_rng_state
from ..profile import profile
from .metrics import confusion, mean_iou

IGNORE = 255


@dataclass
class Progress:
    """What a long dense run keeps beside its training: every ``save_every`` updates the whole
    training state goes to ``state_path`` (one file, written atomically; a killed run resumes
    there), and every ``eval_every`` updates ``eval_fn(model)`` (e.g. mIoU) joins ``curve`` as
    ``{"step", "value"}``, the evidence that training reached its plateau. ``identity``: the
    settings a saved state must have been written with (resuming with others is refused)."""
    state_path: Optional[str] = None
    save_every: int = 0
    eval_fn: Optional[Callable] = None
    eval_every: int = 0
    identity: dict = field(default_factory=dict)
    curve: list = field(default_factory=list)
    seconds: float = 0.0  # wall time of the training loop so far, over every process that resumed it

    def due(self, every: int, step: int, steps: int) -> bool:
        return every > 0 and (step % every == 0 or step == steps)


def _resume(progress: Progress, model, opt, sched, g: torch.Generator) -> int:
    """Load ``progress.state_path`` into the training objects; returns the updates already done."""
    try:
        state = torch.load(progress.state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a torch file: weights_only refuses anything else
        raise ValueError(f"training state {progress.state_path} is unreadable ({type(e).__name__}: {e}); "
                         "delete it to start the run again") from e
    if state.get("identity") != progress.identity:
        theirs = state.get("identity") or {}
        diff = sorted(k for k in set(theirs) | set(progress.identity) if theirs.get(k) != progress.identity.get(k))
        raise ValueError(f"training state {progress.state_path} was written with other settings ("
                         + ", ".join(f"{k}: {theirs.get(k)!r} there, {progress.identity.get(k)!r} now" for k in diff[:4])
                         + "): pass another --name, or delete it to start again (nothing was touched)")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    g.set_state(state["generator"])
    set_rng_state(state["rng"])
    progress.curve[:] = state["curve"]
    progress.seconds = float(state.get("seconds", 0.0))  # states saved before 2026-11-29 lack it
    return int(state["step"])


def _save(progress: Progress, step: int, model, opt, sched, g: torch.Generator) -> None:
    state = dict(step=step, identity=progress.identity, model=model.state_dict(), optimizer=opt.state_dict(),
                 scheduler=sched.state_dict(), generator=g.get_state(), rng=rng_state(), curve=progress.curve,
                 seconds=progress.seconds)
    atomic_write(progress.state_path, lambda p: torch.save(state, p))


def fit(model, backbone, ds, steps: int, batch: int, loss_fn: Callable, lr: float = 1e-3, seed: int = 0,
        log: Callable = print, weight_decay: float = 0.05, log_every: int = 50, progress: Optional[Progress] = None):
    """``steps`` AdamW updates (cosine schedule, 10% warm-up) on random batches of ``ds``;
    ``loss_fn(model, items)`` gives the loss of a list of items; ``backbone``: the ViT inside
    ``model`` (learned centroids are seeded from its tokens). ``progress``: checkpoints to resume
    from and an evaluation curve (see :class:`Progress`). Returns the model in eval mode."""
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {steps}, {batch}")
    progress = progress or Progress()
    if getattr(backbone, "dtc", None) is not None and len(backbone.dtc):  # centroids from real tokens
        backbone.init_clusters(torch.stack([ds[i][0] for i in range(min(64, len(ds)))]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 10)
    sched = CosineLRScheduler(opt, t_initial=steps, warmup_t=warm, warmup_lr_init=lr / warm, lr_min=0.0,
                              t_in_epochs=False)
    g = torch.Generator().manual_seed(seed)
    start = 0
    if progress.state_path and os.path.isfile(progress.state_path):
        start = _resume(progress, model, opt, sched, g)
        log(f"resuming at step {start}/{steps} from {progress.state_path}")
    model.train()
    t0, before = time.time(), progress.seconds
    for step in range(start, steps):
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
        if progress.eval_fn and progress.due(progress.eval_every, step + 1, steps):
            with torch.random.fork_rng(devices=[]):  # evaluating must not move training's random stream
                value = progress.eval_fn(model)
            model.train()
            progress.curve.append(dict(step=step + 1, value=value))
            log(f"step {step + 1}/{steps} evaluation {value:.2f}")
        progress.seconds = before + time.time() - t0
        if progress.state_path and progress.due(progress.save_every, step + 1, steps) and step + 1 < steps:
            _save(progress, step + 1, model, opt, sched, g)
    return model.eval()


def segmentation_loss(model, items: list) -> torch.Tensor:
    x, y = zip(*items, strict=True)
    return F.cross_entropy(model(torch.stack(x)), torch.stack(y), ignore_index=IGNORE)


def train_segmenter(model, ds, steps: int, batch: int, lr: float = 1e-3, seed: int = 0,
                    log: Callable = print, weight_decay: float = 0.05, log_every: int = 50,
                    progress: Optional[Progress] = None):
    """``steps`` updates on random batches of ``ds`` ((image, mask) pairs); returns the model in eval mode."""
    return fit(model, model.backbone, ds, steps, batch, segmentation_loss, lr, seed, log, weight_decay, log_every,
               progress)


@torch.no_grad()
def evaluate_segmenter(model, ds, num_classes: int, gmacs: bool = True, batch: int = 50) -> dict:
    """mIoU (%) over ``ds`` and (``gmacs``) the mean GMACs per image (decoder included)."""
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for i in range(0, len(ds), batch):
        x, y = zip(*(ds[j] for j in range(i, min(i + batch, len(ds)))), strict=True)
        conf += confusion(model(torch.stack(x)).argmax(1), torch.stack(y), num_classes, IGNORE)
    out = dict(miou=mean_iou(conf), images=len(ds))
    if gmacs:
        out["gmacs"] = profile(model, torch.stack([ds[j][0] for j in range(min(64, len(ds)))]))["gmacs"]
    return out
