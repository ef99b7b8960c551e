"""Centroid lookup, plain-torch reference: which clusters of the fixed context each query block needs.

Rule (Squeezed Attention): for query q and cluster c with centroid mu_c and n_c keys, each key of
c is estimated to get softmax share  exp(s q.mu_c) / sum_j n_j exp(s q.mu_j).  In log space:
    log_share_c = s q.mu_c - logsumexp_j(s q.mu_j + log n_j)        (empty clusters: -inf)
A (batch row, KV head, query block) keeps c when the max of log_share_c over the block's queries
and the GQA group's query heads exceeds the threshold (strictly). Budget mode instead ranks the
clusters by that max and keeps the best ones while their total size fits the key budget.

Cluster variance: centroids with 2D columns hold [mean mu_c, per-channel variance var_c] of
the cluster's keys; the lookup then scores  s q.mu_c + s^2/2 sum_d q_d^2 var_cd  (the log-mean-exp
of exp(s q.k) over a Gaussian cluster) by scoring the augmented query [q, s/2 q^2] (see
lookup_queries); every rule below is unchanged.

Hierarchical: the coarse level is scored first with the same rule, always by threshold (coarse
sizes = keys under each coarse cluster; fine clusters are stored grouped by coarse parent, so a
coarse cluster's children are a contiguous range). Only the children of kept coarse clusters are
scored and can be kept; pruned coarse clusters stand for their children in the fine denominator
by their coarse term s q.mu_k + log n_k. A coarse threshold of +inf keeps nothing (only the
always-attended keys remain), -inf keeps every non-empty coarse cluster (then the rule is the
flat one).

Error-bounded mode (max_dropped_mass = eps > 0; HSR-style certified reporting): per query, every
key of cluster c has logit <= U_c = s (q.mu_c + |q| r_c) (r_c: the cluster's radius), and the
cluster's partition sum_k exp(s q.k) >= n_c exp(s q.mu_c) (Jensen). Clusters are kept in
descending order of n_c exp(U_c) until the dropped ones' bound R = sum n_c exp(U_c) satisfies
R / (R + kept lower bounds + Z_rest) <= eps, with Z_rest the exact partition of the always
attended and new keys. The true dropped softmax mass is then <= eps (x / (x + z) grows with x
and falls with z). A block keeps the union of its queries' and heads' sets.

Output (fixed size, no host sync): idx [B, H, NB, C] int32 listing the kept clusters in ascending
order, padded with -1; count [B, H, NB] int32.
"""
from __future__ import annotations

import torch


def cluster_sizes(offsets: torch.Tensor) -> torch.Tensor:
    """[..., C+1] int offsets -> [..., C] sizes."""
    return offsets[..., 1:] - offsets[..., :-1]


def pick_threshold(log_threshold: torch.Tensor | None, m: int) -> torch.Tensor | None:
    """The [1] threshold that applies to m query tokens: a context's [decode, prefill] pair gives
    column 0 for decode (m == 1) and column 1 for prefill; a 0-d or [1] threshold applies to both.
    (Dynamo specialises m == 1 anyway, so the branch adds no guard a model did not have.)"""
    if log_threshold is None:
        return None
    t = log_threshold.reshape(-1)
    return t[:1] if t.numel() == 1 or m == 1 else t[1:2]


def lookup_queries(q: torch.Tensor, width: int, scale: float) -> torch.Tensor:
    """The vectors the lookup scores against centroids `width` columns wide: q itself, or for
    [mean, variance] centroids (width 2D) the augmented [q, scale/2 * q^2], so that
    scale * (q_aug . [mu, var]) = s q.mu + s^2/2 sum_d q_d^2 var_d."""
    d = q.shape[-1]
    if width == d:
        return q
    if width != 2 * d:
        raise ValueError(f"sqz: centroids have {width} columns; the queries' head dim {d} needs {d} "
                         f"(means) or {2 * d} (means and variances): wrong model for this context?")
    return torch.cat([q, q * q * (0.5 * scale)], dim=-1)


