"""Fashion-MNIST mosaics: a dense-prediction benchmark from real images that runs on a CPU.

Each canvas holds a few real Fashion-MNIST items at random places; every pixel is labelled with
the class of the item drawn on it (``class + 1``) or ``0`` for background. Canvas ``i`` of a
split is a pure function of ``(seed, i)``: the same mosaics on every machine and every run.
:class:`FashionMosaicBoxes` gives the same canvases with each item's tight box and class
(detection, Table 3).
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
        img, mask, _, _ = self.render_items(i)
        return img, mask

    def render_items(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """The canvas, its label map, its instance map (S, S; item number or -1) and each item's
        ``(class, foreground pixels drawn)``; later items are drawn over earlier ones."""
        rng = np.random.default_rng([self.seed, i])
        S = self.canvas
        img = np.zeros((S, S), dtype=np.uint8)
        mask = np.zeros((S, S), dtype=np.int64)
        inst = np.full((S, S), -1, dtype=np.int64)
        items = []
        for t in range(rng.integers(self.items[0], self.items[1] + 1)):
            j = int(rng.integers(len(self.images)))
            y, x = rng.integers(0, S - 28 + 1, size=2)
            item = self.images[j]
            fg = item > FOREGROUND
            img[y:y + 28, x:x + 28][fg] = item[fg]
            mask[y:y + 28, x:x + 28][fg] = int(self.labels[j]) + 1
            inst[y:y + 28, x:x + 28][fg] = t
            items.append((int(self.labels[j]), int(fg.sum())))
        return img, mask, inst, items

    def __getitem__(self, i: int):
        img, mask = self.render(i)
        x = (torch.from_numpy(img).float().div(255) - self.mean) / self.std
        return x.unsqueeze(0), torch.from_numpy(mask)


class FashionMosaicBoxes(FashionMosaics):
    """The same canvases as :class:`FashionMosaics` (same ``seed``, same images) with detection
    targets: ``(image (1, S, S), {"boxes": (n, 4) float xyxy in pixels, "labels": (n,) long})``.

    An item's box is the tight box of its pixels still visible after later items were drawn over
    it; an item with less than ``min_visible`` of its foreground left is not a target (it would ask
    the detector to find a sliver), and ``hidden`` counts those. Labels are Fashion-MNIST classes
    0-9 (no background class: torchvision's FCOS does not use one).
    """

    def __init__(self, *args, min_visible: float = 0.3, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 <= min_visible <= 1:
            raise ValueError(f"Invalid value for 'min_visible': {min_visible}; allowed: a fraction in [0, 1]")
        self.min_visible = min_visible
        self.classes = tuple(FMNIST_CLASSES)

    def targets(self, i: int) -> tuple[np.ndarray, dict, int]:
        """uint8 canvas, its targets (numpy), and how many items were too hidden to be targets."""
        img, _, inst, items = self.render_items(i)
        boxes, labels, hidden = [], [], 0
        for t, (label, drawn) in enumerate(items):
            ys, xs = np.nonzero(inst == t)
            if len(ys) == 0 or len(ys) < self.min_visible * drawn:
                hidden += 1
                continue
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])           # xyxy, pixel edges
            labels.append(label)
        return img, dict(boxes=np.asarray(boxes, np.float32).reshape(-1, 4), labels=np.asarray(labels, np.int64)), hidden

    def __getitem__(self, i: int):
        img, tgt, _ = self.targets(i)
        x = (torch.from_numpy(img).float().div(255) - self.mean) / self.std
        return x.unsqueeze(0), {k: torch.from_numpy(v) for k, v in tgt.items()}
