"""AdaptiVision: a timm ``VisionTransformer`` with DTC, AFA and CMTF (paper section 3).

Data flow (DESIGN.md §1):

    patch embed + pos embed (eq. 1) -> blocks[:c] (plain ViT) -> DTC (eqs. 2-3, per-image K)
    -> [CMTF (eqs. 8-10)] -> blocks[c:] with AFA (eqs. 4-7) on K+1 tokens -> norm -> head (eq. 11)

Images of one batch may get different K. They are grouped by K and each group runs through
the remaining blocks as one dense batch (no padding, so fewer tokens really cost less); the
results are put back in input order. An image's output does not depend on its batch-mates.
"""
from __future__ import annotations

import inspect
from typing import List, Optional, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch.utils.checkpoint import checkpoint

from ..config import ModelOptions
from ..layers import AFABlock, CrossModalTokenFusion, DynamicTokenClustering, make_afa_block
from ..reduction import (
    EViTBlock,
    ImportanceStage,
    PolicyBlock,
    RandomKeep,
    ReducingBlock,
    ToMeBlock,
    convert_block,
    gather_tokens,
    keep_assignment,
)

__all__ = ["AdaptiVision"]

_VIT_ARGS = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self"}


class _Group:
    """Images of one batch that currently have the same number of tokens."""

    __slots__ = ("index", "x", "mass", "assign", "skips", "bias", "policy")

    def __init__(self, index, x, mass, assign, prop_attn: bool = False, policy=None, skips=None):
        self.index = index    # (b,) positions in the input batch
        self.x = x            # (b, P+T, D) tokens, prefix ([CLS]) first
        self.mass = mass      # (b, P+T) patches per token; None = 1 everywhere (before condensation)
        self.assign = assign  # one assignment (b, N_in, K) per reduction passed, for unpooling
        # per entry of assign: (tokens before, super-tokens right after) a DTC stage, for
        # unpool='skip'; None where not recorded (baselines, or no dense outputs requested)
        self.skips = skips if skips is not None else [None] * len(assign)
        self.policy = policy  # (b, N) DynamicViT's training-time keep mask (reduction='importance')
        self.set_bias(prop_attn)

    def set_bias(self, prop_attn: bool) -> None:
        # ToMe's proportional attention: + log(mass) on the keys; constant until the next reduction
        # clamped: a cluster that received no mass at all (sharp tau) must not give log(0), whose
        # gradient is NaN; at 1e-6 it is simply ignored by attention
        self.bias = (self.mass.clamp_min(1e-6).log()[:, None, None, :].to(self.x.dtype)  # (b, 1, 1, T)
                     if prop_attn and self.mass is not None else None)


