"""Per-image clustering (``clustering='image'``): farthest-point centres, hard assignment with a
straight-through gradient, k-means steps; and the K = N case, where it must be the dense ViT."""
import os

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import adaptivision
from adaptivision.config import CLUSTERING
from adaptivision.layers import DynamicTokenClustering
from adaptivision.layers.dtc import assign, condense, farthest_points
from conftest import benchmark_script, perturb_zero_init, tiny_model


def _every_parameter_gets_gradient(model, x) -> None:
    """Backward through ``model(x)``; every parameter must receive a nonzero gradient."""
    model(x).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def _each_image_alone_gives_its_batch_output(model, x) -> None:
    """In eval mode, images of mixed K give alone what they give in the batch."""
    model.eval()
    with torch.no_grad():
        batch = model(x)
        assert model.last_num_clusters.unique().numel() > 1
        for i in range(x.shape[0]):
            assert torch.allclose(model(x[i:i + 1]), batch[i:i + 1], atol=1e-5)


def test_farthest_points_by_hand():
    # mean (2.75, 1.25): (10, 0) is farthest from it; then (0, 5) is farthest from (10, 0)
    # (125 vs 100, 81); then (1, 0): min distance 26 to {(10,0), (0,5)} beats (0,0)'s 25
    z = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 5.0]]])
    assert farthest_points(z, 4).tolist() == [[2, 3, 1, 0]]
    assert farthest_points(z, 2).tolist() == [[2, 3]]  # nested: a prefix is the seeding for fewer


def test_farthest_points_are_per_image():
    z = torch.randn(3, 10, 4)
    idx = farthest_points(z, 5)
    for b in range(3):
        assert torch.equal(idx[b], farthest_points(z[b:b + 1], 5)[0])
    assert all(len(set(row)) == 5 for row in idx.tolist())  # distinct tokens: no centre twice


def test_hard_assignment_is_one_hot_forward_and_soft_backward():
    z = torch.tensor([[[0.0, 0.0], [0.2, 0.0], [4.0, 4.0]]], requires_grad=True)
    mu = torch.tensor([[0.0, 0.0], [4.0, 4.0]])
    a = assign(z, mu, tau=1.0, hard=True)
    assert torch.equal(a.detach(), torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]))
    s, m = condense(z, a, torch.ones(1, 3))
    # super-token 0 is the plain mean of tokens 0 and 1; masses are patch counts
    assert torch.allclose(s[0, 0], torch.tensor([0.1, 0.0])) and torch.equal(m, torch.tensor([[2.0, 1.0]]))
    # straight-through: the gradient is eq. 2's softmax gradient
    (a[..., 1] * torch.arange(3.0)).sum().backward()
    z_soft = z.detach().clone().requires_grad_(True)
    (assign(z_soft, mu, tau=1.0, hard=False)[..., 1] * torch.arange(3.0)).sum().backward()
    assert z.grad.abs().sum() > 0 and torch.allclose(z.grad, z_soft.grad)


def test_per_image_centres_are_tokens_of_the_image_and_no_slot_starts_empty():
    dtc = DynamicTokenClustering(8, k_min=2, k_max=6, k_step=1, centers="fps", hard=True, iters=0, assign_norm=False)
    z = torch.randn(4, 12, 8)
    s, m, a, zs, mu = dtc(z, torch.ones(4, 12), 6)
    assert mu.shape == (4, 6, 8)
    for b in range(4):  # each centre is one of the image's own tokens
        assert all((zs[b] - c).abs().sum(-1).min() == 0 for c in mu[b])
    assert (m >= 1).all(), m  # every slot holds at least its own centre's patch
    assert torch.allclose(m.sum(1), torch.full((4,), 12.0))
    assert dtc.centroids is None and not list(dtc.parameters())


def test_kmeans_steps_reduce_the_within_cluster_distance():
    z = torch.randn(2, 40, 8)
    costs = []
    for iters in (0, 1, 3):
        dtc = DynamicTokenClustering(8, k_min=2, k_max=8, centers="fps", hard=True, iters=iters, assign_norm=False)
        _, _, a, zs, mu = dtc(z, torch.ones(2, 40), 8)
        centre = torch.einsum("bnk,bnd->bkd", a, zs) / a.sum(1).unsqueeze(-1)  # the super-token in z space
        costs.append((a * torch.cdist(zs, centre).pow(2)).sum().item())
    assert costs[0] > costs[1] >= costs[2] - 1e-4, costs


def test_clustering_presets_and_overrides():
    m = tiny_model(clustering="image")
    d = m.dtc["0"]
    assert (d.centers, d.hard, d.iters) == ("fps", True, 2)
    assert CLUSTERING["image"] == dict(centers="fps", assign="hard", iters=2, tau=150.0)
    assert "dtc.0.centroids" not in dict(m.named_parameters())
    d = tiny_model(clustering="image", assign="soft", iters=0).dtc["0"]
    assert (d.centers, d.hard, d.iters) == ("fps", False, 0)
    d = tiny_model(clustering="paper").dtc["0"]
    assert (d.centers, d.hard, d.iters) == ("learned", False, 0) and d.centroids is not None
    with pytest.raises(ValueError, match="clustering"):
        tiny_model(clustering="images")
    with pytest.raises(ValueError, match="entropy"):
        tiny_model(clustering="image", complexity="entropy")


