"""Compile, export and benchmark paths (issue 5): same outputs, bounded recompiles, working CLI."""
import json

import pytest
import timm
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

from adaptivision.benchmark import mixed_batch, parse_spec
from adaptivision.cli import main
from adaptivision.export import export_onnx, fixed_k
from conftest import benchmark_script, textured_and_flat, tiny_model


def _with_stats(model, x):
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def test_compile_matches_eager_and_bucketed_k_bounds_recompiles():
    model = _with_stats(tiny_model(), textured_and_flat(4, 4))
    x = textured_and_flat(4, 4)
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")  # dynamo's capture; inductor is timed in benchmarks/
    ks, graphs = set(), []
    with torch.no_grad():
        for bias in (0, -3, -1, 1, 3, 0.5, -2, 2):
            model.set_token_budget(bias=bias)
            out = compiled(x)
            ks |= set(model.last_num_clusters.flatten().tolist())
            assert torch.allclose(out, model(x), atol=1e-6)
            graphs.append(counters["stats"]["unique_graphs"])
    assert len(ks) >= 6, ks  # the budgets really produced many group shapes
    # shapes become dynamic after the first recompiles: later budgets add few graphs, not one per shape
    assert graphs[-1] - graphs[0] <= graphs[0] // 2, graphs


def test_fixed_k_compiles_as_one_graph():
    model = tiny_model(dynamic=False).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="eager", fullgraph=True)(x)  # fails on any graph break
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.filterwarnings("error:.*was assigned during export")  # no side effects in a traced forward
def test_onnx_export_in_fixed_k_mode_matches_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="pip install adaptivision[test] brings onnxruntime")
    pytest.importorskip("onnxscript")
    model = tiny_model().eval()  # per-image K model, exported at one K
    with pytest.raises(ValueError, match="one K"):
        export_onnx(model, str(tmp_path / "m.onnx"))
    path = export_onnx(model, str(tmp_path / "m.onnx"), k=8)
    sess = ort.InferenceSession(path)
    assert model.dtc["0"].dynamic  # export left the model as it was
    with fixed_k(model, 8), torch.no_grad():
        for batch in (1, 5):  # the batch dimension is dynamic
            x = torch.randn(batch, 3, 16, 16)
            out = sess.run(None, {"images": x.numpy()})[0]
            assert out.shape == (batch, 5)
            assert abs(out - model(x).numpy()).max() < 1e-4
            assert model.last_num_clusters.flatten().tolist() == [8] * batch


@pytest.mark.filterwarnings("error:.*was assigned during export")  # no side effects in a traced forward
def test_onnx_export_of_the_default_clustering_with_per_image_k(tmp_path):
    """The default clustering (each image's own farthest points) exports; built with pad_k it keeps
    per-image K in the exported graph: each image's K from its own complexity, at any batch size."""
    ort = pytest.importorskip("onnxruntime", reason="pip install adaptivision[test] brings onnxruntime")
    pytest.importorskip("onnxscript")
    x = textured_and_flat(6, 2)
    model = _with_stats(tiny_model(budget_jitter=0.0, clustering="image-soft", cmtf=False, pad_k=16), x)
    sess = ort.InferenceSession(export_onnx(model, str(tmp_path / "m.onnx")))
    with torch.no_grad():
        for xb in (x, x[5:7]):
            ref = model(xb)
            assert model.last_num_clusters.unique().numel() > 1                     # per-image K really varies
            assert abs(sess.run(None, {"images": xb.numpy()})[0] - ref.numpy()).max() < 1e-4
    fixed = export_onnx(tiny_model(clustering="image-soft", cmtf=False), str(tmp_path / "f.onnx"), k=8)
    assert ort.InferenceSession(fixed).run(None, {"images": x.numpy()})[0].shape == (8, 5)
    salient = tiny_model(clustering="image-soft", cmtf=False, condense_at=1, keep_salient=2).eval()  # top-k, scatter
    sess = ort.InferenceSession(export_onnx(salient, str(tmp_path / "s.onnx"), k=8))
    with fixed_k(salient, 8), torch.no_grad():
        assert abs(sess.run(None, {"images": x.numpy()})[0] - salient(x).numpy()).max() < 1e-4


