"""Timing, in one place: what ``amp`` means, interleaved rounds of inference or training
updates, medians (docs/performance.md says how the figures in the docs were measured)."""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Optional

import torch
import torch.nn as nn

from .models import AdaptiVision


def resolve_amp(amp, device: torch.device) -> str:
    """-> 'none' | 'bf16' | 'fp16'. ``'auto'`` (the training default): fp16 on CUDA, fp32 on CPU,
    where bf16 autocast measured 7x slower than fp32 on this project's CPU; ``True`` (asked for
    explicitly, ``adaptivision benchmark --amp``): fp16 on CUDA, bf16 on CPU; False/None: 'none'."""
    if amp in (False, None, "none"):
        return "none"
    if amp in (True, "auto"):
        return "fp16" if device.type == "cuda" else ("bf16" if amp is True else "none")
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"Invalid value for 'amp': {amp!r}; allowed: 'auto', 'bf16', 'fp16', 'none'.")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; use amp='bf16' or 'none' on CPU")
    return amp


def autocast(amp, device: torch.device):
    """The autocast context of ``amp`` (see :func:`resolve_amp`); fp32 for 'none'."""
    amp = resolve_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)




def train_step(model: torch.nn.Module, x: torch.Tensor, amp=False):
    """A closure that runs one training update of ``model`` on ``x``: forward (in training mode,
    with the auxiliary terms AdaptiVision returns), cross-entropy, backward, AdamW step."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    y = torch.arange(x.shape[0], device=x.device) % model.num_classes
    aux = isinstance(model, AdaptiVision)

    def step(_):
        with autocast(amp, x.device):
            out = model(x, return_aux=True)[0] if aux else model(x)
            loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def time_models(models: list, x: torch.Tensor, warmup: int = 3, rounds: int = 15, amp=False,
                steps: Optional[list] = None) -> list:
    """Per-batch seconds of each model, interleaved: round r times every model once.
    ``steps``: one callable per model to time instead of its inference forward (training)."""
    dev = x.device
    run = dict(zip(map(id, models), steps, strict=True)) if steps else {}

    def once(m):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        if id(m) in run:
            run[id(m)](x)
        else:
            with autocast(amp, dev), torch.inference_mode():
                m(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(warmup):
        for m in models:
            once(m)
    times = [[] for _ in models]
    for _ in range(rounds):
        for i, m in enumerate(models):
            times[i].append(once(m))
    return times


def tile_batch(images: torch.Tensor, batch: int) -> torch.Tensor:
    """``images`` repeated along the batch until there are ``batch`` of them (B, ...)."""
    reps = -(-batch // len(images))                                                 # ceil(batch / n)
    return images.repeat(reps, *[1] * (images.dim() - 1))[:batch]


def throughput(model: nn.Module, input_size: tuple, batch: int, device: torch.device,
               warmup: int = 3, repeats: int = 10, amp: str = "none",
               images: Optional[torch.Tensor] = None) -> dict:
    """timm-benchmark style: inference mode, warm-up, fixed batch; median images/s of repeats.
    ``images`` (real ones, repeated to ``batch``) instead of noise: with per-image K the time
    depends on what the images hold (noise gives every image about the same K)."""
    model.eval()
    if images is None:
        x = torch.randn(batch, *input_size, device=device)
    else:
        x = tile_batch(images.to(device), batch)
    times = time_models([model], x, warmup, repeats, amp)[0]
    med = statistics.median(times)
    return dict(img_per_s=batch / med, batch=batch, repeats=repeats,
                spread=(batch / max(times), batch / min(times)))
