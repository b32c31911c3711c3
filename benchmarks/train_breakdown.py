"""Where a training step's time goes, per part, AdaptiVision next to the dense model (issue 14).

    .venv/bin/python benchmarks/train_breakdown.py [--steps 10] [--batch 64] [--out benchmarks/results/train-breakdown]

The parts are labelled from outside the library (their methods wrapped in
``torch.profiler.record_function`` here, so the model code stays as it is), and timed by the
PyTorch profiler over ``--steps`` training updates (forward, cross-entropy with the model's
auxiliary terms, backward, AdamW step) after 3 warm-up updates, one model after the other in
one process. Times are inclusive (a part contains the parts indented under it) and in ms per
update; run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import timm
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import adaptivision  # noqa: F401
from adaptivision.benchmark import mixed_batch
from adaptivision.layers import afa, dtc, stages, tokens
from adaptivision.provenance import provenance

# (label, owner, method name, depth in the table)
PARTS = [
    ("DTC stage (all groups)", stages.ClusterStage, "forward_groups", 0),
    ("  K per image (complexity score)", dtc.DynamicTokenClustering, "num_clusters", 1),
    ("  farthest-point seeds", dtc.DynamicTokenClustering, "seed_points", 1),
    ("  assignment + k-means + condensation", dtc.DynamicTokenClustering, "forward", 1),
    ("AFA f_m (modulation predictor)", afa.ModulationPredictor, "forward", 0),
    ("AFA attention (incl. f_m)", afa.AdaptiveFocusAttention, "forward", 0),
    ("blocks (all, incl. AFA)", tokens, "run_block", 0),
    ("group assembly", tokens, "assemble", 0),
]


def _label(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    setattr(owner, name, wrapped)


def step_fn(model, x, y):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    aux = isinstance(model, adaptivision.AdaptiVision)

    def step():
        with record_function("forward + loss"):
            out = model(x, return_aux=True)[0] if aux else model(x)
            loss = torch.nn.functional.cross_entropy(out, y)
        with record_function("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("optimizer step"):
            opt.step()
    return step


def breakdown(model, x, y, steps: int) -> dict:
    model.train()
    step = step_fn(model, x, y)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("update"):
                step()
    totals = {e.key: e.cpu_time_total / 1e3 / steps for e in prof.key_averages()}  # ms per update
    labels = ["update", "forward + loss", "backward", "optimizer step"] + [p[0] for p in PARTS]
    return {k: totals.get(k, 0.0) for k in labels}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/train-breakdown")
    a = p.parse_args(argv)
    for label, owner, name, _ in PARTS:
        _label(owner, name, label)
    # the trunk calls run_block through the module attribute it imported: point it at the wrapper
    sys.modules["adaptivision.models.adaptivision"].run_block = tokens.run_block
    sys.modules["adaptivision.models.adaptivision"].assemble = tokens.assemble
    torch.manual_seed(0)
    x = mixed_batch(a.batch, 1, 28)
    y = torch.arange(a.batch) % 10
    models = {"dense": dict(reduction="none"), "adaptivision (default)": {},
              "adaptivision (per-image K in training)": dict(train_k="image"),
              "after block 2, AFA off": dict(condense_at=2, k_mid=24, afa=False),
              "adaptivision (paper)": dict(clustering="paper")}
    res = {name: breakdown(timm.create_model("adaptivision_nano_patch4_28", **kw), x, y, a.steps)
           for name, kw in models.items()}
    names = list(res)
    md = [f"ms per training update (batch {a.batch}, 28 x 28, {a.steps} updates, {torch.get_num_threads()} threads; "
          "inclusive times, parts indented under their owner)", "",
          "| part | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in res[names[0]]:
        md.append(f"| {key} | " + " | ".join(f"{res[n][key]:.1f}" for n in names) + " |")
    text = "\n".join(md) + "\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out + ".json", "w") as f:
            json.dump(dict(results=res, batch=a.batch, steps=a.steps, provenance=provenance()), f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
