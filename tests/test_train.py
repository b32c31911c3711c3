"""The training engine and CLI end to end on tiny on-disk fixtures."""
import json
import os
import socket
import subprocess
import sys
from dataclasses import MISSING as dataclasses_MISSING

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from adaptivision.checkpoint import load_weights
from adaptivision.cli import main
from adaptivision.train import TrainConfig, engine
from fixtures import make_fmnist

TINY = "model_kwargs={embed_dim: 32, depth: 2, num_heads: 2}"
QUICK = ["workers=0", "batch_size=16", "log_every=1", "throughput_batch=8", TINY]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return make_fmnist(str(tmp_path_factory.mktemp("fm")), n_train=64, n_test=32)


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="Unknown config key 'epoch'.*Did you mean 'epochs'"):
        TrainConfig.build(overrides=["epoch=3"])
    with pytest.raises(ValueError, match="'amp'.*allowed"):
        TrainConfig.build(overrides=["amp=fp8"])
    with pytest.raises(ValueError, match="'batch_size'"):
        TrainConfig.build(overrides=["batch_size=0"])
    # YAML reads 8e-3 (no dot) as a string: values are coerced to the field's type
    cfg = TrainConfig.build(overrides=["base_lr=8e-3", "clip_grad=1", "ema=true", "lr=null"])
    assert cfg.base_lr == 0.008 and isinstance(cfg.base_lr, float) and cfg.clip_grad == 1.0 and cfg.ema
    with pytest.raises(ValueError, match="'epochs': 2.5"):
        TrainConfig.build(overrides=["epochs=2.5"])
    with pytest.raises(ValueError, match="'model_kwargs'"):
        TrainConfig.build(overrides=["model_kwargs=3"])
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 5\nmodel_kwargs: {tau: 100}\n")
    cfg = TrainConfig.build(str(f), ["epochs=7"])
    assert cfg.epochs == 7 and cfg.model_kwargs == {"tau": 100}
    f.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="mapping"):
        TrainConfig.build(str(f))


def test_train_help_lists_every_config_field_with_its_default(capsys):
    from dataclasses import fields
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses_MISSING else f.default_factory()
        line = next((ln for ln in out.splitlines() if ln.startswith(f"  {f.name}=")), None)
        assert line is not None, f.name
        head = f"  {f.name}={default!r}"
        assert line.startswith(head) and line[len(head):].strip(), line  # the default, then one line of help
    # a comment continued on the next source lines stays with its field, not printed as a group heading
    assert "'auto': 'dense' for a DTC model" in next(ln for ln in out.splitlines() if ln.startswith("  distill_from="))
    assert not any(ln.endswith("else off (docs/training.md):") for ln in out.splitlines())
    assert "guidance (DESIGN.md" in out and "lambda_align=0.0" in out


