"""Dense prediction pieces (issues 7, 16): mosaics and their boxes, mIoU, Segmenter heads and the FCOS
detector on every backbone kind, COCO mAP, the segment / detect commands."""
import json
import math
import os
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from adaptivision.cli import main
from adaptivision.data.datasets import fashion_mnist
from adaptivision.data.mosaic import FOREGROUND, FashionMosaicBoxes, FashionMosaics
from adaptivision.dense import Segmenter, confusion, iou, mean_iou
from adaptivision.dense.detect import coco_map, sanitize
from adaptivision.dense.detector import build_detector
from conftest import benchmark_script
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
    mod = benchmark_script("mosaic_segmentation")
    data = make_fmnist(str(tmp_path / "fm"), n_train=20, n_test=10)
    names = ["dense", "adaptivision", "adaptivision-image-skip", "adaptivision-image-skip-spatial", "tome"]
    assert mod.main(["--smoke", "--data-dir", data, "--out", str(tmp_path / "m"), "--backbones", ",".join(names)]) == 0
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [r["backbone"] for r in rows] == (["dense"] + ["adaptivision"] * 3 + ["adaptivision-image-skip"] * 4
                                             + ["adaptivision-image-skip-spatial"] * 4 + ["tome"] * 3)
    for name in ("adaptivision", "adaptivision-image-skip", "adaptivision-image-skip-spatial"):
        av = [r["gmacs"] for r in rows if r["backbone"] == name]
        assert av == sorted(av)
    assert all(0 <= r["miou"] <= 100 for r in rows)
    assert json.loads((tmp_path / "m.json").read_text())["provenance"]["commit"]

    # --summarize: one table over the seeds' records, mean ± std per backbone and knob
    assert mod.main(["--smoke", "--data-dir", data, "--out", str(tmp_path / "m1"), "--backbones", "dense",
                     "--seed", "1"]) == 0
    dense = [json.loads((tmp_path / f"{m}.json").read_text())["rows"][0]["miou"] for m in ("m", "m1")]
    assert mod.main(["--summarize", str(tmp_path / "m.json"), str(tmp_path / "m1.json"), "--out", str(tmp_path / "s")]) == 0
    table = (tmp_path / "s.md").read_text()
    mean, std = statistics.mean(dense), statistics.stdev(dense)
    assert f"| dense | — | {rows[0]['gmacs']:.4f} | {mean:.2f} ± {std:.2f} | 0, 1 |" in table
    assert "| tome | 4 |" in table and "± " not in table.split("| tome | 4 |")[1].split("\n")[0]  # one seed: no spread
    part = mod.main(["--summarize", str(tmp_path / "m.json") + ":tome,dense", str(tmp_path / "m1.json"),
                     "--out", str(tmp_path / "p")])
    assert part == 0 and "| adaptivision |" not in (tmp_path / "p.md").read_text()
    assert "| tome | 4 |" in (tmp_path / "p.md").read_text()
    with pytest.raises(ValueError, match="has no rows of \\['hourglass'\\]"):
        mod.main(["--summarize", str(tmp_path / "m.json") + ":hourglass"])
    with pytest.raises(ValueError, match="two records of dense seed 0"):
        mod.main(["--summarize", str(tmp_path / "m.json"), str(tmp_path / "m.json")])
    other = json.loads((tmp_path / "m1.json").read_text())
    (tmp_path / "m2.json").write_text(json.dumps(dict(other, steps=3)))
    with pytest.raises(ValueError, match="the records differ in steps"):
        mod.main(["--summarize", str(tmp_path / "m.json"), str(tmp_path / "m2.json")])


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

    # the spec pins the live unpool and prop_attn defaults; a spec from before the pinning rebuilds with
    # the values of then ('assign', proportional attention on)
    from adaptivision.dense.run import build
    assert spec["kwargs"] == {"unpool": "skip", "prop_attn": False} and build(spec).backbone.unpool == "skip"
    assert build(spec).backbone.prop_attn is False
    old = dict(spec, kwargs={})
    assert build(old).backbone.unpool == "assign" and build(dict(old, kwargs={"unpool": "skip"})).backbone.unpool == "skip"
    assert build(old).backbone.prop_attn is True


