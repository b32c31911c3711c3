"""Does it matter which images get more clusters? Per-image K rules against one K, off the shelf
(docs/results.md, "Per-image K at inference"; issue 15).

    .venv/bin/python benchmarks/k_allocation.py RUN/seed0/last.safetensors [...] --out benchmarks/results/dtc/default/k-allocation

On a trained DTC checkpoint, nothing retrained, the same test set, K chosen per image by:
- ``variance``: the model's own rule (the complexity score it was trained with, eq. K formula);
- ``coverage``: the farthest-point covering radius of the image's tokens after ``k_ref`` picks (how
  much of the image ``k_ref`` clusters leave unexplained), standardised on 1024 training images
  and put through the same K formula; or as a threshold: the smallest K on a grid whose covering
  radius is at most the radius that a given fraction of training images reach at ``k_ref``;
- one K for every image (``--budget k=``), the reference at the same mean K.
If a rule puts clusters where they are needed, it beats one K at the same GMACs.
"""
from __future__ import annotations

import argparse
import json
import os
import types

import torch

import adaptivision  # noqa: F401
from adaptivision.benchmark import save_record
from adaptivision.budget import apply_budget, first_dtc
from adaptivision.data import collate_skip
from adaptivision.profile import profile
from adaptivision.provenance import provenance
from adaptivision.train.build import (
    build_dataset,
    build_eval_dataset,
    build_transforms,
    eval_loader,
    load_for_eval,
)
from adaptivision.train.distributed import setup_distributed
from adaptivision.train.evaluate import evaluate

GRID = (8, 12, 16, 20, 24, 32, 40, 49)
ONE_K = (12, 16, 24, 32)
THRESHOLDS = ((24, 0.5), (16, 0.9), (16, 0.95), (12, 0.9))  # (k_ref, fraction of training images covered)


@torch.no_grad()
def covering_radii(zs: torch.Tensor, ks: tuple) -> torch.Tensor:
    """Farthest-point covering radius of each image's tokens zs (B, N, D) after k picks, for each
    k in ks (the first pick as in ``dtc.farthest_points``), (B, len(ks))."""
    B, N, _ = zs.shape
    dist = torch.cdist(zs, zs)                                                       # (B, N, N)
    cur = (zs - zs.mean(1, keepdim=True)).pow(2).sum(-1).argmax(-1)                  # (B,)
    dmin = zs.new_full((B, N), float("inf"))                                         # (B, N)
    radii = {}
    for j in range(1, max(ks) + 1):
        row = torch.gather(dist, 1, cur.view(B, 1, 1).expand(B, 1, N)).squeeze(1)    # (B, N)
        dmin = torch.minimum(dmin, row)
        cur = dmin.argmax(-1)
        radii[j] = dmin.max(-1).values                                               # (B,)
    return torch.stack([radii[min(k, N)] for k in ks], 1)                            # (B, len(ks))


def set_rule(stage, own_rule, kind: str, radii_cal: list, **kw) -> None:
    """Give ``stage`` a per-image K rule (see the module docstring); 'collect' keeps the model's
    own K and records the covering radii of what it sees."""
    def num_clusters(self, z, weights=None, zs=None):
        r = covering_radii(self.assignment_space(z) if zs is None else zs, GRID)     # (B, len(GRID))
        if kind == "collect":
            radii_cal.append(r)
            return own_rule(z, weights, zs)
        if kind == "sigmoid":
            score = (r[:, kw["col"]] - kw["mean"]) / kw["std"]
            return self.k_from_score(score, 0.0).clamp_max(z.shape[1])
        ok = r <= kw["theta"]                                                        # (B, len(GRID))
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.tensor(len(GRID) - 1))
        return torch.tensor(GRID)[first].clamp_max(z.shape[1])
    stage.num_clusters = types.MethodType(num_clusters, stage)


def one_checkpoint(ckpt: str, d) -> list:
    model, cfg = load_for_eval(ckpt)
    cfg.workers = 0
    ds = build_eval_dataset(cfg, model)
    _, eval_tf, mode = build_transforms(cfg, model)
    train_ds = build_dataset(cfg.dataset, cfg.data_dir, train=True, transform=eval_tf, mode=mode)
    x_cal, _, _ = collate_skip([train_ds[i] for i in range(1024)])
    x_prof, _, _ = collate_skip([ds[i] for i in range(512)])
    stage = first_dtc(model)
    own_rule = stage.num_clusters
    rows, radii_cal = [], []

    def measure(name):
        res = evaluate(model, eval_loader(ds, cfg, d), d, "none")
        prof = profile(model, x_prof)
        rows.append(dict(checkpoint=ckpt, rule=name, top1=res["top1"], gmacs=prof["gmacs"], mean_k=prof["mean_k"][0]))
        print(json.dumps(rows[-1]), flush=True)

    set_rule(stage, own_rule, "collect", radii_cal)
    with torch.no_grad():
        model.eval()(x_cal)
    cal = torch.cat(radii_cal)                                                       # (1024, len(GRID))
    stage.num_clusters = own_rule
    measure("variance (the model's own rule)")
    col24 = GRID.index(24)
    set_rule(stage, own_rule, "sigmoid", radii_cal, col=col24, mean=cal[:, col24].mean(), std=cal[:, col24].std())
    measure("coverage at K=24, K formula")
    for k_ref, q in THRESHOLDS:
        set_rule(stage, own_rule, "threshold", radii_cal, theta=cal[:, GRID.index(k_ref)].quantile(q))
        measure(f"coverage threshold: radius at K={k_ref} of {q:.0%} of training images")
    stage.num_clusters = own_rule
    for k in ONE_K:
        apply_budget(model, {"k": k}, None)
        measure(f"one K = {k}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--out", default="benchmarks/results/dtc/default/k-allocation")
    args = ap.parse_args()
    d = setup_distributed("cpu")
    result = dict(grid=GRID, checkpoints=args.checkpoints, rows=[], provenance=provenance())
    for ckpt in args.checkpoints:
        result["rows"] += one_checkpoint(ckpt, d)
    md = ["| checkpoint | rule | mean K | GMACs | top-1 (%) |", "|---|---|---|---|---|"]
    md += [f"| {os.path.basename(os.path.dirname(os.path.dirname(r['checkpoint'])))}/"
           f"{os.path.basename(os.path.dirname(r['checkpoint']))} | {r['rule']} | {r['mean_k']:.1f} | "
           f"{r['gmacs']:.4f} | {r['top1']:.2f} |" for r in result["rows"]]
    save_record(result, "\n".join(md), args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
