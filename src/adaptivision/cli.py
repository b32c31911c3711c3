"""``adaptivision train | eval | profile`` (also ``python -m adaptivision``)."""
from __future__ import annotations

import argparse
import json
import sys

import torch


def _train(args) -> int:
    from .train import TrainConfig, run
    overrides = list(args.overrides)
    for key in ("dataset", "data_dir", "model", "epochs", "output", "name"):
        v = getattr(args, key)
        if v is not None:
            overrides.append(f"{key}={v}")
    if args.download:
        overrides.append("download=true")
    cfg = TrainConfig.build(args.config, overrides)
    run(cfg, resume=args.resume, stop_after=args.stop_after)
    return 0


def _eval(args) -> int:
    from .profile import profile
    from .train.engine import build_eval_dataset, eval_loader, evaluate, load_for_eval, setup_distributed
    model, cfg = load_for_eval(args.checkpoint, args.model)
    if args.data_dir is not None:
        cfg.data_dir = args.data_dir
    if args.dataset is not None and args.dataset != cfg.dataset:
        cfg.dataset, cfg.limit_eval = args.dataset, None
    d = setup_distributed(cfg.device)
    model.to(d.device)
    ds = build_eval_dataset(cfg, model, args.dataset, args.data_dir)
    res = evaluate(model, eval_loader(ds, cfg, d), d, "none", getattr(ds, "class_indices", None))
    from .data import collate_skip
    x, _, _ = collate_skip([ds[i] for i in range(min(64, len(ds)))])
    x = x.to(d.device)
    prof = profile(model, x)
    res.update(gmacs=prof["gmacs"], params_m=prof["params"] / 1e6, mean_k=prof.get("mean_k"))
    print(json.dumps(res, indent=1))
    return 0


def _profile(args) -> int:
    import timm

    from .train.engine import measure
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adaptivision", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train and evaluate (Fashion-MNIST by default), with the dense model beside")
    t.add_argument("--config", help="YAML/JSON config file (see configs/)")
    t.add_argument("--dataset")
    t.add_argument("--data-dir", dest="data_dir")
    t.add_argument("--model")
    t.add_argument("--epochs", type=int)
    t.add_argument("--output")
    t.add_argument("--name")
    t.add_argument("--download", action="store_true", help="let torchvision download the data set")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    t.add_argument("--stop-after", type=int, dest="stop_after", help="stop after N epochs of this invocation")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="any TrainConfig field")
    t.set_defaults(fn=_train)
    e = sub.add_parser("eval", help="evaluate a checkpoint")
    e.add_argument("--checkpoint", required=True, help="a .safetensors file of a run (model.json beside it)")
    e.add_argument("--model", help="model name, when the checkpoint has no model.json beside it")
    e.add_argument("--dataset")
    e.add_argument("--data-dir", dest="data_dir")
    e.set_defaults(fn=_eval)
    f = sub.add_parser("profile", help="params, GMACs and throughput of models (timm names work too)")
    f.add_argument("--model", required=True, help="one or more names, comma-separated")
    f.add_argument("--img-size", type=int, dest="img_size")
    f.add_argument("--batch-size", type=int, default=32, dest="batch_size")
    f.add_argument("--repeats", type=int, default=10)
    f.set_defaults(fn=_profile)
    args, extra = p.parse_known_args(argv)
    bad = [e for e in extra if args.cmd != "train" or "=" not in e or e.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        print(f"adaptivision {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
