"""How a soft-trained DTC model should assign at inference (issue 15's lever "hard assignment at
inference"): the same checkpoints evaluated as trained, with hard nearest-centre assignment, and
at other temperatures. No retraining; GMACs do not change (K and the stage are the same).

    python benchmarks/assign_at_inference.py --run RUN/seed0 --run RUN/seed1 [--out DIR]

RUN is a DTC run directory of ``adaptivision experiment run`` (``last.safetensors`` beside its
``model.json``). Writes ``assign-at-inference.json`` (every row, per run) and ``.md`` (mean ± std).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from adaptivision.experiments.report import mean_std
from adaptivision.layers.dtc import DynamicTokenClustering
from adaptivision.provenance import provenance
from adaptivision.train import engine

# label -> (hard, tau); tau None = the trained temperature
VARIANTS = (("as trained", None, None), ("hard (nearest centre)", True, None),
            ("soft, tau 10", False, 10.0), ("soft, tau 40", False, 40.0))


def evaluate_variants(run: str, checkpoint: str = "last.safetensors") -> list:
    model, cfg = engine.load_for_eval(os.path.join(run, checkpoint))
    cfg = dataclasses.replace(cfg, workers=0, batch_size=256)
    d = engine.setup_distributed("cpu")
    loader = engine.eval_loader(engine.build_eval_dataset(cfg, model), cfg, d)
    stages = [m for m in model.modules() if isinstance(m, DynamicTokenClustering)]
    if not stages:
        raise ValueError(f"{run}: not a DTC model (no clustering stage to change)")
    trained = [(m.hard, m.tau) for m in stages]
    rows = []
    for label, hard, tau in VARIANTS:
        for m, (h0, t0) in zip(stages, trained, strict=True):
            m.hard = h0 if hard is None else hard
            m.tau = t0 if tau is None else tau
        ev = engine.evaluate(model, loader, d)
        rows.append(dict(label=label, hard=stages[0].hard, tau=stages[0].tau, top1=ev["top1"], images=ev["images"]))
        print(f"{run} | {label:24s} | top-1 {ev['top1']:.2f}", flush=True)
    return rows


def to_markdown(per_run: dict) -> str:
    runs = list(per_run.values())
    lines = [f"| assignment at inference ({len(runs)} model(s)) | top-1 (%) |", "|---|---|"]
    for i, row in enumerate(runs[0]):
        lines.append(f"| {row['label']} | {mean_std([r[i]['top1'] for r in runs])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="DTC run directory (repeatable: one per seed)")
    p.add_argument("--checkpoint", default="last.safetensors")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    per_run = {run: evaluate_variants(run, args.checkpoint) for run in args.run}
    os.makedirs(args.out, exist_ok=True)
    command = " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:]))
    with open(os.path.join(args.out, "assign-at-inference.json"), "w") as f:
        json.dump(dict(runs=per_run, command=command, provenance=provenance()), f, indent=1)
    md = to_markdown(per_run)
    with open(os.path.join(args.out, "assign-at-inference.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
