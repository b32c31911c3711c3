"""``adaptivision train | eval | profile | experiment | benchmark | visualize | segment | detect | report`` (also ``python -m adaptivision``)."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .experiments.registry import EXPERIMENTS, SCALES


def _train(args) -> int:
    from .train import TrainConfig, run
    overrides = list(args.overrides)
    for key in ("dataset", "data_dir", "model", "epochs", "output", "name", "init_from"):
        v = getattr(args, key)
        if v is not None:
            overrides.append(f"{key}={v}")
    if args.download:
        overrides.append("download=true")
    if args.resume:  # the run's own config.yaml; the command line may change only RESUME_SAFE fields
        cfg = TrainConfig.for_resume(args.resume, args.config, overrides)
    else:
        cfg = TrainConfig.build(args.config, overrides)
    run(cfg, resume=args.resume, stop_after=args.stop_after)
    return 0


def _eval(args) -> int:
    from .budget import apply_budget, parse_budget, set_infer_k_step
    from .profile import profile
    from .train.build import build_eval_dataset, eval_loader, guidance_kwargs, load_for_eval, load_guidance
    from .train.distributed import setup_distributed
    from .train.evaluate import evaluate
    model, cfg = load_for_eval(args.checkpoint, args.model)
    if args.infer_k_step is not None:
        set_infer_k_step(model, args.infer_k_step)
    guide = load_guidance(args.checkpoint, cfg, model)
    if args.guidance_mode != "normal" and guide is None:
        raise ValueError(f"--guidance-mode {args.guidance_mode}: {args.checkpoint} was trained without guidance")
    budget = None
    if args.budget:
        budget = parse_budget(args.budget)
    if args.data_dir is not None:
        cfg.data_dir = args.data_dir
    if args.dataset is not None and args.dataset != cfg.dataset:
        cfg.dataset, cfg.limit_eval = args.dataset, None
    d = setup_distributed(cfg.device)
    model.to(d.device)
    ds = build_eval_dataset(cfg, model, args.dataset, args.data_dir)
    if budget:  # calibrated on the first evaluation images, then fixed for the whole set
        from .data import collate_skip as _collate
        xb, _, _ = _collate([ds[i] for i in range(min(256, len(ds)))])
        xb = xb.to(d.device)
        apply_budget(model.eval(), budget, xb, **guidance_kwargs(guide, xb, args.guidance_mode))
    res = evaluate(model, eval_loader(ds, cfg, d), d, "none", getattr(ds, "class_indices", None), guide,
                   args.guidance_mode)
    from .data import collate_skip
    x, _, _ = collate_skip([ds[i] for i in range(min(64, len(ds)))])
    x = x.to(d.device)
    prof = profile(model, x, **guidance_kwargs(guide, x, args.guidance_mode))
    res.update(gmacs=prof["gmacs"], params_m=prof["params"] / 1e6, mean_k=prof.get("mean_k"))
    if guide is not None:
        res.update(guidance=",".join(guide.sources), guidance_mode=args.guidance_mode)
    print(json.dumps(res, indent=1))
    return 0


def _profile(args) -> int:
    import timm

    from .train.evaluate import measure
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    rows = []
    for name in args.model.split(","):
        model = timm.create_model(name, **kwargs)
        c, h, w = model.pretrained_cfg["input_size"]
        size = (c, args.img_size, args.img_size) if args.img_size else (c, h, w)
        m = measure(model, torch.randn(args.batch_size, *size), args.batch_size, torch.device("cpu"), args.repeats)
        rows.append(dict(model=name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}))
    print(json.dumps(rows, indent=1))
    return 0


def _experiment(args) -> int:
    from .experiments import EXPERIMENTS, run_experiment
    if args.action == "list":
        for e in EXPERIMENTS.values():
            cells = ", ".join(c.label for c in e.cells)
            print(f"{e.name:9s} {e.title}\n          cells: {cells}" + (f"\n          {e.note}" if e.note else ""))
        return 0
    if not args.name:
        raise ValueError("experiment run needs a NAME (see `adaptivision experiment list`)")
    eval_data = {}
    for item in args.eval_data or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--eval-data takes NAME=DIR (e.g. imagenet-a=/data/imagenet-a), got {item!r}")
        eval_data[name] = path
    run_experiment(args.name, args.out, args.scale, args.dataset, args.data_dir, args.epochs, args.seeds,
                   list(args.overrides), args.checkpoint, eval_data, record_only=args.record_only, only=args.only,
                   only_seeds=args.only_seeds)
    return 0


def _benchmark(args) -> int:
    from .benchmark import benchmark, to_markdown, write
    res = benchmark(args.models.split(","), args.img_size, args.batch_size, args.device, args.amp, args.compile,
                    args.budget, args.warmup, args.rounds, args.checkpoint, args.channels_last, args.train)
    print(to_markdown(res))
    if args.out:
        print("written: " + ", ".join(write(res, args.out)))
    return 0


def _visualize(args) -> int:
    from timm.data import resolve_data_config

    from .train.build import (
        build_eval_dataset,
        build_transforms,
        guidance_kwargs,
        load_for_eval,
        load_guidance,
    )
    from .visualize import visualize
    model, cfg = load_for_eval(args.checkpoint, args.model)
    _, eval_tf, mode = build_transforms(cfg, model)
    if args.images:
        from PIL import Image, UnidentifiedImageError
        xs = []
        for path in args.images:
            try:
                with Image.open(path) as im:
                    xs.append(eval_tf(im.convert(mode)))
            except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
                raise ValueError(f"cannot read image {path}: {e}") from e
        names = list(args.images)
    else:
        if args.data_dir is not None:
            cfg.data_dir = args.data_dir
        ds = build_eval_dataset(cfg, model, args.dataset, args.data_dir)
        picks = range(min(args.num, len(ds)))
        xs = [ds[i][0] for i in picks]
        names = [f"{args.dataset or cfg.dataset}-{i:04d}" for i in picks]
    data_cfg = resolve_data_config({}, model=model)
    x = torch.stack(xs)
    guide = load_guidance(args.checkpoint, cfg, model)
    paths = visualize(model, x, args.out, names, data_cfg["mean"], data_cfg["std"], args.block,
                      **guidance_kwargs(guide, x))
    print("\n".join(paths))
    return 0


def _evaluated(args, module) -> bool:
    """``segment`` / ``detect`` with ``--checkpoint``: print its evaluation (at ``--budget``)."""
    from .budget import parse_budget
    if not args.checkpoint:
        return False
    budget = parse_budget(args.budget) if args.budget else None
    print(json.dumps(module.evaluate(args.checkpoint, args.data_dir, args.eval_size, budget), indent=1))
    return True


def _segment(args) -> int:
    from .dense import run as seg
    if not _evaluated(args, seg):
        seg.run(args.dataset, args.data_dir, args.model, args.img_size, args.decoder, args.steps, args.batch_size,
                args.lr, args.eval_size, _options(args.options), args.output, args.name, args.seed)
    return 0


def _options(items: list) -> dict:
    """Backbone options given as key=value (values read as YAML: 2, 0.5, true, tome)."""
    import yaml

    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"model option {item!r} is not key=value")
        kwargs[key] = yaml.safe_load(value)
    return kwargs


def _detect(args) -> int:
    from .dense import detect
    if not _evaluated(args, detect):
        detect.run(args.data_dir, args.model, args.img_size, args.steps, args.batch_size, args.lr, args.eval_size,
                   _options(args.options), args.channels, args.output, args.name, args.seed)
    return 0


def _report(args) -> int:
    from .experiments import report
    print(report(args.run_dirs, args.out))
    return 0


def _dense_args(p: argparse.ArgumentParser, what: str, knobs: str, example: str) -> None:
    """The training and evaluation options that ``segment`` and ``detect`` share."""
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16, dest="batch_size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs")
    p.add_argument("--name")
    p.add_argument("--checkpoint", help=f"evaluate this {what}.safetensors instead of training")
    p.add_argument("--budget", help=f"with --checkpoint: gmacs=|mean_k=|bias=|k= (DTC), {knobs}")
    p.add_argument("options", nargs="*", metavar="key=value", help=f"backbone options, e.g. {example}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adaptivision", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    from .train.config import config_help
    t = sub.add_parser("train", help="train and evaluate (Fashion-MNIST by default), with the dense model beside",
                       description="Train and evaluate; any config field below can be given as key=value "
                                   "(YAML values), after the options.",
                       epilog="config fields (key=default):\n" + config_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="YAML/JSON config file (see configs/)")
    t.add_argument("--dataset")
    t.add_argument("--data-dir", dest="data_dir")
    t.add_argument("--model")
    t.add_argument("--epochs", type=int)
    t.add_argument("--output")
    t.add_argument("--name")
    t.add_argument("--init-from", dest="init_from", metavar="WEIGHTS",
                   help="fine-tune from a timm ViT/DeiT .safetensors of the same size (new modules start fresh)")
    t.add_argument("--download", action="store_true", help="let torchvision download the data set")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    t.add_argument("--stop-after", type=int, dest="stop_after", help="stop after N epochs of this invocation")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="any config field listed below")
    t.set_defaults(fn=_train)
    e = sub.add_parser("eval", help="evaluate a checkpoint")
    e.add_argument("--checkpoint", required=True, help="a .safetensors file of a run (model.json beside it)")
    e.add_argument("--model", help="model name, when the checkpoint has no model.json beside it")
    e.add_argument("--dataset")
    e.add_argument("--data-dir", dest="data_dir")
    e.add_argument("--budget", help="inference budget of one checkpoint: gmacs=1.3 | mean_k=64 | bias=-1 | k=64")
    e.add_argument("--infer-k-step", type=int, dest="infer_k_step",
                   help="per-image K on this grid at inference (every DTC stage's infer_k_step; training unchanged)")
    e.add_argument("--guidance-mode", dest="guidance_mode", default="normal",
                   choices=("normal", "missing", "shuffled", "random"),
                   help="a guided run's guidance as trained, left out, another image's, or noise")
    e.set_defaults(fn=_eval)
    f = sub.add_parser("profile", help="params, GMACs and throughput of models (timm names work too)")
    f.add_argument("--model", required=True, help="one or more names, comma-separated")
    f.add_argument("--img-size", type=int, dest="img_size")
    f.add_argument("--batch-size", type=int, default=32, dest="batch_size")
    f.add_argument("--repeats", type=int, default=10)
    f.set_defaults(fn=_profile)
    x = sub.add_parser("experiment", help="the paper's tables and figures: `experiment list`, `experiment run NAME`")
    x.add_argument("action", choices=("list", "run"))
    x.add_argument("name", nargs="?", help=", ".join(EXPERIMENTS))
    x.add_argument("--dataset", default="fashion-mnist")
    x.add_argument("--data-dir", dest="data_dir")
    x.add_argument("--epochs", type=int)
    x.add_argument("--seeds", type=int, default=1)
    x.add_argument("--scale", default="small", choices=SCALES,
                   help="smoke: a few steps (CI); small: 1 epoch on 10k images; default: the default job "
                        "(2 epochs, all images); full: the same trained to plateau (20 epochs); "
                        "paper: configs/<dataset>.yaml")
    x.add_argument("--out", default="experiments", help="runs and records go here (shared by experiments)")
    x.add_argument("--record-only", action="store_true", dest="record_only",
                   help="train nothing: record the runs finished so far (a report of a partial experiment)")
    x.add_argument("--only", action="append", metavar="LABEL",
                   help="train only this cell (its row label, repeatable), and the dense cell it learns from; "
                        "the other cells' finished runs are recorded")
    x.add_argument("--only-seed", action="append", type=int, dest="only_seeds", metavar="S",
                   help="train only this seed (repeatable, < --seeds); the other seeds' finished runs are recorded")
    x.add_argument("--checkpoint", action="append", help="table6: a checkpoint to evaluate (repeatable)")
    x.add_argument("--eval-data", action="append", dest="eval_data", metavar="NAME=DIR",
                   help="table6: extra evaluation set, e.g. imagenet-a=/data/imagenet-a (repeatable)")
    x.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig fields for every run")
    x.set_defaults(fn=_experiment)
    b = sub.add_parser("benchmark", help="images/s next to GMACs, speed-up over the first model")
    b.add_argument("--models", required=True,
                   help="comma-separated NAME[:key=value...] (timm names, model options, gmacs=|mean_k=|bias=|k=, weights=PATH: that model's own .safetensors)")
    b.add_argument("--img-size", type=int, dest="img_size")
    b.add_argument("--batch-size", type=int, default=64, dest="batch_size")
    b.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    b.add_argument("--amp", action="store_true", help="fp16 autocast on CUDA, bf16 on CPU")
    b.add_argument("--compile", action="store_true", help="torch.compile every model")
    b.add_argument("--channels-last", action="store_true", dest="channels_last")
    b.add_argument("--train", action="store_true",
                   help="time training updates (forward + backward + AdamW step) instead of inference")
    b.add_argument("--budget", help="default budget of AdaptiVision models, e.g. gmacs=1.3 or mean_k=64")
    b.add_argument("--checkpoint", help="weights for the AdaptiVision models (a .safetensors of a run)")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--rounds", type=int, default=15)
    b.add_argument("--out", help="write OUT.json and OUT.md")
    b.set_defaults(fn=_benchmark)
    v = sub.add_parser("visualize", help="PNGs of each image's super-token partition and AFA modulation")
    v.add_argument("--checkpoint", required=True, help="a .safetensors file of a run (model.json beside it)")
    v.add_argument("--model", help="model name, when the checkpoint has no model.json beside it")
    v.add_argument("images", nargs="*", metavar="IMAGE", help="image files (default: --num images of --dataset)")
    v.add_argument("--dataset", help="take images from this data set's test split (default: the run's)")
    v.add_argument("--data-dir", dest="data_dir")
    v.add_argument("--num", type=int, default=8)
    v.add_argument("--block", type=int, help="block whose AFA modulation is shown (default: the last)")
    v.add_argument("--out", required=True)
    v.set_defaults(fn=_visualize)
    g = sub.add_parser("segment", help="train a Segmenter (mosaic, ade20k, cityscapes), or --checkpoint: evaluate")
    g.add_argument("--dataset", default="mosaic", choices=("mosaic", "ade20k", "cityscapes"))
    g.add_argument("--data-dir", dest="data_dir")
    g.add_argument("--model", help="backbone (default: nano at 56 px for mosaics, small at 512 px otherwise)")
    g.add_argument("--img-size", type=int, dest="img_size")
    g.add_argument("--decoder", default="linear", choices=("linear", "mask"))
    g.add_argument("--eval-size", type=int, dest="eval_size", help="evaluate on the first N images (mosaics: N canvases)")
    _dense_args(g, "segmenter", "tome_r= or keep_ratio=", "reduction=tome")
    g.set_defaults(fn=_segment)
    d = sub.add_parser("detect", help="train FCOS on a backbone over Fashion-MNIST mosaic boxes (Table 3), "
                       "or --checkpoint: evaluate (mAP, GMACs, images/s)")
    d.add_argument("--data-dir", dest="data_dir")
    d.add_argument("--model", default="adaptivision_nano_patch4_28")
    d.add_argument("--img-size", type=int, default=56, dest="img_size", help="mosaic canvas (pixels)")
    d.add_argument("--channels", type=int, default=64, help="pyramid and head width (a multiple of 32)")
    d.add_argument("--eval-size", type=int, default=500, dest="eval_size", help="test canvases")
    _dense_args(d, "detector", "keep_ratio=", "reduction=hourglass")
    d.set_defaults(fn=_detect)
    r = sub.add_parser("report", help="Markdown tables and PNG plots from experiment directories")
    r.add_argument("run_dirs", nargs="+", metavar="EXPERIMENT_DIR", help="e.g. experiments/table5")
    r.add_argument("--out", required=True)
    r.set_defaults(fn=_report)
    args, extra = p.parse_known_args(argv)
    bad = [e for e in extra if args.cmd not in ("train", "experiment", "segment", "detect") or "=" not in e or e.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        if args.cmd in ("segment", "detect"):
            args.options = list(args.options) + extra
        else:
            args.overrides = list(args.overrides) + extra
    try:
        return args.fn(args)
    except (ValueError, OSError, FloatingPointError) as err:  # OSError: missing / existing / read-only paths
        print(f"adaptivision {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
