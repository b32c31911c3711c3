"""Every data set layout, read from tiny fixtures on disk."""
import os

import numpy as np
import pytest
import torch

from adaptivision.data import DatasetNotFound, build_dataset, collate_skip
from adaptivision.data.datasets import _timm_info
from adaptivision.train import TrainConfig
from adaptivision.train.engine import Dist, eval_loader, evaluate
from fixtures import make_cifar10, make_fmnist, make_folder, make_imagenet_subset, make_tinyimagenet


def test_fashion_mnist_idx_files(tmp_path):
    root = make_fmnist(str(tmp_path / "fm"), n_train=20, n_test=10)
    ds = build_dataset("fashion-mnist", root, train=True, mode="L")
    assert len(ds) == 20 and ds[3][1] == 3 and ds[3][0].size == (28, 28) and ds[3][0].mode == "L"
    rgb = build_dataset("fashion-mnist", root, train=False, mode="RGB")   # grayscale data, RGB model
    assert len(rgb) == 10 and rgb[0][0].mode == "RGB"
    assert len(ds.classes) == 10


def test_cifar10_python_batches(tmp_path):
    root = make_cifar10(str(tmp_path))
    tr = build_dataset("cifar10", root, train=True)
    te = build_dataset("cifar10", root, train=False, mode="L")          # RGB data, 1-channel model
    assert len(tr) == 20 and len(te) == 4 and tr[0][0].size == (32, 32) and te[0][0].mode == "L"
    assert tr.classes[0] == "c0"


def test_tinyimagenet_val_is_regrouped_from_annotations(tmp_path):
    root = make_tinyimagenet(str(tmp_path))
    tr = build_dataset("tinyimagenet", root, train=True)
    va = build_dataset("tinyimagenet", root, train=False)
    assert len(tr) == 9 and len(va) == 9 and tr.classes == va.classes
    for path, label in va.samples:  # val_2.JPEG etc. were written for class index // 3
        idx = int(path.rsplit("_", 1)[1].split(".")[0])
        assert label == idx // 3


@pytest.mark.parametrize("name", ["imagenet", "chestxray", "folder"])
def test_image_folders_skip_and_count_unreadable_images(tmp_path, name):
    from torchvision.transforms.functional import to_tensor
    root = make_folder(str(tmp_path / name))
    ds = build_dataset(name, root, train=True, transform=to_tensor)
    assert ds.classes == ["normal", "pneumonia"] and len(ds) == 9
    x, y, skipped = collate_skip([ds[i] for i in range(len(ds))])
    assert skipped == 1 and x.shape == (8, 3, 32, 32) and y.tolist() == [0] * 4 + [1] * 4
    strict = build_dataset(name, root, train=True, strict=True)
    with pytest.raises(ValueError, match="broken0.png"):  # UnreadableImage: the CLI reports it
        [strict[i] for i in range(len(strict))]
    assert len(build_dataset(name, root, train=False)) == 8


def test_imagenet_a_is_scored_through_the_1000_way_head(tmp_path):
    synsets = _timm_info("imagenet_a_synsets.txt")
    indices = [int(i) for i in _timm_info("imagenet_a_indices.txt")]
    root = make_imagenet_subset(str(tmp_path / "ina"), synsets[:3])
    ds = build_dataset("imagenet-a", root, train=False,
                       transform=lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1))
    assert ds.class_indices == indices and len(ds) == 6

    class Oracle(torch.nn.Module):
        """1000-way logits that peak at the ImageNet index of the true class, given as the pixel sum id."""
        def __init__(self):
            super().__init__()
            self.lookup = {}

        def forward(self, x):
            out = torch.zeros(x.shape[0], 1000)
            for i, img in enumerate(x):
                out[i, self.lookup[round(img.sum().item())]] = 1.0
            return out

    model = Oracle()
    for img, label in (ds[i] for i in range(len(ds))):
        model.lookup[round(img.sum().item())] = indices[label]
    cfg = TrainConfig(workers=0, batch_size=4)
    res = evaluate(model, eval_loader(ds, cfg, Dist()), Dist(), class_indices=ds.class_indices)
    assert res["top1"] == 100.0 and res["images"] == 6
    with pytest.raises(ValueError, match="evaluation-only"):
        build_dataset("imagenet-a", root, train=True)


def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFound, match=r"(?s)Looked in:.*nowhere.*To get it"):
        build_dataset("cifar10", str(tmp_path / "nowhere"), train=True)
    with pytest.raises(DatasetNotFound, match="tiny-imagenet"):
        build_dataset("tinyimagenet", str(tmp_path), train=True)
    with pytest.raises(DatasetNotFound, match="train"):
        build_dataset("imagenet", str(tmp_path), train=True)


def test_folder_validation_uses_the_training_class_indices(tmp_path):
    """train {a, b, c}, val {a, c}: val's c keeps label 2 (not 1); a class only in val is an error."""
    import shutil
    root = make_folder(str(tmp_path / "f"), classes=("a", "b", "c"), per_class=2, corrupt=0)
    shutil.rmtree(tmp_path / "f" / "val" / "b")
    val = build_dataset("folder", root, train=False)
    assert val.classes == ["a", "b", "c"] and sorted(set(val.targets)) == [0, 2]
    assert all(t == 2 for p, t in val.samples if "/c/" in p)
    os.makedirs(tmp_path / "f" / "val" / "zebra")
    with pytest.raises(ValueError, match="zebra.*training"):
        build_dataset("folder", root, train=False)


def test_a_data_dir_without_fashion_mnist_is_an_error(tmp_path):
    """A folder the user named that holds no data must not fall back to the system copy."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFound, match="empty"):
        build_dataset("fashion-mnist", str(tmp_path / "empty"), train=True)


def test_unknown_dataset_name_suggests_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'cifar100'"):
        build_dataset("cifar1000", None, train=True)


def test_truncated_idx_file_is_reported(tmp_path):
    root = make_fmnist(str(tmp_path), n_train=10, n_test=4)
    import gzip
    p = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.open(p).read()
    with gzip.open(p, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        build_dataset("fashion-mnist", root, train=True)