class AdaptiVision(VisionTransformer):
    """Vision transformer that condenses patch tokens into per-image numbers of super-tokens.

    Accepts every ``timm`` ``VisionTransformer`` argument plus the options of
    :class:`adaptivision.config.ModelOptions`. With ``condense_at=None, afa=False, cmtf=False``
    it is exactly a timm ViT and loads its state dict.
    """

    def __init__(self, **kwargs):
        opts, vit_kwargs = ModelOptions.split_kwargs(kwargs, _VIT_ARGS)
        cmtf_off = opts.cmtf is not None and not opts.cmtf  # asked for, not defaulted
        super().__init__(**vit_kwargs)
        self._cmtf_off_by_request = cmtf_off
        D, P = self.embed_dim, self.num_prefix_tokens
        self.opts = opts.resolve(self.patch_embed.num_patches, len(self.blocks), D)
        stages = self.opts.stages
        if stages and self.global_pool not in ("token", "avg"):
            raise ValueError(f"Invalid value for 'global_pool': {self.global_pool!r}; allowed with "
                             "condensation: 'token' or 'avg' (mass-weighted mean of the super-tokens).")
        if self.opts.norm == "post" and not (self.opts.afa and stages):
            raise ValueError("norm='post' applies to AFA blocks: it needs afa=True and condense_at set.")

        self.dtc = nn.ModuleDict({
            str(st["block"]): DynamicTokenClustering(
                D, st["k_min"], st["k_max"], opts.k_step, opts.tau, opts.iters, opts.normalize,
                opts.complexity, opts.dynamic, opts.budget_jitter, opts.stat_momentum, opts.assign_norm,
                st["k_mid"], opts.centers, opts.assign == "hard")
            for st in stages})
        if opts.afa and stages:  # blocks after the first condensation attend over K+P tokens
            for i in range(stages[0]["block"], len(self.blocks)):
                k_max = [st["k_max"] for st in stages if st["block"] <= i][-1]
                make_afa_block(self.blocks[i], P + k_max, opts.afa_rank, opts.afa_hidden, opts.norm == "post")
        heads = self.blocks[0].attn.num_heads
        qkv_bias = self.blocks[0].attn.qkv.bias is not None
        self.cmtf = nn.ModuleDict({str(i): CrossModalTokenFusion(D, heads, opts.gate, qkv_bias)
                                   for i in self.opts.cmtf_at})
        self.reducer = self._build_baseline(self.opts, D, P)
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
        self.last_num_clusters: Optional[torch.Tensor] = None  # (B, stages) K of each image, last forward
        self._feat_mass: Optional[torch.Tensor] = None
        self._cluster_terms: list = []
        self._reduction_losses: list = []
        self._track = False  # build assignments of the baselines too (dense outputs)
        self._seeding = False  # init_clusters is running: DTC stages seed their centroids

    def _build_baseline(self, opts: ModelOptions, D: int, P: int) -> nn.ModuleDict:
        """Stages (before a block) or converted blocks of the baseline ``opts.reduction``."""
        stages = nn.ModuleDict()
        at = opts.reduce_blocks
        if opts.reduction == "random":
            stages[str(at[0])] = RandomKeep(opts.keep_ratio)
        elif opts.reduction == "importance":
            for s, b in enumerate(at):
                stages[str(b)] = ImportanceStage(D, opts.keep_ratio, s)
            for blk in self.blocks[at[0]:]:  # later attention must honour the training-time mask
                convert_block(blk, PolicyBlock)
        elif opts.reduction == "evit":
            for b in at:
                convert_block(self.blocks[b], EViTBlock, keep_ratio=opts.keep_ratio, num_prefix=P)
        elif opts.reduction == "tome":
            for b in at:
                convert_block(self.blocks[b], ToMeBlock, r=opts.tome_r, num_prefix=P)
        return stages

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
        return super().no_weight_decay() | {f"dtc.{k}.centroids" for k, d in self.dtc.items() if d.centroids is not None} | {"guidance_tokens"}

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
            if given and not self._cmtf_off_by_request:
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
        tokens = [self._embed_source(name, g, batch) for name, g in (guidance or {}).items() if g is not None]
        if self.guidance_tokens is not None:
            tokens.append(self.guidance_tokens.unsqueeze(0).expand(batch, -1, -1))    # (B, M_learned, D)
        return torch.cat(tokens, dim=1) if tokens else None                          # (B, M, D)

    def _embed_source(self, name: Optional[str], g: torch.Tensor, batch: int) -> torch.Tensor:
        what = "guidance" if name is None else f"guidance[{name!r}]"
        if isinstance(self.guidance_embed, nn.ModuleDict):
            if name not in self.guidance_embed:
                raise ValueError(f"unknown guidance source {name!r}; this model was built for "
                                 f"{sorted(self.guidance_embed)}")
            proj = self.guidance_embed[name]
        elif name is not None:
            raise ValueError(f"this model takes one guidance tensor, not named sources (got {name!r}); "
                             "build it with guidance_dim={name: width} for several sources")
        else:
            proj = self.guidance_embed
        if g.dim() == 2:
            g = g.unsqueeze(0).expand(batch, -1, -1)
        if g.dim() != 3 or g.shape[0] != batch:
            raise ValueError(f"{what} must be (M, Dg) or (B={batch}, M, Dg), got {tuple(g.shape)}")
        expected = proj.in_features if isinstance(proj, nn.Linear) else self.embed_dim
        if g.shape[-1] != expected:
            raise ValueError(f"{what} width {g.shape[-1]} != guidance_dim {expected} of this model")
        return proj(g.to(self.pos_embed.dtype))                                     # (B, M, D)

    def _trunk(self, x: torch.Tensor, guidance=None, patch_weights=None, last: Optional[int] = None):
        """Run embedding and blocks; yields ``(block index, groups)`` after each block."""
        B = x.shape[0]
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))    # (B, P+N, D)
        g = self.embed_guidance(guidance, B)                                        # (B, M, D) or None
        groups = [_Group(torch.arange(B, device=x.device), x, None, [])]
        self.last_num_clusters = torch.zeros(B, len(self.dtc), dtype=torch.long, device=x.device)
        self._cluster_terms, self._reduction_losses = [], []
        for i, blk in enumerate(self.blocks):
            if last is not None and i > last:
                break
            if str(i) in self.reducer:
                groups = [self._baseline_stage(self.reducer[str(i)], grp) for grp in groups]
            if str(i) in self.dtc:
                stage = list(self.dtc).index(str(i))
                groups = self._condense(self.dtc[str(i)], stage, groups, patch_weights if stage == 0 else None)
            if str(i) in self.cmtf and g is not None:
                for grp in groups:
                    grp.x = self.cmtf[str(i)](grp.x, g[grp.index])
            for grp in groups:
                self._run_block(blk, grp)
            yield i, groups

    def _condense(self, dtc: DynamicTokenClustering, stage: int, groups: List[_Group],
                  weights: Optional[torch.Tensor]) -> List[_Group]:
        P = self.num_prefix_tokens
        if self._seeding:  # init_clusters: seed the centroids from these tokens (k-means++)
            dtc.init_centroids(torch.cat([grp.x[:, P:].reshape(-1, self.embed_dim) for grp in groups]))
        out = []
        for grp in groups:
            prefix, z = grp.x[:, :P], grp.x[:, P:]                                   # (b, P, D), (b, N, D)
            mass = grp.mass[:, P:] if grp.mass is not None else z.new_ones(z.shape[:2], dtype=torch.float32)
            w = weights[grp.index] if weights is not None else None                  # (b, N) or None
            ks = dtc.num_clusters(z, w)                                              # (b,)
            self.last_num_clusters[grp.index, stage] = ks
            plan = self._plan(dtc, ks, z.shape[1])
            seeds = dtc.seed_points(z, max(k for k, _ in plan))                     # (b, K_max) or None
            for k, sel in plan:  # one dense batch per K
                def pick(t, sel=sel):
                    return t if sel is None or t is None else t[sel]
                s, m, a, zs, mu = dtc(pick(z), pick(mass), k, pick(w), pick(seeds))
                x = torch.cat([pick(prefix), s], dim=1)                              # (b_k, P+K, D)
                m = torch.cat([m.new_ones(m.shape[0], P), m], dim=1)                 # (b_k, P+K)
                # earlier stages' records follow the rows this K group keeps
                assign = [pick(t) for t in grp.assign] + [a]
                skips = [t and (pick(t[0]), pick(t[1])) for t in grp.skips]
                skips.append((pick(z), s) if self._track else None)                 # for unpool='skip'
                out.append(_Group(pick(grp.index), x, m, assign, self.prop_attn, skips=skips))
                self._cluster_terms.append((zs, mu, dtc.tau))
        return out

    @staticmethod
    def _plan(dtc: DynamicTokenClustering, ks: torch.Tensor, n: int) -> list:
        """[(K, rows of the group or None for all)]. Fixed K needs no look at ``ks`` (no host
        sync), which keeps ``torch.compile`` graphs whole and makes ONNX export possible."""
        if not dtc.dynamic:
            return [(min(dtc.fixed_k if dtc.fixed_k is not None else dtc.k_max, n), None)]
        values = torch.unique(ks).tolist()
        if len(values) == 1:
            return [(values[0], None)]
        return [(k, torch.nonzero(ks == k).squeeze(1)) for k in values]

    def _baseline_stage(self, stage: nn.Module, grp: _Group) -> _Group:
        """A baseline's reduction before a block: random or DynamicViT pruning."""
        P = self.num_prefix_tokens
        prefix, z = grp.x[:, :P], grp.x[:, P:]                                       # (b, P, D), (b, N, D)
        if isinstance(stage, ImportanceStage) and self.training:  # mask, don't drop (DynamicViT)
            policy = grp.policy if grp.policy is not None else z.new_ones(z.shape[:2])
            grp.policy, loss = stage.train_policy(z, policy)                         # (b, N)
            grp.mass = torch.cat([grp.policy.new_ones(len(grp.policy), P), grp.policy], 1).float()
            self._reduction_losses.append(loss)
            return grp
        idx = stage(z) if isinstance(stage, RandomKeep) else stage.keep_index(z)    # (b, K)
        x = torch.cat([prefix, gather_tokens(z, idx)], dim=1)                        # (b, P+K, D)
        mass = None if grp.mass is None else torch.cat([grp.mass[:, :P], grp.mass[:, P:].gather(1, idx)], 1)
        assign = grp.assign + [keep_assignment(idx, z.shape[1])] if self._track else grp.assign
        skips = grp.skips + [None] * (len(assign) - len(grp.assign))  # no skip for baselines
        return _Group(grp.index, x, mass, assign, self.prop_attn, skips=skips)

    def _run_block(self, blk: nn.Module, grp: _Group) -> None:
        """One block on one group, in place (a reducing block also changes its mass and length)."""
        kw = {}
        if isinstance(blk, (AFABlock, ReducingBlock)):
            kw["mass"] = grp.mass
        elif isinstance(blk, PolicyBlock) and grp.policy is not None:
            kw["policy"] = torch.cat([grp.policy.new_ones(len(grp.policy), self.num_prefix_tokens), grp.policy], 1)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            out = checkpoint(blk, grp.x, grp.bias, use_reentrant=False, **kw)
        else:
            out = blk(grp.x, grp.bias, **kw)
        if isinstance(blk, ReducingBlock):
            grp.x, grp.mass, a = out
            if a is not None:
                grp.assign.append(a)
                grp.skips.append(None)
            grp.set_bias(self.prop_attn)
        else:
            grp.x = out

    def _assemble(self, groups: List[_Group], batch: int) -> torch.Tensor:
        """Groups -> one (B, P+T_max, D) tensor in input order; shorter rows are zero-padded and
        their mass (kept in ``self._feat_mass``) is 0, so mass-weighted pooling ignores them."""
        if len(groups) == 1 and groups[0].mass is None:
            self._feat_mass = None
            return groups[0].x
        T = max(grp.x.shape[1] for grp in groups)
        ref = groups[0].x
        x = ref.new_zeros(batch, T, ref.shape[-1])                                  # (B, P+T_max, D)
        mass = torch.zeros(batch, T, device=ref.device)                            # (B, P+T_max)
        for grp in groups:
            t = grp.x.shape[1]
            x[grp.index, :t] = grp.x
            mass[grp.index, :t] = grp.mass if grp.mass is not None else 1.0
        self._feat_mass = mass
        return x

    def forward_features(self, x: torch.Tensor, guidance: Optional[torch.Tensor] = None,
                         patch_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens after the final norm: (B, P+T, D), zero-padded where images have fewer tokens.

        guidance: (M, Dg) or (B, M, Dg) guidance tokens for CMTF (skipped when None).
        patch_weights: (B, N) per-patch saliency for ``complexity='saliency'`` and weighted means.
        """
        groups = []
        for _, groups in self._trunk(x, guidance, patch_weights):  # noqa: B007 (we need the last)
            pass
        for grp in groups:
            grp.x = self.norm(grp.x)
        return self._assemble(groups, x.shape[0])

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """Eq. 11's Pool: [CLS], or the mass-weighted mean of the super-tokens for ``'avg'``."""
        pool_type = self.global_pool if pool_type is None else pool_type
        mass = self._feat_mass
        # ToMe's reference pools with timm's plain mean of the merged tokens
        if pool_type == "avg" and mass is not None and mass.shape == x.shape[:2] and self.opts.reduction != "tome":
            P = self.num_prefix_tokens
            m = mass[:, P:].to(x.dtype).unsqueeze(-1)                                # (B, T, 1)
            return (x[:, P:] * m).sum(1) / m.sum(1).clamp_min(1e-6)                  # (B, D)
        return super().pool(x, pool_type)

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor] = None,
                patch_weights: Optional[torch.Tensor] = None, return_aux: bool = False):
        """Logits (B, classes); with ``return_aux`` also the inputs of the objective's extra terms:
        ``cluster`` (eq. 14 terms), ``pooled`` (z_out after LayerNorm), ``align`` (its projection
        for eq. 15, or None) and ``num_clusters`` (B, stages)."""
        feats = self.forward_features(x, guidance, patch_weights)
        pooled = self.forward_head(feats, pre_logits=True)                          # (B, D)
        logits = self.head(pooled)                                                  # (B, classes)
        terms, self._cluster_terms = self._cluster_terms, []  # don't keep the graph alive on self
        red, self._reduction_losses = self._reduction_losses, []
        if not return_aux:
            return logits
        aux = dict(cluster=terms, pooled=pooled, num_clusters=self.last_num_clusters,
                   align=self.align_head(pooled) if self.align_head is not None else None,
                   reduction=sum(red) / len(red) if red else None)  # DynamicViT's ratio loss
        return logits, aux

    # --- dense outputs ------------------------------------------------------------------------
    def _unpool(self, groups: List[_Group], batch: int, norm: bool) -> torch.Tensor:
        """Super-tokens back on the patch grid: ``Z_rec = A_1 A_2 ... S`` -> (B, P+N, D)."""
        P = self.num_prefix_tokens
        rows = []
        for grp in groups:
            if self.unpool == "skip" and any(t is not None for t in grp.skips):
                rows.append((grp.index, self._unpool_skip(grp, norm)))
                continue
            y = self.norm(grp.x) if norm else grp.x
            patches = y[:, P:]                                                       # (b, K, D)
            if grp.assign:
                a = grp.assign[0]
                for nxt in grp.assign[1:]:
                    a = a @ nxt                                                      # (b, N, K_last)
                patches = (a.to(y.dtype) @ patches)                                  # (b, N, D)
            rows.append((grp.index, torch.cat([y[:, :P], patches], dim=1)))
        out = rows[0][1].new_empty(batch, *rows[0][1].shape[1:])
        for index, r in rows:
            out[index] = r
        return out

    def _unpool_skip(self, grp: _Group, norm: bool) -> torch.Tensor:
        """Each patch keeps its own features from before the stage and receives what its cluster
        learned since: ``Z_rec = Z_pre + A (S - S_0)`` per stage, last stage first (Hourglass's
        token reconstruction keeps per-patch detail the same way). With K = N and A = I it is
        the dense computation's residual stream; plain unpooling where no skip was recorded."""
        P = self.num_prefix_tokens
        patches = grp.x[:, P:]                                                       # (b, K, D)
        for a, skip in zip(reversed(grp.assign), reversed(grp.skips), strict=True):
            a = a.to(patches.dtype)                                                  # (b, N, K)
            patches = a @ patches if skip is None else skip[0] + a @ (patches - skip[1])  # (b, N, D)
        y = torch.cat([grp.x[:, :P], patches], dim=1)                               # (b, P+N, D)
        return self.norm(y) if norm else y

    def _set_track(self, on: bool) -> None:
        """Baselines build their (one-hot) assignments only when dense outputs need them."""
        self._track = on
        for blk in self.blocks:
            if isinstance(blk, ReducingBlock):
                blk.track = on

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
            output_fmt: str = "NCHW", intermediates_only: bool = False,
            guidance: Optional[torch.Tensor] = None, patch_weights: Optional[torch.Tensor] = None):
        """timm's ``forward_intermediates``; blocks after condensation are unpooled to the full
        patch grid through the assignment, so dense heads get (B, D, H, W) maps as from a ViT."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        P = self.num_prefix_tokens
        inters, prefixes, groups = [], [], []
        self._set_track(True)
        try:
            for i, groups in self._trunk(x, guidance, patch_weights, max_index if stop_early else None):
                if i in take_indices:
                    y = self._unpool(groups, B, norm)                               # (B, P+N, D)
                    prefixes.append(y[:, :P])
                    inters.append(y[:, P:])
        finally:
            self._set_track(False)
        self._cluster_terms = []
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            inters = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in inters]
        if return_prefix_tokens and P:
            inters = list(zip(inters, prefixes, strict=True))
        if intermediates_only:
            return inters
        for grp in groups:
            grp.x = self.norm(grp.x)
        return self._assemble(groups, B), inters

    # --- budgets ------------------------------------------------------------------------------
    def init_clusters(self, images: torch.Tensor, **forward_kwargs) -> None:
        """Seed every DTC stage's centroids by k-means++ on these images' tokens, each stage on
        the tokens that reach it (a fresh model has fixed random centroids, the same in every
        process). Call it before wrapping the model in DDP, with the same images on every rank."""
        self._seeding = True
        try:
            with torch.no_grad():
                self.forward_features(images, **forward_kwargs)
        finally:
            self._seeding = False

    @torch.no_grad()
    def set_token_budget(self, images: Optional[torch.Tensor] = None, mean_k: Optional[float] = None,
                         gmacs: Optional[float] = None, bias: Optional[float] = None, **forward_kwargs) -> float:
        """Set the inference budget of the first DTC stage; returns the bias it chose.

        ``bias``: set the knob directly. ``mean_k``: mean K over ``images``. ``gmacs``: mean GMACs
        per image over ``images`` (measured with :func:`adaptivision.profile`). With
        ``dynamic=False`` the knob is the fixed K itself.
        """
        if sum(v is not None for v in (mean_k, gmacs, bias)) != 1:
            raise ValueError("set_token_budget takes exactly one of mean_k=, gmacs=, bias=")
        if not self.dtc:
            raise ValueError("this model has no DTC stage (condense_at=None): there is no token budget")
        dtc = next(iter(self.dtc.values()))
        if bias is not None:
            dtc.budget_bias = float(bias)
            return dtc.budget_bias
        if images is None:
            raise ValueError("set_token_budget(mean_k=|gmacs=) calibrates on a batch: pass images=")
        if mean_k is not None and not dtc.k_min <= mean_k <= dtc.k_max:
            raise ValueError(f"mean_k={mean_k} is outside this model's range [{dtc.k_min}, {dtc.k_max}]")
        from ..profile import profile  # late import: profile imports the layers, not the model

        was_training = self.training
        self.eval()
        try:
            if not dtc.dynamic:  # the knob is K itself: pick the allowed K closest to the request
                step = dtc.k_step
                cands = sorted({dtc.k_min, dtc.k_max, *range(-(-dtc.k_min // step) * step, dtc.k_max + 1, step)})

                def cost(k):
                    dtc.fixed_k = k
                    return float(k) if mean_k is not None else profile(self, images, **forward_kwargs)["gmacs"]
                target = mean_k if mean_k is not None else gmacs
                dtc.fixed_k = min(cands, key=lambda k: abs(cost(k) - target))
                return float(dtc.fixed_k)
            if mean_k is not None:
                dtc.budget_bias = 0.0
                self.forward_features(images, **forward_kwargs)
                score = dtc.last_score

                def measure(b):
                    return dtc.k_from_score(score, b).float().mean().item()
                target = mean_k
            else:
                def measure(b):
                    dtc.budget_bias = b
                    return profile(self, images, **forward_kwargs)["gmacs"]
                target = gmacs
            lo, hi, best = -20.0, 20.0, None
            for _ in range(30 if mean_k is not None else 12):  # 40 / 2**12 ~ 0.01 in bias
                mid = (lo + hi) / 2
                val = measure(mid)
                if best is None or abs(val - target) < abs(best[1] - target):
                    best = (mid, val)
                lo, hi = (mid, hi) if val < target else (lo, mid)
            if gmacs is not None and abs(best[1] - gmacs) > 0.05 * gmacs:  # never a silent miss
                lo_g, hi_g = measure(-20.0), measure(20.0)
                dtc.budget_bias = 0.0
                raise ValueError(f"gmacs={gmacs} is out of this model's reach on these images: its K range "
                                 f"[{dtc.k_min}, {dtc.k_max}] gives {lo_g:.4g} to {hi_g:.4g} GMACs")
            dtc.budget_bias = best[0]
            return best[0]
        finally:
            self.train(was_training)


# --- registration ------------------------------------------------------------------------------
def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


_FMNIST = dict(num_classes=10, input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,), crop_pct=1.0)
_CIFAR = dict(num_classes=10, input_size=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465),
              std=(0.2470, 0.2435, 0.2616), crop_pct=1.0)

default_cfgs = generate_default_cfgs({
    "adaptivision_tiny_patch16_224.untrained": _cfg(),
    "adaptivision_small_patch16_224.untrained": _cfg(),
    "adaptivision_base_patch16_224.untrained": _cfg(),
    "adaptivision_nano_patch4_28.untrained": _cfg(**_FMNIST),
    "adaptivision_nano_patch4_32.untrained": _cfg(**_CIFAR),
    "adaptivision_tiny_patch2_28.untrained": _cfg(**_FMNIST),
    "adaptivision_small_patch2_28.untrained": _cfg(**_FMNIST),
    "adaptivision_tiny_patch2_32.untrained": _cfg(**_CIFAR),
    "adaptivision_small_patch2_32.untrained": _cfg(**_CIFAR),
})

_SIZES = {"nano": dict(embed_dim=96, depth=6, num_heads=3),  # trains on 2 CPU cores in minutes
          "tiny": dict(embed_dim=192, depth=12, num_heads=3),
          "small": dict(embed_dim=384, depth=12, num_heads=6),
          "base": dict(embed_dim=768, depth=12, num_heads=12)}


def _create(variant: str, pretrained: bool = False, **kwargs) -> AdaptiVision:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        AdaptiVision, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


# 224² models: an average image at 128 of 196 super-tokens (the paper's 3.1 GMACs for the small
# size), with room down to 32 so that one checkpoint also serves aggressive budgets (<= 1.3 GMACs)
_RANGE_224 = dict(k_min=32, k_mid=128)


def _make(size: str, patch: int, img: int, pretrained: bool, kwargs: dict) -> AdaptiVision:
    args = dict(patch_size=patch, img_size=img, **_SIZES[size])
    if img == 224 and not {"k_min", "k_max", "k_mid", "condense_at", "img_size", "patch_size"} & set(kwargs):
        args.update(_RANGE_224)
    return _create(f"adaptivision_{size}_patch{patch}_{img}", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def adaptivision_tiny_patch16_224(pretrained: bool = False, **kwargs) -> AdaptiVision:
    return _make("tiny", 16, 224, pretrained, kwargs)


@register_model
def adaptivision_small_patch16_224(pretrained: bool = False, **kwargs) -> AdaptiVision:
    return _make("small", 16, 224, pretrained, kwargs)


@register_model
def adaptivision_base_patch16_224(pretrained: bool = False, **kwargs) -> AdaptiVision:
    return _make("base", 16, 224, pretrained, kwargs)


@register_model
def adaptivision_nano_patch4_28(pretrained: bool = False, **kwargs) -> AdaptiVision:
    return _make("nano", 4, 28, pretrained, kwargs)


@register_model
def adaptivision_nano_patch4_32(pretrained: bool = False, **kwargs) -> AdaptiVision:
    return _make("nano", 4, 32, pretrained, kwargs)


@register_model
def adaptivision_tiny_patch2_28(pretrained: bool = False, **kwargs) -> AdaptiVision:
    return _make("tiny", 2, 28, pretrained, kwargs)


@register_model
def adaptivision_small_patch2_28(pretrained: bool = False, **kwargs) -> AdaptiVision:
    return _make("small", 2, 28, pretrained, kwargs)


@register_model
def adaptivision_tiny_patch2_32(pretrained: bool = False, **kwargs) -> AdaptiVision:
    return _make("tiny", 2, 32, pretrained, kwargs)


@register_model
def adaptivision_small_patch2_32(pretrained: bool = False, **kwargs) -> AdaptiVision:
    return _make("small", 2, 32, pretrained, kwargs)
