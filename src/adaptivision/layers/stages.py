"""DTC and CMTF as trunk stages: the layers of ``dtc.py`` / ``cmtf.py`` (the paper's equations) plus
``forward_groups``, the protocol of :mod:`.tokens`; and CMTF's guidance projection. Subclasses,
so state-dict names stay ``dtc.<block>.*`` / ``cmtf.<block>.*``."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

from .cmtf import CrossModalTokenFusion
from .dtc import DynamicTokenClustering, token_positions
from .tokens import Context, Group, gather_tokens, unpad_groups


class ClusterStage(DynamicTokenClustering):
    """Eqs. 2-3 on every group: per-image K, then one dense batch per K (no padding, so fewer
    tokens really cost less); an image's clusters do not depend on its batch-mates."""

    def __init__(self, *args, stage: int, num_prefix: int, pad_k: Optional[int] = None, keep_salient: int = 0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.stage, self.num_prefix = stage, num_prefix  # which DTC stage (column of num_clusters)
        self.pad_k = pad_k  # inference: every image in pad_k slots, its own K of them in use (no host sync)
        self.keep_salient = keep_salient  # patches passed unclustered, by the previous block's [CLS] attention

    def forward_groups(self, groups: List[Group], ctx: Context) -> List[Group]:
        P = self.num_prefix
        groups = unpad_groups(groups)  # a stage clusters each image's real tokens only
        if ctx.seeding:  # init_clusters: seed the centroids from these tokens (k-means++)
            self.init_centroids(torch.cat([grp.x[:, P:].reshape(-1, grp.x.shape[-1]) for grp in groups]))
        weights = ctx.patch_weights if self.stage == 0 else None
        out = []
        for grp in groups:
            z = grp.x[:, P:]                                                         # (b, N, D)
            w = weights[grp.index] if weights is not None else None                  # (b, N) or None
            zs = self.assignment_space(z)                                            # (b, N, D) once per stage
            ks = self.num_clusters(z, w, zs)                                         # (b,)
            if self.spatial:  # K from the features alone; clusters from features and position
                zs = self.place(zs, token_positions(ctx.grid, grp.assign, z.device))  # (b, N, D + 2)
            if self.pad_k and not (self.training or ctx.dense or ctx.seeding):
                out.append(self._condense_padded(grp, ks.clamp_max(self.pad_k), w, zs, ctx))
                continue
            ctx.num_clusters[grp.index, self.stage] = ks
            plan = self.plan(ks, z.shape[1])
            keep = self.salient(grp)                                                 # ((b, n), (b, N-n)) or None
            if keep is not None and min(k for k, _ in plan) <= self.keep_salient:  # a budget set below it
                raise ValueError(f"K = {min(k for k, _ in plan)} leaves no cluster beside the {self.keep_salient} "
                                 "salient patches kept (keep_salient): K must be larger")
            zc = zs if keep is None else gather_tokens(zs, keep[1])                    # the tokens to cluster
            seeds = self.seed_points(zc, max(k for k, _ in plan) - self.keep_salient, zc)  # (b, K_max-n) or None
            for k, sel in plan:
                w_k, seeds_k, zs_k = (t if sel is None or t is None else t[sel] for t in (w, seeds, zc))
                keep_k = keep if keep is None or sel is None else (keep[0][sel], keep[1][sel])
                out.append(self._condense_group(grp.rows(sel), k, w_k, seeds_k, zs_k, ctx, keep=keep_k))
        return out

    def salient(self, grp: Group) -> Optional[tuple]:
        """``keep_salient``: the indices (b, n) of the n patches [CLS] attended to most in the block
        before (most first) and of the others (b, N - n, raster order); None without it."""
        if not self.keep_salient:
            return None
        if grp.saliency is None:
            raise RuntimeError("keep_salient needs [CLS]'s attention from the block before the DTC stage "
                               "(a SaliencyBlock; AdaptiVision converts it when built with keep_salient)")
        order = grp.saliency.argsort(dim=1, descending=True)                         # (b, N)
        return order[:, :self.keep_salient], order[:, self.keep_salient:].sort(dim=1).values

    def _condense_group(self, grp: Group, k: int, w, seeds, zs, ctx: Context, slots=None, keep=None) -> Group:
        P = self.num_prefix
        z = grp.x[:, P:]                                                             # (b, N, D)
        mass = grp.mass[:, P:] if grp.mass is not None else z.new_ones(z.shape[:2], dtype=torch.float32)
        if keep is None:
            s, m, a, zs, mu = self(z, mass, k, w, seeds, zs, ctx.grid, slots)        # (b, K, D), (b, K), (b, N, K)
        else:
            s, m, a, zs, mu = self._keep_and_condense(z, mass, k, w, seeds, zs, ctx, keep)
        ctx.cluster_terms.append((zs, mu, self.temperature))
        return grp.replace(x=torch.cat([grp.x[:, :P], s], dim=1),                    # (b, P+K, D)
                           mass=torch.cat([m.new_ones(m.shape[0], P), m], dim=1),    # (b, P+K)
                           assign=grp.assign + (a,),
                           skips=grp.skips + (((z, s) if ctx.dense else None),),     # for unpool='skip'
                           prop_attn=ctx.prop_attn, saliency=None)

    def _keep_and_condense(self, z, mass, k: int, w, seeds, zs, ctx: Context, keep: tuple):
        """``keep_salient``: the salient patches ``keep[0]`` become super-tokens 0..n-1 as they are
        (mass and all); the others ``keep[1]`` are clustered (eqs. 2-3) into slots n..K-1. zs and
        seeds are the clustered patches' own. The returned assignment covers every patch, (b, N, K)."""
        top, rest = keep                                                             # (b, n), (b, N-n)
        b, N, n = z.shape[0], z.shape[1], top.shape[1]
        s, m, a, zs, mu = self(gather_tokens(z, rest), mass.gather(1, rest), k - n,
                               None if w is None else w.gather(1, rest), seeds, zs, ctx.grid)  # (b, K-n, ...)
        s = torch.cat([gather_tokens(z, top), s], dim=1)                               # (b, K, D)
        m = torch.cat([mass.gather(1, top).float(), m], dim=1)                       # (b, K)
        a_top = a.new_zeros(b, N, n).scatter(1, top.unsqueeze(1), 1.0)               # (b, N, n) one-hot
        a_rest = a.new_zeros(b, N, k - n).scatter(1, rest.unsqueeze(-1).expand(-1, -1, k - n), a)  # (b, N, K-n)
        return s, m, torch.cat([a_top, a_rest], dim=-1), zs, mu

    def _condense_padded(self, grp: Group, ks: torch.Tensor, w, zs, ctx: Context) -> Group:
        """Per-image K without a look at ``ks`` on the host: every image condensed into ``pad_k``
        slots, the first ``ks[b]`` in use (nested farthest points: those are its own centres), the
        rest empty (no token, mass 0) and masked out of attention (``Group.valid``). Each image's
        output is what its own K gives; images above ``pad_k`` are capped at it."""
        P, k = self.num_prefix, min(self.pad_k, grp.x.shape[1] - self.num_prefix)
        ctx.num_clusters[grp.index, self.stage] = ks.clamp_max(k)
        slots = torch.arange(k, device=ks.device) < ks.unsqueeze(1)                  # (b, K) bool
        g = self._condense_group(grp, k, w, self.seed_points(grp.x[:, P:], k, zs), zs, ctx, slots)
        return g.replace(valid=torch.cat([slots.new_ones(slots.shape[0], P), slots], dim=1))  # (b, P+K)

    def plan(self, ks: torch.Tensor, n: int) -> list:
        """[(K, rows of the group or None for all)]. Fixed K needs no look at ``ks`` (no host
        sync), which keeps ``torch.compile`` graphs whole and makes ONNX export possible."""
        if not self.dynamic:
            return [(min(self.fixed_k if self.fixed_k is not None else self.k_max, n), None)]
        values = torch.unique(ks).tolist()
        if len(values) == 1:
            return [(values[0], None)]
        return [(k, torch.nonzero(ks == k).squeeze(1)) for k in values]


class FusionStage(CrossModalTokenFusion):
    """Eqs. 8-10 on every group, with each image's own guidance tokens; skipped without guidance."""

    def forward_groups(self, groups: List[Group], ctx: Context) -> List[Group]:
        g: Optional[torch.Tensor] = ctx.guidance                                     # (B, M, D) or None
        if g is None:
            return groups
        return [grp.replace(x=self(grp.x, g[grp.index])) for grp in groups]


def embed_source(embed: nn.Module, name: Optional[str], g: torch.Tensor, batch: int, width: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """One guidance source's raw tokens (M, Dg) or (B, M, Dg) -> (B, M, D) through its projection
    (``embed``: one projection, or a ModuleDict by source name); errors name the source."""
    what = "guidance" if name is None else f"guidance[{name!r}]"
    if isinstance(embed, nn.ModuleDict):
        if name not in embed:
            raise ValueError(f"unknown guidance source {name!r}; this model was built for {sorted(embed)}")
        proj = embed[name]
    elif name is not None:
        raise ValueError(f"this model takes one guidance tensor, not named sources (got {name!r}); "
                         "build it with guidance_dim={name: width} for several sources")
    else:
        proj = embed
    if g.dim() == 2:
        g = g.unsqueeze(0).expand(batch, -1, -1)
    if g.dim() != 3 or g.shape[0] != batch:
        raise ValueError(f"{what} must be (M, Dg) or (B={batch}, M, Dg), got {tuple(g.shape)}")
    expected = proj.in_features if isinstance(proj, nn.Linear) else width
    if g.shape[-1] != expected:
        raise ValueError(f"{what} width {g.shape[-1]} != guidance_dim {expected} of this model")
    return proj(g.to(dtype))                                                         # (B, M, D)
