"""Tiny on-disk data sets in each supported layout (no network, a few KB each)."""
import gzip
import os
import pickle
import struct

import numpy as np
from PIL import Image


def _pattern(label: int, i: int, size: int, chans: int = 1) -> np.ndarray:
    """A class-dependent image (stripes whose period is the label) with a little noise."""
    rng = np.random.default_rng(1000 * label + i)
    yy, xx = np.mgrid[0:size, 0:size]
    img = 127 + 100 * np.sin((xx + yy * (label % 3)) * (label + 1) * np.pi / size)
    img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    return img if chans == 1 else np.stack([img, np.roll(img, label, 0), img[::-1]], -1)


def _write_idx(path, arr):
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def make_fmnist(root, n_train=64, n_test=32):
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.stack([_pattern(int(lab), i, 28) for i, lab in enumerate(labels)])
        _write_idx(os.path.join(root, f"{split}-images-idx3-ubyte.gz"), images)
        _write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte.gz"), labels)
    return root


def make_cifar10(root, per_batch=4):
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [(i + len(name)) % 10 for i in range(per_batch)]
        data = np.stack([_pattern(lab, i, 32, 3).transpose(2, 0, 1).reshape(-1) for i, lab in enumerate(labels)])
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(os.path.join(base, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return root


def _save(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def make_folder(root, classes=("normal", "pneumonia"), per_class=4, size=32, corrupt=1):
    """root/{train,val}/<class>/*.png, plus ``corrupt`` unreadable files in train."""
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            for i in range(per_class):
                _save(os.path.join(root, split, name, f"{i}.png"), _pattern(c, i, size, 3))
    for i in range(corrupt):
        with open(os.path.join(root, "train", classes[0], f"broken{i}.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def make_tinyimagenet(root, wnids=("n01443537", "n01629819", "n01641577"), per_class=3):
    base = os.path.join(root, "tiny-imagenet-200")
    lines = []
    for c, w in enumerate(wnids):
        for i in range(per_class):
            _save(os.path.join(base, "train", w, "images", f"{w}_{i}.JPEG"), _pattern(c, i, 64, 3))
            fname = f"val_{c * per_class + i}.JPEG"
            _save(os.path.join(base, "val", "images", fname), _pattern(c, 100 + i, 64, 3))
            lines.append(f"{fname}\t{w}\t0\t0\t63\t63")
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.write("\n".join(lines[::-1]) + "\n")  # not grouped by class, as in the real file
    return root


def make_imagenet_subset(root, wnids, per_class=2):
    for c, w in enumerate(wnids):
        for i in range(per_class):
            _save(os.path.join(root, w, f"{i}.jpg"), _pattern(c, i, 32, 3))
    return root


class FakeTextEncoder:
    """Stands in for a sentence-transformers model: a fixed pseudo-random unit vector per text
    (from its hash), so tests need neither the text model nor its load time. Counts its calls."""

    def __init__(self, dim: int = 16):
        self.dim, self.calls = dim, 0

    def encode(self, texts, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False):
        import hashlib

        import torch
        self.calls += 1
        rows = []
        for t in texts:
            seed = int(hashlib.sha1(t.encode()).hexdigest()[:8], 16)
            rows.append(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
