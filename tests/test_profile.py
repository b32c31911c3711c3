"""The MAC counter against timm's published figures and against the hand formula (docs/model.md)."""
import timm
import torch

from adaptivision import profile
from conftest import tiny_model


def test_reference_values_of_timm_models():
    x = torch.randn(1, 3, 224, 224)
    deit = profile(timm.create_model("deit_small_patch16_224"), x)
    vit = profile(timm.create_model("vit_base_patch16_224"), x)
    assert abs(deit["gmacs"] - 4.61) / 4.61 < 0.01, deit
    assert abs(vit["gmacs"] - 17.58) / 17.58 < 0.01, vit
    assert abs(deit["params"] / 1e6 - 22.05) < 0.01


def hand_macs(N, P, D, depth, c, K, R, mlp=4, C=3, patch=4, classes=5, M=0, iters=0):
    """docs/model.md: the analytic MAC count of one image."""
    embed = N * C * patch * patch * D
    def block(T, afa):
        return 3 * T * D * D + T * D * D + 2 * mlp * T * D * D + (2 + (R if afa else 0)) * T * T * D
    mod = (D * (D // 4) + (D // 4) * 2 * R * (K + P)) if R else 0  # f_m, with its outputs for K_max+P tokens
    total = embed + c * block(N + P, False)
    total += (2 + 2 * iters) * N * K * D                                      # DTC
    total += (depth - c) * (block(K + P, R > 0) + mod)
    if M:
        T = K + P
        total += T * D * D + M * 2 * D * D + 2 * T * M * D + 2 * T * D * D    # CMTF: q, kv, attention, W_g, W_o
    return total + D * classes


def test_counter_matches_the_hand_formula():
    x = torch.randn(2, 3, 16, 16)
    for c, R, M, iters in ((0, 1, 0, 0), (1, 2, 3, 1), (2, 0, 0, 0)):
        model = tiny_model(dynamic=False, k_max=10, condense_at=c, afa=R > 0, afa_rank=max(R, 1), iters=iters)
        g = torch.randn(M, 32) if M else None
        got = profile(model, x, guidance=g)["gmacs"] * 1e9
        # f_m's output layer is built for K_max + P = 11 tokens
        want = hand_macs(N=16, P=1, D=32, depth=4, c=c, K=10, R=R, M=M, iters=iters)
        assert abs(got - want) < 1, (c, R, M, got, want)


def test_small_default_budget_is_the_papers_operating_point():
    """adaptivision_small at its default budget: 3.1 ± 0.1 GMACs at 224² (DeiT-S: 4.61)."""
    model = timm.create_model("adaptivision_small_patch16_224").eval()
    got = profile(model, torch.randn(2, 3, 224, 224))
    assert abs(got["gmacs"] - 3.1) <= 0.1, got
    assert abs(got["mean_k"][0] / 196 - 2 / 3) < 0.05
