"""``adaptivision experiment run NAME``: train / evaluate / measure the cells of an experiment.

Runs go to ``OUT/runs/<cell>-<hash>/seed<S>`` (the ordinary run directories of the engine),
so experiments that share a configuration share its runs, a finished run is never redone and
an interrupted one is resumed. Several processes may run one experiment into one ``OUT``: each
skips the runs another live process is training (their run locks). ``OUT/<experiment>/experiment.json``
records what was run and measured (``--record-only`` rewrites it from every finished run);
``adaptivision report`` turns it into tables and plots.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import timm
import torch

from .. import budget
from ..checkpoint import RunBusyError, lock_holder
from ..config import CLUSTERING, ModelOptions
from ..data import collate_skip
from ..dense import detect
from ..dense import run as dense_run
from ..guidance import MODES
from ..models.registry import stage_defaults
from ..profile import profile
from ..provenance import provenance
from ..timing import time_models
from ..train import TrainConfig, engine
from .registry import (
    BUDGETS,
    DENSE,
    DET_SCALES,
    DTC_FIXED_K,
    FULL_EPOCHS,
    SCALES,
    SEG_BUDGETS,
    SEG_SCALES,
    TEACHER_DENSE,
    Cell,
    Experiment,
    get,
)

SMALL_MODELS = {"fashion-mnist": "adaptivision_nano_patch4_28", "cifar10": "adaptivision_nano_patch4_32",
                "cifar100": "adaptivision_nano_patch4_32"}
CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"


def base_config(scale: str, dataset: str, data_dir: Optional[str], epochs: Optional[int],
                overrides: Optional[list] = None) -> TrainConfig:
    """The recipe of a scale: ``smoke`` (CI: a few steps), ``small`` (this CPU: minutes per run,
    1 epoch on 10k images), ``default`` (the README's default job: 2 epochs on every training
    image, the whole test set), ``full`` (the same recipe trained to plateau: ``FULL_EPOCHS``), ``paper`` (configs/<dataset>.yaml: the paper's recipe, GPUs)."""
    if scale == "paper":
        path = CONFIG_DIR / f"{dataset}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"no paper-scale config {path} for dataset {dataset!r}")
        cfg = TrainConfig.build(str(path), overrides)
    elif scale in ("default", "full"):
        cfg = TrainConfig.build(None, overrides, model=SMALL_MODELS.get(dataset, "adaptivision_small_patch16_224"),
                                dataset=dataset, **({"epochs": FULL_EPOCHS} if scale == "full" else {}))
    elif scale in ("small", "smoke"):
        cfg = TrainConfig.build(None, overrides, model=SMALL_MODELS.get(dataset, "adaptivision_small_patch16_224"),
                                dataset=dataset, epochs=1, limit_train=10000, limit_eval=5000)
        if scale == "smoke":
            cfg = dataclasses.replace(cfg, limit_train=48, limit_eval=32, batch_size=16, throughput_batch=8,
                                      workers=0, init_samples=32, log_every=1000)
    else:
        raise ValueError(f"Invalid value for 'scale': {scale!r}; allowed: {', '.join(map(repr, SCALES))}.")
    changes = dict(compare_dense=False, data_dir=data_dir if data_dir is not None else cfg.data_dir)
    if epochs is not None:
        changes["epochs"] = epochs
    return dataclasses.replace(cfg, **changes).resolved()  # cells distill only where they say so


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


# TrainConfig fields added after runs were first recorded: left out of a run's identity while
# they hold their default, so those runs keep their names (and are not trained again).
LATER_FIELDS = ("init_from", "guidance", "text_model", "text_template", "guidance_tokens", "guidance_dropout",
                "budget_warmup", "budget_warmup_bias", "distill_from", "distill_weight", "distill_tau", "distill_kind",
                "self_distill", "backbone_lr_scale")


def _identity(cfg: TrainConfig) -> dict:
    """What makes two runs the same run (every config field but seed, name and output)."""
    defaults = dict(dataclasses.asdict(TrainConfig()), distill_from=None)  # as when the first runs were named
    ident = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("seed", "name", "output")}
    for k in LATER_FIELDS:
        if ident[k] == defaults[k]:
            ident.pop(k)
    return ident


# The model defaults that run identities are measured against: those when the first runs were
# recorded. Changing a live default must give new runs, not silently reuse old ones, so a DTC
# cell's clustering preset, temperature and training K are always written out when they differ from these.
# The other changed defaults (unpool, budget_jitter, prop_attn) are not resolved: a cell that leaves them out keeps
# the value its runs were recorded with (``_explicit`` builds it so); cells name the new value to get it.
ID_DEFAULTS = dict(ModelOptions().to_dict(), clustering="paper", tau=150.0, train_k="image", unpool="assign",
                   budget_jitter=1.0, prop_attn=True)


