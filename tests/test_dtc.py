"""Dynamic Token Clustering behaviour: per-image K, grouping, budgets, initialisation."""
import copy

import pytest
import timm
import torch

from adaptivision import AdaptiVisionLoss, profile
from adaptivision.layers import DynamicTokenClustering
from adaptivision.layers.tokens import _cheapest_split
from conftest import perturb_zero_init, read_fmnist, textured_and_flat, tiny_model


def _warm_stats(model, x, **kw):
    """One training-mode pass seeds centroids and the complexity statistics."""
    model.train()
    with torch.no_grad():
        model(x, **kw)
    return model.eval()


def test_k_grows_with_complexity():
    x = textured_and_flat()                      # 3 textured, then 3 flat images
    model = _warm_stats(tiny_model(budget_jitter=0.0), x)
    with torch.no_grad():
        model(x)
    k = model.last_num_clusters[:, 0]
    assert k[:3].min() > k[3:].max(), k
    assert k.min() >= 4 and k.max() <= 16 and (k % 2 == 0).all()


@pytest.mark.parametrize("complexity", ["variance", "entropy", "saliency"])
def test_every_complexity_score_drives_k(complexity):
    x = textured_and_flat()
    w = torch.cat([torch.rand(3, 16), torch.ones(3, 16)])  # saliency: uneven vs uniform
    w[:3, :4] += 5
    kw = dict(patch_weights=w) if complexity == "saliency" else {}
    model = _warm_stats(tiny_model(complexity=complexity, budget_jitter=0.0), x, **kw)
    with torch.no_grad():
        model(x, **kw)
    k = model.last_num_clusters[:, 0]
    assert k.unique().numel() > 1, f"{complexity}: every image got K={k.tolist()}"


def test_saliency_without_weights_falls_back_to_uniform_weights():
    """Missing guidance at test time: complexity='saliency' without weights is the plain variance."""
    x = torch.randn(4, 3, 16, 16)
    sal = tiny_model(complexity="saliency", budget_jitter=0.0).eval()
    var = tiny_model(complexity="variance", budget_jitter=0.0).eval()
    var.load_state_dict(sal.state_dict())
    with torch.no_grad():
        out = sal(x)
        assert torch.equal(out, sal(x, patch_weights=torch.ones(4, 16)))
        assert torch.equal(out, var(x))


def test_an_image_gives_the_same_output_alone_or_in_a_mixed_batch():
    x = textured_and_flat(6, 2)
    model = _warm_stats(tiny_model(budget_jitter=0.0, iters=1), x)
    g = torch.randn(2, 32)
    with torch.no_grad():
        batch = model(x, guidance=g)
        ks = model.last_num_clusters[:, 0]
        assert ks.unique().numel() >= 3          # several groups really ran
        for i in range(len(x)):
            alone = model(x[i:i + 1], guidance=g)
            assert model.last_num_clusters[0, 0] == ks[i]
            assert torch.allclose(alone, batch[i:i + 1], atol=1e-5)
    # also with mass-weighted pooling, where padding must not leak into the mean
    model = _warm_stats(tiny_model(budget_jitter=0.0, global_pool="avg", class_token=False), x)
    with torch.no_grad():
        batch = model(x)
        for i in range(len(x)):
            assert torch.allclose(model(x[i:i + 1]), batch[i:i + 1], atol=1e-5)


def test_mixed_k_costs_the_mean_of_each_image_no_padding():
    x = textured_and_flat()
    model = _warm_stats(tiny_model(budget_jitter=0.0), x)
    mixed = profile(model, x)["gmacs"]
    alone = sum(profile(model, x[i:i + 1])["gmacs"] for i in range(len(x))) / len(x)
    assert abs(mixed - alone) / alone < 1e-9
    padded = tiny_model(budget_jitter=0.0, dynamic=False)   # every image at K_max
    padded.load_state_dict(model.state_dict())
    assert mixed < 0.95 * profile(padded, x)["gmacs"]


