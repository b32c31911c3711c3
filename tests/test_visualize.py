"""``adaptivision visualize`` writes valid PNGs of the partition and the AFA modulation."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from adaptivision.checkpoint import save_weights
from adaptivision.cli import main
from adaptivision.visualize import clustering
from conftest import benchmark_script, textured_and_flat, tiny_model
from fixtures import make_fmnist

PNG = b"\x89PNG\r\n\x1a\n"
SPEC = dict(name="adaptivision_nano_patch4_28", num_classes=10, kwargs=dict(embed_dim=32, depth=3, num_heads=2))


@pytest.fixture()
def checkpoint(tmp_path):
    model = timm.create_model(SPEC["name"], num_classes=10, **SPEC["kwargs"])
    model.init_clusters(torch.randn(4, 1, 28, 28))
    save_weights(model, str(tmp_path / "best.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps(SPEC))
    return str(tmp_path / "best.safetensors")


def test_partition_labels_and_modulation_by_hand():
    model = tiny_model(budget_jitter=0.0)
    x = textured_and_flat()
    with torch.no_grad():
        model.train()(x)  # complexity statistics
    infos = clustering(model, x, block=2)
    with torch.no_grad():
        model(x)
    ks = model.last_num_clusters[:, 0].tolist()
    for info, k in zip(infos, ks, strict=True):
        assert info["k"] == k and info["labels"].shape == (4, 4)
        assert info["labels"].max() < k and info["m"].shape == (k + 1, k + 1)
    # AFA starts as plain attention: M = 1 everywhere at initialisation
    assert all(np.allclose(info["m"], 1.0) for info in infos)
    with pytest.raises(ValueError, match="after the first condensation"):
        clustering(model, x, block=0)


def test_cli_writes_pngs_for_files_and_for_a_dataset(checkpoint, tmp_path, capsys):
    img = tmp_path / "shirt.png"
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype("uint8")).save(img)
    out = tmp_path / "pics"
    assert main(["visualize", "--checkpoint", checkpoint, str(img), "--out", str(out)]) == 0
    with open(out / "shirt.png", "rb") as f:
        assert f.read(8) == PNG
    data = make_fmnist(str(tmp_path / "fm"))
    assert main(["visualize", "--checkpoint", checkpoint, "--dataset", "fashion-mnist", "--data-dir", data,
                 "--num", "3", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "fashion-mnist-0000.png", "fashion-mnist-0001.png", "fashion-mnist-0002.png", "shirt.png"]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    capsys.readouterr()
    assert main(["visualize", "--checkpoint", checkpoint, str(bad), "--out", str(out)]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_assignment_stats_by_hand():
    """K = N hard: every patch its own cluster (top weight 1, effective K = N, no light slot); a huge
    tau: every patch spread evenly (top weight 1/K, effective K = K, each slot N/K patches)."""
    from adaptivision.visualize import assignment_stats
    x = textured_and_flat(2, 2)
    own = assignment_stats(tiny_model(clustering="image", dynamic=False, k_max=16, cmtf=False), x)
    assert own == pytest.approx(dict(top_weight=1.0, effective_k=16.0, light_slots=0.0, mean_k=16.0), abs=1e-4)
    blur = assignment_stats(tiny_model(clustering="image-soft", tau=1e9, dynamic=False, k_max=8, cmtf=False), x)
    assert blur == pytest.approx(dict(top_weight=1 / 8, effective_k=8.0, light_slots=0.0, mean_k=8.0), abs=1e-3)
    with pytest.raises(ValueError, match="no DTC stage"):
        assignment_stats(tiny_model(reduction="none"), x)


def test_assignment_stats_benchmark_smoke(checkpoint, tmp_path):
    import os
    run = tmp_path / "run"
    run.mkdir()
    os.rename(checkpoint, run / "last.safetensors")
    os.rename(tmp_path / "model.json", run / "model.json")
    mod = benchmark_script("assignment_stats")
    data = make_fmnist(str(tmp_path / "fm"), n_train=8, n_test=6)
    assert mod.main(["--run", str(run), "--num", "6", "--data-dir", data, "--out", str(tmp_path / "s")]) == 0
    row = json.loads((tmp_path / "s.json").read_text())["rows"][0]
    assert 0 < row["top_weight"] <= 1 and 1 <= row["effective_k"] <= row["mean_k"] and 0 <= row["light_slots"] <= 1
    assert str(run) in (tmp_path / "s.md").read_text()
    assert row["lr"] is None and row["epochs_done"] is None     # a bare checkpoint: no recipe to read
    # beside a run's config and metrics, its recipe and last epoch (run_facts) join the row
    from adaptivision.train.config import TrainConfig
    TrainConfig(base_lr=0.004, batch_size=64, clip_grad=1.0).save(str(run / "config.yaml"))
    (run / "metrics.jsonl").write_text(json.dumps(dict(kind="epoch", epoch=0, eval_top1=25.2, eval_images=6)) + "\n")
    assert mod.main(["--run", str(run), "--num", "6", "--data-dir", data, "--out", str(tmp_path / "s")]) == 0
    row = json.loads((tmp_path / "s.json").read_text())["rows"][0]
    assert (row["lr"], row["clip_grad"], row["epochs_done"], row["eval_top1"]) == (pytest.approx(5e-4), 1.0, 1, 25.2)
    assert "| 5.00e-04 | 1.0 | 1 | 25.20 (6) |" in (tmp_path / "s.md").read_text()


def test_predictor_saturation_reads_each_keep_predictor():
    """benchmarks/predictor_saturation.py: a DynamicViT predictor forced to keep everything reads
    keep 1 and log-odds +100 (its last layer's bias +50 / -50), an untrained one about 0."""
    mod = benchmark_script("predictor_saturation")
    torch.manual_seed(0)
    model = tiny_model(reduction="importance", keep_ratio=0.7)
    last = model.reducer[min(model.reducer, key=int)].predictor.out_conv[-2]        # Linear(D/4, 2)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([50.0, -50.0]))
    stats = mod.predictor_stats(model, torch.randn(4, 3, 16, 16))
    assert len(stats) == len(model.opts.reduce_blocks)
    assert stats[0]["keep"] == pytest.approx(1.0) and stats[0]["log_odds"] == pytest.approx(100.0)
    assert all(abs(s["log_odds"]) < 5 for s in stats[1:])


def test_predictor_saturation_reads_the_recipe_and_last_epoch_of_each_run(tmp_path):
    """benchmarks/predictor_saturation.py's run_facts: the peak lr the engine uses (base_lr x batch x
    accumulation / 512 unless lr is given), the gradient clip, and the last of the epochs in metrics.jsonl
    (step lines skipped)."""
    import json

    from adaptivision.train.config import TrainConfig
    mod = benchmark_script("predictor_saturation")
    TrainConfig(base_lr=0.004, batch_size=64, accum_steps=2, clip_grad=1.0).save(str(tmp_path / "config.yaml"))
    lines = [dict(kind="step", step=0, loss=2.3), dict(kind="epoch", epoch=0, eval_top1=40.0, eval_images=500),
             dict(kind="step", step=5, loss=1.0), dict(kind="epoch", epoch=1, eval_top1=61.5, eval_images=500)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    facts = mod.run_facts(str(tmp_path))
    assert facts == dict(lr=pytest.approx(0.004 * 128 / 512), clip_grad=1.0, epochs_done=2, eval_top1=61.5,
                         eval_images=500)
    TrainConfig(lr=3e-4).save(str(tmp_path / "config.yaml"))
    (tmp_path / "metrics.jsonl").write_text("")
    assert mod.run_facts(str(tmp_path)) == dict(lr=3e-4, clip_grad=None, epochs_done=0, eval_top1=None,
                                                eval_images=None)


def test_mass_stats_by_hand(monkeypatch):
    """benchmarks/mass_stats.py: hard clusters of one patch each all weigh 1 (no spread, the heaviest
    quarter holds a quarter); a model that puts 13 of 16 patches into one cluster and one patch
    into each of 3 others has masses 1, 1, 1, 13 (the heaviest quarter, one cluster, holds 13/16)."""
    import math
    mod = benchmark_script("mass_stats")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    one = mod.mass_stats(tiny_model(clustering="image", dynamic=False, k_max=16, cmtf=False), x)
    assert (one["p10"], one["p50"], one["p90"], one["log_mass_std"]) == (1.0, 1.0, 1.0, 0.0)
    assert one["top_quarter_share"] == pytest.approx(0.25) and one["mean_k"] == 16
    model = tiny_model(clustering="image", dynamic=False, k_max=4, k_min=2, cmtf=False)
    stage = model.dtc["0"]
    def fake(z, mass, k, *args, **kwargs):  # noqa: ARG001 (the stage's signature)
        a = torch.zeros(z.shape[0], z.shape[1], k)
        a[:, :3, :3] = torch.eye(3)                                                  # patches 0-2 alone
        a[:, 3:, 3] = 1                                                              # the rest together
        from adaptivision.layers.dtc import condense
        s, m = condense(z, a, mass)
        return s, m, a, z, s
    monkeypatch.setattr(stage, "forward", fake)
    big = mod.mass_stats(model, x)
    assert big["p50"] == pytest.approx(1.0) and big["top_quarter_share"] == pytest.approx(13 / 16)
    assert big["log_mass_std"] == pytest.approx(torch.tensor([0.0, 0.0, 0.0, math.log(13)]).std().item())

