"""ONNX export in fixed-K mode.

Per-image K groups a batch by a data-dependent value, which a static graph cannot express, so
export uses one K for every image (``dynamic=False`` models, or ``fixed_k=`` here for a model
trained with per-image K: the nested centroids make every prefix valid). The batch dimension
stays dynamic.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn


@contextlib.contextmanager
def fixed_k(model: nn.Module, k: Optional[int]):
    """Temporarily run every DTC stage of ``model`` with one K (the first stage gets ``k``,
    later stages keep their own fixed K or k_max)."""
    stages = list(getattr(model, "dtc", {}).values()) if hasattr(model, "dtc") else []
    saved = [(s.dynamic, s.fixed_k) for s in stages]
    try:
        for i, s in enumerate(stages):
            if k is not None and i == 0:
                if not s.k_min <= k <= s.k_max:
                    raise ValueError(f"fixed_k={k} is outside the model's range [{s.k_min}, {s.k_max}]")
                s.fixed_k = int(k)
            elif s.dynamic and s.fixed_k is None:
                raise ValueError("ONNX export needs one K per DTC stage: pass fixed_k= (first stage) or build "
                                 "the model with dynamic=False")
            s.dynamic = False
        yield model
    finally:
        for s, (dyn, fk) in zip(stages, saved, strict=True):
            s.dynamic, s.fixed_k = dyn, fk


def export_onnx(model: nn.Module, path: str, k: Optional[int] = None, batch: int = 2,
                input_size: Optional[tuple] = None) -> str:
    """Write ``model`` (eval mode) to ``path`` with a dynamic batch; returns ``path``.
    ``k``: the number of super-tokens of the first DTC stage (needed if the model has per-image K)."""
    if input_size is None:
        c, (h, w) = model.patch_embed.proj.in_channels, model.patch_embed.img_size
    else:
        c, h, w = input_size
    x = torch.randn(batch, c, h, w)
    was_training = model.training
    model.eval()
    try:
        with fixed_k(model, k), torch.no_grad():
            model(x)  # seeds the centroids of a never-run model before tracing
            torch.onnx.export(model, (x,), path, dynamo=True, input_names=["images"], output_names=["logits"],
                              dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    finally:
        model.train(was_training)
    return path