def test_cli_train_end_to_end_with_dense_comparison(fmnist, tmp_path, capsys):
    rc = main(["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "run", "--epochs", "1", *QUICK])
    assert rc == 0
    run = tmp_path / "run"
    files = set(os.listdir(run))
    assert {"config.yaml", "model.json", "metrics.jsonl", "summary.json", "summary.md", "tb",
            "epoch-0001.safetensors", "epoch-0001.state.pt", "best.safetensors", "last.safetensors"} <= files
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run / "tb"))
    assert (run / "dense" / "last.safetensors").exists()
    saved = TrainConfig.build(str(run / "config.yaml"))
    assert saved.epochs == 1 and saved.model_kwargs["embed_dim"] == 32
    summary = json.loads((run / "summary.json").read_text())
    rows = {r["model"]: r for r in summary["rows"]}
    assert set(rows) == {"adaptivision", "dense"}
    # provenance: the package version and the commit of the code that produced the numbers
    head = subprocess.run(["git", "-C", os.path.dirname(__file__), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    prov = summary["provenance"]
    assert prov["version"] == __import__("adaptivision").__version__ and prov["torch"] == torch.__version__
    assert head and prov["commit"].removesuffix("-dirty") == head
    assert rows["adaptivision"]["gmacs"] < rows["dense"]["gmacs"]
    assert all(r["img_per_s"] > 0 and 0 <= r["top1"] <= 100 for r in rows.values())
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "epoch"} == {r["kind"] for r in recs}
    lrs = [r["lr"] for r in recs if r["kind"] == "step"]  # cosine (no warm-up in 4 updates): falling to min_lr
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.5 * lrs[0]
    out = capsys.readouterr().out
    assert "| adaptivision |" in out and "| dense |" in out
    # the training state is plain tensors and values: it loads with weights_only
    st = torch.load(run / "last.state.pt", weights_only=True)
    assert st["epoch"] == 0 and "optimizer" in st
    # eval reproduces the final evaluation of the run
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "last.safetensors")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert abs(res["top1"] - rows["adaptivision"]["top1"]) < 1e-9 and res["images"] == 32
    # --model NAME builds what the run built (model.json), and a checkpoint moved away from its run
    # loads from its own metadata; a name that contradicts the checkpoint is an error
    import shutil
    assert main(["eval", "--checkpoint", str(run / "last.safetensors"), "--model", "adaptivision_nano_patch4_28"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == res["top1"]
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run / "last.safetensors", alone / "w.safetensors")
    assert main(["eval", "--checkpoint", str(alone / "w.safetensors"), "--data-dir", fmnist]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == res["top1"]
    assert main(["eval", "--checkpoint", str(run / "last.safetensors"), "--model", "vit_tiny_patch16_224"]) == 2
    assert "holds a adaptivision_nano_patch4_28" in capsys.readouterr().err
    # one checkpoint, other budgets: calibrated GMACs within 5%, or one fixed K for every image
    target = 0.8 * res["gmacs"]
    assert main(["eval", "--checkpoint", str(run / "last.safetensors"), "--budget", f"gmacs={target}"]) == 0
    low = json.loads(capsys.readouterr().out)
    assert abs(low["gmacs"] - target) / target < 0.05 and low["mean_k"][0] < res["mean_k"][0]
    assert main(["eval", "--checkpoint", str(run / "last.safetensors"), "--budget", "k=24"]) == 0
    assert json.loads(capsys.readouterr().out)["mean_k"] == [24.0]
    assert main(["eval", "--checkpoint", str(run / "last.safetensors"), "--budget", "k=999"]) == 2
    assert "outside this model's range" in capsys.readouterr().err


def test_resume_continues_exactly(fmnist, tmp_path):
    # random augmentation of every kind, mixup / cutmix included (numpy's generator); an EMA
    # (the weights file holds it, the state the trained weights: both must come back)
    args = ["train", "--data-dir", fmnist, "--output", str(tmp_path), "--epochs", "2", "compare_dense=false",
            "hflip=0.5", "scale_min=0.5", "mixup=0.8", "cutmix=1.0", "ema=true", "ema_decay=0.9", *QUICK]
    assert main([*args, "--name", "straight"]) == 0
    assert main([*args, "--name", "split", "--stop-after", "1"]) == 0
    assert not (tmp_path / "split" / "epoch-0002.safetensors").exists()
    assert main([*args, "--resume", str(tmp_path / "split")]) == 0
    a = load_file(tmp_path / "straight" / "last.safetensors")
    b = load_file(tmp_path / "split" / "last.safetensors")
    assert a.keys() == b.keys()
    diff = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
    assert max(diff.values()) == 0.0, {k: v for k, v in diff.items() if v}
    a, b = (torch.load(tmp_path / n / "last.state.pt", weights_only=True)["trained"] for n in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the resumed run's train time is both epochs', not the resuming process's one epoch
    lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    secs = [r["epoch_seconds"] for r in lines if r["kind"] == "epoch"]
    row = json.loads((tmp_path / "split" / "summary.json").read_text())["rows"][0]
    assert len(secs) == 2 and row["train_seconds"] == pytest.approx(sum(secs))


def test_ema_checkpoint_holds_the_weights_it_reports(fmnist, tmp_path, capsys):
    """With ema=true the epoch's top-1 is the EMA's: last.safetensors must hold those weights (it
    held the trained ones, so `eval` of the file disagreed with the run's record), and the
    trained weights stay in the state file for --resume."""
    assert main(["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "ema", "--epochs", "2",
                 "compare_dense=false", "ema=true", "ema_decay=0.5", *QUICK]) == 0
    run = tmp_path / "ema"
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "last.safetensors"), "--data-dir", fmnist]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["top1"] == last["eval_top1"] and ev["loss"] == pytest.approx(last["eval_loss"], rel=1e-5)
    trained = torch.load(run / "last.state.pt", weights_only=True)["trained"]
    saved = load_file(run / "last.safetensors")
    assert saved.keys() == trained.keys() and not all(torch.equal(saved[k], trained[k]) for k in saved)


def test_resume_follows_the_runs_own_config(fmnist, tmp_path, capsys):
    """--resume RUN trains what RUN's config.yaml says (not the defaults); only RESUME_SAFE
    fields may change, and a refused change writes nothing."""
    import yaml
    run = tmp_path / "r"
    assert main(["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "r", "--epochs", "2",
                 "--stop-after", "1", "compare_dense=false", *QUICK]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(run), "batch_size=64"]) == 2
    assert "batch_size=64 differs from the run's batch_size=16" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # no other argument: the saved model, data and batch size; a longer schedule is allowed
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["epochs"] == 3 and saved["batch_size"] == 16 and saved["data_dir"] == fmnist
    assert (run / "epoch-0003.safetensors").exists()
    # every training state truncated: nothing can be resumed exactly, and the error says so
    for st in run.glob("*.state.pt"):
        st.write_bytes(st.read_bytes()[:100])
    assert main(["train", "--resume", str(run), "--epochs", "4"]) == 2
    assert "weights and training state of the same epoch" in capsys.readouterr().err


def test_resume_after_a_kill_between_the_two_renames_of_last(fmnist, tmp_path, capsys):
    """last.safetensors from epoch 2 with last.state.pt from epoch 1 (a kill between the renames),
    a stray temporary file and metric lines of an epoch that will run again: the resume takes the
    newest agreeing pair, removes the orphan, logs each epoch once, and ends bit-identical."""
    args = ["train", "--data-dir", fmnist, "--output", str(tmp_path), "--epochs", "3", "compare_dense=false",
            *QUICK]
    assert main([*args, "--name", "straight"]) == 0
    assert main([*args, "--name", "torn", "--stop-after", "2"]) == 0
    run = tmp_path / "torn"
    (run / "last.state.pt").write_bytes((run / "epoch-0001.state.pt").read_bytes())
    (run / "last.safetensors.tmp4242").write_bytes(b"half")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(dict(kind="step", epoch=2, step=0)) + "\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "different epochs" in capsys.readouterr().out
    assert not (run / "last.safetensors.tmp4242").exists()
    epochs = [json.loads(ln)["epoch"] for ln in open(run / "metrics.jsonl") if '"kind": "epoch"' in ln]
    assert epochs == [0, 1, 2]
    a, b = load_file(tmp_path / "straight" / "last.safetensors"), load_file(run / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_existing_run_is_never_overwritten(fmnist, tmp_path, capsys):
    args = ["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "r", "--epochs", "1",
            "compare_dense=false", *QUICK]
    assert main(args) == 0
    before = (tmp_path / "r" / "last.safetensors").read_bytes()
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "r" / "last.safetensors").read_bytes() == before


def test_a_run_directory_in_use_is_refused(fmnist, tmp_path, capsys):
    """A second train into a directory that a running job holds stops at once and writes nothing."""
    from adaptivision.checkpoint import run_lock
    args = ["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "busy", "--epochs", "1",
            "compare_dense=false", *QUICK]
    with run_lock(str(tmp_path / "busy")):
        assert main(args) == 2
        assert "being written by pid" in capsys.readouterr().err
        assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [".lock"]
    assert main(args) == 0  # released with the holder


