"""The baselines of DESIGN.md §4 (``reduction=``): each removes the tokens it says it does, keeps
what must be kept, and trains."""
import math

import pytest
import torch
from timm.models.vision_transformer import Block

from adaptivision.layers.tokens import Context, Group
from adaptivision.reduction import (
    EViTBlock,
    ImportanceStage,
    ToFeBlock,
    ToFeStage,
    bipartite_soft_matching,
    convert_block,
    fuse_inattentive,
    policy_attention,
)
from conftest import tiny_model

BASELINES = ["random", "importance", "evit", "tome", "hourglass", "hired", "tofe"]


def _tokens_per_block(model, x):
    """Token count entering every block (eval mode)."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return seen


def test_tome_merges_r_per_block_and_preserves_size_weighted_means():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4)                                                        # [CLS] + 8 patches
    mass = torch.rand(2, 9) + 0.5
    merge = bipartite_soft_matching(torch.randn(2, 9, 3), r=3, num_prefix=1)
    new_mass = merge(mass.unsqueeze(-1)).squeeze(-1)
    y = merge(x * mass.unsqueeze(-1)) / new_mass.unsqueeze(-1)
    assert y.shape == (2, 6, 4)
    assert torch.allclose(y[:, 0], x[:, 0]) and torch.equal(new_mass[:, 0], mass[:, 0])  # [CLS] untouched, first
    # total mass and mass-weighted sum of the tokens are conserved by merging
    assert torch.allclose(new_mass.sum(1), mass.sum(1))
    assert torch.allclose((y * new_mass.unsqueeze(-1)).sum(1), (x * mass.unsqueeze(-1)).sum(1), atol=1e-5)


def test_tome_merges_the_most_similar_pair_by_hand():
    # patches 1..4 (even positions are set A: 2, 4; odd are set B: 1, 3); token 4 == token 1
    metric = torch.tensor([[[0., 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0.01, 0]]])
    x = torch.arange(5.).view(1, 5, 1)
    mass = torch.ones(1, 5, 1)
    merge = bipartite_soft_matching(metric, r=1, num_prefix=1)
    y = merge(x * mass) / merge(mass)
    # set A unmerged (CLS 0, token 2), then set B (token 1 merged with 4 -> 2.5, token 3)
    assert y.flatten().tolist() == [0.0, 2.0, 2.5, 3.0]


def test_tome_without_a_prefix_keeps_the_reference_order():
    """No class token: the reference leaves the kept A tokens in the order of their best match
    (not re-sorted by position). A = tokens 0, 2, 4; B = 1, 3, 5."""
    metric = torch.tensor([[[1., 0, 0], [0, 1, 0], [0.6, 0.8, 0], [0, 0, 1], [0, 0.5, 0.87], [0.9, 0, 0.44]]])
    x = torch.arange(6.).view(1, 6, 1)
    merge = bipartite_soft_matching(metric, r=1, num_prefix=0)
    # best matches: A0-B5 0.9, A2-B1 0.8, A4-B3 0.87 -> A0 merges into B5; kept A by score: 4, 2
    assert merge(x, reduce="mean").flatten().tolist() == [4.0, 2.0, 1.0, 3.0, 2.5]


def test_tome_keeps_several_prefix_tokens_in_front_in_their_order():
    """[CLS] + distillation token (positions 0 and 1): never merged, and still first and second
    after a merge (the reference's distill_token path), not among the patches."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 4)
    for P in (2, 3):
        merge = bipartite_soft_matching(torch.randn(2, 12, 3), r=3, num_prefix=P)
        y = merge(x, reduce="mean")
        assert y.shape == (2, 9, 4) and torch.equal(y[:, :P], x[:, :P])


def test_tome_avg_pool_is_timms_plain_mean():
    model = tiny_model(reduction="tome", tome_r=2, class_token=False, global_pool="avg").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model.forward_tokens(x)
        feats = out.features                                                       # (2, 16 - 4*2, 32)
        assert feats.shape[1] == 8 and out.mass is not None
        pooled = model.forward_head(feats, pre_logits=True, mass=out.mass)
        assert torch.allclose(pooled, model.fc_norm(feats.mean(1)), atol=1e-6)


def test_evit_fused_token_is_the_attention_weighted_mean_of_the_dropped():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 4)                                                        # [CLS] + 6 patches
    attn = torch.rand(2, 6)
    y, mass, keep_idx, drop_idx = fuse_inattentive(x, torch.ones(2, 7), attn, keep=4)
    assert y.shape == (2, 6, 4) and mass[:, -1].tolist() == [2.0, 2.0]
    for b in range(2):
        order = attn[b].argsort(descending=True)
        assert set(keep_idx[b].tolist()) == set(order[:4].tolist())
        d = order[4:]
        w = attn[b, d]
        expected = (x[b, 1 + d] * w[:, None]).sum(0) / w.sum()
        assert torch.allclose(y[b, -1], expected, atol=1e-6)
        assert torch.equal(y[b, 0], x[b, 0])