# A model's stage defaults as its cells' runs were recorded: the nano model's moved from K 24 (grid of 8) to
# K 20 (grid of 4) on 2026-11-28, and a cell that leaves the stage out keeps the K 24 model and its runs, as
# it keeps the budget jitter and proportional attention (cells name k_mid=20, k_step=4 to get the new one).
ID_STAGE_DEFAULTS = {"adaptivision_nano_patch4_28": dict(condense_at=2, k_mid=24)}


def _id_stage(model: Optional[str], kwargs: dict) -> dict:
    """The stage options a DTC cell of ``model`` that leaves them out is named and built with."""
    live = stage_defaults(model, kwargs) if model else {}
    return dict(ID_STAGE_DEFAULTS[model]) if live and model in ID_STAGE_DEFAULTS else live


def _non_default(kwargs: dict, model: Optional[str] = None) -> dict:
    """The options that differ from ``ID_DEFAULTS``, so equal configurations share their runs."""
    kwargs = dict(kwargs)
    if kwargs.get("reduction", "dtc") == "dtc":  # the live defaults, resolved, for what they mean now
        kwargs.update(_id_stage(model, kwargs))  # the model's own stage (nano: after block 2, K 24 as recorded)
        kwargs.setdefault("clustering", ModelOptions.clustering)
        kwargs.setdefault("tau", CLUSTERING[kwargs["clustering"]]["tau"])
        kwargs.setdefault("train_k", ModelOptions.train_k)
    return {k: v for k, v in kwargs.items() if k not in ID_DEFAULTS or ID_DEFAULTS[k] != v}


def _explicit(kwargs: dict) -> dict:
    """What a DTC cell's model is built with: its ``_non_default`` options, plus the ``ID_DEFAULTS``
    value of every option they leave out whose live default is now another. Leaving one out means
    "equal to ID_DEFAULTS", so without this a paper cell (``clustering='paper'``, ``train_k='image'``,
    ``condense_at=0``, all equal to ID_DEFAULTS) would be built with today's defaults under its old name."""
    if kwargs.get("reduction", "dtc") != "dtc":
        return dict(kwargs)
    live = ModelOptions().to_dict()
    pins = {k: v for k, v in ID_DEFAULTS.items() if live.get(k) != v}
    pins["condense_at"] = ID_DEFAULTS["condense_at"]  # live: the model's stage default (nano: after block 2)
    return dict({k: v for k, v in pins.items() if k not in kwargs}, **kwargs)


# Segmentation and detection runs are named by their cell's kwargs as written, and were first recorded
# (2026-11-26) with the live defaults of then: the ones that have moved since are pinned when a cell
# leaves them out, so that a new seed or scale trains what the recorded seeds trained. A default that
# moves again belongs here too (tests/test_experiments.py checks each cell's backbone).
DENSE_TASK_PINS = dict(budget_jitter=1.0, prop_attn=True)


def _dense_task_kwargs(kwargs: dict) -> dict:
    """The backbone options a segmentation / detection cell is trained with (its name stays its kwargs)."""
    if kwargs.get("reduction", "dtc") != "dtc":
        return dict(kwargs)
    return dict({k: v for k, v in DENSE_TASK_PINS.items() if k not in kwargs}, **kwargs)


def _commit(spec: dict) -> Optional[str]:
    """The git commit a segmentation / detection run recorded (None before runs recorded one)."""
    return (spec.get("provenance") or {}).get("commit")