def test_spec_parsing_and_errors():
    assert parse_spec("adaptivision_small_patch16_224:afa=false:gmacs=1.3") == (
        "adaptivision_small_patch16_224", {"afa": False}, {"gmacs": 1.3})
    assert parse_spec("deit_small_patch16_224") == ("deit_small_patch16_224", {}, {})
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("adaptivision_small_patch16_224:afa")
    with pytest.raises(ValueError, match="one budget"):
        parse_spec("m:gmacs=1:bias=0")


def test_mixed_batch_spreads_k():
    # on the training grid of 4 (the nano default infers on the grid of 8: fewer K values, fewer groups)
    model = timm.create_model("adaptivision_nano_patch4_28", infer_k_step=4)
    x = mixed_batch(16, 1, 28)
    _with_stats(model, x)
    with torch.no_grad():
        model(x)
    assert len(model.last_num_clusters.unique()) >= 3
    model.dtc["2"].infer_k_step = 8
    with torch.no_grad():
        model(x)
    assert len(model.last_num_clusters.unique()) >= 2 and (model.last_num_clusters % 8 == 0).all()


def test_benchmark_cli_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench"
    models = "adaptivision_nano_patch4_28:reduction=none,adaptivision_nano_patch4_28:gmacs=0.02"
    assert main(["benchmark", "--models", models, "--batch-size", "4", "--rounds", "2", "--warmup", "1",
                 "--out", str(out)]) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    dense, av = res["rows"]
    assert dense["speedup"] == 1.0 and abs(av["gmacs"] - 0.02) / 0.02 < 0.05  # budget calibrated
    assert av["gmacs_ratio"] == pytest.approx(dense["gmacs"] / av["gmacs"])
    assert av["realized"] == pytest.approx(av["speedup"] / av["gmacs_ratio"])
    assert "| adaptivision_nano_patch4_28:gmacs=0.02 |" in (tmp_path / "bench.md").read_text()
    assert main(["benchmark", "--models", "deit_tiny_patch16_224:gmacs=1"]) == 2
    assert "needs an AdaptiVision model" in capsys.readouterr().err


def test_benchmark_train_times_real_updates(tmp_path):
    """--train times forward + backward + optimizer step: the step really changes the weights."""
    import timm

    from adaptivision.timing import train_step
    model = timm.create_model("adaptivision_nano_patch4_28", embed_dim=32, depth=2, num_heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, torch.randn(4, 1, 28, 28))(None)
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert "head.weight" in changed and "blocks.0.attn.qkv.weight" in changed
    assert main(["benchmark", "--train", "--models", "adaptivision_nano_patch4_28:reduction=none,adaptivision_nano_patch4_28",
                 "--batch-size", "4", "--rounds", "2", "--warmup", "1", "--out", str(tmp_path / "t")]) == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["mode"] == "training updates" and all(r["img_per_s"] > 0 for r in res["rows"])
    assert (tmp_path / "t.md").read_text().startswith("Training updates:")


def test_speed_target_benchmark_smoke(tmp_path):
    """CI's short version of benchmarks/speed_targets.py (the real one takes minutes at 224²)."""
    mod = benchmark_script("speed_targets")
    out = tmp_path / "smoke"
    assert mod.main(["--smoke", "--out", str(out)]) == 0
    res = json.loads((tmp_path / "smoke.json").read_text())
    assert len(res["throughput"]["rows"]) == 6 and len(res["targets"]) == 7
    assert all(isinstance(t["met"], bool) for t in res["targets"])


