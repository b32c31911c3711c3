"""Is one training process with every core faster than one process per core? (docs/results.md,
"Plateau scale": how to run long experiments on a small CPU machine.)

    .venv/bin/python benchmarks/threads_per_process.py [--out benchmarks/results/threads-per-process]

Times nano training updates (forward, cross-entropy, backward, AdamW; batch 64; the dense model
and the default AdaptiVision) in three settings: one process with all cores as threads, one
process with one thread, and ``cores`` processes with one thread each at the same time. The
throughput gain of the last is ``processes x (time with all threads) / (time with one thread,
shared)``. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MODELS = {"dense": {"reduction": "none"}, "adaptivision (default)": {}}


def worker(threads: int, rounds: int) -> dict:
    """Median ms per training update of each model, in this process with ``threads`` threads."""
    import timm
    import torch

    import adaptivision  # noqa: F401
    from adaptivision.benchmark import mixed_batch
    from adaptivision.timing import time_models, train_step
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = mixed_batch(64, 1, 28)
    models = [timm.create_model("adaptivision_nano_patch4_28", num_classes=10, **kw) for kw in MODELS.values()]
    times = time_models(models, x, warmup=3, rounds=rounds, steps=[train_step(m, x) for m in models])
    return {name: 1e3 * statistics.median(t) for name, t in zip(MODELS, times, strict=True)}


def spawn(threads: int, rounds: int, copies: int) -> list:
    cmd = [sys.executable, __file__, "--worker", str(threads), "--rounds", str(rounds)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(copies)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results/threads-per-process")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.rounds)))
        return
    from adaptivision.benchmark import save_record
    from adaptivision.provenance import provenance
    cores = os.cpu_count()
    alone = spawn(cores, args.rounds, 1)[0]
    single = spawn(1, args.rounds, 1)[0]
    shared = spawn(1, args.rounds, cores)
    rows = []
    for name in MODELS:
        shared_ms = statistics.median(s[name] for s in shared)
        rows.append(dict(model=name, all_threads_ms=alone[name], one_thread_alone_ms=single[name],
                         one_thread_shared_ms=shared_ms, throughput_gain=cores * alone[name] / shared_ms))
    result = dict(cores=cores, rounds=args.rounds, rows=rows, provenance=provenance())
    md = [f"Nano training updates (batch 64), {cores} cores, median of {args.rounds} updates "
          f"({result['provenance']['machine']})", "",
          f"| model | 1 process x {cores} threads (ms) | 1 process x 1 thread, alone (ms) | "
          f"{cores} processes x 1 thread, each (ms) | throughput of {cores} processes / 1 |",
          "|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['all_threads_ms']:.1f} | {r['one_thread_alone_ms']:.1f} | "
           f"{r['one_thread_shared_ms']:.1f} | {r['throughput_gain']:.2f}x |" for r in rows]
    save_record(result, "\n".join(md), args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