def test_the_default_is_soft_image_clustering_at_tau_20():
    """The measured best from scratch (docs/results.md): each image's own centres, soft
    assignment at tau 20, two k-means steps; an explicit tau still wins over the preset's."""
    import timm
    d = timm.create_model("adaptivision_nano_patch4_28").dtc["2"]  # the nano model condenses after block 2
    assert (d.centers, d.hard, d.iters, d.tau) == ("fps", False, 2, 20.0) and d.centroids is None
    assert timm.create_model("adaptivision_nano_patch4_28", tau=50.0).dtc["2"].tau == 50.0
    assert tiny_model(clustering="paper").dtc["0"].tau == 150.0
    with pytest.raises(ValueError, match="'tau'"):
        tiny_model(tau=0.0)


def test_run_identity_follows_what_the_defaults_mean(monkeypatch):
    """Changing a live default must not reuse runs made under the old one: a DTC cell that
    relies on the default is identified by the preset it resolves to."""
    from adaptivision.config import ModelOptions
    from adaptivision.experiments.runner import _non_default
    assert _non_default({"reduction": "dtc", "clustering": "paper", "train_k": "image"}) == {}  # as first recorded
    # the training K likewise: the default became 'batch' after per-image-K runs were recorded
    assert _non_default({"reduction": "dtc"}) == {"clustering": "image-soft", "tau": 20.0, "train_k": "batch"}
    assert _non_default({"reduction": "dtc", "train_k": "image"}) == {"clustering": "image-soft", "tau": 20.0}
    assert _non_default({"reduction": "tome"}) == {"reduction": "tome"}
    monkeypatch.setattr(ModelOptions, "train_k", "image")  # what identities meant before the change
    assert _non_default({"reduction": "dtc"}) == {"clustering": "image-soft", "tau": 20.0}
    # and a model's own stage defaults: the nano model condenses after block 2, named (and built) at K 24 as
    # its cells' runs were recorded, though the live default moved to K 20 on a grid of 4
    nano = "adaptivision_nano_patch4_28"
    assert _non_default({"reduction": "dtc"}, nano) == {"clustering": "image-soft", "tau": 20.0,
                                                        "condense_at": 2, "k_mid": 24}
    assert timm.create_model(nano).dtc["2"].k_mid == 20
    assert _non_default({"reduction": "dtc", "condense_at": 0}, nano) == {"clustering": "image-soft", "tau": 20.0}
    assert _non_default({"reduction": "tome"}, nano) == {"reduction": "tome"}


def test_nano_default_is_the_measured_after_block_2_model():
    """The nano default (registry.DTC_STAGE_DEFAULTS and ModelOptions) is the model that `dtc-plateau` and
    `dtc-prop-attn` measured as '..., after block 2, K 20, batch K, no budget jitter, no proportional
    attention': the same resolved options and stage; only inference puts each image's K on the grid of 8
    (infer_k_step), which the measured cell leaves at its training grid of 4."""
    from adaptivision.experiments.registry import LEVER_CELLS
    cell = LEVER_CELLS[50]
    assert "after block 2, K 20" in cell.label
    default = timm.create_model("adaptivision_nano_patch4_28")
    measured = timm.create_model("adaptivision_nano_patch4_28", **cell.kwargs)
    keys = ("condense_at", "centers", "assign", "iters", "tau", "train_k", "afa", "stages", "k_step",
            "budget_jitter", "prop_attn")
    assert {k: getattr(default.opts, k) for k in keys} == {k: getattr(measured.opts, k) for k in keys}
    assert [(s.block, s.k_min, s.k_mid, s.k_max) for s in default.opts.stages] == [(2, 16, 20, 49)]
    assert default.opts.k_step == 4 and default.opts.infer_k_step == 8 and measured.opts.infer_k_step is None
    # a caller that sets where to condense, or another input size, gets no stage defaults (the old
    # default, before block 0); the model's own size, as `adaptivision benchmark --img-size 28` passes it, keeps them
    def blocks(**kw):
        return [s.block for s in timm.create_model("adaptivision_nano_patch4_28", **kw).opts.stages]
    assert blocks(condense_at=0) == [0] and blocks(img_size=56) == [0] and blocks(depth=4) == [0]
    assert blocks(img_size=28) == blocks(img_size=(28, 28)) == blocks(patch_size=4) == [2]


def test_every_parameter_gets_gradient_with_image_clustering():
    model = tiny_model(clustering="image", cmtf=False)
    with torch.no_grad():  # AFA's v starts at 0: give it a value so that u gets gradient too
        for n, p in model.named_parameters():
            if "fc_v" in n:
                p.normal_(0, 0.02)
    _every_parameter_gets_gradient(model, torch.randn(4, 3, 16, 16))


def test_an_image_gives_the_same_output_alone_or_in_a_batch_with_image_clustering():
    x = torch.randn(5, 3, 16, 16) * torch.linspace(0.1, 3, 5).view(5, 1, 1, 1)
    model = tiny_model(clustering="image", cmtf=False, budget_jitter=0.0)
    model.train()
    with torch.no_grad():
        model(x)  # complexity statistics
    _each_image_alone_gives_its_batch_output(model, x)


