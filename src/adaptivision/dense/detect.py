"""``adaptivision detect``: train FCOS on a backbone over Fashion-MNIST mosaic boxes, or evaluate
one (paper Table 3's closest equivalent on a CPU; docs/results.md says what differs).

COCO-style mAP (IoU 0.50:0.95) and mAP50 come from pycocotools' ``COCOeval``, the reference
implementation. The run directory holds ``detect.json`` (everything that rebuilds the detector,
and the results) and ``detector.safetensors`` (its metadata names the backbone and class count,
so a checkpoint that does not belong to the run is refused by name). An existing run is never
overwritten; a killed one resumes from ``train-state.pt`` when the same command runs again.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Callable, Optional

import numpy as np
import timm
import torch

from ..budget import apply_budget
from ..checkpoint import load_weights, read_weights, run_lock, save_weights
from ..data.datasets import fashion_mnist
from ..data.mosaic import FashionMosaicBoxes
from ..profile import profile
from ..provenance import provenance
from ..timing import time_models
from .detector import build_detector, num_classes_of
from .run import CURVE_POINTS, STATE, backbone_kwargs, pinned_kwargs
from .train import Progress, fit


def sanitize(target: dict, size: tuple) -> tuple[dict, dict]:
    """Clip boxes to the image ``size`` (H, W) and drop those left with no area; returns the
    cleaned target and counts ``{"clipped": n, "dropped": n}`` (a box partly outside the image
    is a data error worth counting, not a reason to stop)."""
    boxes, labels = target["boxes"].float().reshape(-1, 4), target["labels"].long().reshape(-1)
    H, W = size
    clipped = torch.stack([boxes[:, 0].clamp(0, W), boxes[:, 1].clamp(0, H),
                           boxes[:, 2].clamp(0, W), boxes[:, 3].clamp(0, H)], 1)          # (n, 4)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    changed = (clipped != boxes).any(1) & keep
    counts = dict(clipped=int(changed.sum()), dropped=int((~keep).sum()))
    return dict(boxes=clipped[keep], labels=labels[keep]), counts


def detection_loss(model, items: list) -> torch.Tensor:
    """FCOS's summed losses (focal classification, GIoU regression, centre-ness) on a batch."""
    images = [x for x, _ in items]
    targets = [sanitize(t, x.shape[-2:])[0] for x, t in items]
    return sum(model(images, targets).values())


def datasets(data_dir: Optional[str], img_size: int, eval_size: int):
    tr = FashionMosaicBoxes(fashion_mnist(data_dir, train=True), length=100_000, canvas=img_size, seed=1)
    ev = FashionMosaicBoxes(fashion_mnist(data_dir, train=False), length=eval_size, canvas=img_size, seed=2)
    return tr, ev


@torch.no_grad()
def coco_map(detector, ds, batch: int = 50) -> dict:
    """mAP and mAP50 (%, pycocotools) of ``detector`` on ``ds``, and the data's target counts
    (boxes, empty images, boxes clipped or dropped by :func:`sanitize`)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    detector.eval()
    images, anns, dets = [], [], []
    counts = dict(boxes=0, empty_images=0, clipped=0, dropped=0)
    for start in range(0, len(ds), batch):
        items = [ds[i] for i in range(start, min(start + batch, len(ds)))]
        outputs = detector([x for x, _ in items])
        for j, ((x, t), out) in enumerate(zip(items, outputs, strict=True)):
            image_id = start + j + 1
            t, c = sanitize(t, x.shape[-2:])
            counts["clipped"] += c["clipped"]
            counts["dropped"] += c["dropped"]
            counts["boxes"] += len(t["boxes"])
            counts["empty_images"] += int(len(t["boxes"]) == 0)
            images.append(dict(id=image_id, height=int(x.shape[-2]), width=int(x.shape[-1])))
            for b, lab in zip(t["boxes"].tolist(), t["labels"].tolist(), strict=True):
                anns.append(dict(id=len(anns) + 1, image_id=image_id, category_id=int(lab) + 1, iscrowd=0,
                                 bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]], area=(b[2] - b[0]) * (b[3] - b[1])))
            for b, s, lab in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist(), strict=True):
                dets.append(dict(image_id=image_id, category_id=int(lab) + 1, score=float(s),
                                 bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]]))
    if not dets:  # nothing detected: pycocotools cannot load an empty result
        return dict(map=0.0, map50=0.0, images=len(ds), detections=0, **counts)
    classes = num_classes_of(detector)
    gt = COCO()
    gt.dataset = dict(images=images, annotations=anns, categories=[dict(id=c + 1) for c in range(classes)])
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(map=100 * float(ev.stats[0]), map50=100 * float(ev.stats[1]), images=len(ds),
                detections=len(dets), **counts)


def measure(detector, ds, batch: int = 32, rounds: int = 5) -> dict:
    """GMACs per image of the backbone (to its restored patch grid) and of the whole detector
    (pyramid and head, not the box post-processing), and the detector's inference images/s."""
    x = torch.stack([ds[i][0] for i in range(min(batch, len(ds)))])
    times = time_models([detector], x, warmup=2, rounds=rounds)[0]  # FCOS takes a batch as a list of images
    return dict(backbone_gmacs=profile(detector.backbone.trunk, x)["gmacs"], gmacs=profile(detector, x)["gmacs"],
                img_per_s=len(x) / float(np.median(times)))