def test_fixed_k_and_nested_centroids():
    model = tiny_model(dynamic=False, k_max=12)
    with torch.no_grad():
        model(torch.randn(3, 3, 16, 16))
    assert (model.last_num_clusters == 12).all()
    dtc = model.dtc["0"]
    dtc.fixed_k = 6
    z = torch.randn(2, 16, 32)
    s, m, a, _, mu = dtc(z, torch.ones(2, 16), 6)
    assert s.shape == (2, 6, 32) and a.shape == (2, 16, 6)
    assert torch.equal(mu, dtc.centroids[:6])                # cluster k is the same row for every K
    assert torch.allclose(m.sum(1), torch.full((2,), 16.0))  # assignment conserves the patch count


def test_running_statistics_update_only_in_training():
    model = tiny_model()
    dtc = model.dtc["0"]
    x = textured_and_flat()
    model.eval()
    with torch.no_grad():
        model(x)
    assert not bool(dtc.stats_seen) and dtc.c_mean.item() == 0.0
    model.train()
    with torch.no_grad():
        model(x)
    m1 = dtc.c_mean.item()
    assert bool(dtc.stats_seen) and m1 > 0
    with torch.no_grad():
        model(x * 3)
    assert dtc.c_mean.item() > m1                            # momentum update towards the new batch
    model.eval()
    m2 = dtc.c_mean.item()
    with torch.no_grad():
        model(x * 10)
    assert dtc.c_mean.item() == m2


def test_token_budget_by_mean_k_and_by_gmacs():
    x = textured_and_flat(8, 8)
    model = _warm_stats(tiny_model(budget_jitter=0.0, k_step=1), x)
    model.set_token_budget(x, mean_k=7)
    with torch.no_grad():
        model(x)
    assert abs(model.last_num_clusters.float().mean().item() - 7) <= 0.5
    base = profile(model, x)["gmacs"]
    target = base * 1.3
    model.set_token_budget(x, gmacs=target)
    assert abs(profile(model, x)["gmacs"] - target) / target < 0.05
    with pytest.raises(ValueError, match="outside"):
        model.set_token_budget(x, mean_k=100)
    with pytest.raises(ValueError, match="exactly one"):
        model.set_token_budget(x, mean_k=6, gmacs=1.0)
    fixed = tiny_model(dynamic=False, k_step=2)
    fixed.set_token_budget(x, mean_k=9.2)
    assert fixed.dtc["0"].fixed_k == 10


def test_gmacs_budget_on_the_small_224_model():
    model = timm.create_model("adaptivision_small_patch16_224").eval()
    x = torch.randn(2, 3, 224, 224)
    model.set_token_budget(x, gmacs=2.5)
    assert abs(profile(model, x)["gmacs"] - 2.5) / 2.5 < 0.05


def test_kmeans_pp_init_gives_every_cluster_mass_on_real_images():
    imgs = read_fmnist(32).float().div(255).sub(0.286).div(0.353).unsqueeze(1)  # (32, 1, 28, 28)
    model = timm.create_model("adaptivision_tiny_patch2_28", dynamic=False).eval()
    with torch.no_grad():
        model(imgs)
        dtc = model.dtc["0"]
        z = model._pos_embed(model.patch_embed(imgs))[:, 1:]
        _, m, _, _, _ = dtc(z, torch.ones(z.shape[:2]), dtc.k_max)           # (32, 196)
    # mass summed over the batch: every one of the 196 clusters receives a share of real patches
    assert m.sum(0).min() > 0.5, m.sum(0).min()


def test_multi_stage_condensation_and_unpooling():
    model = tiny_model(condense_at=[0, 2], k_min=[8, 2], k_max=[16, 8], budget_jitter=0.0)
    x = textured_and_flat()
    _warm_stats(model, x)
    with torch.no_grad():
        logits = model(x)
        final, maps = model.forward_intermediates(x, indices=[0, 1, 3])
    assert torch.isfinite(logits).all()
    k = model.last_num_clusters
    assert (k[:, 1] <= k[:, 0]).all() and (k[:, 1] <= 8).all()
    assert [t.shape for t in maps] == [(6, 32, 4, 4)] * 3


