"""Where a forward's time goes, per operator (torch.profiler), for the models of benchmarks/gpu_groups.sh.

    python benchmarks/gpu_profile.py [--device cuda] [--amp] [--batch-size 256] \
        --models deit_small_patch16_224,adaptivision_small_patch16_224:k=128 [--out DIR]

Prints, per model, the wall time of the profiled forwards and the top operators by device time
(self time on CUDA, CPU otherwise), and the number of host-device syncs it saw (aten::_local_scalar_dense,
cudaStreamSynchronize). Writes DIR/profile-<i>.txt.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from adaptivision.benchmark import build, mixed_batch


def run(spec: str, x: torch.Tensor, amp: bool, steps: int, top: int) -> str:
    model, _ = build(spec, None, x.cpu())
    model = model.to(x.device)
    cuda = x.device.type == "cuda"
    ctx = lambda: torch.autocast(x.device.type, dtype=torch.float16 if cuda else torch.bfloat16, enabled=amp)  # noqa: E731
    with torch.inference_mode(), ctx():
        for _ in range(3):
            model(x)
        if cuda:
            torch.cuda.synchronize()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                model(x)
            if cuda:
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / steps * 1e3
    ev = prof.key_averages()
    syncs = sum(e.count for e in ev if e.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize")) // steps
    launches = sum(e.count for e in ev if e.key.startswith("cudaLaunchKernel")) // steps
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    head = f"## {spec}: {wall:.1f} ms per forward, {syncs} host syncs, {launches} kernel launches per forward\n"
    return head + ev.table(sort_by=key, row_limit=top, max_name_column_width=60) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    x = mixed_batch(a.batch_size, a.in_chans, a.img_size).to(a.device)
    for i, spec in enumerate(a.models.split(",")):
        text = run(spec, x, a.amp, a.steps, a.top)
        print(text, flush=True)
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, f"profile-{i}.txt"), "w") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
