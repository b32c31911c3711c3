"""Each numbered equation of the paper against a small case computed by hand."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block

from adaptivision import AdaptiVisionLoss, align_loss, cluster_loss
from adaptivision.layers import (
    CrossModalTokenFusion,
    condense,
    make_afa_block,
    modulation_matrix,
    soft_assign,
)
from adaptivision.objective import distill_loss


def test_eq2_assignment_by_hand():
    z = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])          # (1, 2, 2)
    mu = torch.tensor([[0.0, 0.0], [3.0, 0.0]])           # (2, 2)
    tau = 5.0
    a, d2 = soft_assign(z, mu, tau)
    # ||z-mu||^2: token0 -> (0, 9); token1 -> (25, 16)
    assert torch.allclose(d2, torch.tensor([[[0.0, 9.0], [25.0, 16.0]]]))
    e = [math.exp(-0 / 5), math.exp(-9 / 5)]
    f = [math.exp(-25 / 5), math.exp(-16 / 5)]
    expected = torch.tensor([[[e[0] / sum(e), e[1] / sum(e)], [f[0] / sum(f), f[1] / sum(f)]]])
    assert torch.allclose(a, expected, atol=1e-6)


def test_eq2_in_float32_under_autocast():
    z = torch.randn(2, 5, 8)
    mu = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = soft_assign(z.bfloat16(), mu, 10.0)
    assert a.dtype == torch.float32


def test_eq3_literal_sum_and_weighted_mean_by_hand():
    z = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]]])      # (1, 3, 2)
    a = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]]])    # (1, 3, 2)
    ones = torch.ones(1, 3)
    s, m = condense(z, a, ones, normalize=False)
    # s_0 = 1*(1,0) + .5*(0,2) + .25*(4,4) = (2, 2); s_1 = .5*(0,2) + .75*(4,4) = (3, 4)
    assert torch.allclose(s, torch.tensor([[[2.0, 2.0], [3.0, 4.0]]]))
    assert torch.allclose(m, torch.tensor([[1.75, 1.25]]))
    s, _ = condense(z, a, ones, normalize=True)
    assert torch.allclose(s, torch.tensor([[[2 / 1.75, 2 / 1.75], [3 / 1.25, 4 / 1.25]]]))
    # carried mass: a token that stands for 3 patches weighs 3 times as much
    s, m = condense(z, a, torch.tensor([[1.0, 1.0, 3.0]]), normalize=True)
    assert torch.allclose(m, torch.tensor([[2.25, 2.75]]))
    assert torch.allclose(s[0, 1], (0.5 * z[0, 1] + 0.75 * 3 * z[0, 2]) / 2.75)


def _afa_attention(dim=8, heads=2, tokens=5, rank=2):
    blk = make_afa_block(Block(dim, heads, qkv_bias=True), max_tokens=tokens + 2, rank=rank)
    with torch.no_grad():
        for p in blk.attn.modulator.parameters():
            p.normal_(0, 0.5)
    return blk


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
@pytest.mark.parametrize("grad", [True, False])
def test_eq6_afa_equals_explicit_modulated_softmax(impl, grad):
    torch.manual_seed(0)
    blk = _afa_attention()
    attn = blk.attn
    attn.impl = impl
    x = torch.randn(3, 5, 8)
    mass = torch.rand(3, 5) + 0.5
    bias = mass.log()[:, None, None, :]
    with torch.set_grad_enabled(grad):
        out = attn(x, bias, mass=mass)
    # explicit: softmax((Q K^T / sqrt(d)) ⊙ M + log m) V, M = 1 + sum_r u_r v_r^T
    B, T, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, T, 3, 2, 4).permute(2, 0, 3, 1, 4)
    u, w = attn.modulator(x, mass)
    M = modulation_matrix(u, w)                                             # (B, T, T)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(4) * M[:, None] + bias
    ref = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, 8)
    assert torch.allclose(out, attn.proj(ref), atol=1e-5)
    # eq. 5: G is the (mass-weighted) mean of the tokens
    g = (mass.unsqueeze(-1) * x).sum(1) / mass.sum(1, keepdim=True)
    h = attn.modulator.act(attn.modulator.fc1(g))
    assert torch.allclose(u, attn.modulator.fc_u(h).view(B, 2, 7)[..., :5], atol=1e-6)


def test_afa_starts_as_plain_attention():
    torch.manual_seed(0)
    blk = Block(8, 2, qkv_bias=True)
    plain = Attention(8, 2, qkv_bias=True)
    plain.load_state_dict(blk.attn.state_dict())
    make_afa_block(blk, max_tokens=6)
    x = torch.randn(2, 6, 8)
    assert torch.allclose(blk.attn(x), plain(x), atol=1e-6)


def test_eq7_post_norm_block():
    torch.manual_seed(0)
    blk = make_afa_block(Block(8, 2, qkv_bias=True), max_tokens=6, post_norm=True)
    x = torch.randn(2, 6, 8)
    h = blk.norm1(x + blk.attn(x))
    assert torch.allclose(blk(x), blk.norm2(h + blk.mlp(h)), atol=1e-6)


def test_eq9_cross_attention_by_hand():
    torch.manual_seed(0)
    cm = CrossModalTokenFusion(4, num_heads=1, gate="paper")
    s, g = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    q = cm.q(cm.norm(s))
    k, v = cm.kv(g).split(4, dim=-1)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v           # sqrt(d_k) = 2
    assert torch.allclose(cm.cross_attention(s, g), ref, atol=1e-6)


def test_eq10_paper_gate_and_gated_residual():
    torch.manual_seed(0)
    s, g = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    paper = CrossModalTokenFusion(8, num_heads=2, gate="paper")
    a = paper.cross_attention(s, g)
    assert torch.allclose(paper(s, g), s + torch.sigmoid(paper.w_g(a)), atol=1e-6)
    gated = CrossModalTokenFusion(8, num_heads=2, gate="gated")
    assert torch.equal(gated(s, g), s)                     # W_o = 0: starts as the identity
    with torch.no_grad():
        gated.w_o.weight.normal_()
    a = gated.cross_attention(s, g)
    assert torch.allclose(gated(s, g), s + torch.sigmoid(gated.w_g(a)) * gated.w_o(a), atol=1e-6)


def test_eq14_cluster_loss_by_hand():
    z = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])
    mu = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    a, _ = soft_assign(z, mu, 5.0)
    # sum_k a_ik ||z_i - mu_k||^2 with distances (0, 9) and (25, 16), mean over the 2 tokens
    expected = ((a[0, 0, 1] * 9) + (a[0, 1, 0] * 25 + a[0, 1, 1] * 16)) / 2
    assert torch.allclose(cluster_loss([(z, mu, 5.0)]), expected)
    # averaged over images and tokens across groups of different K
    z2 = torch.zeros(3, 2, 2)
    total = cluster_loss([(z, mu, 5.0), (z2, mu[:1], 5.0)])
    assert torch.allclose(total, expected * 2 / 8)


def test_eq14_detach_tokens_sends_gradient_only_to_centroids():
    z = torch.randn(2, 6, 4, requires_grad=True)
    mu = torch.randn(3, 4, requires_grad=True)
    cluster_loss([(z, mu, 2.0)], detach_tokens=True).backward()
    assert z.grad is None and mu.grad.abs().sum() > 0
    cluster_loss([(z, mu, 2.0)], detach_tokens=False).backward()
    assert z.grad.abs().sum() > 0


def test_eq15_infonce_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    T = 0.5
    # cosine similarities: z0.g0 = 1, z0.g1 = 1/sqrt2, z1.g0 = 0, z1.g1 = 1/sqrt2
    r = 1 / math.sqrt(2)
    l0 = -math.log(math.exp(1 / T) / (math.exp(1 / T) + math.exp(r / T)))
    l1 = -math.log(math.exp(r / T) / (math.exp(0) + math.exp(r / T)))
    assert abs(align_loss(z, g, T).item() - (l0 + l1) / 2) < 1e-6


def test_eq15_same_class_is_not_a_negative():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    g_class = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([0, 0, 1])
    T = 0.1
    loss = align_loss(z, g_class[ids], T, ids=ids)
    logits = F.normalize(z, dim=-1) @ g_class.t() / T                        # candidates: the 2 classes
    assert torch.allclose(loss, F.cross_entropy(logits, ids))


def test_eq15_pulls_matching_pairs_together():
    torch.manual_seed(0)
    z = torch.randn(6, 8, requires_grad=True)
    g = torch.randn(6, 8)
    opt = torch.optim.SGD([z], lr=0.5)
    before = F.cosine_similarity(z, g).mean().item()
    for _ in range(50):
        opt.zero_grad()
        align_loss(z, g, 0.1).backward()
        opt.step()
    assert F.cosine_similarity(z, g).mean().item() > before + 0.3
    sim = F.normalize(z, dim=-1) @ F.normalize(g, dim=-1).t()                   # (6, 6)
    assert torch.equal(sim.argmax(1), torch.arange(6))  # each image is now closest to its own pair


def test_eq12_total_is_the_weighted_sum_of_the_terms():
    torch.manual_seed(0)
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    z, mu = torch.randn(4, 5, 6), torch.randn(3, 6)
    aux = dict(cluster=[(z, mu, 10.0)], align=torch.randn(4, 7))
    g = torch.randn(4, 7)
    out = AdaptiVisionLoss(lambda_cluster=0.3, lambda_align=0.2, align_temperature=0.5)(
        logits, target, aux, guidance_targets=g, guidance_ids=target)
    ce = F.cross_entropy(logits, target)
    assert torch.allclose(out["ce"], ce)
    expected = ce + 0.3 * cluster_loss(aux["cluster"]) + 0.2 * align_loss(aux["align"], g, 0.5, target)
    assert torch.allclose(out["loss"], expected)
    with pytest.raises(ValueError, match="lambda_cluster"):
        AdaptiVisionLoss(lambda_cluster=-1)
    with pytest.raises(ValueError, match="guidance_targets"):
        AdaptiVisionLoss(lambda_align=1.0)(logits, target, aux)


def test_afa_chunked_inference_equals_one_piece(monkeypatch):
    torch.manual_seed(0)
    attn = _afa_attention().attn
    attn.impl = "explicit"
    x = torch.randn(7, 5, 8)
    mass = torch.rand(7, 5) + 0.5
    bias = mass.log()[:, None, None, :]
    with torch.no_grad():
        whole = attn(x, bias, mass=mass)
        monkeypatch.setattr(type(attn), "CHUNK_ELEMENTS", 2 * 2 * 5 * 5)  # 2 images per chunk, last one alone
        chunked = attn(x, bias, mass=mass)
    assert torch.allclose(chunked, whole, atol=1e-6)


def test_distillation_terms_by_hand():
    """'soft': tau^2 KL(softmax(t / tau) || softmax(s / tau)) averaged over images; 'hard': CE to the
    teacher's argmax; the task term becomes (1 - alpha) CE + alpha distill (not in the paper)."""
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    tau = 2.0

    def softmax(row, temp=tau):
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]
    kl = 0.0
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        p, q = softmax(srow), softmax(trow)
        kl += sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q, strict=True))
    assert distill_loss(s, t, tau, "soft").item() == pytest.approx(kl / 2 * tau * tau, rel=1e-5)
    hard = (-math.log(softmax(s[0].tolist(), 1.0)[0]) - math.log(softmax(s[1].tolist(), 1.0)[1])) / 2  # argmax t: 0, 1
    assert distill_loss(s, t, kind="hard").item() == pytest.approx(hard, rel=1e-5)
    assert distill_loss(t, t, tau).item() == pytest.approx(0.0, abs=1e-6)  # the teacher itself: nothing to learn
    y = torch.tensor([2, 0])
    crit = AdaptiVisionLoss(distill_weight=0.25, distill_tau=tau)
    out = crit(s, y, teacher_logits=t)
    assert out["loss"].item() == pytest.approx(0.75 * F.cross_entropy(s, y).item() + 0.25 * kl / 2 * tau * tau,
                                               rel=1e-5)
    with pytest.raises(ValueError, match="teacher_logits"):
        crit(s, y)
    with pytest.raises(ValueError, match="distill_kind"):
        distill_loss(s, t, kind="medium")
