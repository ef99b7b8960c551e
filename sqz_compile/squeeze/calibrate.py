"""Threshold calibration on the observation window's queries (log space throughout).

For a query q, scale s and cluster c with centroid mu_c and size n_c (per key):
    log_share_c(q) = s*q.mu_c - logsumexp_j(s*q.mu_j + log n_j)       (empty clusters: log 0 = -inf)
A cluster is kept when the max of log_share over the GQA group's query heads (and, in prefill,
over the block's queries) exceeds the layer's log threshold. Two thresholds are calibrated, one
per granularity the lookup applies them at: decode (one window query at a time) and prefill (the
max over runs of block_q window queries), each so that the mean over (layers, KV heads, rows) of
the fraction of the N clustered keys kept equals `keep`: exact up to ties, by sorting the pooled
(score, n_c/N/rows) pairs. Without the prefill column a block keeps the union of its queries'
needs: 42-45% of the keys at keep = 1/8 on SmolLM2 (benchmarks/results/accuracy.md, v1). The coarse threshold is set so that the coarse level keeps at least `coarse_coverage` of
the keys the flat fine selection keeps on the same queries.
"""
from __future__ import annotations


import torch

from ..kernels.lookup.reference import cluster_of, lookup_queries

COARSE_COVERAGE = 0.99


