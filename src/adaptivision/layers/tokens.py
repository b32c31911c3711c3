"""The one protocol of the trunk: token groups in, token groups out (docs/model.md, "Data flow").

Images of one batch may hold different numbers of tokens (per-image K), so the trunk carries a
list of :class:`Group` s, each a dense batch of images with the same length. Every stage that
changes tokens (DTC, CMTF, the baselines' pruning) has ``forward_groups(groups, ctx) -> groups``;
every block has ``forward_group(group, ctx) -> group`` (a plain timm ``Block`` is run by
:func:`run_block`). Groups are values: a stage returns new ones and never edits its input, so
gradient checkpointing can re-run a block on the same group. What a forward records for the
objective, the pooling, unpooling and pictures goes into the :class:`Context` that the model
returns, never onto a module.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Group:
    """Images of one batch that currently have the same number of tokens."""

    index: torch.Tensor                   # (b,) positions in the input batch
    x: torch.Tensor                       # (b, P+T, D) tokens, prefix ([CLS]) first
    mass: Optional[torch.Tensor] = None   # (b, P+T) patches per token; None = 1 everywhere (dense)
    assign: tuple = ()                    # one (b, N_in, N_out) assignment per reduction passed (unpooling)
    skips: tuple = ()                     # per assign: (tokens before, super-tokens after) a DTC stage, or None
    policy: Optional[torch.Tensor] = None  # (b, N) DynamicViT's / ToFe's training-time keep mask
    active: Optional[torch.Tensor] = None  # (b, k) ToFe at inference: the patch tokens blocks process
    prop_attn: bool = False               # add log(mass) to the attention logits (ToMe's proportional attention)
    valid: Optional[torch.Tensor] = None  # (b, P+T) bool, False on padding slots (:func:`pad_groups`); None = all real
    saliency: Optional[torch.Tensor] = None  # (b, T) [CLS]'s attention over the patches in the last block (keep_salient)
    log_mass: Optional[torch.Tensor] = field(init=False, default=None)  # (b, 1, 1, T) attention bias, or None

    def __post_init__(self):
        # clamped: a cluster that received no mass at all (sharp tau) must not give log(0), whose
        # gradient is NaN; at 1e-6 it is simply ignored by attention. Derived again on every
        # replace: carrying it over measured more torch.compile graphs (tests/test_deploy.py) for
        # a (b, T) log that costs nothing next to a block
        bias = None
        if self.prop_attn and self.mass is not None:
            bias = self.mass.clamp_min(1e-6).log()[:, None, None, :].to(self.x.dtype)  # (b, 1, 1, T)
        if self.valid is not None:  # padding is masked out exactly (-inf), not merely down-weighted
            bias = self.x.new_zeros(self.valid.shape)[:, None, None, :] if bias is None else bias
            bias = bias.masked_fill(~self.valid[:, None, None, :], float("-inf"))   # (b, 1, 1, T)
        object.__setattr__(self, "log_mass", bias)

    def replace(self, **changes) -> "Group":
        return dataclasses.replace(self, **changes)

    def rows(self, sel: Optional[torch.Tensor]) -> "Group":
        """The images ``sel`` (indices into this group) of it; all of it for None."""
        if sel is None:
            return self

        def pick(t):
            return None if t is None else t[sel]
        return self.replace(index=self.index[sel], x=self.x[sel], mass=pick(self.mass), policy=pick(self.policy),
                            active=pick(self.active), valid=pick(self.valid), saliency=pick(self.saliency),
                            assign=tuple(a[sel] for a in self.assign),
                            skips=tuple(s and (s[0][sel], s[1][sel]) for s in self.skips))


@dataclass
class Context:
    """One forward's inputs beside the tokens, and what it records (returned to the caller)."""

    batch: int
    num_prefix: int
    guidance: Optional[torch.Tensor] = None       # (B, M, D) embedded guidance tokens for CMTF
    patch_weights: Optional[torch.Tensor] = None  # (B, N) per-patch saliency for the first DTC stage
    grid: Optional[tuple] = None                  # (h, w) patch grid of this forward's images
    dense: bool = False                           # record assignments (and skips) for unpooling
    seeding: bool = False                         # DTC stages seed their centroids from these tokens
    prop_attn: bool = False
    num_clusters: Optional[torch.Tensor] = None   # (B, stages) K of each image at each DTC stage
    cluster_terms: list = field(default_factory=list)  # (zs, mu, tau) per group and stage: eq. 14's inputs
    aux_losses: list = field(default_factory=list)     # the baselines' own training terms (DynamicViT's ratio)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, T, C), idx (B, K) -> (B, K, C)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def run_block(blk: nn.Module, grp: Group, ctx: Context) -> Group:
    """One block on one group: blocks of this package take groups; a plain timm ``Block`` takes
    the tokens and, as its attention mask, the proportional-attention bias."""
    step = getattr(blk, "forward_group", None)
    if step is not None:
        return step(grp, ctx)
    return grp.replace(x=blk(grp.x, grp.log_mass))


