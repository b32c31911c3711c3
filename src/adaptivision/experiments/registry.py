"""The paper's tables and figures as experiments: which runs each needs and how it is laid out.

A *cell* is one configuration (a row or a point); the runner trains it once per seed with the
ordinary engine, and cells with the same configuration are shared between experiments (the
``dtc`` row of Table 5 is the ``tau = 150`` row of Table 4 and the full model of Table 7).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from .. import config
from ..config import unknown_key_error

SCALES = ("smoke", "small", "default", "full", "paper")
# the plateau scale (issue 14): the dense nano ViT must gain < 0.3 points over its last two epochs. At 10
# epochs it gained 0.63 (88.09 -> 88.72; benchmarks/results/plateau-probe); at 20 it gains 0.08 (89.83 ->
# 89.91; benchmarks/results/dtc/full/dtc-plateau)
FULL_EPOCHS = 20


@dataclass(frozen=True)
class Cell:
    label: str                       # the row label, as in the paper
    kwargs: dict = field(default_factory=dict)  # model options (ModelOptions / timm)
    train: dict = field(default_factory=dict)   # TrainConfig fields of this cell (guidance, lambda_align, ...)
    model: Optional[str] = None      # a different model name (e.g. a timm dense model); default: the scale's
    match_gmacs: bool = False        # set the baseline's knob so its GMACs equal the dtc cell's
    scales: tuple = SCALES           # where the cell exists (timm's Swin-T only at paper scale)
    epochs_fraction: Optional[float] = None  # train this share of the scale's epochs (at least 1): fine-tuning
    lr_factor: Optional[float] = None        # train at this share of the scale's learning rate (base_lr x it)


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    kind: str                        # 'train' | 'budget' | 'scaling' | 'robustness' | 'guidance' | 'segmentation' | 'detection'
    cells: tuple = ()
    key: Optional[str] = None        # column named after the swept option (Table 4: tau)
    paper_datasets: tuple = ("imagenet",)
    note: str = ""


DTC = Cell("AdaptiVision (DTC)", {"reduction": "dtc"})
DENSE = Cell("ViT (dense)", {"reduction": "none"})
TEACHER_DENSE = "dense"  # train=dict(distill_from=TEACHER_DENSE): the DENSE cell's run of the same seed teaches
# (init_from=TEACHER_DENSE: the cell fine-tunes from it)
BASELINES = (
    DENSE,
    Cell("Random keep", {"reduction": "random"}, match_gmacs=True),
    Cell("DynamicViT (importance)", {"reduction": "importance"}, match_gmacs=True),
    Cell("EViT", {"reduction": "evit"}, match_gmacs=True),
    Cell("ToMe", {"reduction": "tome"}, match_gmacs=True),
    Cell("Hourglass", {"reduction": "hourglass"}, match_gmacs=True),
    Cell("HiRED (adapted)", {"reduction": "hired"}, match_gmacs=True),
    Cell("ToFe (freeze and reuse)", {"reduction": "tofe"}, match_gmacs=True),
    DTC,  # the live defaults except budget_jitter (pinned at 1.0, the default these rows were recorded with)
)
# DynamicViT and ToFe learn a hard keep decision (Gumbel-softmax, straight-through). Their papers fine-tune a
# pretrained DeiT at a small lr; trained from scratch at this recipe's peak (2e-3 at batch 64) the loss climbs back
# to chance within the first epoch and a keep predictor saturates: it keeps or drops every patch from then on, the
# top-k of inference feeds the model tokens it never saw, and test top-1 stays at 6-28%, with the gradient norm
# clipped at 1.0 too. At a quarter of the lr both train (first epoch: 75-76% where dense at the full lr reaches 77%;
# docs/results.md, "Learned keep predictors collapse"). They get both, as a fix of their recipe (help for a
# baseline, never for DTC): table5, figure1a and table1 use these cells since 2026-11-29; the BASELINES cells
# keep the runs recorded before.
LEARNED_KEEP_LR, LEARNED_KEEP_CLIP = 0.25, 1.0
FAIR_BASELINES = tuple(replace(c, label=f"{c.label}, lr / 4, grad clip {LEARNED_KEEP_CLIP:g}", lr_factor=LEARNED_KEEP_LR,
                               train=dict(c.train, clip_grad=LEARNED_KEEP_CLIP))
                       if c.kwargs["reduction"] in ("importance", "tofe") else c for c in BASELINES)
TEXT_SAL = "text,saliency"


def _guided(label: str, guidance: str, **train) -> Cell:
    return Cell(label, {"reduction": "dtc"}, train=dict(guidance=guidance, **train))


GUIDANCE_CELLS = (
    Cell("no guidance (DTC+AFA)", {"reduction": "dtc"}),
    _guided("learned tokens (M=8)", "learned"),
    _guided("saliency", "saliency"),
    Cell("saliency, DTC only (no CMTF)", {"reduction": "dtc", "cmtf": False}, train=dict(guidance="saliency")),
    _guided("foreground mask", "mask"),
    Cell("foreground mask, DTC only (no CMTF)", {"reduction": "dtc", "cmtf": False}, train=dict(guidance="mask")),
    _guided("text (class names)", "text"),
    _guided("text + saliency", TEXT_SAL),
    _guided("text, lambda2 = 0.1", "text", lambda_align=0.1),
    _guided("text + saliency, lambda2 = 0.1", TEXT_SAL, lambda_align=0.1),
    _guided("text + saliency, lambda1 = 1e-3, lambda2 = 0.1", TEXT_SAL, lambda_align=0.1, lambda_cluster=1e-3),
    _guided("text + saliency, source dropout 0.2", TEXT_SAL, guidance_dropout=0.2),
    _guided("text + saliency, source dropout 0.5", TEXT_SAL, guidance_dropout=0.5),
)

# Issue 15's levers: how DTC clusters, each change alone and in combination, beside the baselines
# (the paper trains with per-image K: pinned, so these cells keep the meaning and the runs they were
# recorded with when one K per training batch became the default)
# condense_at=0 pinned: these cells were recorded before the nano model's default moved after block 2
PAPER_DTC = {"reduction": "dtc", **config.PAPER_DTC}
IMAGE_DTC = {"reduction": "dtc", "clustering": "image", "condense_at": 0}
# the nano default since 2026-11-27 (after block 2, K about 24, one K per batch, no budget jitter): the base of
# the levers measured since
NO_JITTER = dict(IMAGE_DTC, assign="soft", tau=20.0, condense_at=2, k_mid=24, train_k="batch", budget_jitter=0.0)
# the nano model `adaptivision train` builds today, beside the older DTC row of Table 5 / Figure 1(a)
DEFAULT_DTC = Cell("AdaptiVision (DTC), no budget jitter", NO_JITTER)
# the default since 2026-11-27 (LEVER_CELLS[47]'s options: the same runs)
DEFAULT_DTC_NO_PROP = Cell("AdaptiVision (DTC), no budget jitter, no proportional attention", dict(NO_JITTER, prop_attn=False))
LEVER_CELLS = (
    DENSE,
    Cell("EViT", {"reduction": "evit"}, match_gmacs=True),
    Cell("ToMe", {"reduction": "tome"}, match_gmacs=True),
    Cell("paper: learned centroids, soft, tau 150", PAPER_DTC),
    Cell("paper, tau 20", dict(PAPER_DTC, tau=20.0)),
    Cell("paper, hard assignment", dict(PAPER_DTC, assign="hard")),
    Cell("per-image centres (fps), soft, tau 150", dict(PAPER_DTC, centers="fps")),
    Cell("fps, hard", dict(PAPER_DTC, centers="fps", assign="hard")),
    Cell("fps, hard, 2 k-means steps (clustering='image')", IMAGE_DTC),
    Cell("image, AFA off", dict(IMAGE_DTC, afa=False)),
    Cell("image, eq. 3 literal sum", dict(IMAGE_DTC, normalize=False)),
    Cell("image, condense after block 1", dict(IMAGE_DTC, condense_at=1)),
    Cell("image, soft, tau 20", dict(IMAGE_DTC, assign="soft", tau=20.0)),
    Cell("image, K warm-up (from K_max over 1 epoch)", IMAGE_DTC, train=dict(budget_warmup=1.0)),
    Cell("image, soft, tau 20, K warm-up", dict(IMAGE_DTC, assign="soft", tau=20.0), train=dict(budget_warmup=1.0)),
    # later condensation at the same cost: fewer clusters, taken from better-mixed tokens
    # (per-image K in training, as these were recorded before train_k='batch' became the default)
    Cell("image, soft, tau 20, after block 2, K 24",
         dict(IMAGE_DTC, assign="soft", tau=20.0, condense_at=2, k_mid=24, train_k="image")),
    Cell("image, soft, tau 20, after block 1, K 24",
         dict(IMAGE_DTC, assign="soft", tau=20.0, condense_at=1, k_mid=24, train_k="image")),
    # AFA costs a quarter of a training update (docs/performance.md): is it worth it?
    Cell("image, soft, tau 20, after block 2, K 24, AFA off",
         dict(IMAGE_DTC, assign="soft", tau=20.0, condense_at=2, k_mid=24, afa=False, train_k="image")),
    # per-image K groups cost more training time than their tokens save (docs/performance.md):
    # the same models trained with one K per batch (their images' mean), per-image K at inference
    Cell("image, soft, tau 20, after block 2, K 24, batch K",
         dict(IMAGE_DTC, assign="soft", tau=20.0, condense_at=2, k_mid=24, train_k="batch")),
    Cell("image, soft, tau 20, after block 2, K 24, AFA off, batch K",
         dict(IMAGE_DTC, assign="soft", tau=20.0, condense_at=2, k_mid=24, afa=False, train_k="batch")),
    # the K range after block 2 stops at 16 (57% of the dense GMACs) and the budget jitter (+-1)
    # trains K ~16-34 only: K down to 8 and a jitter of 2 train the low budgets too (Figure 1(a)'s 40-55%)
    Cell("image, soft, tau 20, after block 2, K 24, batch K, K 8-49, jitter 2",
         dict(IMAGE_DTC, assign="soft", tau=20.0, condense_at=2, k_mid=24, train_k="batch", k_min=8,
              budget_jitter=2.0)),
    # distillation from the dense model of the same seed (its last checkpoint), and ToMe with the same
    # teacher so that the comparison stays fair
    Cell("image, soft, tau 20, after block 2, K 24, batch K, distilled from dense",
         dict(IMAGE_DTC, assign="soft", tau=20.0, condense_at=2, k_mid=24, train_k="batch"),
         train=dict(distill_from=TEACHER_DENSE)),
    Cell("ToMe, distilled from dense", {"reduction": "tome", "tome_r": 5}, train=dict(distill_from=TEACHER_DENSE)),
    # the two levers that helped at the plateau, together: without AFA (cheaper, fine-tuned +0.30) and distilled
    Cell("image, soft, tau 20, after block 2, K 24, AFA off, batch K, distilled from dense",
         dict(IMAGE_DTC, assign="soft", tau=20.0, condense_at=2, k_mid=24, afa=False, train_k="batch"),
         train=dict(distill_from=TEACHER_DENSE)),
    # condense gradually, as ToMe does: 40 super-tokens after block 1, 8-32 after block 3 (about 20 once
    # trained), at the one stage's GMACs (off the shelf two stages were a little better at the plateau)
    Cell("image, soft, tau 20, two stages after blocks 1 and 3, K 40/16, batch K",
         dict(IMAGE_DTC, assign="soft", tau=20.0, condense_at=[1, 3], k_min=[32, 8], k_max=[49, 32], k_mid=40,
              train_k="batch")),
    # at the plateau DTC fits its training set less well than dense (train top-1 94.6-94.8% against 95.2%,
    # test 0.68 lower): is the budget jitter (a random K shift per batch) a regulariser it cannot afford?
    Cell("image, soft, tau 20, after block 2, K 24, batch K, no budget jitter",
         dict(NO_JITTER)),
    # one block later at the same GMACs (fewer super-tokens from better-mixed tokens: off the shelf condensing
    # after block 2 beat block 0); K in steps of 4 so that a mean of 17 is reachable
    Cell("image, soft, tau 20, after block 3, K 17, batch K, no budget jitter",
         dict(IMAGE_DTC, assign="soft", tau=20.0, condense_at=3, k_min=8, k_mid=17, k_step=4, train_k="batch",
              budget_jitter=0.0)),
    # the two levers that cost nothing in accuracy alone, together: no jitter and no AFA
    Cell("image, soft, tau 20, after block 2, K 24, AFA off, batch K, no budget jitter",
         dict(IMAGE_DTC, assign="soft", tau=20.0, condense_at=2, k_mid=24, afa=False, train_k="batch",
              budget_jitter=0.0)),
    # position in the distance (SLIC's compactness): features alone let a cluster gather patches from all
    # over the image (the background's look-alike patches above all); a weight makes clusters contiguous
    Cell("image, soft, tau 20, after block 2, K 24, batch K, no budget jitter, spatial 0.25",
         dict(NO_JITTER, spatial=0.25)),
    Cell("image, soft, tau 20, after block 2, K 24, batch K, no budget jitter, spatial 1",
         dict(NO_JITTER, spatial=1.0)),
    # the default job's model (no jitter since 2026-11-27) distilled as the default job trains it
    Cell("image, soft, tau 20, after block 2, K 24, batch K, no budget jitter, distilled from dense",
         dict(NO_JITTER),
         train=dict(distill_from=TEACHER_DENSE)),
    # centres from a grid over the patch grid (Hourglass's and SLIC's start) instead of farthest points:
    # no sequential loop, and each centre starts at its place; alone and with the spatial term (SLIC)
    Cell("image, soft, tau 20, after block 2, K 24, batch K, no budget jitter, grid centres",
         dict(NO_JITTER, centers="grid")),
    Cell("image, soft, tau 20, after block 2, K 24, batch K, no budget jitter, grid centres, spatial 0.5",
         dict(NO_JITTER, centers="grid", spatial=0.5)),
    # the temperature trained with the model (per stage, from 20) instead of fixed by Table 4's sweep
    Cell("image, soft, tau 20, after block 2, K 24, batch K, no budget jitter, learned tau",
         dict(NO_JITTER, learn_tau=True)),
    # [CLS]'s most attended patches (block 1's attention, EViT's score) kept as they are, the rest clustered
    # into K - n: the "keep a few most salient patches unclustered"; K (and the GMACs) unchanged
    Cell("image, soft, tau 20, after block 2, K 24, batch K, no budget jitter, keep 4 salient",
         dict(NO_JITTER, keep_salient=4)),
    Cell("image, soft, tau 20, after block 2, K 24, batch K, no budget jitter, keep 8 salient",
         dict(NO_JITTER, keep_salient=8)),
    # in-place distillation (slimmable networks): the same weights on every patch token teach the condensed
    # path in each step; trained from scratch, no dense run (measured: 2.3x the training time of the condensed model)
    Cell("image, soft, tau 20, after block 2, K 24, batch K, no budget jitter, self-distilled",
         dict(NO_JITTER), train=dict(self_distill=0.5)),
    # the control of every distilled cell: the dense model taught by the dense run of its seed (born-again
    # networks, Furlanello et al. 2018), so that "distilled DTC above dense" is read against the same recipe
    Cell("ViT (dense), distilled from dense", {"reduction": "none"}, train=dict(distill_from=TEACHER_DENSE)),
    # no gradient through eq. 2: the clustering pools with weights the loss does not move, as Hourglass's
    # (detached weights) and ToMe's (non-differentiable matching) do; with and without AFA (Hourglass has none)
    Cell("image, soft, tau 20, after block 2, K 24, batch K, no budget jitter, no assignment gradient",
         dict(NO_JITTER, assign_grad=False)),
    Cell("image, soft, tau 20, after block 2, K 24, AFA off, batch K, no budget jitter, no assignment gradient",
         dict(NO_JITTER, afa=False, assign_grad=False)),
    # Hourglass's clustering where DTC condenses (after block 2, a 5 x 5 grid: K 25, DTC's GMACs): is the
    # difference in Table 5 (Hourglass after block 1, 62% of the dense GMACs) the clustering or the place?
    Cell("Hourglass, after block 2, K 25", {"reduction": "hourglass", "keep_ratio": 0.51, "reduce_at": 2}),
    # and DTC where Hourglass condenses by default (after block 1: 62% of the dense GMACs)
    Cell("image, soft, tau 20, after block 1, K 24, batch K, no budget jitter", dict(NO_JITTER, condense_at=1)),
    # Hourglass's clustering inside DTC at Hourglass's place: grid centres, a local window of 5 cells, 5 k-means
    # steps, no AFA (its slot-indexed terms meet grid cells of varying shape), per-image K; then one 5 x 5 grid
    # for every image (Hourglass's K, so AFA's slots mean the same cell in every batch), without and with AFA
    # (measured: AFA fails on the fixed grid too, and without AFA the gradient through the assignment is the trouble)
    Cell("image, soft, tau 20, after block 1, K 24, AFA off, batch K, no budget jitter, grid centres, window 5, "
         "5 iterations", dict(NO_JITTER, condense_at=1, afa=False, centers="grid", window=5, iters=5)),
    Cell("image, soft, tau 20, after block 1, fixed K 25, AFA off, no budget jitter, grid centres, window 5, "
         "5 iterations", dict(NO_JITTER, condense_at=1, afa=False, centers="grid", window=5, iters=5, dynamic=False,
                              k_max=25)),
    Cell("image, soft, tau 20, after block 1, fixed K 25, no budget jitter, grid centres, window 5, 5 iterations",
         dict(NO_JITTER, condense_at=1, centers="grid", window=5, iters=5, dynamic=False, k_max=25)),
    # what is left between that model without AFA and Hourglass (which it then equals: tests/test_clustering.py):
    # the gradient through the assignment (Hourglass detaches it) and proportional attention (Hourglass runs
    # without it); each taken away alone
    Cell("image, soft, tau 20, after block 1, fixed K 25, AFA off, no budget jitter, grid centres, window 5, "
         "5 iterations, no assignment gradient",
         dict(NO_JITTER, condense_at=1, afa=False, centers="grid", window=5, iters=5, dynamic=False, k_max=25,
              assign_grad=False)),
    Cell("image, soft, tau 20, after block 1, fixed K 25, AFA off, no budget jitter, grid centres, window 5, "
         "5 iterations, no proportional attention",
         dict(NO_JITTER, condense_at=1, afa=False, centers="grid", window=5, iters=5, dynamic=False, k_max=25,
              prop_attn=False)),
    # and proportional attention taken from DTC as it is (farthest points, AFA, per-image K), at both places
    Cell("image, soft, tau 20, after block 2, K 24, batch K, no budget jitter, no proportional attention",
         dict(NO_JITTER, prop_attn=False)),
    Cell("image, soft, tau 20, after block 1, K 24, batch K, no budget jitter, no proportional attention",
         dict(NO_JITTER, condense_at=1, prop_attn=False)),
    # the default job's model since proportional attention went off by default, distilled as the job trains it
    Cell("image, soft, tau 20, after block 2, K 24, batch K, no budget jitter, no proportional attention, "
         "distilled from dense", dict(NO_JITTER, prop_attn=False), train=dict(distill_from=TEACHER_DENSE)),
    # the same model trained at fewer super-tokens: K 24 costs 69% of the dense GMACs, just above issue 15's
    # bound of 2/3; K 20 (K on a grid of 4, so that the batch K is 20 and not 16 or 24) is ~63%
    Cell("image, soft, tau 20, after block 2, K 20, batch K, no budget jitter, no proportional attention",
         dict(NO_JITTER, prop_attn=False, k_mid=20, k_step=4)),
    # ToMe trained at that cost (r = 6: 62% of the dense GMACs), not only r = 5 (68%) cut at inference
    Cell("ToMe, r 6", {"reduction": "tome", "tome_r": 6}),
)

# Fine-tuning from the trained dense model, the protocol of DynamicViT, EViT and ToMe's trained rows
# (they start from a pretrained DeiT): a tenth of the scale's epochs at a tenth of the learning rate,
# the dense model fine-tuned the same way as the control for the extra epochs
FINETUNE = dict(init_from=TEACHER_DENSE, base_lr=1.6e-3, warmup_epochs=0.1)
FINETUNE_CELLS = (
    DENSE,
    Cell("ViT (dense), fine-tuned further", {"reduction": "none"}, train=FINETUNE, epochs_fraction=0.1),
    Cell("image, soft, tau 20, after block 2, K 24, batch K, fine-tuned from dense",
         dict(IMAGE_DTC, assign="soft", tau=20.0, condense_at=2, k_mid=24, train_k="batch"), train=FINETUNE,
         epochs_fraction=0.1),
    Cell("ToMe, fine-tuned from dense", {"reduction": "tome", "tome_r": 5}, train=FINETUNE, epochs_fraction=0.1),
    Cell("EViT, fine-tuned from dense", {"reduction": "evit"}, train=FINETUNE, match_gmacs=True, epochs_fraction=0.1),
    # the same DTC without AFA (with it, AFA's f_m is the one part that starts untrained): does AFA hold DTC back?
    Cell("image, soft, tau 20, after block 2, K 24, AFA off, batch K, fine-tuned from dense",
         dict(IMAGE_DTC, assign="soft", tau=20.0, condense_at=2, k_mid=24, afa=False, train_k="batch"),
         train=FINETUNE, epochs_fraction=0.1),
    # the keep-score baselines as their papers train them: from a trained ViT (from scratch their predictors
    # saturate within ~400 updates and the rows collapse; benchmarks/predictor_saturation.py)
    Cell("DynamicViT (importance), fine-tuned from dense", {"reduction": "importance"}, train=FINETUNE,
         match_gmacs=True, epochs_fraction=0.1),
    Cell("ToFe (freeze and reuse), fine-tuned from dense", {"reduction": "tofe"}, train=FINETUNE, match_gmacs=True,
         epochs_fraction=0.1),
    # DynamicViT with its own learning-rate split: the backbone at 1% of the predictors' lr
    # (raoyongming/DynamicViT optim_factory.py, bone_lr_scale=0.01)
    Cell("DynamicViT (importance), fine-tuned from dense, backbone at 1% of the lr", {"reduction": "importance"},
         train=dict(FINETUNE, backbone_lr_scale=0.01), match_gmacs=True, epochs_fraction=0.1),
    # the default model since 2026-11-27 (no jitter, no proportional attention) fine-tuned the same way
    Cell("image, soft, tau 20, after block 2, K 24, batch K, no budget jitter, no proportional attention, "
         "fine-tuned from dense", dict(NO_JITTER, prop_attn=False), train=FINETUNE, epochs_fraction=0.1),
)

# the nano model's default until it moved after block 2 (registry.STAGE_DEFAULTS): image-soft before block 0
DEFAULT_JOB_BLOCK0 = Cell("image-soft before block 0 (the default until 2026-11-26)", {"reduction": "dtc", "condense_at": 0})

# Figure 1(b)/(c): segmentation backbones, each trained once per seed and evaluated at SEG_BUDGETS
SEG_CELLS = (
    Cell("ViT (dense)", {"reduction": "none"}),
    Cell("AdaptiVision (DTC, skip unpooling)", {"reduction": "dtc", "cmtf": False, "unpool": "skip"}),
    Cell("EViT", {"reduction": "evit"}),
    Cell("Hourglass", {"reduction": "hourglass"}),
    Cell("ToMe (unmerged)", {"reduction": "tome"}),
)
SEG_BUDGETS = {"none": [None], "dtc": [("bias", -2.0), ("bias", 0.0), ("bias", 2.0)],
               "evit": [("keep_ratio", 0.5), ("keep_ratio", 0.7), ("keep_ratio", 0.9)],
               "hourglass": [("keep_ratio", 0.3), ("keep_ratio", 0.5), ("keep_ratio", 0.7)],
               "tome": [("tome_r", 4), ("tome_r", 8), ("tome_r", 12)]}
# steps of batch 32 and test canvases of Fashion-MNIST mosaics (56 x 56) per scale; full: 12000, since
# 3000 still gained 2.2 mIoU over its last two tenths (docs/results.md, "the segmentation plateau probe")
SEG_SCALES = {"smoke": dict(steps=2, batch=4, eval_size=8), "small": dict(steps=300, batch=32, eval_size=500),
              "default": dict(steps=900, batch=32, eval_size=500), "full": dict(steps=12000, batch=32, eval_size=1000),
              "paper": dict(steps=80000, batch=16, eval_size=None)}
# Table 3: FCOS on each backbone over mosaic boxes (dense/detect.py), trained once per seed
DET_CELLS = (
    Cell("ViT (dense)", {"reduction": "none"}),
    Cell("AdaptiVision (DTC, skip unpooling)", {"reduction": "dtc", "cmtf": False, "unpool": "skip"}),
    Cell("Hourglass", {"reduction": "hourglass"}),
)
# steps of batch 16 and test canvases per scale (56 x 56 mosaics; no paper scale: COCO is not read here)
DET_SCALES = {"smoke": dict(steps=2, batch=4, eval_size=8), "small": dict(steps=800, batch=16, eval_size=500),
              "default": dict(steps=4000, batch=16, eval_size=1000), "full": dict(steps=12000, batch=16, eval_size=2000)}

# At the plateau the one recipe over-fits (label smoothing and weight decay only: training top-1 5-6 points above
# test for every model but Random keep, whose patch drops regularise it to a 2-point gap and whose curve is the
# best measured from 75% of the dense GMACs up; docs/results.md, "Table 5 at the plateau"). Stochastic depth at
# DeiT's rate (0.1) for the dense model, the K 20 default and ToMe r = 6 alike: does a regularised recipe keep
# DTC's lead, and does it close the gap to Random keep? (appended: LEVER_CELLS[52:55])
LEVER_CELLS += tuple(replace(LEVER_CELLS[i], label=LEVER_CELLS[i].label + ", drop path 0.1",
                             train=dict(LEVER_CELLS[i].train, drop_path=0.1)) for i in (0, 50, 51))

# Random keep's patch drops are what regularise it (trained at keep 0.66 and evaluated at 0.9 it is the best
# model measured at the plateau): the same drops in training only, before DTC clusters what is left and before
# the dense model's first block (timm's patch_drop_rate, PatchDropout: Liu et al., WACV 2023), and every patch
# at evaluation, so the cost is unchanged. 0.25: between Random keep's 0.34 and its best evaluated 0.1
# (appended: LEVER_CELLS[55:57])
PATCH_DROP = 0.25
LEVER_CELLS += tuple(replace(LEVER_CELLS[i], label=LEVER_CELLS[i].label + f", patch drop {PATCH_DROP}",
                             kwargs=dict(LEVER_CELLS[i].kwargs, patch_drop_rate=PATCH_DROP)) for i in (0, 50))
# ToMe r = 6 with the same drops: the merging baseline under the same regulariser (it merges what survives;
# r is clamped to half the tokens left, as ToMe does). Appended: LEVER_CELLS[57]
LEVER_CELLS += (replace(LEVER_CELLS[51], label=LEVER_CELLS[51].label + f", patch drop {PATCH_DROP}",
                        kwargs=dict(LEVER_CELLS[51].kwargs, patch_drop_rate=PATCH_DROP)),)
# Below 55% of the dense GMACs the K 20 model with drops is cut under its trained K range (k_min 16) and ToMe r = 6
# with drops, merging more at inference, is the better model at 46-50% (docs/results.md, "Random patch drops in
# training"). Each trained for the low budget instead, with the same drops: DTC at K 12 (K 8-49, 52% of the dense
# GMACs) and ToMe at r = 8 (50%). Appended: LEVER_CELLS[58:60]
LEVER_CELLS += (replace(LEVER_CELLS[56], label=LEVER_CELLS[56].label.replace("K 20", "K 12 (K 8-49)"),
                        kwargs=dict(LEVER_CELLS[56].kwargs, k_mid=12, k_min=8)),
                replace(LEVER_CELLS[57], label=LEVER_CELLS[57].label.replace("r 6", "r 8"),
                        kwargs=dict(LEVER_CELLS[57].kwargs, tome_r=8)))
# Is 0.25 the drop rate to keep? At the plateau the drops added +0.56 to DTC and +0.93 to ToMe and both still
# train above test (docs/results.md, "Random patch drops in training"): the K 20 default and ToMe r = 6 with a
# heavier rate, 0.4 (Random keep trains at 0.34). Appended: LEVER_CELLS[60:62]
PATCH_DROP_HIGH = 0.4
LEVER_CELLS += tuple(replace(LEVER_CELLS[i], label=LEVER_CELLS[i].label.replace(f"patch drop {PATCH_DROP}",
                                                                                 f"patch drop {PATCH_DROP_HIGH}"),
                             kwargs=dict(LEVER_CELLS[i].kwargs, patch_drop_rate=PATCH_DROP_HIGH)) for i in (56, 57))

# Table 5 / Figure 1(a)'s rows for today's nano default (K 20, 64% of dense) and ToMe trained at its cost: the
# dtc-levers cells under Table 5's names, so the runs are shared
K20_ROWS = (replace(LEVER_CELLS[50], label="AdaptiVision (DTC), K 20 (the default since 2026-11-28)"),
            replace(LEVER_CELLS[51], label="ToMe, r 6 (at K 20's GMACs)"))
# The paper form (learned centroids, tau 150, per-image K from the complexity score, before block 0) collapses at the
# plateau with the one recipe as the learned keep predictors do: 25.20% test top-1 after its first epoch on seed 1
# (cross-entropy back at 2.0 from update ~600); seed 0 at 57.53%, 55.63%, 69.11% after three epochs (dense: 78.6-82.7%)
# (docs/results.md, "The paper form collapses at the plateau"). Its Table 5 row at the plateau gets the same fix of
# its recipe as DynamicViT and ToFe (a quarter of the lr, the gradient clipped at 1.0): help for the paper-literal
# row, which today's default is compared with, never for the default. The plain cell keeps its default-length runs.
PAPER_FORM = Cell("AdaptiVision (DTC), paper form", PAPER_DTC)
PAPER_FORM_FAIR = replace(PAPER_FORM, label=f"{PAPER_FORM.label}, lr / 4, grad clip {LEARNED_KEEP_CLIP:g}",
                          lr_factor=LEARNED_KEEP_LR, train=dict(clip_grad=LEARNED_KEEP_CLIP))

# The ablations at the plateau (issue 14: Table 7, Table 4, the variants, the guidance rows) on today's nano default,
# the K 20 model, and not on the plain "dtc" cells of table7 / table4 / variants / guidance: those keep their options
# of 2026-11-26 (pinned, runner.ID_DEFAULTS: image-soft before block 0, budget jitter 1, proportional attention),
# three defaults ago (no jitter, no proportional attention, K 20 came since). Built on the K 20 model, each table ablates the model users train,
# and its unchanged row is the K 20 run of Table 5 (three seeds already): nothing is trained twice.
K20 = LEVER_CELLS[50].kwargs


def _on_k20(label: str, guidance: Optional[str] = None, **kwargs) -> Cell:
    return Cell(label, dict(K20, **kwargs), train=dict(guidance=guidance) if guidance else {})


PLATEAU_TEXT_SAL = _on_k20("+DTC+AFA+CMTF (text + saliency)", TEXT_SAL)

EXPERIMENTS = {e.name: e for e in (
    Experiment("table1", "Table 1/2: model comparison", "train", (
        Cell("DeiT-S (timm)", {}, model="deit_small_patch16_224", scales=("paper",)),
        Cell("Swin-T (timm)", {}, model="swin_tiny_patch4_window7_224", scales=("paper",)),
        # timm's Swin at nano width for 28 x 28 inputs (models/registry.py): Swin-T's place below paper scale
        Cell("Swin (timm, nano width)", {}, model="swin_nano_patch2_window7_28",
             scales=("smoke", "small", "default", "full")),
        Cell("LeMeViT (nano)", {}, model="lemevit_nano_28", scales=("smoke", "small", "default", "full")),
        # the token reducers of Tables 1-2, on our backbone at DTC's GMACs (the runs of Table 5)
        *(c for c in FAIR_BASELINES if c.kwargs["reduction"] in ("importance", "tome", "hourglass", "hired", "tofe")),
        DENSE, DTC), paper_datasets=("imagenet", "cifar10", "cifar100", "tinyimagenet", "chestxray")),
    Experiment("table4", "Table 4: DTC temperature tau", "train",
               tuple(Cell(f"tau = {t}", {"reduction": "dtc", "tau": float(t)}) for t in (1, 20, 100, 150, 200, 250)),
               key="tau"),
    Experiment("table5", "Table 5: token reduction strategies at matched GMACs", "train",
               FAIR_BASELINES + (DEFAULT_DTC, PAPER_FORM, DEFAULT_DTC_NO_PROP) + K20_ROWS + (PAPER_FORM_FAIR,)),
    Experiment("table6", "Table 6: robustness, ImageNet-A / ImageNet-R", "robustness", (DENSE, DTC),
               note="evaluates the checkpoints of the table1 cells (or --checkpoint) on --eval-data sets"),
    Experiment("table7", "Table 7: component ablation", "train", (
        DENSE,
        Cell("+DTC", {"reduction": "dtc", "afa": False}),
        Cell("+DTC+AFA", {"reduction": "dtc"}),
        _guided("+DTC+AFA+CMTF (text + saliency)", TEXT_SAL))),
    Experiment("figure1a", "Figure 1(a): accuracy vs GMACs, one trained model per method", "budget",
               FAIR_BASELINES[1:] + (DEFAULT_DTC, DEFAULT_DTC_NO_PROP) + K20_ROWS, note="re-evaluates the table5 checkpoints at several "
               "budgets"),
    Experiment("guidance", "Semantic guidance: sources, lambda1/lambda2, missing and noisy guidance", "guidance",
               GUIDANCE_CELLS, note="each guided run is also evaluated with its guidance missing, shuffled "
                                    "between images, and replaced by noise"),
    Experiment("dtc-levers", "DTC levers: how to cluster (issue 15), beside dense, EViT and ToMe", "train",
               LEVER_CELLS, note="iterate at --scale small, confirm at --scale default"),
    Experiment("dtc-confirm", "DTC's clustering against the baselines at the default job's length", "train",
               tuple(LEVER_CELLS[i] for i in (0, 14, 12, 2, 3, 8, 1, 13, 4)),
               note="the dtc-levers choice confirmed: run it with --scale default"),
    Experiment("dtc-where", "Where to condense: the candidate defaults against the baselines, 2 seeds", "train",
               tuple(LEVER_CELLS[i] for i in (15, 16, 12, 2, 1, 3, 0)),
               note="run it with --scale default --seeds 2; shares its runs with dtc-confirm"),
    Experiment("dtc-afa", "Does AFA earn its cost? The best DTC with and without it, 2 seeds", "train",
               tuple(LEVER_CELLS[i] for i in (15, 17, 2, 0)),
               note="run it with --scale default --seeds 2; shares its runs with dtc-where"),
    Experiment("dtc-batch-k", "One K per training batch: as accurate as per-image K, and faster?", "train",
               tuple(LEVER_CELLS[i] for i in (15, 18, 17, 19, 2, 0)),
               note="run it with --scale default --seeds 2; shares its runs with dtc-afa"),
    Experiment("dtc-curve", "Accuracy vs GMACs: the default-length models at several budgets each", "budget",
               tuple(LEVER_CELLS[i] for i in (0, 2, 1, 15, 18, 20, 25, 47, 48)),
               note="run it with --scale default --seeds 2 after dtc-batch-k: it evaluates those checkpoints"),
    Experiment("dtc-distill", "Distillation from the dense model: the best DTC and ToMe, each with and without", "train",
               tuple(LEVER_CELLS[i] for i in (0, 18, 21, 2, 22, 19, 23)),
               note="run it with --scale default --seeds 2; the dense cell comes first: it is the teacher"),
    Experiment("default-job", "The default job's model (`adaptivision train`): before block 0 or after block 2",
               "train", (DENSE, DEFAULT_JOB_BLOCK0) + tuple(LEVER_CELLS[i] for i in (18, 21)),
               note="run it with --scale default --seeds 2; the after-block-2 cell is the nano default as it was "
                    "until 2026-11-27, with the budget jitter (as is {'reduction': 'dtc'} in the runner; the "
                    "default job's model now: dtc-jitter's no-jitter cell); shares its runs with dtc-batch-k "
                    "and dtc-distill"),
    Experiment("dtc-stages", "Two DTC stages against one: condensing gradually, as ToMe merges", "train",
               tuple(LEVER_CELLS[i] for i in (0, 2, 18, 24)),
               note="run it with --scale default --seeds 2; shares its dense, ToMe and one-stage runs with "
                    "dtc-batch-k"),
    Experiment("dtc-jitter", "The budget jitter: DTC trained at one budget against a random shift per batch",
               "train", tuple(LEVER_CELLS[i] for i in (0, 2, 18, 25)),
               note="run it with --scale default --seeds 2; shares its dense, ToMe and jittered runs with dtc-batch-k"),
    Experiment("dtc-later", "Without the jitter: condensing one block later, and without AFA, at the same GMACs",
               "train", tuple(LEVER_CELLS[i] for i in (0, 2, 25, 26, 27)),
               note="run it with --scale default --seeds 2; shares its dense, ToMe and no-jitter runs with dtc-jitter"),
    Experiment("dtc-spatial", "How clusters form, without the jitter: a spatial distance term (SLIC's compactness), "
               "grid centres (Hourglass's start), a learned temperature",
               "train", tuple(LEVER_CELLS[i] for i in (0, 2, 25, 28, 29, 31, 32, 33)),
               note="run it with --scale default --seeds 2; shares its dense, ToMe and no-jitter runs with dtc-jitter"),
    Experiment("dtc-salient", "Without the jitter: the patches [CLS] attends to most (EViT's score) kept unclustered",
               "train", tuple(LEVER_CELLS[i] for i in (0, 2, 25, 34, 35)),
               note="run it with --scale default --seeds 2; shares its dense, ToMe and no-jitter runs with dtc-jitter"),
    Experiment("dtc-self-distill", "Without the jitter: the model's own full-token path as its teacher (in-place "
               "distillation, from scratch)", "train", tuple(LEVER_CELLS[i] for i in (0, 2, 25, 36, 30)),
               note="run it with --scale default --seeds 2; shares its dense, ToMe and no-jitter runs with dtc-jitter; "
                    "the dense-distilled cell last (it learns from the dense run)"),
    Experiment("dtc-assign-grad", "Without the jitter: no gradient through the assignment (the clustering as a fixed "
               "pooling, as Hourglass and ToMe)", "train", tuple(LEVER_CELLS[i] for i in (0, 2, 25, 27, 38, 39)),
               note="run it with --scale default --seeds 2; shares its dense, ToMe and no-jitter runs with dtc-jitter"),
    Experiment("dtc-hourglass", "Hourglass against DTC: each at the other's place, Hourglass's clustering inside "
               "DTC, the gradient through the assignment and proportional attention",
               "train", tuple(LEVER_CELLS[i] for i in (0, 2, 25, 27, 40, 41, 42, 43, 44, 45, 46, 47, 48)),
               note="run it with --scale default --seeds 2; shares its dense, ToMe and DTC runs with dtc-jitter"),
    Experiment("dtc-prop-attn", "Without proportional attention (log mass in the attention logits, ToMe's): "
               "after block 2 and after block 1", "train", tuple(LEVER_CELLS[i] for i in (0, 2, 25, 47, 41, 48, 50)),
               note="run it with --scale default --seeds 2; shares its runs with dtc-jitter and dtc-hourglass"),
    Experiment("dtc-plateau", "The default-length candidates trained to plateau (--scale full)", "train",
               tuple(LEVER_CELLS[i] for i in (0, 18, 2, 21, 1, 19, 22, 23, 12, 3, 25, 27, 30, 37, 47, 48, 49, 50, 51)),
               note="run it with --scale full; dense first, so its curve fixes the plateau epochs (and it "
                    "teaches the distilled cells)"),
    Experiment("dtc-finetune", "Fine-tuned from the trained dense model: DTC, ToMe, EViT, DynamicViT and ToFe, "
               "and the dense model fine-tuned further", "train", FINETUNE_CELLS,
               note="run it with --scale full after dtc-plateau's dense cell (it shares that run); a tenth of the "
                    "epochs at a tenth of the learning rate"),
    Experiment("finetune-curve", "Accuracy vs GMACs after fine-tuning from the dense model: the dtc-finetune "
               "checkpoints at several budgets each", "budget", (DENSE,) + FINETUNE_CELLS[2:],
               note="run it with --scale full --record-only after dtc-finetune: it evaluates those runs and "
                    "trains nothing"),
    Experiment("plateau-curve", "Accuracy vs GMACs at the plateau: the dtc-plateau checkpoints at several budgets "
               "each", "budget", tuple(LEVER_CELLS[i] for i in (0, 18, 2, 1, 21, 22, 19, 23, 25, 27, 30, 37, 47, 48, 49, 50, 51)),
               note="run it with --scale full --record-only: it evaluates the finished dtc-plateau runs and "
                    "trains nothing"),
    Experiment("plateau-drop-path", "A regularised recipe at the plateau: dense, the K 20 default and ToMe r = 6 "
               "with stochastic depth 0.1 beside the same without", "train",
               tuple(LEVER_CELLS[i] for i in (0, 52, 50, 53, 51, 54)),
               note="run it with --scale full --seeds 2; shares its runs without drop path with dtc-plateau"),
    Experiment("plateau-patch-drop", f"Random patch drops in training only (rate {PATCH_DROP}) at the plateau: the "
               "dense model, the K 20 default and ToMe r = 6 beside the same without, and Random keep (which "
               "drops at test too)", "train", tuple(LEVER_CELLS[i] for i in (0, 55, 50, 56, 51, 57)) + (BASELINES[1],),
               note="run it with --scale full --seeds 2; shares its runs without patch drops with dtc-plateau and "
                    "Random keep's with table5"),
    Experiment("patch-drop-curve", "Accuracy vs GMACs of the plateau-patch-drop runs: the K 20 default and ToMe "
               "r = 6 with and without patch drops in training, at several budgets each", "budget",
               tuple(LEVER_CELLS[i] for i in (0, 55, 50, 56, 51, 57)),
               note="run it with --scale full --record-only after plateau-patch-drop: it evaluates those runs and "
                    "trains nothing (Random keep's curve: figure1a)"),
    Experiment("plateau-low-budget", "Trained for the low budget, with patch drops: DTC at K 12 (K 8-49) and ToMe "
               "at r = 8 beside the K 20 / r = 6 models they replace there", "train",
               tuple(LEVER_CELLS[i] for i in (56, 58, 57, 59)),
               note="run it with --scale full --seeds 2; shares its K 20 and r = 6 runs with plateau-patch-drop"),
    Experiment("low-budget-curve", "Accuracy vs GMACs of the plateau-low-budget runs: the models trained for the "
               "low budget beside those trained at K 20 / r = 6, all with patch drops", "budget",
               tuple(LEVER_CELLS[i] for i in (56, 58, 57, 59)),
               note="run it with --scale full --record-only after plateau-low-budget: it evaluates those runs and "
                    "trains nothing"),
    Experiment("plateau-patch-drop-rate", f"The patch-drop rate at the plateau: the K 20 default and ToMe r = 6 "
               f"trained with drops at {PATCH_DROP_HIGH} beside the same at {PATCH_DROP}", "train",
               tuple(LEVER_CELLS[i] for i in (56, 60, 57, 61)),
               note="run it with --scale full --seeds 2; shares its rate-0.25 runs with plateau-patch-drop"),
    Experiment("patch-drop-rate-curve", "Accuracy vs GMACs of the plateau-patch-drop-rate runs: the K 20 default "
               f"and ToMe r = 6 trained with drops at {PATCH_DROP} and {PATCH_DROP_HIGH}, at several budgets each",
               "budget", tuple(LEVER_CELLS[i] for i in (56, 60, 57, 61)),
               note="run it with --scale full --record-only after plateau-patch-drop-rate: it evaluates those runs "
                    "and trains nothing"),
    Experiment("plateau-table7", "Table 7 at the plateau: the components, on today's default (K 20)", "train", (
        DENSE, _on_k20("+DTC", afa=False), _on_k20("+DTC+AFA"), PLATEAU_TEXT_SAL),
        note="run it with --scale full --seeds 2; its dense and +DTC+AFA rows are Table 5's runs"),
    Experiment("plateau-table4", "Table 4 at the plateau: DTC temperature tau, on today's default (K 20)", "train",
               tuple(_on_k20(f"tau = {t}", tau=float(t)) for t in (20, 100, 150)), key="tau",
               note="run it with --scale full; tau 20 (also the small scale's best) is Table 5's K 20 run"),
    Experiment("plateau-variants", "Paper-literal vs sound variants at the plateau, on today's default (K 20)", "train", (
        _on_k20("sound defaults"),
        _on_k20("normalize=False (eq. 3 literal sum)", normalize=False),
        _on_k20("norm='post' (eq. 7 literal)", norm="post"),
        _on_k20("gate='paper' (eq. 10 literal; text + saliency)", TEXT_SAL, gate="paper"),
        replace(PLATEAU_TEXT_SAL, label="gate='gated' (default; text + saliency)")),
        note="run it with --scale full; shares the K 20 run and plateau-table7's text + saliency run"),
    Experiment("plateau-guidance", "Semantic guidance at the plateau, the main rows, on today's default (K 20)",
               "guidance", (
                   _on_k20("no guidance (DTC+AFA)"),
                   _on_k20("saliency", "saliency"),
                   _on_k20("foreground mask", "mask"),
                   replace(PLATEAU_TEXT_SAL, label="text + saliency")),
               note="run it with --scale full --seeds 2; each guided run is also evaluated with its guidance "
                    "missing, shuffled and replaced by noise; shares the K 20 run and plateau-table7's text + saliency"),
    Experiment("figure1bc", "Figure 1(b)/(c): segmentation mIoU vs GMACs (Fashion-MNIST mosaics; ADE20K, "
               "Cityscapes by --dataset)", "segmentation", SEG_CELLS, paper_datasets=("ade20k", "cityscapes"),
               note="one segmenter per backbone and seed, evaluated at several budgets; baselines unpooled "
                    "through their assignments"),
    Experiment("table3", "Table 3: detection mAP vs GMACs (FCOS on Fashion-MNIST mosaic boxes)", "detection",
               DET_CELLS, paper_datasets=(),
               note="COCO with DINO / Swin-L (the paper's setting) is not run here: docs/dense.md says how"),
    Experiment("theorem1", "Theorem 1: cost as the image grows (fixed K range)", "scaling", (DENSE, DTC)),
    Experiment("variants", "Paper-literal vs sound variants (DESIGN.md)", "train", (
        Cell("sound defaults", {"reduction": "dtc"}),
        Cell("normalize=False (eq. 3 literal sum)", {"reduction": "dtc", "normalize": False}),
        Cell("norm='post' (eq. 7 literal)", {"reduction": "dtc", "norm": "post"}),
        Cell("gate='paper' (eq. 10 literal; text + saliency)", {"reduction": "dtc", "gate": "paper"},
             train=dict(guidance=TEXT_SAL)),
        Cell("gate='gated' (default; text + saliency)", {"reduction": "dtc"}, train=dict(guidance=TEXT_SAL)))),
)}

# Budgets of Figure 1(a): DTC's bias knob, ToMe's r as a fraction of (patches / depth), the
# keep ratio of the others. One trained model per method serves all of its budgets.
BUDGETS = {"dtc": [-4.0, -2.0, 0.0, 2.0, 4.0], "tome": [0.2, 0.4, 0.6, 0.8, 1.0],
           "random": [0.3, 0.45, 0.6, 0.75, 0.9], "importance": [0.5, 0.6, 0.7, 0.8, 0.9],
           "evit": [0.5, 0.6, 0.7, 0.8, 0.9], "hourglass": [0.3, 0.45, 0.6, 0.75, 0.9],
           "hired": [0.3, 0.45, 0.6, 0.75, 0.9], "tofe": [0.5, 0.6, 0.7, 0.8, 0.9]}


# ... and for every DTC model, one fixed K for every image at these values below its trained
# range (K >= k_min = 16 of 49 tokens): how far the curve reaches when the budget is cut at inference
DTC_FIXED_K = (8, 12)


def get(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise unknown_key_error(name, EXPERIMENTS, "experiment")
    return EXPERIMENTS[name]
