"""``adaptivision segment``: train a Segmenter on mosaics / ADE20K / Cityscapes, or evaluate one.

The run directory holds ``segment.json`` (everything that rebuilds the model, the results, and
the evaluation mIoU at ten points of training: the plateau check) and ``segmenter.safetensors``.
An existing run is never overwritten; a killed one resumes from ``train-state.pt`` (written at
the same ten points) when the same command runs again.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import timm
import torch
from torch.utils.data import Subset

from ..budget import apply_budget
from ..checkpoint import load_weights, run_lock, save_weights
from ..config import ModelOptions, live_prop_attn
from ..data.datasets import fashion_mnist
from ..data.mosaic import MOSAIC_CLASSES, FashionMosaics
from ..data.segmentation import build_segmentation
from ..provenance import provenance
from .segmenter import Segmenter
from .train import Progress, evaluate_segmenter, train_segmenter

STATE = "train-state.pt"  # the resume point of an unfinished run (removed once segment.json is written)
CURVE_POINTS = 10  # evaluations (and checkpoints) per run: every steps // CURVE_POINTS updates

DEFAULTS = {"mosaic": ("adaptivision_nano_patch4_28", 56), "ade20k": ("adaptivision_small_patch16_224", 512),
            "cityscapes": ("adaptivision_small_patch16_224", 512)}


def datasets(name: str, data_dir: Optional[str], img_size: int, eval_size: Optional[int]):
    """(train, eval, classes) for a segmentation data set."""
    if name == "mosaic":
        tr = FashionMosaics(fashion_mnist(data_dir, train=True), length=100_000, canvas=img_size, seed=1)
        ev = FashionMosaics(fashion_mnist(data_dir, train=False), length=eval_size or 500, canvas=img_size, seed=2)
        return tr, ev, MOSAIC_CLASSES
    tr = build_segmentation(name, data_dir, True, img_size)
    ev = build_segmentation(name, data_dir, False, img_size)
    classes = ev.classes
    if eval_size:
        ev = Subset(ev, range(min(eval_size, len(ev))))
    return tr, ev, classes


def pinned_kwargs(model: str, kwargs: Optional[dict]) -> dict:
    """The backbone options a new run writes into its spec: AdaptiVision's ``unpool`` and ``prop_attn`` resolved, so that
    a later change of its default cannot change what a saved segmenter or detector computes."""
    kwargs = dict(kwargs or {})
    if model.startswith("adaptivision_") and kwargs.get("reduction", "dtc") == "dtc":  # baselines unpool their own way
        kwargs.setdefault("unpool", ModelOptions.unpool)
        kwargs["prop_attn"] = live_prop_attn(kwargs)
    return kwargs


def backbone_kwargs(spec: dict) -> dict:
    """The options to rebuild a spec's backbone with: specs written before ``unpool`` was pinned
    (2026-11-27) were trained with ``'assign'``, the default then."""
    kwargs = dict(spec["kwargs"])
    if spec["model"].startswith("adaptivision_") and kwargs.get("reduction", "dtc") == "dtc":
        kwargs.setdefault("unpool", "assign")
        kwargs.setdefault("prop_attn", True)  # likewise (its default moved on 2026-11-27)
    return kwargs


def build(spec: dict) -> Segmenter:
    backbone = timm.create_model(spec["model"], img_size=spec["img_size"], **backbone_kwargs(spec))
    if spec.get("in_chans") and backbone.patch_embed.proj.in_channels != spec["in_chans"]:
        raise ValueError(f"{spec['model']} takes {backbone.patch_embed.proj.in_channels} channels but "
                         f"{spec['dataset']} has {spec['in_chans']}: choose another --model or in_chans=")
    return Segmenter(backbone, len(spec["classes"]), spec["decoder"])


def run(dataset: str = "mosaic", data_dir: Optional[str] = None, model: Optional[str] = None,
        img_size: Optional[int] = None, decoder: str = "linear", steps: int = 300, batch: int = 16,
        lr: float = 1e-3, eval_size: Optional[int] = None, kwargs: Optional[dict] = None, output: str = "runs",
        name: Optional[str] = None, seed: int = 0, log: Callable = print) -> dict:
    if dataset not in DEFAULTS:
        raise ValueError(f"Invalid value for 'dataset': {dataset!r}; allowed: {', '.join(DEFAULTS)}")
    model = model or DEFAULTS[dataset][0]
    img_size = img_size or DEFAULTS[dataset][1]
    run_dir = os.path.join(output, name or f"segment-{dataset}-{model}")
    if os.path.exists(os.path.join(run_dir, "segmenter.safetensors")):
        raise FileExistsError(f"{run_dir} already holds a segmentation run: pass another --name (nothing overwritten)")
    tr, ev, classes = datasets(dataset, data_dir, img_size, eval_size)
    spec = dict(model=model, kwargs=pinned_kwargs(model, kwargs), img_size=img_size, decoder=decoder, dataset=dataset,
                classes=list(classes), in_chans=int(tr[0][0].shape[0]), steps=steps, batch=batch, lr=lr, seed=seed)
    every = steps // CURVE_POINTS  # 0 (no curve, no checkpoints) for runs shorter than CURVE_POINTS updates
    progress = Progress(os.path.join(run_dir, STATE), every, lambda m: evaluate_segmenter(m, ev, len(classes), False)["miou"],
                        every, identity=dict(spec))
    with run_lock(run_dir):  # a second process training into run_dir is refused (RunBusyError), nothing touched
        torch.manual_seed(seed)
        seg = build(spec)
        seg = train_segmenter(seg, tr, steps, batch, lr, seed, log, progress=progress)
        save_weights(seg, os.path.join(run_dir, "segmenter.safetensors"))
        spec["results"] = evaluate_segmenter(seg, ev, len(classes))
        spec["curve"] = [dict(step=c["step"], miou=c["value"]) for c in progress.curve]  # eval mIoU during training
        spec["train_seconds"] = progress.seconds  # the whole run's, a resumed one's too
        spec["provenance"] = provenance()
        with open(os.path.join(run_dir, "segment.json"), "w") as f:
            json.dump(spec, f, indent=1)
        if os.path.exists(progress.state_path):  # the run is whole: its resume point is not needed any more
            os.remove(progress.state_path)
    log(f"{run_dir}: mIoU {spec['results']['miou']:.2f} at {spec['results']['gmacs']:.4f} GMACs")
    return spec


def evaluate(checkpoint: str, data_dir: Optional[str] = None, eval_size: Optional[int] = None,
             budget: Optional[dict] = None) -> dict:
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "segment.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --checkpoint must be the segmenter.safetensors of a segment run")
    with open(path) as f:
        spec = json.load(f)
    seg = build(spec)
    load_weights(seg, checkpoint)
    _, ev, classes = datasets(spec["dataset"], data_dir, spec["img_size"], eval_size)
    if budget:
        apply_budget(seg.backbone.eval(), budget, torch.stack([ev[i][0] for i in range(min(64, len(ev)))]))
    return evaluate_segmenter(seg, ev, len(classes))