def build(spec: dict):
    backbone = timm.create_model(spec["model"], img_size=spec["img_size"], **backbone_kwargs(spec))
    if backbone.patch_embed.proj.in_channels != spec["in_chans"]:
        raise ValueError(f"{spec['model']} takes {backbone.patch_embed.proj.in_channels} channels but the "
                         f"mosaics have {spec['in_chans']}: choose another --model or in_chans=")
    return build_detector(backbone, len(spec["classes"]), spec["img_size"], spec["in_chans"], spec["channels"])


def _identity(spec: dict) -> dict:
    """What a checkpoint must match: backbone, its options, input and classes."""
    return dict(model=spec["model"], kwargs=json.dumps(spec["kwargs"], sort_keys=True), img_size=str(spec["img_size"]),
                num_classes=str(len(spec["classes"])), channels=str(spec["channels"]))


def run(data_dir: Optional[str] = None, model: str = "adaptivision_nano_patch4_28", img_size: int = 56,
        steps: int = 300, batch: int = 16, lr: float = 1e-3, eval_size: int = 500, kwargs: Optional[dict] = None,
        channels: int = 64, output: str = "runs", name: Optional[str] = None, seed: int = 0,
        log: Callable = print) -> dict:
    """Train a detector on mosaic boxes, save it, evaluate it (mAP, GMACs, images/s)."""
    run_dir = os.path.join(output, name or f"detect-mosaic-{model}")
    if os.path.exists(os.path.join(run_dir, "detector.safetensors")):
        raise FileExistsError(f"{run_dir} already holds a detection run: pass another --name (nothing overwritten)")
    tr, ev = datasets(data_dir, img_size, eval_size)
    spec = dict(model=model, kwargs=pinned_kwargs(model, kwargs), img_size=img_size, dataset="mosaic", classes=list(tr.classes),
                in_chans=int(tr[0][0].shape[0]), channels=channels, steps=steps, batch=batch, lr=lr, seed=seed,
                min_visible=tr.min_visible)
    # checkpoints at the ten points a segment run uses (no curve: COCO mAP is too slow to evaluate ten times)
    progress = Progress(os.path.join(run_dir, STATE), steps // CURVE_POINTS, identity=dict(spec))
    with run_lock(run_dir):  # a second process training into run_dir is refused (RunBusyError), nothing touched
        torch.manual_seed(seed)
        det = build(spec)
        det = fit(det, det.backbone.trunk.backbone, tr, steps, batch, detection_loss, lr, seed, log, progress=progress)
        spec["train_seconds"] = progress.seconds  # the whole run's, a resumed one's too
        save_weights(det, os.path.join(run_dir, "detector.safetensors"), metadata=_identity(spec))
        spec["results"] = dict(coco_map(det, ev), **measure(det, ev))
        spec["provenance"] = provenance()
        with open(os.path.join(run_dir, "detect.json"), "w") as f:
            json.dump(spec, f, indent=1)
        if os.path.exists(progress.state_path):
            os.remove(progress.state_path)
    r = spec["results"]
    log(f"{run_dir}: mAP {r['map']:.2f}, mAP50 {r['map50']:.2f} at {r['backbone_gmacs']:.4f} backbone GMACs "
        f"({r['gmacs']:.4f} in all), {r['img_per_s']:.0f} images/s")
    return spec


def load(checkpoint: str) -> tuple:
    """(detector, spec) of a detect run; a checkpoint made for another backbone or class count
    than its ``detect.json`` says is refused, naming both."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "detect.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --checkpoint must be the detector.safetensors of a detect run")
    with open(path) as f:
        spec = json.load(f)
    from safetensors import safe_open
    read_weights(checkpoint)  # a clear error for a missing or corrupt file first
    with safe_open(checkpoint, "pt") as f:
        meta = f.metadata() or {}
    want = _identity(spec)
    diff = [f"{k}: checkpoint {meta.get(k, 'not recorded')!r} vs run {v!r}" for k, v in want.items() if meta.get(k) != v]
    if diff:
        raise ValueError(f"{checkpoint} is not the detector of {path}: " + "; ".join(diff))
    det = build(spec)
    load_weights(det, checkpoint)
    return det.eval(), spec


def evaluate(checkpoint: str, data_dir: Optional[str] = None, eval_size: Optional[int] = None,
             budget: Optional[dict] = None) -> dict:
    """mAP, GMACs and images/s of a trained detector, optionally at another token budget."""
    det, spec = load(checkpoint)
    _, ev = datasets(data_dir, spec["img_size"], eval_size or 500)
    if budget:
        apply_budget(det.backbone.trunk.backbone.eval(), budget, torch.stack([ev[i][0] for i in range(min(64, len(ev)))]))
    return dict(coco_map(det, ev), **measure(det, ev))
