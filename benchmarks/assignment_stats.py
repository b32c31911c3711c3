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


def per_run(doc: str, num: int, measure, header: str, row, argv=None, extra=None) -> int:
    """The command line shared by the per-run diagnostics (``--run`` ..., ``--num``, ``--data-dir``,
    ``--out``): ``measure(model, images)`` (a dict) on each run's last checkpoint and its first
    ``--num`` test images, seed 0, with ``extra(run_dir)`` (a dict) when given; printed as a table
    (``header`` and ``row(record)`` lines) and saved to OUT.json / OUT.md."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="run directory (its last.safetensors)")
    p.add_argument("--num", type=int, default=num, help="test images")
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
        rows.append(dict(run=run, **measure(model, x), **(extra(run) if extra else {})))
    lines = [header] + [row(r) for r in rows]
    print("\n".join(lines))
    if args.out:
        save_record(dict(rows=rows, images=args.num, provenance=provenance()), "\n".join(lines), args.out)
    return 0


def main(argv=None) -> int:
    return per_run(__doc__, 512, assignment_stats,
                   "| run | top weight | effective K | light slots | K |\n|---|---|---|---|---|",
                   lambda r: f"| {r['run']} | {r['top_weight']:.3f} | {r['effective_k']:.1f} | "
                             f"{r['light_slots']:.3f} | {r['mean_k']:.1f} |", argv)


if __name__ == "__main__":
    raise SystemExit(main())
