"""Building what a run needs from its config (model, transforms, guidance, evaluation data) and
rebuilding a finished run's model from the files beside its checkpoint (``load_for_eval``)."""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import timm
import torch
import torch.nn as nn
from safetensors import safe_open
from timm.data import create_transform, resolve_data_config
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader, Subset

from ..checkpoint import load_weights, read_weights
from ..config import ModelOptions, live_prop_attn
from ..data.datasets import build_dataset, collate_skip
from ..guidance import Guidance, class_embeddings, parse_sources
from ..models import AdaptiVision
from ..models.registry import STAGE_OPTIONS, stage_defaults
from .config import DENSE_TEACHER, TrainConfig
from .distributed import Dist

DENSE_KWARGS = dict(condense_at=False, afa=False, cmtf=False)


def model_spec(cfg: TrainConfig, num_classes: int, dense: bool, guide: Optional[Guidance] = None,
               checkpoint: Optional[str] = None) -> dict:
    """Name and keyword arguments that rebuild the model (saved as ``model.json``). Where DTC
    condenses is written out, so that a later change of a model's stage defaults cannot rebuild
    this run differently; ``checkpoint``: an existing run's weights, whose stages win (resume)."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.model.startswith("adaptivision_") and not dense:
        stages = checkpoint_stages(checkpoint, cfg.model, kwargs) if checkpoint else None
        kwargs = dict(stages if stages is not None else stage_defaults(cfg.model, kwargs), **kwargs)
        if kwargs.get("reduction", "dtc") == "dtc":  # defaults that moved: a resumed run keeps its own
            if "budget_jitter" not in kwargs:
                kwargs["budget_jitter"] = checkpoint_option(checkpoint, "budget_jitter", 1.0, ModelOptions.budget_jitter)
            if kwargs.get("prop_attn") is None:
                kwargs["prop_attn"] = checkpoint_option(checkpoint, "prop_attn", True, live_prop_attn(kwargs))
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.img_size:
        kwargs["img_size"] = cfg.img_size
    if cfg.model.startswith("adaptivision_"):
        if guide is not None and not dense:  # the options the sources need; the user's explicit ones win
            for k, v in guide.model_options(align=cfg.lambda_align > 0).items():
                if k in ("guidance_dim", "align_dim"):
                    kwargs[k] = v
                else:
                    kwargs.setdefault(k, v)
        kwargs.setdefault("cmtf", False)  # no guidance: CMTF would have nothing to fuse
        if dense:
            kwargs.update(DENSE_KWARGS)
    return dict(name=cfg.model, num_classes=num_classes, kwargs=kwargs)


def optimizer_params(model: nn.Module, cfg: TrainConfig):
    """What the optimizer is built on: the model (timm's weight-decay split), or, with ``backbone_lr_scale``,
    timm's same groups each split in two by a timm ``lr_scale``: the token-reduction predictors
    (``reducer.*``) at the full lr, every other parameter at ``backbone_lr_scale`` x it (DynamicViT's
    fine-tuning recipe, raoyongming/DynamicViT ``optim_factory.py``: ``bone_lr_scale=0.01``)."""
    if cfg.backbone_lr_scale == 1.0:
        return model
    new = {id(p) for n, p in model.named_parameters() if n.startswith("reducer.")}
    if not new:
        raise ValueError(f"backbone_lr_scale={cfg.backbone_lr_scale}: {cfg.model} {cfg.model_kwargs or ''} has no "
                         "token-reduction predictor (reducer.*) to train at the full lr; it is for "
                         "reduction='importance' or 'tofe' (DynamicViT's recipe)")
    groups = []
    for g in param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=model.no_weight_decay()):
        for scale, params in ((1.0, [p for p in g["params"] if id(p) in new]),
                              (cfg.backbone_lr_scale, [p for p in g["params"] if id(p) not in new])):
            if params:
                groups.append(dict(g, params=params, lr_scale=scale))
    return groups


def build_guidance(cfg: TrainConfig, classes, model: nn.Module) -> Optional[Guidance]:
    """The configured guidance sources for ``model``'s patch grid and the data set's class names
    (None for guidance=none). Class-name embeddings are computed once and cached."""
    sources = parse_sources(cfg.guidance)
    if not sources:
        return None
    if not isinstance(model, AdaptiVision) or model.opts.reduction != "dtc" or not model.dtc:
        raise ValueError(f"guidance={cfg.guidance!r} steers DTC and feeds CMTF: it needs an AdaptiVision model "
                         f"with reduction='dtc' and condense_at set (got {cfg.model} {cfg.model_kwargs or ''}); "
                         "use guidance=none")
    emb = None
    if "text" in sources:
        emb = class_embeddings(list(classes), cfg.text_model, cfg.text_template, dataset=cfg.dataset)
    return Guidance(sources, model.patch_embed.patch_size[0], model.patch_embed.num_patches, emb,
                    learned_tokens=cfg.guidance_tokens, dropout=cfg.guidance_dropout)


def guidance_kwargs(guide: Optional[Guidance], x: torch.Tensor, mode: str = "normal") -> dict:
    """``guidance=`` / ``patch_weights=`` for ``model(x, ...)`` (nothing without guidance)."""
    return guide(x, mode=mode).model_kwargs() if guide is not None else {}


def checkpoint_option(checkpoint: Optional[str], key: str, before, live):
    """An option of the run being resumed from ``checkpoint`` whose default moved: its ``model.json`` says
    it since the move (budget_jitter, 0 since 2026-11-27; prop_attn, off for DTC's default clustering since
    2026-11-27); a run saved before, whose spec does not say, trained with ``before``; ``live`` otherwise."""
    spec = _spec_beside(checkpoint) if checkpoint else None
    return (spec or {}).get("kwargs", {}).get(key, before if spec else live)


def checkpoint_stages(checkpoint: str, name: str, kwargs: dict) -> Optional[dict]:
    """``condense_at`` of the DTC stages a checkpoint holds (its ``dtc.<block>.*`` keys), when
    ``kwargs`` leave it to the model's default and that default now differs: a run saved before the
    nano model's stage moved after block 2 (2026-11-26) was built before block 0 and must be
    rebuilt so; and a run whose ``model.json`` wrote its stage out (since 2026-11-26) is rebuilt as written
    (the nano model's K 24 on a grid of 8 until 2026-11-28, K 20 on a grid of 4 since). None when ``kwargs``
    say where, or the checkpoint agrees with today's default."""
    if set(STAGE_OPTIONS) & set(kwargs) or not os.path.isfile(checkpoint) or not checkpoint.endswith(".safetensors"):
        return None
    written = {k: v for k, v in ((_spec_beside(checkpoint) or {}).get("kwargs") or {}).items() if k in STAGE_OPTIONS}
    if written:
        return written if written != stage_defaults(name, kwargs) else None
    try:
        with safe_open(checkpoint, "pt") as f:
            blocks = sorted({int(m[1]) for k in f.keys() if (m := re.match(r"dtc\.(\d+)\.", k))})
    except Exception:  # unreadable: loading the weights names the problem
        return None
    default = stage_defaults(name, kwargs).get("condense_at", 0)
    if not blocks or blocks == (default if isinstance(default, list) else [default]):
        return None
    return dict(condense_at=blocks if len(blocks) > 1 else blocks[0])


def create_model(spec: dict) -> nn.Module:
    if not timm.is_model(spec["name"]):
        import difflib
        close = difflib.get_close_matches(spec["name"], timm.list_models(), n=3)
        raise ValueError(f"Unknown model {spec['name']!r}." + (f" Did you mean {' or '.join(map(repr, close))}?"
                         if close else "") + " (ours: timm.list_models('adaptivision_*'))")
    return timm.create_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])


