"""Data sets by name (DESIGN.md §5), each read from its standard on-disk layout.

| name | layout under ``root`` |
|---|---|
| ``fashion-mnist`` | ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (Debian's ``dataset-fashion-mnist``, or torchvision's ``FashionMNIST/raw``) |
| ``cifar10``, ``cifar100`` | torchvision: ``cifar-10-batches-py`` / ``cifar-100-python`` |
| ``tinyimagenet`` | ``tiny-imagenet-200/{train/<wnid>/images, val/images + val_annotations.txt}`` (or that folder itself) |
| ``imagenet``, ``chestxray``, ``folder`` | ``{train,val|test}/<class>/<image>`` (ImageFolder) |
| ``imagenet-a``, ``imagenet-r`` | ``<wnid>/<image>`` for the 200-class subsets, scored through the 1000-way head |

Every loader returns PIL images converted to ``mode`` ('RGB' or 'L'), so grayscale data works
with RGB models and the reverse. An unreadable image in a folder data set is skipped and counted
(``strict=True`` raises instead, naming the file).
"""
from __future__ import annotations

import gzip
import os
import struct
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..config import unknown_key_error

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "tinyimagenet", "imagenet", "chestxray",
            "imagenet-a", "imagenet-r", "folder")
FMNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                  "Bag", "Ankle boot"]
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UnreadableImage(ValueError):
    """An image that cannot be decoded, with ``strict_images`` on."""


class DatasetNotFound(FileNotFoundError):
    """Raised with where we looked and how to get the data."""


def _missing(name: str, looked: List[str], how: str) -> DatasetNotFound:
    where = "\n  ".join(looked)
    return DatasetNotFound(f"{name} not found. Looked in:\n  {where}\nTo get it: {how}")


# --- Fashion-MNIST (IDX files) --------------------------------------------------------------------
def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        magic = struct.unpack(">I", f.read(4))[0]
        ndim = magic & 0xFF
        if magic >> 8 != 0x08:  # unsigned byte data
            raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x})")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {data.size} bytes for shape {shape}")
    return data.reshape(shape)


