"""The same checks for every registered model, as timm tests its own."""
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import group_parameters

from conftest import perturb_zero_init

MODELS = timm.list_models("adaptivision_*")


def test_registry_lists_every_size():
    expected = {f"adaptivision_{s}_patch16_224" for s in ("tiny", "small", "base")}
    expected |= {"adaptivision_tiny_patch2_28", "adaptivision_tiny_patch2_32"}
    assert expected <= set(MODELS)


def _inputs(model, batch=2):
    c, h, w = model.pretrained_cfg["input_size"]
    return torch.randn(batch, c, h, w)


@pytest.mark.parametrize("name", MODELS)
def test_timm_generic_checks(name):
    """What timm's own tests/test_models.py asks of every model (test_model_backward,
    test_model_default_cfgs, features_only), as timm's scripts build it: no guidance, and then
    no parameter without gradient (timm's check; DDP's unused-parameter error)."""
    model = timm.create_model(name, num_classes=42)
    assert not any(n.startswith(("cmtf.", "guidance_")) for n, _ in model.named_parameters())
    x = _inputs(model)
    perturb_zero_init(model)  # so that the factors multiplied by zero-initialised layers get gradient too
    model.train()
    logits = model(x)
    assert logits.shape == (2, 42) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches: {missing}"
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    assert state[cfg["first_conv"] + ".weight"].shape[1] == cfg["input_size"][0]
    model.eval()
    with torch.no_grad():
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        feats = timm.create_model(name, features_only=True, out_indices=(1, -1)).eval()(x)
    H, W = model.patch_embed.grid_size
    assert [f.shape for f in feats] == [(2, model.embed_dim, H, W)] * 2


def test_guidance_without_cmtf_is_an_error():
    model = timm.create_model("adaptivision_tiny_patch2_28")
    with pytest.raises(ValueError, match="no Cross-Modal Token Fusion.*guidance_dim"):
        model(torch.randn(1, 1, 28, 28), guidance=torch.randn(3, model.embed_dim))


def test_cmtf_gets_gradient_when_built_for_guidance():
    model = timm.create_model("adaptivision_nano_patch4_28", num_classes=7, cmtf=True)  # guidance of width D
    x = _inputs(model)
    g = torch.randn(3, model.embed_dim)
    perturb_zero_init(model)
    model.train()
    logits = model(x, guidance=g)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing and any(n.startswith("cmtf.") for n, _ in model.named_parameters()), missing


@pytest.mark.parametrize("name", MODELS)
def test_timm_interface(name):
    model = timm.create_model(name).eval()
    x = _inputs(model)
    D = model.embed_dim
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.dim() == 3 and feats.shape[0] == 2 and feats.shape[2] == D
        assert model.forward_head(feats, pre_logits=True).shape == (2, D)
        assert torch.allclose(model.forward_head(feats), model(x), atol=1e-5)
        assert model.get_classifier() is model.head
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert model(x).shape == (2, D)
        # forward_intermediates: NCHW maps of the full patch grid, also after condensation
        H, W = model.patch_embed.grid_size
        final, inters = model.forward_intermediates(x, indices=[0, len(model.blocks) - 1])
        assert [t.shape for t in inters] == [(2, D, H, W)] * 2
    assert {f"dtc.{k}.centroids" for k, d in model.dtc.items() if d.centroids is not None} <= model.no_weight_decay()
    # every parameter belongs to exactly one group of the layer-decay matcher
    groups = group_parameters(model, model.group_matcher())
    grouped = [n for names in groups.values() for n in names]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())


def test_grad_checkpointing_gives_same_output_and_gradients():
    torch.manual_seed(0)
    model = timm.create_model("adaptivision_tiny_patch2_28", dynamic=False, budget_jitter=0.0)
    x = _inputs(model)
    model.train()
    model.init_clusters(x)
    y0 = model(x)
    y0.sum().backward()
    g0 = model.blocks[3].attn.qkv.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    y1 = model(x)
    y1.sum().backward()
    assert torch.allclose(y0, y1, atol=1e-5)
    assert torch.allclose(g0, model.blocks[3].attn.qkv.weight.grad, atol=1e-5)