def test_skip_unpooling_by_hand():
    """unpool='skip': Z_rec = Z_pre + A (S - S_0), stage by stage, the last stage first."""
    from adaptivision.layers.tokens import Group, unpool
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(1, 4, 3, generator=g), torch.randn(1, 2, 3, generator=g)   # tokens before each stage
    s0, s1 = torch.randn(1, 2, 3, generator=g), torch.randn(1, 1, 3, generator=g)   # super-tokens right after
    a0 = torch.tensor([[[1., 0.], [1., 0.], [0., 1.], [0., 1.]]])                    # 4 patches -> 2 clusters
    a1 = torch.tensor([[[1.], [1.]]])                                                # 2 -> 1
    x = torch.cat([torch.full((1, 1, 3), 7.0), torch.randn(1, 1, 3, generator=g)], 1)  # [CLS] + 1 token
    grp = Group(torch.arange(1), x, None, (a0, a1), skips=((z0, s0), (z1, s1)))
    out = unpool(grp, "skip", num_prefix=1)                                          # (1, 1+4, 3)
    level1 = z1 + (x[:, 1:] - s1)                                                    # both stage-1 tokens
    want = z0 + a0 @ (level1 - s0)
    assert torch.allclose(out[:, 1:], want) and torch.equal(out[:, :1], x[:, :1])
    # the two patches of cluster 0 share the update but keep their own features
    assert torch.allclose(out[0, 1] - out[0, 2], z0[0, 0] - z0[0, 1])


@pytest.mark.parametrize("unpool", ["assign", "skip"])
def test_skip_unpooling_keeps_each_patch_distinct(unpool):
    """Hard clusters unpooled by A alone give every patch of a cluster the same features;
    the skip from the pre-condensation tokens keeps them apart (sharper dense outputs)."""
    model = tiny_model(clustering="image", unpool=unpool, dynamic=False, k_max=4, afa=False, cmtf=False).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        grid = model.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC")[0]
    distinct = torch.unique(grid[0].round(decimals=4), dim=0).shape[0]                # (16 patches)
    assert distinct == (4 if unpool == "assign" else 16), distinct


def test_skip_unpooling_per_image_with_two_stages_and_dynamic_k():
    """The second stage splits one group into several K: each image's map equals the one it
    gets alone (the first stage's records must follow the rows of each K group)."""
    model = tiny_model(condense_at=[0, 2], k_min=[8, 2], k_max=[8, 8], k_step=2, budget_jitter=0.0,
                       unpool="skip", clustering="image")
    x = textured_and_flat()
    _warm_stats(model, x)
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=[3], intermediates_only=True)[0]   # (6, 32, 4, 4)
        assert len(torch.unique(model.last_num_clusters[:, 1])) > 1    # really several groups
        for i in (0, 5):
            alone = model.forward_intermediates(x[i:i + 1], indices=[3], intermediates_only=True)[0]
            assert torch.allclose(maps[i:i + 1], alone, atol=1e-5)


def test_unpooling_is_exact_with_one_cluster_per_patch():
    """With K = N and a tiny tau each patch is its own cluster, so Z_rec = A S = Z."""
    model = tiny_model(dynamic=False, k_min=16, k_max=16, tau=1e-4, afa=False, cmtf=False).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(x))[:, 1:]                  # (2, 16, 32)
        model.dtc["0"].init_centroids(tokens[0])                                 # centroids = image 0's tokens
        a = model.forward_tokens(x[:1], last=0).groups[0].assign[0]              # (1, 16, 16)
        assert torch.allclose(a.sum(-1), torch.ones(1, 16))
        s, _ = __import__("adaptivision").layers.condense(tokens[:1], a, torch.ones(1, 16))
        assert torch.allclose(a @ s, tokens[:1], atol=1e-5)


