"""Guidance providers (DESIGN.md §1). So far: spectral-residual saliency (issue 6 adds text,
masks and learned tokens)."""
from .saliency import patch_saliency, spectral_residual

__all__ = ["patch_saliency", "spectral_residual"]