def test_evit_block_uses_the_cls_attention_of_its_own_heads():
    torch.manual_seed(0)
    blk = convert_block(Block(8, 2, qkv_bias=True), EViTBlock, keep_ratio=0.5, num_prefix=1)
    x = torch.randn(2, 9, 8)
    _, cls_attn = blk.attend(x, None)
    q, k, _ = blk.attn.qkv(x).reshape(2, 9, 3, 2, 4).permute(2, 0, 3, 1, 4)
    ref = ((q[:, :, 0:1] @ k.transpose(-1, -2)) / 2.0).softmax(-1)[:, :, 0, 1:].mean(1)
    assert torch.allclose(cls_attn, ref, atol=1e-6)
    y, mass, _ = blk(x)
    assert y.shape == (2, 1 + 4 + 1, 8) and torch.allclose(mass.sum(1), torch.full((2,), 9.0))


def test_dynamicvit_policy_masks_pruned_keys_and_keeps_the_gradient():
    torch.manual_seed(0)
    blk = Block(8, 2, qkv_bias=True)
    x = torch.randn(1, 5, 8)
    policy = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]], requires_grad=True)
    q, k, _ = blk.attn.qkv(x).reshape(1, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    out = policy_attention(blk.attn, x, policy)
    # same as plain attention over the kept keys only, for a kept query
    kept = [0, 1, 3]
    plain = torch.nn.functional.scaled_dot_product_attention(
        *(t[:, :, kept] for t in blk.attn.qkv(x).reshape(1, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)))
    ref = blk.attn.proj(plain.transpose(1, 2).reshape(1, 3, 8))
    assert torch.allclose(out[:, kept], ref, atol=1e-4)
    out.sum().backward()
    assert policy.grad is not None and policy.grad.abs().sum() > 0


def test_dynamicvit_stage_ratio_loss_and_topk():
    torch.manual_seed(0)
    stage = ImportanceStage(16, keep_ratio=0.5, stage=1)
    z = torch.randn(3, 10, 16)
    keep, loss = stage.train_policy(z, torch.ones(3, 10))
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(loss, (keep.mean(1) - 0.25).pow(2).mean())  # stage 1: target 0.5 ** 2
    idx = stage.keep_index(z)
    assert idx.shape == (3, 5) and (idx.diff(dim=1) > 0).all()


@pytest.mark.parametrize("reduction", BASELINES)
def test_tokens_removed_as_specified(reduction):
    model = tiny_model(depth=4, reduction=reduction, keep_ratio=0.5, tome_r=3, img_size=32)  # 64 patches
    counts = _tokens_per_block(model, torch.randn(2, 3, 32, 32))
    expected = {
        "random": [1 + 32, 33, 33, 33],                       # before block 0 (condense_at)
        "importance": [65, 1 + 32, 1 + 16, 1 + 8],            # before blocks 1, 2, 3 of 4
        "evit": [65, 65, 1 + 32 + 1, 1 + 17 + 1],             # after attention of blocks 1, 2, 3
        "tome": [65, 62, 59, 56],                             # 3 per block
        "hourglass": [65, 1 + 36, 37, 37],                    # a 6 x 6 grid (round(sqrt(32))) before block 1
        "hired": [65, 65, 1 + 32, 33],                        # after attention of block 1
        "tofe": [65, 1 + 32, 1 + 16, 1 + 8],                  # active tokens of 64 before blocks 1, 2, 3
    }[reduction]
    assert counts == expected


@pytest.mark.parametrize("reduction", BASELINES)
def test_baselines_train_every_parameter_and_unpool(reduction):
    torch.manual_seed(0)
    model = tiny_model(reduction=reduction, keep_ratio=0.5, tome_r=2).train()
    x = torch.randn(4, 3, 16, 16)
    logits, aux = model(x, return_aux=True)
    loss = logits.square().mean() + (aux["reduction"] if aux["reduction"] is not None else 0)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches: {missing}"
    assert (aux["reduction"] is not None) == (reduction in ("importance", "tofe"))
    # dense outputs on the full grid, as for DTC
    model.eval()
    feats = model.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
    assert feats.shape == (4, model.embed_dim, 4, 4) and torch.isfinite(feats).all()


def test_tome_unpooling_copies_each_merged_token_to_its_patches():
    model = tiny_model(reduction="tome", tome_r=4).eval()
    x = torch.randn(2, 3, 16, 16)
    grid = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True, output_fmt="NLC")[0]
    tokens = model.forward_features(x)[:, 1:]        # 16 patches -> 12 -> 8 -> 4 -> 2 merged tokens
    assert tokens.shape[1] == 2
    for g, t in zip(grid, tokens, strict=True):     # every patch shows exactly the token it ended in
        dist = torch.cdist(g, t)                                                    # (16 patches, 2 tokens)
        assert (dist.min(1).values < 1e-4).all()
        assert len(dist.argmin(1).unique()) == 2     # and both tokens own patches