def test_k_equal_to_n_reproduces_the_dense_vit():
    """K = N with per-image hard clustering: every patch is its own cluster (mass 1, log-mass bias 0),
    so a ViT's weights give the ViT's own logits (attention does not depend on token order)."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=3,
                            num_heads=2).eval()
    x = torch.randn(3, 3, 16, 16)
    model = adaptivision.from_timm(vit, x, clustering="image", dynamic=False, k_max=16, afa=False, cmtf=False)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), vit(x), atol=1e-5)
        assert torch.equal(model.last_num_clusters, torch.full((3, 1), 16))


def test_profile_counts_the_farthest_point_distances():
    x = torch.randn(2, 3, 16, 16)
    paper = tiny_model(clustering="paper", dynamic=False, k_max=8, k_min=8, afa=False, cmtf=False).eval()
    image = tiny_model(clustering="image", iters=0, dynamic=False, k_max=8, k_min=8, afa=False, cmtf=False).eval()
    image.load_state_dict(paper.state_dict(), strict=False)
    diff = adaptivision.profile(image, x)["gmacs"] - adaptivision.profile(paper, x)["gmacs"]
    assert diff * 1e9 == pytest.approx(16 * 16 * 32)  # N x N x D per image, nothing else differs


def _tiny_run(tmp_path, name: str, model_kwargs: str, depth: int = 3) -> tuple:
    """A 1-epoch run of a tiny nano-shaped model on a 64-image fixture: (its directory, the data)."""
    from adaptivision.cli import main
    from fixtures import make_fmnist
    data = make_fmnist(str(tmp_path / "fm"), n_train=64, n_test=32)
    assert main(["train", "--data-dir", data, "--output", str(tmp_path), "--name", name, "--epochs", "1",
                 "workers=0", "batch_size=16", "throughput_batch=8", "compare_dense=false",
                 f"model_kwargs={{embed_dim: 32, depth: {depth}, num_heads: 2, {model_kwargs}}}"]) == 0
    return str(tmp_path / name), data


def test_off_the_shelf_benchmark_smoke(tmp_path):
    """CI's short version of benchmarks/off_the_shelf.py: a tiny dense run, then every variant."""
    import json

    run, _ = _tiny_run(tmp_path, "dense", "condense_at: false, afa: false, cmtf: false", depth=4)  # 2 stages: 1, 3
    mod = benchmark_script("off_the_shelf")
    out = tmp_path / "res"
    assert mod.main(["--run", run, "--limit", "32", "--calib", "16", "--out", str(out)]) == 0
    rows = {r["label"]: r for r in json.loads((out / "off-the-shelf.json").read_text())["runs"][run]}
    dense = rows["dense"]
    full = rows["fps, hard, 2 iters, K=49"]  # K = N: the dense model's own predictions
    assert full["top1"] == dense["top1"] and full["gmacs"] > dense["gmacs"]
    assert rows["fps, hard, 2 iters, K=16"]["gmacs"] < rows["fps, hard, 2 iters, K=32"]["gmacs"] < dense["gmacs"]
    two = [rows[f"fps, hard, 2 iters, two stages after blocks 1 and 3, K={k}"]["gmacs"] for k in ("32/16", "40/24")]
    assert two[0] < two[1] < dense["gmacs"]  # each stage's K is applied
    ks = rows["fps, hard, 2 iters, two stages after blocks 1 and 3, K=32/16"]["mean_k"]
    assert ks == pytest.approx([32, 16])  # both stages' K, as the label says
    assert "| 32.0 / 16.0 |" in (out / "off-the-shelf.md").read_text()
    assert "| dense |" in (out / "off-the-shelf.md").read_text()

    # --append: a second dense model joins the record; the first keeps its rows (its weights may be gone)
    other, _ = _tiny_run(tmp_path, "dense-b", "condense_at: false, afa: false, cmtf: false", depth=4)
    os.remove(os.path.join(run, "last.safetensors"))
    assert mod.main(["--run", other, "--limit", "32", "--calib", "16", "--out", str(out), "--append",
                     "--only", "K=49"]) == 0
    rec = json.loads((out / "off-the-shelf.json").read_text())
    assert list(rec["runs"]) == [run, other] and rec["runs"][run] == list(rows.values())
    assert [r["label"] for r in rec["runs"][other]] == ["fps, hard, 2 iters, K=49"] and rec["runs"][other][0]["commit"]
    md = (out / "off-the-shelf.md").read_text()
    assert "2 dense model(s)" in md and "| dense (1 of 2 models) |" in md
    assert "| fps, hard, 2 iters, K=49 | 49.0 |" in md and " ± " in md.split("K=49 |")[1].split("\n")[0]
    (out / "off-the-shelf.json").write_text("[]")
    with pytest.raises(ValueError, match="not a record of this benchmark"):
        mod.main(["--run", other, "--out", str(out), "--append"])


