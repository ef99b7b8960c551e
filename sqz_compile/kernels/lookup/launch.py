"""Launch glue for the lookup's Triton kernels (the CUDA branch of torch.ops.sqz.select_clusters;
attention/launch.py holds the attention half).

`select_clusters` (and attention/launch.py's `squeezed_attention`) take exactly the argument lists
of the ops in ops.py. Every launch goes through `torch.library.wrap_triton`, so when the op body is traced
(torch.compile / export) Inductor sees the kernels and inlines them into its generated code.
Grids and block sizes come from static shapes only: no `.item()`, no host sync, so the path is
CUDA-graph capturable. Scratch buffers are plain allocations inside the op.

Under TRITON_INTERPRET=1 the launchers also accept CPU tensors (that is how CI tests the
kernels on a CPU-only machine); then kernels are called directly instead of via wrap_triton,
and every tl.dot runs in float32 (the interpreter of triton 3.9 computes bf16 dots wrongly).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..triton_common import (HAS_TRITON, cdiv, check_device, hint, interpreting, lastdim, launch, pow2, sm_count,
                             symbolic)
from . import triton as _lk
from .reference import lookup_queries, pick_threshold

if not HAS_TRITON:  # pragma: no cover
    raise ImportError("sqz_compile.kernels (launch) needs triton: pip install triton "
                      "(the CPU path of torch.ops.sqz.* does not)")


class Selection(NamedTuple):
    """Lookup output: the op's (idx, count) plus what the attention kernel reads."""

    idx: torch.Tensor    # [B, H, NB, C] int32, ascending kept clusters, padded with -1
    count: torch.Tensor  # [B, H, NB] int32
    cum: torch.Tensor    # [B*H*NB, C+1] int32: keys of the slots before j (nkeys past count)
    delta: torch.Tensor  # [B*H*NB, C] int32: cluster start - cum, per slot
    nkeys: torch.Tensor  # [B*H*NB] int32: kept context keys
    # [B*H*NB, N] int32: sorted position of each kept key (lookup(positions=N)); with it the
    # decode lookup may leave idx/count/cum/delta unset (None)
    pos: Optional[torch.Tensor] = None


class LookupConfig(NamedTuple):
    qt: int         # query rows per tile (the GQA group's heads x the block's queries)
    bc: int         # clusters per tile
    store: bool     # keep the scores for the later passes (decode) instead of recomputing them
    num_warps: int


def lookup_config(qrows: int, half_centroids: bool = False) -> LookupConfig:
    """Decode (few query rows) stores its few scores per cluster instead of reading the
    centroids twice; prefill recomputes them. Half-precision centroid tiles fit 128 clusters
    (float32 ones at 128 run out of registers); prefill scores half-precision queries against a
    half copy of the centroids. Measured on the H100: benchmarks/NOTES.md v6, v7."""
    bc = 128 if half_centroids else 64
    if qrows <= 16:
        return LookupConfig(16, bc, True, 4)
    return LookupConfig(64, bc, False, 4)


def _lse(q, cent, off, co, lst, listed, scale, dims, split, chunk, qt, bc, two_level, listing,
         scores, store, load, ieee, nw, sync=None):
    b, h, nb, g, bq, m, block_q, d = dims
    rows = b * h * nb
    nqt = cdiv(g * bq, qt)
    part = torch.empty((rows, split, nqt * qt), device=q.device, dtype=torch.float32)
    c = cent.shape[1]
    launch(_lk._lse_kernel, (rows, split),
            q, cent, off, co, lst, listed, part, scores, part if sync is None else sync,
            q.stride(0), q.stride(1), q.stride(2), cent.stride(0), cent.stride(1),
            off.stride(0), co.stride(0),
            h, nb, g, bq, m, block_q, c, d, split, chunk, nqt, float(scale),
            QT=qt, BC=bc, BLOCK_D=pow2(d), TWO_LEVEL=two_level, LIST=listing,
            STORE_SCORES=store, LOAD_SCORES=load, DOT=ieee, ZERO_SYNC=sync is not None,
            num_warps=nw)
    return part