def test_mismatched_and_corrupt_checkpoints_are_named(tmp_path):
    import timm
    src = timm.create_model("adaptivision_nano_patch4_28", embed_dim=32, depth=2, num_heads=2)
    p = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(p))
    other = timm.create_model("adaptivision_nano_patch4_28", embed_dim=48, depth=2, num_heads=2)
    with pytest.raises(ValueError, match=r"(?s)does not fit.*shape mismatch.*blocks\.0\.attn\.qkv\.weight: checkpoint \(96, 32\) vs model \(144, 48\).*more\)"):
        load_weights(other, str(p))
    deeper = timm.create_model("adaptivision_nano_patch4_28", embed_dim=32, depth=3, num_heads=2)
    with pytest.raises(ValueError, match=r"missing in checkpoint: blocks\.2\."):
        load_weights(deeper, str(p))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_weights(src, str(bad))
    with pytest.raises(ValueError, match="safetensors files only"):
        load_weights(src, __file__)


def test_non_finite_loss_stops_after_saving_the_last_good_state(fmnist, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = engine.AdaptiVisionLoss.forward

    def flaky(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 6:  # in the second epoch (4 steps per epoch)
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(engine.AdaptiVisionLoss, "forward", flaky)
    run = _stopped_run(fmnist, tmp_path, "nan", 2, "last-good.safetensors")
    assert (run / "epoch-0001.safetensors").exists()


def _stopped_run(fmnist, tmp_path, name: str, epochs: int, match: str):
    """Run a job that must stop with NonFiniteLoss, and check the finite weights it saved first."""
    cfg = TrainConfig.build(overrides=[f"data_dir={fmnist}", f"output={tmp_path}", f"name={name}",
                                       f"epochs={epochs}", "compare_dense=false", *QUICK])
    with pytest.raises(engine.NonFiniteLoss, match=match):
        engine.run(cfg)
    good = load_file(tmp_path / name / "last-good.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in good.values())
    return tmp_path / name


def test_a_nan_gradient_stops_before_it_reaches_the_weights(fmnist, tmp_path, monkeypatch):
    # the loss can stay finite while a gradient is NaN (seen with tau=1 before the log-mass clamp)
    real = engine.AdaptiVisionLoss.forward

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        out["loss"] = out["loss"] + (out["loss"] * 0).sqrt()  # value + 0, gradient 0 * d sqrt(0) = NaN
        return out

    monkeypatch.setattr(engine.AdaptiVisionLoss, "forward", poisoned)
    _stopped_run(fmnist, tmp_path, "nangrad", 1, "non-finite gradient")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one_process(fmnist, tmp_path):
    """2 gloo processes x batch 8 vs 1 process x batch 16, same seed and data order.

    The random crop is a no-op at scale 1 and flips are off, and K is fixed (dynamic=False): the
    running complexity statistics are per-process batch statistics, which would otherwise choose
    different K. What remains is the order of float32 sums (gradient all-reduce vs one batch),
    ~1e-7 relative. Adam divides by sqrt(v), so for weights whose gradient is near zero such
    rounding can move a step by up to lr (1e-3): elementwise, the runs may differ by a few lr.
    Globally they must agree: the distance between them is < 1% of the distance training moved
    the weights, which a wrong reduction (sum instead of mean, a rank's batch dropped, unsynced
    initial weights) exceeds by far."""
    common = ["--data-dir", fmnist, "--output", str(tmp_path), "--epochs", "2", "compare_dense=false",
              "workers=0", "log_every=1", "throughput_batch=8", "hflip=0", "scale_min=1.0", "lr=1e-3",
              "limit_eval=17",  # ranks get 2 and 1 eval batches: evaluation must not need collectives per batch
              "model_kwargs={embed_dim: 32, depth: 2, num_heads: 2, dynamic: false}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "adaptivision", "train", "--name", "ddp", "batch_size=8", *common]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["train", "--name", "single", "batch_size=16", *common]) == 0
    ddp = load_file(tmp_path / "ddp" / "last.safetensors")
    single = load_file(tmp_path / "single" / "last.safetensors")
    start = load_file(tmp_path / "ddp" / "epoch-0001.safetensors")
    floats = [k for k in ddp if ddp[k].is_floating_point()]
    gap = torch.sqrt(sum((ddp[k] - single[k]).double().pow(2).sum() for k in floats))
    moved = torch.sqrt(sum((ddp[k] - start[k]).double().pow(2).sum() for k in floats))
    assert moved > 1e-2, moved  # the second epoch really trained
    assert gap < 0.01 * moved, (gap, moved)
    assert max((ddp[k] - single[k]).abs().max().item() for k in floats) < 5e-3  # a few lr at most
    # only rank 0 wrote: one metrics line per step, not two
    steps = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len([s for s in steps if s["kind"] == "step"]) == 8


DDP_LIKE_TIMM = """
import torch, torch.distributed as dist, timm, adaptivision
from torch.nn.parallel import DistributedDataParallel
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(42 + rank)  # timm's train.py seeds every rank differently
model = timm.create_model("adaptivision_nano_patch4_28", embed_dim=32, depth=2, num_heads=2, num_classes=10)
net = DistributedDataParallel(model)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
for _ in range(3):  # each rank its own data
    loss = net(torch.randn(8, 1, 28, 28)).logsumexp(1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
# parameters (buffers such as the running complexity statistics are per-rank batch statistics,
# like BatchNorm's, re-broadcast from rank 0 at each forward)
for name, p in model.named_parameters():
    other = [torch.empty_like(p) for _ in range(2)]
    dist.all_gather(other, p.detach().contiguous())
    assert torch.equal(other[0], other[1]), name
print("ranks agree", flush=True)
dist.barrier()
# gloo's teardown (destroy_process_group, or interpreter exit with the group alive) aborted rank 1
# with "terminate called without an active exception" in 5 of 5 runs on a 2026-11-26 machine, after
# the check above had passed; what this test checks is done, so leave without that teardown
import os
os._exit(0)
"""


def test_ddp_as_timm_wraps_it_keeps_every_rank_identical(tmp_path):
    """Two gloo processes seeded differently, wrapped in DDP as timm's train.py does (no
    adaptivision call in between): after 3 steps on different data every parameter, the
    centroids included, is the same on both ranks (nothing is seeded lazily from data)."""
    script = tmp_path / "ddp_like_timm.py"
    script.write_text(DDP_LIKE_TIMM)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(script)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("ranks agree") == 2, r.stderr[-3000:]


def test_torchrun_with_guidance_dropout(fmnist, tmp_path):
    """A dropped guidance source leaves its projection without gradient: DDP must allow that."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "adaptivision", "train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "g",
           "--epochs", "1", "compare_dense=false", "workers=0", "batch_size=8", "throughput_batch=8",
           "guidance=text,saliency,learned", "guidance_dropout=0.5", "lambda_align=0.1",
           "model_kwargs={embed_dim: 32, depth: 2, num_heads: 2}"]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "g" / "summary.json").exists()


def test_shipped_configs_are_valid_and_the_default_job_matches_its_file():
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    for name in sorted(os.listdir(root)):
        cfg = TrainConfig.build(os.path.join(root, name))
        assert cfg.epochs >= 1, name
    assert TrainConfig.build(os.path.join(root, "fashion-mnist.yaml")) == TrainConfig()


def test_plateau_recipe_file_trains_what_the_recorded_patch_drop_runs_trained():
    """configs/fashion-mnist-plateau.yaml is the recipe of the committed plateau-patch-drop runs (K 20 + drops,
    dense + drops): the same training fields and the same trained model, so the numbers quoted in the file are its."""
    import dataclasses

    from adaptivision.train.build import model_spec
    root = os.path.join(os.path.dirname(__file__), "..")
    cfg = TrainConfig.build(os.path.join(root, "configs", "fashion-mnist-plateau.yaml")).resolved()
    runs = os.path.join(root, "benchmarks", "results", "dtc", "full", "runs")
    for run, dense in (("dtc-dad9b586", False), ("none-d1d6cefe", True)):
        rec = json.load(open(os.path.join(runs, run, "seed0", "summary.json")))
        # what the experiment runner sets per run (names, seeds, no dense twin of its own) and the model options
        # (compared below, built): every other training field is the recorded one
        per_run = {"name", "output", "seed", "compare_dense", "model_kwargs"}
        mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in per_run}
        assert mine == {k: rec["config"].get(k, v) for k, v in mine.items()}, run
        spec = model_spec(cfg, 10, dense=dense)
        built = timm.create_model(spec["name"], num_classes=10, **spec["kwargs"])
        ref = timm.create_model(rec["model_spec"]["name"], num_classes=10, **rec["model_spec"]["kwargs"])
        assert built.patch_drop_rate == ref.patch_drop_rate == 0.25, run
        assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        if not dense:  # the same DTC: the preset 'image-soft' is centres fps, soft, 2 steps, tau 20; unpool only
            # shapes dense outputs; the inference K grid of 8 is the nano default since (top-1 level, docs/model.md)
            a, b = (dataclasses.asdict(m.opts) for m in (built, ref))
            for k in ("clustering", "unpool", "infer_k_step"):
                a.pop(k), b.pop(k)
            assert a == b, run
        else:  # nothing condensed, nothing reduced
            assert not built.dtc and not ref.dtc


def test_profile_command_takes_adaptivision_and_timm_names(capsys):
    assert main(["profile", "--model", "adaptivision_nano_patch4_28,vit_tiny_patch16_224",
                 "--batch-size", "2", "--repeats", "1"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert abs(rows["vit_tiny_patch16_224"]["gmacs"] - 1.25) < 0.02
    assert rows["adaptivision_nano_patch4_28"]["mean_k"] and rows["adaptivision_nano_patch4_28"]["img_per_s"] > 0


def test_rgb_model_trains_on_grayscale_data(fmnist, tmp_path):
    """Fashion-MNIST (1 channel, 28 px) into a 3-channel 32 px CIFAR-shaped model."""
    assert main(["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "rgb", "--epochs", "1",
                 "--model", "adaptivision_nano_patch4_32", "compare_dense=false", *QUICK]) == 0
    spec = json.loads((tmp_path / "rgb" / "model.json").read_text())
    assert spec["name"] == "adaptivision_nano_patch4_32" and spec["num_classes"] == 10


def test_recipe_options_run_together(fmnist, tmp_path):
    """Mixup + CutMix, EMA, gradient clipping, accumulation and bf16 autocast in one run; only
    the last checkpoint (and best/last) are kept with keep_last=1."""
    assert main(["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "opts", "--epochs", "3",
                 "compare_dense=false", "mixup=0.8", "cutmix=1.0", "ema=true", "ema_decay=0.9", "clip_grad=1.0",
                 "accum_steps=2", "amp=bf16", "keep_last=1", "lambda_cluster=0.1", *QUICK]) == 0
    run = tmp_path / "opts"
    kept = sorted(p.name for p in run.glob("epoch-*.safetensors"))
    assert kept == ["epoch-0003.safetensors"]
    st = torch.load(run / "last.state.pt", weights_only=True)
    assert "trained" in st and st["num_updates"] == 3 * (64 // 16) // 2
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("cluster" in r for r in recs if r["kind"] == "step")


def test_cli_errors_are_clear_and_exit_2(tmp_path, capsys):
    assert main(["train", "dataset=cifar10", f"data_dir={tmp_path}/nowhere", f"output={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "cifar10 not found" in err and "Looked in" in err and "--download" in err
    assert main(["train", "epoch=3"]) == 2
    assert "Did you mean 'epochs'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", "x.safetensors", "stray=1"])


def test_guided_training_and_evaluation_end_to_end(fmnist, tmp_path, capsys):
    """guidance=text,saliency,mask,learned with L_align: the run records its guidance, logs the
    align term, and `eval` runs it with guidance as trained, missing, shuffled and noise."""
    rc = main(["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "g", "--epochs", "1", *QUICK,
               "guidance=text,saliency,mask,learned", "lambda_align=0.1", "guidance_dropout=0.3"])
    assert rc == 0
    run = tmp_path / "g"
    spec = json.loads((run / "model.json").read_text())
    assert spec["kwargs"]["guidance_dim"] == {"saliency": 49, "text": 16, "mask": 49}  # 16: the test cache's
    assert spec["kwargs"]["cmtf"] and spec["kwargs"]["align_dim"] == 16
    assert spec["guidance"]["sources"] == ["text", "saliency", "mask", "learned"]
    assert spec["guidance"]["classes"][0] == "T-shirt/top"
    dense = json.loads((run / "dense" / "model.json").read_text())
    assert "guidance" not in dense and not dense["kwargs"]["cmtf"]
    steps = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("align" in r for r in steps if r["kind"] == "step")
    # every source reached the model in training: its projection moved from the initial weights
    # (the engine seeds before building the model; AdamW skips parameters that never get a gradient)
    torch.manual_seed(0)
    init = engine.create_model(spec).state_dict()
    trained = load_file(run / "last.safetensors")
    for name in ("guidance_embed.saliency.weight", "guidance_embed.text.weight", "guidance_embed.mask.weight",
                 "guidance_tokens", "align_head.weight"):
        assert not torch.equal(trained[name], init[name]), name
    capsys.readouterr()
    results = {}
    for mode in ("normal", "missing", "shuffled", "random"):
        assert main(["eval", "--checkpoint", str(run / "best.safetensors"), "--data-dir", fmnist,
                     "--guidance-mode", mode]) == 0
        results[mode] = json.loads(capsys.readouterr().out)
        assert results[mode]["images"] == 32 and results[mode]["guidance_mode"] == mode
    # the run's own evaluation (with guidance) is what `eval` reproduces; the loss, not just top-1,
    # so that leaving the guidance out of either would show
    epoch = next(r for r in steps if r["kind"] == "epoch")
    assert abs(results["normal"]["loss"] - epoch["eval_loss"]) < 1e-5
    assert abs(results["normal"]["top1"] - epoch["eval_top1"]) < 1e-6
    assert abs(results["missing"]["loss"] - epoch["eval_loss"]) > 1e-4
    # CMTF attends to fewer tokens without guidance: fewer MACs
    assert results["missing"]["gmacs"] < results["normal"]["gmacs"] or \
        results["missing"]["mean_k"] != results["normal"]["mean_k"]
    # pictures of a guided run show the clustering it makes with its guidance
    assert main(["visualize", "--checkpoint", str(run / "best.safetensors"), "--data-dir", fmnist,
                 "--num", "2", "--out", str(tmp_path / "pics")]) == 0
    assert len(list((tmp_path / "pics").glob("*.png"))) == 2


def test_guidance_errors_are_clear(fmnist, tmp_path, capsys):
    with pytest.raises(ValueError, match="reduction='dtc'"):
        engine.run(TrainConfig.build(None, ["guidance=saliency", "model_kwargs={reduction: tome}", "epochs=1",
                                            f"data_dir={fmnist}", f"output={tmp_path}", "workers=0"]))
    with pytest.raises(ValueError, match="condense_at set"):
        engine.run(TrainConfig.build(None, ["guidance=saliency", "model_kwargs={condense_at: false}", "epochs=1",
                                            f"data_dir={fmnist}", f"output={tmp_path}", "workers=0"]))
    assert main(["train", "guidance=depth"]) == 2
    assert "'guidance': 'depth' is not a source" in capsys.readouterr().err
    assert main(["train", "lambda_align=0.1"]) == 2
    assert "'lambda_align'" in capsys.readouterr().err
    main(["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "plain", "--epochs", "1", *QUICK,
          "compare_dense=false", "limit_train=16"])
    assert main(["eval", "--checkpoint", str(tmp_path / "plain" / "best.safetensors"), "--data-dir", fmnist,
                 "--guidance-mode", "missing"]) == 2
    assert "trained without guidance" in capsys.readouterr().err


@pytest.mark.parametrize("reduction,term,weight", [("importance", "reduction", 2.0), ("tofe", "reduction", 2.0),
                                                    ("dtc", "cluster", 0.5)])
def test_every_reductions_auxiliary_loss_reaches_training(fmnist, tmp_path, reduction, term, weight):
    """DynamicViT's ratio loss (reduction='importance'), ToFe's budget term and DTC's cluster term are part of the loss
    that is back-propagated: logged per step, and the loss is the task loss plus the weighted term."""
    kw = f"model_kwargs={{embed_dim: 32, depth: 4, num_heads: 2, reduction: {reduction}}}"
    rc = main(["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "r", "--epochs", "1",
               *QUICK[:-1], kw, "compare_dense=false", f"lambda_cluster={weight if term == 'cluster' else 0}"])
    assert rc == 0
    steps = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["kind"] == "step"]
    assert steps and all(s[term] > 0 for s in steps), steps[0]
    for s in steps:
        assert s["loss"] == pytest.approx(s["ce"] + weight * s[term], rel=1e-5)


def test_non_finite_numbers_are_rejected_everywhere():
    for bad in ("lr=.inf", "base_lr=.nan", "weight_decay=.inf", "mixup=.inf", "clip_grad=.inf"):
        with pytest.raises(ValueError, match="finite"):
            TrainConfig.build(overrides=[bad])
    with pytest.raises(ValueError, match="'tau'.*finite"):
        engine.create_model(dict(name="adaptivision_nano_patch4_28", num_classes=10, kwargs={"tau": float("inf")}))


def test_non_finite_weights_are_never_saved_as_last_good(fmnist, tmp_path, monkeypatch):
    """A loss that turns NaN after the weights already did: nothing is saved as 'last good'."""
    calls = {"n": 0}
    real = engine.AdaptiVisionLoss.forward

    def poison(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            model = _active_model["m"]
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            out["loss"] = out["loss"] * float("nan")
        return out

    _active_model = {}
    real_create = engine.create_model

    def create(spec):
        _active_model["m"] = real_create(spec)
        return _active_model["m"]

    monkeypatch.setattr(engine.AdaptiVisionLoss, "forward", poison)
    monkeypatch.setattr(engine, "create_model", create)
    cfg = TrainConfig.build(overrides=[f"data_dir={fmnist}", f"output={tmp_path}", "name=bad", "epochs=1",
                                       "compare_dense=false", *QUICK])
    with pytest.raises(engine.NonFiniteLoss, match="none were saved"):
        engine.run(cfg)
    assert not (tmp_path / "bad" / "last-good.safetensors").exists()


def test_budget_warmup_anneals_k_from_the_maximum_to_the_trained_budget(fmnist, tmp_path, monkeypatch):
    """budget_warmup: DTC starts near K_max and ends at its trained budget (bias 0)."""
    seen = []
    real = engine.set_budget_warmup

    def spy(model, cfg, epoch):
        seen.append((epoch, real(model, cfg, epoch)))
        return seen[-1][1]

    monkeypatch.setattr(engine, "set_budget_warmup", spy)
    rc = main(["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "w", "--epochs", "2", *QUICK,
               "compare_dense=false", "budget_warmup=2", "budget_warmup_bias=4"])
    assert rc == 0
    biases = [b for _, b in seen]
    assert biases[0] == 4.0 and biases[-1] == 0.0 and biases == sorted(biases, reverse=True)
    assert seen[-1][0] == 2  # the end of the last epoch: evaluated and saved at the trained budget
    with pytest.raises(ValueError, match="budget_warmup"):
        TrainConfig.build(overrides=["epochs=2", "budget_warmup=3"])


def _rc_and_err(argv, capsys):
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_bad_input_gets_a_clear_error_not_a_traceback(fmnist, tmp_path, capsys):
    """Each case exits with status 2 and a message naming the problem (issue 13, item 9)."""
    from adaptivision.benchmark import parse_spec
    (tmp_path / "rand.safetensors").write_bytes(os.urandom(1000))
    (tmp_path / "a_file").write_text("x")
    cases = {
        "not a readable safetensors": ["eval", "--checkpoint", str(tmp_path / "rand.safetensors"),
                                       "--model", "adaptivision_nano_patch4_28"],
        "Unknown model 'adaptivision_nano_patch4_2'. Did you mean": ["train", "--model", "adaptivision_nano_patch4_2",
                                                       "--data-dir", fmnist, "--output", str(tmp_path)],
        "'tau': 'abc'; allowed: a float > 0": ["train", "model_kwargs={tau: abc}", "--data-dir", fmnist,
                                            "--output", str(tmp_path), "--name", "tau"],
        "condense_at: false": ["train", "model_kwargs={condense_at: null}", "guidance=learned",
                               "--data-dir", fmnist, "--output", str(tmp_path), "--name", "cn"],
        "a_file": ["train", "--data-dir", fmnist, "--output", str(tmp_path / "a_file"), *QUICK],
    }
    for want, argv in cases.items():
        rc, err = _rc_and_err(argv, capsys)
        assert rc == 2 and want in err, (want, rc, err[-500:])
    for bad in ("gmacs=.nan", "mean_k=abc", "bias=.inf"):
        with pytest.raises(ValueError, match="not a finite number"):
            parse_spec("m:" + bad)


def test_image_problems_strict_one_class_and_bombs(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from adaptivision.data import build_dataset
    from fixtures import make_folder
    common = ["--dataset", "folder", "--model", "adaptivision_nano_patch4_32", "--output", str(tmp_path),
              "--epochs", "1", "compare_dense=false", *QUICK[:-1], "batch_size=4",
              "model_kwargs={embed_dim: 32, depth: 2, num_heads: 2}"]
    broken = make_folder(str(tmp_path / "broken"), per_class=4, corrupt=1)
    rc, err = _rc_and_err(["train", "--data-dir", broken, "--name", "s", "strict_images=true", *common], capsys)
    assert rc == 2 and "unreadable image" in err and "broken0.png" in err
    one = make_folder(str(tmp_path / "one"), classes=("only",), per_class=8, corrupt=0)
    assert main(["train", "--data-dir", one, "--name", "one", *common]) == 0
    assert "has 1 class" in capsys.readouterr().out
    # a decompression bomb (here: any image over a lowered pixel limit) is skipped and counted
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    ds = build_dataset("folder", one, train=True)
    assert ds[0] is None


def test_swin_nano_trains_and_is_counted(fmnist, tmp_path, monkeypatch):
    """Tables 1-2's Swin-T at small scale: timm's Swin at a nano width for 28 x 28 images trains
    through the same CLI, and its window attention is counted (GMACs near the nano ViT's)."""
    import sys

    import timm

    from adaptivision import profile
    swin = timm.create_model("swin_nano_patch2_window7_28", num_classes=10)
    vit = timm.create_model("adaptivision_nano_patch4_28", reduction="none", num_classes=10)
    x = torch.randn(2, 1, 28, 28)
    swin_g = profile(swin, x)["gmacs"]
    assert abs(swin_g / profile(vit, x)["gmacs"] - 1) < 0.1
    # QK^T and AV in 7 x 7 windows: stage 1, 2 blocks x 4 windows at width 48; stage 2, 4 blocks x 1 at 96
    attn = 2 * (2 * 4 * 49 * 49 * 48 + 4 * 1 * 49 * 49 * 96) / 1e9
    monkeypatch.setattr(sys.modules["adaptivision.profile"], "WindowAttention", type("NotCounted", (), {}))
    assert profile(swin, x)["gmacs"] == pytest.approx(swin_g - attn)
    monkeypatch.undo()
    rc = main(["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "swin", "--epochs", "1",
               "model=swin_nano_patch2_window7_28", "limit_train=32", "limit_eval=16", "batch_size=16",
               "workers=0", "throughput_batch=4", "init_samples=16", "compare_dense=false"])
    assert rc == 0
    rows = json.loads((tmp_path / "swin" / "summary.json").read_text())["rows"]
    assert rows[0]["name"] == "swin_nano_patch2_window7_28" and rows[0]["gmacs"] == pytest.approx(swin_g, rel=1e-3)


def test_provenance_names_the_commit_the_process_loaded(monkeypatch):
    """A run records the commit read when the package was imported: edits to the checkout while a
    long run goes on must not be attributed to it (git is not asked again)."""
    from adaptivision import provenance as prov
    before = prov.provenance()["commit"]

    def git_again(*args, **kwargs):
        raise AssertionError("git was asked again")
    monkeypatch.setattr(prov.subprocess, "run", git_again)
    assert prov.provenance()["commit"] == before


def test_distillation_from_a_trained_teacher(fmnist, tmp_path):
    """distill_from: a dense run teaches a DTC student; the term is logged per step and the loss is
    (1 - alpha) CE + alpha distill; the teacher file is not touched; a teacher with another class
    count, a missing file and impossible values are refused with the field's name."""
    import hashlib
    assert main(["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "teacher", "--epochs", "1",
                 *QUICK[:-1], "model_kwargs={embed_dim: 32, depth: 2, num_heads: 2, reduction: none}",
                 "compare_dense=false"]) == 0
    teacher = tmp_path / "teacher" / "last.safetensors"
    digest = hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert main(["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "student", "--epochs", "1",
                 *QUICK, "compare_dense=false", f"distill_from={teacher}", "distill_weight=0.3",
                 "distill_tau=2"]) == 0
    steps = [json.loads(x) for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    steps = [st for st in steps if st["kind"] == "step"]
    assert steps and all(st["distill"] > 0 for st in steps)
    for st in steps:
        assert st["loss"] == pytest.approx(0.7 * st["ce"] + 0.3 * st["distill"], rel=1e-5)
    assert hashlib.sha256(teacher.read_bytes()).hexdigest() == digest
    with pytest.raises(FileNotFoundError, match="distill_from"):
        engine.load_teacher(TrainConfig.build(overrides=[f"distill_from={tmp_path / 'none.safetensors'}"]), 10, "cpu")
    with pytest.raises(ValueError, match="predicts 10 classes"):
        engine.load_teacher(TrainConfig.build(overrides=[f"distill_from={teacher}"]), 7, "cpu")
    for bad in ("distill_weight=1.5", "distill_tau=0", "distill_kind=medium"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            TrainConfig.build(overrides=[bad])


def test_the_default_job_distills_from_its_own_dense_model(fmnist, tmp_path):
    """distill_from='auto' (the default) is 'dense' in the default job: it trains the dense model
    first and the AdaptiVision model learns from its last checkpoint; the summary keeps its rows
    (AdaptiVision, dense) and says so; config.yaml saves the resolved value; explicit
    distill_from=dense without the dense comparison is refused."""
    assert main(["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "job", "--epochs", "1",
                 *QUICK]) == 0
    run = tmp_path / "job"
    assert yaml.safe_load((run / "config.yaml").read_text())["distill_from"] == "dense"
    teacher = run / "dense" / "last.safetensors"
    assert teacher.stat().st_mtime <= (run / "config.yaml").stat().st_mtime  # dense finished before the student began
    student = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [st for st in student if st["kind"] == "step"] and \
        all(st["distill"] > 0 for st in student if st["kind"] == "step")
    dense = [json.loads(x) for x in (run / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert all(not st.get("distill") for st in dense if st["kind"] == "step")  # the teacher learns alone
    summary = json.loads((run / "summary.json").read_text())
    assert [r["model"] for r in summary["rows"]] == ["adaptivision", "dense"]
    assert "learned from the dense model above" in summary["markdown"]
    with pytest.raises(ValueError, match="compare_dense=true"):
        engine.run(TrainConfig.build(overrides=["distill_from=dense", "compare_dense=false",
                                                f"output={tmp_path}", "name=refused"]))
    assert not (tmp_path / "refused").exists()  # refused before the run directory was made


@pytest.mark.parametrize("overrides,teacher", [
    ([], "dense"),                                                          # the default job
    (["compare_dense=false"], None),                                        # no dense model to learn from
    (["model_kwargs={reduction: tome, tome_r: 2}"], None),                  # baselines train as their papers do
    (["model_kwargs={condense_at: false, afa: false, cmtf: false}"], None),  # nothing condensed: nothing to recover
    (["model_kwargs={condense_at: [], afa: false, cmtf: false}"], None),
    (["model_kwargs={condense_at: 0}"], "dense"),                           # block 0 is a block
    (["model_kwargs={condense_at: [1, 3]}"], "dense"),
    (["model=vit_tiny_patch16_224"], None),                                 # a timm model trains alone
    (["distill_from=null"], None),                                          # asked off
    (["distill_from=/x/t.safetensors"], "/x/t.safetensors"),                # a named teacher stays
])
def test_auto_distillation_resolves_to_the_jobs_dense_model_only_for_dtc(overrides, teacher):
    cfg = TrainConfig.build(overrides=overrides)
    assert cfg.resolved().distill_from == teacher
    assert cfg.resolved().resolved() == cfg.resolved()


@pytest.mark.parametrize("key, before, now", [("budget_jitter", 1.0, 0.0), ("prop_attn", True, False)])
def test_moved_defaults_are_written_out_and_resume_as_the_run_trained(tmp_path, key, before, now):
    """The jitter default became 0 and proportional attention off for DTC's default clustering
    (2026-11-27): a new run's spec says its value, resuming a run whose spec predates that (not in
    model.json) goes on with the old default, and evaluating one rebuilds it so."""
    from adaptivision.checkpoint import save_weights
    from adaptivision.train.build import load_for_eval, model_spec
    cfg = TrainConfig(model="adaptivision_nano_patch4_28")
    assert model_spec(cfg, 10, dense=False)["kwargs"][key] == now
    assert key not in model_spec(cfg, 10, dense=True)["kwargs"]
    assert key not in model_spec(TrainConfig(model_kwargs={"reduction": "tome"}), 10, dense=False)["kwargs"]
    old, new = tmp_path / "old", tmp_path / "new"
    for run, kwargs in ((old, {"cmtf": False}), (new, {"cmtf": False, key: now})):
        run.mkdir()
        (run / "model.json").write_text(json.dumps(dict(name=cfg.model, num_classes=10, kwargs=kwargs)))
        save_weights(timm.create_model(cfg.model, num_classes=10, cmtf=False), str(run / "last.safetensors"))
    assert model_spec(cfg, 10, dense=False, checkpoint=str(old / "last.safetensors"))["kwargs"][key] == before
    assert model_spec(cfg, 10, dense=False, checkpoint=str(new / "last.safetensors"))["kwargs"][key] == now
    other = dict(budget_jitter=2.0, prop_attn=True)[key]
    explicit = TrainConfig(model=cfg.model, model_kwargs={key: other})
    assert model_spec(explicit, 10, dense=False, checkpoint=str(old / "last.safetensors"))["kwargs"][key] == other
    if key == "prop_attn":  # the jitter acts in training only
        assert load_for_eval(str(old / "last.safetensors"))[0].prop_attn is before
        assert load_for_eval(str(new / "last.safetensors"))[0].prop_attn is now


def test_self_distillation_the_full_token_path_teaches_the_condensed_one(fmnist, tmp_path):
    """self_distill: each step also runs the same weights on every patch token; that path learns from
    the labels and the condensed one from its detached logits, so the loss is (1 - w) CE + w distill
    + the full path's CE. No teacher file, no dense run; a second teacher, a model without DTC and an
    impossible weight are refused."""
    assert main(["train", "--data-dir", fmnist, "--output", str(tmp_path), "--name", "self", "--epochs", "1",
                 *QUICK, "compare_dense=false", "self_distill=0.4"]) == 0
    run = tmp_path / "self"
    assert yaml.safe_load((run / "config.yaml").read_text())["distill_from"] is None
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [st for st in steps if st["kind"] == "step"]
    assert steps and all(st["distill"] > 0 and st["full_ce"] > 0 for st in steps)
    for st in steps:
        assert st["loss"] == pytest.approx(0.6 * st["ce"] + 0.4 * st["distill"] + st["full_ce"], rel=1e-5)
    assert not (run / "dense").exists()
    with pytest.raises(ValueError, match="self_distill"):
        TrainConfig.build(overrides=["self_distill=0.5", "distill_from=/x/t.safetensors"])
    with pytest.raises(ValueError, match="self_distill"):
        TrainConfig.build(overrides=["self_distill=1.5"])
    with pytest.raises(ValueError, match="no DTC stage"):
        engine.run(TrainConfig.build(overrides=[f"data_dir={fmnist}", f"output={tmp_path}", "name=tome", "epochs=1",
                                                *QUICK[:-1], "compare_dense=false", "self_distill=0.5",
                                                "model_kwargs={embed_dim: 32, depth: 2, num_heads: 2, "
                                                "reduction: tome, tome_r: 2}"]))


def test_backbone_lr_scale_is_dynamicvits_split_and_the_scheduler_keeps_it():
    """backbone_lr_scale: the predictors (reducer.*) at the schedule's lr, every other parameter at the
    scale times it, through timm's lr_scale (so warm-up and cosine keep the ratio); each parameter in
    one group, weight decay split as timm does; refused where no predictor exists or the scale is <= 0."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from adaptivision.train.build import optimizer_params
    cfg = TrainConfig(model_kwargs={"reduction": "importance"}, backbone_lr_scale=0.01)
    model = timm.create_model(cfg.model, num_classes=10, **cfg.model_kwargs)
    groups = optimizer_params(model, cfg)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        assert {names[id(p)].startswith("reducer.") for p in g["params"]} == {g["lr_scale"] == 1.0}
        if g["weight_decay"] > 0:  # norms, biases and the no_weight_decay tokens are not decayed
            assert all(p.ndim > 1 and names[id(p)] not in model.no_weight_decay() for p in g["params"])
    assert len(groups) == 4
    opt = create_optimizer_v2(groups, opt="adamw", lr=1e-3, weight_decay=0.05)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=2, warmup_epochs=0.5, warmup_lr=1e-6,
                                   step_on_epochs=False, updates_per_epoch=10)
    for step in (0, 3, 12):
        sched.step_update(step)
        lrs = {g["lr_scale"]: g["lr"] for g in opt.param_groups}
        assert lrs[0.01] == pytest.approx(0.01 * lrs[1.0]) and lrs[1.0] > 0
    assert optimizer_params(model, TrainConfig()) is model  # the default: timm's own groups
    with pytest.raises(ValueError, match="no token-reduction predictor"):
        optimizer_params(timm.create_model(cfg.model, num_classes=10), TrainConfig(backbone_lr_scale=0.01))
    with pytest.raises(ValueError, match="backbone_lr_scale"):
        TrainConfig.build(overrides=["backbone_lr_scale=0"])
