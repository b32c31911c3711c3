"""ADE20K and Cityscapes in their standard folder layouts, as (image, mask) pairs.

- ADE20K (SceneParsing, ``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``; label 0 ("other") becomes ``ignore_index`` and
  classes 1..150 become 0..149 (the standard 150-class protocol).
- Cityscapes: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
  ``gtFine/{train,val}/<city>/*_gtFine_labelIds.png``; label ids map to the 19 train ids, all
  other ids to ``ignore_index``.

Both resize the shorter side to ``size`` and centre-crop (evaluation) or random-crop and flip
(training), the mask with nearest-neighbour sampling, then normalise the image.
"""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .datasets import DatasetNotFound

IGNORE = 255
# Cityscapes labelId -> trainId (the official 19 classes); everything else is ignored
CITYSCAPES_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                  26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")


class SegmentationFolder(Dataset):
    def __init__(self, pairs: list, lut: np.ndarray, classes: tuple, size: int, train: bool,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        self.pairs, self.lut, self.classes, self.size, self.train = pairs, lut, classes, size, train
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        img_path, mask_path = self.pairs[i]
        try:
            img, mask = Image.open(img_path).convert("RGB"), Image.open(mask_path)
            mask.load()
        except OSError as e:
            raise ValueError(f"cannot read {img_path} / {mask_path}: {e}") from e
        if img.size != mask.size:
            raise ValueError(f"{img_path} is {img.size} but its mask {mask_path} is {mask.size}")
        s = self.size / min(img.size)
        w, h = max(self.size, round(img.size[0] * s)), max(self.size, round(img.size[1] * s))
        img, mask = img.resize((w, h), Image.BILINEAR), mask.resize((w, h), Image.NEAREST)
        if self.train:
            x0, y0 = random.randint(0, w - self.size), random.randint(0, h - self.size)
        else:
            x0, y0 = (w - self.size) // 2, (h - self.size) // 2
        box = (x0, y0, x0 + self.size, y0 + self.size)
        img, mask = img.crop(box), mask.crop(box)
        if self.train and random.random() < 0.5:
            img, mask = img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        y = torch.from_numpy(self.lut[np.asarray(mask, dtype=np.int64)])
        return (x - self.mean) / self.std, y


def _need(path: str, name: str, how: str) -> None:
    if not os.path.isdir(path):
        raise DatasetNotFound(f"{name} not found: {path} is not a directory. Expected layout: {how}")


def ade20k(root: str, train: bool, size: int = 512) -> SegmentationFolder:
    split = "training" if train else "validation"
    base = root if os.path.isdir(os.path.join(root, "images")) else os.path.join(root, "ADEChallengeData2016")
    img_dir, ann_dir = os.path.join(base, "images", split), os.path.join(base, "annotations", split)
    for d in (img_dir, ann_dir):
        _need(d, "ADE20K", "ADEChallengeData2016/{images,annotations}/{training,validation}/")
    pairs = []
    for f in sorted(os.listdir(img_dir)):
        stem, ext = os.path.splitext(f)
        if ext.lower() in (".jpg", ".jpeg", ".png"):
            ann = os.path.join(ann_dir, stem + ".png")
            if not os.path.isfile(ann):
                raise DatasetNotFound(f"ADE20K: {f} has no annotation {ann}")
            pairs.append((os.path.join(img_dir, f), ann))
    lut = np.full(256, IGNORE, dtype=np.int64)
    lut[1:151] = np.arange(150)
    return SegmentationFolder(pairs, lut, tuple(f"class {i}" for i in range(150)), size, train)


def cityscapes(root: str, train: bool, size: int = 512) -> SegmentationFolder:
    split = "train" if train else "val"
    img_dir, gt_dir = os.path.join(root, "leftImg8bit", split), os.path.join(root, "gtFine", split)
    for d in (img_dir, gt_dir):
        _need(d, "Cityscapes", "leftImg8bit/{train,val}/<city>/ and gtFine/{train,val}/<city>/")
    pairs = []
    for city in sorted(os.listdir(img_dir)):
        for f in sorted(os.listdir(os.path.join(img_dir, city))):
            if f.endswith("_leftImg8bit.png"):
                gt = os.path.join(gt_dir, city, f.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
                if not os.path.isfile(gt):
                    raise DatasetNotFound(f"Cityscapes: {f} has no label file {gt}")
                pairs.append((os.path.join(img_dir, city, f), gt))
    lut = np.full(256, IGNORE, dtype=np.int64)
    for label_id, train_id in CITYSCAPES_IDS.items():
        lut[label_id] = train_id
    return SegmentationFolder(pairs, lut, CITYSCAPES_CLASSES, size, train)


def build_segmentation(name: str, root: Optional[str], train: bool, size: int):
    if not root:
        raise ValueError(f"{name} needs --data-dir (its root folder)")
    loaders = {"ade20k": ade20k, "cityscapes": cityscapes}
    if name not in loaders:
        raise ValueError(f"Invalid segmentation data set {name!r}; allowed: {', '.join(loaders)}")
    return loaders[name](root, train, size)
