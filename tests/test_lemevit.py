"""LeMeViT at nano size (issue 16): its dual cross-attention against hand-computed cases."""
import pytest
import timm
import torch

from adaptivision.models.lemevit import DualCrossAttention


def test_dual_image_tokens_read_only_the_meta_tokens():
    torch.manual_seed(0)
    attn = DualCrossAttention(8, num_heads=2, kind="dual")
    x, c = torch.randn(1, 5, 8), torch.randn(1, 1, 8)
    dx, dc = attn(x, c)
    # one meta token: every image token's softmax has one key, so its update is proj(v(c)) for all
    want = attn.proj(attn.qkv_c(c).chunk(3, dim=-1)[2])                            # (1, 1, 8)
    assert torch.allclose(dx, want.expand(1, 5, 8), atol=1e-6)
    # an image token's update does not depend on the other image tokens (O(N M), no N x N)
    c2 = torch.randn(1, 3, 8)
    dx1, dc1 = attn(x, c2)
    x2 = x.clone()
    x2[:, 4] += 1.0
    dx2, dc2 = attn(x2, c2)
    assert torch.allclose(dx1[:, :4], dx2[:, :4], atol=1e-6) and not torch.allclose(dx1[:, 4], dx2[:, 4])
    assert not torch.allclose(dc1, dc2)  # the meta tokens read every image token


def test_stem_meta_tokens_read_the_image_and_leave_it():
    torch.manual_seed(0)
    attn = DualCrossAttention(8, num_heads=2, kind="stem")
    x, c = torch.randn(2, 1, 8), torch.randn(2, 3, 8)
    dx, dc = attn(x, c)
    assert dx is None
    want = attn.proj(attn.qkv(x).chunk(3, dim=-1)[2])                              # one image token: its value
    assert torch.allclose(dc, want.expand(2, 3, 8), atol=1e-6)


def test_attention_cost_is_linear_in_the_image_tokens_and_counted():
    x, x2, c = torch.zeros(1, 49, 8), torch.zeros(1, 98, 8), torch.zeros(1, 16, 8)
    dual = DualCrossAttention(8, num_heads=2, kind="dual")
    full = DualCrossAttention(8, num_heads=2, kind="self")
    assert dual.call_macs(x2, c) == 2 * dual.call_macs(x, c) == 2 * 2 * 2 * 49 * 16 * 8
    assert full.call_macs(x2, c) - 2 * 98 * 98 * 8 == full.call_macs(x, c) - 2 * 49 * 49 * 8
    import sys

    from adaptivision import profile
    model = timm.create_model("lemevit_nano_28", num_classes=10).eval()
    img = torch.randn(2, 1, 28, 28)
    total = profile(model, img)["gmacs"]
    attn = {}
    for m in model.modules():
        if isinstance(m, DualCrossAttention):
            m.register_forward_hook(lambda mod, a, o: attn.__setitem__(id(mod), mod.call_macs(*a)))
    model(img)
    prof = sys.modules["adaptivision.profile"]
    orig = prof.module_macs
    try:
        prof.module_macs = lambda m, *a: 0 if isinstance(m, DualCrossAttention) else orig(m, *a)
        without = profile(model, img)["gmacs"]
    finally:
        prof.module_macs = orig
    assert total - without == pytest.approx(sum(attn.values()) / 2 / 1e9)


def test_lemevit_nano_trains_every_parameter():
    torch.manual_seed(0)
    model = timm.create_model("lemevit_nano_28", num_classes=10)
    out = model(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    feats = model.forward_features(torch.randn(2, 1, 28, 28))
    assert feats.shape == (2, 4 * 4 + 16, 96)  # 4 x 4 image tokens after one downsampling, 16 meta tokens
    with pytest.raises(ValueError):
        DualCrossAttention(8, num_heads=3, kind="dual")
