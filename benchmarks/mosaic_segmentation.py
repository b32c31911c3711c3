"""Fashion-MNIST mosaics: mIoU vs GMACs for the dense backbone, AdaptiVision at several budgets
(one trained model) and ToMe with unmerging at several r (one trained model).

    .venv/bin/python benchmarks/mosaic_segmentation.py [--steps 300] [--out benchmarks/results/mosaic]
    .venv/bin/python benchmarks/mosaic_segmentation.py --smoke      # a few steps, for CI
    .venv/bin/python benchmarks/mosaic_segmentation.py --backbones adaptivision-image --steps 900 --lr 3e-3
    .venv/bin/python benchmarks/mosaic_segmentation.py --summarize A.json B.json:dense,tome [--out C]  # mean ± std

Backbones: adaptivision_nano_patch4_28 at 56x56 (196 patches), Segmenter linear decoder,
AdamW, cosine schedule, batch 32; training canvases from the Fashion-MNIST training images,
evaluation canvases from the test images.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Optional

import timm
import torch

import adaptivision  # noqa: F401
from adaptivision import budget
from adaptivision.data.datasets import fashion_mnist
from adaptivision.data.mosaic import MOSAIC_CLASSES, FashionMosaics
from adaptivision.dense import Segmenter, evaluate_segmenter, train_segmenter
from adaptivision.experiments.report import mean_std, plot_curves
from adaptivision.provenance import provenance

# budget_jitter=1: the jitter the committed mosaic records were trained with (the library default is 0
# since 2026-11-27), so that this command reproduces them
BACKBONES = {"dense": dict(reduction="none"),
             "adaptivision": dict(cmtf=False, clustering="paper", unpool="assign", budget_jitter=1.0),
             "adaptivision-image": dict(cmtf=False, clustering="image", unpool="assign", budget_jitter=1.0),
             "adaptivision-image-skip": dict(cmtf=False, clustering="image", unpool="skip", budget_jitter=1.0),
             # the same with position in the clustering distance (DTC's spatial term: contiguous clusters)
             "adaptivision-image-skip-spatial": dict(cmtf=False, clustering="image", unpool="skip", budget_jitter=1.0,
                                                     spatial=0.5),
             "tome": dict(reduction="tome")}
BUDGETS = {"dense": [None], "adaptivision": [-2.0, 0.0, 2.0], "adaptivision-image": [-2.0, 0.0, 2.0],
           "adaptivision-image-skip": [-2.0, -1.0, 0.0, 2.0],  # -1: ~60% of the dense GMACs (goal 3: <= 70%)
           "adaptivision-image-skip-spatial": [-2.0, -1.0, 0.0, 2.0],
           "tome": [4, 8, 12]}


def train(name: str, train_ds, steps: int, batch: int, seed: int, log, lr: float = 1e-3) -> Segmenter:
    torch.manual_seed(seed)
    backbone = timm.create_model("adaptivision_nano_patch4_28", img_size=56, **BACKBONES[name])
    model = Segmenter(backbone, num_classes=len(MOSAIC_CLASSES))
    return train_segmenter(model, train_ds, steps, batch, lr, seed, lambda msg: log(f"[{name}] {msg}"))


def evaluate(model: Segmenter, ds) -> tuple[float, float]:
    res = evaluate_segmenter(model, ds, len(MOSAIC_CLASSES))
    return res["miou"], res["gmacs"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-size", type=int, default=500)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where the record goes: OUT.json, OUT.md, OUT.png "
                   "(default benchmarks/results/mosaic; '' writes nothing); with --summarize, OUT.md only")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--backbones", default=",".join(BACKBONES), help=f"comma-separated, of {', '.join(BACKBONES)}")
    p.add_argument("--summarize", nargs="+", metavar="JSON[:BACKBONES]",
                   help="train nothing: the mean ± std over these records (one per seed) of each backbone and knob; "
                        "JSON:dense,tome takes only those backbones' rows of that record")
    a = p.parse_args(argv)
    if a.summarize:
        return summarize(a.summarize, a.out)
    a.out = "benchmarks/results/mosaic" if a.out is None else a.out
    names = a.backbones.split(",")
    unknown = sorted(set(names) - set(BACKBONES))
    if unknown:
        p.error(f"unknown backbone(s) {unknown}; choose from {', '.join(BACKBONES)}")
    if a.smoke:
        a.steps, a.batch, a.eval_size = 2, 4, 8
    train_ds = FashionMosaics(fashion_mnist(a.data_dir, train=True), length=100_000, seed=1)
    test_ds = FashionMosaics(fashion_mnist(a.data_dir, train=False), length=a.eval_size, seed=2)
    rows = []
    for name in names:
        model = train(name, train_ds, a.steps, a.batch, a.seed, print, a.lr)
        for b in BUDGETS[name]:
            if b is not None:
                budget.set_knob(model.backbone, b)
            miou, gmacs = evaluate(model, test_ds)
            rows.append(dict(backbone=name, knob=b, gmacs=gmacs, miou=miou))
            print(f"[{name}] knob {b}: {gmacs:.4f} GMACs, mIoU {miou:.2f}")
    md = [f"Fashion-MNIST mosaics 56x56, {a.steps} steps of batch {a.batch}, lr {a.lr}, seed {a.seed}, "
          f"{a.eval_size} test canvases; GMACs include the linear decoder.", "",
          "| backbone | knob | GMACs | mIoU (%) |", "|---|---|---|---|"]
    md += [f"| {r['backbone']} | {r['knob'] if r['knob'] is not None else '—'} | {r['gmacs']:.4f} | "
           f"{r['miou']:.2f} |" for r in rows]
    print("\n".join(md))
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out + ".json", "w") as f:
            json.dump(dict(rows=rows, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, provenance=provenance()),
                      f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write("\n".join(md) + "\n")
        curves = {name: sorted((r["gmacs"], r["miou"]) for r in rows if r["backbone"] == name) for name in names}
        print("plot:", plot_curves(os.path.dirname(a.out) or ".", os.path.basename(a.out), "GMACs per image", "mIoU (%)",
                             curves, "Fashion-MNIST mosaics: mIoU vs GMACs"))
    return 0


def summarize(paths: list, out: Optional[str] = None) -> int:
    """One table from several records of the same recipe (one per seed): mean ± std of each backbone
    at each knob; a recipe that differs between the records is an error that names it."""
    recs = []
    for arg in paths:  # PATH or PATH:BACKBONE,BACKBONE (only those rows of that record)
        path, _, only = arg.partition(":")
        with open(path) as f:
            rec = json.load(f)
        if only:
            keep = set(only.split(","))
            unknown = keep - {row["backbone"] for row in rec["rows"]}
            if unknown:
                raise ValueError(f"{path} has no rows of {sorted(unknown)}")
            rec = dict(rec, rows=[row for row in rec["rows"] if row["backbone"] in keep])
        recs.append(rec)
    for key in ("steps", "batch", "lr"):
        if len({r.get(key) for r in recs}) > 1:
            raise ValueError(f"the records differ in {key}: " + ", ".join(f"{p}: {r.get(key)}" for p, r in zip(paths, recs, strict=True)))
    cells: dict = {}
    for r in recs:
        for row in r["rows"]:
            runs = cells.setdefault((row["backbone"], row["knob"]), [])
            if any(seed == r["seed"] for seed, _ in runs):
                raise ValueError(f"two records of {row['backbone']} seed {r['seed']}: one record per seed")
            runs.append((r["seed"], row))
    r0 = recs[0]
    md = [f"Fashion-MNIST mosaics 56x56, {r0['steps']} steps of batch {r0['batch']}, lr {r0['lr']}; "
          f"mean ± std over seeds; records: {', '.join(os.path.basename(p) for p in paths)}.", "",
          "| backbone | knob | GMACs | mIoU (%) | seeds |", "|---|---|---|---|---|"]
    for (name, knob), runs in cells.items():
        md.append(f"| {name} | {knob if knob is not None else '—'} | "
                  f"{statistics.fmean(row['gmacs'] for _, row in runs):.4f} | {mean_std([row['miou'] for _, row in runs])} | "
                  f"{', '.join(str(s) for s, _ in runs)} |")
    print("\n".join(md))
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out + ".md", "w") as f:
            f.write("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
