"""Dynamic Token Clustering, DTC (paper 3.2, eqs. 2-3; DESIGN.md §1).

Tokens ``z`` (B, N, D) are assigned to ``K`` cluster centres and condensed into ``K``
super-tokens. ``K`` is chosen per image from a complexity score; the model groups images by
``K`` so that each group runs as one dense batch. With ``train_k='batch'`` a training batch
takes one K, its images' mean (per-image groups cost more time than their tokens save on a CPU);
inference keeps per-image K.

Where the centres come from (``centers``):

- ``'learned'`` (the paper): the first ``K`` of ``K_max`` learned centroids, shared by every
  image (nested prefix, so cluster ``k`` means the same thing in every image);
- ``'fps'``: each image's own tokens, picked by farthest-point sampling in the assignment space
  (TCFormer and Token Pooling cluster each image's own tokens; FPS is their cheapest spread-out
  seeding), then ``iters`` k-means steps. Every centre is a token of the image, so no slot
  starts empty, and FPS prefixes are nested too: the first ``K'`` picks are the FPS seeding
  for ``K'``;
- ``'grid'``: the mean token of each cell of an ``a x b`` grid laid over the patch grid
  (``a * b = K``), then ``iters`` k-means steps: Hourglass's token clustering and SLIC superpixels
  start this way; no sequential loop (FPS is one step per centre), and every centre starts where
  its cell is. First stage only (later stages' tokens are not on a grid).

``window`` (grid centres only; not in the paper) makes the clustering local as Hourglass's is: a
patch may join only the centres within ``window // 2`` cells (rows and columns) of the grid cell it
lies in, a hard form of ``spatial``'s soft pull.

``spatial > 0`` (not in the paper; SLIC superpixels' compactness term) adds each token's patch-grid
position to the assignment space, so that distances grow with how far apart two tokens lie in
the image as well as how different they look (:meth:`DynamicTokenClustering.place`).

``assign='soft'`` is eq. 2's softmax at temperature ``tau``; ``'hard'`` assigns each token to
its nearest centre (one-hot in the forward pass, eq. 2's soft gradient in the backward pass:
straight-through), so a super-token is the mean of a disjoint set of patches.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

REF_WIDTH = 384  # DeiT-S, the width of the paper's main model: tau = 150 is calibrated there


def normed_space(z: torch.Tensor) -> torch.Tensor:
    """LayerNorm'd tokens (float32) scaled so that each has squared norm ``REF_WIDTH`` whatever
    the width D: distances, and so one ``tau``, mean the same at every width. (..., D)."""
    D = z.shape[-1]
    return F.layer_norm(z.float(), (D,)) * math.sqrt(REF_WIDTH / D)  # constants: exportable


def soft_assign(z: torch.Tensor, mu: torch.Tensor, tau: float, slots: Optional[torch.Tensor] = None,
                local: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2: ``a_ik = softmax_k(-||z_i - mu_k||^2 / tau)``, in float32 even under autocast.

    z: (B, N, D); mu: (K, D) shared or (B, K, D) per image; slots: optional (B, K) bool, False on
    an image's unused slots (``pad_k``), which then get no token (their distance is +inf); local:
    optional (N, K) bool, False where token i may not join centre k (``window``).
    Returns (a, d2), both (B, N, K).
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, mu = z.float(), mu.float()
        # ||z||^2 - 2 z.mu + ||mu||^2 avoids materialising (B, N, K, D)
        zz = z.pow(2).sum(-1, keepdim=True)                                       # (B, N, 1)
        mm = mu.pow(2).sum(-1)                                                    # (K,) or (B, K)
        mm = mm.unsqueeze(-2) if mu.dim() == 3 else mm                            # (B, 1, K) or (K,)
        d2 = (zz - 2 * torch.matmul(z, mu.transpose(-1, -2)) + mm).clamp_min(0)  # (B, N, K)
        if slots is not None:
            d2 = d2.masked_fill(~slots.unsqueeze(1), float("inf"))                  # (B, N, K)
        if local is not None:
            d2 = d2.masked_fill(~local, float("inf"))                                # (B, N, K)
        return torch.softmax(-d2 / tau, dim=-1), d2


def condense(z: torch.Tensor, a: torch.Tensor, mass: torch.Tensor, normalize: bool = True,
             weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 super-tokens and their mass.

    ``normalize=True``: mass-weighted mean ``s_k = sum_i a_ik m_i z_i / m_k`` with
    ``m_k = sum_i a_ik m_i`` (tokens entering the first stage have ``m_i = 1``, so this is
    eq. 3 divided by the cluster mass). ``normalize=False``: eq. 3 literally, ``s_k = sum_i a_ik z_i``.
    ``weights`` (B, N), e.g. saliency, reweight the mean but not the carried mass (a patch count).
    z: (B, N, D), a: (B, N, K), mass: (B, N). Returns s (B, K, D) in z's dtype, m (B, K) float32.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        zf, a, mass = z.float(), a.float(), mass.float()
        m_new = torch.einsum("bnk,bn->bk", a, mass)                                  # (B, K)
        if normalize:
            w = mass if weights is None else mass * weights.float().clamp_min(1e-6)  # (B, N)
            aw = a * w.unsqueeze(-1)                                                 # (B, N, K)
            s = torch.einsum("bnk,bnd->bkd", aw, zf) / aw.sum(1).clamp_min(1e-6).unsqueeze(-1)  # (B, K, D)
        else:
            s = torch.einsum("bnk,bnd->bkd", a, zf)                                  # (B, K, D)
    return s.to(z.dtype), m_new


def assign(zs: torch.Tensor, mu: torch.Tensor, tau: float, hard: bool,
           slots: Optional[torch.Tensor] = None, local: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 2 (``hard=False``) or its straight-through hard form: one-hot nearest centre forward,
    the softmax's gradient backward. zs: (B, N, D), mu: (K, D) or (B, K, D), slots: optional
    (B, K) bool of the slots in use, local: optional (N, K) bool of the centres each token may join.
    Returns (B, N, K)."""
    a, d2 = soft_assign(zs, mu, tau, slots, local)                                   # (B, N, K)
    if not hard:
        return a
    one_hot = F.one_hot(d2.argmin(-1), d2.shape[-1]).to(a.dtype)                     # (B, N, K)
    return one_hot + a - a.detach() if a.requires_grad else one_hot