def test_assign_at_inference_benchmark_smoke(tmp_path):
    """benchmarks/assign_at_inference.py on a tiny soft-trained DTC run: 'as trained' reproduces the
    run's own final top-1 and each variant really changes the stages; a dense run is refused."""
    import json

    run, _ = _tiny_run(tmp_path, "dtc", "condense_at: 1, cmtf: false")
    mod = benchmark_script("assign_at_inference")
    rows = {r["label"]: r for r in mod.evaluate_variants(run)}
    summary = json.loads((tmp_path / "dtc" / "summary.json").read_text())["rows"][0]
    trained = rows["as trained"]
    assert trained["top1"] == pytest.approx(summary["top1"], abs=0.01)
    assert (trained["hard"], trained["tau"]) == (False, 20.0)  # the default clustering: soft, tau 20
    assert rows["hard (nearest centre)"]["hard"] is True and rows["soft, tau 10"]["tau"] == 10.0
    out = tmp_path / "res"
    assert mod.main(["--run", run, "--out", str(out)]) == 0
    assert "| hard (nearest centre) |" in (out / "assign-at-inference.md").read_text()
    dense, _ = _tiny_run(tmp_path, "dense", "reduction: none")
    with pytest.raises(ValueError, match="not a DTC model"):
        mod.evaluate_variants(dense)


def test_the_paper_form_under_one_name():
    """adaptivision.PAPER_DTC builds DTC as the paper describes it whatever the live defaults:
    shared learned centroids, soft at tau 150, no k-means steps, per-image K in training, condensed
    right after the embedding; the experiments' paper cells are that configuration."""
    from adaptivision.experiments.registry import LEVER_CELLS
    m = timm.create_model("adaptivision_nano_patch4_28", **adaptivision.PAPER_DTC)
    d = m.dtc["0"]
    assert (d.centers, d.hard, d.iters, d.tau, d.train_k) == ("learned", False, 0, 150.0, "image")
    assert [s.block for s in m.opts.stages] == [0] and d.centroids is not None
    paper = [c for c in LEVER_CELLS if c.label.startswith("paper")]
    assert paper and all(adaptivision.PAPER_DTC.items() <= c.kwargs.items() for c in paper)


def test_runs_saved_before_the_nano_stage_moved_still_load(tmp_path):
    """A checkpoint of the nano model saved when it condensed before block 0 (its model.json
    says nothing of where) is rebuilt before block 0, with its own outputs; new runs write
    where they condense into model.json, so the next change of a default cannot break them."""
    import json

    from adaptivision.checkpoint import save_weights
    from adaptivision.train.build import load_for_eval, model_spec
    from adaptivision.train.config import TrainConfig
    old = timm.create_model("adaptivision_nano_patch4_28", num_classes=10, condense_at=0, prop_attn=True).eval()  # as then
    save_weights(old, str(tmp_path / "last.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps(dict(name="adaptivision_nano_patch4_28", num_classes=10,
                                                         kwargs={"cmtf": False})))
    model, _ = load_for_eval(str(tmp_path / "last.safetensors"))
    assert [s.block for s in model.opts.stages] == [0]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), old(x))
    spec = model_spec(TrainConfig(), 10, dense=False)
    assert (spec["kwargs"]["condense_at"], spec["kwargs"]["k_mid"], spec["kwargs"]["k_step"],
            spec["kwargs"]["infer_k_step"]) == (2, 20, 4, 8)
    assert "k_mid" not in model_spec(TrainConfig(), 10, dense=True)["kwargs"]
    # resuming that old run rebuilds it the same way (the checkpoint's stages win over today's default)
    assert model_spec(TrainConfig(), 10, dense=False, checkpoint=str(tmp_path / "last.safetensors"))["kwargs"][
        "condense_at"] == 0
    # and a run whose model.json wrote its stage out before the default moved to K 20 (K 24 on the grid of 8)
    # resumes as written: K 24, and k_step 8 (ModelOptions' default), not today's K 20 on a grid of 4
    k24 = tmp_path / "k24"
    k24.mkdir()
    save_weights(timm.create_model("adaptivision_nano_patch4_28", num_classes=10, condense_at=2, k_mid=24),
                 str(k24 / "last.safetensors"))
    (k24 / "model.json").write_text(json.dumps(dict(name="adaptivision_nano_patch4_28", num_classes=10,
                                                    kwargs={"cmtf": False, "condense_at": 2, "k_mid": 24})))
    resumed = model_spec(TrainConfig(), 10, dense=False, checkpoint=str(k24 / "last.safetensors"))["kwargs"]
    assert (resumed["condense_at"], resumed["k_mid"], resumed.get("k_step")) == (2, 24, None)
    assert timm.create_model("adaptivision_nano_patch4_28", **resumed).dtc["2"].k_step == 8
    # a K 20 run saved before inference moved to the grid of 8 (2026-11-28) evaluates on its grid of 4, as recorded
    k20 = tmp_path / "k20"
    k20.mkdir()
    save_weights(timm.create_model("adaptivision_nano_patch4_28", num_classes=10), str(k20 / "last.safetensors"))
    (k20 / "model.json").write_text(json.dumps(dict(name="adaptivision_nano_patch4_28", num_classes=10, kwargs={
        "cmtf": False, "condense_at": 2, "k_mid": 20, "k_step": 4})))
    stage = load_for_eval(str(k20 / "last.safetensors"))[0].dtc["2"]
    assert (stage.k_mid, stage.k_step, stage.infer_k_step) == (20, 4, None)