def test_baseline_options_are_checked():
    with pytest.raises(ValueError, match="reduction"):
        tiny_model(reduction="pruning")
    with pytest.raises(ValueError, match="afa"):
        tiny_model(reduction="tome", afa=True)
    with pytest.raises(ValueError, match="keep_ratio"):
        tiny_model(reduction="evit", keep_ratio=0.0)
    with pytest.raises(ValueError, match="reduce_at"):
        tiny_model(reduction="none", reduce_at=2)
    assert math.isclose(tiny_model(reduction="evit").opts.keep_ratio, 0.7)


def _block_inputs(model, x):
    """(args, kwargs) each block receives in one forward."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True) for b in model.blocks]
    model(x)
    for h in hooks:
        h.remove()
    return seen


def test_tome_blocks_attend_with_the_log_size_of_merged_tokens():
    model = tiny_model(reduction="tome", tome_r=3).eval()
    with torch.no_grad():
        seen = _block_inputs(model, torch.randn(2, 3, 16, 16))
    assert seen[0][0][1] is None                     # nothing merged yet: sizes all 1
    for args, kwargs in seen[1:]:                    # proportional attention: + log(size) on the keys
        x, bias = args
        assert bias.shape == (2, 1, 1, x.shape[1])
        assert torch.allclose(bias[:, 0, 0], kwargs["mass"].log())
        assert kwargs["mass"].max() > 1              # merged tokens stand for several patches


def test_dynamicvit_policy_reaches_every_later_attention_in_training():
    torch.manual_seed(0)
    model = tiny_model(reduction="importance", keep_ratio=0.5).train()
    seen = _block_inputs(model, torch.randn(4, 3, 16, 16))
    first = model.opts.reduce_blocks[0]
    assert all("policy" not in k for _, k in seen[:first])
    for (x, _), k in seen[first:]:
        assert k["policy"].shape == x.shape[:2] and (k["policy"][:, 0] == 1).all()  # [CLS] always kept
    assert (seen[-1][1]["policy"] == 0).any()        # something was pruned, yet all tokens are still there


def test_hourglass_window_mask_by_hand():
    """A 4 x 4 patch grid on a 2 x 2 centre grid: window 1 lets each patch join only the cell it
    starts in (its 2 x 2 quadrant); window 3 lets it join every centre."""
    from adaptivision.layers.dtc import window_mask
    m = window_mask(4, (4, 4), 1, "cpu")                                             # (16, 4)
    cell = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]).flatten()
    assert torch.equal(m, torch.nn.functional.one_hot(cell, 4).bool())
    assert window_mask(4, (4, 4), 3, "cpu").all()
    # a 4 x 6 patch grid on its 2 x 3 centre grid (K = 6, cells of 2 x 2 patches): window 3 lets a patch
    # of the top-left cell join the centres one cell away (0, 1, 3, 4) but not the far column (2, 5)
    m = window_mask(6, (4, 6), 3, "cpu")                                             # (24, 6)
    assert m[0].tolist() == [True, True, False, True, True, False]
    assert m[5].tolist() == [False, True, True, False, True, True]                   # top-right patch: cell 2
    assert torch.equal(window_mask(6, (4, 6), 1, "cpu"),
                       torch.nn.functional.one_hot(torch.tensor([[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2
                                                                ).flatten(), 6).bool())


def test_hourglass_clusters_start_as_the_grid_pool_and_move_to_their_content():
    from adaptivision.reduction.hourglass import cluster_grid
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, 8, generator=g)
    # no iteration (or a window of one cell): the super-tokens are the 2 x 2 quadrant means
    quads = z.view(1, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(1, 4, 4, 8).mean(2)  # (1, 4, 8)
    for iters, window in ((0, 5), (5, 1)):
        s, m, a = cluster_grid(z, 2, iters=iters, window=window)
        assert torch.allclose(s, quads, atol=1e-5) and torch.equal(m, torch.full((1, 4), 4.0))
    # content that does not follow the grid: column 0 is A, columns 1-3 are B; after local
    # k-means steps the column-1 patches leave the left cells for the pure-B right cells
    a_tok, b_tok = torch.randn(8, generator=g), torch.randn(8, generator=g)
    grid = torch.stack([a_tok if c == 0 else b_tok for r in range(4) for c in range(4)])[None]  # (1, 16, 8)
    grid = grid + 0.01 * torch.randn(grid.shape, generator=g)
    _, m, a = cluster_grid(grid, 2, iters=5, tau=20.0, window=3)
    col1 = [r * 4 + 1 for r in range(4)]
    right = a[0, col1][:, [1, 3]].sum(-1)                                          # weight on the right cells
    assert (right > 0.5).all(), right
    assert torch.allclose(m.sum(), torch.tensor(16.0)) and torch.allclose(a.sum(-1), torch.ones(1, 16))


def test_hourglass_reconstruction_gives_the_tokens_back_at_k_equal_n():
    from adaptivision.reduction.hourglass import reconstruction
    z = torch.randn(2, 9, 16)
    r = reconstruction(z, z.clone(), tau=0.01, top_k=3)                             # (2, 9, 9)
    assert torch.allclose(r, torch.eye(9).expand(2, -1, -1), atol=1e-5)
    assert torch.allclose(r @ z, z, atol=1e-5)
    r3 = reconstruction(z, z[:, :4], tau=1e4, top_k=3)                              # 3 of 4 kept, sum 1
    assert torch.equal((r3 > 0).sum(-1), torch.full((2, 9), 3)) and torch.allclose(r3.sum(-1), torch.ones(2, 9))


def test_hourglass_model_counts_its_clustering_and_keeps_a_square_grid():
    from adaptivision import profile
    dense = tiny_model(reduction="none", img_size=32)
    hg = tiny_model(reduction="hourglass", keep_ratio=0.25, img_size=32)         # 64 patches -> 4 x 4
    x = torch.randn(2, 3, 32, 32)
    logits = hg(x)
    assert logits.shape == (2, 5)
    d, h = profile(dense, x)["gmacs"], profile(hg, x)["gmacs"]
    assert h < d
    # the clustering's own MACs are counted: (2 * 5 iterations + 1) x N x K x D per image
    hg.reducer[str(hg.opts.reduce_blocks[0])].iters = 0
    assert profile(hg, x)["gmacs"] == pytest.approx(h - 10 * 64 * 16 * 32 / 1e9)
    with pytest.raises(ValueError, match="square"):
        tiny_model(reduction="hourglass", img_size=(16, 32))(torch.randn(1, 3, 16, 32))


def test_hired_splits_the_budget_over_quadrants_by_attention():
    """Largest remainders, capped at a partition's size: shares 0.4/0.3/0.2/0.1 of 8 tokens give
    3.2/2.4/1.6/0.8 -> 3/2/2/1; a partition asking for more than it holds passes the rest on."""
    from adaptivision.reduction.hired import partition_budget, quadrants
    sizes = torch.tensor([4, 4, 4, 4])
    b = partition_budget(torch.tensor([[0.4, 0.3, 0.2, 0.1]]), 8, sizes)
    assert b.tolist() == [[3, 2, 2, 1]]
    b = partition_budget(torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]]), 8, sizes)
    assert b[0, 0] == 4 and b.sum(1).tolist() == [8, 8] and b[1].tolist() == [2, 2, 2, 2]
    assert quadrants(16).view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    with pytest.raises(ValueError, match="square"):
        quadrants(12)


def test_hired_keeps_each_quadrants_most_attended_patches_in_order():
    from adaptivision.reduction.hired import hired_keep
    attn = torch.zeros(1, 16)
    attn[0, [0, 1, 4, 5]] = torch.tensor([0.25, 0.10, 0.15, 0.05])                  # quadrant 0: 0.55
    attn[0, 2], attn[0, 15] = 0.25, 0.20                                             # quadrants 1 and 3
    # quotas of 4 tokens: 2.2 / 1.0 / 0 / 0.8 -> budgets 2 / 1 / 0 / 1 (the 0.8 remainder wins)
    assert hired_keep(attn, 4).tolist() == [[0, 2, 4, 15]]                           # kept, in their order
    model = tiny_model(reduction="hired", keep_ratio=0.25, img_size=32).eval()      # 64 patches -> 16 kept
    feats = model.forward_intermediates(torch.randn(2, 3, 32, 32), indices=[3], intermediates_only=True)[0]
    assert feats.shape == (2, 32, 8, 8)


def _tofe_block(dim=8):
    torch.manual_seed(0)
    return convert_block(Block(dim, 2, qkv_bias=True), ToFeBlock).eval()


def test_tofe_block_runs_the_active_tokens_and_leaves_frozen_ones_as_they_were():
    blk = _tofe_block()
    x = torch.randn(2, 1 + 6, 8)                                    # [CLS] + 6 patches
    active = torch.tensor([[0, 2, 5], [1, 3, 4]])
    ctx = Context(batch=2, num_prefix=1)
    with torch.no_grad():
        out = blk.forward_group(Group(torch.arange(2), x, active=active), ctx).x
        for b in range(2):
            rows = [0] + [1 + int(i) for i in active[b]]           # [CLS] and the active patches
            want = Block.forward(blk, x[b:b + 1, rows])              # the block on those tokens alone
            assert torch.allclose(out[b, rows], want[0], atol=1e-6)
            frozen = [1 + i for i in range(6) if i not in active[b].tolist()]
            assert torch.equal(out[b, frozen], x[b, frozen])        # frozen: untouched
    # training: the same through the mask (frozen keys out of attention, frozen values kept)
    policy = torch.zeros(2, 6).scatter(1, active, 1.0)
    out_t = blk.forward_group(Group(torch.arange(2), x, policy=policy), ctx).x
    assert torch.allclose(out_t, out, atol=1e-4)


def test_tofe_stage_recovers_frozen_tokens_and_can_reuse_them():
    torch.manual_seed(0)
    stage = ToFeStage(8, keep_ratio=0.5, stage=1).eval()             # target 0.25 of 8 patches: 2 active
    z = torch.randn(1, 8, 8)
    prev = torch.tensor([[0, 1, 2, 3]])                              # active in the previous stage
    ctx = Context(batch=1, num_prefix=1)
    x = torch.cat([torch.zeros(1, 1, 8), z], 1)
    # scores: patch 6 (frozen before) best, then patch 1 (active before)
    prefer = torch.full((1, 8), -5.0)
    prefer[0, 6], prefer[0, 1] = 5.0, 4.0
    class Fixed(torch.nn.Module):  # the predictor's (keep, drop) log-probs, set by hand
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, t, policy):
            return torch.stack([prefer, -prefer], -1) * self.scale
    stage.predictor = Fixed(1.0)
    with torch.no_grad():
        grp = stage.forward_groups([Group(torch.arange(1), x, active=prev)], ctx)[0]
        assert grp.active.tolist() == [[1, 6]]                      # a frozen token is reused
        new = grp.x[:, 1:]
        assert torch.equal(new[:, :4], z[:, :4])                    # active ones were up to date
        assert torch.allclose(new[:, 4:], z[:, 4:] + stage.approx(z[:, 4:]))   # frozen: approximated
    # training: the budget term is (active fraction - target)^2 with hard 0/1 decisions
    stage.train()
    stage.predictor = Fixed(10.0)
    ctx = Context(batch=1, num_prefix=1)
    grp = stage.forward_groups([Group(torch.arange(1), x, policy=torch.zeros(1, 8).scatter(1, prev, 1.0))], ctx)[0]
    assert set(grp.policy.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(ctx.aux_losses[0], (grp.policy.mean() - 0.25) ** 2)
