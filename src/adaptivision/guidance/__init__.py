"""Guidance providers (DESIGN.md §1): what steers condensation and what CMTF fuses.

- ``saliency.py``: spectral-residual saliency from the image (no training, no download);
- ``text.py``: class-name embeddings from a sentence-transformers model, cached per data set;
- ``masks.py``: per-pixel label maps pooled to patches (Otsu foreground when there are none);
- learned tokens live in the model (``guidance_tokens=M``);
- ``provider.py``: :class:`Guidance`, which turns a batch into the model's inputs for any mix
  of sources, and the missing/shuffled/random modes of the robustness evaluation.
"""
from .masks import foreground_masks, patch_label_fractions
from .provider import MODES, SOURCES, Guidance, GuidanceInputs, parse_sources
from .saliency import patch_saliency, spectral_residual
from .text import DEFAULT_TEMPLATE, DEFAULT_TEXT_MODEL, class_embeddings, load_text_encoder

__all__ = ["DEFAULT_TEMPLATE", "DEFAULT_TEXT_MODEL", "MODES", "SOURCES", "Guidance", "GuidanceInputs",
           "class_embeddings", "foreground_masks", "load_text_encoder", "parse_sources", "patch_label_fractions",
           "patch_saliency", "spectral_residual"]