def test_padded_groups_benchmark_smoke(tmp_path, capsys):
    """CI's short version of benchmarks/padded_groups.py on a tiny default job (dense + DTC): the
    padded executions reproduce the per-K top-1, run as at most G batches and count their padding."""
    import json

    from adaptivision.cli import main
    from fixtures import make_fmnist
    data = make_fmnist(str(tmp_path / "fm"), n_train=64, n_test=32)
    assert main(["train", "--data-dir", data, "--output", str(tmp_path), "--name", "job", "--epochs", "1",
                 "workers=0", "batch_size=16", "throughput_batch=8",
                 "model_kwargs={embed_dim: 32, depth: 3, num_heads: 2, condense_at: 1, cmtf: false}"]) == 0
    mod = benchmark_script("padded_groups")
    out = tmp_path / "res" / "padded"
    assert mod.main(["--run", str(tmp_path / "job"), "--batch-size", "16", "--groups", "1,2", "--rounds", "2",
                     "--infer-k-step", "16", "--out", str(out)]) == 0
    rec = json.loads(out.with_suffix(".json").read_text())
    top1 = {r["label"]: r["top1"] for r in rec["rows"]}
    timing = {r["label"]: t for r, t in zip(rec["rows"], rec["timing"]["16"], strict=True)}
    per_k = "per-image K, one batch per K"
    for g in (1, 2):
        label = f"per-image K, max_groups={g}"
        assert top1[label] == top1[per_k]
        assert timing[label]["groups"] <= g and timing[label]["gmacs"] >= timing[per_k]["gmacs"]
    assert timing["dense ViT (same run)"]["speedup"] == 1.0
    # a coarser grid at inference (K 8-24 in steps of 8 here; on the grid of 16 at most two K): fewer groups
    assert 1 <= timing["per-image K, infer_k_step=16"]["groups"] <= min(2, timing[per_k]["groups"])
    assert "| per-image K, max_groups=1 |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="dense"):
        mod.main(["--run", str(tmp_path / "job" / "dense")])
    # the same model's top-1 on other inference grids (benchmarks/infer_grid.py): its own grid (k_step 8) is the
    # per-K row above; `adaptivision eval --infer-k-step` gives the same figures
    grid = benchmark_script("infer_grid")
    ck = str(tmp_path / "job" / "last.safetensors")
    assert grid.main(["--checkpoint", ck, "--grid", "8", "--grid", "16", "--out", str(tmp_path / "res" / "grid")]) == 0
    rows = json.loads((tmp_path / "res" / "grid.json").read_text())["checkpoints"][0]["rows"]
    assert [r["grid"] for r in rows] == [8, 16] and rows[0]["top1"] == top1[per_k]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", ck, "--infer-k-step", "16"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["top1"] == rows[1]["top1"] and res["mean_k"][0] == pytest.approx(rows[1]["mean_k"])
    assert main(["eval", "--checkpoint", str(tmp_path / "job" / "dense" / "last.safetensors"), "--infer-k-step", "8"]) == 2
    assert "no DTC stage" in capsys.readouterr().err


# --- the spatial term (spatial > 0): position in the distance, SLIC's compactness --------------------
def test_token_positions_by_hand():
    # 2x2 grid, raster order: (0,0) (0,1) (1,0) (1,1). Stage 1: cluster 0 = patches 0, 1 and half of 2;
    # cluster 1 = the other half of 2 and patch 3 -> masses 2.5, 1.5; positions
    # ((0,0)+(0,1)+0.5(1,0))/2.5 = (0.2, 0.4) and (0.5(1,0)+(1,1))/1.5 = (1, 2/3). Stage 2 merges both,
    # weighted by mass: (2.5(0.2,0.4) + 1.5(1,2/3))/4 = (0.5, 0.5), the grid's centre (mass is conserved)
    from adaptivision.layers.dtc import token_positions
    grid = token_positions((2, 2), (), torch.device("cpu"))
    assert grid.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    a1 = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]])           # (1, 4, 2)
    assert torch.allclose(token_positions((2, 2), (a1,), torch.device("cpu")),
                          torch.tensor([[[0.2, 0.4], [1.0, 2 / 3]]]))
    a2 = torch.ones(1, 2, 1)
    assert torch.allclose(token_positions((2, 2), (a1, a2), torch.device("cpu")), torch.tensor([[[0.5, 0.5]]]))


def test_place_adds_the_slic_term_to_every_distance():
    # squared distance grows by spatial * REF_WIDTH * |dp|^2 / S^2 with S^2 = N / k_ref: here
    # 0.5 * 384 * |dp|^2 * 10 / 16 (k_ref = mid-range (4 + 16) / 2 = 10, N = 16 patches)
    from adaptivision.layers.dtc import REF_WIDTH, token_positions
    layer = DynamicTokenClustering(8, k_min=4, k_max=16, centers="fps", spatial=0.5)
    zs = layer.assignment_space(torch.randn(1, 16, 8))                              # (1, 16, 8)
    pos = token_positions((4, 4), (), zs.device)                                     # (16, 2)
    placed = layer.place(zs, pos)                                                    # (1, 16, 10)
    assert placed.shape == (1, 16, 10) and torch.equal(placed[..., :8], zs)
    extra = torch.cdist(placed, placed).pow(2) - torch.cdist(zs, zs).pow(2)
    expected = 0.5 * REF_WIDTH * torch.cdist(pos, pos).pow(2) * 10 / 16
    assert torch.allclose(extra[0], expected, rtol=1e-4, atol=1e-2)
    assert torch.equal(DynamicTokenClustering(8, k_min=4, k_max=16, centers="fps").place(zs, pos), zs)  # off: as is
    with pytest.raises(ValueError, match="spatial > 0 clusters by position"):
        layer(torch.randn(1, 16, 8), torch.ones(1, 16), 4)  # the bare layer cannot guess the positions


