"""Typed, validated options of the AdaptiVision layers (DESIGN.md §1).

Every option the paper leaves open lives here with its default and its allowed range, so an
impossible value fails at construction with a ``ValueError`` that names the field, not deep
inside a forward pass. ``ModelOptions.from_kwargs`` also rejects unknown names and suggests the
closest valid one (``tua`` -> ``tau``).
"""
from __future__ import annotations

import difflib
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Optional, Sequence, Union

IntOrSeq = Union[int, Sequence[int], None]
REDUCTIONS = ("dtc", "none", "random", "importance", "evit", "tome", "hourglass", "hired", "tofe")


def unknown_key_error(key: str, valid: Iterable[str], what: str = "option") -> ValueError:
    """A ValueError naming an unknown key and the closest valid one."""
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ValueError(f"Unknown {what} '{key}'.{hint} Valid {what}s: {', '.join(valid)}")


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"Invalid value for '{name}': {value!r}; allowed: {allowed}.")


def _as_list(v: IntOrSeq) -> Optional[list]:
    if v is None or v is False:  # False: "off" that survives timm.create_model, which drops None kwargs
        return None
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


# How DTC clusters (docs/model.md, "Clustering"): 'paper' is the paper's literal form (soft
# assignment to learned centroids shared by every image); 'image' clusters each image's own tokens
# (farthest-point centres, nearest-centre assignment, two k-means steps). Explicit ``centers=``,
# ``assign=``, ``iters=`` override the preset.
# Presets of (centers, assign, iters, tau). A preset's meaning never changes once runs were
# recorded with it (run identities name the preset, not what it resolves to): add a new name.
CLUSTERING = {"paper": dict(centers="learned", assign="soft", iters=0, tau=150.0),
              "image": dict(centers="fps", assign="hard", iters=2, tau=150.0),
              "image-soft": dict(centers="fps", assign="soft", iters=2, tau=20.0)}
# DTC as the paper describes it, under one name: its shared soft centroids, per-image K in training
# too, condensed right after the embedding (`timm.create_model(name, **adaptivision.PAPER_DTC)`);
# every default that departs from it is in docs/model.md, "Deviations from the paper"
PAPER_DTC = dict(clustering="paper", train_k="image", condense_at=0)


@dataclass(frozen=True)
class Stage:
    """One DTC stage, resolved against the backbone: before block ``block``, K in [k_min, k_max]."""

    block: int
    k_min: int
    k_max: int
    k_mid: Optional[int] = None  # first stage: K of an average image at budget bias 0


def default_prop_attn(reduction: str, centers: Optional[str], assign: Optional[str]) -> bool:
    """What ``prop_attn=None`` means: off for DTC with per-image centres and soft assignment, where it was
    measured to cost accuracy (docs/results.md, "Without proportional attention"), on elsewhere (ToMe's
    reference; learned centroids, whose empty slots (mass 0) it masks with log 0; the unmeasured rest)."""
    return not (reduction == "dtc" and centers == "fps" and assign == "soft")


def live_prop_attn(kwargs: dict) -> bool:
    """The ``prop_attn`` a model built from ``kwargs`` today gets (written into new runs' specs, so that a
    later change of the default cannot rebuild them differently)."""
    if kwargs.get("prop_attn") is not None:
        return bool(kwargs["prop_attn"])
    preset = CLUSTERING.get(kwargs.get("clustering", ModelOptions.clustering), {})
    return default_prop_attn(kwargs.get("reduction", ModelOptions.reduction), kwargs.get("centers") or preset.get("centers"),
                             kwargs.get("assign") or preset.get("assign"))


