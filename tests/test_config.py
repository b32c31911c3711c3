import pytest
import timm

from conftest import tiny_model


@pytest.mark.parametrize("kw, field", [
    (dict(k_min=12, k_max=8), "k_min"),
    (dict(k_max=17), "k_max"),            # 16 patches
    (dict(tau=0.0), "tau"),
    (dict(tau=-3.0), "tau"),
    (dict(k_step=0), "k_step"),
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
    assert [s["k_max"] for s in m.opts.stages] == [16, 8]


def test_defaults_put_small_at_two_thirds_of_the_patches():
    m = timm.create_model("adaptivision_small_patch16_224")
    st = m.opts.stages[0]
    assert (st["k_min"], st["k_max"]) == (64, 196)
    assert abs((st["k_min"] + st["k_max"]) / 2 / 196 - 2 / 3) < 0.02
