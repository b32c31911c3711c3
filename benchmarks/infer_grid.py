"""Top-1 of trained DTC models with per-image K on other grids at inference (``infer_k_step``), the
weights unchanged: what moving the nano default's inference grid from 4 to 8 costs in accuracy.

    python benchmarks/infer_grid.py --checkpoint RUN/last.safetensors [--checkpoint ...] \\
        [--grid 4 --grid 8] [--limit 0] [--out benchmarks/results/infer-grid-k20]

Each checkpoint is evaluated on its own test set (as ``adaptivision eval --infer-k-step S`` does),
once per grid; GMACs and mean K are profiled on its first 512 test images. Writes OUT.json (the
record) and OUT.md (its table). Timing is not here: ``benchmarks/padded_groups.py --infer-k-step S``
times the grids on a default job's run beside its dense model.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from adaptivision.budget import set_infer_k_step
from adaptivision.data.datasets import collate_skip
from adaptivision.profile import profile
from adaptivision.provenance import save_record
from adaptivision.train import engine


@torch.no_grad()
def measure(checkpoint: str, grids: list, limit: int = 0) -> dict:
    model, cfg = engine.load_for_eval(checkpoint)
    cfg = dataclasses.replace(cfg, workers=0, batch_size=256, limit_eval=limit or cfg.limit_eval)
    d = engine.setup_distributed("cpu")
    ds = engine.build_eval_dataset(cfg, model)
    loader = engine.eval_loader(ds, cfg, d)
    images, _, _ = collate_skip([ds[i] for i in range(min(512, len(ds)))])
    trained = next(iter(model.dtc.values())).infer_k_step
    rows = []
    for step in grids:
        set_infer_k_step(model, step)
        prof = profile(model.eval(), images)
        rows.append(dict(grid=step, top1=engine.evaluate(model, loader, d)["top1"], mean_k=prof["mean_k"][0],
                         gmacs=prof["gmacs"]))
        print(f"{checkpoint} | grid {step} | top-1 {rows[-1]['top1']:.2f} | mean K {rows[-1]['mean_k']:.2f}",
              flush=True)
    return dict(checkpoint=checkpoint, saved_infer_k_step=trained, images=len(ds), rows=rows)


def to_markdown(result: dict) -> str:
    grids = result["grids"]
    lines = ["| checkpoint | " + " | ".join(f"top-1, grid {g} (%)" for g in grids) + " | "
             + " | ".join(f"mean K, grid {g}" for g in grids) + " |",
             "|---|" + "---|" * (2 * len(grids))]
    for r in result["checkpoints"]:
        lines.append(f"| {r['checkpoint']} | " + " | ".join(f"{x['top1']:.2f}" for x in r["rows"]) + " | "
                     + " | ".join(f"{x['mean_k']:.2f}" for x in r["rows"]) + " |")
    if len(grids) == 2:
        diffs = [r["rows"][1]["top1"] - r["rows"][0]["top1"] for r in result["checkpoints"]]
        lines += ["", f"grid {grids[1]} minus grid {grids[0]}: mean {sum(diffs) / len(diffs):+.3f}, "
                  f"from {min(diffs):+.2f} to {max(diffs):+.2f} over {len(diffs)} checkpoints"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", action="append", required=True, help="repeatable: a trained DTC run's weights")
    p.add_argument("--grid", type=int, action="append", help="repeatable (default: 4 and 8)")
    p.add_argument("--limit", type=int, default=0, help="evaluate on this many test images (0: all)")
    p.add_argument("--out", default="benchmarks/results/infer-grid")
    args = p.parse_args(argv)
    grids = args.grid or [4, 8]
    for ck in args.checkpoint:
        if not os.path.isfile(ck):
            raise SystemExit(f"{ck}: no such checkpoint")
    result = dict(grids=grids, checkpoints=[measure(ck, grids, args.limit) for ck in args.checkpoint],
                  threads=torch.get_num_threads())
    save_record(args.out, result, to_markdown(result), argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
