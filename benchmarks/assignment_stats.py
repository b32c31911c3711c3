"""How sharp a trained model's clusters are (docs/results.md, "Position in the distance").

    python benchmarks/assignment_stats.py --run RUN_DIR [--run RUN_DIR ...] [--num 512] [--out OUT]

For each run's last checkpoint, on the first ``--num`` test images: each patch's largest assignment
weight (1: a partition; 1/K: every super-token a blur of the whole image), the effective number of
clusters, the share of slots holding less than half a patch, and K (``adaptivision.visualize.assignment_stats``).
Writes OUT.json and OUT.md when ``--out`` is given.
"""
from __future__ import annotations

import argparse
import os

import torch

from adaptivision.benchmark import save_record
from adaptivision.data import collate_skip
from adaptivision.provenance import provenance
from adaptivision.train.build import build_eval_dataset, load_for_eval
from adaptivision.visualize import assignment_stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="run directory (its last.safetensors)")
    p.add_argument("--num", type=int, default=512, help="test images")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    rows = []
    for run in args.run:
        model, cfg = load_for_eval(os.path.join(run, "last.safetensors"))
        if args.data_dir is not None:
            cfg.data_dir = args.data_dir
        ds = build_eval_dataset(cfg, model)
        x, _, _ = collate_skip([ds[i] for i in range(min(args.num, len(ds)))])
        torch.manual_seed(0)
        rows.append(dict(run=run, **assignment_stats(model, x)))
    lines = ["| run | top weight | effective K | light slots | K |", "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['top_weight']:.3f} | {r['effective_k']:.1f} | {r['light_slots']:.3f} | "
              f"{r['mean_k']:.1f} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        save_record(dict(rows=rows, images=args.num, provenance=provenance()), "\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
