"""How sharp a trained model's clusters are (docs/results.md, "Position in the distance").

    python benchmarks/assignment_stats.py --run RUN_DIR [--run RUN_DIR ...] [--num 512] [--out OUT]

For each run's last checkpoint, on the first ``--num`` test images: each patch's largest assignment
weight (1: a partition; 1/K: every super-token a blur of the whole image), the effective number of
clusters, the share of slots holding less than half a patch, and K (``adaptivision.visualize.assignment_stats``);
beside them the run's recipe and where it stands (``run_facts``: peak lr, gradient clip, epochs finished, last
test top-1), so runs of different recipes, or stopped ones, read side by side.
Writes OUT.json and OUT.md when ``--out`` is given.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from adaptivision.benchmark import save_record
from adaptivision.data import collate_skip
from adaptivision.provenance import provenance
from adaptivision.train.build import build_eval_dataset, load_for_eval
from adaptivision.train.config import TrainConfig
from adaptivision.visualize import assignment_stats


def run_facts(run: str) -> dict:
    """The recipe (peak lr, gradient clip) of the run in ``run`` and where it stands (epochs finished,
    the last epoch's test top-1 and how many test images that was on), from its config and metrics."""
    if not os.path.isfile(os.path.join(run, "config.yaml")):  # a checkpoint without its run: nothing to read
        return dict(lr=None, clip_grad=None, epochs_done=None, eval_top1=None, eval_images=None)
    cfg = TrainConfig.saved(run)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        epochs = [r for r in map(json.loads, f) if r.get("kind") == "epoch"]
    last = epochs[-1] if epochs else {}
    # one process (the engine multiplies by the world size too)
    return dict(lr=cfg.lr or cfg.base_lr * cfg.batch_size * cfg.accum_steps / 512,
                clip_grad=cfg.clip_grad, epochs_done=len(epochs), eval_top1=last.get("eval_top1"),
                eval_images=last.get("eval_images"))


def facts_cells(r: dict) -> str:
    """The run_facts columns of a table row: lr, grad clip, epochs, test top-1 (images)."""
    top1 = "—" if r["eval_top1"] is None else f"{r['eval_top1']:.2f} ({r['eval_images']})"
    lr = "—" if r["lr"] is None else f"{r['lr']:.2e}"
    epochs = "—" if r["epochs_done"] is None else r["epochs_done"]
    return f"{lr} | {r['clip_grad'] or '—'} | {epochs} | {top1}"


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


def _row(r: dict) -> str:
    return (f"| {r['run']} | {facts_cells(r)} | "
            f"{r['top_weight']:.3f} | {r['effective_k']:.1f} | {r['light_slots']:.3f} | {r['mean_k']:.1f} |")


def main(argv=None) -> int:
    return per_run(__doc__, 512, assignment_stats,
                   "| run | lr | grad clip | epochs | test top-1 (images) | top weight | effective K | light slots | K |"
                   "\n|---|---|---|---|---|---|---|---|---|", _row, argv, extra=run_facts)


if __name__ == "__main__":
    raise SystemExit(main())