def _spatial_spread(model, x) -> float:
    """Mean squared distance (in patches) of each patch from its cluster's position, assignment-weighted."""
    from adaptivision.layers.dtc import token_positions
    with torch.no_grad():
        out = model.forward_tokens(x, dense=True)
    total = 0.0
    for grp in out.groups:
        a = grp.assign[0]                                                            # (b, N, K)
        pos = token_positions((4, 4), (), x.device)                                  # (N, 2)
        centre = token_positions((4, 4), (a,), x.device)                             # (b, K, 2)
        d2 = (pos[None, :, None] - centre[:, None]).pow(2).sum(-1)                    # (b, N, K)
        total += float((a * d2).sum() / a.sum())
    return total / len(out.groups)


def test_a_spatial_weight_makes_clusters_compact_and_trains():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    spreads = {}
    for spatial in (0.0, 50.0):
        torch.manual_seed(1)
        model = tiny_model(clustering="image", cmtf=False, spatial=spatial, dynamic=False, k_max=4).eval()
        spreads[spatial] = _spatial_spread(model, x)
    # 16 patches in 4 clusters: 2x2 blocks would give 0.5; features alone scatter clusters over the grid
    assert spreads[50.0] < 0.75 < spreads[0.0], spreads
    model = tiny_model(clustering="image-soft", cmtf=False, spatial=1.0, condense_at=[0, 2], k_min=[8, 2],
                       k_max=[16, 8])
    perturb = [p for n, p in model.named_parameters() if "fc_v" in n]
    with torch.no_grad():
        for p in perturb:
            p.normal_(0, 0.02)
    _every_parameter_gets_gradient(model, torch.randn(4, 3, 16, 16))  # two stages: the second places by mass


@pytest.mark.parametrize("bad", [dict(spatial=-1.0), dict(spatial=1.0, clustering="paper")])
def test_an_impossible_spatial_weight_is_refused(bad):
    with pytest.raises(ValueError, match="spatial"):
        tiny_model(cmtf=False, **bad)


# --- grid centres (centers='grid'): each grid cell's mean token, then k-means --------------------
def test_grid_centres_by_hand():
    from adaptivision.layers.dtc import grid_centers, grid_shape
    assert [grid_shape(k, 7, 7) for k in (16, 24, 49, 7)] == [(4, 4), (4, 6), (7, 7), (1, 7)]
    assert grid_shape(8, 2, 8) == (1, 8)  # the patch grid's aspect: 2 rows of 8 -> 1 x 8 cells
    # a 4x4 grid of scalar tokens 0..15 in raster order; 4 cells of 2x2: means 2.5, 4.5, 10.5, 12.5
    zs = torch.arange(16.0).view(1, 16, 1)
    assert grid_centers(zs, 4, (4, 4)).view(-1).tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(ValueError, match="first DTC stage"):
        grid_centers(zs[:, :9], 4, (4, 4))