def test_cluster_loss_does_not_collapse_with_detached_tokens():
    """Minimising L_cluster alone: with gradient into the tokens the embedding collapses onto
    the centroids (loss -> ~0); with detach_tokens it can only move the centroids and stays
    bounded by the spread of the tokens."""
    x = torch.randn(16, 3, 16, 16)
    finals = {}
    for detach in (True, False):
        torch.manual_seed(0)
        model = tiny_model(dynamic=False, k_max=4, k_min=4, afa=False, cmtf=False)
        crit = AdaptiVisionLoss(lambda_cluster=1.0, detach_tokens=detach)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        first = None
        for _ in range(100):
            _, aux = model(x, return_aux=True)
            loss = crit(torch.zeros(16, 5, requires_grad=True), torch.zeros(16, dtype=torch.long), aux)["cluster"]
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        finals[detach] = loss.item() / first
    assert finals[False] < 0.2, finals       # collapse is real without detaching ...
    assert finals[True] > 0.5, finals        # ... and prevented with it


def test_saliency_complexity_is_the_weighted_variance():
    dtc = DynamicTokenClustering(8, k_min=2, k_max=4, complexity="saliency", assign_norm=False)
    z, w = torch.randn(2, 5, 8), torch.tensor([[0.0, 0, 1, 1, 0], [1, 1, 1, 1, 1]])
    c = dtc.complexity_score(z, w)
    assert torch.allclose(c[0], z[0, 2:4].var(0, unbiased=False).mean())  # only the salient patches count
    assert torch.allclose(c[1], z[1].var(0, unbiased=False).mean())


def test_without_guidance_cmtf_is_skipped_and_with_it_cmtf_acts():
    x = textured_and_flat()
    with_cmtf = _warm_stats(tiny_model(budget_jitter=0.0, gate="paper"), x)
    without = tiny_model(budget_jitter=0.0, cmtf=False).eval()
    missing, unexpected = without.load_state_dict(with_cmtf.state_dict(), strict=False)
    assert not missing and all(k.startswith("cmtf.") for k in unexpected)
    with torch.no_grad():
        assert torch.equal(with_cmtf(x), without(x))
        # the paper gate adds sigmoid(.) > 0 to every token, so guidance visibly changes the output
        assert not torch.allclose(with_cmtf(x, guidance=torch.randn(3, 32)), without(x))


def test_sharp_tau_leaves_empty_clusters_without_nan_gradients():
    # tau = 1 (Table 4's sharpest) assigns hard: some clusters get exactly zero mass, and the
    # proportional-attention bias log(mass) must not turn that into a NaN gradient
    imgs = read_fmnist(16).float().div(255).sub(0.286).div(0.353).unsqueeze(1)
    model = timm.create_model("adaptivision_nano_patch4_28", tau=1.0, num_classes=10, clustering="paper", condense_at=0)
    with torch.no_grad():
        model.init_clusters(imgs)
        _, m, _, _, _ = model.dtc["0"](model._pos_embed(model.patch_embed(imgs))[:, 1:], torch.ones(16, 49), 40)
    assert (m == 0).any()  # the situation is real: empty clusters
    model(imgs).logsumexp(-1).mean().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, bad


def test_one_224_checkpoint_serves_the_default_and_an_aggressive_budget():
    model = timm.create_model("adaptivision_small_patch16_224").eval()
    dtc = model.dtc["0"]
    assert (dtc.k_min, dtc.k_mid, dtc.k_max) == (32, 128, 196)
    x = torch.randn(2, 3, 224, 224)
    assert profile(model, x)["mean_k"] == [128.0]          # an average image sits at k_mid
    model.set_token_budget(x, gmacs=1.3)
    assert abs(profile(model, x)["gmacs"] - 1.3) / 1.3 < 0.05
    with pytest.raises(ValueError, match="out of this model's reach"):
        model.set_token_budget(x, gmacs=0.2)
    with pytest.raises(ValueError, match="k_mid"):
        timm.create_model("adaptivision_tiny_patch16_224", k_min=64, k_mid=40)


