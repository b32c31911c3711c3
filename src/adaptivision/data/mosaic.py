"""Fashion-MNIST mosaics: a dense-prediction benchmark from real images that runs on a CPU.

Each canvas holds a few real Fashion-MNIST items at random places; every pixel is labelled with
the class of the item drawn on it (``class + 1``) or ``0`` for background. Canvas ``i`` of a
split is a pure function of ``(seed, i)``: the same mosaics on every machine and every run.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import FMNIST_CLASSES

MOSAIC_CLASSES = ("background",) + tuple(FMNIST_CLASSES)
FOREGROUND = 40  # pixel value (0-255) above which a pixel belongs to the item


class FashionMosaics(Dataset):
    """``(image (1, S, S) normalised, mask (S, S) long)`` pairs built from an ``IDXDataset``."""

    def __init__(self, source, length: int, canvas: int = 56, items: tuple = (2, 4), seed: int = 0,
                 mean: float = 0.2860, std: float = 0.3530):
        if canvas < 28:
            raise ValueError(f"Invalid value for 'canvas': {canvas}; allowed: >= 28 (one 28x28 item must fit)")
        if not 1 <= items[0] <= items[1]:
            raise ValueError(f"Invalid value for 'items': {items}; allowed: (min, max) with 1 <= min <= max")
        self.images, self.labels = source.images, source.targets
        self.length, self.canvas, self.items, self.seed = length, canvas, items, seed
        self.mean, self.std = mean, std
        self.classes = MOSAIC_CLASSES

    def __len__(self) -> int:
        return self.length

    def render(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 canvas (S, S) and its label map (S, S); later items are drawn over earlier ones."""
        rng = np.random.default_rng([self.seed, i])
        S = self.canvas
        img = np.zeros((S, S), dtype=np.uint8)
        mask = np.zeros((S, S), dtype=np.int64)
        for _ in range(rng.integers(self.items[0], self.items[1] + 1)):
            j = int(rng.integers(len(self.images)))
            y, x = rng.integers(0, S - 28 + 1, size=2)
            item = self.images[j]
            fg = item > FOREGROUND
            img[y:y + 28, x:x + 28][fg] = item[fg]
            mask[y:y + 28, x:x + 28][fg] = int(self.labels[j]) + 1
        return img, mask

    def __getitem__(self, i: int):
        img, mask = self.render(i)
        x = (torch.from_numpy(img).float().div(255) - self.mean) / self.std
        return x.unsqueeze(0), torch.from_numpy(mask)
