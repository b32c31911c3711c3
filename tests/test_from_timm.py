"""Pretrained ViTs: ``from_timm`` and ``adaptivision train --init-from`` (issue 7, first part)."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import adaptivision
from adaptivision.cli import main
from fixtures import make_fmnist


def _local_timm(name, tmp_path, **kw):
    """A randomly initialised timm model saved to a file and loaded back as 'pretrained' (no hub)."""
    src = timm.create_model(name, **kw)
    path = str(tmp_path / f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kw).eval(), path


@pytest.mark.parametrize("name,kw", [("deit_tiny_patch16_224", {}),
                                     ("vit_small_patch16_224", dict(reg_tokens=4, class_token=False,
                                                                    global_pool="avg", fc_norm=True, init_values=1e-5))])
def test_with_condensation_off_outputs_equal_the_source(name, kw, tmp_path):
    vit, _ = _local_timm(name, tmp_path, **kw)
    model = adaptivision.from_timm(vit, condense_at=False, afa=False, cmtf=False).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), vit(x))
    assert model.pretrained_cfg["architecture"] == vit.pretrained_cfg["architecture"]


def test_off_the_shelf_condensation_calibrated_on_a_batch(tmp_path):
    vit, _ = _local_timm("deit_tiny_patch16_224", tmp_path)
    x = torch.randn(6, 3, 224, 224) * torch.linspace(0.2, 2, 6).view(6, 1, 1, 1)  # images of varied contrast
    default = adaptivision.from_timm(vit, x, k_min=32, k_max=160)
    assert list(default.dtc) == ["1"] and default.dtc["1"].centers == "fps"  # the defaults here: after block 1, fps
    # proportional attention on off the shelf, also with the soft preset (off by default when training)
    assert default.prop_attn and adaptivision.from_timm(vit, clustering="image-soft").prop_attn
    assert not adaptivision.from_timm(vit, clustering="image-soft", prop_attn=False).prop_attn
    model = adaptivision.from_timm(vit, x, k_min=32, k_max=160, clustering="paper", condense_at=0,
                                   budget_jitter=0.5).eval()
    dtc = model.dtc["0"]
    assert bool(dtc.initialized) and bool(dtc.stats_seen) and dtc.budget_jitter == 0.5  # off while calibrating only
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (6, 1000) and torch.isfinite(logits).all()
    assert model.last_num_clusters.unique().numel() > 1  # per-image K from the calibrated statistics
    for k, v in vit.state_dict().items():  # every ViT weight reused as it was
        assert torch.equal(model.state_dict()[k], v)


def test_from_timm_rejects_what_is_not_a_vit():
    with pytest.raises(TypeError, match="VisionTransformer"):
        adaptivision.from_timm(timm.create_model("resnet18"))


def test_train_init_from_a_timm_vit(tmp_path, capsys):
    data = make_fmnist(str(tmp_path / "fm"), n_train=32, n_test=16)
    vit = timm.models.VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    path = str(tmp_path / "vit.safetensors")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    common = ["--data-dir", data, "--output", str(tmp_path), "--epochs", "1"]
    args = ["train", *common, "--name", "ft", "--init-from", path, "compare_dense=false", "workers=0", "batch_size=16", "throughput_batch=8", "lr=1e-9", "warmup_lr=1e-9",
            "min_lr=1e-9", "model_kwargs={embed_dim: 32, depth: 2, num_heads: 2, clustering: paper}"]
    rest = args[11:]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "head.bias, head.weight: another number of classes" in out and "start fresh" in out
    tuned = load_file(str(tmp_path / "ft" / "last.safetensors"))
    src = vit.state_dict()
    # lr ~ 0: the backbone is still the source's, the centroids were seeded from its tokens
    assert torch.allclose(tuned["patch_embed.proj.weight"], src["patch_embed.proj.weight"], atol=1e-6)
    assert tuned["dtc.0.centroids"].abs().sum() > 0
    assert json.loads((tmp_path / "ft" / "model.json").read_text())["name"] == "adaptivision_nano_patch4_28"
    # a file of another architecture is named, nothing is trained
    other = str(tmp_path / "other.safetensors")
    save_file({k: v.contiguous() for k, v in timm.create_model("deit_tiny_patch16_224").state_dict().items()}, other)
    assert main(["train", *common, "--name", "ft2", "--init-from", other, *rest]) == 2
    assert "does not fit" in capsys.readouterr().err
