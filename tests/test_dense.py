"""Dense prediction pieces (issue 7): mosaics, mIoU, Segmenter heads on every backbone kind."""
import json
import math
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from adaptivision.cli import main
from adaptivision.data.datasets import fashion_mnist
from adaptivision.data.mosaic import FOREGROUND, FashionMosaics
from adaptivision.dense import Segmenter, confusion, iou, mean_iou
from fixtures import make_fmnist


def test_miou_against_a_hand_computed_case():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    conf = confusion(pred, target, num_classes=4)
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 -> 1/3; class 1: TP 2, FP 1, FN 1 -> 2/4;
    # class 2: TP 1, FP 1 (a 1 predicted 2), FN 1 -> 1/3; class 3 absent everywhere -> NaN, not counted
    per = iou(conf)
    assert torch.allclose(per[:3], torch.tensor([1 / 3, 0.5, 1 / 3], dtype=torch.float64))
    assert math.isnan(per[3])
    assert mean_iou(conf) == pytest.approx(100 * (1 / 3 + 0.5 + 1 / 3) / 3)
    with pytest.raises(ValueError, match="target labels"):
        confusion(pred, torch.full_like(target, 7), num_classes=4)


def test_mosaics_are_deterministic_and_labelled_by_the_items(tmp_path):
    src = fashion_mnist(make_fmnist(str(tmp_path), n_train=20, n_test=10), train=False)
    ds = FashionMosaics(src, length=5, canvas=56, items=(2, 3), seed=3)
    img, mask = ds.render(4)
    img2, mask2 = FashionMosaics(src, length=5, canvas=56, items=(2, 3), seed=3).render(4)
    assert np.array_equal(img, img2) and np.array_equal(mask, mask2)
    assert not np.array_equal(mask, ds.render(3)[1])                 # canvases differ
    assert set(np.unique(mask)) <= set(range(11)) and (mask == 0).any() and (mask > 0).any()
    assert ((img > FOREGROUND) == (mask > 0)).all()                  # labels where an item is drawn
    x, m = ds[4]
    assert x.shape == (1, 56, 56) and m.dtype == torch.long and torch.equal(m, torch.from_numpy(mask))
    with pytest.raises(ValueError, match="canvas"):
        FashionMosaics(src, length=1, canvas=20)


@pytest.mark.parametrize("decoder", ["linear", "mask"])
@pytest.mark.parametrize("kwargs", [dict(reduction="none"), dict(), dict(reduction="tome", tome_r=4)])
def test_segmenter_restores_the_full_grid_and_trains(decoder, kwargs):
    torch.manual_seed(0)
    backbone = timm.create_model("adaptivision_nano_patch4_28", img_size=56, **kwargs)
    model = Segmenter(backbone, num_classes=11, decoder=decoder, width=32, depth=1, heads=2) if decoder == "mask" \
        else Segmenter(backbone, num_classes=11)
    x = torch.randn(2, 1, 56, 56)
    logits = model(x)
    assert logits.shape == (2, 11, 56, 56) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 11, (2, 56, 56))).backward()
    assert backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_segmenter_on_a_plain_timm_vit():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64)
    assert Segmenter(vit, num_classes=3)(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def _png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def test_ade20k_and_cityscapes_layouts(tmp_path):
    from adaptivision.data.segmentation import IGNORE, ade20k, cityscapes
    rng = np.random.default_rng(0)
    base = tmp_path / "ADEChallengeData2016"
    ann = np.zeros((40, 60), dtype=np.uint8)
    ann[:, 30:] = 5   # class 5 -> index 4; label 0 ('other') -> ignored
    _png(str(base / "images" / "validation" / "ADE_val_1.jpg"), (rng.random((40, 60, 3)) * 255).astype("uint8"))
    _png(str(base / "annotations" / "validation" / "ADE_val_1.png"), ann)
    x, y = ade20k(str(tmp_path), train=False, size=32)[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    assert set(y.unique().tolist()) == {IGNORE, 4}
    city = tmp_path / "cs"
    lab = np.full((20, 40), 7, dtype=np.uint8)   # road (train id 0)
    lab[:, 20:] = 26                             # car (13)
    lab[0, 0] = 1                                # ego vehicle: ignored
    _png(str(city / "leftImg8bit" / "val" / "bonn" / "bonn_0_0_leftImg8bit.png"), (rng.random((20, 40, 3)) * 255).astype("uint8"))
    _png(str(city / "gtFine" / "val" / "bonn" / "bonn_0_0_gtFine_labelIds.png"), lab)
    ds = cityscapes(str(city), train=False, size=20)
    x, y = ds[0]
    assert x.shape == (3, 20, 20) and set(y.unique().tolist()) <= {0, 13, IGNORE} and len(ds.classes) == 19
    with pytest.raises(Exception, match="not a directory"):
        cityscapes(str(tmp_path / "nowhere"), train=True)


def test_mosaic_benchmark_smoke(tmp_path):
    """CI's short version of benchmarks/mosaic_segmentation.py."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "mosaic_segmentation.py"
    spec = importlib.util.spec_from_file_location("mosaic_segmentation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = make_fmnist(str(tmp_path / "fm"), n_train=20, n_test=10)
    names = ["dense", "adaptivision", "adaptivision-image-skip", "tome"]
    assert mod.main(["--smoke", "--data-dir", data, "--out", str(tmp_path / "m"), "--backbones", ",".join(names)]) == 0
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [r["backbone"] for r in rows] == ["dense"] + ["adaptivision"] * 3 + ["adaptivision-image-skip"] * 3 + ["tome"] * 3
    for name in ("adaptivision", "adaptivision-image-skip"):
        av = [r["gmacs"] for r in rows if r["backbone"] == name]
        assert av == sorted(av)
    assert all(0 <= r["miou"] <= 100 for r in rows)


def test_segment_command_trains_evaluates_and_protects_runs(tmp_path, capsys):
    data = make_fmnist(str(tmp_path / "fm"), n_train=20, n_test=10)
    common = ["--data-dir", data, "--output", str(tmp_path), "--steps", "2", "--batch-size", "2",
              "--img-size", "32", "--eval-size", "4"]
    assert main(["segment", *common, "--name", "av"]) == 0
    spec = json.loads((tmp_path / "av" / "segment.json").read_text())
    assert spec["classes"][0] == "background" and 0 <= spec["results"]["miou"] <= 100
    assert main(["segment", *common, "--name", "tome", "--decoder", "mask", "reduction=tome", "tome_r=2"]) == 0
    assert json.loads((tmp_path / "tome" / "segment.json").read_text())["kwargs"] == {"reduction": "tome", "tome_r": 2}
    capsys.readouterr()
    ckpt = str(tmp_path / "av" / "segmenter.safetensors")
    assert main(["segment", "--checkpoint", ckpt, "--data-dir", data, "--eval-size", "4", "--budget", "bias=-3"]) == 0
    low = json.loads(capsys.readouterr().out)
    assert low["gmacs"] < spec["results"]["gmacs"]
    assert main(["segment", *common, "--name", "av"]) == 2          # never overwritten
    assert "already holds" in capsys.readouterr().err
