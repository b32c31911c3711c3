"""Copy an experiment's run records into the repository: one small JSON per run, no weights.

    python benchmarks/commit_records.py experiments/default/dtc-where benchmarks/results/dtc/default

Writes DEST/<experiment>/experiment.json and DEST/runs/<run>/seedN/summary.json, where each
summary.json is the run's own summary with its resolved config (config.yaml), model spec
(model.json) and per-epoch metrics (the epoch lines of metrics.jsonl) folded in; segmentation and
detection runs keep their own segment.json / detect.json (spec and results, no weights). `adaptivision
report DEST/<experiment>` reads them as it reads a run directory.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import yaml


def record(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        rec = json.load(f)
    if "config" in rec and not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        return rec  # a committed record copied back into --out (docs/results.md, "Plateau scale"): as it was
    with open(os.path.join(run_dir, "config.yaml")) as f:
        rec["config"] = yaml.safe_load(f)
    with open(os.path.join(run_dir, "model.json")) as f:
        rec["model_spec"] = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rec["epochs"] = [e for e in map(json.loads, filter(str.strip, f)) if e.get("kind") == "epoch"]
    return rec


def main(exp_dir: str, dest: str) -> int:
    with open(os.path.join(exp_dir, "experiment.json")) as f:
        exp = json.load(f)
    os.makedirs(os.path.join(dest, exp["experiment"]), exist_ok=True)
    shutil.copy(os.path.join(exp_dir, "experiment.json"), os.path.join(dest, exp["experiment"]))
    for cell in exp["cells"]:
        for run in cell.get("runs", []):
            src = os.path.join(exp_dir, "..", run["run_dir"])
            out = os.path.join(dest, run["run_dir"])
            dense = [n for n in ("segment.json", "detect.json") if os.path.isfile(os.path.join(src, n))]
            if dense:  # segmentation / detection runs: their own record, already results-only
                os.makedirs(out, exist_ok=True)
                shutil.copy(os.path.join(src, dense[0]), out)
                continue
            if not os.path.isfile(os.path.join(src, "summary.json")):
                continue  # unfinished: nothing to record
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "summary.json"), "w") as f:
                json.dump(record(src), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
