"""Per-image K at inference, executed three ways, on the default job's trained models: one batch
per K (the default), the groups merged into at most G batches padded with masked slots
(``max_groups=G``, same logits), and one K for every image (``k=``, not per-image K) as the
reference; the dense model of the same run beside them. Real test images, interleaved rounds.

    python benchmarks/padded_groups.py --run runs/<model>-fashion-mnist-<time> \\
        [--batch-size 64 --batch-size 256] [--infer-k-step 8] [--rounds 21] [--out benchmarks/results/padded-groups]

``--infer-k-step S`` adds per-image K on the grid of S at inference (one batch per K; the nano default's
8 since 2026-11-28, on a model trained with batch K on the grid of 4). RUN is the default job's run directory (AdaptiVision's ``last.safetensors`` beside its
``model.json``, the dense model's in ``dense/``). Top-1 is on the whole test set; the padded rows must
reproduce the per-K row (they run the same images through the same weights). Writes OUT.json
(the record) and OUT.md (its tables).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics

import torch

from adaptivision.budget import apply_budget, set_infer_k_step
from adaptivision.data.datasets import collate_skip
from adaptivision.profile import profile
from adaptivision.provenance import save_record
from adaptivision.timing import tile_batch, time_models
from adaptivision.train import engine


def variants(model: torch.nn.Module, groups: list, fixed_k: int, grids: tuple = ()) -> list:
    """(label, model) of every way to run ``model``; copies, so that each keeps its own setting.
    ``grids``: per-image K on these grids at inference (``infer_k_step``), one batch per K."""
    out = [("per-image K, one batch per K", model)]
    for step in grids:
        m = copy.deepcopy(model)
        set_infer_k_step(m, step)
        out.append((f"per-image K, infer_k_step={step}", m))
    for g in groups:
        m = copy.deepcopy(model)
        m.opts.max_groups = g
        out.append((f"per-image K, max_groups={g}", m))
    m = copy.deepcopy(model)
    apply_budget(m, dict(k=fixed_k), None)
    out.append((f"one K for every image, k={fixed_k}", m))
    return out


def measure(run: str, batch_sizes: list, groups: list, rounds: int, warmup: int = 3, limit: int = 0,
            grids: tuple = ()) -> dict:
    dense, cfg = engine.load_for_eval(os.path.join(run, "dense", "last.safetensors"))
    ours, _ = engine.load_for_eval(os.path.join(run, "last.safetensors"))
    cfg = dataclasses.replace(cfg, workers=0, batch_size=256, limit_eval=limit or cfg.limit_eval)
    d = engine.setup_distributed("cpu")
    ds = engine.build_eval_dataset(cfg, ours)
    loader = engine.eval_loader(ds, cfg, d)
    images, _, _ = collate_skip([ds[i] for i in range(min(max(batch_sizes), len(ds)))])
    mean_k = profile(ours, images)["mean_k"][0]
    fixed_k = max(1, round(mean_k))
    rows = [dict(label="dense ViT (same run)", model=dense)] + [dict(label=lab, model=m) for lab, m in
                                                                variants(ours, groups, fixed_k, grids)]
    for r in rows:
        r["top1"] = engine.evaluate(r["model"].eval(), loader, d)["top1"]
        print(f"{r['label']:40s} top-1 {r['top1']:.2f}", flush=True)
    timing = {}
    for b in batch_sizes:
        x = tile_batch(images, b)
        prof = [profile(r["model"], x) for r in rows]
        times = time_models([r["model"] for r in rows], x, warmup, rounds)
        ref = statistics.median(times[0])
        timing[b] = [dict(gmacs=p["gmacs"], mean_k=p.get("mean_k"), ms_per_batch=1e3 * statistics.median(t),
                          img_per_s=b / statistics.median(t), speedup=ref / statistics.median(t),
                          groups=_groups(r["model"], x)) for r, p, t in zip(rows, prof, times, strict=True)]
        for r, t in zip(rows, timing[b], strict=True):
            print(f"batch {b:4d} | {r['label']:40s} | {t['gmacs']:.4f} GMACs | {t['speedup']:.2f}x dense", flush=True)
    return dict(run=run, rows=[dict(label=r["label"], top1=r["top1"]) for r in rows], timing=timing,
                rounds=rounds, threads=torch.get_num_threads(), fixed_k=fixed_k)


@torch.no_grad()
def _groups(model: torch.nn.Module, x: torch.Tensor) -> int:
    """How many batches the condensed blocks ran as (1 for the dense model)."""
    if not hasattr(model, "forward_tokens"):
        return 1
    return len(model.eval().forward_tokens(x).groups)


def to_markdown(result: dict) -> str:
    lines = []
    for b, timing in result["timing"].items():
        lines += [f"Batch {b}, {result['threads']} threads, median of {result['rounds']} interleaved rounds:", "",
                  "| model | top-1 (%) | GMACs | mean K | batches | ms/batch | images/s | vs dense |",
                  "|---|---|---|---|---|---|---|---|"]
        for r, t in zip(result["rows"], timing, strict=True):
            k = f"{t['mean_k'][0]:.1f}" if t["mean_k"] else "—"
            lines.append(f"| {r['label']} | {r['top1']:.2f} | {t['gmacs']:.4f} | {k} | {t['groups']} | "
                         f"{t['ms_per_batch']:.1f} | {t['img_per_s']:.0f} | {t['speedup']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="the default job's run directory (with dense/ inside)")
    p.add_argument("--batch-size", type=int, action="append", help="repeatable (default: 64 and 256)")
    p.add_argument("--groups", default="1,2,3", help="max_groups values to measure")
    p.add_argument("--infer-k-step", type=int, action="append", default=[],
                   help="repeatable: also run per-image K on this grid at inference (the model's infer_k_step)")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--limit", type=int, default=0, help="evaluate on this many test images (0: all)")
    p.add_argument("--out", default="benchmarks/results/padded-groups")
    args = p.parse_args(argv)
    for sub in ("", "dense"):
        if not os.path.isfile(os.path.join(args.run, sub, "last.safetensors")):
            raise SystemExit(f"{args.run}: no {os.path.join(sub, 'last.safetensors')}; pass the default job's "
                             "run directory (runs/<model>-fashion-mnist-<time>)")
    result = measure(args.run, args.batch_size or [64, 256], [int(g) for g in args.groups.split(",")],
                     args.rounds, limit=args.limit, grids=tuple(args.infer_k_step))
    save_record(args.out, result, to_markdown(result), argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