def test_features_only_gives_nchw_maps():
    model = timm.create_model("adaptivision_tiny_patch2_32", features_only=True, out_indices=(2, 5, 11))
    maps = model(torch.randn(2, 3, 32, 32))
    assert [m.shape for m in maps] == [(2, 192, 16, 16)] * 3
    assert model.feature_info.channels() == [192] * 3


def test_local_safetensors_weights_through_pretrained_cfg_overlay(tmp_path):
    src = timm.create_model("adaptivision_tiny_patch2_28", clustering="paper").eval()  # learned centroids
    x = _inputs(src)
    src.init_clusters(x)  # seeds the centroids, which are then saved with the weights
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = timm.create_model("adaptivision_tiny_patch2_28", pretrained=True, clustering="paper",
                            pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    # timm's fine-tuning path: another class count keeps the trunk and starts a new head
    ft = timm.create_model("adaptivision_tiny_patch2_28", num_classes=3, pretrained=True, clustering="paper",
                           pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(ft.dtc["0"].centroids, src.dtc["0"].centroids)
    # weights of another size are refused with the shapes that differ
    with pytest.raises(RuntimeError, match="size mismatch"):
        timm.create_model("adaptivision_small_patch2_28", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)))


def test_a_one_channel_checkpoint_in_a_three_channel_model_names_in_chans(tmp_path):
    """timm's validate.py / train.py build with 3 channels unless --in-chans is given."""
    from timm.models import load_checkpoint
    src = timm.create_model("adaptivision_nano_patch4_28")                       # 1 channel
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    as_timm = timm.create_model("adaptivision_nano_patch4_28", in_chans=3)
    with pytest.raises(RuntimeError, match="in_chans=1.*--in-chans 1"):
        load_checkpoint(as_timm, str(path))
    right = timm.create_model("adaptivision_nano_patch4_28", in_chans=1)
    load_checkpoint(right, str(path))
    assert torch.equal(right.patch_embed.proj.weight, src.patch_embed.proj.weight)


def test_patch_drop_rate_drops_patches_before_dtc_in_training_only():
    """timm's ``patch_drop_rate`` (PatchDropout): in training DTC clusters the int(0.75 x 49) = 36 patches
    that survive (their masses sum to 36); at evaluation every patch (49).
    Options that place tokens on the patch grid are refused with it, and so are dense outputs in training."""
    torch.manual_seed(0)
    model = timm.create_model("adaptivision_nano_patch4_28", num_classes=10, patch_drop_rate=0.25)
    P, x = model.num_prefix_tokens, torch.randn(3, 1, 28, 28)
    model.train()
    out = model.forward_tokens(x)
    torch.testing.assert_close(out.mass[:, P:].sum(1), torch.full((3,), 36.0))
    assert out.groups[0].assign[0].shape[1] == 36                                  # (b, N kept, K)
    model.patch_embed.proj.weight.grad = None
    model.forward_head(out.features, mass=out.mass).square().sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    dense = timm.create_model("adaptivision_nano_patch4_28", num_classes=10, patch_drop_rate=0.25, condense_at=False)
    assert dense.train()(x).shape == (3, 10) and dense.forward_features(x).shape[1] == P + 36
    model.eval()
    with torch.no_grad():
        out = model.forward_tokens(x)
        torch.testing.assert_close(out.mass[:, P:].sum(1), torch.full((3,), 49.0))
        torch.testing.assert_close(model(x), model(x))                              # nothing random at evaluation
        assert dense.eval().forward_features(x).shape[1] == P + 49
        assert len(model.forward_intermediates(x, intermediates_only=True)) == len(model.blocks)
    for kw, named in ((dict(reduction="hourglass"), "reduction='hourglass'"), (dict(reduction="hired"), "reduction='hired'"),
                      (dict(centers="grid"), "centers='grid'"), (dict(centers="fps", spatial=0.5), "spatial=0.5")):
        timm.create_model("adaptivision_nano_patch4_28", **kw)                        # builds without the drops
        with pytest.raises(ValueError, match=f"patch_drop_rate=0.25 drops patches in training, but {named}"):
            timm.create_model("adaptivision_nano_patch4_28", patch_drop_rate=0.25, **kw)
    model.train()
    with pytest.raises(ValueError, match="patch_drop_rate=0.25 drops patches in training: dense outputs"):
        model.forward_intermediates(x)
