"""The compute that committed training records cost: run-hours per run and in all, each run once.

    python benchmarks/run_hours.py benchmarks/results/dtc/full [more record folders]

Reads every ``runs/<config>/seed<S>/summary.json`` under each folder and sums its epochs'
training seconds (``epoch_seconds`` in the record; every epoch once, whichever processes trained
it after resumes). A run shared by several experiments (Table 5's dense run is also
``dtc-plateau``'s and ``plateau-table7``'s) counts once, named by every cell that uses it.
Core-hours weight each run by the threads it trained with. Not counted: the per-epoch evaluation,
epochs lost to a kill before their checkpoint, runs stopped and never recorded, and evaluation-
only experiments (the curves), and segmentation or detection runs recorded before their
``segment.json`` / ``detect.json`` held ``train_seconds`` (2026-11-29).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys


def _cells(root: str) -> dict:
    """run directory (relative to ``root``) -> (experiment, label) of every cell using it."""
    used: dict = {}
    for path in sorted(glob.glob(os.path.join(root, "*", "experiment.json"))):
        with open(path) as f:
            rec = json.load(f)
        for cell in rec.get("cells", []):
            for run in cell.get("runs") or []:
                name = (rec["experiment"], cell["label"])
                used.setdefault(os.path.dirname(os.path.normpath(run["run_dir"])), []).append(name)
    return {k: sorted(set(v)) for k, v in used.items()}


def _seconds(seed_dir: str) -> tuple:
    """(training seconds, threads) of one run's record, or None: a classification run's epochs
    from its summary.json, a segmentation or detection run's ``train_seconds``."""
    path = os.path.join(seed_dir, "summary.json")
    if os.path.isfile(path):
        with open(path) as f:
            rec = json.load(f)
        return sum(e["epoch_seconds"] for e in rec.get("epochs", []) if e.get("kind") == "epoch"), rec.get("threads")
    for name in ("segment.json", "detect.json"):
        path = os.path.join(seed_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                rec = json.load(f)
            if rec.get("train_seconds") is None:  # recorded before 2026-11-29
                return None
            return float(rec["train_seconds"]), (rec.get("provenance") or {}).get("threads")
    return None


def runs(root: str) -> list:
    """One entry per trained run (a config's seed) under ``root``: seconds, threads, cells."""
    cells, out = _cells(root), []
    for seed_dir in sorted(glob.glob(os.path.join(root, "runs", "*", "seed*"))):
        found = _seconds(seed_dir)
        if found is not None:
            config = os.path.relpath(os.path.dirname(seed_dir), root)
            out.append(dict(run=os.path.relpath(seed_dir, root), config=config, seconds=found[0],
                            threads=int(found[1] or 1), cells=cells.get(config, [])))
    return out


def _used_by(cells: list) -> str:
    """'LABEL (exp1, exp2)': the first experiment's label for the run and every experiment using it."""
    if not cells:
        return "—"
    return f"{cells[0][1]} ({', '.join(sorted({e for e, _ in cells}))})"


def table(entries: list) -> str:
    """Markdown: one row per config (its seeds together), then the totals."""
    by_config: dict = {}
    for e in entries:
        by_config.setdefault(e["config"], []).append(e)
    lines = ["| run | used by | seeds | run-hours | core-hours |", "|---|---|---|---|---|"]
    for config, es in sorted(by_config.items(), key=lambda kv: -sum(e["seconds"] for e in kv[1])):
        hours = sum(e["seconds"] for e in es) / 3600
        core = sum(e["seconds"] * e["threads"] for e in es) / 3600
        lines.append(f"| {config} | {_used_by(es[0]['cells'])} | {len(es)} | {hours:.1f} | {core:.1f} |")
    hours = sum(e["seconds"] for e in entries) / 3600
    core = sum(e["seconds"] * e["threads"] for e in entries) / 3600
    lines.append(f"| **total** | | **{len(entries)} runs** | **{hours:.1f}** | **{core:.1f}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("roots", nargs="+", help="record folders (each with runs/ and <experiment>/experiment.json)")
    args = ap.parse_args(argv)
    entries = []
    for root in args.roots:
        if not os.path.isdir(os.path.join(root, "runs")):
            print(f"{root}: no runs/ folder of training records here", file=sys.stderr)
            return 2
        entries += [dict(e, config=os.path.join(root, e["config"])) for e in runs(root)]
    print(table(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
