"""Copy an experiment's run records into the repository: one small JSON per run, no weights.

    python benchmarks/commit_records.py experiments/default/dtc-where benchmarks/results/dtc/default [--docs docs/results.md]

Writes DEST/<experiment>/experiment.json and DEST/runs/<run>/seedN/summary.json, where each
summary.json is the run's own summary with its resolved config (config.yaml), model spec
(model.json) and per-epoch metrics (the epoch lines of metrics.jsonl) folded in; segmentation and
detection runs keep their own segment.json / detect.json (spec and results, no weights). `adaptivision
report DEST/<experiment>` reads them as it reads a run directory.

With ``--docs``, the block that `adaptivision report` generated from the record being replaced is
replaced in that file by the block generated from the new one (found verbatim, so hand-written text
around it is never touched); a first record, or a block edited by hand, is printed to paste instead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

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


def generated_block(exp_dir: str) -> str:
    """The text `adaptivision report` makes for one recorded experiment, from its "Scale" line to its
    last note (its title and plots left out): what docs/results.md holds of it."""
    from adaptivision.experiments.report import report

    with tempfile.TemporaryDirectory() as tmp:
        with open(report([exp_dir], tmp, pictures=False)) as f:
            lines = f.read().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Scale `"))
    lines = [ln for ln in lines[start:] if not ln.startswith("![")]
    return "\n".join(lines).strip()


def update_docs(docs: str, old: str | None, new: str) -> bool:
    """Put ``new`` where ``old`` (the block of the record it replaces) stands in ``docs``; False, with the
    file untouched, when it is not there verbatim."""
    with open(docs) as f:
        text = f.read()
    if old is None or old not in text:
        return False
    with open(docs, "w") as f:
        f.write(text.replace(old, new))
    return True


def main(exp_dir: str, dest: str, docs: str | None = None) -> int:
    with open(os.path.join(exp_dir, "experiment.json")) as f:
        exp = json.load(f)
    committed = os.path.join(dest, exp["experiment"])
    old, unreadable = None, None
    if docs and os.path.isfile(os.path.join(committed, "experiment.json")):
        try:
            old = generated_block(committed)
        except Exception as e:  # an old record that no longer reports must not stop the new one being written
            unreadable = f"{type(e).__name__}: {e}"
    os.makedirs(committed, exist_ok=True)
    shutil.copy(os.path.join(exp_dir, "experiment.json"), committed)
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
    if docs is None:
        return 0
    new = generated_block(committed)
    if update_docs(docs, old, new):
        print(f"{docs}: the {exp['experiment']} block replaced")
        return 0
    if unreadable:
        why = f"not updated, the previous record could not be reported ({unreadable})"
    elif old is None:
        why = "has no block of it yet"
    else:
        why = "does not hold the block of the previous record verbatim"
    print(f"{docs} {why}: records written, paste this block by hand:\n\n{new}\n", file=sys.stderr)
    return 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("exp_dir", help="the experiment's directory under `experiment run --out`")
    ap.add_argument("dest", help="the results folder, e.g. benchmarks/results/dtc/full")
    ap.add_argument("--docs", help="replace the experiment's generated block in this file (docs/results.md)")
    args = ap.parse_args()
    sys.exit(main(args.exp_dir, args.dest, args.docs))