@dataclass
class ModelOptions:
    """AdaptiVision-specific model options (the ViT ones go to timm's ``VisionTransformer``).

    Per-stage options (``k_min``, ``k_max``) take one value per entry of ``condense_at``; a
    scalar is used for the first stage, later stages default to a third of the previous one.
    """

    # --- which token reduction (DESIGN.md §4): ours or a baseline on the same backbone ---
    reduction: str = "dtc"              # 'dtc' | 'none' | 'random' | 'importance' | 'evit' | 'tome' | 'hourglass' | 'hired' | 'tofe'
    keep_ratio: float = 0.7             # random/importance/evit/hourglass/hired/tofe: fraction of the entering tokens kept
    reduce_at: IntOrSeq = None          # importance/evit/tofe blocks (default depth/4, depth/2, 3depth/4)
    tome_r: int = 8                     # tome: tokens merged in every block
    # --- Dynamic Token Clustering (paper 3.2) ---
    condense_at: IntOrSeq = 0           # blocks run before each DTC stage; None/False/() = no condensation
    k_min: IntOrSeq = None              # default: a third of the tokens entering the stage
    k_max: IntOrSeq = None              # default: all tokens entering the stage
    k_mid: Optional[int] = None         # first stage: K of an average image at budget bias 0 (default: mid-range)
    k_step: int = 8                     # K is rounded to a multiple of this (bounds the number of groups)
    infer_k_step: Optional[int] = None  # inference only: per-image K on this grid instead (None: k_step). A coarser grid
    #                                     means fewer groups per batch: one batch per K is faster (docs/model.md)
    clustering: str = "image-soft"      # preset of the four below: 'image-soft' | 'image' | 'paper' (CLUSTERING, docs/model.md)
    centers: Optional[str] = None       # 'learned' (nested learned centroids) | 'fps' (each image's own tokens)
    #                                     | 'grid' (each image's grid-cell means; first stage only)
    assign: Optional[str] = None        # 'soft' (eq. 2) | 'hard' (nearest centre; straight-through gradient)
    iters: Optional[int] = None         # k-means refinement steps, per image
    tau: Optional[float] = None         # eq. 2 temperature (Table 4; default: the preset's, 150 or 20)
    learn_tau: bool = False             # train tau (per DTC stage, as exp(log tau), starting at tau); not in the paper
    assign_grad: bool = True            # gradient through eq. 2's assignment; False: the clustering is a fixed,
    #                                     data-dependent pooling, the tokens learn through the super-tokens' values
    #                                     only (Hourglass's and ToMe's way; not in the paper)
    normalize: bool = True              # weighted mean (True) or eq. 3's literal sum (False)
    prop_attn: Optional[bool] = None    # add log(mass) to attention logits (ToMe's proportional attention); default:
    #                                     off for DTC with centers='fps' and assign='soft' (since 2026-11-27: +0.55 / +1.46
    #                                     top-1 at the default length, +0.75 at the plateau, 3 seeds; docs/results.md), on elsewhere
    complexity: str = "variance"        # 'variance' | 'entropy' | 'saliency'
    dynamic: bool = True                # per-image K; False = fixed K (k_max unless a budget is set)
    train_k: str = "batch"              # K in training: 'batch' (the batch's mean K, one group: as accurate, 1.2-1.4x
    #                                     faster updates; docs/results.md) | 'image' (per image, the paper); inference: per image
    budget_jitter: float = 0.0          # training: random shift of the budget bias per batch, uniform in +-this
    #                                     (0 since 2026-11-27: +0.54 top-1 at the plateau, docs/results.md; 1 before)
    stat_momentum: float = 0.1          # running mean/std of the complexity score
    assign_norm: bool = True            # distances on LayerNorm'd tokens (scale-free tau); False = raw tokens
    spatial: float = 0.0                # weight of patch-grid position in the distance (SLIC's compactness; not in
    #                                     the paper); > 0 needs centers='fps' or 'grid' (docs/model.md)
    window: Optional[int] = None        # centers='grid': a patch joins only the centres within window // 2 grid cells
    #                                     of its own (Hourglass's local clustering; odd; None = every centre)
    keep_salient: int = 0               # first DTC stage: this many patches pass unclustered, the ones [CLS] attends to
    #                                     most in the block before (EViT's score); the rest fill K - keep_salient clusters
    max_groups: Optional[int] = None    # inference with per-image K: run the condensed blocks as at most this many
    #                                     batches, padded with masked slots (same outputs; padding is computed and counted);
    #                                     None = one batch per K (docs/performance.md, "...and padded groups")
    pad_k: Optional[int] = None         # inference with per-image K as one batch of this many slots per image, each
    #                                     image using its own K of them (capped at pad_k): no host sync, one graph
    #                                     for torch.compile / CUDA graphs; one DTC stage, not with 'grid' centres
    unpool: str = "skip"                # dense outputs: 'skip' (Z_pre + A (S - S_0), Hourglass's reconstruction;
    #                                     the default since 2026-11-27, above 'assign' on every mosaic seed and
    #                                     budget, docs/results.md) | 'assign' (Z_rec = A S, the paper's unpooling)
    # --- AdaptiveFocus Attention (paper 3.3) ---
    afa: Optional[bool] = None          # default: on with reduction='dtc' (it modulates cluster slots)
    afa_rank: int = 1                   # R in M = 1 + sum_r u_r v_r^T
    afa_hidden: Optional[int] = None    # hidden width of f_m (default embed_dim // 4)
    norm: str = "pre"                   # 'pre' (timm) | 'post' (eq. 7 literal)
    # --- Cross-Modal Token Fusion (paper 3.4) ---
    cmtf: Optional[bool] = None         # default: on with reduction='dtc' when guidance_dim or guidance_tokens is set
    cmtf_at: IntOrSeq = None            # blocks preceded by CMTF; default: the first condensed block
    gate: str = "gated"                 # 'gated' (sound default) | 'paper' (eq. 10 literal)
    guidance_dim: Union[int, dict, None] = None  # width of raw guidance tokens (default embed_dim), or
    #                                     {source: width} for several sources, each with its own projection
    guidance_tokens: int = 0            # M learned guidance tokens, always appended (the fallback source)
    align_dim: Optional[int] = None     # output width of the L_align projection (None = no head)

    stages: list = field(default_factory=list, init=False, repr=False)
    reduce_blocks: list = field(default_factory=list, init=False, repr=False)

    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in fields(cls) if f.init}

    @classmethod
    def split_kwargs(cls, kwargs: dict, other_valid: Iterable[str]) -> tuple["ModelOptions", dict]:
        """Split ``kwargs`` into our options and the rest; unknown names raise ``ValueError``."""
        ours, rest = {}, {}
        other_valid = set(other_valid)
        for k, v in kwargs.items():
            if k in cls.field_names():
                ours[k] = v
            elif k in other_valid:
                rest[k] = v
            else:
                raise unknown_key_error(k, cls.field_names() | other_valid, "model option")
        return cls(**ours), rest

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("stages", None)
        d.pop("reduce_blocks", None)
        return d

    def resolve(self, num_patches: int, depth: int, embed_dim: int) -> "ModelOptions":
        """Validate against the backbone and fill the per-stage K ranges (``self.stages``)."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            v, t = getattr(self, f.name), hints.get(f.name)
            # fields of one plain type (YAML gives strings for 'abc'; bools are not numbers)
            if t is bool:
                _check(isinstance(v, bool), f.name, v, "true or false")
            elif t in (int, float):
                _check(isinstance(v, (int, float)) and not isinstance(v, bool) and (t is float or
                       float(v).is_integer()), f.name, v, "a number" if t is float else "an integer")
            elif t is str:
                _check(isinstance(v, str), f.name, v, "a string")
            # inf / nan pass the range checks below that they should fail
            _check(not isinstance(v, float) or math.isfinite(v), f.name, v, "a finite number")
        _check(self.reduction in REDUCTIONS, "reduction", self.reduction, ", ".join(map(repr, REDUCTIONS)))
        _check(0 < self.keep_ratio <= 1, "keep_ratio", self.keep_ratio, "a float in (0, 1]")
        _check(self.tome_r >= 0, "tome_r", self.tome_r, "an integer >= 0")
        ours = self.reduction == "dtc"
        # cmtf=False given explicitly: guidance may steer DTC alone (its patch weights), by design
        self.cmtf_off_by_request = self.cmtf is not None and not self.cmtf
        for name in ("afa", "cmtf"):
            v = getattr(self, name)
            _check(ours or not v, name, v, f"False with reduction={self.reduction!r} (it acts on DTC's "
                   "super-tokens; baselines are compared without it)")
            # CMTF only where guidance is configured: without it its weights would never get a
            # gradient (timm's backward check, DDP's unused-parameter error)
            default = ours and (name == "afa" or self.guidance_dim is not None or bool(self.guidance_tokens))
            setattr(self, name, default if v is None else bool(v))
        self._resolve_baseline(depth)
        if not ours:
            self.condense_at = None
        _check(self.k_step >= 1, "k_step", self.k_step, "an integer >= 1")
        _check(self.infer_k_step is None or self.infer_k_step >= 1, "infer_k_step", self.infer_k_step,
               "None or an integer >= 1")
        _check(self.clustering in CLUSTERING, "clustering", self.clustering, ", ".join(map(repr, CLUSTERING)))
        for name, value in CLUSTERING[self.clustering].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        _check(isinstance(self.tau, (int, float)) and not isinstance(self.tau, bool) and self.tau > 0,
               "tau", self.tau, "a float > 0")
        _check(self.iters >= 0, "iters", self.iters, "an integer >= 0")
        _check(self.centers in ("learned", "fps", "grid"), "centers", self.centers, "'learned', 'fps' or 'grid'")
        _check(self.assign in ("soft", "hard"), "assign", self.assign, "'soft' or 'hard'")
        _check(self.prop_attn in (None, True, False), "prop_attn", self.prop_attn, "true, false or null")
        if self.prop_attn is None:
            self.prop_attn = default_prop_attn(self.reduction, self.centers, self.assign)
        _check(self.complexity != "entropy" or self.centers == "learned", "complexity", self.complexity,
               "'variance' or 'saliency' with centers='fps' ('entropy' measures use of the learned centroids)")
        _check(self.complexity in ("variance", "entropy", "saliency"), "complexity", self.complexity,
               "'variance', 'entropy' or 'saliency'")
        _check(self.train_k in ("image", "batch"), "train_k", self.train_k, "'image' or 'batch'")
        _check(self.budget_jitter >= 0, "budget_jitter", self.budget_jitter, "a float >= 0")
        _check(self.spatial >= 0, "spatial", self.spatial, "a float >= 0")
        _check(self.assign_grad or (self.centers != "learned" and not self.learn_tau), "assign_grad", self.assign_grad,
               "True with centers='learned' or learn_tau (they learn through the assignment's gradient)")
        _check(self.window is None or (isinstance(self.window, int) and not isinstance(self.window, bool)
                                       and self.window >= 1 and self.window % 2 == 1 and self.centers == "grid"),
               "window", self.window, "None, or an odd integer >= 1 with centers='grid' (it counts centre-grid cells)")
        _check(not self.spatial or self.centers != "learned", "spatial", self.spatial,
               "0 with centers='learned' (learned centroids have no position; clustering='image' or 'image-soft')")
        _check(0 < self.stat_momentum <= 1, "stat_momentum", self.stat_momentum, "a float in (0, 1]")
        _check(self.afa_rank >= 1, "afa_rank", self.afa_rank, "an integer >= 1")
        _check(self.afa_hidden is None or self.afa_hidden >= 1, "afa_hidden", self.afa_hidden,
               "None or an integer >= 1")
        _check(self.norm in ("pre", "post"), "norm", self.norm, "'pre' or 'post'")
        _check(self.max_groups is None or (isinstance(self.max_groups, int) and not isinstance(self.max_groups, bool)
               and self.max_groups >= 1), "max_groups", self.max_groups, "None or an integer >= 1")
        _check(self.unpool in ("assign", "skip"), "unpool", self.unpool, "'assign' or 'skip'")
        _check(self.gate in ("gated", "paper"), "gate", self.gate, "'gated' or 'paper'")
        _check(self.align_dim is None or int(self.align_dim) >= 1, "align_dim", self.align_dim,
               "None or an integer >= 1")
        g = self.guidance_dim
        if isinstance(g, dict):
            _check(len(g) > 0 and all(isinstance(k, str) and k and isinstance(w, int) and not isinstance(w, bool)
                                      and w >= 1 for k, w in g.items()),
                   "guidance_dim", g, "None, an integer >= 1 or a non-empty mapping {source name: width >= 1}")
        else:
            _check(g is None or (not isinstance(g, bool) and int(g) >= 1), "guidance_dim", g,
                   "None, an integer >= 1 or a mapping {source name: width >= 1}")
        _check(isinstance(self.guidance_tokens, int) and self.guidance_tokens >= 0, "guidance_tokens",
               self.guidance_tokens, "an integer >= 0")

        at = (_as_list(self.condense_at) or []) if ours else []
        _check(at == sorted(set(at)), "condense_at", self.condense_at, "strictly increasing block indices")
        for c in at:
            _check(0 <= c < depth, "condense_at", self.condense_at, f"block indices in [0, {depth - 1}]")
        kmins, kmaxs = _as_list(self.k_min), _as_list(self.k_max)
        for name, vals in (("k_min", kmins), ("k_max", kmaxs)):
            _check(vals is None or len(vals) <= max(len(at), 1), name, getattr(self, name),
                   f"one value per condense_at stage ({len(at)})")

        self.stages = []
        n_in = num_patches
        for s, c in enumerate(at):
            k_max = kmaxs[s] if kmaxs and s < len(kmaxs) else n_in
            if kmins and s < len(kmins):
                k_min = kmins[s]
            else:  # default: a third of k_max, on the k_step grid
                k_min = min(k_max, max(1, round(k_max / 3 / self.k_step) * self.k_step))
            _check(1 <= k_max <= n_in, "k_max", self.k_max,
                   f"1 <= k_max <= {n_in} (tokens entering stage {s} at block {c})")
            _check(1 <= k_min <= k_max, "k_min", self.k_min, f"1 <= k_min <= k_max ({k_max})")
            k_mid = None
            if s == 0 and self.k_mid is not None:
                k_mid = int(self.k_mid)
                _check(k_min < k_mid < k_max, "k_mid", self.k_mid, f"k_min < k_mid < k_max ({k_min}, {k_max})")
            self.stages.append(Stage(block=c, k_min=k_min, k_max=k_max, k_mid=k_mid))
            n_in = k_min  # the next stage must fit the smallest K this one can produce
        _check(self.centers != "grid" or len(self.stages) <= 1, "centers", self.centers,
               "'learned' or 'fps' with several DTC stages ('grid' centres need the patch grid: one stage)")
        if self.pad_k is not None:
            _check(isinstance(self.pad_k, int) and not isinstance(self.pad_k, bool) and len(self.stages) == 1
                   and self.stages[0].k_min <= self.pad_k <= self.stages[0].k_max, "pad_k", self.pad_k,
                   "None, or with one DTC stage an integer in [k_min, k_max]"
                   + (f" = [{self.stages[0].k_min}, {self.stages[0].k_max}]" if len(self.stages) == 1 else ""))
            _check(self.centers != "grid", "pad_k", self.pad_k,
                   "None with centers='grid' (grid cells are not nested: K centres are not a prefix of pad_k)")

        if self.keep_salient:
            st = self.stages[0] if self.stages else None
            _check(isinstance(self.keep_salient, int) and not isinstance(self.keep_salient, bool) and st is not None
                   and st.block >= 1 and 0 < self.keep_salient < st.k_min, "keep_salient", self.keep_salient,
                   "0, or with DTC after block 1 or later an integer in [1, k_min)"
                   + (f" = [1, {st.k_min})" if st is not None else ""))
            _check(self.centers != "grid" and self.pad_k is None, "keep_salient", self.keep_salient,
                   "0 with centers='grid' or pad_k (the kept patches leave the grid and the slot prefix)")

        cm = _as_list(self.cmtf_at)
        if cm is None:
            cm = [at[0]] if (self.cmtf and at) else []
        for c in cm:
            _check(0 <= c < depth, "cmtf_at", self.cmtf_at, f"block indices in [0, {depth - 1}]")
        self.cmtf_at = cm if self.cmtf else []
        self.condense_at = at or None
        return self

    def _resolve_baseline(self, depth: int) -> None:
        """``reduce_blocks``: where the chosen baseline reduces tokens."""
        red = self.reduction
        blocks = _as_list(self.reduce_at)
        if red in ("importance", "evit", "tofe"):
            blocks = blocks if blocks is not None else sorted({max(1, depth * i // 4) for i in (1, 2, 3)})
        elif red == "random":
            blocks = blocks if blocks is not None else (_as_list(self.condense_at) or [0])[:1]
            _check(len(blocks) == 1, "reduce_at", self.reduce_at, "one block for reduction='random'")
        elif red in ("hourglass", "hired"):  # once, after a quarter of the blocks (Hourglass's alpha)
            blocks = blocks if blocks is not None else [max(1, depth // 4)]
            _check(len(blocks) == 1, "reduce_at", self.reduce_at, f"one block for reduction={red!r}")
        elif red == "tome":
            blocks = blocks if blocks is not None else list(range(depth))
        else:
            _check(blocks is None, "reduce_at", self.reduce_at, f"None with reduction={red!r}")
            blocks = []
        _check(blocks == sorted(set(blocks)) and all(0 <= b < depth for b in blocks), "reduce_at",
               self.reduce_at, f"strictly increasing block indices in [0, {depth - 1}]")
        self.reduce_blocks = blocks
