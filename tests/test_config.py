import pytest
import timm
import torch

from conftest import tiny_model


@pytest.mark.parametrize("kw, field", [
    (dict(k_min=12, k_max=8), "k_min"),
    (dict(k_max=17), "k_max"),            # 16 patches
    (dict(tau=0.0), "tau"),
    (dict(tau=-3.0), "tau"),
    (dict(k_step=0), "k_step"),
    (dict(infer_k_step=0), "infer_k_step"),
    (dict(iters=-1), "iters"),
    (dict(complexity="colour"), "complexity"),
    (dict(gate="always"), "gate"),
    (dict(norm="middle"), "norm"),
    (dict(condense_at=4), "condense_at"),  # depth 4 -> blocks 0..3
    (dict(condense_at=[2, 1]), "condense_at"),
    (dict(cmtf_at=[9]), "cmtf_at"),
    (dict(afa_rank=0), "afa_rank"),
    (dict(global_pool="max"), "global_pool"),
])
def test_impossible_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        tiny_model(**kw)


def test_error_states_the_allowed_range():
    with pytest.raises(ValueError, match=r"1 <= k_max <= 16"):
        tiny_model(k_max=17)


def test_unknown_option_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"Unknown model option 'tua'.*Did you mean 'tau'"):
        tiny_model(tua=100.0)
    with pytest.raises(ValueError, match=r"Did you mean 'embed_dim'"):
        timm.create_model("adaptivision_tiny_patch2_28", embed_dims=64)


def test_second_stage_must_fit_in_the_first():
    # stage 0 can produce as few as 4 tokens, so stage 1 cannot ask for 8
    with pytest.raises(ValueError, match="'k_max'"):
        tiny_model(condense_at=[0, 2], k_min=[4, 2], k_max=[16, 8])
    m = tiny_model(condense_at=[0, 2], k_min=[8, 2], k_max=[16, 8])
    assert [s.k_max for s in m.opts.stages] == [16, 8]


def test_defaults_put_small_at_two_thirds_of_the_patches():
    m = timm.create_model("adaptivision_small_patch16_224")
    st = m.opts.stages[0]
    assert (st.k_min, st.k_mid, st.k_max) == (32, 128, 196)
    assert abs(st.k_mid / 196 - 2 / 3) < 0.02
    # the K of an average image (score 0) is k_mid; the sigmoid still spans [k_min, k_max]
    dtc = m.dtc["0"]
    k = dtc.k_from_score(torch.tensor([-30.0, 0.0, 30.0]), 0.0).tolist()
    assert k == [32, 128, 192]  # on the k_step = 8 grid (196 is not on it)
    # a user-chosen range gets the generic default: mid-range, no offset
    assert timm.create_model("adaptivision_small_patch16_224", k_max=150).dtc["0"].k_mid is None


def test_layers_check_their_own_arguments_and_take_them_by_keyword():
    """Issue 12: a layer built outside ModelOptions still refuses impossible values, and options
    are passed by name (no positional k_min / k_max / num_heads to swap by accident)."""
    from adaptivision.layers import CrossModalTokenFusion, DynamicTokenClustering, ModulationPredictor
    from adaptivision.reduction import ImportanceStage, RandomKeep
    with pytest.raises(TypeError):
        DynamicTokenClustering(8, 2, 6)
    with pytest.raises(TypeError):
        CrossModalTokenFusion(8, 2)
    for bad in (dict(k_min=0, k_max=4), dict(k_min=5, k_max=4), dict(k_min=2, k_max=4, k_mid=4),
                dict(k_min=2, k_max=4, tau=0.0), dict(k_min=2, k_max=4, complexity="sharpness")):
        with pytest.raises(ValueError):
            DynamicTokenClustering(8, **bad)
    dtc = DynamicTokenClustering(8, k_min=2, k_max=4)
    dtc.complexity = "sharpness"  # changed after construction: named, not read as 'saliency'
    with pytest.raises(ValueError, match="complexity"):
        dtc.complexity_score(torch.randn(1, 4, 8))
    for build in (lambda: ModulationPredictor(8, max_tokens=4, rank=0), lambda: RandomKeep(keep_ratio=0.0),
                  lambda: ImportanceStage(8, keep_ratio=1.5, stage=0)):
        with pytest.raises(ValueError):
            build()


def test_proportional_attention_is_off_by_default_only_where_it_was_measured_to_hurt():
    """prop_attn=None resolves to off for DTC with per-image centres and soft assignment (the default
    preset; measured: docs/results.md, "Without proportional attention") and to on elsewhere: learned
    centroids (their empty slots are masked by log 0), hard assignment and ToMe (its reference)."""
    torch.manual_seed(0)
    default = tiny_model(clustering="image-soft").eval()  # the library's default preset (tiny_model's is 'paper')
    assert default.opts.prop_attn is False and default.prop_attn is False
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for want, kw in ((True, dict(prop_attn=True)), (False, dict(prop_attn=False))):
            other = tiny_model(clustering="image-soft", **kw).eval()
            other.load_state_dict(default.state_dict())
            assert torch.allclose(other(x), default(x), atol=1e-6) is not want  # the term changes the logits
    for kw in (dict(clustering="paper"), dict(clustering="image"), dict(reduction="tome"),
               dict(clustering="image-soft", centers="grid")):
        assert tiny_model(**kw).prop_attn is True, kw
    assert tiny_model(reduction="evit").prop_attn is False  # no token stands for several patches
    with pytest.raises(ValueError, match="'prop_attn'"):
        tiny_model(prop_attn="yes")