def grid_shape(k: int, h: int, w: int) -> tuple:
    """The ``a x b = k`` grid closest in aspect to the ``h x w`` patch grid (divisors of ``k``;
    ``k = 24`` on 7 x 7 gives 4 x 6)."""
    pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0]
    return min(pairs, key=lambda ab: (round(abs(math.log(ab[0] * w / (ab[1] * h))), 9), ab[0]))  # ties: wider


def grid_centers(zs: torch.Tensor, k: int, grid: tuple) -> torch.Tensor:
    """The mean point of each cell of a ``grid_shape(k, h, w)`` grid over the patch grid, raster order.
    zs: (B, N, D) with N = h * w. Returns (B, K, D)."""
    h, w = grid
    B, N, D = zs.shape
    if N != h * w:
        raise ValueError(f"centers='grid' needs the tokens on the {h}x{w} patch grid, got {N} tokens: "
                         "grid centres work at the first DTC stage only")
    a, b = grid_shape(k, h, w)
    img = zs.transpose(1, 2).reshape(B, D, h, w)                                     # (B, D, h, w)
    return F.adaptive_avg_pool2d(img, (a, b)).flatten(2).transpose(1, 2)            # (B, K, D)


def grid_cells(k: int, grid: tuple, device) -> torch.Tensor:
    """(N,) the cell of the ``grid_shape(k, h, w)`` centre grid that each patch of the (h, w) patch
    grid lies in (nearest-neighbour labels, raster order): where its centre starts."""
    h, w = grid
    a, b = grid_shape(k, h, w)
    cells = torch.arange(a * b, device=device, dtype=torch.float32).view(1, 1, a, b)
    return F.interpolate(cells, size=(h, w), mode="nearest").flatten().long()       # (N,)