def test_gpu_groups_and_profile_scripts_run_on_cpu(tmp_path):
    """CI's short versions of benchmarks/gpu_groups.sh and gpu_profile.py (run on an H100 for
    docs/performance.md): every model of the comparison timed, and a profile per model."""
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).parents[1]
    nano = "adaptivision_nano_patch4_28"
    env = dict(os.environ, OUT=str(tmp_path), PY=sys.executable, DEV="cpu", BS="8", ROUNDS="1", K="24", M=nano,
               DENSE=f"{nano}:reduction=none", PADK="40")
    subprocess.run(["bash", str(root / "benchmarks" / "gpu_groups.sh")], env=env, check=True, capture_output=True)
    rows = json.loads((tmp_path / "gpu-groups-fp32.json").read_text())["rows"]
    assert [r["model"] for r in rows] == [f"{nano}:reduction=none", nano, f"{nano}:max_groups=4",
                                          f"{nano}:max_groups=2", f"{nano}:max_groups=1", f"{nano}:pad_k=40",
                                          f"{nano}:k=24"]
    assert rows[4]["gmacs"] >= rows[1]["gmacs"]                  # one padded batch computes its padding
    assert rows[5]["gmacs"] >= rows[4]["gmacs"]                  # 40 slots per image: at least the largest K
    mod = benchmark_script("gpu_profile")
    assert mod.main(["--models", f"{nano},{nano}:k=24", "--batch-size", "4", "--img-size", "28", "--in-chans", "1",
                     "--steps", "1", "--top", "5", "--out", str(tmp_path / "prof")]) == 0
    texts = [(tmp_path / "prof" / f"profile-{i}.txt").read_text() for i in range(2)]
    assert texts[1].startswith(f"## {nano}:k=24: ") and "ms per forward" in texts[1] and "aten::" in texts[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA paths: run where a GPU is available")
def test_cuda_paths_sdpa_amp_channels_last():
    model = tiny_model().eval()
    x = textured_and_flat(4, 4)
    with torch.no_grad():
        ref = model(x)
        gpu = model.cuda()
        assert gpu.blocks[-1].attn.impl == "auto"  # fused SDPA form on CUDA
        out = gpu(x.cuda().to(memory_format=torch.channels_last))
        assert torch.allclose(out.cpu(), ref, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.float16):
            assert torch.isfinite(gpu(x.cuda())).all()
    assert main(["benchmark", "--models", "adaptivision_nano_patch4_28:reduction=none,adaptivision_nano_patch4_28",
                 "--device", "cuda", "--amp", "--channels-last", "--rounds", "2", "--batch-size", "8"]) == 0


def test_benchmark_spec_takes_each_models_own_weights(tmp_path):
    """NAME:weights=PATH loads that model's file, so a dense and a DTC run can be timed side by
    side (--checkpoint would give both the same file); a file that does not fit is named."""
    import timm
    from safetensors.torch import save_file

    from adaptivision.benchmark import build
    dense = timm.create_model("adaptivision_nano_patch4_28", reduction="none")
    path = str(tmp_path / "dense.safetensors")
    save_file(dense.state_dict(), path)
    x = torch.randn(4, 1, 28, 28)
    model, _ = build(f"adaptivision_nano_patch4_28:reduction=none:weights={path}", None, x, checkpoint="/nonexistent")
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="does not fit the model"):
        build(f"adaptivision_nano_patch4_28:weights={path}", None, x)


def test_throughput_times_the_images_it_is_given(monkeypatch):
    """The end-of-run summary times the evaluation images (tiled to the batch), not noise: with
    per-image K the time depends on what the images hold."""
    from adaptivision import timing
    from adaptivision.train.evaluate import measure
    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 28, 28).contiguous()
    assert timing.tile_batch(x, 7)[:, 0, 0, 0].tolist() == [0, 1, 2, 0, 1, 2, 0]
    seen = []
    monkeypatch.setattr(timing, "time_models", lambda models, xb, *a, **k: seen.append(xb) or [[0.1, 0.1]])
    model = timm.create_model("adaptivision_nano_patch4_28", embed_dim=32, depth=2, num_heads=2)
    measure(model, x, 5, torch.device("cpu"), repeats=2)
    assert torch.equal(seen[0], timing.tile_batch(x, 5))