def test_segment_run_resumes_after_a_kill_exactly_and_records_its_curve(tmp_path, monkeypatch):
    """A segment run killed mid-way resumes from train-state.pt to the very weights and evaluation
    curve of an uninterrupted run; a state written with other settings, or a corrupt one, is
    refused by name and left alone."""
    from adaptivision.checkpoint import read_weights
    from adaptivision.dense import run as seg
    from adaptivision.dense import train
    data = make_fmnist(str(tmp_path / "fm"), n_train=20, n_test=10)
    common = dict(data_dir=data, img_size=32, steps=20, batch=2, eval_size=4, output=str(tmp_path), log=lambda *a: None)
    now = [0.0]  # a clock that moves one second per update: train_seconds counts updates, resumed or not
    monkeypatch.setattr(train, "time", SimpleNamespace(time=lambda: now[0]))
    loss, calls = train.segmentation_loss, []

    def one_second(model, items):
        now[0] += 1.0
        return loss(model, items)

    monkeypatch.setattr(train, "segmentation_loss", one_second)
    whole = seg.run(name="whole", **common)
    assert whole["train_seconds"] == 20.0
    assert [c["step"] for c in whole["curve"]] == list(range(2, 21, 2))  # every steps // CURVE_POINTS updates
    assert all(0 <= c["miou"] <= 100 for c in whole["curve"]) and not (tmp_path / "whole" / seg.STATE).exists()
    assert whole["curve"][-1]["miou"] == pytest.approx(whole["results"]["miou"])  # the last point: the final model

    def killed_at_11(model, items):
        calls.append(1)
        if len(calls) == 11:
            raise KeyboardInterrupt  # the kill, after the state of step 10 was written
        return one_second(model, items)

    monkeypatch.setattr(train, "segmentation_loss", killed_at_11)
    with pytest.raises(KeyboardInterrupt):
        seg.run(name="killed", **common)
    monkeypatch.setattr(train, "segmentation_loss", one_second)
    state = tmp_path / "killed" / seg.STATE
    assert torch.load(state, weights_only=True)["step"] == 10 and not (tmp_path / "killed" / "segment.json").exists()
    logs = []
    resumed = seg.run(name="killed", **dict(common, log=logs.append))
    assert "resuming at step 10/20" in " ".join(logs) and not state.exists()
    assert resumed["curve"] == whole["curve"]
    assert resumed["train_seconds"] == 20.0  # both processes' updates, each counted once
    a, b = read_weights(str(tmp_path / "whole" / "segmenter.safetensors")), read_weights(str(tmp_path / "killed" / "segmenter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a state from other settings is refused, naming what differs; a corrupt one too; both stay
    monkeypatch.setattr(train, "segmentation_loss", killed_at_11)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        seg.run(name="other", **common)
    monkeypatch.setattr(train, "segmentation_loss", one_second)
    with pytest.raises(ValueError, match="lr: 0.001 there, 0.002 now"):
        seg.run(name="other", lr=2e-3, **common)
    (tmp_path / "other" / seg.STATE).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="unreadable"):
        seg.run(name="other", **common)
    assert (tmp_path / "other" / seg.STATE).read_bytes() == b"not a torch file"


def test_mosaic_boxes_are_the_visible_extent_of_each_item(tmp_path):
    src = fashion_mnist(make_fmnist(str(tmp_path), n_train=20, n_test=10), train=False)
    seg = FashionMosaics(src, length=30, canvas=56, items=(2, 4), seed=3)
    det = FashionMosaicBoxes(src, length=30, canvas=56, items=(2, 4), seed=3, min_visible=0.0)
    hidden_total = 0
    for i in range(30):
        img, mask = seg.render(i)
        img_d, tgt, hidden = det.targets(i)
        assert np.array_equal(img, img_d)                                # the same canvases as segmentation
        _, _, inst, items = det.render_items(i)
        kept = [t for t in range(len(items)) if (inst == t).any()]
        assert len(tgt["boxes"]) == len(kept) and hidden == len(items) - len(kept)
        hidden_total += hidden
        for (x0, y0, x1, y1), label, t in zip(tgt["boxes"], tgt["labels"], kept, strict=True):
            ys, xs = np.nonzero(inst == t)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)   # tight, pixel edges
            assert label == items[t][0] and (mask[ys, xs] == label + 1).all()
            assert 0 <= x0 < x1 <= 56 and 0 <= y0 < y1 <= 56
    # a stricter visibility rule only removes targets, and counts them
    strict = FashionMosaicBoxes(src, length=30, canvas=56, items=(2, 4), seed=3, min_visible=0.9)
    counts = [strict.targets(i) for i in range(30)]
    assert sum(h for _, _, h in counts) > hidden_total
    x, t = strict[0]
    assert x.shape == (1, 56, 56) and t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.long
    with pytest.raises(ValueError, match="min_visible"):
        FashionMosaicBoxes(src, length=1, min_visible=1.5)


def test_sanitize_clips_boxes_outside_the_image_and_drops_empty_ones():
    t = dict(boxes=torch.tensor([[-4., 2., 10., 12.], [50., 50., 70., 60.], [60., 5., 70., 9.], [1., 1., 1., 5.]]),
             labels=torch.tensor([1, 2, 3, 4]))
    clean, counts = sanitize(t, (56, 56))
    assert torch.equal(clean["boxes"], torch.tensor([[0., 2., 10., 12.], [50., 50., 56., 56.]]))
    assert clean["labels"].tolist() == [1, 2] and counts == dict(clipped=2, dropped=2)
    empty, counts = sanitize(dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long)), (56, 56))
    assert empty["boxes"].shape == (0, 4) and counts == dict(clipped=0, dropped=0)


