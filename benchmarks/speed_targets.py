"""Issue 5's speed targets, measured in one process on this machine (see docs/performance.md).

    .venv/bin/python benchmarks/speed_targets.py [--batch-size 64] [--rounds 9] [--out benchmarks/results/cpu]
    .venv/bin/python benchmarks/speed_targets.py --smoke     # CI: tiny model, two rounds, targets not judged

Rows (one interleaved timing run): timm's DeiT-S, AdaptiVision-S at its default budget (mixed K),
the same at one fixed K equal to that mean, the same tokens with random keep (no DTC, no AFA: the
ideal cost of that many tokens), ToMe at equal GMACs, AdaptiVision-S at an aggressive budget;
then batch-1 latency of DeiT-S and AdaptiVision-S.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import timm

import adaptivision  # noqa: F401
from adaptivision import budget
from adaptivision.benchmark import benchmark, build, mixed_batch, to_markdown
from adaptivision.profile import profile


def specs_for(av: str, dense: str, size: int, aggressive: float) -> list:
    x = mixed_batch(64, 3, size)
    model, _ = build(av, None, x)
    prof = profile(model, x)
    n = model.patch_embed.num_patches
    k = int(round(prof["mean_k"][0] / 8) * 8)  # a K the default k_step allows
    tome = timm.create_model(av, reduction="tome")
    r, _ = budget.match_gmacs(tome.eval(), x, prof["gmacs"])
    return [dense, av, f"{av}:k={k}", f"{av}:reduction=random:keep_ratio={k / n:.4f}",
            f"{av}:reduction=tome:tome_r={r}", f"{av}:gmacs={aggressive}"]


def judge(main: dict, lat: dict) -> list:
    rows = main["rows"]
    dense, av, fixed, rnd, tome, aggr = rows
    av_lat, dense_lat = lat["rows"][1]["ms_per_batch"], lat["rows"][0]["ms_per_batch"]
    return [
        ("default budget: GMACs 3.1 +- 0.1", f"{av['gmacs']:.3f}", abs(av["gmacs"] - 3.1) <= 0.1),
        ("default budget: realized speed-up / GMACs ratio >= 0.9", f"{av['realized']:.2f}", av["realized"] >= 0.9),
        ("aggressive budget (<= 1.3 GMACs): >= 3x DeiT-S images/s", f"{aggr['speedup']:.2f}x at {aggr['gmacs']:.2f}",
         aggr["speedup"] >= 3 and aggr["gmacs"] <= 1.3),
        ("mixed K >= 0.9 x fixed K at the same mean K", f"{av['img_per_s'] / fixed['img_per_s']:.2f}",
         av["img_per_s"] / fixed["img_per_s"] >= 0.9),
        ("DTC + AFA overhead <= 10% of the forward (fixed K vs random keep, same K)",
         f"{100 * (1 - fixed['img_per_s'] / rnd['img_per_s']):.1f}%", 1 - fixed["img_per_s"] / rnd["img_per_s"] <= 0.10),
        ("batch 1: latency not above DeiT-S", f"{av_lat:.1f} vs {dense_lat:.1f} ms", av_lat <= dense_lat),
        ("equal GMACs: images/s >= ToMe", f"{av['img_per_s']:.1f} vs {tome['img_per_s']:.1f} "
         f"({av['gmacs']:.2f} vs {tome['gmacs']:.2f} GMACs)", av["img_per_s"] >= tome["img_per_s"]),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--out", default="benchmarks/results/cpu")
    p.add_argument("--smoke", action="store_true", help="nano model at 28 px, 2 rounds: checks the script runs")
    a = p.parse_args(argv)
    if a.smoke:
        av, dense, size, aggressive, a.batch_size, a.rounds = ("adaptivision_nano_patch4_28",
                                                               "adaptivision_nano_patch4_28:reduction=none",
                                                               28, 0.022, 8, 2)
    else:
        av, dense, size, aggressive = "adaptivision_small_patch16_224", "deit_small_patch16_224", 224, 1.3
    if a.smoke:
        specs = [dense, av, f"{av}:k=32", f"{av}:reduction=random:keep_ratio=0.65", f"{av}:reduction=tome:tome_r=3",
                 f"{av}:gmacs={aggressive}"]
    else:
        specs = specs_for(av, dense, size, aggressive)
    res = benchmark(specs, None, a.batch_size, a.device, a.amp, rounds=a.rounds, warmup=2)
    lat = benchmark([specs[0], specs[1]], None, 1, a.device, a.amp, rounds=max(5, 4 * a.rounds), warmup=3)
    verdict = judge(res, lat)
    md = ["## Throughput, batch %d" % a.batch_size, "", to_markdown(res), "", "## Latency, batch 1", "",
          to_markdown(lat), "", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    md += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in verdict]
    text = "\n".join(md)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out + ".json", "w") as f:
            json.dump(dict(throughput=res, latency=lat, targets=[dict(target=t, measured=m, met=ok)
                                                                 for t, m, ok in verdict]), f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