def assemble(groups: list, batch: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Groups -> one (B, P+T_max, D) tensor in input order and its mass (B, P+T_max), or None
    before any reduction; shorter rows are zero-padded with mass 0, so mass-weighted pooling
    ignores them."""
    if len(groups) == 1 and groups[0].mass is None:
        return groups[0].x, None
    T = max(grp.x.shape[1] for grp in groups)
    ref = groups[0].x
    x = ref.new_zeros(batch, T, ref.shape[-1])                                       # (B, P+T_max, D)
    mass = torch.zeros(batch, T, device=ref.device)                                  # (B, P+T_max)
    for grp in groups:
        t = grp.x.shape[1]
        x[grp.index, :t] = grp.x if grp.valid is None else grp.x * grp.valid.unsqueeze(-1)  # padding -> 0
        mass[grp.index, :t] = grp.mass if grp.mass is not None else 1.0
    return x, mass


def pad_groups(groups: list, max_groups: int) -> list:
    """Run images of different K as at most ``max_groups`` batches: groups of neighbouring lengths
    are merged and padded to the longest with slots of mass 0 that attention masks out exactly
    (``Group.valid``), so every image's output is what its own group gives. The split minimises
    the tokens processed (padding included, and counted: the MAC hooks see the padded shapes).
    Fewer, larger batches can only pay where a call costs more than the padded tokens: at nano
    on a 2-core CPU they did not (three K groups; docs/performance.md, "Per-image K on the trained
    default job"); on a GPU it is not measured yet."""
    if len(groups) <= max_groups:
        return groups
    groups = sorted(groups, key=lambda g: g.x.shape[1])
    lengths = [g.x.shape[1] for g in groups]
    counts = [g.x.shape[0] for g in groups]
    cuts = _cheapest_split(lengths, counts, max_groups)
    return [_merge(groups[i:j]) for i, j in zip(cuts[:-1], cuts[1:], strict=True)]


def _cheapest_split(lengths: list, counts: list, parts: int) -> list:
    """Boundaries [0, ..., n] of at most ``parts`` runs of the sorted groups that minimise
    sum(images in run x longest length in run): a small dynamic programme (n <= ~6 lengths)."""
    n = len(lengths)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]  # best[p][j]: first j groups in p runs
    back = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for p in range(1, parts + 1):
        for j in range(1, n + 1):
            for i in range(j):  # the last run is groups i..j-1, padded to lengths[j - 1]
                cost = best[p - 1][i] + sum(counts[i:j]) * lengths[j - 1]
                if cost < best[p][j]:
                    best[p][j], back[p][j] = cost, i
    p = min(range(1, parts + 1), key=lambda q: best[q][n])
    cuts, j = [n], n
    while j:
        j = back[p][j]
        p -= 1
        cuts.append(j)
    return cuts[::-1]


def _merge(groups: list) -> Group:
    """Groups of one reduction -> one group padded to the longest (assignments padded with empty
    clusters, so ``A_1 A_2 ...`` stays what each image's own group gives)."""
    if len(groups) == 1:
        return groups[0]
    if any(g.policy is not None or g.active is not None or any(s is not None for s in g.skips) for g in groups):
        raise ValueError("pad_groups merges DTC's groups; not groups with a keep policy or skips (dense outputs)")
    valid = [g.valid if g.valid is not None else g.x.new_ones(g.x.shape[:2], dtype=torch.bool) for g in groups]
    mass = [g.mass if g.mass is not None else g.x.new_ones(g.x.shape[:2]) for g in groups]
    return groups[0].replace(
        index=torch.cat([g.index for g in groups]),                                     # (b,)
        x=_pad_cat([g.x for g in groups]),                                               # (b, P+T_max, D)
        mass=_pad_cat(mass),                                                             # (b, P+T_max)
        valid=_pad_cat(valid, False),                                                    # (b, P+T_max)
        assign=tuple(_pad_cat(list(a)) for a in zip(*(g.assign for g in groups), strict=True)))


def _pad_cat(ts: list, value=0) -> torch.Tensor:
    """Concatenate along the batch, every other dimension padded with ``value`` to the largest."""
    shape = [max(t.shape[d] for t in ts) for d in range(1, ts[0].dim())]
    out = ts[0].new_full((sum(t.shape[0] for t in ts), *shape), value)
    row = 0
    for t in ts:
        out[(slice(row, row + t.shape[0]),) + tuple(slice(0, n) for n in t.shape[1:])] = t
        row += t.shape[0]
    return out


def unpad_groups(groups: list) -> list:
    """Undo :func:`pad_groups` before another reduction: a padded group -> one group per length."""
    out = []
    for grp in groups:
        if grp.valid is None:
            out.append(grp)
            continue
        lengths = grp.valid.sum(1)                                                       # (b,)
        for t in torch.unique(lengths).tolist():
            rows = grp.rows(torch.nonzero(lengths == t).squeeze(1))
            P = rows.x.shape[1] - rows.assign[-1].shape[-1]                          # prefix tokens (not in A)
            out.append(rows.replace(x=rows.x[:, :t], mass=rows.mass[:, :t], valid=None,
                                    assign=rows.assign[:-1] + (rows.assign[-1][..., :t - P],)))
    return out


def unpool(grp: Group, mode: str, num_prefix: int) -> torch.Tensor:
    """A group's tokens back on the patch grid, (b, P+N, D): ``Z_rec = A_1 A_2 ... S``; with
    ``mode='skip'`` each patch keeps its own features from before each DTC stage and receives
    what its cluster learned since, ``Z_rec = Z_pre + A (S - S_0)``, last stage first (Hourglass's
    token reconstruction keeps per-patch detail the same way; with K = N and A = I it is the dense
    residual stream). Plain unpooling where no skip was recorded (the baselines)."""
    P = num_prefix
    patches = grp.x[:, P:]                                                           # (b, K, D)
    if mode == "skip" and any(s is not None for s in grp.skips):
        for a, skip in zip(reversed(grp.assign), reversed(grp.skips), strict=True):
            a = a.to(patches.dtype)                                                  # (b, N, K)
            patches = a @ patches if skip is None else skip[0] + a @ (patches - skip[1])  # (b, N, D)
    elif grp.assign:
        a = grp.assign[0]
        for nxt in grp.assign[1:]:
            a = a @ nxt                                                              # (b, N, K_last)
        patches = a.to(patches.dtype) @ patches                                      # (b, N, D)
    return torch.cat([grp.x[:, :P], patches], dim=1)                                 # (b, P+N, D)