class IDXDataset(Dataset):
    """MNIST-format images and labels (Fashion-MNIST)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None, mode: str = "L"):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.targets = images, labels.astype(np.int64)
        self.transform, self.mode = transform, mode
        self.classes = FMNIST_CLASSES

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i], mode="L")
        if self.mode != "L":
            img = img.convert(self.mode)
        return (self.transform(img) if self.transform else img), int(self.targets[i])


def fashion_mnist(root: Optional[str], train: bool, transform=None, mode: str = "L") -> IDXDataset:
    split = "train" if train else "t10k"
    # a folder the user named must hold the data: falling back to the system copy would train on
    # other data than config.yaml records
    candidates = [root, os.path.join(root, "FashionMNIST", "raw")] if root else [FMNIST_DEBIAN]
    for d in candidates:
        found = {}
        for kind in ("images-idx3", "labels-idx1"):
            for ext in (".gz", ""):
                p = os.path.join(d, f"{split}-{kind}-ubyte{ext}")
                if os.path.isfile(p):
                    found[kind] = p
                    break
        if len(found) == 2:
            return IDXDataset(_read_idx(found["images-idx3"]), _read_idx(found["labels-idx1"]), transform, mode)
    raise _missing("Fashion-MNIST", candidates,
                   "`apt-get install dataset-fashion-mnist` (Debian), or `--download` with --data-dir DIR "
                   "where the network allows (torchvision's FashionMNIST layout).")


# --- image folders with corrupt-file handling ------------------------------------------------------
class ImageList(Dataset):
    """(path, label) samples. Unreadable images give ``None`` (dropped and counted by
    :func:`collate_skip`) unless ``strict``, which raises naming the file."""

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str], transform=None,
                 mode: str = "RGB", strict: bool = False):
        self.samples, self.classes = samples, classes
        self.targets = [t for _, t in samples]
        self.transform, self.mode, self.strict = transform, mode, strict

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert(self.mode)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if self.strict:
                raise UnreadableImage(f"unreadable image {path}: {e} (strict_images=true stops the run; "
                                      "false skips and counts such images)") from e
            return None
        return (self.transform(img) if self.transform else img), target


def _scan_folder(root: str, classes: Optional[List[str]] = None) -> Tuple[List[Tuple[str, int]], List[str]]:
    """Samples of ``root/<class>/...``, labelled by their index in ``classes`` (default: the
    sorted sub-folders of ``root``; pass the training split's list for every other split)."""
    found = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not found:
        raise DatasetNotFound(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root} has class folder(s) {unknown[:5]} that the training split does not have; "
                         f"every split must use the training classes ({len(classes)}: {classes[:5]}...)")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in found:
        idx = index[c]
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
            samples += [(os.path.join(dirpath, f), idx) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    return samples, classes


def image_folder(name: str, root: Optional[str], train: bool, transform=None, mode="RGB", strict=False) -> ImageList:
    if not root:
        raise _missing(name, ["(no --data-dir given)"], "pass --data-dir DIR with DIR/train and DIR/val folders")
    names = ["train"] if train else ["val", "test", "validation"]
    looked = [os.path.join(root, n) for n in names]
    train_dir = os.path.join(root, "train")
    # labels are indices into the training classes, whichever split is read: a validation split
    # missing a class must not shift the labels of the classes after it
    classes = None if train or not os.path.isdir(train_dir) else _scan_folder(train_dir)[1]
    for d in looked:
        if os.path.isdir(d):
            samples, classes = _scan_folder(d, classes)
            return ImageList(samples, classes, transform, mode, strict)
    raise _missing(name, looked, f"arrange the images as {root}/{names[0]}/<class>/<image>")


def tiny_imagenet(root: Optional[str], train: bool, transform=None, mode="RGB", strict=False) -> ImageList:
    if not root:
        raise _missing("TinyImageNet", ["(no --data-dir given)"], "download tiny-imagenet-200 and pass --data-dir")
    base = os.path.join(root, "tiny-imagenet-200")
    base = base if os.path.isdir(base) else root
    train_dir = os.path.join(base, "train")
    if not os.path.isdir(train_dir):
        raise _missing("TinyImageNet", [train_dir], "unpack tiny-imagenet-200.zip under --data-dir")
    classes = sorted(d.name for d in os.scandir(train_dir) if d.is_dir())
    if train:
        samples, _ = _scan_folder(train_dir)
        return ImageList(samples, classes, transform, mode, strict)
    ann = os.path.join(base, "val", "val_annotations.txt")
    if not os.path.isfile(ann):
        raise _missing("TinyImageNet validation labels", [ann], "the val/ folder of tiny-imagenet-200")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    with open(ann) as f:  # regroup val: "<file>\t<wnid>\t<box>" per line
        for line in f:
            parts = line.strip().split("\t")
            if len(parts) >= 2 and parts[1] in index:
                samples.append((os.path.join(base, "val", "images", parts[0]), index[parts[1]]))
    return ImageList(samples, classes, transform, mode, strict)


def _timm_info(fname: str) -> List[str]:
    import timm.data
    path = os.path.join(os.path.dirname(timm.data.__file__), "_info", fname)
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def imagenet_subset(name: str, root: Optional[str], transform=None, mode="RGB", strict=False) -> ImageList:
    """ImageNet-A / -R: 200 wnid folders. ``class_indices`` maps each of the 200 classes to its
    index in the 1000-way head (timm's index lists); evaluate on ``logits[:, class_indices]``."""
    if not root or not os.path.isdir(root):
        raise _missing(name, [str(root)], f"download {name} and pass --data-dir to its folder of wnid folders")
    short = "a" if name == "imagenet-a" else "r"
    synsets = _timm_info(f"imagenet_{short}_synsets.txt")
    indices = [int(i) for i in _timm_info(f"imagenet_{short}_indices.txt")]
    pos = {s: i for i, s in enumerate(synsets)}
    samples = []
    for wnid in sorted(os.listdir(root)):
        if wnid not in pos:
            continue
        for dirpath, _, files in sorted(os.walk(os.path.join(root, wnid))):
            samples += [(os.path.join(dirpath, f), pos[wnid]) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    if not samples:
        raise _missing(name, [root], f"expected {root}/<wnid>/<image> with the {len(synsets)} {name} wnids")
    ds = ImageList(samples, synsets, transform, mode, strict)
    ds.class_indices = indices
    return ds


def build_dataset(name: str, root: Optional[str], train: bool, transform: Optional[Callable] = None,
                  mode: str = "RGB", strict: bool = False, download: bool = False) -> Dataset:
    """The named data set's train or evaluation split."""
    if name == "fashion-mnist":
        if download and root:
            from torchvision.datasets import FashionMNIST
            FashionMNIST(root, train=train, download=True)
        return fashion_mnist(root, train, transform, mode)
    if name in ("cifar10", "cifar100"):
        if download:
            from torchvision.datasets import CIFAR10, CIFAR100
            (CIFAR10 if name == "cifar10" else CIFAR100)(root or ".", train=train, download=True)
        return cifar(name, root, train, transform, mode)
    if name == "tinyimagenet":
        return tiny_imagenet(root, train, transform, mode, strict)
    if name in ("imagenet", "chestxray", "folder"):
        return image_folder(name, root, train, transform, mode, strict)
    if name in ("imagenet-a", "imagenet-r"):
        if train:
            raise ValueError(f"{name} is an evaluation-only data set")
        return imagenet_subset(name, root, transform, mode, strict)
    raise unknown_key_error(name, DATASETS, "dataset")


class ArrayImages(Dataset):
    """Images held in memory as a uint8 array (N, H, W[, C])."""

    def __init__(self, images: np.ndarray, targets, classes, transform=None, mode: str = "RGB"):
        self.images, self.targets, self.classes = images, [int(t) for t in targets], classes
        self.transform, self.mode = transform, mode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i]).convert(self.mode)
        return (self.transform(img) if self.transform else img), self.targets[i]


def cifar(name: str, root: Optional[str], train: bool, transform=None, mode="RGB") -> ArrayImages:
    """CIFAR-10/100 from the python batches (torchvision's layout), read as torchvision does
    but without its checksum of the official archive, so locally built copies load too."""
    import pickle
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    base = os.path.join(root or ".", sub)
    files = ([f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]) if name == "cifar10" \
        else (["train"] if train else ["test"])
    paths = [os.path.join(base, f) for f in files]
    if not all(os.path.isfile(p) for p in paths):
        raise _missing(name, [base], "`--download` where the network allows, or unpack the python version "
                       "of the archive under --data-dir")
    images, targets = [], []
    for p in paths:
        with open(p, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        targets += entry["labels" if "labels" in entry else "fine_labels"]
    meta = os.path.join(base, "batches.meta" if name == "cifar10" else "meta")
    with open(meta, "rb") as f:
        m = pickle.load(f, encoding="latin1")
    classes = m["label_names" if name == "cifar10" else "fine_label_names"]
    return ArrayImages(np.concatenate(images), targets, classes, transform, mode)


def collate_skip(batch):
    """Default collation without the ``None`` samples of unreadable images; returns
    ``(images, targets, skipped)``."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    x = torch.stack([b[0] for b in kept])
    y = torch.tensor([b[1] for b in kept], dtype=torch.long)
    return x, y, skipped
