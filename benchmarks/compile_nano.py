"""torch.compile (inductor) vs eager at nano size, dense vs AdaptiVision (docs/performance.md).

    .venv/bin/python benchmarks/compile_nano.py [--rounds 15]
"""
import argparse
import statistics
import time

import timm
import torch

import adaptivision  # noqa: F401
from adaptivision.benchmark import mixed_batch


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    x = mixed_batch(64, 1, 28)
    av = timm.create_model("adaptivision_nano_patch4_28")
    with torch.no_grad():  # complexity statistics, as a trained model has
        av.train()(x)
    av.eval()
    dense = timm.create_model("adaptivision_nano_patch4_28", reduction="none").eval()
    with torch.inference_mode():
        ref = av(x)
        t = time.time()
        av_c = torch.compile(av)
        err = (av_c(x) - ref).abs().max().item()
        print(f"compile + first call {time.time() - t:.0f} s, max |compiled - eager| = {err:.1e}")
        dense_c = torch.compile(dense)
        dense_c(x)
        for bias in (-1.0, 1.0, 0.0):  # other group shapes, then back to the default budget
            av.set_token_budget(bias=bias)
            av_c(x)
        models = {"dense": dense, "dense compiled": dense_c, "adaptivision": av, "adaptivision compiled": av_c}
        times = {k: [] for k in models}
        for _ in range(args.rounds):
            for k, m in models.items():
                t = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        print(f"{k:24s} {1e3 * statistics.median(v):7.1f} ms / batch of 64")


if __name__ == "__main__":
    main()
