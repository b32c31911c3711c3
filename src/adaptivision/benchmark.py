"""``adaptivision benchmark``: measured speed next to GMACs, timm-benchmark style.

Every model is timed in the same process, in interleaved rounds (one batch of each model per
round), so a slow spell of a shared machine hits all of them alike; the report gives the median
and the 10-90% spread of the per-batch times. Models are named by spec::

    NAME[:key=value...]      timm name + model options, e.g. adaptivision_small_patch16_224:afa=false
                             budget keys: gmacs=1.3 | mean_k=64 | bias=-2 | k=64 (one fixed K)

AdaptiVision models are first run on the benchmark batch in training mode (without gradients)
so that their complexity statistics exist, as in a trained model, then calibrated to their budget.
The batch mixes flat and textured images, so that per-image K really varies.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
from typing import Optional

import timm
import torch

from .budget import apply_budget, parse_budget, parse_spec
from .checkpoint import load_weights
from .profile import profile
from .timing import time_models, train_step


def mixed_batch(batch: int, chans: int, size: int, seed: int = 0) -> torch.Tensor:
    """Normalised images from flat to fully textured (random texture over a growing fraction of
    the image), so that the complexity of the images, and with it their K, spreads out."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    x = torch.empty(batch, chans, size, size)
    for i in range(batch):
        frac = i / max(batch - 1, 1)
        img = (0.5 * torch.rand((), generator=g) * (xx + yy)).expand(chans, size, size).clone()
        rows = int(round(frac * size))
        img[:, :rows] += torch.randn(chans, rows, size, generator=g)
        x[i] = img
    return x[torch.randperm(batch, generator=g)]


def build(spec: str, img_size: Optional[int], images: torch.Tensor, checkpoint: Optional[str] = None,
          default_budget: Optional[dict] = None) -> tuple[torch.nn.Module, dict]:
    name, kwargs, budget = parse_spec(spec)
    # NAME:weights=PATH: this model's own weights (e.g. a run's dense/last.safetensors beside its DTC)
    checkpoint = kwargs.pop("weights", None) or checkpoint
    if img_size:
        kwargs.setdefault("img_size", img_size)
    model = timm.create_model(name, **kwargs)
    if checkpoint:
        load_weights(model, checkpoint)
    budget = budget or dict(default_budget or {})
    if getattr(model, "dtc", None) is not None and len(model.dtc):
        if checkpoint is None:  # an untrained model: give it the statistics a trained one has
            model.train()
            with torch.no_grad():
                model(images)
        apply_budget(model.eval(), budget, images)
    elif budget:
        raise ValueError(f"{spec}: a budget needs an AdaptiVision model with DTC (condense_at set)")
    return model.eval(), budget


def benchmark(specs: list, img_size: Optional[int] = None, batch_size: int = 64, device: str = "cpu",
              amp: bool = False, compile: bool = False, budget: Optional[str] = None, warmup: int = 3,
              rounds: int = 15, checkpoint: Optional[str] = None, channels_last: bool = False,
              train: bool = False) -> dict:
    """Measure the models of ``specs``; speed-ups are relative to the first. ``train``: time
    training updates (forward + backward + AdamW step, :func:`train_step`) instead of inference."""
    dev = torch.device(device)
    probe = timm.create_model(parse_spec(specs[0])[0], **({"img_size": img_size} if img_size else {}))
    c = probe.patch_embed.proj.in_channels
    size = img_size or probe.patch_embed.img_size[0]
    x = mixed_batch(batch_size, c, size)
    default_budget = parse_budget(budget) if budget else None
    models, rows = [], []
    for spec in specs:
        model, used = build(spec, img_size, x, checkpoint if spec.startswith("adaptivision_") else None,
                            default_budget)
        prof = profile(model, x)
        model = model.to(dev)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compile:
            model = torch.compile(model)
        models.append(model)
        rows.append(dict(model=spec, budget=used or None, params_m=prof["params"] / 1e6, gmacs=prof["gmacs"],
                         mean_k=prof.get("mean_k")))
    xd = x.to(dev, memory_format=torch.channels_last) if channels_last else x.to(dev)
    steps = [train_step(m, xd, amp) for m in models] if train else None
    times = time_models(models, xd, warmup, rounds, amp, steps)
    for row, t in zip(rows, times, strict=True):
        q = statistics.quantiles(t, n=10) if len(t) >= 2 else [t[0]] * 9
        med = statistics.median(t)
        row.update(img_per_s=batch_size / med, ms_per_batch=1e3 * med,
                   spread_img_per_s=(batch_size / q[-1], batch_size / q[0]))
    ref = rows[0]
    for row in rows:
        row["speedup"] = row["img_per_s"] / ref["img_per_s"]
        row["gmacs_ratio"] = ref["gmacs"] / row["gmacs"]
        row["realized"] = row["speedup"] / row["gmacs_ratio"]  # 1.0: the GMACs saving is all real speed
    return dict(rows=rows, batch_size=batch_size, img_size=size, device=_device_name(dev), amp=amp,
                compile=compile, mode="training updates" if train else "inference", threads=torch.get_num_threads(), rounds=rounds, torch=torch.__version__,
                timm=timm.__version__)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    return f"{name} ({os.cpu_count()} cores)"


def to_markdown(result: dict) -> str:
    lines = [f"{result.get('mode', 'inference').capitalize()}: "
             f"{result['device']}, {result['threads']} threads, batch {result['batch_size']}, "
             f"{result['img_size']}², amp={result['amp']}, compile={result['compile']}, "
             f"median of {result['rounds']} interleaved rounds (10-90% range in brackets).", "",
             "| model | params (M) | GMACs | mean K | images/s | ms/batch | speed-up | GMACs ratio | realized |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        k = "/".join(f"{v:.0f}" for v in r["mean_k"]) if r["mean_k"] else "—"
        lo, hi = r["spread_img_per_s"]
        lines.append(f"| {r['model']} | {r['params_m']:.2f} | {r['gmacs']:.3f} | {k} | {r['img_per_s']:.1f} "
                     f"[{lo:.0f}-{hi:.0f}] | {r['ms_per_batch']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['gmacs_ratio']:.2f}x | {r['realized']:.2f} |")
    return "\n".join(lines)


def save_record(result: dict, markdown: str, out: str) -> tuple[str, str]:
    """``OUT.json`` (the record) and ``OUT.md`` (its table) of a benchmark; returns both paths."""
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    base = out[:-5] if out.endswith(".json") else out
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown + "\n")
    return base + ".json", base + ".md"


def write(result: dict, out: str) -> tuple[str, str]:
    return save_record(result, to_markdown(result), out)
