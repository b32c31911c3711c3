"""With condensation, AFA and CMTF off the model is exactly a timm ViT (DESIGN.md §2); the
forward path computes what it computed before its redesign (issue 12)."""
import json

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import forward_cases
from adaptivision import AdaptiVision

# timm.create_model drops None-valued kwargs, so "off" is spelled False through timm
OFF = dict(condense_at=False, afa=False, cmtf=False)


@pytest.mark.parametrize("ours, theirs", [
    ("adaptivision_tiny_patch16_224", "vit_tiny_patch16_224"),
    ("adaptivision_small_patch16_224", "deit_small_patch16_224"),
])
def test_loads_timm_vit_and_gives_the_same_logits(ours, theirs):
    torch.manual_seed(0)
    ref = timm.create_model(theirs).eval()
    model = timm.create_model(ours, **OFF).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)
        f_ref = ref.forward_intermediates(x, indices=[2, 11], intermediates_only=True)
        f_our = model.forward_intermediates(x, indices=[2, 11], intermediates_only=True)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(f_our, f_ref, strict=True))


def test_small_image_variant_matches_a_timm_vit_of_the_same_shape():
    torch.manual_seed(0)
    args = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=192, depth=12, num_heads=3)
    ref = VisionTransformer(**args).eval()
    model = timm.create_model("adaptivision_tiny_patch2_28", **OFF).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_adaptivision_reuses_every_vit_weight_name():
    """The condensing model keeps the ViT's weights under the same names (plus its own modules),
    so a ViT checkpoint fills its whole backbone."""
    vit_keys = set(timm.create_model("vit_tiny_patch16_224").state_dict())
    ours = set(AdaptiVision(embed_dim=192, depth=12, num_heads=3).state_dict())
    assert not AdaptiVision(embed_dim=192, depth=12, num_heads=3, condense_at=None).dtc
    assert vit_keys <= ours
    assert all(k.startswith(("dtc.", "cmtf.")) or ".modulator." in k for k in ours - vit_keys)


@pytest.mark.parametrize("case", [c[0] for c in forward_cases.CASES])
def test_forward_outputs_are_those_before_the_redesign(case):
    """Issue 12 promised the same outputs after the forward-path redesign: every registered model
    and every reduction, eval / seeded train / dense, against the snapshot of the old code."""
    with open(forward_cases.GOLDEN) as f:
        want = json.load(f)["cases"][case]
    name, model, kwargs, mode = next(c for c in forward_cases.CASES if c[0] == case)
    got = forward_cases.outputs(name, model, kwargs, mode)
    assert got.keys() == want.keys()
    for key, value in want.items():
        tol = 1e-4 if key == "grad" else 1e-5  # a sum of ~1e5 gradient entries
        flat = torch.tensor(value, dtype=torch.float64).flatten().tolist()
        assert torch.tensor(got[key], dtype=torch.float64).flatten().tolist() == pytest.approx(
            flat, rel=tol, abs=1e-5), f"{case}: {key}"