@pytest.mark.parametrize("clustering", ["paper", "image"])
def test_a_nan_image_leaves_the_complexity_statistics_finite(clustering):
    """One non-finite image in a training batch is left out of the running statistics, so later
    images still get K from their own complexity (not the same K for all, for good)."""
    x = textured_and_flat()
    model = tiny_model(budget_jitter=0.0, clustering=clustering, cmtf=False).train()
    with torch.no_grad():
        model(x)
        bad = x.clone()
        bad[0] = float("nan")
        model(bad)
    dtc = model.dtc["0"]
    assert torch.isfinite(dtc.c_mean) and torch.isfinite(dtc.c_var)
    with torch.no_grad():
        model.eval()(x)
    assert model.last_num_clusters[:, 0].unique().numel() > 1


def test_init_clusters_ignores_a_nan_image_and_names_all_nan_input():
    model = tiny_model(cmtf=False)
    x = torch.randn(4, 3, 16, 16)
    x[1] = float("nan")
    model.init_clusters(x)
    assert torch.isfinite(model.dtc["0"].centroids).all() and bool(model.dtc["0"].initialized)
    with pytest.raises(ValueError, match="finite tokens"):
        model.init_clusters(torch.full((2, 3, 16, 16), float("nan")))


def test_batch_k_in_training_is_the_mean_of_the_per_image_ks_and_inference_stays_per_image():
    x = textured_and_flat()                      # 3 textured, then 3 flat images
    per_image = _warm_stats(tiny_model(budget_jitter=0.0, train_k="image"), x)
    batch = tiny_model(budget_jitter=0.0)                                # the default: train_k='batch'
    assert batch.dtc["0"].train_k == "batch"
    batch.load_state_dict(per_image.state_dict())
    with torch.no_grad():
        per_image.train()(x)
        k_img = per_image.last_num_clusters[:, 0].clone()
        batch.train()(x)
        k_batch = batch.last_num_clusters[:, 0].clone()
    assert k_img.unique().numel() > 1, k_img     # the case needs images with different K
    step = batch.dtc["0"].k_step
    expected = int(torch.round(k_img.float().mean() / step) * step)
    assert (k_batch == expected).all(), (k_batch, k_img)
    with torch.no_grad():                        # inference: per-image K again, the same as 'image'
        out_batch, out_img = batch.eval()(x), per_image.eval()(x)
    assert torch.equal(batch.last_num_clusters, per_image.last_num_clusters)
    assert torch.allclose(out_batch, out_img)
    with pytest.raises(ValueError, match="train_k"):
        tiny_model(train_k="per-batch")


def test_cheapest_split_by_hand():
    # lengths 17/25/33 for 12/30/22 images: {17, 25} + {33} processes 42*25 + 22*33 = 1776 tokens,
    # {17} + {25, 33} 12*17 + 52*33 = 1920, all in one 64*33 = 2112
    assert _cheapest_split([17, 25, 33], [12, 30, 22], 2) == [0, 2, 3]
    assert _cheapest_split([17, 25, 33], [12, 30, 22], 1) == [0, 3]
    assert _cheapest_split([17, 25, 33], [12, 30, 22], 5) == [0, 1, 2, 3]
    assert _cheapest_split([17, 25, 33], [40, 1, 1], 2) == [0, 1, 3]     # 40*17 + 2*33 < 41*25 + 33


@pytest.mark.parametrize("extra", [dict(), dict(global_pool="avg", class_token=False, cmtf=False),
                                   dict(condense_at=[0, 2], k_min=[8, 2], k_max=[16, 8])])