def test_grid_centres_train_and_give_each_image_its_own_output():
    model = tiny_model(clustering="image-soft", centers="grid", cmtf=False, spatial=0.5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "fc_v" in n:
                p.normal_(0, 0.02)
    x = torch.randn(5, 3, 16, 16) * torch.linspace(0.1, 3, 5).view(5, 1, 1, 1)
    _every_parameter_gets_gradient(model, x)
    _each_image_alone_gives_its_batch_output(model, x)
    with pytest.raises(ValueError, match="one stage"):
        tiny_model(centers="grid", cmtf=False, condense_at=[0, 2], k_min=[8, 2], k_max=[16, 8])


def test_a_window_keeps_each_patch_on_its_own_part_of_the_grid():
    """window (Hourglass's local clustering): after the k-means steps a patch still has weight only on
    centres within window // 2 cells of its own; a window wider than the grid is every centre (the
    model without it); a model with it trains and its images do not depend on their batch-mates."""
    from adaptivision.layers.dtc import DynamicTokenClustering, window_mask
    torch.manual_seed(0)
    z, mass = torch.randn(3, 36, 16), torch.ones(3, 36)                              # a 6 x 6 patch grid
    kw = dict(k_min=4, k_max=9, tau=20.0, iters=3, centers="grid")
    local = DynamicTokenClustering(16, window=1, **kw)
    _, _, a, _, _ = local(z, mass, 9, grid=(6, 6))                                     # (3, 36, 9) on a 3 x 3 grid
    assert (a[:, ~window_mask(9, (6, 6), 1, "cpu")] == 0).all()                      # only the patch's own cell
    assert torch.allclose(a.sum(-1), torch.ones(3, 36))
    _, _, a3, _, _ = DynamicTokenClustering(16, window=3, **kw)(z, mass, 9, grid=(6, 6))
    assert (a3[:, 0, [2, 5, 6, 7, 8]] == 0).all() and (a3[:, 0, [0, 1, 3, 4]] > 0).all()  # corner patch: 2 x 2 cells
    s_wide = DynamicTokenClustering(16, window=5, **kw)(z, mass, 9, grid=(6, 6))[0]
    s_none = DynamicTokenClustering(16, **kw)(z, mass, 9, grid=(6, 6))[0]
    assert torch.equal(s_wide, s_none) and not torch.allclose(local(z, mass, 9, grid=(6, 6))[0], s_none)
    model = tiny_model(clustering="image-soft", centers="grid", window=3, iters=5, afa=False, cmtf=False)
    x = torch.randn(5, 3, 16, 16) * torch.linspace(0.1, 3, 5).view(5, 1, 1, 1)
    _every_parameter_gets_gradient(model, x)
    _each_image_alone_gives_its_batch_output(model, x)
    assert "window=3" in repr(model.dtc["0"])


def test_dtc_with_hourglasss_options_is_hourglass():
    """Grid centres, a window of 5, one fixed K, no AFA, no gradient through the assignment and no
    proportional attention: DTC then computes Hourglass's token clustering (its iters=4 k-means steps
    after the first assignment are Hourglass's 5 assignments), so with the same weights both models
    give the same logits; proportional attention alone makes them differ."""
    torch.manual_seed(0)
    hg = tiny_model(img_size=32, reduction="hourglass", keep_ratio=0.25, reduce_at=1).eval()  # 8 x 8 patches -> 4 x 4
    kw = dict(clustering="image-soft", tau=20.0, condense_at=1, cmtf=False, afa=False, centers="grid", window=5,
              iters=4, dynamic=False, k_max=16, assign_grad=False)  # 4 x 4 cells: the window excludes some
    dt = tiny_model(img_size=32, prop_attn=False, **kw).eval()
    missing, unexpected = dt.load_state_dict(hg.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("dtc.") for k in missing)  # DTC's statistics only
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for p in hg.parameters():  # a trained-looking model: attention that is not uniform
            p.add_(torch.randn_like(p) * 0.1)
        dt.load_state_dict(hg.state_dict(), strict=False)
        assert torch.allclose(dt(x), hg(x), atol=1e-5)
        dt_prop = tiny_model(img_size=32, prop_attn=True, **kw).eval()
        dt_prop.load_state_dict(hg.state_dict(), strict=False)
        assert not torch.allclose(dt_prop(x), hg(x), atol=1e-3)


@pytest.mark.parametrize("bad", [dict(window=2, centers="grid"), dict(window=0, centers="grid"), dict(window=3),
                                 dict(window=True, centers="grid")])
def test_an_impossible_window_is_refused(bad):
    with pytest.raises(ValueError, match="window"):
        tiny_model(clustering="image-soft", cmtf=False, **bad)


def test_a_learned_temperature_is_eq2s_tau_and_trains():
    """learn_tau: the stage's tau is exp(log_tau): a model whose learned tau sits at 5 gives what a
    model built with tau = 5 gives; it gets gradient, and weight decay leaves it alone."""
    torch.manual_seed(0)
    learned = tiny_model(clustering="image-soft", cmtf=False, learn_tau=True)
    fixed = tiny_model(clustering="image-soft", cmtf=False, tau=5.0)
    with torch.no_grad():
        learned.dtc["0"].log_tau.fill_(torch.tensor(5.0).log())
    fixed.load_state_dict({k: v for k, v in learned.state_dict().items() if not k.endswith("log_tau")})
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(learned.eval()(x), fixed.eval()(x), atol=1e-5)
        fixed.dtc["0"].tau = 500.0  # another model at any init (at 5 and 20 random tokens may both assign hard)
        assert not torch.allclose(learned(x), fixed(x), atol=1e-3)
    perturb_zero_init(learned)                                                # AFA's v starts at 0
    _every_parameter_gets_gradient(learned.train(), x)
    assert "dtc.0.log_tau" in learned.no_weight_decay()


def test_the_saliency_block_is_timms_block_plus_cls_attention_by_hand():
    """The block before a keep_salient stage: timm's Block's tokens, and [CLS]'s attention over the
    patches (softmax of q_cls . k / sqrt(d), heads averaged) computed here from the weights."""
    from timm.models.vision_transformer import Block

    from adaptivision.layers.tokens import Context, Group
    from adaptivision.reduction import SaliencyBlock, convert_block
    torch.manual_seed(0)
    blk = Block(dim=8, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(3, 1 + 6, 8)
    with torch.no_grad():
        expected = blk(x)
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(3, 7, 3, 2, 4)                    # (B, T, 3, H, d)
        q, k = qkv[:, :, 0], qkv[:, :, 1]                                          # (B, T, H, d)
        logits = torch.einsum("bhd,bthd->bht", q[:, 0], k) / 2.0                   # (B, H, T), sqrt(d) = 2
        by_hand = logits.softmax(-1)[:, :, 1:].mean(1)                             # (B, N)
        convert_block(blk, SaliencyBlock, num_prefix=1)
        grp = blk.forward_group(Group(torch.arange(3), x), Context(3, 1))
    assert torch.allclose(grp.x, expected, atol=1e-6)
    assert torch.allclose(grp.saliency, by_hand, atol=1e-6)


def test_keep_salient_passes_the_most_attended_patches_as_they_are():
    """keep_salient = n: super-tokens 0..n-1 are the n patches of highest saliency, unchanged and of
    mass 1, assigned one-hot; the other patches fill K - n clusters, as the stage clusters them
    without the kept ones; every patch's mass is accounted for."""
    from adaptivision.layers.tokens import Context, Group
    torch.manual_seed(0)
    model = tiny_model(clustering="image-soft", cmtf=False, condense_at=1, keep_salient=3, dynamic=False,
                       k_max=8).eval()
    stage = model.dtc["1"]
    x = torch.randn(2, 1 + 16, 32)
    sal = torch.rand(2, 16)
    top = sal.argsort(1, descending=True)[:, :3]                                   # (2, 3)

    def ctx():
        return Context(2, 1, grid=(4, 4), num_clusters=torch.zeros(2, 1, dtype=torch.long))
    with torch.no_grad():
        (out,) = stage.forward_groups([Group(torch.arange(2), x, saliency=sal)], ctx())
        z = x[:, 1:]
        assert out.x.shape == (2, 1 + 8, 32) and out.saliency is None
        assert torch.equal(out.x[:, 1:4], torch.stack([z[i, top[i]] for i in range(2)]))
        assert torch.equal(out.mass[:, 1:4], torch.ones(2, 3))
        a = out.assign[-1]                                                         # (2, 16, 8)
        assert torch.allclose(a.sum(-1), torch.ones(2, 16), atol=1e-5)          # each patch fully assigned
        assert torch.allclose(out.mass[:, 1:].sum(1), torch.full((2,), 16.0), atol=1e-4)
        for i in range(2):
            assert torch.equal(a[i, top[i], :3], torch.eye(3))
            rest = [j for j in range(16) if j not in top[i].tolist()]
            s, m, _, _, _ = stage(z[i:i + 1, rest], torch.ones(1, 13), 5)         # the rest alone, K - n = 5
            assert torch.allclose(out.x[i, 4:], s[0], atol=1e-5)
            assert torch.allclose(a[i, rest, 3:].sum(0), m[0], atol=1e-5)
        with pytest.raises(RuntimeError, match="SaliencyBlock"):
            stage.forward_groups([Group(torch.arange(2), x)], ctx())
        stage.fixed_k = 3                                                          # a budget below what is kept
        with pytest.raises(ValueError, match="no cluster beside the 3 salient"):
            stage.forward_groups([Group(torch.arange(2), x, saliency=sal)], ctx())


def test_a_keep_salient_model_trains_and_gives_each_image_its_own_output():
    model = tiny_model(clustering="image-soft", cmtf=False, condense_at=1, keep_salient=2, budget_jitter=0.0)
    assert type(model.blocks[0]).__name__ == "SaliencyBlock"
    perturb_zero_init(model)
    x = torch.randn(5, 3, 16, 16) * torch.linspace(0.1, 3, 5).view(5, 1, 1, 1)
    _every_parameter_gets_gradient(model.train(), x)
    _each_image_alone_gives_its_batch_output(model, x)
    with torch.no_grad():  # dense outputs: unpooled back to every patch
        assert model.forward_intermediates(x, intermediates_only=True)[-1].shape == (5, 32, 4, 4)


@pytest.mark.parametrize("bad, match", [
    (dict(condense_at=0, keep_salient=2), "after block 1"),
    (dict(condense_at=1, keep_salient=4), r"\[1, 4\)"),            # k_min = 4: no cluster left at K = 4
    (dict(condense_at=1, keep_salient=True), "keep_salient"),
    (dict(condense_at=1, keep_salient=2, centers="grid"), "grid"),
    (dict(condense_at=1, keep_salient=2, pad_k=8), "pad_k"),
    (dict(reduction="tome", keep_salient=2), "keep_salient"),
])
def test_an_impossible_keep_salient_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(clustering="image-soft", cmtf=False, **bad)


def test_full_tokens_is_the_same_weights_on_every_patch():
    """AdaptiVision.full_tokens (self_distill's teacher): the DTC stages are skipped, so without AFA
    a DTC model gives the timm ViT's logits with its weights; outside the context it condenses
    again. With AFA it needs slots for every patch (k_max = N)."""
    torch.manual_seed(0)
    model = tiny_model(clustering="image-soft", cmtf=False, afa=False, condense_at=1).eval()
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=4,
                            num_heads=2).eval()
    vit.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("dtc.")})  # buffers only
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        with model.full_tokens():
            assert torch.allclose(model(x), vit(x), atol=1e-5)
            assert model.last_num_clusters.eq(0).all()                          # no stage ran
        assert not torch.allclose(model(x), vit(x), atol=1e-3)
        assert model.last_num_clusters.gt(0).all()
    with pytest.raises(ValueError, match="k_max equal to the 16 patches"), tiny_model(k_max=8).full_tokens():
        pass
