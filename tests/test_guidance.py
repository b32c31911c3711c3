"""Guidance providers (issue 6, first part): spectral-residual saliency."""
import torch

from adaptivision.guidance import patch_saliency, spectral_residual
from conftest import tiny_model


def _texture_with_odd_patch(rows_cols, size=32, patch=4):
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    img = torch.sin(xx * torch.pi / 2).expand(len(rows_cols), 3, size, size).clone()
    g = torch.Generator().manual_seed(0)
    for b, (r, c) in enumerate(rows_cols):
        img[b, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = torch.randn(patch, patch, generator=g) * 2
    return img


def test_saliency_of_a_synthetic_image_peaks_at_the_odd_patch():
    odd = [(1, 2), (5, 6), (3, 0), (7, 7)]
    w = patch_saliency(_texture_with_odd_patch(odd), patch_size=4)                 # (4, 64)
    assert w.shape == (4, 64)
    assert w.argmax(1).tolist() == [r * 8 + c for r, c in odd]
    s = spectral_residual(_texture_with_odd_patch(odd))
    assert s.shape == (4, 32, 32) and s.min() >= 0 and torch.allclose(s.amax((1, 2)), torch.ones(4))


def test_saliency_steers_dtc():
    x = _texture_with_odd_patch([(1, 2), (2, 2), (0, 0)], size=16)
    w = patch_saliency(x, patch_size=4)                                            # (3, 16)
    model = tiny_model(complexity="saliency", budget_jitter=0.0)
    with torch.no_grad():
        model.train()(x, patch_weights=w)  # statistics of the saliency-weighted complexity
        model.eval()
        weighted = model.forward_features(x, patch_weights=w)
        k_salient = model.last_num_clusters[:, 0].clone()
        flat = model.forward_features(x, patch_weights=torch.ones_like(w))
        k_flat = model.last_num_clusters[:, 0]
    assert torch.isfinite(weighted).all()
    # saliency changes both how many super-tokens each image gets and what they hold
    assert not torch.equal(k_salient, k_flat) or not torch.allclose(weighted, flat)
