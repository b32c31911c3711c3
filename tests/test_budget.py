"""One budget module and one timing module (issue 12): parse a budget, apply it to any model, match
GMACs by one search; one meaning of amp."""
import pytest
import timm
import torch

from adaptivision import budget, profile
from adaptivision.benchmark import mixed_batch


def test_bisect_finds_the_closest_point_of_an_increasing_measure():
    x, val = budget.bisect(lambda t: t * t, 2.0, 0.0, 4.0, 30)
    assert x == pytest.approx(2 ** 0.5, abs=1e-6) and val == pytest.approx(2.0, abs=1e-6)


def test_parse_budget_takes_one_known_finite_number():
    assert budget.parse_budget("gmacs=1.3") == {"gmacs": 1.3}
    assert budget.parse_budget("tome_r=4") == {"tome_r": 4}
    assert budget.parse_budget("keep_ratio=0.5") == {"keep_ratio": 0.5}
    for bad, msg in (("gmcas=1", "expected one of"), ("gmacs", "expected one of"), ("gmacs=.nan", "finite"),
                     ("k=abc", "finite"), ("bias=true", "finite")):
        with pytest.raises(ValueError, match=msg):
            budget.parse_budget(bad)


@pytest.mark.parametrize("reduction", ["dtc", "tome", "evit", "random", "importance"])
def test_match_gmacs_reaches_one_target_for_every_reduction(reduction):
    torch.manual_seed(0)
    x = mixed_batch(16, 1, 28)
    dense = profile(timm.create_model("adaptivision_nano_patch4_28", reduction="none").eval(), x)["gmacs"]
    model = timm.create_model("adaptivision_nano_patch4_28", reduction=reduction).eval()
    if reduction == "dtc":  # the complexity statistics of a trained model
        model.train()
        with torch.no_grad():
            model(x)
        model.eval()
    target = 0.7 * dense
    knob, gmacs = budget.match_gmacs(model, x, target)
    assert profile(model, x)["gmacs"] == pytest.approx(gmacs)  # the knob stays set
    tol = 0.06 if reduction == "tome" else 0.03  # ToMe's r moves GMACs in whole steps
    assert abs(gmacs - target) / target < tol, (knob, gmacs, target)


def test_apply_budget_sets_the_baselines_knobs_and_refuses_dense():
    tome = timm.create_model("adaptivision_nano_patch4_28", reduction="tome", tome_r=2).eval()
    budget.apply_budget(tome, {"tome_r": 5}, None)
    assert {b.r for b in tome.blocks} == {5}
    evit = timm.create_model("adaptivision_nano_patch4_28", reduction="evit").eval()
    budget.apply_budget(evit, {"keep_ratio": 0.5}, None)
    assert {b.keep_ratio for b in evit.blocks if hasattr(b, "keep_ratio")} == {0.5}
    dense = timm.create_model("adaptivision_nano_patch4_28", reduction="none")
    with pytest.raises(ValueError, match="no DTC stage"):
        budget.apply_budget(dense, {"gmacs": 0.02}, torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="no budget knob"):
        budget.apply_budget(dense, {"tome_r": 3}, None)


@pytest.mark.parametrize("clustering", ["image-soft", "paper"])
def test_fixed_k_below_the_trained_range_gives_that_many_super_tokens(clustering):
    """``k=`` may cut below k_min (an image's farthest points, or a prefix of the nested learned
    centroids, exist for any K): K tokens reach the blocks after the stage; 0 or > k_max is refused."""
    model = timm.create_model("adaptivision_nano_patch4_28", clustering=clustering, cmtf=False).eval()
    stage = budget.first_dtc(model)
    assert stage.k_min == 16
    x = mixed_batch(4, 1, 28)
    budget.apply_budget(model, {"k": 5}, None)
    seen = []
    handle = model.blocks[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert model.last_num_clusters.tolist() == [[5]] * 4 and seen == [5 + model.num_prefix_tokens]
    for bad in (0, stage.k_max + 1):
        with pytest.raises(ValueError, match=r"outside this model's range \[1, 49\]"):
            budget.apply_budget(model, {"k": bad}, None)


def test_one_meaning_of_amp():
    """timing.resolve_amp is the one place that says what ``amp`` means (issue 12: the two
    autocast helpers disagreed on 'auto' on CPU)."""
    from adaptivision.timing import resolve_amp
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [resolve_amp(a, cpu) for a in ("auto", True, False, None, "none", "bf16")] == [
        "none", "bf16", "none", "none", "none", "bf16"]
    assert [resolve_amp(a, cuda) for a in ("auto", True, "fp16", "bf16")] == ["fp16", "fp16", "fp16", "bf16"]
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_amp("fp16", cpu)
    with pytest.raises(ValueError, match="Invalid value for 'amp'"):
        resolve_amp("fp8", cpu)
