"""ONNX export in fixed-K mode.

Per-image K groups a batch by a data-dependent value, which a static graph cannot express, so
export uses one K for every image (``dynamic=False`` models, or ``fixed_k=`` here for a model
trained with per-image K: the nested centroids make every prefix valid). The batch dimension
stays dynamic.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .budget import fixed_k


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
