"""Batched spherical K-means: many independent problems [B, N, D] solved at once on one device.

Cosine geometry: points are L2-normalised, a point goes to the centroid with the largest dot
product, a centroid is the normalised sum of its points. Initialisation is k-means++ on a
random subsample: greedy k-means++ for the first centres, then rounds that each draw a batch of
new centres (probability proportional to squared distance to the centres so far, without
replacement), so it costs a few hundred small batched steps instead of C sequential passes. The N x C similarity is computed in
chunks bounded by `chunk_elems`, so memory stays flat at 128K points x 6.5K clusters. The hot
loop has no Python loop over problems or clusters and syncs with the host only every
`check_every` iterations (early stop).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional; the torch path is always there
    triton = None


@dataclass
class KMeansResult:
    assign: torch.Tensor   # [B, N] int64 cluster of each point
    counts: torch.Tensor   # [B, K] int64 points per cluster (0 = empty)
    centers: torch.Tensor  # [B, K] x D float32 unit directions (zeros where empty)
    iterations: int


def compute_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPU (unit vectors: no range issue, 3 more mantissa bits than bf16), fp32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def default_chunk_elems(device: torch.device) -> int:
    return 1 << 28 if device.type == "cuda" else 1 << 22


def normalize(x: torch.Tensor, dtype: torch.dtype, step: int = 16) -> torch.Tensor:
    """L2-normalise the last dim into `dtype`, a few problems at a time (no full fp32 copy)."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    for b in range(0, x.shape[0], step):
        out[b:b + step] = F.normalize(x[b:b + step].float(), dim=-1).to(dtype)
    return out


