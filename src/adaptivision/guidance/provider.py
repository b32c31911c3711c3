"""One object that turns a batch into the model's guidance inputs, whatever the sources.

``Guidance(['text', 'saliency'], ...)(images, labels)`` gives :class:`GuidanceInputs`: the CMTF
tokens per source (``{name: (M, Dg) or (B, M, Dg)}``), DTC's per-patch weights and the L_align
targets. The sources (DESIGN.md §1):

=========  ==============================================  ==================  ===============
source     CMTF tokens                                     DTC patch weights   L_align target
=========  ==============================================  ==================  ===============
saliency   the patch saliency map, one token (B, 1, N)     saliency (B, N)     —
text       every class name's embedding, shared (C, E)     —                   own class's
mask       each class's footprint over patches (B, C, N)   non-background      —
learned    M learned tokens (model option guidance_tokens)  —                  —
=========  ==============================================  ==================  ===============

Several sources at once: tokens are concatenated, weights multiplied. ``mode`` evaluates
robustness: ``missing`` drops every external source (learned tokens remain; DTC falls back to
uniform weights), ``shuffled`` gives each image another image's per-image guidance (and
permutes the class-name rows, which CMTF's attention cannot tell apart: a no-op for text),
``random`` replaces every source with Gaussian noise of the same mean and std.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .masks import foreground_masks, patch_label_fractions
from .saliency import patch_saliency

SOURCES = ("saliency", "text", "mask", "learned")
MODES = ("normal", "missing", "shuffled", "random")


def parse_sources(spec) -> list:
    """``'text,saliency'`` / ``['text', 'saliency']`` / ``'none'`` -> a list of known source names."""
    if spec is None:
        return []
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    names = [n for n in names if n != "none"]
    for n in names:
        if n not in SOURCES:
            raise ValueError(f"Invalid value for 'guidance': {n!r} is not a source; allowed: none or any of "
                             f"{', '.join(SOURCES)} (comma-separated)")
    if len(set(names)) != len(names):
        raise ValueError(f"Invalid value for 'guidance': a source is listed twice in {spec!r}")
    return names


@dataclass
class GuidanceInputs:
    tokens: dict = field(default_factory=dict)       # source -> (M, Dg) or (B, M, Dg)
    patch_weights: Optional[torch.Tensor] = None     # (B, N)
    align_targets: Optional[torch.Tensor] = None     # (B, E): class-name embedding of each image

    def model_kwargs(self) -> dict:
        """Keyword arguments for ``model(x, ...)`` / ``forward_features``."""
        return dict(guidance=self.tokens or None, patch_weights=self.patch_weights)


class Guidance:
    """The configured guidance sources of one model and data set.

    patch_size: the model's patch size (saliency and masks are pooled per patch);
    num_patches: N of the model's input; class_embeddings: (C, E) for ``text`` (see
    :func:`adaptivision.guidance.class_embeddings`); mask_classes: C of the label maps (2 for
    :func:`foreground_masks`); learned_tokens: M for ``learned``.
    """

    def __init__(self, sources: Sequence[str], patch_size: int, num_patches: int,
                 class_embeddings: Optional[torch.Tensor] = None, mask_classes: int = 2,
                 learned_tokens: int = 8, dropout: float = 0.0):
        self.sources = parse_sources(sources)
        if not self.sources:
            raise ValueError("Guidance needs at least one source (guidance=none means no Guidance object)")
        if "text" in self.sources and class_embeddings is None:
            raise ValueError("guidance source 'text' needs the class-name embeddings (class_embeddings=...)")
        if not 0 <= dropout < 1:
            raise ValueError(f"Invalid value for 'guidance_dropout': {dropout!r}; allowed: [0, 1).")
        if "learned" in self.sources and learned_tokens < 1:
            raise ValueError(f"guidance source 'learned' needs guidance_tokens >= 1, got {learned_tokens}")
        self.patch_size, self.num_patches = patch_size, num_patches
        self.class_embeddings = class_embeddings.float() if class_embeddings is not None else None
        self.mask_classes, self.learned_tokens, self.dropout = mask_classes, learned_tokens, dropout

    @property
    def widths(self) -> dict:
        """Width of each external source's raw tokens (the model's ``guidance_dim``)."""
        w = {}
        if "saliency" in self.sources:
            w["saliency"] = self.num_patches
        if "text" in self.sources:
            w["text"] = int(self.class_embeddings.shape[1])
        if "mask" in self.sources:
            w["mask"] = self.num_patches
        return w

    def model_options(self, align: bool = False) -> dict:
        """The model options these sources need (CMTF on, one projection per source, ...)."""
        opts = dict(cmtf=True, guidance_dim=self.widths or None,
                    guidance_tokens=self.learned_tokens if "learned" in self.sources else 0)
        if "saliency" in self.sources:
            opts["complexity"] = "saliency"
        if align:
            if "text" not in self.sources:
                raise ValueError("lambda_align > 0 needs guidance source 'text' (its class-name embeddings "
                                 "are the alignment targets)")
            opts["align_dim"] = self.widths["text"]
        return opts

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, mode: str = "normal",
                 masks: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 train: bool = False) -> GuidanceInputs:
        """images (B, C, H, W); labels (B,) for the L_align targets; masks (B, H, W) label maps
        (default: :func:`foreground_masks` of the images); ``train``: apply source dropout
        (training batches only; evaluation always gets every source)."""
        if mode not in MODES:
            raise ValueError(f"Invalid guidance mode {mode!r}; allowed: {', '.join(MODES)}")
        B = images.shape[0]
        out = GuidanceInputs()
        if labels is not None and self.class_embeddings is not None:
            out.align_targets = self.class_embeddings.to(images.device)[labels]      # (B, E)
        if mode == "missing":
            return out
        weights = []
        drop = self._dropped(generator) if (train and self.dropout) else set()
        if "saliency" in self.sources and "saliency" not in drop:
            sal = patch_saliency(images, self.patch_size)                           # (B, N)
            out.tokens["saliency"] = sal.unsqueeze(1)                               # (B, 1, N)
            weights.append(sal)
        if "text" in self.sources and "text" not in drop:
            out.tokens["text"] = self.class_embeddings.to(images.device)             # (C, E) shared
        if "mask" in self.sources and "mask" not in drop:
            labels_map = masks if masks is not None else foreground_masks(images)
            frac = patch_label_fractions(labels_map, self.mask_classes, self.patch_size)  # (B, N, C)
            out.tokens["mask"] = frac.transpose(1, 2)                                # (B, C, N)
            weights.append(1 - frac[..., 0])
        if weights:
            out.patch_weights = torch.stack(weights).prod(0)                         # (B, N)
        if mode == "shuffled":
            out = self._shuffled(out, B, generator)
        elif mode == "random":
            out = self._random(out, generator)
        return out

    def _dropped(self, generator: Optional[torch.Generator]) -> set:
        """Training-time source dropout: each external source is left out of a batch with
        probability ``dropout``, so the model learns to work when guidance is missing."""
        external = [s for s in self.sources if s != "learned"]
        r = torch.rand(len(external), generator=generator)
        return {s for s, v in zip(external, r.tolist(), strict=True) if v < self.dropout}

    @staticmethod
    def _shuffled(out: GuidanceInputs, batch: int, generator) -> GuidanceInputs:
        perm = torch.roll(torch.arange(batch), 1) if batch > 1 else torch.arange(batch)  # no image keeps its own
        tokens = {}
        for name, t in out.tokens.items():
            if t.dim() == 3:
                tokens[name] = t[perm.to(t.device)]
            else:  # shared rows (class names): permute them; attention over a set does not notice
                tokens[name] = t[torch.randperm(t.shape[0], generator=generator).to(t.device)]
        w = out.patch_weights[perm.to(out.patch_weights.device)] if out.patch_weights is not None else None
        return GuidanceInputs(tokens, w, out.align_targets)

    @staticmethod
    def _random(out: GuidanceInputs, generator) -> GuidanceInputs:
        def noise(t):
            n = torch.randn(t.shape, generator=generator).to(t.device, t.dtype)
            return n * t.std() + t.mean()
        tokens = {name: noise(t) for name, t in out.tokens.items()}
        w = torch.rand(out.patch_weights.shape, generator=generator).to(out.patch_weights.device) \
            if out.patch_weights is not None else None
        return GuidanceInputs(tokens, w, out.align_targets)