class Runner:
    def __init__(self, exp: Experiment, out: str, scale: str, base: TrainConfig, seeds: int = 1,
                 log: Callable = print, record_only: bool = False, only: Optional[list] = None,
                 only_seeds: Optional[list] = None):
        self.exp, self.out, self.scale, self.base, self.seeds, self.log = exp, out, scale, base, seeds, log
        self.record_only = record_only  # record the finished runs, train nothing
        bad = [s for s in only_seeds or [] if not 0 <= s < seeds]
        if bad:
            raise ValueError(f"--only-seed {bad[0]} is not one of the {seeds} seed(s) run (0 to {seeds - 1}): "
                             "raise --seeds")
        # seeds to train; the others are recorded when finished (another machine trained them)
        self.train_seeds = set(only_seeds) if only_seeds else set(range(seeds))
        self.cells = self._chosen(only)
        self.record = dict(experiment=exp.name, title=exp.title, kind=exp.kind, scale=scale, dataset=base.dataset,
                           model=base.model, epochs=base.epochs, seeds=seeds, key=exp.key, cells=[],
                           started=time.strftime("%Y-%m-%d %H:%M:%S"))
        if only:  # the cells this run trained; the record still covers every cell (the others as finished)
            self.record["only"] = [c.label for c in self.cells]
        if only_seeds:
            self.record["only_seeds"] = sorted(self.train_seeds)
        earlier = os.path.join(out, exp.name, "experiment.json")  # read before this run rewrites it
        self._earlier = {}
        if os.path.isfile(earlier):
            with open(earlier) as f:
                try:
                    self._earlier = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{earlier} is not a readable experiment record ({e}): move it away "
                                     "or copy the committed one there") from e
        self._dtc_gmacs: Optional[float] = None
        self._unfinished: dict = {}  # label -> {seed: run dir} of the runs not finished when recorded

    def _chosen(self, only: Optional[list]) -> tuple:
        """The cells to run: all, or those labelled in ``only`` plus the dense cell that a chosen
        cell learns from or starts from (its teacher must be trained first)."""
        if not only:
            return self.exp.cells
        labels = [c.label for c in self.exp.cells]
        unknown = [o for o in only if o not in labels]
        if unknown:
            raise ValueError(f"--only {unknown[0]!r} is not a cell of {self.exp.name}; its cells: "
                             + "; ".join(map(repr, labels)))
        needs_dense = any(TEACHER_DENSE in c.train.values() for c in self.exp.cells if c.label in only)
        return tuple(c for c in self.exp.cells if c.label in only or (needs_dense and c == DENSE))

    # --- configurations ---------------------------------------------------------------------------
    def cell_config(self, cell: Cell, seed: int) -> tuple[TrainConfig, dict]:
        model = cell.model or self.base.model
        kwargs = {} if cell.model else _non_default(dict(self.base.model_kwargs, **cell.kwargs), model)
        extra = {}
        if cell.match_gmacs:
            kwargs, extra = self._matched(model, kwargs)
        train = dict(cell.train)
        if cell.epochs_fraction is not None:  # a fine-tuning cell: a share of the scale's epochs
            train.setdefault("epochs", max(1, round(self.base.epochs * cell.epochs_fraction)))
        if cell.lr_factor is not None:  # a share of the scale's learning rate
            train.setdefault("base_lr", self.base.base_lr * cell.lr_factor)
        cfg = dataclasses.replace(self.base, model=model, model_kwargs=kwargs, seed=seed, **train).validate()
        # named by the options that differ from ID_DEFAULTS; built with every pinned one written out
        ident = json.dumps(_identity(cfg), sort_keys=True, default=str)
        if not cell.model:
            cfg = dataclasses.replace(cfg, model_kwargs=_explicit(kwargs))
        # named by what is run, not by the row label, so equal configurations share one run
        what = _slug(model if cell.model else kwargs.get("reduction", "dtc"))
        if cfg.guidance != "none":
            what = f"{what}-{_slug(cfg.guidance)}"
        name = f"{what}-{hashlib.sha1(ident.encode()).hexdigest()[:8]}"
        cfg = dataclasses.replace(cfg, output=os.path.join(self.out, "runs"), name=f"{name}/seed{seed}")
        # the identity names the dense run by its cell, the run reads its file (last, not best: no test-set pick)
        for key in ("distill_from", "init_from"):
            if getattr(cfg, key) == TEACHER_DENSE:
                dense, _ = self.cell_config(DENSE, seed)
                cfg = dataclasses.replace(cfg, **{key: os.path.join(dense.output, dense.name, "last.safetensors")})
        return cfg, extra

    def _matched(self, model_name: str, kwargs: dict) -> tuple[dict, dict]:
        """Knob of a baseline set so that its GMACs equal the dtc cell's (both measured at init)."""
        probe = engine.create_model(dict(name=model_name, num_classes=0, kwargs=dict(kwargs, cmtf=False)))
        ds = engine.build_eval_dataset(self.base, probe)
        x, _, _ = collate_skip([ds[i] for i in range(min(64, len(ds)))])
        spec = dict(name=model_name, num_classes=len(ds.classes), kwargs=dict(kwargs, cmtf=False))
        model = engine.create_model(spec).eval()
        if self._dtc_gmacs is None:
            # the target every recorded match used: the paper-form DTC at init (its GMACs, not its accuracy)
            ref = dict(self.base.model_kwargs, reduction="dtc", cmtf=False)
            ref.setdefault("clustering", "paper")
            ref.update(_id_stage(model_name, ref))  # at the stage it was measured at (nano: K 24, not today's K 20)
            dtc = engine.create_model(dict(spec, kwargs=ref))
            self._dtc_gmacs = profile(dtc, x)["gmacs"]
        knob, gmacs = budget.match_gmacs(model, x, self._dtc_gmacs)
        name = "tome_r" if kwargs.get("reduction") == "tome" else "keep_ratio"
        return dict(kwargs, **{name: knob}), dict(knob=name, knob_value=knob, matched_to=self._dtc_gmacs,
                                                  gmacs_at_init=gmacs)

    # --- running ----------------------------------------------------------------------------------
    def train_cell(self, cell: Cell, train: bool = True) -> dict:
        """Train (``train``) or only record the finished seeds of one cell: its record entry."""
        entry = dict(label=cell.label, kwargs=cell.kwargs, train=cell.train, model=cell.model, runs=[])
        if self.exp.key:
            entry["key"] = cell.kwargs.get(self.exp.key)
        if self.scale not in cell.scales:
            entry["status"] = f"paper scale only (not at scale {self.scale!r})"
            return entry
        for seed in range(self.seeds):
            cfg, extra = self.cell_config(cell, seed)
            entry.update(extra)
            run_dir = os.path.join(cfg.output, cfg.name)
            rel = os.path.relpath(run_dir, self.out)
            if os.path.isfile(os.path.join(run_dir, "summary.json")):
                self.log(f"[{self.exp.name}] {cell.label} seed {seed}: done before ({rel})")
            elif self.record_only or not train or seed not in self.train_seeds:
                if train:  # a cell --only left out is not news
                    self.log(f"[{self.exp.name}] {cell.label} seed {seed}: not finished, left out ({rel})")
                self._unfinished.setdefault(cell.label, {})[seed] = rel
                continue
            elif not self._train(cfg, run_dir, f"[{self.exp.name}] {cell.label} seed {seed}", rel):
                self._unfinished.setdefault(cell.label, {})[seed] = rel
                continue
            entry["runs"].append(dict(seed=seed, run_dir=rel))
        return entry

    def _finished_meanwhile(self, entries: list) -> None:
        """Add the runs found unfinished when their cell was recorded that are finished now: another
        process sharing --out may finish a run of any cell while this one trains (the record written
        last would otherwise lack it)."""
        for entry in entries:
            for seed, rel in self._unfinished.get(entry["label"], {}).items():
                if os.path.isfile(os.path.join(self.out, rel, "summary.json")):
                    self.log(f"[{self.exp.name}] {entry['label']} seed {seed}: finished meanwhile ({rel})")
                    entry["runs"].append(dict(seed=seed, run_dir=rel))
            entry["runs"].sort(key=lambda r: r["seed"])

    def _train(self, cfg: TrainConfig, run_dir: str, what: str, rel: str) -> bool:
        """Train (or resume) one run; False, and nothing touched, when another live process is
        training it (its run lock): several ``experiment run`` processes on one --out share the
        work, each taking the runs nobody holds (docs/results.md, "Plateau scale")."""
        for key, role in (("distill_from", "teacher"), ("init_from", "starting point")):
            path = getattr(cfg, key)
            if path and not os.path.isfile(path):
                if lock_holder(os.path.dirname(path)) is not None:
                    self.log(f"{what}: skipped, its {role} {os.path.dirname(path)} is being trained by another process")
                    return False
                raise FileNotFoundError(f"{what}: its {role} {path} ({key}) is not trained: list the dense "
                                        "cell before it in the experiment")
        resume = run_dir if os.path.isfile(os.path.join(run_dir, "last.safetensors")) else None
        if resume and os.path.isfile(os.path.join(run_dir, "config.yaml")):
            saved = TrainConfig.saved(run_dir).model_kwargs
            if saved != cfg.model_kwargs and _explicit(saved) == cfg.model_kwargs:
                cfg = dataclasses.replace(cfg, model_kwargs=saved)  # started before the pins were written out
        try:  # engine.run takes the run's lock itself (no probe here: a probe would hold it a moment)
            engine.run(cfg, resume=resume, log=lambda *a: None,  # says "training" only once the lock is ours
                       started=lambda: self.log(f"{what}: {'resuming' if resume else 'training'} {rel}"))
        except RunBusyError as e:
            self.log(f"{what}: skipped, another process is training it ({e})")
            return False
        return True

    def run(self, checkpoints: Optional[list] = None, eval_data: Optional[dict] = None) -> dict:
        kind = self.exp.kind
        if kind == "scaling":
            self.record["cells"] = self.scaling()
        elif kind in ("segmentation", "detection"):
            task = self.segmentation if kind == "segmentation" else self.detection
            # every run is trained before any is recorded: another process sharing --out may finish a
            # run of any cell while this one trains, and the record written last must hold it
            for c in self.exp.cells:
                task(c, record=False)
            self.record["cells"] = [task(c, train=False) for c in self.exp.cells]
        elif kind == "robustness":
            self.record["cells"] = self.robustness(checkpoints, eval_data or {})
        else:
            # every cell is recorded, those left out by --only as --record-only would: the record
            # rewritten after an --only run keeps the other cells' finished runs
            self.record["cells"] = [self.train_cell(c, train=c in self.cells) for c in self.exp.cells]
            self._finished_meanwhile(self.record["cells"])
            for entry in self.record["cells"]:
                if kind == "budget":
                    self.budget_sweep(entry)
                elif kind == "guidance":
                    self.guidance_sweep(entry)
        self.record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.record["threads"] = torch.get_num_threads()
        path = os.path.join(self.out, self.exp.name, "experiment.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.record, f, indent=1)
        self.log(f"[{self.exp.name}] recorded {path}")
        return self.record

    # --- evaluation-only kinds --------------------------------------------------------------------
    def _load(self, run_dir: str):
        # the last epoch's weights, the ones the train tables report: best.safetensors is the epoch
        # with the best *test* top-1, a pick on the test set (budget sweeps used it until 2026-11-26)
        ckpt = os.path.join(self.out, run_dir, "last.safetensors")
        model, cfg = engine.load_for_eval(ckpt)
        return model.eval(), cfg, engine.load_guidance(ckpt, cfg, model)

    def _eval(self, model, cfg: TrainConfig, dataset=None, data_dir=None, guide=None, mode: str = "normal") -> dict:
        d = engine.setup_distributed("cpu" if not torch.cuda.is_available() else cfg.device)
        model.to(d.device)
        ds = engine.build_eval_dataset(cfg, model, dataset, data_dir)
        res = engine.evaluate(model, engine.eval_loader(ds, cfg, d), d, "none", getattr(ds, "class_indices", None),
                              guide, mode)
        x, _, _ = collate_skip([ds[i] for i in range(min(256, len(ds)))])
        x = x.to(d.device)
        prof = profile(model, x, **engine.guidance_kwargs(guide, x, mode))
        res["gmacs"], res["mean_k"] = prof["gmacs"], prof.get("mean_k")
        return res

    def guidance_sweep(self, entry: dict) -> None:
        """Each guided run evaluated with its guidance missing, shuffled between images, and noise."""
        for run in entry.get("runs", []):
            saved = os.path.join(self.out, run["run_dir"], "guidance_modes.json")  # done before: reuse
            if os.path.isfile(saved):
                with open(saved) as f:
                    run["modes"] = json.load(f)
                continue
            ckpt = os.path.join(self.out, run["run_dir"], "last.safetensors")
            if not os.path.isfile(ckpt):  # a run restored from its committed record, weights gone
                self._earlier_modes(entry, run, ckpt)
                continue
            model, cfg, guide = self._load(run["run_dir"])
            if guide is None:
                continue
            run["modes"] = {}
            for mode in MODES[1:]:
                torch.manual_seed(0)  # the noise of 'random' / the row order of 'shuffled'
                res = self._eval(model, cfg, guide=guide, mode=mode)
                run["modes"][mode] = dict(top1=res["top1"], top5=res["top5"], gmacs=res["gmacs"], mean_k=res["mean_k"])
                self.log(f"[guidance] {entry['label']} seed {run['seed']} {mode}: top-1 {res['top1']:.2f}")
            with open(saved, "w") as f:
                json.dump(run["modes"], f, indent=1)

    def _earlier_modes(self, entry: dict, run: dict, ckpt: str) -> None:
        """A guided run whose weights are gone keeps the modes of this experiment's earlier record in
        ``--out`` (copy the committed experiment.json there); without them it is recorded with its
        own top-1 only, and the log says so. An unguided run has no modes to keep."""
        if not (entry.get("train") or {}).get("guidance"):
            return
        old = self._run_in(self._earlier, run, "modes", entry["label"])
        if old is None:
            self.log(f"[{self.exp.name}] {entry['label']} seed {run['seed']}: weights gone ({ckpt}) and no "
                     "guidance modes in the earlier record: recorded without them")
            return
        run["modes"] = old["modes"]
        self.log(f"[{self.exp.name}] {entry['label']} seed {run['seed']}: weights gone, guidance modes from the "
                 "earlier record")

    def budget_sweep(self, entry: dict) -> None:
        """Figure 1(a): every trained model of the cell at each budget of its method."""
        method = (entry["kwargs"] or {}).get("reduction", "dtc")
        for run in list(entry["runs"]):
            ckpt = os.path.join(self.out, run["run_dir"], "last.safetensors")
            if not os.path.isfile(ckpt):  # a run restored from its committed record, weights gone
                if not self._earlier_points(entry, run, ckpt, method):
                    entry["runs"].remove(run)  # as an unfinished run is: named in the log, not in the table
                continue
            # done before on these very weights with these budgets (another experiment's sweep of the
            # same run, or an earlier --record-only): reuse the points, an evaluation costs minutes here.
            # The file names the commit that evaluated; delete it to evaluate again with newer code.
            weights = os.stat(ckpt)
            key = dict(weights=[weights.st_size, weights.st_mtime_ns], budgets=BUDGETS.get(method),
                       fixed_k=DTC_FIXED_K if method == "dtc" else None)
            saved = os.path.join(self.out, run["run_dir"], "budget_points.json")
            if os.path.isfile(saved):
                with open(saved) as f:
                    old = json.load(f)
                if old.get("key") == json.loads(json.dumps(key)):
                    run["points"] = old["points"]
                    self.log(f"[{self.exp.name}] {entry['label']} seed {run['seed']}: budget points done before")
                    continue
            self._sweep_run(entry, run, method)
            with open(saved, "w") as f:
                json.dump(dict(key=key, points=run["points"], commit=provenance()["commit"]), f, indent=1)

    def _earlier_points(self, entry: dict, run: dict, ckpt: str, method: str) -> bool:
        """The points of a run whose weights are gone (a machine reset; its summary.json copied back
        from the committed records), taken from this experiment's earlier record in ``--out`` (copy
        the committed experiment.json there): a second seed's sweep then joins the first one's.
        Failing that, from another budget experiment's record in ``--out`` that swept the same run
        (the budgets are BUDGETS / DTC_FIXED_K, one set per method for every experiment; the log
        names the record). False (the run is left out, said in the log) where no record has them:
        it finished after the last sweep and its weights went before the next one."""
        own = os.path.isfile(os.path.join(self.out, self.exp.name, "experiment.json"))
        found = self._points_in(self._earlier, run, label=entry["label"]) if own else None
        source = "the earlier record"
        if found is None:
            for path in sorted(glob.glob(os.path.join(self.out, "*", "experiment.json"))):
                if os.path.basename(os.path.dirname(path)) == self.exp.name:
                    continue
                try:
                    with open(path) as f:
                        other = json.load(f)
                except (OSError, json.JSONDecodeError):
                    continue  # not a record of ours: ignored, this is only a fallback
                found = self._points_in(other, run)
                knobs = BUDGETS.get(method) if method != "tome" else None  # ToMe's r comes from the model
                if found is not None and knobs and [p["knob"] for p in found[0]][:len(knobs)] != knobs:
                    found = None  # swept at other budgets (an older BUDGETS): not these points
                if found is not None:
                    source = f"{other.get('experiment', path)}'s record"
                    break
        if found is None and not own:
            raise FileNotFoundError(
                f"{self.exp.name}: {ckpt} is missing and {os.path.join(self.out, self.exp.name, 'experiment.json')} "
                "does not exist (nor does another record there sweep this run): train the run again, or copy the "
                "committed record of this experiment there")
        if found is None:
            self.log(f"[{self.exp.name}] {entry['label']} seed {run['seed']}: weights gone ({ckpt}) and no budget "
                     "points in the earlier record: left out (train the run again to sweep it)")
            return False
        run["points"], run["points_from"] = found
        self.log(f"[{self.exp.name}] {entry['label']} seed {run['seed']}: weights gone, budget "
                 f"points from {source} (measured {run['points_from']})")
        return True

    @staticmethod
    def _run_in(record: dict, run: dict, key: str, label: Optional[str] = None) -> Optional[dict]:
        """``run``'s entry (same run_dir and seed) in an experiment record where it has ``key``, from
        the cell of that ``label`` when given; None where it has none."""
        for cell in record.get("cells", []):
            for old in cell.get("runs", []) if label in (None, cell.get("label")) else []:
                if old.get("seed") == run["seed"] and old.get("run_dir") == run["run_dir"] and old.get(key):
                    return old
        return None

    def _points_in(self, record: dict, run: dict, label: Optional[str] = None) -> Optional[tuple]:
        """(points, when measured) of ``run`` in an experiment record; None where it has none."""
        old = self._run_in(record, run, "points", label)
        # when the points were measured: kept through later re-recordings
        return None if old is None else (old["points"], old.get("points_from", record.get("finished")))

    def _sweep_run(self, entry: dict, run: dict, method: str) -> None:
        model, cfg, guide = self._load(run["run_dir"])
        run["points"] = []
        for b in BUDGETS.get(method) or [None]:  # the dense model: its one point
            value = budget.tome_r(model, b) if method == "tome" else b
            if value is not None:
                budget.set_knob(model, value)
            res = self._eval(model, cfg, guide=guide)
            run["points"].append(dict(knob=value, gmacs=res["gmacs"], top1=res["top1"], top5=res["top5"]))
            self.log(f"[{self.exp.name}] {entry['label']} seed {run['seed']} knob {value}: "
                     f"{res['gmacs']:.4f} GMACs, top-1 {res['top1']:.2f}")
        if method != "dtc":
            return
        for k in (k for k in DTC_FIXED_K if k < budget.first_dtc(model).k_min):  # after the bias points
            budget.apply_budget(model, {"k": k}, None)
            res = self._eval(model, cfg, guide=guide)
            run["points"].append(dict(knob=f"K={k}", gmacs=res["gmacs"], top1=res["top1"], top5=res["top5"]))
            self.log(f"[{self.exp.name}] {entry['label']} seed {run['seed']} K={k}: "
                     f"{res['gmacs']:.4f} GMACs, top-1 {res['top1']:.2f}")

    def segmentation(self, cell: Cell, train: bool = True, record: bool = True) -> dict:
        """Figure 1(b)/(c): one segmenter per seed (``adaptivision segment``'s training; ``train``),
        then mIoU and GMACs of each finished one at each budget of its method (``record``).
        Fashion-MNIST gives mosaics; ade20k / cityscapes are read from --data-dir."""
        dataset = "mosaic" if self.base.dataset == "fashion-mnist" else self.base.dataset
        method = cell.kwargs.get("reduction", "dtc")
        entry = dict(label=cell.label, kwargs=cell.kwargs, runs=[])
        recipe = SEG_SCALES[self.scale]
        ident = json.dumps(dict(dataset=dataset, kwargs=cell.kwargs, **recipe), sort_keys=True)
        name = f"seg-{_slug(method)}-{hashlib.sha1(ident.encode()).hexdigest()[:8]}"
        for seed in range(self.seeds):
            rel = os.path.join("runs", name, f"seed{seed}")
            ckpt = os.path.join(self.out, rel, "segmenter.safetensors")
            what = f"[{self.exp.name}] {cell.label} seed {seed}"
            if train and os.path.isfile(os.path.join(self.out, rel, "segment.json")):
                self.log(f"{what}: done before ({rel})")
            elif train and self._trains(cell, seed):
                self._dense_train(what, rel, dense_run.run, dataset, self.base.data_dir,
                                  kwargs=_dense_task_kwargs(cell.kwargs), output=os.path.join(self.out, "runs"),
                                  name=os.path.join(name, f"seed{seed}"), seed=seed, **recipe)
            if not record or not os.path.isfile(os.path.join(self.out, rel, "segment.json")):
                continue
            if os.path.isfile(ckpt):
                points = self._seg_points(ckpt, method, recipe["eval_size"], what)
            else:  # restored from its committed segment.json (a machine reset): the earlier record's points
                old = self._run_in(self._earlier, dict(seed=seed, run_dir=rel), "points", cell.label)
                if old is None:
                    self.log(f"{what}: weights gone ({ckpt}) and no points in the earlier record: left out "
                             "(copy the committed experiment.json to --out, or train it again)")
                    continue
                points = old["points"]
                self.log(f"{what}: weights gone, points from the earlier record")
            with open(os.path.join(self.out, rel, "segment.json")) as f:
                spec = json.load(f)
            entry["runs"].append(dict(seed=seed, run_dir=rel, commit=_commit(spec), points=points,
                                      curve=spec.get("curve", [])))
        return entry

    def _seg_points(self, ckpt: str, method: str, eval_size: Optional[int], what: str) -> list:
        """mIoU and GMACs of one trained segmenter at each budget of its method."""
        points = []
        for b in SEG_BUDGETS.get(method, [None]):
            res = dense_run.evaluate(ckpt, self.base.data_dir, eval_size, dict([b]) if b else None)
            points.append(dict(knob=b[1] if b else None, gmacs=res["gmacs"], miou=res["miou"]))
            self.log(f"{what} {b}: {res['gmacs']:.4f} GMACs, mIoU {res['miou']:.2f}")
        return points

    def _dense_train(self, what: str, rel: str, train: Callable, *args, **kwargs) -> bool:
        """Train (or resume, from its ``train-state.pt``) one segmentation or detection run; False,
        nothing touched, when another live process holds the run (several processes share one --out)."""
        resuming = os.path.isfile(os.path.join(self.out, rel, dense_run.STATE))
        self.log(f"{what}: {'resuming' if resuming else 'training'} {rel}")

        def log(line: str) -> None:  # a long run's evaluation curve shows its progress; its loss lines would flood the log
            if " evaluation " in line:
                self.log(f"{what}: {line}")
        try:
            train(*args, log=log, **kwargs)
        except RunBusyError as e:
            self.log(f"{what}: skipped, another process is training it ({e})")
            return False
        return True

    def _trains(self, cell: Cell, seed: int) -> bool:
        """Whether this invocation trains ``cell``'s ``seed`` (not --record-only, not left out by
        --only or --only-seed); a segmentation or detection run that it does not train is recorded
        only when it is finished."""
        return not self.record_only and cell in self.cells and seed in self.train_seeds

    def detection(self, cell: Cell, train: bool = True, record: bool = True) -> dict:
        """Table 3: one FCOS detector per seed (``adaptivision detect``'s training; ``train``) on each
        backbone; its mAP, mAP50, backbone and detector GMACs and images/s, as recorded by the run
        (``record``)."""
        if self.base.dataset != "fashion-mnist" or self.scale not in DET_SCALES:
            raise ValueError(f"table3 runs on Fashion-MNIST mosaics at scales {', '.join(DET_SCALES)}; "
                             f"got dataset {self.base.dataset!r}, scale {self.scale!r} (COCO: docs/dense.md)")
        recipe = DET_SCALES[self.scale]
        ident = json.dumps(dict(kwargs=cell.kwargs, **recipe), sort_keys=True)
        name = f"det-{_slug(cell.kwargs.get('reduction', 'dtc'))}-{hashlib.sha1(ident.encode()).hexdigest()[:8]}"
        entry = dict(label=cell.label, kwargs=cell.kwargs, runs=[])
        for seed in range(self.seeds):
            rel = os.path.join("runs", name, f"seed{seed}")
            path = os.path.join(self.out, rel, "detect.json")
            what = f"[{self.exp.name}] {cell.label} seed {seed}"
            if train and os.path.isfile(path):
                self.log(f"{what}: done before ({rel})")
            elif train and self._trains(cell, seed):
                self._dense_train(what, rel, detect.run, self.base.data_dir,
                                  kwargs=_dense_task_kwargs(cell.kwargs), output=os.path.join(self.out, "runs"),
                                  name=os.path.join(name, f"seed{seed}"), seed=seed, **recipe)
            if not record or not os.path.isfile(path):
                continue
            with open(path) as f:
                spec = json.load(f)
            entry["runs"].append(dict(seed=seed, run_dir=rel, commit=_commit(spec), **spec["results"]))
        return entry

    def robustness(self, checkpoints: Optional[list], eval_data: dict) -> list:
        """Table 6: trained checkpoints on their own test set and on ``eval_data`` (name -> dir)."""
        if not checkpoints:  # the table1 runs of this output directory
            checkpoints = []
            for cell in self.exp.cells:
                for seed in range(self.seeds):
                    cfg, _ = self.cell_config(cell, seed)
                    ckpt = os.path.join(cfg.output, cfg.name, "last.safetensors")  # not a test-set pick
                    if os.path.isfile(ckpt):
                        checkpoints.append(ckpt)
        if not checkpoints:
            raise FileNotFoundError(f"table6 found no trained checkpoint under {self.out}/runs: run table1 first "
                                    "(same --out, --dataset, --scale) or pass --checkpoint")
        entries = []
        for ckpt in checkpoints:
            model, cfg = engine.load_for_eval(ckpt)
            model.eval()
            cfg = dataclasses.replace(cfg, limit_eval=self.base.limit_eval)
            row = dict(label=f"{cfg.model} {json.dumps(cfg.model_kwargs, sort_keys=True)}", checkpoint=ckpt,
                       results={cfg.dataset: self._eval(model, cfg)})
            for name, path in eval_data.items():
                row["results"][name] = self._eval(model, dataclasses.replace(cfg, data_dir=path, dataset=name))
            entries.append(row)
        return entries

    def scaling(self) -> list:
        """Theorem 1: GMACs and measured time per image as the image grows; the K range stays that
        of the base size, so AdaptiVision's attention does not grow with the image."""
        sizes = {"smoke": [28, 56], "paper": [224, 320, 448, 640]}.get(self.scale, [28, 56, 84, 112, 168])
        base = timm.create_model(self.base.model)
        c, h, _ = base.pretrained_cfg["input_size"]
        n0 = base.patch_embed.num_patches
        k_range = dict(k_min=max(1, n0 // 3), k_max=max(1, 2 * n0 // 3))
        batch = 4 if self.scale == "smoke" else 16
        entries = []
        for cell in self.exp.cells:
            kwargs = dict(cell.kwargs, cmtf=False, **(k_range if cell.kwargs.get("reduction") == "dtc" else {}))
            entry = dict(label=cell.label, kwargs=kwargs, points=[])
            for size in sizes if self.scale != "paper" else [s for s in sizes if s % base.patch_embed.patch_size[0] == 0]:
                model = timm.create_model(self.base.model, img_size=size, **kwargs).eval()
                x = torch.randn(batch, c, size, size)
                prof = profile(model, x)
                times = time_models([model], x, warmup=1, rounds=3 if self.scale == "smoke" else 7)[0]
                entry["points"].append(dict(img_size=size, tokens=model.patch_embed.num_patches, gmacs=prof["gmacs"],
                                            ms_per_image=1e3 * statistics.median(times) / batch))
                self.log(f"[theorem1] {cell.label} {size}px: {prof['gmacs']:.4f} GMACs, "
                         f"{entry['points'][-1]['ms_per_image']:.2f} ms/image")
            entries.append(entry)
        return entries


def run_experiment(name: str, out: str = "experiments", scale: str = "small", dataset: str = "fashion-mnist",
                   data_dir: Optional[str] = None, epochs: Optional[int] = None, seeds: int = 1,
                   overrides: Optional[list] = None, checkpoints: Optional[list] = None,
                   eval_data: Optional[dict] = None, log: Callable = print, record_only: bool = False,
                   only: Optional[list] = None, only_seeds: Optional[list] = None) -> dict:
    """Run (or with ``record_only``, only record the finished runs of) experiment ``name``;
    ``only``: the labels of the cells to run (with the dense teacher they need); ``only_seeds``:
    the seeds to train (the others are recorded where finished)."""
    exp = get(name)
    if seeds < 1:
        raise ValueError(f"Invalid value for 'seeds': {seeds!r}; allowed: an integer >= 1.")
    base = base_config(scale, dataset, data_dir, epochs, overrides)
    return Runner(exp, out, scale, base, seeds, log, record_only, only, only_seeds).run(checkpoints, eval_data)