def build_transforms(cfg: TrainConfig, model: nn.Module):
    data_cfg = resolve_data_config({}, model=model)
    size = data_cfg["input_size"][-1]
    scale_min = cfg.scale_min if cfg.scale_min is not None else (0.08 if size >= 128 else 0.7)
    train_tf = create_transform(data_cfg["input_size"], is_training=True, scale=(scale_min, 1.0),
                                hflip=cfg.hflip, color_jitter=cfg.color_jitter or None,
                                interpolation=data_cfg["interpolation"], mean=data_cfg["mean"], std=data_cfg["std"])
    eval_tf = create_transform(data_cfg["input_size"], is_training=False, crop_pct=data_cfg["crop_pct"],
                               interpolation=data_cfg["interpolation"], mean=data_cfg["mean"], std=data_cfg["std"])
    mode = "L" if data_cfg["input_size"][0] == 1 else "RGB"
    return train_tf, eval_tf, mode


def limit_dataset(ds, n: Optional[int]):
    if n is None or n >= len(ds):
        return ds
    sub = Subset(ds, range(n))
    sub.classes = ds.classes
    if hasattr(ds, "class_indices"):
        sub.class_indices = ds.class_indices
    return sub


def build_eval_dataset(cfg: TrainConfig, model: nn.Module, dataset: Optional[str] = None, data_dir=None):
    _, eval_tf, mode = build_transforms(cfg, model)
    ds = build_dataset(dataset or cfg.dataset, data_dir or cfg.data_dir, train=False, transform=eval_tf,
                       mode=mode, strict=cfg.strict_images, download=cfg.download)
    return limit_dataset(ds, cfg.limit_eval)


