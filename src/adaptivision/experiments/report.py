"""``adaptivision report RUN_DIR... --out DIR``: Markdown tables in the paper's layout, mean ± std
over seeds, and PNG plots. Every cell comes from a file a run wrote; a run that is missing or
unfinished shows as missing, never as a number."""
from __future__ import annotations

import json
import os
import statistics
from typing import Optional

import torch
from timm.data import resolve_data_config

from ..train.build import build_eval_dataset, guidance_kwargs, load_for_eval, load_guidance
from ..visualize import visualize

MISSING = "—"


def mean_std(values: list, digits: int = 2) -> str:
    """How every table of the reports and benchmarks/ writes a cell: mean ± sample std over the
    values that exist (one value: the value alone; none: an em dash)."""
    values = [v for v in values if v is not None]
    if not values:
        return MISSING
    m = statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _short(commit: str) -> str:
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def _summary(exp_dir: str, run: dict, commits: Optional[dict] = None, label: str = "",
             threads: Optional[dict] = None) -> Optional[dict]:
    """The run's first summary row; ``commits``: collects {commit: [cell labels]} from its provenance,
    ``threads``: {threads of its images/s measurement: [cell labels]}."""
    path = os.path.join(exp_dir, "..", run["run_dir"], "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    if commits is not None:
        commit = (summary.get("provenance") or {}).get("commit") or "not recorded"
        commits.setdefault(_short(commit), []).append(label)
    if threads is not None:
        threads.setdefault(summary.get("threads", "not recorded"), []).append(label)
    return summary["rows"][0]


def seed_rows(rec: dict, exp_dir: str) -> dict:
    """{cell label: {seed: summary row}} of a training record's finished runs (unfinished ones left out)."""
    out = {}
    for cell in rec["cells"]:
        rows = {run["seed"]: _summary(exp_dir, run) for run in cell.get("runs", [])}
        out[cell["label"]] = {s: r for s, r in rows.items() if r is not None}
    return out


def _threads_note(threads: dict) -> Optional[str]:
    """Flag a table whose images/s were measured with different numbers of threads (runs trained
    as several one-thread processes at once, docs/results.md "Plateau scale"): not comparable."""
    if len(threads) < 2:
        return None
    parts = [f"{t}: {', '.join(sorted(set(labels)))}" for t, labels in sorted(threads.items(), key=str)]
    return ("MIXED THREADS: images/s measured with different thread counts, compare it only within one ("
            + "; ".join(parts) + ")")


def _run_commits(rec: dict) -> dict:
    """{commit: [cell labels]} of the runs of a segmentation / detection record."""
    commits: dict = {}
    for cell in rec["cells"]:
        for run in cell.get("runs", []):
            commits.setdefault(_short(run.get("commit") or "not recorded"), []).append(cell["label"])
    return commits


def _code_note(commits: dict) -> Optional[str]:
    """Which code produced the table: one commit, or the mix of commits flagged."""
    if not commits:
        return None
    if len(commits) == 1:
        return f"every run from commit {next(iter(commits))}"
    parts = [f"{c}: {', '.join(sorted(set(labels)))}" for c, labels in sorted(commits.items())]
    return "MIXED CODE: runs from several commits (" + "; ".join(parts) + ")"


def _train_table(rec: dict, exp_dir: str, notes: list) -> list:
    key = rec.get("key")
    knobs = any(c.get("knob") for c in rec["cells"])  # the matched setting of each baseline (Table 5)
    head = ["model"] + ([key] if key else []) + (["knob"] if knobs else []) + [
        "params (M)", "GMACs", "mean K", "top-1 (%)", "top-5 (%)", "images/s", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    commits: dict = {}
    threads: dict = {}
    for cell in rec["cells"]:
        rows = [r for r in (_summary(exp_dir, run, commits, cell["label"], threads) for run in cell.get("runs", []))
                if r is not None]
        if cell.get("status"):
            notes.append(f"{cell['label']}: {cell['status']}")
        elif not cell.get("runs"):
            notes.append(f"{cell['label']}: not run (no finished run recorded)")
        elif len(rows) < len(cell["runs"]) or not rows:
            notes.append(f"{cell['label']}: {len(cell['runs']) - len(rows)} run(s) missing or unfinished")
        knob = f"{cell['knob']}={cell['knob_value']}" if cell.get("knob") else MISSING
        mean_k = [statistics.fmean(r["mean_k"]) if r.get("mean_k") else None for r in rows]
        vals = [cell["label"]] + ([str(cell.get("key", MISSING))] if key else []) + ([knob] if knobs else []) + [
            mean_std([r["params_m"] for r in rows]), mean_std([r["gmacs"] for r in rows], 4), mean_std(mean_k, 1),
            mean_std([r["top1"] for r in rows]), mean_std([r["top5"] for r in rows]), mean_std([r["img_per_s"] for r in rows], 0),
            str(len(rows))]
        lines.append("| " + " | ".join(vals) + " |")
    notes.extend(n for n in (_code_note(commits), _threads_note(threads)) if n)
    return lines


def _guidance_table(rec: dict, exp_dir: str, notes: list) -> list:
    """Accuracy with the guidance the run was trained with, and with it missing / shuffled
    between images / replaced by noise (in brackets: the change from the first column)."""
    modes = ("missing", "shuffled", "random")
    head = ["run", "guidance", "lambda1", "lambda2", "GMACs", "mean K", "top-1 (%)"] + \
        [f"{m} (%)" for m in modes] + ["seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    commits: dict = {}
    for cell in rec["cells"]:
        runs = cell.get("runs", [])
        rows = [(run, r) for run, r in ((run, _summary(exp_dir, run, commits, cell["label"])) for run in runs)
                if r is not None]
        if cell.get("status"):
            notes.append(f"{cell['label']}: {cell['status']}")
        elif len(rows) < len(runs) or not rows:
            notes.append(f"{cell['label']}: {len(runs) - len(rows)} run(s) missing or unfinished")
        train = cell.get("train") or {}
        top1 = [r["top1"] for _, r in rows]
        vals = [cell["label"], train.get("guidance", "none"), str(train.get("lambda_cluster", 0)),
                str(train.get("lambda_align", 0)), mean_std([r["gmacs"] for _, r in rows], 4),
                mean_std([statistics.fmean(r["mean_k"]) if r.get("mean_k") else None for _, r in rows], 1),
                mean_std(top1)]
        for m in modes:
            pairs = [(run["modes"][m]["top1"], r["top1"]) for run, r in rows if m in (run.get("modes") or {})]
            if not pairs:
                vals.append(MISSING)
                continue
            delta = statistics.fmean(a - b for a, b in pairs)
            vals.append(f"{mean_std([a for a, _ in pairs])} ({delta:+.2f})")
        vals.append(str(len(rows)))
        lines.append("| " + " | ".join(vals) + " |")
    notes.append(_code_note(commits))
    return lines


def _plateau_note(rec: dict, out: str, name: str, plots: list) -> str:
    """Whether each segmenter reached its plateau: the evaluation mIoU its run recorded at ten
    points of training, plotted, and its change over the last two of them, seed by seed."""
    curves, gains = {}, []
    for cell in rec["cells"]:
        runs = [r for r in cell.get("runs", []) if len(r.get("curve", [])) >= 3]
        for r in runs:
            curves[f"{cell['label']}, seed {r['seed']}"] = [(c["step"], c["miou"]) for c in r["curve"]]
        if runs:
            gains.append(f"{cell['label']} " + ", ".join(f"{r['curve'][-1]['miou'] - r['curve'][-3]['miou']:+.2f}"
                                                         for r in runs))
    if not curves:
        return ""
    plots.append(plot_curves(out, f"{name}-training", "update", "evaluation mIoU (%)", curves,
                             f"{rec['title']}: during training"))
    return ("plateau check, evaluation mIoU gained over the last two tenths of training, seed by seed: "
            + "; ".join(gains))


def _budget(rec: dict, out: str, name: str, plots: list, metric: str = "top1", what: str = "top-1 (%)") -> list:
    lines = [f"| method | knob | GMACs | {what} | seeds |", "|---|---|---|---|---|"]
    curves = {}
    for cell in rec["cells"]:
        by_knob: dict = {}
        for run in cell.get("runs", []):
            for p in run.get("points", []):
                by_knob.setdefault(p["knob"], []).append(p)
        for knob, pts in by_knob.items():
            lines.append(f"| {cell['label']} | {MISSING if knob is None else knob} | {mean_std([p['gmacs'] for p in pts], 4)} | "
                         f"{mean_std([p[metric] for p in pts])} | {len(pts)} |")
            curves.setdefault(cell["label"], []).append(
                (statistics.fmean(p["gmacs"] for p in pts), statistics.fmean(p[metric] for p in pts)))
        if not by_knob:
            lines.append(f"| {cell['label']} | {MISSING} | {MISSING} | {MISSING} | 0 |")
    if curves:
        plots.append(plot_curves(out, name, "GMACs per image", what,
                           {k: sorted(v) for k, v in curves.items()}, rec["title"]))
    return lines


def _detection(rec: dict) -> list:
    """Table 3: mean ± std over seeds of each backbone's detector."""
    cols = [("mAP (%)", "map", 2), ("mAP50 (%)", "map50", 2), ("backbone GMACs", "backbone_gmacs", 4),
            ("detector GMACs", "gmacs", 4), ("images/s", "img_per_s", 0)]
    lines = ["| backbone | " + " | ".join(c[0] for c in cols) + " | seeds |", "|---|" + "---|" * (len(cols) + 1)]
    for cell in rec["cells"]:
        runs = cell.get("runs", [])
        lines.append(f"| {cell['label']} | " + " | ".join(mean_std([r.get(key) for r in runs], d) for _, key, d in cols)
                     + f" | {len(runs)} |")
    return lines


def _scaling(rec: dict, out: str, name: str, plots: list) -> list:
    cells = rec["cells"]
    if len(cells) < 2:
        return ["(needs a dense and an AdaptiVision cell)"]
    dense, av = cells[0], cells[1]
    lines = ["| image | tokens N | dense GMACs | AdaptiVision GMACs | GMACs ratio | dense ms/img | "
             "AdaptiVision ms/img | time ratio |", "|---|---|---|---|---|---|---|---|"]
    for d, a in zip(dense["points"], av["points"], strict=False):
        lines.append(f"| {d['img_size']} | {d['tokens']} | {d['gmacs']:.4f} | {a['gmacs']:.4f} | "
                     f"{d['gmacs'] / a['gmacs']:.2f}x | {d['ms_per_image']:.2f} | {a['ms_per_image']:.2f} | "
                     f"{d['ms_per_image'] / a['ms_per_image']:.2f}x |")
    for metric, label in (("gmacs", "GMACs per image"), ("ms_per_image", "ms per image")):
        plots.append(plot_curves(out, f"{name}_{metric}", "patch tokens N", label,
                           {c["label"]: [(p["tokens"], p[metric]) for p in c["points"]] for c in cells},
                           rec["title"], log=True))
    return lines


def _robustness(rec: dict) -> list:
    sets = sorted({s for c in rec["cells"] for s in c["results"]})
    lines = ["| model | " + " | ".join(f"{s} top-1 (%)" for s in sets) + " |", "|---|" + "---|" * len(sets)]
    for c in rec["cells"]:
        vals = [f"{c['results'][s]['top1']:.2f}" if s in c["results"] else MISSING for s in sets]
        lines.append(f"| {c['label']} | " + " | ".join(vals) + " |")
    return lines


def _pictures(rec: dict, exp_dir: str, out: str, name: str, notes: list, num: int = 2) -> list:
    """`adaptivision visualize` of the first finished AdaptiVision (DTC) run of the experiment."""
    for cell in rec["cells"]:
        if (cell.get("kwargs") or {}).get("reduction", "dtc") != "dtc" or cell.get("model"):
            continue
        for run in cell.get("runs", []):
            ckpt = os.path.join(exp_dir, "..", run["run_dir"], "best.safetensors")
            if not os.path.isfile(ckpt):
                continue
            try:
                model, cfg = load_for_eval(ckpt)
                ds = build_eval_dataset(cfg, model)
                xs = torch.stack([ds[i][0] for i in range(min(num, len(ds)))])
                names = [f"{name}-{cell['label']}-{i}".replace(" ", "_").replace("/", "_") for i in range(len(xs))]
                data_cfg = resolve_data_config({}, model=model)
                paths = visualize(model, xs, out, names, data_cfg["mean"], data_cfg["std"],
                                  **guidance_kwargs(load_guidance(ckpt, cfg, model), xs))
                return [os.path.basename(p) for p in paths]
            except (OSError, ValueError) as e:  # e.g. the data set is not on this machine
                notes.append(f"pictures of {cell['label']} not made: {e}")
                return []
    return []


def plot_curves(out: str, name: str, xlabel: str, ylabel: str, curves: dict, title: str, log: bool = False) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, pts in curves.items():
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, f"{name}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.path.basename(path)


def report(exp_dirs: list, out: str, pictures: bool = True) -> str:
    """Write ``out/report.md`` (and PNGs) for the experiment directories; returns its path.
    ``pictures``: also show what the clustering of a trained AdaptiVision run does."""
    os.makedirs(out, exist_ok=True)
    md = ["# AdaptiVision experiment report", ""]
    for exp_dir in exp_dirs:
        path = os.path.join(exp_dir, "experiment.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: pass directories written by `adaptivision experiment run`")
        with open(path) as f:
            rec = json.load(f)
        name, notes, plots = rec["experiment"], [], []
        md += [f"## {rec['title']}", "",
               f"Scale `{rec['scale']}`, data set `{rec['dataset']}`, model `{rec['model']}`, {rec['epochs']} epoch(s), "
               f"{rec['seeds']} seed(s); recorded {rec.get('finished', '?')} ({rec.get('threads', '?')} threads). "
               f"Mean ± std over seeds.", ""]
        if rec["kind"] in ("train", "guidance"):
            md += (_train_table if rec["kind"] == "train" else _guidance_table)(rec, exp_dir, notes)
            if pictures:
                plots += _pictures(rec, exp_dir, out, name, notes)
        elif rec["kind"] == "budget":
            md += _budget(rec, out, name, plots)
            commits: dict = {}
            for cell in rec["cells"]:
                for run in cell.get("runs", []):
                    _summary(exp_dir, run, commits, cell["label"])
            notes.append(_code_note(commits))
        elif rec["kind"] == "segmentation":
            md += _budget(rec, out, name, plots, "miou", "mIoU (%)")
            notes += [_code_note(_run_commits(rec)), _plateau_note(rec, out, name, plots)]
        elif rec["kind"] == "detection":
            md += _detection(rec)
            notes.append(_code_note(_run_commits(rec)))
        elif rec["kind"] == "scaling":
            md += _scaling(rec, out, name, plots)
        else:
            md += _robustness(rec)
        md.append("")
        notes = [n for n in notes if n]
        md += [f"- {n}" for n in notes] + ([""] if notes else [])
        md += [f"![{name}]({p})" for p in plots] + ([""] if plots else [])
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(md))
    return path
