import timm
import torch

from conftest import perturb_zero_init


def test_bf16_autocast_on_cpu_gives_finite_outputs_and_gradients():
    model = timm.create_model("adaptivision_tiny_patch2_32", num_classes=10, cmtf=True)
    perturb_zero_init(model)
    x = torch.randn(4, 3, 32, 32)
    g = torch.randn(4, 192)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model(x, guidance=g, return_aux=True)
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.arange(4))
    loss.backward()
    assert torch.isfinite(logits.float()).all()
    assert all(zs.dtype == torch.float32 for zs, _, _ in aux["cluster"])      # DTC distances in fp32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