def _splits(rows: int, c: int, bc: int, sms: int) -> tuple[int, int]:
    split = max(1, min(cdiv(4 * sms, rows), cdiv(c, bc)))
    chunk = cdiv(cdiv(c, split), bc) * bc
    return cdiv(c, chunk), chunk


def lookup_inputs(q: torch.Tensor, centroids: torch.Tensor, offsets: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the lookup kernels read: the scored queries ([q, s/2 q^2] for [mean, variance]
    centroids) with a unit last stride, contiguous centroids, int32 offsets."""
    q = lastdim(lookup_queries(q, centroids.shape[-1], scale))
    return q, centroids.contiguous(), offsets.to(torch.int32).contiguous()


def lookup(q: torch.Tensor, centroids: torch.Tensor, offsets: torch.Tensor,
           log_threshold: torch.Tensor, coarse_centroids: Optional[torch.Tensor],
           coarse_offsets: Optional[torch.Tensor], coarse_log_threshold: Optional[torch.Tensor],
           scale: float, block_q: int, budget: int,
           tiles: Optional[tuple[int, int]] = None,
           config: Optional[LookupConfig] = None, positions: int = 0,
           listing: Optional[dict] = None) -> Selection:
    """Centroid lookup on the GPU (flat or hierarchical; threshold or budget mode).
    tiles=(query tile, cluster tile) overrides the heuristic (tests use it to force splits);
    config overrides it whole (benchmarks sweep it). Centroids may be float32 or q's dtype.
    positions=N (the context length) also returns the kept keys' positions (Selection.pos);
    decode in threshold mode then writes them from the scores in one fused kernel
    (`_select_kernel`) and skips the cluster list (idx, count, cum, delta are None).
    Hierarchical: the fine passes walk only the children of the kept coarse clusters, listed on
    the device with capacity C (all fine clusters: the list cannot overflow); a `listing` dict
    receives that list ("list" [rows, C] int32, valid up to "listed" [rows] int32) for tests and
    benchmarks."""
    check_device(q, centroids, offsets, log_threshold, coarse_centroids, coarse_offsets,
                  coarse_log_threshold)
    q, centroids, offsets = lookup_inputs(q, centroids, offsets, scale)
    log_threshold = pick_threshold(log_threshold, q.shape[2])
    coarse_log_threshold = pick_threshold(coarse_log_threshold, q.shape[2])
    bsz, hq, m, d = q.shape
    h, c, _ = centroids.shape
    g = hq // h
    block_q = int(block_q)
    nb = cdiv(m, block_q)
    # rows per query block: a symbolic M gets the upper bound (the kernels mask rows >= M)
    bq = block_q if symbolic(m) else min(block_q, m)
    rows = bsz * h * nb
    dev = q.device
    same_half = centroids.dtype == q.dtype and q.dtype != torch.float32
    half_q = q.dtype in (torch.float16, torch.bfloat16)
    qt, bc, store, nw = config or lookup_config(g * bq, same_half or (half_q and g * bq > 16))
    if tiles is not None:
        qt, bc = tiles
        store = store and cdiv(g * bq, qt) == 1
    # dot mode (see lookup._dot_mu): the interpreter and float32 prefill use exact float32;
    # centroids stored in q's half dtype give exact products on tensor cores; float32 centroids
    # are scored in float32 accuracy (tf32x3) by decode (few query rows, memory-bound) and
    # rounded to q's dtype by prefill (compute-bound)
    if interpreting() or (q.dtype == torch.float32 and not store):
        ieee = 1
    elif same_half:
        ieee = 0
    elif store or q.dtype == torch.float32:
        ieee = 2
    else:
        ieee = 0
    if ieee == 0:
        # prefill: one rounded copy of the centroids (read once, then every tile loads half the
        # bytes and feeds the tensor cores without a conversion)
        centroids = centroids.to(q.dtype)
        if coarse_centroids is not None:
            coarse_centroids = coarse_centroids.to(q.dtype)
    sms = sm_count(q)
    dims = (bsz, h, nb, g, bq, m, block_q, d)
    i32 = dict(device=dev, dtype=torch.int32)
    dummy_i = torch.empty(1, **i32)  # placeholders for pointers a variant never reads
    dummy_f = torch.empty(1, device=dev, dtype=torch.float32)
    nqt = cdiv(g * bq, qt)

    split, chunk = _splits(hint(rows), c, bc, sms)
    positions = int(positions)
    fused = positions > 0 and store and int(budget) <= 0
    sync = torch.empty((rows, split), device=dev, dtype=torch.int64) if fused else None
    scores = torch.empty((rows, qt, c), device=dev, dtype=torch.float32) if store else dummy_f
    hier = coarse_centroids is not None
    if hier:
        # coarse level (threshold mode): keep flags, the pruned clusters' lse and the list of
        # the kept clusters' children; the fine passes walk only the list (capacity c: all fine
        # clusters, so it never overflows)
        cc_cent = coarse_centroids.contiguous()
        co = coarse_offsets.to(torch.int32).contiguous()
        cc = cc_cent.shape[1]
        csplit, cchunk = _splits(hint(rows), cc, bc, sms)
        cscores = torch.empty((rows, qt, cc), device=dev, dtype=torch.float32) if store else dummy_f
        csync = torch.empty((rows, csplit), device=dev, dtype=torch.int64)
        cpart = _lse(q, cc_cent, offsets, co, dummy_i, dummy_i, scale, dims, csplit, cchunk,
                     qt, bc, True, False, cscores, store, False, ieee, nw, csync)
        part2 = torch.empty((rows, csplit, nqt * qt), device=dev, dtype=torch.float32)
        lst = torch.empty((rows, c), **i32)
        listed = torch.empty(rows, **i32)
        launch(_lk._best_kernel, (rows, csplit),
                q, cc_cent, offsets, co, lst, listed, cpart, dummy_f, cscores,
                torch.empty((rows, cc), device=dev, dtype=torch.float32),
                coarse_log_threshold.to(torch.float32), dummy_i, dummy_i,
                torch.empty((rows, cc), device=dev, dtype=torch.int8), part2, csync,
                q.stride(0), q.stride(1), q.stride(2), cc_cent.stride(0), cc_cent.stride(1),
                offsets.stride(0), co.stride(0),
                h, nb, g, bq, m, block_q, cc, d, csplit, cchunk, nqt, csplit, 1, c, float(scale),
                QT=qt, BC=bc, BLOCK_D=pow2(d), TWO_LEVEL=True, LIST=False, HAS_L2=False,
                LOAD_SCORES=store, DOT=ieee, THRESH=True, KEEP_FLAGS=True,
                SP1=pow2(csplit), SP2=1, num_warps=nw)
        split2 = csplit
        if listing is not None:
            listing.update(list=lst, listed=listed)
    else:
        lst = listed = part2 = dummy_i
        split2 = 1
    fpart = _lse(q, centroids, offsets, dummy_i, lst, listed, scale, dims, split, chunk,
                 qt, bc, False, hier, scores, store, False, ieee, nw, sync)

    thr = log_threshold.to(torch.float32)
    if fused:
        pos = torch.empty((rows, positions), **i32)
        nkeys = torch.empty(rows, **i32)
        # scratch: the cluster list's slots, unpadded (the positions are what is returned)
        cum = torch.empty((rows, c + 1), **i32)
        delta = torch.empty((rows, c), **i32)
        keep = torch.empty((rows, c), device=dev, dtype=torch.int8) if chunk > bc else dummy_i
        launch(_lk._select_kernel, (rows, split),
                offsets, lst, listed, fpart, part2, scores, keep, thr, sync, cum, delta, pos,
                nkeys, offsets.stride(0),
                h, nb, g, bq, m, block_q, c, split, chunk, split2, positions,
                QT=qt, BC=bc, LIST=hier, HAS_L2=hier, SP1=pow2(split), SP2=pow2(split2),
                ONE_TILE=chunk <= bc, SB=8, KB=128, num_warps=4)
        return Selection(None, None, None, None, nkeys, pos)
    best = torch.empty((rows, c), device=dev, dtype=torch.float32)
    cnt_s = torch.empty((rows, split), **i32)
    sum_s = torch.empty((rows, split), **i32)
    launch(_lk._best_kernel, (rows, split),
            q, centroids, offsets, dummy_i, lst, listed, fpart, part2, scores, best, thr,
            cnt_s, sum_s, dummy_i, dummy_f, dummy_i,
            q.stride(0), q.stride(1), q.stride(2), centroids.stride(0), centroids.stride(1),
            offsets.stride(0), 0,
            h, nb, g, bq, m, block_q, c, d, split, chunk, nqt, split, split2, c, float(scale),
            QT=qt, BC=bc, BLOCK_D=pow2(d), TWO_LEVEL=False, LIST=hier, HAS_L2=hier,
            LOAD_SCORES=store, DOT=ieee, THRESH=budget <= 0, KEEP_FLAGS=False,
            SP1=pow2(split), SP2=pow2(split2), num_warps=nw)
    tkey = torch.empty(rows, device=dev, dtype=torch.int64)
    cstar = torch.empty(rows, **i32)
    if budget > 0:
        launch(_lk._budget_kernel, (rows,),
                best, offsets, lst, listed, cnt_s, sum_s, tkey, cstar, budget, h, nb, c,
                offsets.stride(0), split, chunk, bc, LIST=hier, BLOCK=min(4096, pow2(c)),
                num_warps=8)
    idx = torch.empty((bsz, h, nb, c), **i32)
    count = torch.empty((bsz, h, nb), **i32)
    cum = torch.empty((rows, c + 1), **i32)
    delta = torch.empty((rows, c), **i32)
    nkeys = torch.empty(rows, **i32)
    launch(_lk._compact_kernel, (rows, split),
            best, offsets, lst, listed, thr, tkey, cstar, cnt_s, sum_s, idx, count, cum, delta,
            nkeys, h, nb, c, offsets.stride(0), split, chunk, bc,
            BUDGET=budget > 0, LIST=hier, BLOCK=min(1024, max(16, pow2(chunk))),
            SPLIT_P=max(2, pow2(split)), num_warps=4)
    sel = Selection(idx, count, cum, delta, nkeys)
    return sel._replace(pos=expand_positions(sel, positions)) if positions > 0 else sel


_POS_KB = 512  # positions written per step of the vector binary search


def expand_positions(sel: Selection, n_ctx: int) -> torch.Tensor:
    """[rows, n_ctx] int32: the sorted position of each row's kept keys, from the cluster list
    (`_expand_kernel`; the decode lookup in threshold mode writes it directly instead)."""
    rows, c = sel.delta.shape
    pos = torch.empty((rows, n_ctx), device=sel.delta.device, dtype=torch.int32)
    per = 4 * _POS_KB  # keys per program: programs past a row's kept keys return at once
    launch(_lk._expand_kernel, (rows, cdiv(n_ctx, per)),
            sel.cum, sel.delta, sel.nkeys, pos, c, n_ctx, per, KB=_POS_KB,
            LOG=int(c).bit_length(), num_warps=4)
    return pos


def select_clusters(q: torch.Tensor, centroids: torch.Tensor, offsets: torch.Tensor,
                    log_threshold: torch.Tensor, coarse_centroids: Optional[torch.Tensor],
                    coarse_offsets: Optional[torch.Tensor],
                    coarse_log_threshold: Optional[torch.Tensor], scale: float, block_q: int,
                    budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA implementation of torch.ops.sqz.select_clusters: (idx, count)."""
    sel = lookup(q, centroids, offsets, log_threshold, coarse_centroids, coarse_offsets,
                 coarse_log_threshold, scale, block_q, budget)
    return sel.idx, sel.count