def test_padded_groups_give_each_image_its_own_output(extra):
    """max_groups runs several K as one batch padded with masked slots: the same logits and
    features (zero on padding), at most that many batches, and the padding counted in the MACs."""
    x = textured_and_flat(6, 2)
    model = _warm_stats(tiny_model(budget_jitter=0.0, **extra), x)
    perturb_zero_init(model)
    kw = dict(guidance=torch.randn(2, 32)) if len(model.cmtf) else {}
    with torch.no_grad():
        ref = model.forward_tokens(x, **kw)
        logits = model(x, **kw)
        assert len(ref.groups) >= 3                                           # several K really ran
        gmacs = profile(model, x, **kw)["gmacs"]
        for g in (1, 2):
            model.opts.max_groups = g
            out = model.forward_tokens(x, **kw)
            assert len(out.groups) <= g
            assert torch.equal(out.num_clusters, ref.num_clusters)
            assert torch.allclose(out.features, ref.features, atol=1e-5)      # padding slots are 0 in both
            assert torch.equal(out.mass, ref.mass)
            assert torch.allclose(model(x, **kw), logits, atol=1e-5)
            assert profile(model, x, **kw)["gmacs"] > gmacs                    # the padding is paid for
        model.opts.max_groups = None


def test_padded_groups_in_training_give_the_same_gradients():
    x = textured_and_flat(6, 2)
    ref = _warm_stats(tiny_model(budget_jitter=0.0, train_k="image", cmtf=False), x)
    perturb_zero_init(ref)
    padded = copy.deepcopy(ref)
    padded.opts.max_groups = 1
    grads = []
    for model in (ref, padded):
        model.train()
        model(x).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-5), n


def test_max_groups_must_be_a_positive_integer():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="max_groups"):
            tiny_model(max_groups=bad)


def _with_pad_k(model, k):
    for st in model.dtc.values():
        st.pad_k = k
    return model


@pytest.mark.parametrize("clustering", ["paper", "image-soft"])
def test_pad_k_gives_each_image_its_own_k_in_one_batch(clustering):
    """pad_k: every image condensed into pad_k slots, its own K of them in use, as one batch: the
    same logits as one group per K, and an image above pad_k gets what K = pad_k gives it."""
    x = textured_and_flat(6, 2)
    model = _warm_stats(tiny_model(budget_jitter=0.0, clustering=clustering, cmtf=False), x)
    perturb_zero_init(model)
    with torch.no_grad():
        ref = model.forward_tokens(x)
        logits = model(x)
        ks = ref.num_clusters[:, 0]
        assert len(ref.groups) >= 3                                           # several K really ran
        out = _with_pad_k(model, 16).forward_tokens(x)
        assert len(out.groups) == 1 and out.features.shape[1] == 1 + 16
        assert torch.equal(out.num_clusters, ref.num_clusters)
        assert torch.allclose(model(x), logits, atol=1e-5)
        cap = int(ks.float().median())                                        # some images above it
        capped = _with_pad_k(model, cap)(x)
        assert torch.equal(model.last_num_clusters[:, 0], ks.clamp_max(cap))
        below = ks <= cap
        assert 0 < int(below.sum()) < len(ks)
        assert torch.allclose(capped[below], logits[below], atol=1e-5)
        for st in _with_pad_k(model, None).dtc.values():                      # K = cap for every image
            st.dynamic, st.fixed_k = False, cap
        assert torch.allclose(capped[~below], model(x[~below]), atol=1e-5)


def test_pad_k_compiles_per_image_k_as_one_graph():
    """No host sync: per-image K compiles without a graph break (fixed K did before; per-image K
    groups cannot), and gives the eager logits."""
    x = textured_and_flat(6, 2)
    model = _warm_stats(tiny_model(budget_jitter=0.0, clustering="image-soft", cmtf=False, pad_k=16), x).eval()
    with torch.no_grad():
        ref = model(x)
        assert model.last_num_clusters.unique().numel() > 1
        out = torch.compile(model, backend="eager", fullgraph=True)(x)      # fails on any graph break
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(pad_k=3), dict(pad_k=17), dict(pad_k=8.0), dict(pad_k=True),
                                 dict(pad_k=8, condense_at=[0, 2], k_min=[8, 2], k_max=[16, 8]),
                                 dict(pad_k=8, clustering="image-soft", centers="grid")])
def test_an_impossible_pad_k_is_refused(bad):
    with pytest.raises(ValueError, match="pad_k"):
        tiny_model(cmtf=False, **bad)