def eval_loader(ds, cfg: TrainConfig, d: Dist) -> DataLoader:
    shard = Subset(ds, range(d.rank, len(ds), d.world))  # no padding: every image counted once
    return DataLoader(shard, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
                      collate_fn=collate_skip)


def load_for_eval(checkpoint: str, model_name: Optional[str] = None) -> tuple:
    """Rebuild the model of a run from ``model.json`` beside the checkpoint and load its weights."""
    ckpt_dir = os.path.dirname(os.path.abspath(checkpoint))
    spec = _spec_beside(checkpoint)  # how the run built it: the same architecture whatever --model says
    saved = spec is not None
    if spec is not None and model_name and model_name != spec["name"]:
        raise ValueError(f"--model {model_name}: {checkpoint} holds a {spec['name']} (its model.json / metadata); "
                         "leave --model out")
    if spec is None and model_name:
        spec = dict(name=model_name, num_classes=None, kwargs={})
    if spec is None:
        raise FileNotFoundError(f"{os.path.join(ckpt_dir, 'model.json')} not found and {checkpoint} does not "
                                "record its model: pass --model NAME to say which model it holds")
    if spec["num_classes"] is None:
        head = read_weights(checkpoint).get("head.weight")  # (names a truncated or foreign file)
        spec["num_classes"] = head.shape[0] if head is not None else 0
    if spec["name"].startswith("adaptivision_"):  # a run saved before its model's stage default moved
        spec["kwargs"] = dict(checkpoint_stages(checkpoint, spec["name"], spec["kwargs"]) or {}, **spec["kwargs"])
        if saved and spec["kwargs"].get("reduction", "dtc") == "dtc":  # saved before prop_attn was written out
            spec["kwargs"].setdefault("prop_attn", True)                # into specs: it was on for every DTC then
    model = create_model(spec)
    load_weights(model, checkpoint)
    cfg_path = os.path.join(ckpt_dir, "config.yaml")
    cfg = TrainConfig.build(cfg_path) if os.path.isfile(cfg_path) else TrainConfig()
    return model, cfg


def load_guidance(checkpoint: str, cfg: TrainConfig, model: nn.Module) -> Optional[Guidance]:
    """The guidance a run was trained with (None if none), rebuilt from ``model.json`` beside
    ``checkpoint``: the class names are stored there, their embeddings come from the cache."""
    info = (_spec_beside(checkpoint) or {}).get("guidance")
    return build_guidance(cfg, info["classes"], model) if info else None


def _spec_beside(checkpoint: str) -> Optional[dict]:
    """The run's ``model.json`` (name, classes, options, guidance) next to ``checkpoint``, else
    the copy ``train`` writes into the checkpoint's metadata (a checkpoint moved on its own)."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "model.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    from safetensors import safe_open
    try:
        with safe_open(checkpoint, "pt") as f:
            meta = (f.metadata() or {}).get("model")
    except Exception:  # not a readable safetensors file: load_weights names the problem
        return None
    return json.loads(meta) if meta else None


def teacher_path(cfg: TrainConfig, run_dir: str) -> Optional[str]:
    """The file ``distill_from`` names; 'dense': the job's own dense model, ``run_dir/dense``'s last
    checkpoint (the last, not the test-set best)."""
    cfg = cfg.resolved()
    if cfg.distill_from == DENSE_TEACHER:
        return os.path.join(run_dir, "dense", "last.safetensors")
    return cfg.distill_from


def load_teacher(cfg: TrainConfig, num_classes: int, device, run_dir: str = "") -> Optional[nn.Module]:
    """The frozen teacher of ``distill_from`` (None without one), rebuilt like ``load_for_eval``;
    a teacher with another class count is refused before any training."""
    path = teacher_path(cfg, run_dir)
    if not path:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"distill_from={cfg.distill_from}: no such file {path} (a run's best.safetensors "
                                "or last.safetensors, with its model.json beside it)")
    teacher, _ = load_for_eval(path)
    if teacher.num_classes != num_classes:
        raise ValueError(f"distill_from={path}: the teacher predicts {teacher.num_classes} classes, "
                         f"the data set {cfg.dataset} has {num_classes}")
    return teacher.eval().requires_grad_(False).to(device)
