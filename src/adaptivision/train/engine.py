"""The training engine: one process, one GPU, or many under ``torchrun`` (DDP).

``run(cfg)`` trains the configured model and, with ``compare_dense``, the dense model of the
same width and depth with the same recipe, then measures GMACs and throughput of both in the
same process and writes ``summary.json`` / ``summary.md``. Only rank 0 writes anything.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..checkpoint import (
    CheckpointManager,
    load_pretrained,
    load_weights,
    rng_state,
    run_lock,
    save_weights,
    set_rng_state,
)
from ..data.datasets import build_dataset, collate_skip
from ..guidance import Guidance
from ..models import AdaptiVision
from ..objective import AdaptiVisionLoss
from ..provenance import provenance
from ..timing import autocast, resolve_amp

# the engine's parts, each in its own file; their names stay importable from here (callers and
# tests use ``engine.evaluate``, ``engine.load_for_eval``, ...)
from .build import (  # noqa: F401
    DENSE_KWARGS,
    build_eval_dataset,
    build_guidance,
    build_transforms,
    create_model,
    eval_loader,
    guidance_kwargs,
    limit_dataset,
    load_for_eval,
    load_guidance,
    load_teacher,
    model_spec,
    optimizer_params,
)
from .config import DENSE_TEACHER, TrainConfig
from .distributed import Dist, all_sum, setup_distributed  # noqa: F401
from .evaluate import evaluate, measure  # noqa: F401


# --- training -----------------------------------------------------------------------------------------
class NonFiniteLoss(FloatingPointError):
    pass


@dataclass
class Session:
    """Everything one training run holds (built by :func:`setup`, advanced by the loop of :func:`fit`)."""

    cfg: TrainConfig
    d: Dist
    run_dir: str
    dense: bool
    log: Callable
    model: nn.Module
    net: nn.Module                      # the model, or its DDP wrapper
    spec: dict
    guide: Optional[Guidance]
    eval_ds: object
    sampler: DistributedSampler
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    sched: object
    scaler: Optional[torch.amp.GradScaler]
    amp: str
    mixup: Optional[Mixup]
    criterion: AdaptiVisionLoss
    ema: Optional[ModelEmaV3]
    ckpt: CheckpointManager
    writer: object
    updates_per_epoch: int
    start_epoch: int = 0
    num_updates: int = 0
    best: float = -1.0
    teacher: Optional[nn.Module] = None  # distill_from's frozen model (the dense comparison trains without it)
    self_teach: bool = False             # self_distill: the model's own full-token path teaches (and learns)

    @property
    def name(self) -> str:
        return "dense" if self.dense else "model"

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.run_dir, "metrics.jsonl")


def setup(cfg: TrainConfig, run_dir: str, dense: bool, d: Dist, resume: bool = False, log=print) -> Session:
    """Data, model (seeded centroids), optimizer, schedule, AMP, EMA, loss, resumed state, DDP."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)  # timm's Mixup / CutMix draw from numpy's global generator
    # the data decide the head: a throw-away model gives the transforms (input size, mean, std)
    probe = create_model(model_spec(cfg, 1, dense))
    train_tf, eval_tf, mode = build_transforms(cfg, probe)
    train_ds = limit_dataset(build_dataset(cfg.dataset, cfg.data_dir, True, train_tf, mode, cfg.strict_images,
                                    cfg.download), cfg.limit_train)
    eval_ds = limit_dataset(build_dataset(cfg.dataset, cfg.data_dir, False, eval_tf, mode, cfg.strict_images,
                                   cfg.download), cfg.limit_eval)
    num_classes = len(train_ds.classes)
    if num_classes < 2 and d.main:
        log(f"warning: {cfg.dataset} at {cfg.data_dir} has {num_classes} class: every prediction is trivially right")
    guide = None if dense else build_guidance(cfg, train_ds.classes, probe)
    last = os.path.join(run_dir, "last.safetensors")  # a resumed run is rebuilt as it was saved
    spec = model_spec(cfg, num_classes, dense, guide, checkpoint=last if resume and os.path.isfile(last) else None)
    if guide is not None:  # what evaluation needs to rebuild the guidance without the training set
        spec["guidance"] = dict(sources=guide.sources, classes=[str(c) for c in train_ds.classes])
    torch.manual_seed(cfg.seed)  # again: the throw-away model above drew from the generator
    model = create_model(spec).to(d.device)
    if cfg.init_from and not resume:  # before the centroids are seeded: they summarise these weights' tokens
        for note in load_pretrained(model, cfg.init_from):
            if d.main:
                log(f"init_from: {note}")
    ckpt = CheckpointManager(run_dir, cfg.keep_last, metadata=dict(model=json.dumps(spec)))
    if d.main and os.path.isdir(run_dir):
        ckpt.remove_orphans()  # half-written files of a killed run (we hold the run's lock)
    resuming = resume and os.path.exists(ckpt.path("last.safetensors"))
    if d.main and not resuming:  # a resumed run keeps its files until its checkpoint has loaded
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "model.json"), "w") as f:
            json.dump(spec, f, indent=1)
        cfg.save(os.path.join(run_dir, "config.yaml"))

    if isinstance(model, AdaptiVision) and model.dtc:
        # seed the centroids from the first training images (same on every rank, whatever the shuffle)
        init_ds = build_dataset(cfg.dataset, cfg.data_dir, True, eval_tf, mode, cfg.strict_images)
        x, _, _ = collate_skip([init_ds[i] for i in range(min(cfg.init_samples, len(init_ds)))])
        x = x.to(d.device)
        model.init_clusters(x, **guidance_kwargs(guide, x))

    sampler = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        collate_fn=collate_skip, drop_last=True)
    if len(loader) < cfg.accum_steps:
        raise ValueError(f"{len(train_ds)} training images give {len(loader)} batches of {cfg.batch_size} "
                         f"per process: fewer than accum_steps={cfg.accum_steps}")
    global_batch = cfg.batch_size * d.world * cfg.accum_steps
    lr = cfg.lr or cfg.base_lr * global_batch / 512
    optimizer = create_optimizer_v2(optimizer_params(model, cfg), opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay)
    updates_per_epoch = len(loader) // cfg.accum_steps
    # warm-up in whole updates; the schedule steps per update, so resuming needs only num_updates
    warmup = int(cfg.warmup_epochs * updates_per_epoch) / updates_per_epoch
    sched, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs, min_lr=cfg.min_lr,
                                   warmup_lr=cfg.warmup_lr, warmup_epochs=warmup,
                                   decay_epochs=max(cfg.epochs / 3, 1), step_on_epochs=False,
                                   updates_per_epoch=updates_per_epoch)
    amp = resolve_amp(cfg.amp, d.device)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    mixup = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                   num_classes=num_classes) if (cfg.mixup or cfg.cutmix) else None)
    base = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    # one objective for every model: every AdaptiVision model returns its auxiliary terms (DTC's
    # cluster terms, a baseline's own loss such as DynamicViT's ratio loss); the dense comparison
    # has no clustering and no guidance, and its aux is None
    teacher = None if dense else load_teacher(cfg, num_classes, d.device, run_dir)
    self_teach = bool(cfg.self_distill) and not dense
    if self_teach and not (isinstance(model, AdaptiVision) and model.dtc):
        raise ValueError("self_distill: the full-token path is a DTC model's with its DTC stages skipped; "
                         f"{cfg.model} with {cfg.model_kwargs} has no DTC stage")
    if self_teach and d.world > 1:
        raise ValueError("self_distill runs two forwards before one backward, which DDP does not take here: "
                         "train it on one process")
    if self_teach:
        with model.full_tokens():  # AFA slots for every patch, checked before any training
            pass
    criterion = AdaptiVisionLoss(cfg.lambda_cluster if isinstance(model, AdaptiVision) and model.dtc else 0.0,
                                 cfg.lambda_align if guide else 0.0,
                                 cfg.align_temperature,
                                 cfg.detach_tokens, base,
                                 distill_weight=(cfg.distill_weight if teacher is not None else
                                                 cfg.self_distill if self_teach else 0.0),
                                 distill_tau=cfg.distill_tau, distill_kind=cfg.distill_kind)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None

    start_epoch, num_updates, best = 0, 0, -1.0
    if resuming:
        start_epoch, num_updates, best = _restore(ckpt, model, optimizer, scaler, ema, log)
        if d.main:
            cfg.save(os.path.join(run_dir, "config.yaml"))  # records the changed safe fields (epochs, ...)
            _trim_metrics(os.path.join(run_dir, "metrics.jsonl"), start_epoch)
        log(f"resumed {run_dir} at epoch {start_epoch}")
    elif resume and d.main:
        log(f"nothing to resume in {run_dir}: starting from scratch")

    # a dropped guidance source leaves its projection without gradient in that step
    net = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                  find_unused_parameters=bool(guide is not None and cfg.guidance_dropout > 0)) \
        if d.world > 1 else model
    return Session(cfg, d, run_dir, dense, log, model, net, spec, guide, eval_ds, sampler, loader, optimizer, sched,
                   scaler, amp, mixup, criterion, ema, ckpt, _tensorboard(run_dir) if d.main else None,
                   updates_per_epoch, start_epoch, num_updates, best, teacher, self_teach)


