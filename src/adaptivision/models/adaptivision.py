"""AdaptiVision: a timm ``VisionTransformer`` with DTC, AFA and CMTF (paper section 3).

Data flow (DESIGN.md §1; docs/model.md, "Data flow"):

    patch embed + pos embed (eq. 1) -> blocks[:c] (plain ViT) -> DTC (eqs. 2-3, per-image K)
    -> [CMTF (eqs. 8-10)] -> blocks[c:] with AFA (eqs. 4-7) on K+1 tokens -> norm -> head (eq. 11)

The trunk is one loop over blocks: before block i the stages registered at i (a baseline's,
DTC's, CMTF's, in that order) map token groups to token groups, then the block does
(:mod:`adaptivision.layers.tokens`). Images of one batch may get different K; each group of
equal K runs as one dense batch (no padding, so fewer tokens really cost less) and the results
are put back in input order; with ``max_groups`` neighbouring groups run as one batch padded with
masked slots (same outputs; at nano on a CPU not faster, docs/performance.md). An image's output
does not depend on its batch-mates. A forward
keeps nothing on the model: what the objective, pooling and unpooling need is returned
(:class:`TokenOutput`).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from .. import budget
from ..config import ModelOptions
from ..layers import make_afa_block
from ..layers.stages import ClusterStage, FusionStage, embed_source
from ..layers.tokens import Context, Group, assemble, pad_groups, run_block, unpool
from ..reduction import ATTACH, SaliencyBlock, convert_block

__all__ = ["AdaptiVision", "TokenOutput"]

_VIT_ARGS = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self"}


@dataclass
class TokenOutput:
    """What one forward of the trunk returns (nothing of it stays on the model)."""

    features: torch.Tensor            # (B, P+T_max, D) after the final norm, zero-padded per image
    mass: Optional[torch.Tensor]      # (B, P+T_max) patches per token (0 on padding); None = dense
    num_clusters: torch.Tensor        # (B, DTC stages) K of each image
    cluster_terms: list               # (zs, mu, tau) per group and DTC stage: eq. 14's inputs
    aux_loss: Optional[torch.Tensor]  # the baseline's own training term (DynamicViT's ratio loss)
    groups: List[Group]               # the last block's token groups (assignments, for unpooling / pictures)


class AdaptiVision(VisionTransformer):
    """Vision transformer that condenses patch tokens into per-image numbers of super-tokens.

    Accepts every ``timm`` ``VisionTransformer`` argument plus the options of
    :class:`adaptivision.config.ModelOptions`. With ``condense_at=None, afa=False, cmtf=False``
    it is exactly a timm ViT and loads its state dict.
    """

    def __init__(self, **kwargs):
        opts, vit_kwargs = ModelOptions.split_kwargs(kwargs, _VIT_ARGS)
        super().__init__(**vit_kwargs)
        D, P = self.embed_dim, self.num_prefix_tokens
        self.opts = opts.resolve(self.patch_embed.num_patches, len(self.blocks), D)
        stages = self.opts.stages
        if stages and self.global_pool not in ("token", "avg"):
            raise ValueError(f"Invalid value for 'global_pool': {self.global_pool!r}; allowed with "
                             "condensation: 'token' or 'avg' (mass-weighted mean of the super-tokens).")
        if self.opts.norm == "post" and not (self.opts.afa and stages):
            raise ValueError("norm='post' applies to AFA blocks: it needs afa=True and condense_at set.")

        o = self.opts
        self._check_patch_drop()
        self.dtc = nn.ModuleDict({
            str(st.block): ClusterStage(
                D, k_min=st.k_min, k_max=st.k_max, k_mid=st.k_mid, k_step=o.k_step,
                infer_k_step=o.infer_k_step, tau=o.tau, iters=o.iters,
                normalize=o.normalize, complexity=o.complexity, dynamic=o.dynamic, train_k=o.train_k,
                budget_jitter=o.budget_jitter,
                stat_momentum=o.stat_momentum, assign_norm=o.assign_norm, centers=o.centers,
                hard=o.assign == "hard", spatial=o.spatial, learn_tau=o.learn_tau, assign_grad=o.assign_grad,
                window=o.window, stage=s, num_prefix=P,
                pad_k=o.pad_k, keep_salient=o.keep_salient if s == 0 else 0)
            for s, st in enumerate(stages)})
        if o.keep_salient:  # the block before the first stage reports [CLS]'s attention (same tokens, same weights)
            convert_block(self.blocks[stages[0].block - 1], SaliencyBlock, num_prefix=P)
        if opts.afa and stages:  # blocks after the first condensation attend over K+P tokens
            for i in range(stages[0].block, len(self.blocks)):
                k_max = [st.k_max for st in stages if st.block <= i][-1]
                make_afa_block(self.blocks[i], P + k_max, opts.afa_rank, opts.afa_hidden, opts.norm == "post")
        heads = self.blocks[0].attn.num_heads
        qkv_bias = self.blocks[0].attn.qkv.bias is not None
        self.cmtf = nn.ModuleDict({str(i): FusionStage(D, num_heads=heads, gate=opts.gate, qkv_bias=qkv_bias) for i in self.opts.cmtf_at})
        # a baseline's stages before blocks (its reducing blocks are converted in place)
        attach = ATTACH.get(self.opts.reduction)
        self.reducer = nn.ModuleDict(attach(self.blocks, self.opts, D, P) if attach else {})
        # proportional attention where tokens stand for several patches by construction
        self.prop_attn = self.opts.prop_attn and self.opts.reduction in ("dtc", "tome")
        self.unpool = self.opts.unpool  # dense outputs only (forward_intermediates)
        # raw guidance tokens -> width D: one projection per named source, or one for a single source
        gdim = opts.guidance_dim or D
        if not len(self.cmtf):
            self.guidance_embed = nn.Identity()
        elif isinstance(gdim, dict):
            self.guidance_embed = nn.ModuleDict({name: nn.Linear(w, D) for name, w in gdim.items()})
        else:
            self.guidance_embed = nn.Linear(gdim, D) if gdim != D else nn.Identity()
        # learned guidance tokens (the fallback source): CMTF still has keys when no guidance is given
        self.guidance_tokens = None
        if opts.guidance_tokens and len(self.cmtf):
            self.guidance_tokens = nn.Parameter(torch.zeros(opts.guidance_tokens, D))
            trunc_normal_(self.guidance_tokens, std=0.02)
        self.align_head = nn.Linear(D, opts.align_dim) if opts.align_dim else None
        # K of each image in the last forward: for inspection only, nothing reads it back
        self.last_num_clusters: Optional[torch.Tensor] = None
        self._skip_dtc = False  # full_tokens(): the DTC stages are skipped

    @property
    def patch_drop_rate(self) -> float:
        """timm's ``patch_drop_rate`` (PatchDropout, Liu et al. 2023): the share of patch tokens dropped
        at random right after the embedding, in training only; evaluation sees every patch."""
        return getattr(self.patch_drop, "prob", 0.0)

    def _check_patch_drop(self) -> None:
        """Random patch drops leave tokens off the patch grid: options that place tokens on it fail."""
        if not self.patch_drop_rate:
            return
        o = self.opts
        needs = ([f"reduction={o.reduction!r}"] if o.reduction in ("hourglass", "hired") else []) + (
            [f"centers={o.centers!r}"] if o.stages and o.centers == "grid" else []) + (
            [f"spatial={o.spatial!r}"] if o.stages and o.spatial else [])
        if needs:
            raise ValueError(f"patch_drop_rate={self.patch_drop_rate} drops patches in training, but {', '.join(needs)} "
                             "needs every patch on the patch grid: use patch_drop_rate=0 with it")

    # --- timm interface -------------------------------------------------------------------------
    @torch.jit.ignore
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, with the one mismatch timm's scripts meet named: they build every model
        with 3 input channels unless told, and the ``*_28`` models take 1."""
        w = state_dict.get("patch_embed.proj.weight")
        have = self.patch_embed.proj.weight.shape[1]
        if w is not None and w.dim() == 4 and w.shape[1] != have:
            raise RuntimeError(f"the checkpoint takes {w.shape[1]}-channel images, this model was built with "
                               f"in_chans={have}: build it with in_chans={w.shape[1]} (timm's train.py / "
                               f"validate.py: --in-chans {w.shape[1]})")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def no_weight_decay(self) -> set:
        # Decay would pull the centroids towards the origin, away from the tokens they summarise.
        # (the learned guidance tokens are embeddings, like the class token)
        # (a learned temperature is a scale, not a weight: decay would pull log tau to 0, tau to 1)
        return (super().no_weight_decay() | {f"dtc.{k}.centroids" for k, d in self.dtc.items() if d.centroids is not None}
                | {f"dtc.{k}.log_tau" for k, d in self.dtc.items() if d.log_tau is not None} | {"guidance_tokens"})

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre|guidance_embed|guidance_tokens",
            blocks=[(r"^blocks\.(\d+)", None), (r"^(?:dtc|cmtf|reducer)\.(\d+)", None),
                    (r"^norm|^align_head", (99999,))],
        )

    # --- the trunk ------------------------------------------------------------------------------
    def embed_guidance(self, guidance, batch: int) -> Optional[torch.Tensor]:
        """Guidance tokens -> (B, M, D), or None when CMTF has nothing to attend to.

        ``guidance``: (M, Dg) shared by the batch or (B, M, Dg) per image; with named sources
        (``guidance_dim={name: width}``) a dict {name: tensor}, where any source may be missing
        (missing guidance: only the sources given, plus the learned tokens, are fused).
        """
        if not len(self.cmtf):
            given = guidance is not None and (not isinstance(guidance, dict) or
                                              any(g is not None for g in guidance.values()))
            # cmtf=False given explicitly: guidance steers DTC only (its patch weights), by design;
            # otherwise silently ignoring the tokens would look like guidance that does nothing
            if given and not self.opts.cmtf_off_by_request:
                raise ValueError("guidance was passed, but this model has no Cross-Modal Token Fusion: build it "
                                 "with guidance_dim=<width> (or {source: width}), guidance_tokens=M or cmtf=True")
            return None
        if isinstance(guidance, torch.Tensor):
            if isinstance(self.guidance_embed, nn.ModuleDict):
                if len(self.guidance_embed) != 1:
                    raise ValueError(f"this model takes named guidance sources {sorted(self.guidance_embed)}: "
                                     "pass guidance as a dict {source: tensor}")
                guidance = {next(iter(self.guidance_embed)): guidance}
            else:
                guidance = {None: guidance}
        tokens = [embed_source(self.guidance_embed, name, g, batch, self.embed_dim, self.pos_embed.dtype)
                  for name, g in (guidance or {}).items() if g is not None]
        if self.guidance_tokens is not None:
            tokens.append(self.guidance_tokens.unsqueeze(0).expand(batch, -1, -1))    # (B, M_learned, D)
        return torch.cat(tokens, dim=1) if tokens else None                          # (B, M, D)

    def stages_before(self, i: int) -> list:
        """The stages that run before block ``i``: a baseline's, DTC's, CMTF's, in this order."""
        dtc = {} if self._skip_dtc else self.dtc
        return [d[str(i)] for d in (self.reducer, dtc, self.cmtf) if str(i) in d]

    @contextlib.contextmanager
    def full_tokens(self):
        """Forwards inside run the same weights with the DTC stages skipped: every patch token goes
        through every block (AFA modulates N + P slots, so each stage's k_max must be its N). The
        in-place teacher of ``TrainConfig.self_distill``."""
        if self.opts.afa and any(st.k_max < self.patch_embed.num_patches for st in self.opts.stages):
            raise ValueError("full_tokens needs AFA slots for every patch: build the model with k_max equal to "
                             f"the {self.patch_embed.num_patches} patches (or afa=False)")
        self._skip_dtc = True
        try:
            yield self
        finally:
            self._skip_dtc = False

    def _blocks(self, x: torch.Tensor, ctx: Context, last: Optional[int] = None):
        """Embedding, then each block with its stages; yields ``(block index, groups)``."""
        x = self.patch_embed(x)                                                      # (B, N, D) or (B, h, w, D)
        ctx.grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.grid_size)  # (h, w) patches
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))                       # (B, P+N, D)
        groups = [Group(torch.arange(x.shape[0], device=x.device), x)]
        for i, blk in enumerate(self.blocks[: None if last is None else last + 1]):
            stages = self.stages_before(i)
            for stage in stages:
                groups = stage.forward_groups(groups, ctx)
            if stages and self.opts.max_groups and not (ctx.dense or ctx.seeding):
                groups = pad_groups(groups, self.opts.max_groups)  # fewer, padded batches (exact)
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                groups = [checkpoint(run_block, blk, grp, ctx, use_reentrant=False) for grp in groups]
            else:
                groups = [run_block(blk, grp, ctx) for grp in groups]
            yield i, groups

    def _remember_k(self, ctx: Context) -> None:
        """Keep the last forward's per-image K (``model.last_num_clusters``) for inspection; not
        while torch.export traces the model (an attribute set in a traced forward is a side effect)."""
        if not torch.compiler.is_exporting():
            self.last_num_clusters = ctx.num_clusters.detach()                      # (B,)

    def _context(self, x: torch.Tensor, guidance=None, patch_weights=None, **flags) -> Context:
        B = x.shape[0]
        return Context(B, self.num_prefix_tokens, self.embed_guidance(guidance, B), patch_weights,
                       prop_attn=self.prop_attn,
                       num_clusters=torch.zeros(B, len(self.dtc), dtype=torch.long, device=x.device), **flags)

    def forward_tokens(self, x: torch.Tensor, guidance=None, patch_weights: Optional[torch.Tensor] = None,
                       last: Optional[int] = None, **flags) -> TokenOutput:
        """The trunk up to block ``last`` (default: all) and the final norm, with everything the
        objective, pooling, unpooling and pictures need (:class:`TokenOutput`).

        guidance: (M, Dg) or (B, M, Dg) guidance tokens for CMTF (skipped when None).
        patch_weights: (B, N) per-patch saliency for ``complexity='saliency'`` and weighted means.
        """
        ctx = self._context(x, guidance, patch_weights, **flags)
        groups: List[Group] = []
        for _, groups in self._blocks(x, ctx, last):  # noqa: B007 (we need the last)
            pass
        self._remember_k(ctx)
        feats, mass = assemble([grp.replace(x=self.norm(grp.x)) for grp in groups], x.shape[0])
        aux = sum(ctx.aux_losses) / len(ctx.aux_losses) if ctx.aux_losses else None
        return TokenOutput(feats, mass, ctx.num_clusters, ctx.cluster_terms, aux, groups)

    def forward_features(self, x: torch.Tensor, guidance: Optional[torch.Tensor] = None,
                         patch_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens after the final norm: (B, P+T, D), zero-padded where images have fewer tokens
        (their mass: :meth:`forward_tokens`)."""
        return self.forward_tokens(x, guidance, patch_weights).features

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, mass: Optional[torch.Tensor] = None):
        """timm's head. Eq. 11's Pool is [CLS], or for ``global_pool='avg'`` with ``mass`` (from
        :meth:`forward_tokens`) the mass-weighted mean of the super-tokens: the tokens are
        re-weighted by ``mass / mean mass`` so that timm's plain mean becomes that weighted mean.
        ToMe's reference pools with the plain mean of the merged tokens."""
        if self.global_pool == "avg" and mass is not None and self.opts.reduction != "tome":
            P = self.num_prefix_tokens
            m = mass[:, P:].to(x.dtype).unsqueeze(-1)                                # (B, T, 1)
            w = m * (m.shape[1] / m.sum(1, keepdim=True).clamp_min(1e-6))            # (B, T, 1) mean 1
            x = torch.cat([x[:, :P], x[:, P:] * w], dim=1)                           # (B, P+T, D)
        return super().forward_head(x, pre_logits)

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor] = None,
                patch_weights: Optional[torch.Tensor] = None, return_aux: bool = False):
        """Logits (B, classes); with ``return_aux`` also the inputs of the objective's extra terms:
        ``cluster`` (eq. 14 terms), ``pooled`` (z_out after LayerNorm), ``align`` (its projection
        for eq. 15, or None), ``num_clusters`` (B, stages) and ``reduction`` (a baseline's term)."""
        out = self.forward_tokens(x, guidance, patch_weights)
        pooled = self.forward_head(out.features, pre_logits=True, mass=out.mass)    # (B, D)
        logits = self.head(pooled)                                                  # (B, classes)
        if not return_aux:
            return logits
        return logits, dict(cluster=out.cluster_terms, pooled=pooled, num_clusters=out.num_clusters,
                            align=self.align_head(pooled) if self.align_head is not None else None,
                            reduction=out.aux_loss)

    # --- dense outputs ------------------------------------------------------------------------
    def _unpool(self, groups: List[Group], batch: int, norm: bool) -> torch.Tensor:
        """Every group's tokens on the patch grid, (B, P+N, D) in input order."""
        out = None
        for grp in groups:
            skip = self.unpool == "skip" and any(s is not None for s in grp.skips)
            if norm and not skip:  # plain unpooling copies normed super-tokens
                grp = grp.replace(x=self.norm(grp.x))
            y = unpool(grp, self.unpool, self.num_prefix_tokens)                     # (b, P+N, D)
            y = self.norm(y) if norm and skip else y
            out = y.new_empty(batch, *y.shape[1:]) if out is None else out
            out[grp.index] = y
        return out

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
            output_fmt: str = "NCHW", intermediates_only: bool = False,
            guidance: Optional[torch.Tensor] = None, patch_weights: Optional[torch.Tensor] = None):
        """timm's ``forward_intermediates``; blocks after condensation are unpooled to the full
        patch grid through the assignment, so dense heads get (B, D, H, W) maps as from a ViT."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if self.training and self.patch_drop_rate:
            raise ValueError(f"patch_drop_rate={self.patch_drop_rate} drops patches in training: dense outputs need "
                             "every patch on the grid (build the backbone with patch_drop_rate=0, or call .eval())")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        P = self.num_prefix_tokens
        inters, prefixes, groups = [], [], []
        ctx = self._context(x, guidance, patch_weights, dense=True)
        for i, groups in self._blocks(x, ctx, max_index if stop_early else None):
            if i in take_indices:
                y = self._unpool(groups, B, norm)                                   # (B, P+N, D)
                prefixes.append(y[:, :P])
                inters.append(y[:, P:])
        self._remember_k(ctx)
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            inters = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in inters]
        if return_prefix_tokens and P:
            inters = list(zip(inters, prefixes, strict=True))
        if intermediates_only:
            return inters
        return assemble([grp.replace(x=self.norm(grp.x)) for grp in groups], B)[0], inters

    # --- budgets ------------------------------------------------------------------------------
    def init_clusters(self, images: torch.Tensor, **forward_kwargs) -> None:
        """Seed every DTC stage's centroids by k-means++ on these images' tokens, each stage on
        the tokens that reach it (a fresh model has fixed random centroids, the same in every
        process). Call it before wrapping the model in DDP, with the same images on every rank."""
        with torch.no_grad():
            self.forward_tokens(images, seeding=True, **forward_kwargs)

    def set_token_budget(self, images: Optional[torch.Tensor] = None, mean_k: Optional[float] = None,
                         gmacs: Optional[float] = None, bias: Optional[float] = None, **forward_kwargs) -> float:
        """Set the inference budget of the first DTC stage by ``bias``, ``mean_k`` or ``gmacs``
        over ``images``; returns the knob chosen (:func:`adaptivision.budget.set_token_budget`)."""
        return budget.set_token_budget(self, images, mean_k, gmacs, bias, **forward_kwargs)