def window_mask(k: int, grid: tuple, window: int, device) -> torch.Tensor:
    """(N, K) True where patch i may join centre k: within ``window // 2`` cells, in rows and in
    columns, of the cell it starts in (Hourglass's local clustering, Liang et al. 2022)."""
    a, b = grid_shape(k, *grid)
    start = grid_cells(k, grid, device)                                              # (N,)
    cell = torch.arange(a * b, device=device)                                        # (K,)
    r = window // 2
    near_row = (start[:, None] // b - cell[None] // b).abs() <= r                     # (N, K)
    near_col = (start[:, None] % b - cell[None] % b).abs() <= r                       # (N, K)
    return near_row & near_col


def token_positions(grid: tuple, assigns: tuple, device: torch.device) -> torch.Tensor:
    """Where the tokens entering a stage sit on the patch grid, in patch units (row, col).

    Patches sit on the ``grid`` (h, w) in raster order; a super-token sits at the mass-weighted
    mean position of what it condensed, ``p_k = sum_i a_ik m_i p_i / sum_i a_ik m_i`` (eq. 3's mean
    applied to positions), stage after stage along ``assigns`` (each (b, N_in, N_out)).
    Returns (N, 2) before any stage, (b, K, 2) after one."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([rows, cols], -1).reshape(h * w, 2).float()                    # (N, 2)
    mass = None
    for a in assigns:
        a = a.float()                                                                # (b, N_in, N_out)
        aw = a if mass is None else a * mass.unsqueeze(-1)                           # (b, N_in, N_out)
        mass = aw.sum(1)                                                             # (b, N_out)
        pos = torch.einsum("bnk,...nc->bkc", aw, pos) / mass.clamp_min(1e-6).unsqueeze(-1)  # (b, N_out, 2)
    return pos


@torch.no_grad()
def farthest_points(zs: torch.Tensor, k: int) -> torch.Tensor:
    """Farthest-point sampling per image: indices (B, k) of ``k`` tokens of zs (B, N, D), each
    the token farthest from those already picked. The first pick is the token farthest from the
    image's mean token (its most distinctive one), so the result is deterministic."""
    B, N, _ = zs.shape
    # squared distances (same picks as distances) by ||a||^2 - 2 a.b + ||b||^2: torch.cdist has no
    # ONNX export, and for N > 25 it computes this very product anyway
    sq = zs.pow(2).sum(-1)                                                           # (B, N)
    dist = (sq.unsqueeze(2) - 2 * zs @ zs.transpose(1, 2) + sq.unsqueeze(1)).clamp_min(0)  # (B, N, N)
    cur = (zs - zs.mean(1, keepdim=True)).pow(2).sum(-1).argmax(-1)                  # (B,)
    dmin = zs.new_full((B, N), float("inf"))                                         # (B, N)
    picks = []
    for _ in range(k):
        picks.append(cur)
        row = torch.gather(dist, 1, cur.view(B, 1, 1).expand(B, 1, N)).squeeze(1)    # (B, N)
        dmin = torch.minimum(dmin, row)
        cur = dmin.argmax(-1)
    return torch.stack(picks, 1)                                                     # (B, k)


def kmeans_pp(points: torch.Tensor, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """k-means++ seeding: ``k`` rows of ``points`` (P, D), each next one drawn with probability
    proportional to its squared distance to the nearest chosen row. The order is meaningful:
    every prefix is itself a spread-out seeding, which is what the nested centroids need."""
    P = points.shape[0]
    idx = torch.empty(k, dtype=torch.long, device=points.device)
    idx[0] = torch.randint(P, (1,), generator=generator, device=points.device)
    d2 = (points - points[idx[0]]).pow(2).sum(-1)                                    # (P,)
    for j in range(1, k):
        w = d2.clamp_min(0)
        if w.sum() <= 0:  # fewer distinct points than k: fall back to uniform picks
            w = torch.ones_like(w)
        idx[j] = torch.multinomial(w, 1, generator=generator)
        d2 = torch.minimum(d2, (points - points[idx[j]]).pow(2).sum(-1))
    return points[idx]


class DynamicTokenClustering(nn.Module):
    """Soft k-means condensation with per-image K (one DTC stage)."""

    def __init__(self, dim: int, *, k_min: int, k_max: int, k_step: int = 8, tau: float = 150.0,
                 iters: int = 0, normalize: bool = True, complexity: str = "variance",
                 dynamic: bool = True, train_k: str = "batch", budget_jitter: float = 0.0, stat_momentum: float = 0.1,
                 assign_norm: bool = True, k_mid: Optional[int] = None, centers: str = "learned",
                 hard: bool = False, spatial: float = 0.0, learn_tau: bool = False, assign_grad: bool = True,
                 window: Optional[int] = None, infer_k_step: Optional[int] = None):
        super().__init__()
        if not 1 <= k_min <= k_max:
            raise ValueError(f"Invalid K range [{k_min}, {k_max}]; allowed: 1 <= k_min <= k_max.")
        if k_mid is not None and not k_min < k_mid < k_max:
            raise ValueError(f"Invalid value for 'k_mid': {k_mid!r}; allowed: k_min < k_mid < k_max ({k_min}, {k_max}).")
        if not tau > 0 or iters < 0 or k_step < 1 or (infer_k_step is not None and infer_k_step < 1):
            raise ValueError(f"Invalid tau={tau!r}, iters={iters!r}, k_step={k_step!r} or infer_k_step={infer_k_step!r}; "
                             "allowed: tau > 0, iters >= 0, k_step >= 1, infer_k_step None or >= 1.")
        if centers not in ("learned", "fps", "grid"):
            raise ValueError(f"Invalid value for 'centers': {centers!r}; allowed: 'learned', 'fps' or 'grid'.")
        if complexity not in ("variance", "entropy", "saliency"):
            raise ValueError(f"Invalid value for 'complexity': {complexity!r}; allowed: 'variance', "
                             "'entropy' or 'saliency'.")
        if train_k not in ("image", "batch"):
            raise ValueError(f"Invalid value for 'train_k': {train_k!r}; allowed: 'image' or 'batch'.")
        if not spatial >= 0 or (spatial > 0 and centers == "learned"):
            raise ValueError(f"Invalid value for 'spatial': {spatial!r}; allowed: >= 0, and > 0 only with "
                             "centers='fps' or 'grid' (learned centroids have no position)")
        if not assign_grad and (centers == "learned" or learn_tau):
            raise ValueError("assign_grad=False: learned centroids and a learned tau learn through the assignment's "
                             "gradient; use centers='fps' or 'grid' and a fixed tau")
        if window is not None and (centers != "grid" or not isinstance(window, int) or window < 1 or window % 2 == 0):
            raise ValueError(f"Invalid value for 'window': {window!r}; allowed: None, or an odd integer >= 1 with "
                             "centers='grid' (a window counts cells of the centre grid)")
        if complexity == "entropy" and centers != "learned":
            raise ValueError("complexity='entropy' measures usage of the learned centroids: it needs centers='learned'")
        self.dim, self.k_min, self.k_max, self.k_step = dim, k_min, k_max, k_step
        # per-image K's grid at inference; training keeps k_step (the batch K's grid). A coarser grid puts a
        # batch's images into fewer K groups (fewer, larger batches through the condensed blocks)
        self.infer_k_step = infer_k_step
        self.tau, self.iters, self.normalize = tau, iters, normalize
        self.complexity, self.dynamic, self.budget_jitter = complexity, dynamic, budget_jitter
        self.train_k = train_k
        self.stat_momentum, self.assign_norm = stat_momentum, assign_norm
        self.centers, self.hard, self.spatial = centers, hard, spatial
        self.assign_grad = assign_grad  # False: clustering as a fixed pooling (no gradient through eq. 2)
        self.window = window  # grid centres: a token joins only the centres within window // 2 cells of its own
        # learn_tau: tau = exp(log_tau), trained with the rest (log: stays positive, and a step
        # scales tau by a factor rather than shifting it); ``tau`` is then its starting value
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau))) if learn_tau else None
        # per-image centres own no parameter: a model without one has none that gets no gradient
        # A fresh model's centroids are the same in every process whatever the global RNG (DDP
        # broadcasts nothing it does not have to): random points of the assignment space from a
        # fixed generator; init_centroids re-seeds them from data (k-means++), explicitly.
        self.centroids = (nn.Parameter(self._fixed_centroids(k_max, dim, assign_norm))
                          if centers == "learned" else None)                                # (K_max, D)
        # the sigmoid's offset that puts an average image (score 0) at k_mid instead of mid-range
        self.k_mid = k_mid
        self.bias0 = 0.0 if k_mid is None else math.log((k_mid - k_min) / (k_max - k_mid))
        # Persistent: whether the centroids were seeded from data; the complexity statistics.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("c_mean", torch.zeros(()))
        self.register_buffer("c_var", torch.ones(()))
        self.register_buffer("stats_seen", torch.zeros((), dtype=torch.bool))
        # Inference-time budget knobs (set by model.set_token_budget), not part of the weights.
        self.budget_bias = 0.0
        self.fixed_k: Optional[int] = None
        self.last_score: Optional[torch.Tensor] = None

    @staticmethod
    def _fixed_centroids(k: int, dim: int, assign_norm: bool) -> torch.Tensor:
        c = torch.randn(k, dim, generator=torch.Generator().manual_seed(0))                  # (K_max, D)
        # in the LayerNorm'd space every token has squared norm REF_WIDTH: put the centroids there too
        return F.layer_norm(c, (dim,)) * math.sqrt(REF_WIDTH / dim) if assign_norm else 0.02 * c

    @property
    def temperature(self):
        """eq. 2's tau: the fixed float, or the learned exp(log_tau) (a 0-dim tensor)."""
        return self.tau if self.log_tau is None else self.log_tau.exp()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, k=[{self.k_min}, {self.k_max}] step {self.k_step}"
                + (f" (inference {self.infer_k_step})" if self.infer_k_step else "") + f", tau={self.tau}, "
                f"iters={self.iters}, centers={self.centers}, hard={self.hard}, complexity={self.complexity}, "
                f"dynamic={self.dynamic}, train_k={self.train_k}" + (f", spatial={self.spatial}" if self.spatial else "")
                + (", learned tau" if self.log_tau is not None else "") + (f", window={self.window}" if self.window else ""))

    def assignment_space(self, z: torch.Tensor) -> torch.Tensor:
        """The space in which distances are measured (float32).

        ``assign_norm``: LayerNorm'd tokens scaled to the paper's DeiT-S width, so every token has
        squared norm ``REF_WIDTH`` whatever the model's width or the stage of training, and
        ``tau = 150`` is as sharp at width 96 or 768 as at 384 (docs/model.md)."""
        z = z.float()
        if not self.assign_norm:
            return z
        return normed_space(z)

    def place(self, zs: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The assignment space with each token's position appended, (B, N, D + 2): the squared
        distance of two tokens grows by ``spatial * REF_WIDTH * ||p_i - p_j||^2 / S^2``, ``S =
        sqrt(N / k_ref)`` the side of an average cluster in patches (``k_ref``: ``k_mid``, else
        mid-range), as SLIC weighs position against colour. At ``spatial = 1`` two tokens one
        cluster side apart are as far as two orthogonal ones are half-way. zs: (B, N, D) from
        :meth:`assignment_space`; pos: (N, 2) or (B, N, 2) from :func:`token_positions`."""
        if not self.spatial:
            return zs
        N = zs.shape[1]
        k_ref = self.k_mid if self.k_mid is not None else (self.k_min + self.k_max) / 2
        scale = math.sqrt(self.spatial * REF_WIDTH * min(k_ref, N) / N)              # sqrt(spatial * REF_WIDTH) / S
        pos = (pos * scale).to(zs.dtype).expand(zs.shape[0], N, 2)                   # (B, N, 2)
        return torch.cat([zs, pos], dim=-1)                                          # (B, N, D + 2)

    @torch.no_grad()
    def init_centroids(self, tokens: torch.Tensor, max_points: int = 8192, seed: int = 0) -> None:
        """Seed the centroids by k-means++ on real tokens (any shape (..., D)), so that no
        cluster starts empty. Seeded generator: every process picks the same rows of the same data.
        Per-image centres (``centers='fps'``) have nothing to seed."""
        if self.centroids is None:
            return
        pts = self.assignment_space(tokens.reshape(-1, self.dim))
        pts = pts[torch.isfinite(pts).all(1)]  # a NaN image must not poison every centroid
        if pts.shape[0] < self.k_max:
            raise ValueError(f"init_clusters: {pts.shape[0]} finite tokens for {self.k_max} centroids: "
                             "the calibration images are non-finite or too few")
        g = torch.Generator(device=pts.device).manual_seed(seed)
        if pts.shape[0] > max_points:
            pts = pts[torch.randperm(pts.shape[0], generator=g, device=pts.device)[:max_points]]
        self.centroids.copy_(kmeans_pp(pts, self.k_max, g).to(self.centroids.dtype))
        self.initialized.fill_(True)

    # --- per-image K ------------------------------------------------------------------------
    def complexity_score(self, z: torch.Tensor, weights: Optional[torch.Tensor] = None,
                         zs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw complexity ``c`` per image, (B,). z: (B, N, D); weights: (B, N) saliency or None;
        zs: ``assignment_space(z)`` when the caller has it already."""
        zs = self.assignment_space(z) if zs is None else zs                                     # (B, N, D)
        if self.complexity == "variance":  # per-feature variance over the tokens, averaged over features
            # (an elementwise pass and one reduction: torch.var over dim 1 took 2.6 ms of a 60 ms nano forward)
            return (zs - zs.mean(1, keepdim=True)).pow(2).mean((1, 2))                 # (B,)
        if self.complexity == "entropy":
            a, _ = soft_assign(zs, self.centroids, self.temperature)                 # (B, N, K_max)
            p = a.mean(1)                                                            # (B, K_max) cluster usage
            return -(p * p.clamp_min(1e-12).log()).sum(-1)
        if self.complexity != "saliency":
            raise ValueError(f"Invalid value for 'complexity': {self.complexity!r}; allowed: 'variance', "
                             "'entropy' or 'saliency'.")
        # 'saliency': the saliency-weighted variance. Missing guidance (no weights) degrades to
        # uniform weights, i.e. the plain variance score, so a model trained with saliency still runs.
        w = weights.float().clamp_min(0) if weights is not None else zs.new_ones(zs.shape[:2])
        w = w / w.sum(1, keepdim=True).clamp_min(1e-12)                              # (B, N)
        mean = (w.unsqueeze(-1) * zs).sum(1, keepdim=True)                            # (B, 1, D)
        return (w.unsqueeze(-1) * (zs - mean).pow(2)).sum(1).mean(-1)                 # (B,)

    def k_from_score(self, score: torch.Tensor, bias: float) -> torch.Tensor:
        """``K = clamp(round_to(k_step, K_min + (K_max - K_min) * sigmoid(score + bias0 + bias)))``, (B,);
        ``bias0 = log((k_mid - K_min) / (K_max - k_mid))`` puts an average image (score 0) at ``k_mid``.
        At inference the grid is ``infer_k_step`` when set, once the model has complexity statistics."""
        score = torch.nan_to_num(score, nan=0.0)  # a broken score must not give a negative K
        k = self.k_min + (self.k_max - self.k_min) * torch.sigmoid(score + self.bias0 + bias)
        if self.training or self.infer_k_step is None:
            k = torch.round(k / self.k_step) * self.k_step
        else:  # a model with no statistics puts every image at k_mid: keep it there (the grid of 8 would round
            #    the nano default's 20 to 16), as its trained models average it. A select: no host sync
            k = torch.where(self.stats_seen, torch.round(k / self.infer_k_step) * self.infer_k_step,
                            torch.round(k / self.k_step) * self.k_step)
        return k.clamp(self.k_min, self.k_max).long()

    def num_clusters(self, z: torch.Tensor, weights: Optional[torch.Tensor] = None,
                     zs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """K per image, (B,) long. Updates the running statistics of ``c`` in training."""
        B, N = z.shape[:2]
        if not self.dynamic:
            k = self.fixed_k if self.fixed_k is not None else self.k_max
            return torch.full((B,), min(k, N), dtype=torch.long, device=z.device)
        with torch.no_grad():
            c = self.complexity_score(z, weights, zs)                                # (B,)
            cf = c[torch.isfinite(c)] if self.training else c  # a NaN image must not poison the statistics
            if self.training and cf.numel():
                m, v = cf.mean(), cf.var(unbiased=False)
                if not bool(self.stats_seen):
                    self.c_mean.copy_(m)
                    self.c_var.copy_(v if cf.numel() > 1 else torch.ones_like(v))
                    self.stats_seen.fill_(True)
                else:
                    mom = self.stat_momentum
                    self.c_mean.mul_(1 - mom).add_(mom * m)
                    self.c_var.mul_(1 - mom).add_(mom * v)
            # no statistics yet (never trained): every image gets the mid-range budget. A select,
            # not an `if`: reading the flag back would sync the host (pad_k's one graph)
            score = torch.where(self.stats_seen, (c - self.c_mean) / (self.c_var.sqrt() + 1e-6),
                                torch.zeros_like(c))                                 # (B,)
            if not torch.compiler.is_exporting():  # an attribute set in a traced forward is a side effect
                self.last_score = score
            bias = self.budget_bias
            if self.training and self.budget_jitter > 0:
                # one shift per batch: every budget gets trained, and the nested centroids make it valid
                bias = bias + (torch.rand(()).item() * 2 - 1) * self.budget_jitter
            k = self.k_from_score(score, bias)                                       # (B,)
            if self.training and self.train_k == "batch":
                # one K for the batch (its images' mean, on the k_step grid): one dense group
                # instead of one per K value; inference keeps per-image K
                k = self.k_from_mean(k)
            return k.clamp_max(N)

    def k_from_mean(self, k: torch.Tensor) -> torch.Tensor:
        """Every image at the mean of ``k`` (B,), rounded to the k_step grid and the K range, (B,)."""
        kb = torch.round(k.float().mean() / self.k_step) * self.k_step
        return kb.clamp(self.k_min, self.k_max).long().expand_as(k)

    # --- condensation -------------------------------------------------------------------------
    def seed_points(self, z: torch.Tensor, k: int, zs: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Farthest-point indices (B, k) of each image's tokens z (B, N, D), or None unless
        ``centers='fps'``. FPS prefixes are nested, so one call at the largest K of a batch serves every
        group of it (``forward(seeds=idx[rows, :K])``): one sequential loop per batch, not per K."""
        if self.centers != "fps":
            return None
        return farthest_points(self.assignment_space(z) if zs is None else zs, k)

    def initial_centers(self, zs: torch.Tensor, k: int, seeds: Optional[torch.Tensor] = None,
                        grid: Optional[tuple] = None) -> torch.Tensor:
        """The nested prefix of the learned centroids (K, D), or each image's own farthest-point
        tokens or grid-cell means (B, K, D); zs: (B, N, D) in the assignment space; seeds: (B, >= K)
        FPS indices; grid: the (h, w) patch grid, for ``centers='grid'``."""
        if self.centroids is not None:
            return self.centroids[:k]                                                # (K, D)
        if self.centers == "grid":
            if grid is None:
                raise ValueError("centers='grid' needs the patch grid: pass grid=(h, w)")
            return grid_centers(zs, k, grid)                                         # (B, K, D)
        idx = farthest_points(zs, k) if seeds is None else seeds[:, :k]              # (B, K)
        return torch.gather(zs, 1, idx.unsqueeze(-1).expand(-1, -1, zs.shape[-1]))   # (B, K, D)

    def forward(self, z: torch.Tensor, mass: torch.Tensor, k: int, weights: Optional[torch.Tensor] = None,
                seeds: Optional[torch.Tensor] = None, zs: Optional[torch.Tensor] = None,
                grid: Optional[tuple] = None, slots: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Condense the tokens of images that all use ``k`` clusters.

        z: (B, N, D) tokens, mass: (B, N) their mass, weights: optional (B, N) saliency that
        scales each token's mass in the weighted mean, seeds: optional (B, >= K) farthest-point
        indices from :meth:`seed_points` (computed here otherwise), zs: optional ``assignment_space(z)``
        (the three calls of a stage share one; computed here otherwise), grid: the (h, w) patch grid
        (``centers='grid'``), slots: optional (B, K) bool, False on the slots an image does not
        use (``pad_k``: they get no token, mass 0 and a zero super-token). Returns ``s`` (B, K, D) super-tokens,
        ``m`` (B, K) their mass, ``a`` (B, N, K) assignment (for unpooling ``Z_rec = a @ s``),
        and ``zs`` (B, N, D), ``mu`` ((K, D) or (B, K, D)), the points and centroids of eq. 14.
        """
        if zs is None and self.spatial:
            raise ValueError("spatial > 0 clusters by position too: pass zs=self.place(self.assignment_space(z), "
                             "token_positions(...)) (ClusterStage does)")
        zs = self.assignment_space(z) if zs is None else zs                                     # (B, N, D)
        with torch.set_grad_enabled(self.assign_grad and torch.is_grad_enabled()):
            mu = self.initial_centers(zs, k, seeds, grid)                            # (K, D) or (B, K, D)
            tau = self.temperature
            local = window_mask(k, grid, self.window, zs.device) if self.window else None  # (N, K) or None
            a = assign(zs, mu, tau, self.hard, slots, local)                         # (B, N, K)
            for _ in range(self.iters):  # differentiable k-means steps, per image
                mu = torch.einsum("bnk,bnd->bkd", a, zs) / a.sum(1).clamp_min(1e-6).unsqueeze(-1)  # (B, K, D)
                a = assign(zs, mu, tau, self.hard, slots, local)
        s, m = condense(z, a, mass, self.normalize, weights)                        # (B, K, D), (B, K)
        return s, m, a, zs, mu

