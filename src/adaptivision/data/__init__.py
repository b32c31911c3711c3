"""Data sets by name in their standard on-disk layouts (see datasets.py)."""
from .datasets import DATASETS, DatasetNotFound, build_dataset, collate_skip

__all__ = ["DATASETS", "DatasetNotFound", "build_dataset", "collate_skip"]
