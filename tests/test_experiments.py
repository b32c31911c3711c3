"""Every experiment end to end at smoke scale on a tiny Fashion-MNIST fixture, and the report."""
import dataclasses
import json
import os

import pytest

from adaptivision.cli import main
from adaptivision.experiments import EXPERIMENTS, registry, report
from conftest import benchmark_script
from fixtures import make_fmnist

PNG = b"\x89PNG\r\n\x1a\n"
PLATEAU_ABLATIONS = ("plateau-table7", "plateau-table4", "plateau-variants", "plateau-guidance")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("xp")
    data = str(root / "fm")
    make_fmnist(data)
    out = str(root / "out")
    common = ["--scale", "smoke", "--data-dir", data, "--out", out]
    for name in ("table5", "figure1a", "table7", "table4", "variants", "table1", "theorem1", "guidance", "dtc-levers",
                 "figure1bc", "table3", *PLATEAU_ABLATIONS):
        assert main(["experiment", "run", name, *common]) == 0, name
    # Table 6: the table1 checkpoints on their own test set and on an extra evaluation set
    assert main(["experiment", "run", "table6", *common, "--eval-data", f"fashion-mnist={data}"]) == 0
    return out


def _record(out, name):
    with open(os.path.join(out, name, "experiment.json")) as f:
        return json.load(f)



def test_mean_std_cells_by_hand():
    """Every table cell: mean ± sample std of what exists, the value alone for one, a dash for none."""
    from adaptivision.experiments.report import MISSING, mean_std
    assert mean_std([1.0, 2.0, None]) == "1.50 ± 0.71"           # stdev([1, 2]) = sqrt(0.5)
    assert mean_std([0.02501, 0.02499], 4) == "0.0250 ± 0.0000"
    assert mean_std([89.15]) == "89.15"
    assert mean_std([None]) == MISSING == "—"