@pytest.mark.parametrize("kwargs", [dict(reduction="none"), dict(unpool="skip"), dict(reduction="hourglass")])
def test_detector_pyramid_levels_and_gradients_on_every_backbone(kwargs):
    torch.manual_seed(0)
    backbone = timm.create_model("adaptivision_nano_patch4_28", img_size=56, **kwargs)
    det = build_detector(backbone, num_classes=10, img_size=56, in_chans=1)
    x = torch.randn(3, 1, 56, 56)
    levels = det.backbone(x)
    assert [tuple(v.shape) for v in levels.values()] == [(3, 64, 28, 28), (3, 64, 14, 14), (3, 64, 7, 7)]
    targets = [dict(boxes=torch.tensor([[3., 4., 30., 31.]]), labels=torch.tensor([7])),
               dict(boxes=torch.tensor([[20., 18., 48., 47.], [2., 30., 15., 55.]]), labels=torch.tensor([0, 9])),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]   # an empty image
    det.train()
    losses = det(list(x), targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    sum(losses.values()).backward()
    assert backbone.patch_embed.proj.weight.grad.abs().sum() > 0      # the backbone is trained through the boxes
    assert det.head.regression_head.bbox_reg.weight.grad.abs().sum() > 0
    det.eval()
    with torch.no_grad():
        out = det(list(x))
    assert len(out) == 3 and all(o["boxes"].shape[1] == 4 and (o["labels"] < 10).all() for o in out)


def test_coco_map_is_100_for_the_targets_and_0_for_wrong_classes(tmp_path):
    src = fashion_mnist(make_fmnist(str(tmp_path), n_train=20, n_test=10), train=False)
    ds = FashionMosaicBoxes(src, length=6, canvas=56, seed=1)

    class Oracle(torch.nn.Module):
        """Returns each canvas's targets as detections (shifted classes if ``wrong``)."""
        def __init__(self, wrong):
            super().__init__()
            self.wrong, self.i = wrong, 0
            self.head = type("H", (), {"classification_head": type("C", (), {"num_classes": 10})()})()

        def forward(self, images):
            out = []
            for _ in images:
                t = ds[self.i][1]
                self.i += 1
                out.append(dict(boxes=t["boxes"], scores=torch.ones(len(t["boxes"])),
                                labels=(t["labels"] + self.wrong) % 10))
            return out

    right = coco_map(Oracle(0), ds, batch=4)
    assert right["map"] == pytest.approx(100) and right["map50"] == pytest.approx(100)
    assert right["boxes"] == sum(len(ds[i][1]["boxes"]) for i in range(6)) and right["images"] == 6
    assert coco_map(Oracle(1), ds, batch=4)["map"] == 0


def test_detect_cli_trains_evaluates_and_refuses_a_foreign_checkpoint(tmp_path, capsys):
    data = make_fmnist(str(tmp_path / "fm"), n_train=40, n_test=20)
    common = ["--data-dir", data, "--steps", "2", "--batch-size", "2", "--eval-size", "4", "--output", str(tmp_path)]
    assert main(["detect", *common, "--name", "a", "reduction=none"]) == 0
    assert main(["detect", *common, "--name", "b", "reduction=hourglass"]) == 0
    spec = json.load(open(tmp_path / "a" / "detect.json"))
    assert spec["kwargs"] == {"reduction": "none"} and 0 <= spec["results"]["map"] <= 100
    from adaptivision.dense import detect  # a DTC backbone's spec from before unpool was pinned: 'assign'
    assert detect.build(dict(spec, kwargs={})).backbone.trunk.backbone.unpool == "assign"
    assert detect.pinned_kwargs(spec["model"], {}) == {"unpool": "skip", "prop_attn": False}
    capsys.readouterr()
    assert main(["detect", "--checkpoint", str(tmp_path / "a" / "detector.safetensors"), "--data-dir", data,
                 "--eval-size", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["map"] == pytest.approx(spec["results"]["map"])
    # an existing run is never overwritten
    assert main(["detect", *common, "--name", "a"]) == 2
    assert "already holds" in capsys.readouterr().err
    # b's weights put beside a's record: refused, naming what differs (the backbone's options)
    os.replace(tmp_path / "b" / "detector.safetensors", tmp_path / "a" / "detector.safetensors")
    assert main(["detect", "--checkpoint", str(tmp_path / "a" / "detector.safetensors"), "--data-dir", data]) == 2
    err = capsys.readouterr().err
    assert "is not the detector of" in err and "hourglass" in err
    # another class count in the record: refused too
    spec["classes"] = spec["classes"][:5]
    json.dump(spec, open(tmp_path / "b" / "detect.json", "w"))
    import shutil
    shutil.copy(tmp_path / "a" / "detector.safetensors", tmp_path / "b" / "detector.safetensors")
    assert main(["detect", "--checkpoint", str(tmp_path / "b" / "detector.safetensors"), "--data-dir", data]) == 2
    assert "num_classes" in capsys.readouterr().err