def group_log_shares(queries: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Max over each KV head's query heads of the log share: [H, W, C] float32.

    queries [Hq, W, D], centroids [H, C, D] or [H, C, 2D] (means and variances, see
    lookup_queries), sizes [H, C] (keys per cluster). Empty clusters -inf.
    """
    queries = lookup_queries(queries.float(), centroids.shape[-1], scale)
    H, C, D = centroids.shape
    Hq, W, _ = queries.shape
    q = queries.reshape(H, Hq // H, W, D)
    logits = scale * torch.matmul(q, centroids.float().transpose(1, 2).unsqueeze(1))  # [H, g, W, C]
    logn = sizes.float().log().view(H, 1, 1, C)
    share = logits - torch.logsumexp(logits + logn, dim=-1, keepdim=True)
    share = share.masked_fill(sizes.view(H, 1, 1, C) <= 0, float("-inf"))
    return share.amax(dim=1)


def _cut_below(scores: torch.Tensor, j: int) -> float:
    """Threshold keeping exactly the entries with score >= scores[j] (scores sorted descending):
    halfway to the next lower distinct score, so small runtime rounding does not flip decisions."""
    top = scores[j]
    if not torch.isfinite(top):
        return float("-inf")
    lower = scores[j + 1:][scores[j + 1:] < top]
    if lower.numel() == 0 or not torch.isfinite(lower[0]):
        return float(top) - 1.0
    return float((top + lower[0]) / 2)


def threshold_for_fraction(scores: torch.Tensor, weights: torch.Tensor, keep: float) -> float:
    """Log threshold so that the summed weight of entries with score > threshold is as close as
    possible to `keep` (weights sum to 1). keep 0 -> +inf, keep 1 -> -inf."""
    if keep <= 0.0:
        return float("inf")
    if keep >= 1.0 or scores.numel() == 0:
        return float("-inf")
    s, order = scores.reshape(-1).sort(descending=True)
    cum = weights.reshape(-1)[order].double().cumsum(0)
    # kept weight with the top j+1 entries is cum[j]; the top 0 entries keep 0
    j = int(torch.searchsorted(cum, torch.tensor([keep], dtype=cum.dtype, device=cum.device)))
    j = min(j, cum.numel() - 1)  # keeping the top j+1 entries keeps cum[j]; the top j, cum[j-1]
    fewer = float(cum[j - 1]) if j > 0 else 0.0
    if abs(fewer - keep) < abs(float(cum[j]) - keep):
        if j == 0:
            return float("inf")
        j -= 1
    return _cut_below(s, j)


def threshold_for_coverage(scores: torch.Tensor, weights: torch.Tensor, coverage: float) -> float:
    """Largest threshold keeping at least `coverage` of the total weight (weights >= 0)."""
    total = float(weights.sum())
    if total <= 0:
        return float("inf")
    s, order = scores.reshape(-1).sort(descending=True)
    cum = weights.reshape(-1)[order].double().cumsum(0)
    j = int(torch.searchsorted(cum, torch.tensor([coverage * total], dtype=cum.dtype, device=cum.device)))
    return _cut_below(s, min(j, cum.numel() - 1))


def _sizes(offsets: torch.Tensor) -> torch.Tensor:
    return (offsets[..., 1:] - offsets[..., :-1]).to(torch.float32)


def _blocks(scores: torch.Tensor, block: int) -> torch.Tensor:
    """[H, W, C] per-query scores -> [H, W - b + 1, C]: max over every run of b = min(block, W)
    consecutive window queries (the prefill rule keeps a cluster for a block when any of its
    queries needs it). Overlapping runs: the window rarely holds more than two whole blocks."""
    b = min(block, scores.shape[1])
    return scores.unfold(1, b, 1).amax(-1)


def calibrate(window_queries: torch.Tensor, centroids: torch.Tensor, offsets: torch.Tensor,
              keep: float, scale: float, per_layer: bool = False,
              coarse_centroids: torch.Tensor | None = None, coarse_offsets: torch.Tensor | None = None,
              coverage: float = COARSE_COVERAGE,
              block_q: int = 64, dense_layers: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log_threshold [layers, 2], coarse_log_threshold [layers, 2] or None), float32 on the
    centroids' device; column 0 for decode (one query), column 1 for prefill (a block of
    `block_q` queries), each calibrated so that `keep` of the clustered keys is kept at its own
    granularity.

    The first `dense_layers` layers get -inf (keep every cluster) and the others are calibrated
    among themselves. Shapes as in context.py. With no window queries (a 1-token context) nothing can be measured:
    keep > 0 then keeps everything (-inf), keep = 0 nothing (+inf).
    """
    layers, H, C, _ = centroids.shape
    W = window_queries.shape[2]
    dev = centroids.device
    hier = coarse_centroids is not None
    dl = min(max(int(dense_layers), 0), layers)
    if dl:
        fine = torch.full((layers, 2), float("-inf"), device=dev)
        coarse = fine.clone() if hier else None
        if dl < layers:
            f, c = calibrate(window_queries[dl:], centroids[dl:], offsets[dl:], keep, scale, per_layer,
                             coarse_centroids[dl:] if hier else None, coarse_offsets[dl:] if hier else None,
                             coverage, block_q)
            fine[dl:] = f
            if hier:
                coarse[dl:] = c
        return fine, coarse
    fine = torch.empty(layers, 2, dtype=torch.float32, device=dev)
    coarse = torch.empty(layers, 2, dtype=torch.float32, device=dev) if hier else None
    if W == 0 or keep <= 0.0 or keep >= 1.0:
        fine.fill_(float("inf") if keep <= 0.0 else float("-inf"))
        if hier:
            coarse.fill_(float("inf") if keep <= 0.0 else float("-inf"))
        return fine, coarse

    sizes = _sizes(offsets)                                      # [layers, H, C]
    N = sizes[0, 0].sum()
    queries = window_queries.to(dev)
    per_query = [group_log_shares(queries[i], centroids[i], sizes[i], scale) for i in range(layers)]
    granularities = (per_query, [_blocks(x, block_q) for x in per_query])
    for col, scores in enumerate(granularities):
        R = scores[0].shape[1]
        rows = H * R if per_layer else layers * H * R
        weights = (sizes / N / rows).unsqueeze(2).expand(-1, -1, R, -1)  # [layers, H, R, C]
        if per_layer:
            for i in range(layers):
                fine[i, col] = threshold_for_fraction(scores[i], weights[i], keep)
        else:
            fine[:, col] = threshold_for_fraction(torch.stack(scores), weights, keep)
    if not hier:
        return fine, None

    # coarse level: per (row, coarse cluster), the keys of its fine children the flat rule keeps
    Cc = coarse_offsets.shape[-1] - 1
    parents, coarse_per_query = [], []  # per layer, shared by both granularities
    for i in range(layers):
        parent = cluster_of(coarse_offsets[i].long(), C).clamp_(0, Cc - 1)                 # [H, C]
        csz = torch.zeros(H, Cc, device=dev).scatter_add_(1, parent, sizes[i])
        parents.append(parent)
        coarse_per_query.append(group_log_shares(queries[i], coarse_centroids[i], csz, scale))  # [H, W, Cc]
    for col, scores in enumerate(granularities):
        cscores = coarse_per_query if col == 0 else [_blocks(x, block_q) for x in coarse_per_query]
        cweights = []
        for i, parent in enumerate(parents):
            R = scores[i].shape[1]
            kept = torch.where(scores[i] > fine[i, col], sizes[i].unsqueeze(1), 0.0)      # [H, R, C]
            cweights.append(torch.zeros(H, R, Cc, device=dev).scatter_add_(
                2, parent.unsqueeze(1).expand(-1, R, -1), kept))
        if per_layer:
            for i in range(layers):
                coarse[i, col] = threshold_for_coverage(cscores[i], cweights[i], coverage)
        else:
            coarse[:, col] = threshold_for_coverage(torch.stack(cscores), torch.stack(cweights), coverage)
    return fine, coarse


def kept_fraction(window_queries: torch.Tensor, centroids: torch.Tensor, offsets: torch.Tensor,
                  log_threshold: torch.Tensor, scale: float, block_q: int | None = None) -> torch.Tensor:
    """Per layer, the mean over (KV heads, window queries) of the fraction of clustered keys the
    flat rule keeps at decode granularity, or (block_q given) per block of block_q window
    queries with the prefill threshold: [layers] float32 (for tests and reports)."""
    sizes = _sizes(offsets)
    out = []
    for i in range(centroids.shape[0]):
        sc = group_log_shares(window_queries[i].to(centroids.device), centroids[i], sizes[i], scale)
        thr = log_threshold[i].reshape(-1)
        if block_q is not None:
            sc, thr = _blocks(sc, block_q), thr[-1]
        else:
            thr = thr[0]
        kept = torch.where(sc > thr, sizes[i].unsqueeze(1), 0.0).sum(-1)  # [H, rows]
        out.append(kept.mean() / sizes[i, 0].sum())
    return torch.stack(out)