def test_list_names_every_experiment(capsys):
    assert main(["experiment", "list"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in EXPERIMENTS)


def test_table5_matches_gmacs_and_shares_runs(done):
    rec = _record(done, "table5")
    cells = {c["label"]: c for c in rec["cells"]}
    target = cells["Random keep"]["matched_to"]
    for label in ("Random keep", "DynamicViT (importance), lr / 4, grad clip 1", "EViT", "ToMe"):
        c = cells[label]
        assert c["knob"] in ("keep_ratio", "tome_r")
        assert abs(c["gmacs_at_init"] - target) / target < 0.1, (label, c["gmacs_at_init"], target)
    # the target is the paper-form DTC at init at the stage every recorded match used (after block 2, K 24),
    # not at today's nano default (K 20 since 2026-11-28), so the matched knobs keep their runs
    import timm
    import torch

    from adaptivision.profile import profile
    x = torch.randn(8, 1, 28, 28)
    def at_init(**stage):
        m = timm.create_model("adaptivision_nano_patch4_28", num_classes=10, clustering="paper", cmtf=False, **stage)
        return profile(m.eval(), x)["gmacs"]
    assert target == pytest.approx(at_init(condense_at=2, k_mid=24), rel=1e-6)
    assert target != pytest.approx(at_init(), rel=1e-3)
    # the dtc cell of Table 5 is the cell of Table 4 at the default's tau (20, clustering='image-soft')
    # and the full model of Table 7: one run
    t4 = {c["key"]: c for c in _record(done, "table4")["cells"]}
    t7 = {c["label"]: c for c in _record(done, "table7")["cells"]}
    dtc_run = cells["AdaptiVision (DTC)"]["runs"][0]["run_dir"]
    assert t4[20.0]["runs"][0]["run_dir"] == dtc_run == t7["+DTC+AFA"]["runs"][0]["run_dir"]
    assert t4[150.0]["runs"][0]["run_dir"] != dtc_run and t4[1.0]["runs"][0]["run_dir"] != dtc_run
    # Tables 1-2 list the token reducers too: the same runs as Table 5
    t1 = {c["label"]: c for c in _record(done, "table1")["cells"]}
    for label in ("DynamicViT (importance), lr / 4, grad clip 1", "ToMe", "Hourglass", "HiRED (adapted)",
                  "ToFe (freeze and reuse), lr / 4, grad clip 1"):
        assert t1[label]["runs"][0]["run_dir"] == cells[label]["runs"][0]["run_dir"], label
    # its rows for today's default and the paper form are the dtc-levers runs of the same models
    levers = {c["label"]: c["runs"][0]["run_dir"] for c in _record(done, "dtc-levers")["cells"] if c["runs"]}
    assert cells["AdaptiVision (DTC), paper form"]["runs"][0]["run_dir"] == \
        levers["paper: learned centroids, soft, tau 150"]
    default = cells["AdaptiVision (DTC), no budget jitter"]["runs"][0]["run_dir"]
    assert default == levers["image, soft, tau 20, after block 2, K 24, batch K, no budget jitter"] != dtc_run
    # the K 20 default and ToMe at its cost: the dtc-plateau runs (the dtc-levers cells), not new ones
    k20 = cells["AdaptiVision (DTC), K 20 (the default since 2026-11-28)"]["runs"][0]["run_dir"]
    assert k20 == levers["image, soft, tau 20, after block 2, K 20, batch K, no budget jitter, no proportional "
                         "attention"] != default
    assert cells["ToMe, r 6 (at K 20's GMACs)"]["runs"][0]["run_dir"] == levers["ToMe, r 6"] != \
        cells["ToMe"]["runs"][0]["run_dir"]


def test_dtc_levers_record_every_lever_and_record_only_trains_nothing(done, tmp_path):
    rec = _record(done, "dtc-levers")
    cells = {c["label"]: c for c in rec["cells"]}
    assert len(cells) == len(EXPERIMENTS["dtc-levers"].cells) and all(len(c["runs"]) == 1 for c in cells.values())
    image = cells["fps, hard, 2 k-means steps (clustering='image')"]["runs"][0]["run_dir"]
    assert image != cells["paper: learned centroids, soft, tau 150"]["runs"][0]["run_dir"]
    assert cells["ToMe"]["knob"] == "tome_r"
    # the born-again control: the dense model, taught by the dense cell's run (a distill term is logged)
    dense, student = (os.path.join(done, cells[k]["runs"][0]["run_dir"])
                      for k in ("ViT (dense)", "ViT (dense), distilled from dense"))
    assert student != dense and json.load(open(os.path.join(student, "model.json")))["kwargs"]["reduction"] == "none"
    assert "distill_from: " + os.path.join(dense, "last.safetensors") in open(os.path.join(student, "config.yaml")).read()
    steps = [json.loads(x) for x in open(os.path.join(student, "metrics.jsonl")) if '"step"' in x]
    assert steps and all(r["distill"] > 0 for r in steps)
    runs = set(os.listdir(os.path.join(done, "runs")))
    seeds = {r: sorted(os.listdir(os.path.join(done, "runs", r))) for r in runs}
    # --record-only with a second seed: nothing is trained, only the finished seed is recorded
    common = ["--scale", "smoke", "--data-dir", os.path.join(os.path.dirname(done), "fm"), "--out", done]
    assert main(["experiment", "run", "dtc-levers", "--seeds", "2", "--record-only", *common]) == 0
    assert {r: sorted(os.listdir(os.path.join(done, "runs", r))) for r in runs} == seeds
    recorded = [c["runs"] for c in _record(done, "dtc-levers")["cells"]]
    assert all(len(r) == 1 and r[0]["seed"] == 0 for r in recorded), recorded


def test_figure1a_points_follow_the_budget(done):
    rec = _record(done, "figure1a")
    for cell in rec["cells"]:
        pts = [p for p in cell["runs"][0]["points"] if not isinstance(p["knob"], str)]
        fixed = [p for p in cell["runs"][0]["points"] if isinstance(p["knob"], str)]
        assert len(pts) == 5
        g = [p["gmacs"] for p in pts]
        # ToMe's r removes tokens as it grows; the other knobs keep more as they grow
        assert g == sorted(g, reverse=cell["kwargs"]["reduction"] == "tome"), (cell["label"], g)
        if cell["kwargs"]["reduction"] != "dtc":
            assert not fixed
            continue
        # DTC also at one fixed K below its trained range (K >= 16): cheaper than every knob point
        assert [p["knob"] for p in fixed] == ["K=8", "K=12"]
        assert fixed[0]["gmacs"] < fixed[1]["gmacs"] < min(g)


def test_budget_sweeps_reuse_the_points_of_unchanged_weights(done, capsys):
    """A second sweep of the same checkpoints (--record-only again, or another experiment over the
    same runs) reuses each run's saved points; new weights in a run are evaluated again."""
    first = _record(done, "figure1a")
    common = ["--scale", "smoke", "--data-dir", os.path.join(os.path.dirname(done), "fm"), "--out", done]
    capsys.readouterr()
    assert main(["experiment", "run", "figure1a", *common, "--record-only"]) == 0
    log = capsys.readouterr().out
    runs = [run for cell in first["cells"] for run in cell["runs"]]
    assert log.count("budget points done before") == len(runs) > 0
    assert _record(done, "figure1a")["cells"] == first["cells"]
    changed = os.path.join(done, runs[0]["run_dir"], "last.safetensors")
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # as if trained further
    assert main(["experiment", "run", "figure1a", *common, "--record-only"]) == 0
    assert capsys.readouterr().out.count("budget points done before") == len(runs) - 1
    with open(os.path.join(done, runs[0]["run_dir"], "budget_points.json")) as f:
        assert json.load(f)["key"]["weights"][1] == st.st_mtime_ns + 1_000_000_000


def test_figure1bc_segments_with_every_backbone_at_its_budgets(done, tmp_path):
    rec = _record(done, "figure1bc")
    assert [c["kwargs"].get("reduction") for c in rec["cells"]] == ["none", "dtc", "evit", "hourglass", "tome"]
    dense_gmacs = rec["cells"][0]["runs"][0]["points"][0]["gmacs"]
    for cell in rec["cells"][1:]:
        pts = cell["runs"][0]["points"]
        assert len(pts) == 3 and all(0 <= p["miou"] <= 100 for p in pts)
        g = [p["gmacs"] for p in pts]
        assert g == sorted(g, reverse=cell["kwargs"]["reduction"] == "tome"), (cell["label"], g)
        assert min(g) < dense_gmacs, cell["label"]
    text = open(report([os.path.join(done, "figure1bc")], str(tmp_path))).read()
    assert "| mIoU (%) |" in text and "| Hourglass | 0.3 |" in text
    with open(tmp_path / "figure1bc.png", "rb") as f:
        assert f.read(8) == PNG
    # a second run trains nothing: every segmenter is found
    common = ["--scale", "smoke", "--data-dir", os.path.join(os.path.dirname(done), "fm"), "--out", done]
    before = os.path.getmtime(os.path.join(done, rec["cells"][0]["runs"][0]["run_dir"], "segmenter.safetensors"))
    assert main(["experiment", "run", "figure1bc", *common]) == 0
    assert os.path.getmtime(os.path.join(done, rec["cells"][0]["runs"][0]["run_dir"], "segmenter.safetensors")) == before


def test_figure1bc_trains_only_the_chosen_cells_and_seeds(tmp_path):
    """--only and --only-seed choose segmenters too (several processes share the long runs)."""
    data = make_fmnist(str(tmp_path / "fm"), n_train=20, n_test=10)
    out = str(tmp_path / "out")
    assert main(["experiment", "run", "figure1bc", "--scale", "smoke", "--data-dir", data, "--out", out, "--seeds", "2",
                 "--only", "ToMe (unmerged)", "--only-seed", "1"]) == 0
    rec = _record(out, "figure1bc")
    assert {c["label"]: [r["seed"] for r in c["runs"]] for c in rec["cells"]} == {
        "ViT (dense)": [], "AdaptiVision (DTC, skip unpooling)": [], "EViT": [], "Hourglass": [], "ToMe (unmerged)": [1]}


def test_figure1bc_logs_each_segmenters_evaluation_curve(tmp_path, monkeypatch, capsys):
    """A segmenter trained by the experiment logs its ten evaluation points (hours-long runs show
    their progress), and not its loss lines."""
    monkeypatch.setitem(registry.SEG_SCALES, "smoke", dict(steps=10, batch=2, eval_size=4))
    data = make_fmnist(str(tmp_path / "fm"), n_train=20, n_test=10)
    assert main(["experiment", "run", "figure1bc", "--scale", "smoke", "--data-dir", data, "--out", str(tmp_path / "out"),
                 "--only", "ViT (dense)"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "[figure1bc] ViT (dense) seed 0: step" in ln]
    assert [ln.split(": step ")[1].split(" evaluation ")[0] for ln in lines] == [f"{s}/10" for s in range(1, 11)]
    curve = _record(str(tmp_path / "out"), "figure1bc")["cells"][0]["runs"][0]["curve"]
    assert [float(ln.rsplit(" ", 1)[1]) for ln in lines] == [round(c["miou"], 2) for c in curve]


def test_figure1bc_record_holds_a_run_another_process_finished_meanwhile(tmp_path, monkeypatch):
    """Two processes share --out: while this one trains ToMe seed 0, the other trains and records the
    dense seed 0; the record this one writes last holds both (the dense cell, looked at first, was
    unfinished then)."""
    from adaptivision.dense import run as dense_run
    data = make_fmnist(str(tmp_path / "fm"), n_train=20, n_test=10)
    common = ["experiment", "run", "figure1bc", "--scale", "smoke", "--data-dir", data, "--out", str(tmp_path / "out")]
    real, other = dense_run.run, []

    def meanwhile(*args, **kwargs):
        spec = real(*args, **kwargs)
        if not other:  # the other process, once, while this one is still in its training phase
            other.append(1)
            assert main([*common, "--only", "ViT (dense)", "--only-seed", "0"]) == 0
        return spec

    monkeypatch.setattr(dense_run, "run", meanwhile)
    assert main([*common, "--only", "ToMe (unmerged)", "--only-seed", "0"]) == 0
    rec = _record(str(tmp_path / "out"), "figure1bc")
    assert {c["label"]: [r["seed"] for r in c["runs"]] for c in rec["cells"]} == {
        "ViT (dense)": [0], "AdaptiVision (DTC, skip unpooling)": [], "EViT": [], "Hourglass": [], "ToMe (unmerged)": [0]}


def test_guidance_report_names_the_code_behind_its_table(tmp_path):
    """A guidance table says which commit trained its runs, and flags runs from several commits by cell."""
    def write(commits):
        for name, commit in commits.items():
            os.makedirs(tmp_path / "runs" / name / "seed0", exist_ok=True)
            (tmp_path / "runs" / name / "seed0" / "summary.json").write_text(json.dumps(dict(
                rows=[dict(top1=90.0, gmacs=0.02, mean_k=[20.0])], provenance=dict(commit=commit))))
        cells = [dict(label=name, train={"guidance": "saliency"} if name == "sal" else {},
                      runs=[dict(seed=0, run_dir=f"runs/{name}/seed0")]) for name in commits]
        rec = dict(experiment="g", title="G", kind="guidance", scale="full", dataset="d", model="m", epochs=1,
                   seeds=1, cells=cells)
        os.makedirs(tmp_path / "g", exist_ok=True)
        (tmp_path / "g" / "experiment.json").write_text(json.dumps(rec))
        return open(report([str(tmp_path / "g")], str(tmp_path / "rep"), pictures=False)).read()

    assert "- every run from commit " + "a" * 12 + "\n" in write({"none": "a" * 40, "sal": "a" * 40})
    assert f"- MIXED CODE: runs from several commits ({'a' * 12}: none; {'b' * 12}: sal)" in \
        write({"none": "a" * 40, "sal": "b" * 40})


def test_segmentation_report_says_whether_each_segmenter_reached_its_plateau(tmp_path):
    """The report plots each run's evaluation curve and gives its gain over the last two tenths."""
    curve = [dict(step=s, miou=m) for s, m in ((100, 20.0), (200, 25.0), (300, 29.5), (400, 30.25))]
    runs = [dict(seed=0, run_dir="r", commit="abc", points=[dict(knob=None, gmacs=0.1, miou=30.25)], curve=curve),
            dict(seed=1, run_dir="r1", commit="abc", points=[dict(knob=None, gmacs=0.1, miou=29.0)],
                 curve=[dict(c, miou=c["miou"] - 1 + 0.5 * i) for i, c in enumerate(curve)])]
    rec = dict(experiment="figure1bc", title="Seg", kind="segmentation", scale="full", dataset="d", model="m",
               epochs=1, seeds=2, cells=[dict(label="ViT (dense)", kwargs={}, runs=runs),
                                         dict(label="EViT", kwargs={}, runs=[dict(runs[0], curve=[])])])
    (tmp_path / "figure1bc").mkdir()
    (tmp_path / "figure1bc" / "experiment.json").write_text(json.dumps(rec))
    text = open(report([str(tmp_path / "figure1bc")], str(tmp_path / "rep"))).read()
    # 30.25 - 25.00; seed 1: (30.25 - 1 + 1.5) - (25 - 1 + 0.5)
    assert "last two tenths of training, seed by seed: ViT (dense) +5.25, +6.25" in text
    assert "EViT +" not in text                                   # no curve recorded (older runs): no claim
    with open(tmp_path / "rep" / "figure1bc-training.png", "rb") as f:
        assert f.read(8) == PNG


def test_theorem1_adaptivision_cost_grows_slower_than_dense(done):
    dense, av = _record(done, "theorem1")["cells"]
    ratio = [d["gmacs"] / a["gmacs"] for d, a in zip(dense["points"], av["points"], strict=True)]
    assert ratio[-1] > 2 * ratio[0]  # quadratic attention vs a fixed K range


def test_guidance_runs_are_evaluated_without_and_with_noisy_guidance(done, tmp_path):
    rec = _record(done, "guidance")
    cells = {c["label"]: c for c in rec["cells"]}
    assert "modes" not in cells["no guidance (DTC+AFA)"]["runs"][0]
    for label, cell in cells.items():
        if label.startswith("no guidance"):
            continue
        modes = cell["runs"][0]["modes"]
        assert set(modes) == {"missing", "shuffled", "random"}, label
        assert all(0 <= m["top1"] <= 100 and m["gmacs"] > 0 for m in modes.values())
    # every guided configuration is its own run, shared with Table 7's CMTF row
    dirs = [c["runs"][0]["run_dir"] for c in rec["cells"]]
    assert len(set(dirs)) == len(dirs)
    t7 = {c["label"]: c for c in _record(done, "table7")["cells"]}
    assert t7["+DTC+AFA+CMTF (text + saliency)"]["runs"][0]["run_dir"] == cells["text + saliency"]["runs"][0]["run_dir"]
    text = open(report([os.path.join(done, "guidance")], str(tmp_path))).read()
    row = next(ln for ln in text.splitlines() if ln.startswith("| text + saliency, lambda2 = 0.1 |"))
    assert "| text,saliency | 0 | 0.1 |" in row and row.count("(") == 3  # three modes, each with its change
    assert row.rstrip().endswith("| 1 |")
    assert "- every run from commit " in text  # the code behind the table is named (mixed commits are flagged)


def test_report_tables_plots_and_missing_cells(done, tmp_path):
    names = ["table5", "figure1a", "table7", "table4", "variants", "table1", "theorem1", "table6"]
    path = report([os.path.join(done, n) for n in names], str(tmp_path))
    text = open(path).read()
    for title in ("Table 5", "Table 4", "Table 7", "Figure 1(a)", "Theorem 1", "Table 6"):
        assert title in text
    # a cell that cannot run is shown as missing, with the reason, and never gets numbers
    row = next(ln for ln in text.splitlines() if ln.startswith("| DeiT-S (timm) |"))
    assert row.count("—") >= 6 and row.rstrip().endswith("| 0 |")
    assert "DeiT-S (timm): paper scale only" in text
    # the guided rows of Table 7 and of the variants ran (issue 6) and have numbers
    row = next(ln for ln in text.splitlines() if ln.startswith("| +DTC+AFA+CMTF (text + saliency) |"))
    assert row.rstrip().endswith("| 1 |") and row.count("—") == 0
    # pictures of what a trained DTC run's clustering does, embedded under its table
    assert "![table5](table5-AdaptiVision_(DTC)-0.png)" in text
    for png in ("figure1a.png", "theorem1_gmacs.png", "theorem1_ms_per_image.png", "table5-AdaptiVision_(DTC)-0.png"):
        with open(tmp_path / png, "rb") as f:
            assert f.read(8) == PNG
    # a run deleted after the fact is reported missing, not remembered
    rec = _record(done, "table7")
    victim = next(c for c in rec["cells"] if c["label"] == "+DTC")["runs"][0]["run_dir"]
    os.remove(os.path.join(done, victim, "summary.json"))
    text = open(report([os.path.join(done, "table7")], str(tmp_path / "again"))).read()
    assert "+DTC: 1 run(s) missing or unfinished" in text


def test_report_flags_images_per_second_measured_with_other_thread_counts(done, tmp_path):
    """Runs trained as one-thread processes side by side (docs/results.md, "Plateau scale") measure
    their images/s with one thread: a table that mixes them with others says so, and which cells."""
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(done, out, ignore=shutil.ignore_patterns("*.safetensors", "*.pt", "tb"))
    rec = _record(str(out), "table7")
    text = open(report([str(out / "table7")], str(tmp_path / "same"), pictures=False)).read()
    assert "MIXED THREADS" not in text
    # (+DTC+AFA: the report test above deletes +DTC's summary)
    run = next(c for c in rec["cells"] if c["label"] == "+DTC+AFA")["runs"][0]["run_dir"]
    path = out / run / "summary.json"
    summary = json.loads(path.read_text())
    summary["threads"] = summary["threads"] + 1
    path.write_text(json.dumps(summary))
    text = open(report([str(out / "table7")], str(tmp_path / "mixed"), pictures=False)).read()
    line = next(ln for ln in text.splitlines() if "MIXED THREADS" in ln)
    assert f"{summary['threads']}: +DTC+AFA" in line


def test_bad_experiment_requests_are_named(tmp_path, capsys):
    assert main(["experiment", "run", "table55", "--out", str(tmp_path)]) == 2
    assert "Did you mean 'table5'" in capsys.readouterr().err
    assert main(["experiment", "run", "table5", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "experiment.json" in capsys.readouterr().err


def test_docs_tables_match_the_committed_records(tmp_path):
    """Every table row that `adaptivision report` makes from the records committed under
    benchmarks/results/<group>/<scale>/ is in docs/results.md as it is generated (no hand-edited numbers),
    and the report says which code produced each table."""
    import glob
    root = os.path.join(os.path.dirname(__file__), "..")
    exp_dirs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(root, "benchmarks/results/*/*/*/experiment.json")))
    assert exp_dirs, "no committed experiment records"
    docs = open(os.path.join(root, "docs", "results.md")).read()
    for d in exp_dirs:
        text = open(report([d], str(tmp_path / os.path.basename(d)), pictures=False)).read()
        rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln]
        assert len(rows) > 2, d
        missing = [ln for ln in rows if ln not in docs]
        assert not missing, f"{d}: rows not in docs/results.md as generated: {missing[:3]}"
        assert "commit" in text, d


def test_table3_detects_with_every_backbone_and_reports(done, tmp_path):
    rec = _record(done, "table3")
    assert [c["kwargs"].get("reduction") for c in rec["cells"]] == ["none", "dtc", "hourglass"]
    run = {c["kwargs"]["reduction"]: c["runs"][0] for c in rec["cells"]}
    for r in run.values():
        assert 0 <= r["map"] <= r["map50"] <= 100 and r["img_per_s"] > 0 and r["gmacs"] > r["backbone_gmacs"] > 0
    # condensing backbones cost less than the dense one; the detector adds the same head to each
    assert run["dtc"]["backbone_gmacs"] < run["none"]["backbone_gmacs"]
    assert run["hourglass"]["backbone_gmacs"] < run["none"]["backbone_gmacs"]
    text = open(report([os.path.join(done, "table3")], str(tmp_path))).read()
    assert "| backbone | mAP (%) | mAP50 (%) | backbone GMACs | detector GMACs | images/s | seeds |" in text
    assert "| Hourglass |" in text and "commit" in text    # which code made the table



def test_table3_names_what_it_cannot_run(tmp_path, capsys):
    assert main(["experiment", "run", "table3", "--dataset", "cifar10", "--scale", "smoke", "--out", str(tmp_path)]) == 2
    assert "Fashion-MNIST mosaics" in capsys.readouterr().err


def test_distilled_cells_learn_from_the_dense_run_of_their_seed(done):
    """dtc-distill: the dense cell's run of the same seed (its last checkpoint, not the test-set best)
    teaches; the teacher is named by its cell in the run's identity (so the runs' names do not
    depend on --out), and a student listed before its teacher is refused with a clear error."""
    import yaml

    from adaptivision.experiments.runner import Runner, base_config
    common = ["--scale", "smoke", "--data-dir", os.path.join(os.path.dirname(done), "fm"), "--out", done]
    assert main(["experiment", "run", "dtc-distill", *common]) == 0
    cells = {c["label"]: c for c in _record(done, "dtc-distill")["cells"]}
    dense_dir = cells["ViT (dense)"]["runs"][0]["run_dir"]
    for label in ("image, soft, tau 20, after block 2, K 24, batch K, distilled from dense", "ToMe, distilled from dense"):
        run_dir = os.path.join(done, cells[label]["runs"][0]["run_dir"])
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        assert os.path.samefile(cfg["distill_from"], os.path.join(done, dense_dir, "last.safetensors"))
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            steps = [st for st in map(json.loads, f) if st["kind"] == "step"]
        assert steps and all(st["distill"] > 0 for st in steps)
    base = base_config("smoke", "fashion-mnist", None, None)
    student = registry.LEVER_CELLS[21]
    names = [Runner(registry.get("dtc-distill"), out, "smoke", base).cell_config(student, 0)[0].name
             for out in ("/a", "/b")]
    assert names[0] == names[1]
    alone = registry.Experiment("alone", "a student without its teacher", "train", (student,))
    with pytest.raises(FileNotFoundError, match="teacher .* is not trained"):
        Runner(alone, os.path.join(done, "elsewhere"), "smoke",
               dataclasses.replace(base, data_dir=os.path.join(os.path.dirname(done), "fm"))).run()


def test_finetuned_cells_start_from_the_dense_run_for_a_tenth_of_the_epochs(done):
    """dtc-finetune: each fine-tuned cell starts from the dense cell's run of its seed (its last
    checkpoint), for a tenth of the scale's epochs (2 of the plateau's 20, at least 1) at a tenth of
    the learning rate; without the dense run it is refused, naming what is missing."""
    import yaml

    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner, base_config
    common = ["--scale", "smoke", "--data-dir", os.path.join(os.path.dirname(done), "fm"), "--out", done]
    assert main(["experiment", "run", "dtc-finetune", *common]) == 0
    cells = {c["label"]: c for c in _record(done, "dtc-finetune")["cells"]}
    dense_dir = os.path.join(done, cells["ViT (dense)"]["runs"][0]["run_dir"])
    with open(os.path.join(dense_dir, "config.yaml")) as f:
        dense_lr = yaml.safe_load(f)["base_lr"]
    tuned = [c for c in cells if "fine-tuned" in c]
    assert tuned == [c.label for c in registry.FINETUNE_CELLS[1:]] and len(tuned) == 9
    for label in tuned:
        with open(os.path.join(done, cells[label]["runs"][0]["run_dir"], "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        assert os.path.samefile(cfg["init_from"], os.path.join(dense_dir, "last.safetensors"))
        assert cfg["epochs"] == 1 and cfg["base_lr"] == pytest.approx(dense_lr / 10)
        assert cfg["backbone_lr_scale"] == (0.01 if "1% of the lr" in label else 1.0)  # DynamicViT's own split
    full = base_config("full", "fashion-mnist", None, None)
    dtc = registry.FINETUNE_CELLS[2]
    cfg, _ = Runner(registry.get("dtc-finetune"), "/x", "full", full).cell_config(dtc, 1)
    assert cfg.epochs == 2 and cfg.init_from.startswith("/x/runs/none-") and "/seed1/" in cfg.init_from
    alone = registry.Experiment("alone", "fine-tuning without the dense run", "train", (dtc,))
    with pytest.raises(FileNotFoundError, match="starting point .*init_from.* is not trained"):
        Runner(alone, os.path.join(done, "elsewhere-ft"), "smoke",
               dataclasses.replace(base_config("smoke", "fashion-mnist", None, None),
                                   data_dir=os.path.join(os.path.dirname(done), "fm"))).run()


def test_processes_sharing_an_experiment_skip_the_runs_another_one_trains(done):
    """Two `experiment run` processes on one --out: a run whose lock another live process holds is
    skipped untouched, and so is a student whose teacher is being trained; once the lock is gone
    the next process trains both (the teacher first)."""
    from adaptivision.checkpoint import lock_holder, run_lock
    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner, base_config
    base = dataclasses.replace(base_config("smoke", "fashion-mnist", None, None),
                               data_dir=os.path.join(os.path.dirname(done), "fm"))
    exp = registry.Experiment("shared", "dense and a student", "train", (registry.DENSE, registry.LEVER_CELLS[22]))
    out = os.path.join(done, "shared")
    lines = []
    runner = Runner(exp, out, "smoke", base, log=lines.append)
    cfg, _ = runner.cell_config(registry.DENSE, 0)
    dense_dir = os.path.join(cfg.output, cfg.name)
    with run_lock(dense_dir):  # this test process plays the other process
        assert lock_holder(dense_dir) == f"pid {os.getpid()}"
        rec = runner.run()
        assert os.listdir(dense_dir) == [".lock"]  # nothing written into the other process's run
    assert [c["runs"] for c in rec["cells"]] == [[], []]
    assert any("ViT (dense) seed 0: skipped, another process is training it" in ln for ln in lines), lines
    assert any("teacher" in ln and "is being trained by another process" in ln for ln in lines), lines
    assert not any(": training " in ln for ln in lines), lines  # "training" is said only with the lock held
    assert lock_holder(dense_dir) is None
    lines.clear()
    rec = Runner(exp, out, "smoke", base, log=lines.append).run()
    assert [len(c["runs"]) for c in rec["cells"]] == [1, 1]
    assert sum(": training runs/" in ln for ln in lines) == 2, lines
    assert os.path.isfile(os.path.join(dense_dir, "summary.json"))


@pytest.mark.parametrize("scale,name,runs", [("default", "dtc-afa", 4), ("default", "dtc-batch-k", 4),
                                             ("default", "dtc-curve", 4), ("default", "dtc-distill", 4),
                                             ("full", "dtc-plateau", 2), ("full", "plateau-curve", 2),
                                             ("full", "dtc-finetune", 5), ("full", "finetune-curve", 4)])
def test_recorded_runs_keep_their_names(scale, name, runs):
    """A run's name is the hash of its configuration: a new TrainConfig field or a changed default
    that is not kept out of the identity (runner.LATER_FIELDS, ID_DEFAULTS) would rename every
    recorded run, so that finished runs are trained again. The committed records of these
    experiments (every cell pins its options) must still name their runs."""
    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner, base_config
    root = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "dtc", scale)
    with open(os.path.join(root, name, "experiment.json")) as f:
        rec = json.load(f)
    exp = registry.get(name)
    runner = Runner(exp, "/anywhere", rec["scale"], base_config(rec["scale"], rec["dataset"], None, None))
    cells = {c.label: c for c in exp.cells if not c.match_gmacs}  # (matched knobs need the data)
    checked = 0
    for entry in rec["cells"]:
        for run in entry["runs"] if entry["label"] in cells else []:
            assert "runs/" + runner.cell_config(cells[entry["label"]], run["seed"])[0].name == run["run_dir"], entry["label"]
            checked += 1
    assert checked >= runs


@pytest.mark.parametrize("scale", ["default", "full"])
def test_every_dtc_cell_builds_the_model_it_names(scale):
    """A cell's options equal to ID_DEFAULTS are left out of its run's name, and some of those are no
    longer the live defaults (clustering 'paper', train_k 'image', condense_at 0, unpool 'assign',
    budget_jitter 1, prop_attn on): the model each cell trains must still have every option the cell names, and a
    cell that leaves the jitter out keeps the value its runs were recorded with."""
    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner, base_config
    from adaptivision.train.build import create_model, model_spec
    base = base_config(scale, "fashion-mnist", None, None)
    runner = Runner(registry.get("dtc-levers"), "/x", scale, base)
    for cell in registry.LEVER_CELLS:
        if cell.model or cell.match_gmacs or cell.kwargs.get("reduction", "dtc") != "dtc":
            continue
        cfg, _ = runner.cell_config(cell, 0)
        model = create_model(model_spec(cfg, 10, dense=False))
        opts = model.opts
        for key, want in cell.kwargs.items():
            got = getattr(opts, key) if hasattr(opts, key) else getattr(model, key)  # a timm argument (patch_drop_rate)
            assert (got == want) or (key == "condense_at" and [s.block for s in opts.stages] == [want]), (cell.label, key)
        assert opts.budget_jitter == cell.kwargs.get("budget_jitter", 1.0), cell.label
        assert opts.prop_attn == cell.kwargs.get("prop_attn", True), cell.label
        assert opts.unpool == "assign", cell.label
    paper = runner.cell_config(registry.LEVER_CELLS[3], 0)[0]
    assert {k: paper.model_kwargs[k] for k in ("clustering", "train_k", "condense_at")} == \
        dict(clustering="paper", train_k="image", condense_at=0)


def test_segmentation_and_detection_cells_train_the_backbone_their_runs_were_recorded_with():
    """figure1bc / table3 runs are named by their cells' kwargs as written; their recorded seeds
    (2026-11-26) trained the live defaults of then. A new seed must train the same backbone, so a
    default that moved since is pinned (runner.DENSE_TASK_PINS): budget_jitter 1, prop_attn on, and the
    clustering preset and training K of then."""
    import timm

    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import _dense_task_kwargs
    cells = [c for c in registry.SEG_CELLS + registry.DET_CELLS if c.kwargs.get("reduction", "dtc") == "dtc"]
    assert len(cells) == 2
    for cell in cells:
        opts = timm.create_model("adaptivision_nano_patch4_28", img_size=56, **_dense_task_kwargs(cell.kwargs)).opts
        assert (opts.budget_jitter, opts.prop_attn, opts.clustering, opts.tau, opts.train_k, opts.unpool) == \
            (1.0, True, "image-soft", 20.0, "batch", "skip"), cell.label
        assert [s.block for s in opts.stages] == [0], cell.label


def test_a_run_started_before_the_pins_resumes_with_its_own_options(monkeypatch, tmp_path):
    """A run saved with the options left out (before cells were built with them written out) is
    resumed with its saved options, not refused as a changed configuration."""
    import dataclasses

    from adaptivision.experiments import registry
    from adaptivision.experiments import runner as runner_mod
    from adaptivision.experiments.runner import Runner, base_config
    base = base_config("smoke", "fashion-mnist", None, None)
    runner = Runner(registry.get("dtc-levers"), str(tmp_path), "smoke", base)
    cfg, _ = runner.cell_config(registry.LEVER_CELLS[3], 0)                  # the paper cell: all pinned
    run_dir = os.path.join(cfg.output, cfg.name)
    os.makedirs(run_dir)
    dataclasses.replace(cfg, model_kwargs={}).save(os.path.join(run_dir, "config.yaml"))
    open(os.path.join(run_dir, "last.safetensors"), "wb").close()
    seen = []
    monkeypatch.setattr(runner_mod.engine, "run", lambda c, resume=None, **kw: seen.append((c.model_kwargs, resume)))
    assert runner._train(cfg, run_dir, "paper", "rel")
    assert seen == [({}, run_dir)]
    dataclasses.replace(cfg, model_kwargs={"tau": 5.0}).save(os.path.join(run_dir, "config.yaml"))
    assert runner._train(cfg, run_dir, "paper", "rel")                      # another config: engine refuses it
    assert seen[-1] == (cfg.model_kwargs, run_dir)


def test_only_runs_the_chosen_cells_and_the_teacher_they_need():
    """--only LABEL: those cells, plus the dense cell when one learns from it; an unknown label
    names the experiment's cells; the record says it is partial."""
    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner, base_config
    base = base_config("smoke", "fashion-mnist", None, None)
    exp = registry.get("dtc-plateau")
    distilled = "ToMe, distilled from dense"
    runner = Runner(exp, "/x", "smoke", base, only=[distilled])
    assert [c.label for c in runner.cells] == ["ViT (dense)", distilled]
    assert runner.record["only"] == ["ViT (dense)", distilled]
    assert [c.label for c in Runner(exp, "/x", "smoke", base, only=["ToMe"]).cells] == ["ToMe"]
    assert Runner(exp, "/x", "smoke", base).cells == exp.cells and "only" not in Runner(exp, "/x", "smoke", base).record
    with pytest.raises(ValueError, match="not a cell of dtc-plateau; its cells: 'ViT \\(dense\\)'"):
        Runner(exp, "/x", "smoke", base, only=["tome"])


def test_an_only_run_records_the_finished_runs_of_the_other_cells(monkeypatch, tmp_path):
    """The record an --only run writes covers every cell: another cell's finished run stays in it
    (it held the --only cells alone once, and committing it dropped the others), untrained."""
    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner, base_config
    base = base_config("smoke", "fashion-mnist", None, None)
    exp = registry.get("dtc-plateau")
    trained = []
    monkeypatch.setattr(Runner, "_train", lambda self, cfg, run_dir, what, rel: trained.append(cfg.name) or True)
    runner = Runner(exp, str(tmp_path), "smoke", base, log=lambda *a: None, only=["ToMe"])
    evit = next(c for c in exp.cells if c.label == "EViT")
    cfg, _ = runner.cell_config(evit, 0)
    (tmp_path / "runs" / cfg.name).mkdir(parents=True)
    (tmp_path / "runs" / cfg.name / "summary.json").write_text("{}")
    record = runner.run()
    assert [c["label"] for c in record["cells"]] == [c.label for c in exp.cells]
    runs = {c["label"]: [r["run_dir"] for r in c["runs"]] for c in record["cells"]}
    assert runs["EViT"] == [os.path.join("runs", cfg.name)] and runs["ViT (dense)"] == []
    assert len(trained) == 1 and trained[0].startswith("tome-") and len(runs["ToMe"]) == 1
    assert record["only"] == ["ToMe"]
    with open(tmp_path / exp.name / "experiment.json") as f:
        assert json.load(f)["cells"] == record["cells"]


def test_only_seed_trains_that_seed_and_records_the_others(monkeypatch, tmp_path):
    """--only-seed S: seed S is trained, another seed is recorded when its run is finished (a record
    copied back from another machine) and left out otherwise; a seed beyond --seeds is refused."""
    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner, base_config
    base = base_config("smoke", "fashion-mnist", None, None)
    exp = registry.get("dtc-plateau")
    trained = []
    monkeypatch.setattr(Runner, "_train", lambda self, cfg, run_dir, what, rel: trained.append(cfg.seed) or True)
    runner = Runner(exp, str(tmp_path), "smoke", base, seeds=3, log=lambda *a: None, only_seeds=[1])
    dense = exp.cells[0]
    finished = tmp_path / runner.train_cell(dense)["runs"][0]["run_dir"].replace("seed1", "seed2")
    assert trained == [1] and runner.record["only_seeds"] == [1]
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text("{}")
    trained.clear()
    assert [r["seed"] for r in runner.train_cell(dense)["runs"]] == [1, 2] and trained == [1]
    for bad in ([3], [-1]):
        with pytest.raises(ValueError, match=f"--only-seed {bad[0]} is not one of the 3 seed"):
            Runner(exp, str(tmp_path), "smoke", base, seeds=3, only_seeds=bad)


def _restored(done, tmp_path, name):
    """A fresh --out holding what a new machine has after copying the committed records back:
    every run's summary.json or segment.json (no weights) and experiment ``name``'s record. (record,
    out, args)."""
    import shutil
    first = _record(done, name)
    out = tmp_path / "restored"
    for run in (r for cell in first["cells"] for r in cell["runs"]):
        (out / run["run_dir"]).mkdir(parents=True, exist_ok=True)
        for kept in ("summary.json", "segment.json"):
            if os.path.isfile(os.path.join(done, run["run_dir"], kept)):
                shutil.copy(os.path.join(done, run["run_dir"], kept), out / run["run_dir"])
    (out / name).mkdir()
    shutil.copy(os.path.join(done, name, "experiment.json"), out / name)
    return first, out, ["--scale", "smoke", "--data-dir", os.path.join(os.path.dirname(done), "fm"), "--out", str(out)]


def test_guidance_record_of_runs_whose_weights_are_gone(done, tmp_path, capsys):
    """plateau-guidance re-recorded from committed summaries alone (weights lost with a machine): the
    unguided K 20 row needs no weights, a guided run keeps the missing / shuffled / random top-1 of the
    experiment's earlier record in --out, and without that record it is recorded without them (said
    in the log) instead of failing on the missing weights."""
    first, out, common = _restored(done, tmp_path, "plateau-guidance")
    capsys.readouterr()
    assert main(["experiment", "run", "plateau-guidance", *common, "--record-only"]) == 0
    guided = [c for c in first["cells"] if c["train"].get("guidance")]
    assert len(guided) == 3 and all(r.get("modes") for c in guided for r in c["runs"])
    assert capsys.readouterr().out.count("weights gone, guidance modes from the earlier record") == len(guided)
    again = _record(str(out), "plateau-guidance")
    assert [[r.get("modes") for r in c["runs"]] for c in again["cells"]] == \
        [[r.get("modes") for r in c["runs"]] for c in first["cells"]]
    (out / "plateau-guidance" / "experiment.json").unlink()
    assert main(["experiment", "run", "plateau-guidance", *common, "--record-only"]) == 0
    assert capsys.readouterr().out.count("no guidance modes in the earlier record: recorded without them") == len(guided)
    bare = _record(str(out), "plateau-guidance")
    assert [len(c["runs"]) for c in bare["cells"]] == [len(c["runs"]) for c in first["cells"]]
    assert not any(r.get("modes") for c in bare["cells"] for r in c["runs"])


def test_segmentation_record_of_runs_whose_weights_are_gone(done, tmp_path, capsys):
    """figure1bc re-recorded from committed segment.json files alone: each segmenter keeps its mIoU
    points from the earlier record in --out instead of failing on the missing weights; without that
    record it is left out, said in the log."""
    first, out, common = _restored(done, tmp_path, "figure1bc")
    capsys.readouterr()
    assert main(["experiment", "run", "figure1bc", *common, "--record-only"]) == 0
    assert capsys.readouterr().out.count("weights gone, points from the earlier record") == len(first["cells"])
    again = _record(str(out), "figure1bc")
    assert [[(r["seed"], r["points"], r["curve"]) for r in c["runs"]] for c in again["cells"]] == \
        [[(r["seed"], r["points"], r["curve"]) for r in c["runs"]] for c in first["cells"]]
    (out / "figure1bc" / "experiment.json").unlink()
    assert main(["experiment", "run", "figure1bc", *common, "--record-only"]) == 0
    assert capsys.readouterr().out.count("no points in the earlier record: left out") == len(first["cells"])
    assert not any(c["runs"] for c in _record(str(out), "figure1bc")["cells"])


def test_record_includes_runs_another_process_finished_meanwhile(monkeypatch, tmp_path):
    """Two processes share --out, each training one seed: the one that finishes last writes the
    record, and it holds the other's run even though that run was unfinished when this process
    looked at its cell (the plateau-table7 record of 2026-11-29 lacked it); a run still unfinished
    at the end stays out."""
    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner, base_config
    base = base_config("smoke", "fashion-mnist", None, None)
    exp = registry.get("plateau-table7")
    logs = []
    runner = Runner(exp, str(tmp_path), "smoke", base, seeds=3, log=logs.append, only=["+DTC"], only_seeds=[1])
    dirs = {}

    def train(self, cfg, run_dir, what, rel):  # seed 1 trains; meanwhile "the other process" ends seed 0
        os.makedirs(run_dir)
        open(os.path.join(run_dir, "summary.json"), "w").write("{}")
        other = run_dir.replace("seed1", "seed0")
        os.makedirs(other)
        open(os.path.join(other, "summary.json"), "w").write("{}")
        dirs.update(mine=rel, other=os.path.relpath(other, str(tmp_path)))
        return True

    monkeypatch.setattr(Runner, "_train", train)
    rec = runner.run()
    cell = next(c for c in rec["cells"] if c["label"] == "+DTC")
    assert cell["runs"] == [{"seed": 0, "run_dir": dirs["other"]}, {"seed": 1, "run_dir": dirs["mine"]}]
    assert f"[plateau-table7] +DTC seed 0: finished meanwhile ({dirs['other']})" in logs
    assert _record(str(tmp_path), "plateau-table7")["cells"] == rec["cells"]


def test_budget_sweep_takes_the_earlier_points_of_a_run_whose_weights_are_gone(done, tmp_path, capsys):
    """A run restored from its committed summary (weights lost with a machine) keeps the budget
    points of the experiment's earlier record in --out; a run that record has no points of is left
    out and named in the log; without any earlier record the error names the run."""
    first, out, common = _restored(done, tmp_path, "figure1a")
    capsys.readouterr()
    assert main(["experiment", "run", "figure1a", *common, "--record-only"]) == 0
    runs = [run for cell in first["cells"] for run in cell["runs"]]
    assert capsys.readouterr().out.count("weights gone, budget points from the earlier record") == len(runs) > 0
    again = _record(str(out), "figure1a")
    assert [[r["points"] for r in c["runs"]] for c in again["cells"]] == [[r["points"] for r in c["runs"]]
                                                                           for c in first["cells"]]
    assert all(r["points_from"] == first["finished"] for c in again["cells"] for r in c["runs"])
    assert main(["experiment", "run", "figure1a", *common, "--record-only"]) == 0  # recorded again: same date
    assert all(r["points_from"] == first["finished"] for c in _record(str(out), "figure1a")["cells"] for r in c["runs"])
    lost = json.loads((out / "figure1a" / "experiment.json").read_text())
    del lost["cells"][1]["runs"][0]["points"]
    (out / "figure1a" / "experiment.json").write_text(json.dumps(lost))
    assert main(["experiment", "run", "figure1a", *common, "--record-only"]) == 0
    log = capsys.readouterr().out
    assert f"{lost['cells'][1]['label']} seed 0: weights gone" in log and "no budget points in the earlier record: left out" in log
    kept = _record(str(out), "figure1a")
    assert [r["seed"] for r in kept["cells"][1]["runs"]] == [r["seed"] for r in first["cells"][1]["runs"]][1:]
    assert [[r["points"] for r in c["runs"]] for i, c in enumerate(kept["cells"]) if i != 1] == \
        [[r["points"] for r in c["runs"]] for i, c in enumerate(first["cells"]) if i != 1]
    # another budget experiment's record in --out that swept the same run (same run_dir and seed) gives them back
    (out / "other-curve").mkdir()
    other = dict(experiment="other-curve", finished="2026-01-02 03:04:05", cells=[first["cells"][1]])
    (out / "other-curve" / "experiment.json").write_text(json.dumps(other))
    assert main(["experiment", "run", "figure1a", *common, "--record-only"]) == 0
    assert f"{lost['cells'][1]['label']} seed 0: weights gone, budget points from other-curve's record" in \
        capsys.readouterr().out
    back = _record(str(out), "figure1a")["cells"][1]["runs"]
    assert [r["points"] for r in back] == [r["points"] for r in first["cells"][1]["runs"]]
    assert back[0]["points_from"] == "2026-01-02 03:04:05"
    # ... but not points swept at other budgets than today's (an older BUDGETS)
    moved = json.loads(json.dumps(other))
    for r in moved["cells"][0]["runs"]:
        r["points"][0]["knob"] = 0.123
    (out / "other-curve" / "experiment.json").write_text(json.dumps(moved))
    (out / "figure1a" / "experiment.json").write_text(json.dumps(lost))
    assert main(["experiment", "run", "figure1a", *common, "--record-only"]) == 0
    assert "no budget points in the earlier record: left out" in capsys.readouterr().out
    (out / "other-curve" / "experiment.json").unlink()
    (out / "figure1a" / "experiment.json").unlink()
    assert main(["experiment", "run", "figure1a", *common, "--record-only"]) != 0
    err = capsys.readouterr().err
    assert "last.safetensors is missing" in err and "does not exist" in err
    (out / "figure1a" / "experiment.json").write_text("{")
    assert main(["experiment", "run", "figure1a", *common, "--record-only"]) != 0
    assert "experiment.json is not a readable experiment record" in capsys.readouterr().err


def _fake_record(root, cells: dict) -> str:
    """A training record under ``root``: {label: {seed: (top1, gmacs)}}, one summary.json per run."""
    exp = {"experiment": "t", "title": "T", "kind": "train", "scale": "full", "dataset": "d", "model": "m",
           "epochs": 1, "seeds": 2, "cells": []}
    for i, (label, runs) in enumerate(cells.items()):
        cell = {"label": label, "kwargs": {}, "runs": []}
        for seed, (top1, gmacs) in runs.items():
            run_dir = f"runs/c{i}/seed{seed}"
            os.makedirs(os.path.join(root, run_dir))
            with open(os.path.join(root, run_dir, "summary.json"), "w") as f:
                json.dump({"rows": [{"top1": top1, "gmacs": gmacs}]}, f)
            cell["runs"].append({"seed": seed, "run_dir": run_dir})
        exp["cells"].append(cell)
    os.makedirs(os.path.join(root, "t"))
    with open(os.path.join(root, "t", "experiment.json"), "w") as f:
        json.dump(exp, f)
    return os.path.join(root, "t")


def test_headline_table_by_hand_and_in_the_readme(tmp_path, capsys):
    """benchmarks/headline.py: rows by mean top-1, GMACs as a share of dense, each method's top-1 minus
    the reference's seed by seed (hand-computed below), only on the seeds both have; the README's table is
    the one the committed Table 5 record generates."""
    mod = benchmark_script("headline")
    exp = _fake_record(str(tmp_path), {
        "dense": {0: (90.00, 0.04), 1: (89.00, 0.04)},
        "ref": {0: (91.00, 0.02), 1: (89.50, 0.02)},
        "other": {0: (90.50, 0.03), 1: (89.75, 0.03)},
        "no seed 0": {1: (88.00, 0.01), 2: (88.00, 0.01)},   # seed 2: the reference has none
        "unrun": {}})
    assert mod.table(exp, reference="ref", dense="dense").splitlines()[2:] == [
        "| **ref** | 50 | 90.25 ± 1.06 | — | 2 |",
        "| other | 75 | 90.12 ± 0.53 | -0.50, +0.25 | 2 |",
        "| dense | 100 | 89.50 ± 0.71 | -1.00, -0.50 | 2 |",
        "| no seed 0 | 25 | 88.00 ± 0.00 | -1.50 | 2 |"]
    with pytest.raises(ValueError, match="no finished run of 'unrun'"):
        mod.table(exp, reference="unrun", dense="dense")
    readme = tmp_path / "README.md"
    readme.write_text("# X\n\nbefore\n")
    assert mod.main([exp, "--reference", "ref", "--dense", "dense", "--readme", str(readme)]) == 1 and readme.read_text() == "# X\n\nbefore\n"
    assert "no headline markers" in capsys.readouterr().err
    begin = mod.BEGIN.format(src=exp)
    readme.write_text(f"before\n{begin}\n| stale |\n{mod.END}\nafter\n")
    assert mod.main([exp, "--reference", "ref", "--dense", "dense", "--readme", str(readme)]) == 0
    assert readme.read_text() == f"before\n{begin}\n{mod.table(exp, 'ref', 'dense')}\n{mod.END}\nafter\n"
    root = os.path.join(os.path.dirname(__file__), "..")
    src = "benchmarks/results/dtc/full/table5"
    with open(os.path.join(root, "README.md")) as f:
        text = f.read()
    assert f"{mod.BEGIN.format(src=src)}\n{mod.table(os.path.join(root, src))}\n{mod.END}" in text, \
        "README's headline table differs from its record: python benchmarks/headline.py " + src + " --readme README.md"


def test_run_hours_counts_each_run_once_with_every_epoch(tmp_path, capsys):
    """benchmarks/run_hours.py: a run shared by two experiments counts once (named by both), its
    seconds are its epochs' (step lines ignored), core-hours weight by threads; a segmentation run
    counts by its train_seconds, one recorded without them not at all. Totals by hand."""
    mod = benchmark_script("run_hours")
    root = tmp_path / "rec"

    def write(rel, rec):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(rec))

    epoch = lambda s: {"kind": "epoch", "epoch_seconds": s}  # noqa: E731
    write("runs/a/seed0/summary.json", {"threads": 2, "epochs": [epoch(1800), {"kind": "step"}, epoch(1800)]})
    write("runs/a/seed1/summary.json", {"threads": 2, "epochs": [epoch(3600)]})
    write("runs/b/seed0/summary.json", {"threads": 1, "epochs": [epoch(5400)]})
    write("runs/seg/seed0/segment.json", {"train_seconds": 1800.0, "provenance": {"threads": 1}})
    write("runs/seg/seed1/segment.json", {"results": {}})  # recorded before train_seconds
    for exp, label in (("t5", "dense"), ("t7", "ViT")):
        write(f"{exp}/experiment.json", {"experiment": exp, "cells": [
            {"label": label, "runs": [{"seed": 0, "run_dir": "runs/a/seed0"}, {"seed": 1, "run_dir": "runs/a/seed1"}]}]})
    assert mod.table(mod.runs(str(root))).splitlines()[2:] == [
        "| runs/a | dense (t5, t7) | 2 | 2.0 | 4.0 |",
        "| runs/b | — | 1 | 1.5 | 1.5 |",
        "| runs/seg | — | 1 | 0.5 | 0.5 |",
        "| **total** | | **4 runs** | **4.0** | **6.0** |"]
    assert mod.main([str(tmp_path)]) == 2 and "no runs/ folder" in capsys.readouterr().err


def test_commit_records_folds_a_run_and_keeps_a_restored_record(tmp_path):
    """benchmarks/commit_records.py: a finished run's summary gets its config, spec and epochs
    folded in; a committed record copied back into --out (no config.yaml beside it) is kept as it was."""
    mod = benchmark_script("commit_records")
    out = tmp_path / "exp"
    fresh, restored = out / "runs" / "a" / "seed1", out / "runs" / "a" / "seed0"
    fresh.mkdir(parents=True)
    restored.mkdir(parents=True)
    (fresh / "summary.json").write_text(json.dumps({"rows": [{"top1": 1.0}]}))
    (fresh / "config.yaml").write_text("seed: 1\n")
    (fresh / "model.json").write_text(json.dumps({"name": "m"}))
    (fresh / "metrics.jsonl").write_text('{"kind": "step"}\n{"kind": "epoch", "epoch": 0}\n')
    old = {"rows": [{"top1": 2.0}], "config": {"seed": 0}, "model_spec": {"name": "m"}, "epochs": []}
    (restored / "summary.json").write_text(json.dumps(old))
    (out / "x").mkdir()
    cells = [{"runs": [{"seed": 0, "run_dir": "runs/a/seed0"}, {"seed": 1, "run_dir": "runs/a/seed1"}]}]
    (out / "x" / "experiment.json").write_text(json.dumps({"experiment": "x", "cells": cells}))
    dest = tmp_path / "dest"
    assert mod.main(str(out / "x"), str(dest)) == 0
    assert json.loads((dest / "runs/a/seed0/summary.json").read_text()) == old
    new = json.loads((dest / "runs/a/seed1/summary.json").read_text())
    assert new["config"] == {"seed": 1} and new["model_spec"] == {"name": "m"} and new["epochs"] == [{"kind": "epoch", "epoch": 0}]


def test_commit_records_replaces_the_generated_block_in_the_docs(done, tmp_path, capsys):
    """commit_records.py --docs: the block generated from the record being replaced is swapped for the new
    record's block, text around it untouched; a first record or a hand-edited block leaves the docs as they
    were and prints the block to paste (exit 1), the records written all the same."""
    mod = benchmark_script("commit_records")
    dest, docs = tmp_path / "results", tmp_path / "results.md"
    docs.write_text("# Results\n\nProse before.\n")
    assert mod.main(os.path.join(done, "table7"), str(dest), str(docs)) == 1   # first record: nothing to replace
    assert "has no block of it yet" in capsys.readouterr().err and docs.read_text() == "# Results\n\nProse before.\n"
    new = mod.generated_block(str(dest / "table7"))
    assert new.startswith("Scale `smoke`") and "| +DTC |" in new and "commit" in new
    # an older record of it, whose block the docs hold between hand-written paragraphs
    rec_path = dest / "table7" / "experiment.json"
    rec = json.loads(rec_path.read_text())
    rec["finished"] = "2000-01-01 00:00:00"
    rec_path.write_text(json.dumps(rec))
    old = mod.generated_block(str(dest / "table7"))
    assert "recorded 2000-01-01 00:00:00" in old and old != new
    docs.write_text(f"# Results\n\nProse before.\n\n{old}\n\n- a bullet of prose\n\nProse after.\n")
    assert mod.main(os.path.join(done, "table7"), str(dest), str(docs)) == 0
    assert docs.read_text() == f"# Results\n\nProse before.\n\n{new}\n\n- a bullet of prose\n\nProse after.\n"
    # a block edited by hand is not overwritten
    edited = docs.read_text().replace("| +DTC |", "| +DTC (edited) |")
    docs.write_text(edited)
    rec_path.write_text(json.dumps(rec))
    assert mod.main(os.path.join(done, "table7"), str(dest), str(docs)) == 1
    assert "paste this block" in capsys.readouterr().err and docs.read_text() == edited
    assert json.loads(rec_path.read_text())["finished"] != "2000-01-01 00:00:00"   # the records still written
    # a previous record that can no longer be reported does not stop the new one being written
    rec_path.write_text("{not json")
    assert mod.main(os.path.join(done, "table7"), str(dest), str(docs)) == 1
    assert "previous record could not be reported" in capsys.readouterr().err and docs.read_text() == edited
    assert json.loads(rec_path.read_text())["experiment"] == "table7"


def _plateau_twins():
    """The full-scale base config and dtc-plateau's seed-1 config of each of its cells, by label: the runs
    a regularised-recipe experiment shares."""
    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner, base_config
    full = base_config("full", "fashion-mnist", None, None)
    plateau = Runner(registry.get("dtc-plateau"), "/x", "full", full)
    return full, {c.label: plateau.cell_config(c, 1)[0] for c in plateau.exp.cells}


def test_plateau_drop_path_shares_the_plateau_runs_and_adds_only_stochastic_depth():
    """The regularised-recipe experiment: its cells without drop path are dtc-plateau's runs (nothing
    trained twice); each drop-path cell is its twin's config with drop_path 0.1 and nothing else, and
    the model rebuilt from its spec drops paths (timm's linear rule: none at block 0, 0.1 at the last)."""
    import timm

    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner
    from adaptivision.train.build import model_spec
    full, twins = _plateau_twins()
    runner = Runner(registry.get("plateau-drop-path"), "/x", "full", full)
    regularised = 0
    for cell in runner.exp.cells:
        cfg, _ = runner.cell_config(cell, 1)
        if not cell.label.endswith(", drop path 0.1"):
            assert cfg == twins[cell.label], cell.label
            continue
        twin = twins[cell.label.removesuffix(", drop path 0.1")]
        assert cfg.drop_path == 0.1 and twin.drop_path == 0.0 and cfg.name != twin.name
        assert dataclasses.replace(cfg, drop_path=0.0, name=twin.name) == twin
        rates = []
        for c in (cfg, twin):
            spec = model_spec(c, 10, dense=cell.kwargs.get("reduction") == "none")
            model = timm.create_model(spec["name"], num_classes=10, **spec["kwargs"])
            rates.append([getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks])
        assert rates[0][-1] == pytest.approx(0.1) and rates[0][0] == 0.0 and not any(rates[1])
        regularised += 1
    assert regularised == 3


def test_plateau_patch_drop_shares_the_plateau_runs_and_adds_only_patch_drops():
    """Random patch drops in training: the cells without are dtc-plateau's runs and Random keep is
    Table 5's cell (nothing trained twice); each patch-drop cell is its twin's config with
    patch_drop_rate 0.25 in the model options and nothing else, and its model, rebuilt from the spec,
    drops patches in training while the twin's does not."""
    import timm

    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner
    from adaptivision.train.build import model_spec
    full, twins = _plateau_twins()
    exp = registry.get("plateau-patch-drop")
    runner = Runner(exp, "/x", "full", full)
    assert registry.BASELINES[1].label == "Random keep" and registry.BASELINES[1] in registry.get("table5").cells
    dropping = 0
    for cell in exp.cells:
        if cell is registry.BASELINES[1]:
            continue
        cfg, _ = runner.cell_config(cell, 1)
        if not cell.label.endswith(", patch drop 0.25"):
            assert cfg == twins[cell.label], cell.label
            continue
        twin = twins[cell.label.removesuffix(", patch drop 0.25")]
        assert cfg.model_kwargs == dict(twin.model_kwargs, patch_drop_rate=0.25) and cfg.name != twin.name
        assert dataclasses.replace(cfg, model_kwargs=twin.model_kwargs, name=twin.name) == twin
        rates = [timm.create_model(s["name"], num_classes=10, **s["kwargs"]).patch_drop_rate
                 for s in (model_spec(c, 10, dense=cell.kwargs.get("reduction") == "none") for c in (cfg, twin))]
        assert rates == [0.25, 0.0]
        dropping += 1
    assert dropping == 3 and len(exp.cells) == 7  # dense, K 20 and ToMe r = 6, each with and without
    curve = registry.get("patch-drop-curve")  # evaluates these runs at several budgets, trains nothing new
    assert curve.kind == "budget" and all(c in exp.cells for c in curve.cells) and len(curve.cells) == 6


def test_low_budget_cells_change_only_the_budget_of_the_patch_drop_runs():
    """plateau-low-budget: its K 20 / r = 6 cells are plateau-patch-drop's runs (nothing trained twice); the
    DTC cell trained for the low budget is the K 20 + drops config with K 12 (K 8-49) and nothing else, the
    ToMe cell the r = 6 + drops config with r = 8; both cost less at the same input (DTC's K 12 near 52% of
    the dense GMACs, ToMe's r = 8 near 50%), and the curve evaluates exactly these four runs."""
    import timm
    import torch

    from adaptivision.config import ModelOptions
    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner, base_config
    from adaptivision.profile import profile
    from adaptivision.train.build import model_spec
    full = base_config("full", "fashion-mnist", None, None)
    drops = Runner(registry.get("plateau-patch-drop"), "/x", "full", full)
    shared = {c.label: drops.cell_config(c, 1)[0] for c in drops.exp.cells}
    runner = Runner(registry.get("plateau-low-budget"), "/x", "full", full)
    new = {}
    for cell in runner.exp.cells:
        cfg, _ = runner.cell_config(cell, 1)
        if cell.label in shared:
            assert cfg == shared[cell.label], cell.label
        else:
            new[cell.label] = cfg
    k20, r6 = (shared[c.label] for c in registry.LEVER_CELLS[56:58])
    k12, r8 = (new[c.label] for c in registry.LEVER_CELLS[58:60])
    assert k12.model_kwargs == dict(k20.model_kwargs, k_mid=12, k_min=8) and k12.name != k20.name
    # r = 8 is ToMe's default, so the run's options leave it out (and its name stays that of the first such run)
    assert r8.model_kwargs.get("tome_r", ModelOptions.tome_r) == 8 and r8.name != r6.name
    assert dict(r8.model_kwargs, tome_r=8) == dict(r6.model_kwargs, tome_r=8)
    assert dataclasses.replace(k12, model_kwargs=k20.model_kwargs, name=k20.name) == k20
    assert dataclasses.replace(r8, model_kwargs=r6.model_kwargs, name=r6.name) == r6
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    gmacs = {}
    for key, cfg in dict(dense=shared[registry.LEVER_CELLS[55].label], k20=k20, k12=k12, r6=r6, r8=r8).items():
        spec = model_spec(cfg, 10, dense=key == "dense")
        model = timm.create_model(spec["name"], num_classes=10, **spec["kwargs"]).eval()
        gmacs[key] = profile(model, x)["gmacs"]
    assert 0.45 < gmacs["k12"] / gmacs["dense"] < 0.58 < gmacs["k20"] / gmacs["dense"]
    assert 0.45 < gmacs["r8"] / gmacs["dense"] < 0.55 < gmacs["r6"] / gmacs["dense"]
    curve = registry.get("low-budget-curve")
    assert curve.kind == "budget" and curve.cells == runner.exp.cells


def test_patch_drop_rate_cells_change_only_the_rate_of_the_patch_drop_runs():
    """plateau-patch-drop-rate: its rate-0.25 cells are plateau-patch-drop's runs (nothing trained twice), each
    new cell is one of them with patch_drop_rate 0.4 and nothing else (so the same cost at evaluation, where no
    patch is dropped), and the curve evaluates exactly these four runs."""
    import timm
    import torch

    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner, base_config
    from adaptivision.profile import profile
    from adaptivision.train.build import model_spec
    full = base_config("full", "fashion-mnist", None, None)
    drops = Runner(registry.get("plateau-patch-drop"), "/x", "full", full)
    shared = {c.label: drops.cell_config(c, 1)[0] for c in drops.exp.cells}
    runner = Runner(registry.get("plateau-patch-drop-rate"), "/x", "full", full)
    cfgs = {c.label: runner.cell_config(c, 1)[0] for c in runner.exp.cells}
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    for low, high in ((56, 60), (57, 61)):
        base, heavy = (cfgs[registry.LEVER_CELLS[i].label] for i in (low, high))
        assert base == shared[registry.LEVER_CELLS[low].label]
        assert base.model_kwargs["patch_drop_rate"] == 0.25
        assert heavy.model_kwargs == dict(base.model_kwargs, patch_drop_rate=0.4) and heavy.name != base.name
        assert dataclasses.replace(heavy, model_kwargs=base.model_kwargs, name=base.name) == base
        gmacs = []
        for cfg in (base, heavy):
            spec = model_spec(cfg, 10, dense=False)
            gmacs.append(profile(timm.create_model(spec["name"], num_classes=10, **spec["kwargs"]).eval(), x)["gmacs"])
        assert gmacs[0] == gmacs[1]
    curve = registry.get("patch-drop-rate-curve")
    assert curve.kind == "budget" and curve.cells == runner.exp.cells


def test_learned_keep_baselines_train_at_a_quarter_of_the_lr_in_the_tables():
    """DynamicViT and ToFe collapse from scratch at the shared peak lr (docs/results.md, "Learned keep predictors
    collapse"): table5, figure1a and table1 train them at a quarter of the scale's lr (of the paper scale's too)
    with the gradient norm clipped at 1.0, and nothing else differs from their earlier cells; every other method keeps its cell (and its runs), and the gradient clip is
    what the built training config gets. Table 5's paper form gets the same fix in a row of its own."""
    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner, base_config
    full = base_config("full", "fashion-mnist", None, None)
    old = {c.kwargs["reduction"]: c for c in registry.BASELINES}
    fair = {c.kwargs["reduction"]: c for c in registry.FAIR_BASELINES}
    assert fair.keys() == old.keys()
    for name in ("table5", "figure1a", "table1"):
        cells = registry.get(name).cells
        assert not {c.label for c in cells} & {old[r].label for r in ("importance", "tofe")}, name
        assert fair["importance"] in cells and fair["tofe"] in cells, name
        runner = Runner(registry.get(name), "/x", "full", full)
        for cell in cells:
            red = cell.kwargs.get("reduction")
            if cell in fair.values() and red in ("importance", "tofe"):
                cfg, _ = runner.cell_config(cell, 1)
                before, _ = runner.cell_config(old[red], 1)
                assert cfg.clip_grad == 1.0 and before.clip_grad is None and cfg.name != before.name
                assert cfg.base_lr == pytest.approx(full.base_lr / 4) and before.base_lr == full.base_lr
                assert dataclasses.replace(cfg, clip_grad=None, base_lr=before.base_lr, name=before.name) == before
    for red in ("none", "random", "evit", "tome", "hourglass", "hired", "dtc"):
        assert fair[red] is old[red] and fair[red] in registry.get("table5").cells
    # the fine-tuning cells (a tenth of the lr, no collapse) keep theirs
    assert all(c.train.get("clip_grad") is None for c in registry.get("dtc-finetune").cells)
    # the share follows the scale's lr: the paper recipe's base_lr is 32x smaller than the nano recipe's
    paper = Runner(registry.get("table5"), "/x", "paper", base_config("paper", "imagenet", None, None))
    unmatched = dataclasses.replace(fair["importance"], match_gmacs=False)  # (matching probes the data set)
    assert paper.base.base_lr < full.base_lr / 4
    assert paper.cell_config(unmatched, 1)[0].base_lr == pytest.approx(paper.base.base_lr / 4)
    # the paper form collapses the same way at the plateau: its fair row (appended, so the other rows keep their runs)
    # is the plain paper form's config with the same two changes, and the plain row stays for its recorded runs
    t5 = Runner(registry.get("table5"), "/x", "full", full)
    cells = registry.get("table5").cells
    assert cells[-1] is registry.PAPER_FORM_FAIR and registry.PAPER_FORM in cells
    cfg, _ = t5.cell_config(registry.PAPER_FORM_FAIR, 1)
    before, _ = t5.cell_config(registry.PAPER_FORM, 1)
    assert (cfg.clip_grad, before.clip_grad) == (1.0, None) and cfg.base_lr == pytest.approx(full.base_lr / 4)
    assert dataclasses.replace(cfg, clip_grad=None, base_lr=before.base_lr, name=before.name) == before
    assert cfg.model_kwargs["clustering"] == "paper" and cfg.name != before.name


def test_plateau_ablations_change_one_thing_of_the_k20_default_and_share_its_runs(done):
    """Table 7, Table 4, the variants and the guidance rows at the plateau ablate today's default (Table 5's
    K 20 row), not the pinned options of the plain "dtc" cells (an older model): every DTC cell is the K 20
    row's config with only its own options or guidance changed, the unchanged rows are Table 5's K 20 and
    dense runs (nothing trained twice), the built model has the K 20 options and the cell's, and each
    experiment runs end to end (its smoke record has every cell, the guided ones with their guidance
    missing, shuffled and replaced by noise)."""
    from adaptivision.experiments import registry
    from adaptivision.experiments.runner import Runner, base_config
    from adaptivision.train.build import create_model, model_spec
    full = base_config("full", "fashion-mnist", None, None)
    t5 = Runner(registry.get("table5"), "/x", "full", full)
    k20_cell = next(c for c in t5.exp.cells if c.label.startswith("AdaptiVision (DTC), K 20"))
    k20, dense = t5.cell_config(k20_cell, 1)[0], t5.cell_config(registry.DENSE, 1)[0]
    table7 = Runner(registry.get("table7"), "/x", "full", full)
    assert table7.cell_config(table7.exp.cells[2], 1)[0].name != k20.name  # the plain cell: another model
    sal = "text,saliency"
    want = {
        ("plateau-table7", "+DTC"): ({"afa": False}, "none"),
        ("plateau-table7", "+DTC+AFA"): ({}, "none"),
        ("plateau-table7", "+DTC+AFA+CMTF (text + saliency)"): ({}, sal),
        ("plateau-table4", "tau = 20"): ({}, "none"),
        ("plateau-table4", "tau = 100"): ({"tau": 100.0}, "none"),
        ("plateau-table4", "tau = 150"): ({"tau": 150.0}, "none"),
        ("plateau-variants", "sound defaults"): ({}, "none"),
        ("plateau-variants", "normalize=False (eq. 3 literal sum)"): ({"normalize": False}, "none"),
        ("plateau-variants", "norm='post' (eq. 7 literal)"): ({"norm": "post"}, "none"),
        ("plateau-variants", "gate='paper' (eq. 10 literal; text + saliency)"): ({"gate": "paper"}, sal),
        ("plateau-variants", "gate='gated' (default; text + saliency)"): ({}, sal),
        ("plateau-guidance", "no guidance (DTC+AFA)"): ({}, "none"),
        ("plateau-guidance", "saliency"): ({}, "saliency"),
        ("plateau-guidance", "foreground mask"): ({}, "mask"),
        ("plateau-guidance", "text + saliency"): ({}, sal),
    }
    got, names = {}, {}
    for name in PLATEAU_ABLATIONS:
        runner = Runner(registry.get(name), "/x", "full", full)
        for cell in runner.exp.cells:
            cfg = runner.cell_config(cell, 1)[0]
            if cell.kwargs["reduction"] == "none":
                assert cfg == dense, name
                continue
            extra = {k: v for k, v in cfg.model_kwargs.items() if k20.model_kwargs.get(k, object()) != v}
            assert set(k20.model_kwargs) <= set(cfg.model_kwargs), (name, cell.label)
            unchanged = dataclasses.replace(cfg, model_kwargs=k20.model_kwargs, guidance="none", name=k20.name)
            assert unchanged == k20, (name, cell.label)
            got[(name, cell.label)] = (extra, cfg.guidance)
            names.setdefault((tuple(sorted(extra.items())), cfg.guidance), set()).add(cfg.name)
            opts = create_model(model_spec(cfg, 10, dense=False)).opts
            for key, value in dict(k20_cell.kwargs, **extra).items():
                assert getattr(opts, key) == value or (key == "condense_at" and [s.block for s in opts.stages] == [value])
    assert got == want
    assert all(len(n) == 1 for n in names.values())  # equal configurations, one run
    assert names[((), "none")] == {k20.name} and len({n for v in names.values() for n in v}) == len(names)
    # the smoke runs: every cell finished, the unchanged row is Table 5's K 20 run there too
    smoke_k20 = {r["run_dir"] for c in _record(done, "table5")["cells"] if c["label"] == k20_cell.label for r in c["runs"]}
    for name in PLATEAU_ABLATIONS:
        rec = _record(done, name)
        assert [c["label"] for c in rec["cells"]] == [c.label for c in registry.get(name).cells]
        for c in rec["cells"]:
            assert c["runs"] and all("run_dir" in r for r in c["runs"]), (name, c["label"])
            if got.get((name, c["label"])) == ({}, "none"):
                assert {r["run_dir"] for r in c["runs"]} == smoke_k20, (name, c["label"])
            if name == "plateau-guidance" and got[(name, c["label"])][1] != "none":
                assert set(c["runs"][0]["modes"]) == {"missing", "shuffled", "random"}, c["label"]