def test_assign_grad_false_pools_with_constant_weights():
    """assign_grad=False: the same super-tokens, but the gradient reaches the tokens only through
    eq. 3's weighted mean, as if the assignment were a given (Hourglass's and ToMe's way); the
    default sends it through eq. 2 as well. Learned centroids (they learn through it) are refused."""
    torch.manual_seed(0)
    z = torch.randn(2, 9, 8)
    mass, r = torch.ones(2, 9), torch.randn(2, 4, 8)
    kw = dict(k_min=2, k_max=4, tau=1000.0, iters=2, centers="fps")  # a soft assignment: its gradient shows
    outs = {}
    for flag in (True, False):
        zg = z.clone().requires_grad_(True)
        s, _, a, _, _ = DynamicTokenClustering(8, assign_grad=flag, **kw)(zg, mass, 4)
        (s * r).sum().backward()
        outs[flag] = s.detach(), a.detach(), zg.grad
    torch.testing.assert_close(outs[True][0], outs[False][0])
    zg = z.clone().requires_grad_(True)  # by hand: eq. 3 with the assignment held fixed
    w = outs[True][1]
    by_hand = torch.einsum("bnk,bnd->bkd", w, zg) / w.sum(1).unsqueeze(-1)
    (by_hand * r).sum().backward()
    torch.testing.assert_close(outs[False][2], zg.grad)
    assert (outs[True][2] - zg.grad).abs().max() > 1e-4  # the default's gradient also moves the assignment
    with pytest.raises(ValueError, match="assign_grad"):
        DynamicTokenClustering(8, k_min=2, k_max=4, centers="learned", assign_grad=False)
    with pytest.raises(ValueError, match="assign_grad"):
        timm.create_model("adaptivision_nano_patch4_28", clustering="paper", assign_grad=False)
    model = timm.create_model("adaptivision_nano_patch4_28", assign_grad=False, num_classes=3)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_infer_k_step_rounds_per_image_k_at_inference_only():
    """K = k_min + (k_max - k_min) * sigmoid(score + bias0), rounded to k_step in training and to
    infer_k_step at inference (the nano default: batch K on the grid of 4, per-image K on the grid of 8)."""
    import math
    dtc = DynamicTokenClustering(8, k_min=16, k_max=49, k_mid=20, k_step=4, infer_k_step=8)
    score = torch.tensor([-1.0, -0.5, 0.3, 0.6, 1.5, 2.5])
    raw = [16 + 33 / (1 + math.exp(-(s + math.log(4 / 29)))) for s in score.tolist()]
    # by hand: on the grid of 4, 16 20 20 24 28 36; on the grid of 8, 16 16 24 24 32 40
    assert [round(r, 2) for r in raw] == [17.59, 18.55, 21.18, 22.63, 28.61, 36.69]
    dtc.train()
    assert dtc.k_from_score(score, 0.0).tolist() == [16, 20, 20, 24, 28, 36]
    dtc.eval()                                   # no statistics yet: the training grid (k_mid stays 20)
    assert dtc.k_from_score(score, 0.0).tolist() == [16, 20, 20, 24, 28, 36]
    dtc.stats_seen.fill_(True)
    assert dtc.k_from_score(score, 0.0).tolist() == [16, 16, 24, 24, 32, 40]
    dtc.infer_k_step = None                      # unset: inference on k_step's grid too
    assert dtc.k_from_score(score, 0.0).tolist() == [16, 20, 20, 24, 28, 36]
    with pytest.raises(ValueError, match="infer_k_step"):
        DynamicTokenClustering(8, k_min=16, k_max=49, infer_k_step=0)
    # through the model (per-image K in training too): inference on the grid of 4, training on k_step's of 1
    x = textured_and_flat()
    model = _warm_stats(tiny_model(budget_jitter=0.0, train_k="image", k_step=1, infer_k_step=4), x)
    with torch.no_grad():
        model(x)
    assert (model.last_num_clusters % 4 == 0).all()
    with torch.no_grad():
        model.train()(x)
    assert (model.last_num_clusters % 4 != 0).any(), model.last_num_clusters