def forward_loss(s: Session, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The objective, computed the same way for every model: logits and eq. 12's terms."""
    target = y
    if s.mixup is not None:
        x, target = s.mixup(x, y)
    guided = s.guide(x, y, train=True) if s.guide is not None else None  # (of the mixed images, under mixup)
    returns_aux = isinstance(s.model, AdaptiVision)
    with autocast(s.amp, s.d.device):
        full = None
        if s.self_teach:  # first, so that last_num_clusters is the condensed forward's
            with s.model.full_tokens():
                full = s.net(x, **(guided.model_kwargs() if guided else {})).float()          # (B, C)
        out = s.net(x, return_aux=True, **(guided.model_kwargs() if guided else {})) if returns_aux else s.net(x)
        logits, aux = out if returns_aux else (out, None)
        with torch.no_grad():  # the teacher sees the same (mixed) images
            teacher_logits = s.teacher(x).float() if s.teacher is not None else None
        if full is not None:
            teacher_logits = full.detach()  # the condensed path learns from it, not it from the condensed one
        terms = s.criterion(logits.float(), target, aux, guided.align_targets if guided else None, y,
                            teacher_logits=teacher_logits)
        if full is not None:  # the full-token path learns from the labels (slimmable nets' in-place distillation)
            terms["full_ce"] = s.criterion.base(full, target)
            terms["loss"] = terms["loss"] + terms["full_ce"]
    return logits, terms


def _update(s: Session, epoch: int, step: int) -> None:
    """One optimizer update (after ``accum_steps`` backward passes): clip / check, step, schedule, EMA."""
    cfg, optimizer, scaler = s.cfg, s.optimizer, s.scaler
    if scaler and cfg.clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(s.model.parameters(), cfg.clip_grad)
    elif not scaler:  # (the fp16 scaler skips inf steps by design) a NaN gradient would
        # poison the weights while the loss can stay finite: stop before the update
        gnorm = nn.utils.clip_grad_norm_(s.model.parameters(), cfg.clip_grad or float("inf"))
        if not torch.isfinite(gnorm):
            _stop_non_finite("non-finite gradient", epoch, step, s.model, s.ckpt, s.d)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    s.num_updates += 1
    if s.sched is not None:
        s.sched.step_update(s.num_updates)
    if s.ema is not None:
        s.ema.update(s.model, step=s.num_updates)


def train_one_epoch(s: Session, epoch: int) -> dict:
    """One pass over the training set; returns images seen, correct, skipped and the seconds."""
    cfg, d = s.cfg, s.d
    s.sampler.set_epoch(epoch)
    s.net.train()
    t0 = time.perf_counter()
    seen = correct = skipped = 0
    loss_avg = None
    bar = tqdm(s.loader, desc=f"{s.name} epoch {epoch + 1}/{cfg.epochs}",
               disable=not d.main, mininterval=2, position=1, leave=False, dynamic_ncols=True)
    s.optimizer.zero_grad(set_to_none=True)
    for step, (x, y, skip) in enumerate(bar):
        skipped += skip
        if x is None:
            continue
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        if cfg.budget_warmup > 0 and isinstance(s.model, AdaptiVision):
            set_budget_warmup(s.model, cfg, s.num_updates / s.updates_per_epoch)
        logits, terms = forward_loss(s, x, y)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            _stop_non_finite(f"non-finite loss ({loss.item()})", epoch, step, s.model, s.ckpt, d)
        (s.scaler.scale(loss / cfg.accum_steps) if s.scaler else loss / cfg.accum_steps).backward()
        if (step + 1) % cfg.accum_steps == 0:
            _update(s, epoch, step)
        seen += len(y)
        correct += (logits.argmax(1) == y).sum().item()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if d.main and (step % cfg.log_every == 0 or step == len(s.loader) - 1):
            rate = seen * d.world / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{100 * correct / max(seen, 1):.1f}", img_s=f"{rate:.0f}")
            rec = dict(kind="step", epoch=epoch, step=step, updates=s.num_updates, loss=loss.item(),
                       lr=s.optimizer.param_groups[0]["lr"], img_per_s=rate,
                       **{k: v.item() for k, v in terms.items() if k != "loss"})
            _log_metrics(s.metrics_path, s.writer, rec, s.num_updates)
    if cfg.budget_warmup > 0 and isinstance(s.model, AdaptiVision):  # evaluate at the budget reached now
        set_budget_warmup(s.model, cfg, epoch + 1)
    return dict(seen=seen, correct=correct, skipped=skipped, seconds=time.perf_counter() - t0)


def validate(s: Session) -> dict:
    """The evaluation set on the unwrapped model (or its EMA): DDP's forward broadcasts buffers,
    and ranks may hold unequal evaluation shards."""
    return evaluate(s.ema.module if s.ema is not None else s.model, eval_loader(s.eval_ds, s.cfg, s.d), s.d,
                    s.amp, getattr(s.eval_ds, "class_indices", None), s.guide)


def end_epoch(s: Session, epoch: int, stats: dict, ev: dict) -> None:
    """Log the epoch and save its checkpoint (rank 0)."""
    seen, correct, skipped = all_sum([stats["seen"], stats["correct"], stats["skipped"]], s.d)
    rec = dict(kind="epoch", epoch=epoch, train_top1=100 * correct / max(seen, 1), train_skipped=int(skipped),
               epoch_seconds=stats["seconds"], **{f"eval_{k}": v for k, v in ev.items()})
    if not s.d.main:
        return
    _log_metrics(s.metrics_path, s.writer, rec, epoch + 1)
    s.log(f"{s.name} epoch {epoch + 1}/{s.cfg.epochs}: eval top-1 {ev['top1']:.2f}% top-5 {ev['top5']:.2f}% "
          f"({stats['seconds']:.0f}s, {skipped + ev['skipped']} unreadable images skipped)")
    is_best = ev["top1"] > s.best
    s.best = max(s.best, ev["top1"])
    state = dict(epoch=epoch, num_updates=s.num_updates, best_top1=s.best, rng=rng_state(),
                 optimizer=s.optimizer.state_dict(), eval=ev)
    if s.scaler is not None:
        state["scaler"] = s.scaler.state_dict()
    if s.ema is not None:  # the weights file holds the evaluated (EMA) weights, the state the trained ones
        state["trained"] = {k: v.detach().cpu() for k, v in s.model.state_dict().items()}
    s.ckpt.save(f"epoch-{epoch + 1:04d}", s.ema.module if s.ema is not None else s.model, state, is_best)


def fit(cfg: TrainConfig, run_dir: str, dense: bool, d: Dist, resume: bool = False,
        stop_after: Optional[int] = None, log=print) -> Optional[dict]:
    """Train one model into ``run_dir`` (setup, then per epoch: train, validate, checkpoint);
    returns its results, or None if stopped after ``stop_after`` epochs of this call."""
    s = setup(cfg, run_dir, dense, d, resume, log)
    result = None
    epoch_bar = tqdm(range(s.start_epoch, cfg.epochs), desc=f"{s.name} epochs",
                     disable=not d.main, position=0, leave=False, dynamic_ncols=True)
    for epochs_run, epoch in enumerate(epoch_bar):
        if stop_after is not None and epochs_run >= stop_after:
            return None
        stats = train_one_epoch(s, epoch)
        ev = validate(s)
        end_epoch(s, epoch, stats, ev)
        if d.main:
            epoch_bar.set_postfix(eval_top1=f"{ev['top1']:.2f}")
        result = dict(spec=s.spec, eval=ev, best_top1=s.best, epochs=cfg.epochs)
    if s.writer is not None:
        s.writer.close()
    if result is None:  # everything was already done: report the saved state
        st = s.ckpt.load_state(s.ckpt.latest()[0])
        result = dict(spec=s.spec, eval=st["eval"], best_top1=st["best_top1"], epochs=cfg.epochs)
    # every epoch's, the resumed ones included (this process's alone undercounted a resumed run)
    result["train_seconds"] = _train_seconds(s.metrics_path) if d.main else None
    result["model"], result["guide"] = s.ema.module if s.ema is not None else s.model, s.guide  # the one evaluated
    return result


def set_budget_warmup(model: AdaptiVision, cfg: TrainConfig, epoch: float) -> float:
    """The budget curriculum: the first DTC stage's bias falls linearly from ``budget_warmup_bias``
    (K near K_max) to 0 (the trained budget) over ``budget_warmup`` epochs. Returns the bias."""
    bias = cfg.budget_warmup_bias * max(0.0, 1.0 - epoch / cfg.budget_warmup)
    for dtc in list(model.dtc.values())[:1]:
        dtc.budget_bias = bias
    return bias


def _stop_non_finite(what: str, epoch: int, step: int, model, ckpt: CheckpointManager, d: Dist):
    base_path = ckpt.path("last-good")
    finite = all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    if not finite:  # the weights themselves are broken: saving them as "good" would mislead
        raise NonFiniteLoss(f"{what} at epoch {epoch + 1}, step {step}: stopped; the weights are already "
                            f"non-finite, so none were saved: resume from the last epoch checkpoint "
                            f"{ckpt.path('last')}.* with a lower lr or clip_grad")
    if d.main:
        save_weights(model, base_path + ".safetensors")
    raise NonFiniteLoss(f"{what} at epoch {epoch + 1}, step {step}: stopped; the weights before this step are "
                        f"in {base_path}.safetensors (and the last epoch checkpoint in {ckpt.path('last')}.*)")


def _restore(ckpt: CheckpointManager, model, optimizer, scaler, ema, log=print) -> tuple:
    """Load the newest checkpoint's weights and training state; returns (next epoch, updates, best)."""
    base, note = ckpt.latest()
    if note:
        log(note)
    st = ckpt.load_state(base)
    if "trained" in st:  # an EMA run: the file holds the EMA weights, the state the trained ones
        if ema is None:
            raise ValueError(f"{base}.safetensors holds the EMA of the trained weights (the run had ema=true): "
                             "resume it with ema=true")
        load_weights(ema.module, base + ".safetensors")
        model.load_state_dict(st["trained"])
    else:
        load_weights(model, base + ".safetensors")
        if ema is not None and "ema" in st:  # saved before 2026-11-27: the file held the trained weights
            ema.module.load_state_dict(st["ema"])
    optimizer.load_state_dict(st["optimizer"])
    if scaler is not None and "scaler" in st:
        scaler.load_state_dict(st["scaler"])
    set_rng_state(st["rng"])
    return st["epoch"] + 1, st["num_updates"], st["best_top1"]


def _trim_metrics(path: str, start_epoch: int) -> None:
    """Drop the lines of epochs that will be trained again (written after the checkpoint the run
    resumes from), so metrics.jsonl holds each step and epoch once."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("epoch", 0) < start_epoch]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def _train_seconds(path: str) -> Optional[float]:
    """The run's training time: the sum of its epochs' seconds in metrics.jsonl (which holds each
    epoch once, ``_trim_metrics``), whichever processes trained them."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    return sum(r["epoch_seconds"] for r in recs if r.get("kind") == "epoch")


def _tensorboard(run_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a stripped install should still train
        return None
    return SummaryWriter(os.path.join(run_dir, "tb"))


def _log_metrics(path: str, writer, rec: dict, step: int) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if writer is not None:
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                writer.add_scalar(f"{rec['kind']}/{k}", v, step)


# --- the whole job ----------------------------------------------------------------------------------
def run(cfg: TrainConfig, resume: Optional[str] = None, stop_after: Optional[int] = None, log=print,
        started=None) -> dict:
    """Train (and compare with the dense model), measure, and write the summary. ``resume``: a run
    directory to continue; ``stop_after``: stop after that many epochs of this invocation;
    ``started``: called once this process holds the run's lock (before any training)."""
    cfg = cfg.resolved()  # distill_from='auto' -> 'dense' or off, as saved in config.yaml
    if cfg.distill_from == DENSE_TEACHER and not (cfg.compare_dense and cfg.model.startswith("adaptivision_")):
        raise ValueError("distill_from='dense' distills from the dense model this job trains: it needs "
                         "compare_dense=true and an adaptivision_* model (or give distill_from a teacher file)")
    d = setup_distributed(cfg.device)
    name = cfg.name or f"{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = resume or os.path.join(cfg.output, name)
    if resume and not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume {resume}: no such run directory")
    if resume and os.path.isfile(os.path.join(resume, "config.yaml")):
        TrainConfig.saved(resume).check_resume(cfg, resume)  # before anything is written
    if not resume and os.path.exists(os.path.join(run_dir, "last.safetensors")):
        raise FileExistsError(f"{run_dir} already holds a run: pass --resume {run_dir} to continue it, "
                              "or another name= (nothing was overwritten)")
    with run_lock(run_dir) if d.main else contextlib.nullcontext():
        if not resume and os.path.exists(os.path.join(run_dir, "last.safetensors")):  # won the race late
            raise FileExistsError(f"{run_dir} already holds a run (written while this one started)")
        if d.main:
            log(f"run directory: {run_dir}")
        if started is not None:
            started()
        return _run_phases(cfg, run_dir, d, resume, stop_after, log)


def _run_phases(cfg: TrainConfig, run_dir: str, d: Dist, resume, stop_after, log) -> dict:
    results = {}
    phases = [("adaptivision", False)]
    if cfg.compare_dense and cfg.model.startswith("adaptivision_"):
        phases.append(("dense", True))
    if cfg.distill_from == DENSE_TEACHER:  # the dense model first: it is the teacher
        phases.reverse()
    for label, dense in phases:
        sub = run_dir if not dense else os.path.join(run_dir, "dense")
        r = fit(cfg, sub, dense, d, resume=bool(resume), stop_after=stop_after, log=log)
        if r is None:
            return dict(stopped=True, run_dir=run_dir)
        results[label] = r
    results = {k: results[k] for k in ("adaptivision", "dense") if k in results}  # the summary's row order
    summary = dict(rank=d.rank, run_dir=run_dir)  # only rank 0 measures and writes the summary
    if d.main:
        summary = summarize(cfg, results, run_dir, d)
        log(summary["markdown"])
    if d.world > 1:
        dist.barrier()
    return summary


def summarize(cfg: TrainConfig, results: dict, run_dir: str, d: Dist) -> dict:
    """GMACs (mean over evaluation images, each with its own K) and throughput, measured in this
    process one model right after the other, next to accuracy."""
    rows = []
    first = next(iter(results.values()))
    eval_ds = build_eval_dataset(cfg, first["model"])
    x, _, _ = collate_skip([eval_ds[i] for i in range(min(256, len(eval_ds)))])
    for label, r in results.items():
        rows.append(dict(model=label, name=r["spec"]["name"],
                         **measure(r["model"], x, cfg.throughput_batch, d.device, guide=r["guide"]),
                         top1=r["eval"]["top1"], top5=r["eval"]["top5"], best_top1=r["best_top1"],
                         train_seconds=r["train_seconds"]))
    md = ["| model | params (M) | GMACs | mean K | top-1 (%) | top-5 (%) | images/s | train time (s) |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = "/".join(f"{v:.0f}" for v in r["mean_k"]) if r["mean_k"] else "—"
        t = f"{r['train_seconds']:.0f}" if r["train_seconds"] is not None else "—"
        md.append(f"| {r['model']} | {r['params_m']:.2f} | {r['gmacs']:.4f} | {k} | {r['top1']:.2f} | "
                  f"{r['top5']:.2f} | {r['img_per_s']:.0f} | {t} |")
    if len(rows) == 2:
        md.append("")
        md.append(f"Dense / AdaptiVision GMACs: {rows[1]['gmacs'] / rows[0]['gmacs']:.2f}x; "
                  f"AdaptiVision / dense images/s: {rows[0]['img_per_s'] / rows[1]['img_per_s']:.2f}x "
                  f"(batch {cfg.throughput_batch}, {d.device.type}, {torch.get_num_threads()} threads, same process).")
    if cfg.distill_from:
        teacher = "the dense model above" if cfg.distill_from == DENSE_TEACHER else cfg.distill_from
        md.append("")
        md.append(f"AdaptiVision learned from {teacher} (distill_from, {cfg.distill_kind}, weight {cfg.distill_weight}); "
                  "its train time includes the teacher's forward passes, not the teacher's own training.")
    summary = dict(dataset=cfg.dataset, rows=rows, device=str(d.device), threads=torch.get_num_threads(),
                   markdown="\n".join(md), provenance=provenance())
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write(f"# {cfg.model} on {cfg.dataset}\n\n" + summary["markdown"] + "\n")
    return summary