def _row_step(B: int, N: int, K: int, chunk_elems: int) -> int:
    return max(1, min(N, chunk_elems // max(1, B * K)))


# Fused assignment on GPU: the [N, K] similarity tile never leaves the chip (matmul + running
# argmax, like a flash-attention forward without the second matmul). Without it the chunked
# torch path writes and re-reads the whole N x K similarity matrix every iteration.
ASSIGN_CONFIG = {"BLOCK_M": 256, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}  # fastest on H100 (bench --assign-bench)

if triton is not None:
    @triton.jit
    def _nearest_kernel(x_ptr, c_ptr, best_ptr, idx_ptr, N, K, num_m,
                        sxb, sxn, scb, sck, sob,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        b = (pid // num_m).to(tl.int64)
        offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        x = tl.load(x_ptr + b * sxb + offs_m[:, None].to(tl.int64) * sxn + offs_d[None, :],
                    mask=offs_m[:, None] < N, other=0.0)
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        arg = tl.zeros([BLOCK_M], tl.int32)
        for k0 in range(0, K, BLOCK_N):
            offs_n = k0 + tl.arange(0, BLOCK_N)
            c = tl.load(c_ptr + b * scb + offs_n[:, None].to(tl.int64) * sck + offs_d[None, :],
                        mask=offs_n[:, None] < K, other=0.0)
            s = tl.dot(x, tl.trans(c))
            s = tl.where(offs_n[None, :] < K, s, float("-inf"))
            m, a = tl.max(s, axis=1, return_indices=True)
            upd = m > best
            best = tl.where(upd, m, best)
            arg = tl.where(upd, a + k0, arg)
        tl.store(best_ptr + b * sob + offs_m, best, mask=offs_m < N)
        tl.store(idx_ptr + b * sob + offs_m, arg.to(tl.int64), mask=offs_m < N)


def _use_triton(xn: torch.Tensor) -> bool:
    D = xn.shape[-1]
    return (triton is not None and xn.is_cuda and os.environ.get("SQZ_KMEANS_TRITON", "1") != "0"
            and xn.dtype in (torch.float16, torch.bfloat16) and 16 <= D <= 256 and D & (D - 1) == 0)


def nearest_fused(xn: torch.Tensor, cn: torch.Tensor, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `nearest` (also runs under TRITON_INTERPRET=1 on CPU tensors)."""
    cfg = dict(ASSIGN_CONFIG, **(config or {}))
    B, N, D = xn.shape
    K = cn.shape[1]
    xn, cn = xn.contiguous(), cn.contiguous().to(xn.dtype)
    best = torch.empty(B, N, dtype=torch.float32, device=xn.device)
    idx = torch.empty(B, N, dtype=torch.int64, device=xn.device)
    num_m = triton.cdiv(N, cfg["BLOCK_M"])
    _nearest_kernel[(B * num_m,)](xn, cn, best, idx, N, K, num_m, xn.stride(0), xn.stride(1),
                                  cn.stride(0), cn.stride(1), best.stride(0), D=D,
                                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return best, idx


class FusedFallback:
    """The fused assignment's fallback, scoped to one `kmeans` call: after the Triton kernel fails
    once, the rest of that call uses the torch path, and a warning says so once. Nothing is
    remembered across calls, so the next call tries the kernel again."""

    def __init__(self) -> None:
        self.failed = False

    def note(self, e: Exception) -> None:
        if not self.failed:
            import warnings
            warnings.warn(f"sqz_compile.kmeans: fused Triton assignment failed ({type(e).__name__}: {e}); "
                          f"this k-means call uses the torch path", stacklevel=4)
        self.failed = True


def nearest(xn: torch.Tensor, cn: torch.Tensor, chunk_elems: int,
            fallback: FusedFallback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(best similarity float32 [B, N], index int64 [B, N]) of each point among centres [B, K, D].
    The fused Triton kernel where it applies, else (or once it failed within `fallback`'s scope,
    default this call) the torch path."""
    fallback = fallback if fallback is not None else FusedFallback()
    if _use_triton(xn) and not fallback.failed:
        try:
            return nearest_fused(xn, cn)
        except Exception as e:  # noqa: BLE001 - e.g. a Triton/GPU combination that cannot compile it
            fallback.note(e)
    return nearest_torch(xn, cn, chunk_elems)


def nearest_torch(xn: torch.Tensor, cn: torch.Tensor, chunk_elems: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest` with batched matmuls over row chunks of at most ~chunk_elems similarities."""
    B, N, _ = xn.shape
    ct = cn.transpose(1, 2)
    best = torch.empty(B, N, dtype=torch.float32, device=xn.device)
    idx = torch.empty(B, N, dtype=torch.int64, device=xn.device)
    step = _row_step(B, N, cn.shape[1], chunk_elems)
    for s in range(0, N, step):
        v, i = torch.bmm(xn[:, s:s + step], ct).max(dim=-1)
        best[:, s:s + step] = v
        idx[:, s:s + step] = i
    return best, idx


def cluster_sums(x: torch.Tensor, assign: torch.Tensor, k: int, weights: torch.Tensor | None = None,
                 step: int | None = None, squared: bool = False) -> torch.Tensor:
    """Float32 per-cluster sums [B, k, D] of `x` [B, N, D] (optionally weighted by [B, N]; of
    x**2 with `squared`), converting `step` points per problem at a time (default: ~2^26
    elements per chunk)."""
    B, N, D = x.shape
    step = step or max(1, (1 << 26) // (B * D))
    sums = torch.zeros(B * k, D, dtype=torch.float32, device=x.device)
    base = (torch.arange(B, device=x.device) * k).unsqueeze(1)
    for s in range(0, N, step):
        src = x[:, s:s + step].float()
        if squared:
            src = src * src
        if weights is not None:
            src = src * weights[:, s:s + step, None]
        sums.index_add_(0, (assign[:, s:s + step] + base).reshape(-1), src.reshape(-1, D))
    return sums.view(B, k, D)


def cluster_counts(assign: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Points per cluster [B, k] (int64, or weighted sums when `weights` is given)."""
    src = torch.ones_like(assign) if weights is None else weights
    return torch.zeros(assign.shape[0], k, dtype=src.dtype, device=assign.device).scatter_add_(1, assign, src)


def _gumbel_topk(logw: torch.Tensor, t: int, gen: torch.Generator) -> torch.Tensor:
    """t indices per row drawn without replacement with probability proportional to exp(logw)."""
    u = torch.rand(logw.shape, generator=gen, device=logw.device).clamp_(1e-20, 1.0)
    return (logw - torch.log(-torch.log(u))).topk(t, dim=1).indices


def _round_picks(s: torch.Tensor, logw: torch.Tensor, d2: torch.Tensor, t: int, gen: torch.Generator,
                 chunk_elems: int) -> torch.Tensor:
    """t new centres per problem, emulating t sequential k-means++ draws: draw 2t candidates
    proportional to d2, accept candidate j with probability d2'_j / d2_j, where d2'_j also counts
    the earlier candidates of this round as centres (rejection sampling), then keep the first t
    accepted (topping up with rejected ones when too few were accepted)."""
    B, m, D = s.shape
    n = min(m, 2 * t)
    cand = _gumbel_topk(logw, n, gen)                                    # [B, n], best first
    cs = s.gather(1, cand.unsqueeze(-1).expand(-1, -1, D))
    d2c = d2.gather(1, cand)
    u = torch.rand(B, n, generator=gen, device=s.device)
    prio = torch.empty(B, n, device=s.device)
    earlier = torch.ones(n, n, dtype=torch.bool, device=s.device).tril(-1)  # [j, i]: i before j
    step = max(1, chunk_elems // (n * n))
    pos = torch.arange(n, 0, -1, device=s.device, dtype=torch.float32)    # earlier first
    for b in range(0, B, step):
        sim = torch.bmm(cs[b:b + step], cs[b:b + step].transpose(1, 2)).float()
        d2pair = (2.0 - 2.0 * sim).masked_fill_(~earlier, float("inf")).amin(-1)
        d2new = torch.minimum(d2c[b:b + step], d2pair)
        accept = u[b:b + step] * d2c[b:b + step] < d2new
        prio[b:b + step] = accept * (n + 1.0) + pos
    return cand.gather(1, prio.topk(t, dim=1).indices)


def _init_centers(xn: torch.Tensor, k: int, gen: torch.Generator, weights: torch.Tensor | None,
                  chunk_elems: int, oversample: int = 8, greedy_steps: int = 256, growth: float = 0.1,
                  fallback: FusedFallback | None = None) -> torch.Tensor:
    """k-means++ on a random subsample of ~oversample*k points.

    The first `greedy_steps` centres are drawn one at a time, greedy k-means++ style (2 + log k
    candidates, keep the one that lowers the potential most); after that ceil(growth*count)
    centres are drawn per round, so the whole init is O(greedy_steps + log k) batched matmuls
    instead of k sequential passes."""
    B, N, D = xn.shape
    m = min(N, max(oversample * k, 256))
    sub = torch.randperm(N, generator=gen, device=xn.device)[:m]
    s = xn[:, sub]
    sw = torch.ones(B, m, device=xn.device) if weights is None else weights[:, sub].float()
    centers = torch.empty(B, k, D, dtype=xn.dtype, device=xn.device)
    best = torch.full((B, m), -1.0, dtype=torch.float32, device=xn.device)  # max cos to centres so far
    n_cand = min(m, 2 + int(math.log(k + 1)))
    count = 0
    while count < k:
        # squared chord distance 2 - 2cos, times the point's weight (0 excludes a point)
        d2 = (2.0 - 2.0 * best).clamp_(min=0.0)
        logw = torch.log(sw * d2)
        if count < greedy_steps:
            cand = _gumbel_topk(logw, 1 if count == 0 else n_cand, gen)
            sims = torch.bmm(s, s.gather(1, cand.unsqueeze(-1).expand(-1, -1, D)).transpose(1, 2)).float()
            pot = (sw.unsqueeze(-1) * torch.minimum(d2.unsqueeze(-1), 2.0 - 2.0 * sims)).sum(1)
            j = pot.argmin(dim=1, keepdim=True)
            picks = cand.gather(1, j)
            nb = sims.gather(2, j.unsqueeze(1).expand(-1, m, -1)).squeeze(-1)
        else:
            t = min(k - count, max(1, math.ceil(growth * count)))
            picks = _round_picks(s, logw, d2, t, gen, chunk_elems)
            nb = None
        new = s.gather(1, picks.unsqueeze(-1).expand(-1, -1, D))
        centers[:, count:count + new.shape[1]] = new
        if nb is None:
            nb, _ = nearest(s, new, chunk_elems, fallback)
        torch.maximum(best, nb, out=best)
        count += new.shape[1]
    return centers


def kmeans(x: torch.Tensor, k: int, *, iters: int = 25, seed: int = 0,
           weights: torch.Tensor | None = None, tol: float = 1e-4, check_every: int = 4,
           chunk_elems: int | None = None, dtype: torch.dtype | None = None,
           greedy_steps: int = 256, progress=None) -> KMeansResult:
    """Spherical K-means on each of B problems x [B, N, D] (any float dtype) into k clusters.

    weights [B, N] (optional, >= 0): a point of weight 0 is assigned but never moves a centre,
    seeds one, or counts as a member for the empty-cluster test. Empty clusters are re-seeded each
    iteration with the points farthest from their centres; degenerate data (e.g. identical points)
    can still leave some empty. Stops when at most `tol` of the assignments changed over the last
    `check_every` iterations, or after `iters`. Deterministic for a given seed on CPU; on CUDA
    the float32 atomic adds of the centre sums can differ in the last bit between runs.
    greedy_steps: how many initial centres are drawn one at a time (see _init_centers).
    `progress`: an optional tqdm-like object with .update(n).
    """
    B, N, D = x.shape
    if not 1 <= k <= N:
        raise ValueError(f"k={k} clusters for {N} points: need 1 <= k <= N")
    device = x.device
    dtype = dtype or compute_dtype(device)
    chunk_elems = chunk_elems or default_chunk_elems(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    w = None if weights is None else weights.to(device, torch.float32)
    xn = normalize(x, dtype)
    fallback = FusedFallback()
    cn = _init_centers(xn, k, gen, w, chunk_elems, greedy_steps=greedy_steps, fallback=fallback)

    arangeB = torch.arange(B, device=device).unsqueeze(1)
    prev = torch.full((B, N), -1, dtype=torch.int64, device=device)
    changed = torch.zeros((), dtype=torch.int64, device=device)
    done = 0
    for it in range(1, iters + 1):
        best, assign = nearest(xn, cn, chunk_elems, fallback)
        changed += (assign != prev).sum()
        prev = assign
        sums = cluster_sums(xn, assign, k, w)
        members = cluster_counts(assign, k, None if w is None else (w > 0).float())
        new = F.normalize(sums, dim=-1)
        # re-seed empty clusters with the farthest points (rank r-th empty <- r-th farthest)
        empty = members == 0
        far = (best if w is None else best.masked_fill(w <= 0, float("inf"))).argsort(dim=1)
        rank = (empty.cumsum(1) - 1).clamp_(0, N - 1)
        seed_pts = xn[arangeB, far.gather(1, rank)].float()
        cn = torch.where(empty.unsqueeze(-1), seed_pts, new).to(dtype)
        done = it
        if progress is not None:
            progress.update(1)
        if it % check_every == 0 or it == iters:
            if int(changed) <= tol * B * N * check_every and it > 1:
                break
            changed.zero_()
    counts = cluster_counts(assign, k)
    centers = torch.where((counts > 0).unsqueeze(-1), new, torch.zeros_like(new))
    return KMeansResult(assign, counts, centers, done)