def block_max(x: torch.Tensor, block_q: int) -> torch.Tensor:
    """[B, H, G, M, C] -> [B, H, NB, C]: max over the group's heads and each block of queries."""
    b, h, g, m, c = x.shape
    nb = -(-m // block_q)
    pad = nb * block_q - m
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad), value=float("-inf"))
    return x.reshape(b, h, g, nb, block_q, c).amax(dim=(2, 4))


def _compact(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [..., C] -> (ascending kept indices padded with -1, counts), both int32."""
    c = sel.shape[-1]
    count = sel.sum(-1, dtype=torch.int32)
    # Stable sort puts kept clusters first, each group in ascending index order.
    order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    pos = torch.arange(c, device=sel.device, dtype=torch.int32)
    idx = torch.where(pos < count.unsqueeze(-1), order, torch.full_like(order, -1))
    return idx, count


def log_share(scores: torch.Tensor, log_n: torch.Tensor) -> torch.Tensor:
    """scores [..., C] (s q.mu), log_n broadcastable [..., C] -> log shares, -inf where empty."""
    lse = torch.logsumexp(scores + log_n, dim=-1, keepdim=True)
    return torch.where(torch.isinf(log_n), torch.full_like(scores, float("-inf")), scores - lse)


def select_clusters_reference(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch lookup in the kernels' compact form: (idx [B,H,NB,C] int32 ascending, padded
    with -1; count [B,H,NB] int32). Arguments as `selection_mask_reference`."""
    return _compact(selection_mask_reference(*args, **kwargs))


def selection_mask_reference(
    q: torch.Tensor,
    centroids: torch.Tensor,
    offsets: torch.Tensor,
    log_threshold: torch.Tensor,
    scale: float,
    block_q: int,
    budget: int = 0,
    coarse_centroids: torch.Tensor | None = None,
    coarse_offsets: torch.Tensor | None = None,
    coarse_log_threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch lookup as a bool mask [B, H, NB, C] of kept clusters. q [B, Hq, M, D];
    centroids [H, C, D] (or [H, C, 2D] with variances); offsets [H, C+1]; log_threshold [decode, prefill] (or one value for
    both; see pick_threshold); budget 0 = threshold mode."""
    best = best_log_shares(q, centroids, offsets, scale, block_q, coarse_centroids,
                           coarse_offsets, coarse_log_threshold)
    if budget > 0:
        return _fit_budget(best, cluster_sizes(offsets).to(best.dtype), budget)
    return best > pick_threshold(log_threshold, q.shape[2]).reshape(()).to(best.dtype)


def best_log_shares(q, centroids, offsets, scale, block_q, coarse_centroids=None,
                    coarse_offsets=None, coarse_log_threshold=None) -> torch.Tensor:
    """[B, H, NB, C] the block-max log share of each cluster (-inf: empty, or not a child of a
    kept coarse cluster), which the threshold and budget rules compare."""
    q = lookup_queries(q, centroids.shape[-1], scale)
    b, hq, m, d = q.shape
    if coarse_log_threshold is not None:
        coarse_log_threshold = pick_threshold(coarse_log_threshold, m).reshape(())
    h, c, _ = centroids.shape
    g = hq // h
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(work).reshape(b, h, g, m, d)
    scores = torch.einsum("bhgmd,hcd->bhgmc", qg, centroids.to(work)) * scale
    sizes = cluster_sizes(offsets).to(work)
    log_n = sizes.log()[None, :, None, None, :]  # log 0 = -inf marks empty clusters

    if coarse_centroids is not None:
        parent = _parent_of_fine(coarse_offsets, c)  # [H, C]
        cbest, cscores, log_cn = _coarse_terms(qg, coarse_centroids.to(work), parent, sizes, scale, block_q)
        ckeep = cbest > coarse_log_threshold.to(work)
        # Expand the per-block coarse decision to each query row and to fine children.
        ckeep_q = ckeep.repeat_interleave(block_q, dim=2)[:, :, :m]  # [B, H, M, Cc]
        kept_child = torch.gather(
            ckeep_q, 3, parent.long()[None, :, None, :].expand(b, h, m, c))  # [B, H, M, C]
        kept_child = kept_child[:, :, None]  # broadcast over the group
        # Denominator: kept children exactly, pruned coarse clusters by their centroid.
        fine_terms = torch.where(kept_child, scores + log_n, torch.full_like(scores, float("-inf")))
        pruned = torch.where(ckeep_q[:, :, None], torch.full_like(cscores, float("-inf")),
                             cscores + log_cn)
        lse = torch.logsumexp(torch.cat([fine_terms, pruned], dim=-1), dim=-1, keepdim=True)
        shares = torch.where(kept_child & ~torch.isinf(log_n), scores - lse,
                                torch.full_like(scores, float("-inf")))
    else:
        shares = log_share(scores, log_n)

    return block_max(shares, block_q)


def _coarse_terms(qg, coarse_centroids, parent, sizes, scale, block_q):
    """The coarse level: (block-max log shares [B, H, NB, Cc], which its threshold compares;
    scores [B, H, G, M, Cc]; log sizes [1, H, 1, 1, Cc]); a coarse cluster's size is the keys
    under its fine children."""
    h = coarse_centroids.shape[0]
    coarse_n = torch.zeros(h, coarse_centroids.shape[1], dtype=sizes.dtype, device=sizes.device)
    coarse_n.scatter_add_(1, parent.long(), sizes)
    log_cn = coarse_n.log()[None, :, None, None, :]
    cscores = torch.einsum("bhgmd,hkd->bhgmk", qg, coarse_centroids) * scale
    return block_max(log_share(cscores, log_cn), block_q), cscores, log_cn


def coarse_log_shares(q: torch.Tensor, centroids: torch.Tensor, offsets: torch.Tensor,
                      coarse_centroids: torch.Tensor, coarse_offsets: torch.Tensor, scale: float,
                      block_q: int) -> torch.Tensor:
    """[B, H, NB, Cc]: each coarse cluster's block-max log share (float64 for float64 q); the
    coarse level keeps the clusters above its threshold."""
    q = lookup_queries(q, centroids.shape[-1], scale)
    b, hq, m, d = q.shape
    h, c, _ = centroids.shape
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    best, _, _ = _coarse_terms(q.to(work).reshape(b, h, hq // h, m, d), coarse_centroids.to(work),
                               _parent_of_fine(coarse_offsets, c), cluster_sizes(offsets).to(work), scale, block_q)
    return best


def listed_children_reference(q: torch.Tensor, centroids: torch.Tensor, offsets: torch.Tensor,
                              coarse_centroids: torch.Tensor, coarse_offsets: torch.Tensor,
                              coarse_log_threshold: torch.Tensor, scale: float,
                              block_q: int) -> torch.Tensor:
    """Bool [B, H, NB, C]: the fine clusters the hierarchical lookup scores (children of the
    kept coarse clusters), for the listing tests and the benchmark's listed fraction."""
    best = coarse_log_shares(q, centroids, offsets, coarse_centroids, coarse_offsets, scale, block_q)
    thr = pick_threshold(coarse_log_threshold, q.shape[2]).reshape(()).to(best.dtype)
    b, h, nb, _ = best.shape
    c = centroids.shape[1]
    parent = _parent_of_fine(coarse_offsets, c)
    return torch.gather(best > thr, 3, parent.long()[None, :, None, :].expand(b, h, nb, c))


def logit_bounds(q: torch.Tensor, centroids: torch.Tensor, radii: torch.Tensor, scale: float) -> torch.Tensor:
    """Certified upper bound of every key's logit per cluster: s (q.mu_c + |q| r_c), [B, H, G, M, C].
    q [B, Hq, M, D]; centroids [H, C, D or 2D] (the means are the first D columns); radii [H, C]."""
    b, hq, m, d = q.shape
    h = centroids.shape[0]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(work).reshape(b, h, hq // h, m, d)
    mean = torch.einsum("bhgmd,hcd->bhgmc", qg, centroids[..., :d].to(work))
    return (mean + qg.norm(dim=-1, keepdim=True) * radii.to(work)[:, None, None, :][None]) * scale


def certified_selection(q: torch.Tensor, centroids: torch.Tensor, offsets: torch.Tensor, radii: torch.Tensor,
                        scale: float, block_q: int, eps: float, log_z_rest: torch.Tensor) -> torch.Tensor:
    """Error-bounded lookup (module docstring) as a bool mask [B, H, NB, C]. log_z_rest
    [B, H, G, M]: log of the exact partition over the always-attended and new keys."""
    b, hq, m, d = q.shape
    h, c = centroids.shape[0], centroids.shape[1]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_n = cluster_sizes(offsets).to(work).log()[None, :, None, None, :]      # -inf: empty
    upper = logit_bounds(q, centroids, radii, scale) + log_n                     # log n_c e^{U_c}
    qg = q.to(work).reshape(b, h, hq // h, m, d)
    lower = torch.einsum("bhgmd,hcd->bhgmc", qg, centroids[..., :d].to(work)) * scale + log_n
    order = upper.argsort(dim=-1, descending=True, stable=True)
    up, lo = upper.gather(-1, order), lower.gather(-1, order)
    # keeping the first j clusters of `order` (j = 0..C): dropped bound R_j, kept lower bound L_j
    ninf = torch.full_like(up[..., :1], float("-inf"))
    log_r = torch.cat([torch.logcumsumexp(up.flip(-1), -1).flip(-1), ninf], -1)
    log_l = torch.cat([ninf, torch.logcumsumexp(lo, -1)], -1)
    log_rest = torch.logaddexp(log_l, log_z_rest.to(work).unsqueeze(-1))
    bound = torch.sigmoid(log_r - log_rest)                                      # R / (R + L + Z)
    need = (bound > eps).sum(-1, keepdim=True)  # bounds fall with j: the first j with bound <= eps
    rank = torch.arange(c, device=q.device)
    keep_sorted = (rank < need) & torch.isfinite(up)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)        # [B, H, G, M, C]
    nb = -(-m // block_q)
    pad = nb * block_q - m
    if pad:
        keep = torch.nn.functional.pad(keep, (0, 0, 0, pad), value=False)
    return keep.reshape(b, h, -1, nb, block_q, c).any(dim=4).any(dim=2)


def cluster_of(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """[..., C+1] offsets -> [..., n] the cluster of each of n sorted items (keys under `offsets`,
    or fine clusters under coarse offsets), in offsets' dtype. Items past the last offset get C."""
    pos = torch.arange(n, device=offsets.device, dtype=offsets.dtype)
    pos = pos.expand(*offsets.shape[:-1], n).contiguous()
    return torch.searchsorted(offsets[..., 1:].contiguous(), pos, right=True)


def _parent_of_fine(coarse_offsets: torch.Tensor, num_fine: int) -> torch.Tensor:
    """[H, Cc+1] offsets over fine clusters -> [H, C] coarse parent of each fine cluster."""
    return cluster_of(coarse_offsets, num_fine)


def _fit_budget(best: torch.Tensor, sizes: torch.Tensor, budget: int) -> torch.Tensor:
    """Keep the best-scoring non-empty clusters while their total size stays <= budget."""
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    sz = sizes[None, :, None, :].expand_as(best)
    sorted_sz = torch.gather(sz, -1, order)
    sorted_ok = ~torch.isinf(torch.gather(best, -1, order))
    fits = (torch.cumsum(sorted_sz * sorted_ok, dim=-1) <= budget) & sorted_ok
    sel = torch.zeros_like(fits)
    return sel.scatter(-1, order, fits)
