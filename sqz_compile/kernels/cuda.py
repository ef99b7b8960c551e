"""Launch glue for the sqz Triton kernels (the CUDA branch of torch.ops.sqz.*).

`select_clusters` and `squeezed_attention` take exactly the argument lists of the ops in
ops.py. Every launch goes through `torch.library.wrap_triton`, so when the op body is traced
(torch.compile / export) Inductor sees the kernels and inlines them into its generated code.
Grids and block sizes come from static shapes only: no `.item()`, no host sync, so the path is
CUDA-graph capturable. Scratch buffers are plain allocations inside the op.

Under TRITON_INTERPRET=1 the launchers also accept CPU tensors (that is how CI tests the
kernels on a CPU-only machine); then kernels are called directly instead of via wrap_triton,
and every tl.dot runs in float32 (the interpreter of triton 3.9 computes bf16 dots wrongly).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch

from . import lookup as _lk
from . import sparse_attention as _sa

if not (_lk.HAS_TRITON and _sa.HAS_TRITON):  # pragma: no cover
    raise ImportError("sqz_compile.kernels.cuda needs triton: pip install triton "
                      "(the CPU path of torch.ops.sqz.* does not)")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    if _interpreting():
        kernel[grid](*args, **kwargs)
    else:
        from torch.library import wrap_triton

        wrap_triton(kernel)[grid](*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 4  # interpreter: a few splits so the split/merge code paths run in CI
    return _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _symbolic(x) -> bool:
    return isinstance(x, torch.SymInt)


def _hint(x) -> int:
    """A concrete value for tuning heuristics. Under dynamic shapes (export, automatic dynamic)
    sizes are symbolic: comparing them would add guards that break the dynamic range, so the
    heuristics read the example value instead. Correctness never depends on it: the kernels mask
    rows and keys by the real sizes passed at launch."""
    if _symbolic(x):
        hint = getattr(x.node, "hint", None)
        return int(hint) if hint is not None else 1
    return int(x)


def _check_device(*ts: Optional[torch.Tensor]) -> None:
    dev = next(t.device for t in ts if t is not None)
    for t in ts:
        if t is not None and t.device != dev:
            raise ValueError(f"sqz: all tensors must be on one device, got {t.device} and {dev}: move "
                             f"the SqueezedContext to the model's device (ctx.to(device))")
    if dev.type != "cuda" and not _interpreting():
        raise ValueError(f"sqz Triton kernels need CUDA tensors (got {dev}); on CPU use the op "
                         f"(torch.ops.sqz.*), whose CPU branch runs the reference")


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


def _lse(q, cent, off, co, par, flags, nflag, scale, dims, split, chunk, qt, bc, two_level,
         filt, scores, store, load, ieee, nw, sync=None):
    b, h, nb, g, bq, m, block_q, d = dims
    rows = b * h * nb
    nqt = _cdiv(g * bq, qt)
    part = torch.empty((rows, split, nqt * qt), device=q.device, dtype=torch.float32)
    c = cent.shape[1]
    _launch(_lk._lse_kernel, (rows, split),
            q, cent, off, co, par, flags, part, scores, part if sync is None else sync,
            q.stride(0), q.stride(1), q.stride(2), cent.stride(0), cent.stride(1),
            off.stride(0), co.stride(0), par.stride(0),
            h, nb, g, bq, m, block_q, c, nflag, d, split, chunk, nqt, float(scale),
            QT=qt, BC=bc, BLOCK_D=_pow2(d), TWO_LEVEL=two_level, FILTER=filt,
            STORE_SCORES=store, LOAD_SCORES=load, DOT=ieee, ZERO_SYNC=sync is not None,
            num_warps=nw)
    return part


def _splits(rows: int, c: int, bc: int, sms: int) -> tuple[int, int]:
    split = max(1, min(_cdiv(4 * sms, rows), _cdiv(c, bc)))
    chunk = _cdiv(_cdiv(c, split), bc) * bc
    return _cdiv(c, chunk), chunk


def lookup(q: torch.Tensor, centroids: torch.Tensor, offsets: torch.Tensor,
           log_threshold: torch.Tensor, coarse_centroids: Optional[torch.Tensor],
           coarse_offsets: Optional[torch.Tensor], coarse_log_threshold: Optional[torch.Tensor],
           scale: float, block_q: int, budget: int,
           tiles: Optional[tuple[int, int]] = None,
           config: Optional[LookupConfig] = None, positions: int = 0) -> Selection:
    """Centroid lookup on the GPU (flat or hierarchical; threshold or budget mode).
    tiles=(query tile, cluster tile) overrides the heuristic (tests use it to force splits);
    config overrides it whole (benchmarks sweep it). Centroids may be float32 or q's dtype.
    positions=N (the context length) also returns the kept keys' positions (Selection.pos);
    decode in threshold mode then writes them from the scores in one fused kernel
    (`_select_kernel`) and skips the cluster list (idx, count, cum, delta are None)."""
    _check_device(q, centroids, offsets, log_threshold, coarse_centroids, coarse_offsets,
                  coarse_log_threshold)
    if q.stride(-1) != 1:
        q = q.contiguous()
    centroids = centroids.contiguous()
    offsets = offsets.to(torch.int32).contiguous()
    bsz, hq, m, d = q.shape
    h, c, _ = centroids.shape
    g = hq // h
    block_q = int(block_q)
    nb = _cdiv(m, block_q)
    # rows per query block: a symbolic M gets the upper bound (the kernels mask rows >= M)
    bq = block_q if _symbolic(m) else min(block_q, m)
    rows = bsz * h * nb
    dev = q.device
    same_half = centroids.dtype == q.dtype and q.dtype != torch.float32
    half_q = q.dtype in (torch.float16, torch.bfloat16)
    qt, bc, store, nw = config or lookup_config(g * bq, same_half or (half_q and g * bq > 16))
    if tiles is not None:
        qt, bc = tiles
        store = store and _cdiv(g * bq, qt) == 1
    # dot mode (see lookup._dot_mu): the interpreter and float32 prefill use exact float32;
    # centroids stored in q's half dtype give exact products on tensor cores; float32 centroids
    # are scored in float32 accuracy (tf32x3) by decode (few query rows, memory-bound) and
    # rounded to q's dtype by prefill (compute-bound)
    if _interpreting() or (q.dtype == torch.float32 and not store):
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
    sms = _sm_count(q)
    dims = (bsz, h, nb, g, bq, m, block_q, d)
    i32 = dict(device=dev, dtype=torch.int32)
    dummy_i = torch.empty(1, **i32)  # placeholders for pointers a variant never reads
    dummy_f = torch.empty(1, device=dev, dtype=torch.float32)
    nqt = _cdiv(g * bq, qt)

    split, chunk = _splits(_hint(rows), c, bc, sms)
    positions = int(positions)
    fused = positions > 0 and store and int(budget) <= 0
    sync = torch.empty((rows, split), device=dev, dtype=torch.int64) if fused else None
    scores = torch.empty((rows, qt, c), device=dev, dtype=torch.float32) if store else dummy_f
    hier = coarse_centroids is not None
    if hier:
        cc_cent = coarse_centroids.contiguous()
        co = coarse_offsets.to(torch.int32).contiguous()
        cc = cc_cent.shape[1]
        csplit, cchunk = _splits(_hint(rows), cc, bc, sms)
        cscores = torch.empty((rows, qt, cc), device=dev, dtype=torch.float32) if store else dummy_f
        # coarse level: lse, best -> keep flags (always threshold mode)
        cpart = _lse(q, cc_cent, offsets, co, dummy_i, dummy_i, 1, scale, dims, csplit, cchunk,
                     qt, bc, True, 0, cscores, store, False, ieee, nw)
        cbest = torch.empty((rows, cc), device=dev, dtype=torch.float32)
        ckeep = torch.empty((rows, cc), device=dev, dtype=torch.int8)
        ccnt = torch.empty((rows, csplit), **i32)
        _launch(_lk._best_kernel, (rows, csplit),
                q, cc_cent, offsets, co, dummy_i, dummy_i, cpart, dummy_f, cscores, cbest,
                coarse_log_threshold.to(torch.float32), ccnt, torch.empty_like(ccnt), ckeep,
                q.stride(0), q.stride(1), q.stride(2), cc_cent.stride(0), cc_cent.stride(1),
                offsets.stride(0), co.stride(0), 0,
                h, nb, g, bq, m, block_q, cc, 1, d, csplit, cchunk, nqt, csplit, 1, float(scale),
                QT=qt, BC=bc, BLOCK_D=_pow2(d), TWO_LEVEL=True, FILTER=0, HAS_L2=False,
                LOAD_SCORES=store, DOT=ieee, THRESH=True, KEEP_FLAGS=True,
                SP1=_pow2(csplit), SP2=1, num_warps=nw)
        # fine denominator: pruned coarse clusters stand for their children
        ppart = _lse(q, cc_cent, offsets, co, dummy_i, ckeep, cc, scale, dims, csplit, cchunk,
                     qt, bc, True, 2, cscores, False, store, ieee, nw)
        par = torch.searchsorted(co[:, 1:].contiguous(),
                                 torch.arange(c, device=dev, dtype=torch.int32).expand(h, c).contiguous(),
                                 right=True).to(torch.int32)
        fpart = _lse(q, centroids, offsets, dummy_i, par, ckeep, cc, scale, dims, split, chunk,
                     qt, bc, False, 1, scores, store, False, ieee, nw, sync)
        part2, split2, filt = ppart, csplit, 1
        flags, nflag = ckeep, cc
    else:
        fpart = _lse(q, centroids, offsets, dummy_i, dummy_i, dummy_i, 1, scale, dims, split,
                     chunk, qt, bc, False, 0, scores, store, False, ieee, nw, sync)
        part2, split2, filt, par, flags, nflag = dummy_f, 1, 0, dummy_i, dummy_i, 1

    thr = log_threshold.to(torch.float32)
    if fused:
        pos = torch.empty((rows, positions), **i32)
        nkeys = torch.empty(rows, **i32)
        # scratch: the cluster list's slots, unpadded (the positions are what is returned)
        cum = torch.empty((rows, c + 1), **i32)
        delta = torch.empty((rows, c), **i32)
        keep = torch.empty((rows, c), device=dev, dtype=torch.int8) if chunk > bc else dummy_i
        _launch(_lk._select_kernel, (rows, split),
                offsets, par, flags, fpart, part2, scores, keep, thr, sync, cum, delta, pos, nkeys,
                offsets.stride(0), par.stride(0) if par.dim() == 2 else 0,
                h, nb, g, bq, m, block_q, c, nflag, split, chunk, split2, positions,
                QT=qt, BC=bc, FILTER=filt, HAS_L2=hier, SP1=_pow2(split), SP2=_pow2(split2),
                ONE_TILE=chunk <= bc, SB=8, KB=128, num_warps=4)
        return Selection(None, None, None, None, nkeys, pos)
    best = torch.empty((rows, c), device=dev, dtype=torch.float32)
    cnt_s = torch.empty((rows, split), **i32)
    sum_s = torch.empty((rows, split), **i32)
    _launch(_lk._best_kernel, (rows, split),
            q, centroids, offsets, dummy_i, par, flags, fpart, part2, scores, best, thr,
            cnt_s, sum_s, dummy_i,
            q.stride(0), q.stride(1), q.stride(2), centroids.stride(0), centroids.stride(1),
            offsets.stride(0), 0, par.stride(0) if par.dim() == 2 else 0,
            h, nb, g, bq, m, block_q, c, nflag, d, split, chunk, nqt, split, split2, float(scale),
            QT=qt, BC=bc, BLOCK_D=_pow2(d), TWO_LEVEL=False, FILTER=filt, HAS_L2=hier,
            LOAD_SCORES=store, DOT=ieee, THRESH=budget <= 0, KEEP_FLAGS=False,
            SP1=_pow2(split), SP2=_pow2(split2), num_warps=nw)
    tkey = torch.empty(rows, device=dev, dtype=torch.int64)
    cstar = torch.empty(rows, **i32)
    if budget > 0:
        _launch(_lk._budget_kernel, (rows,),
                best, offsets, cnt_s, sum_s, tkey, cstar, budget, h, nb, c, offsets.stride(0),
                split, chunk, BLOCK=min(4096, _pow2(c)), num_warps=8)
    idx = torch.empty((bsz, h, nb, c), **i32)
    count = torch.empty((bsz, h, nb), **i32)
    cum = torch.empty((rows, c + 1), **i32)
    delta = torch.empty((rows, c), **i32)
    nkeys = torch.empty(rows, **i32)
    _launch(_lk._compact_kernel, (rows, split),
            best, offsets, thr, tkey, cstar, cnt_s, sum_s, idx, count, cum, delta, nkeys,
            h, nb, c, offsets.stride(0), split, chunk,
            BUDGET=budget > 0, BLOCK=min(1024, max(16, _pow2(chunk))), SPLIT_P=max(2, _pow2(split)),
            num_warps=4)
    sel = Selection(idx, count, cum, delta, nkeys)
    return sel._replace(pos=expand_positions(sel, positions)) if positions > 0 else sel


_POS_KB = 512  # positions written per step of the vector binary search


def expand_positions(sel: Selection, n_ctx: int) -> torch.Tensor:
    """[rows, n_ctx] int32: the sorted position of each row's kept keys, from the cluster list
    (`_expand_kernel`; the decode lookup in threshold mode writes it directly instead)."""
    rows, c = sel.delta.shape
    pos = torch.empty((rows, n_ctx), device=sel.delta.device, dtype=torch.int32)
    per = 4 * _POS_KB  # keys per program: programs past a row's kept keys return at once
    _launch(_lk._expand_kernel, (rows, _cdiv(n_ctx, per)),
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


class AttnConfig(NamedTuple):
    bq: int       # queries per tile (per head of the group)
    gp: int       # group size padded to a power of two
    block_n: int  # keys per tile
    split: int    # programs per query tile along the keys
    num_warps: int
    num_stages: int
    pos_list: bool = False  # read the kept keys through their positions (Selection.pos)


# positions buffer [rows, context keys] int32: used only while it stays this small (prefill of
# 1024 tokens over 128K context with 8 KV heads needs 64 MiB + 4 MiB)
_POS_LIST_BYTES = 128 << 20


def attention_config(bsz: int, h: int, g: int, m: int, block_q: int, n_ctx: int, w: int, s: int,
                     d: int, sms: int) -> AttnConfig:
    """Tile shapes and split count from static shapes (prefill: 64-row GQA-packed tiles;
    decode: one 16-row tile per KV head and many splits)."""
    gp = _pow2(g)
    dynamic_m = _symbolic(m)
    bqv = block_q if dynamic_m else min(block_q, m)  # symbolic M: tiles cover a whole block
    decode = not dynamic_m and gp * _pow2(bqv) <= 16
    if decode:
        bq = max(_pow2(bqv), 16 // gp)
        block_n = 64 if d <= 128 else 32
        warps, stages = 4, 2  # more stages gain nothing here: benchmarks/NOTES.md v7
    else:
        bq = max(1, min(_pow2(bqv), 128 // gp)) if gp <= 128 else 1
        block_n = 64 if d <= 128 else 32
        warps, stages = (8, 3) if gp * bq >= 128 else (4, 2)
    nb = _cdiv(_hint(m), block_q)
    tpb = _cdiv(bqv, bq)
    progs = _hint(bsz) * h * nb * tpb
    max_tiles = _cdiv(n_ctx + w + _hint(s), block_n)
    # decode: ~4 programs per SM keep enough K/V bytes in flight; prefill: split only when the
    # query tiles alone leave SMs idle
    want = 4 * sms if decode else sms
    split = max(1, min(_cdiv(want, progs), max(1, max_tiles // 4)))
    # a list of the kept keys' positions (written by the lookup) takes the slot search out of
    # the attention loop, whose K/V loads then pipeline; its buffer is bounded
    pos_list = _hint(bsz) * h * nb * n_ctx * 4 <= _POS_LIST_BYTES
    return AttnConfig(bq, gp, block_n, split, warps, stages, pos_list)


def _search_width(c: int) -> int:
    """Vector width of the two-level start-slot search: width**2 must cover C+1 slots."""
    w = 16
    while w * w < c + 1:
        w *= 2
    return w


def sparse_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     attn_mask: Optional[torch.Tensor], ctx_keys: torch.Tensor,
                     ctx_values: torch.Tensor, sel: Selection, window_keys: torch.Tensor,
                     window_values: torch.Tensor, scale: float, is_causal: bool, block_q: int,
                     config: Optional[AttnConfig] = None,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact attention over the lookup's selection + window + new tokens (Triton). `out`: a
    contiguous [B, Hq, M, D] tensor of q's dtype to write into (tests poison it first)."""
    _check_device(q, k_new, v_new, attn_mask, ctx_keys, ctx_values, window_keys, window_values)

    def lastdim(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k_new, v_new = lastdim(q), lastdim(k_new), lastdim(v_new)
    ctx_keys, ctx_values = lastdim(ctx_keys), lastdim(ctx_values)
    window_keys, window_values = lastdim(window_keys), lastdim(window_values)
    bsz, hq, m, d = q.shape
    h, n_ctx, _ = ctx_keys.shape
    g = hq // h
    s = k_new.shape[2]
    w = window_keys.shape[1]
    c = sel.delta.shape[1] if sel.delta is not None else 1
    block_q = int(block_q)
    nb = _cdiv(m, block_q)
    cfg = config or attention_config(bsz, h, g, m, block_q, n_ctx, w, s, d, _sm_count(q))
    tpb = _cdiv(block_q if _symbolic(m) else min(block_q, m), cfg.bq)
    dev = q.device

    mask_kind = _sa.MASK_NONE
    mask = torch.empty(1, device=dev, dtype=torch.uint8)  # placeholders are never read
    mstr = (0, 0, 0, 0)
    if attn_mask is not None:
        if attn_mask.dim() > 4:
            raise ValueError(f"sqz: attn_mask must broadcast to [B, Hq, M, S], got {tuple(attn_mask.shape)}")
        mask = torch.broadcast_to(attn_mask, (bsz, hq, m, s))
        if attn_mask.dtype == torch.bool:
            # passed as bool (Triton's int1 pointer): a uint8 view would be a dtype bitcast,
            # which Inductor cannot lower for bool
            mask_kind = _sa.MASK_BOOL
        else:
            mask_kind = _sa.MASK_FLOAT
        mstr = tuple(mask.stride())
        is_causal = False  # SDPA: an explicit mask is the whole story

    if out is None:
        out = torch.empty((bsz, hq, m, d), device=dev, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"sqz: out must be a contiguous {tuple(q.shape)} {q.dtype} tensor")
    pos = sel.pos
    if pos is None and cfg.pos_list:
        pos = expand_positions(sel, n_ctx)
    use_pos = pos is not None
    if use_pos:
        cum = delta = sel.nkeys  # unused by the position-list loop
    else:
        if sel.cum is None:
            raise ValueError("sqz: this Selection holds only positions; run lookup without "
                             "positions= for the cluster-list attention")
        cum, delta, pos = sel.cum, sel.delta, sel.nkeys  # pos unused
    partial = cfg.split > 1
    if partial:
        part_o = torch.empty((cfg.split, bsz, hq, m, d), device=dev, dtype=torch.float32)
        part_l = torch.empty((cfg.split, bsz, hq, m), device=dev, dtype=torch.float32)
    else:
        part_o = part_l = torch.empty(1, device=dev, dtype=torch.float32)
    grid = (bsz * h * nb * tpb, cfg.split)
    _launch(_sa._sparse_attn_kernel, grid,
            q, k_new, v_new, mask, ctx_keys, ctx_values, window_keys, window_values,
            cum, delta, sel.nkeys, pos, out, part_o, part_l,
            q.stride(0), q.stride(1), q.stride(2),
            k_new.stride(0), k_new.stride(1), k_new.stride(2),
            v_new.stride(0), v_new.stride(1), v_new.stride(2),
            *mstr,
            ctx_keys.stride(0), ctx_keys.stride(1), ctx_values.stride(0), ctx_values.stride(1),
            window_keys.stride(0), window_keys.stride(1), window_values.stride(0), window_values.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            bsz, h, g, m, s, w, nb, c, n_ctx, block_q, tpb, cfg.split, float(scale) * 1.4426950408889634, d,
            BQ=cfg.bq, GP=cfg.gp, BLOCK_N=cfg.block_n, BLOCK_D=_pow2(d),
            MASK_KIND=mask_kind, IS_CAUSAL=bool(is_causal), PARTIAL=partial,
            IEEE=q.dtype == torch.float32 or _interpreting(), SEARCH=_search_width(c),
            POS_LIST=use_pos,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if partial:
        rows = bsz * hq * m
        _launch(_sa._merge_kernel, (rows,),
                part_o, part_l, out, rows, hq, m, out.stride(0), out.stride(1), out.stride(2),
                cfg.split, d, SP=max(2, _pow2(cfg.split)), BLOCK_D=_pow2(d), num_warps=4)
    return out


def squeezed_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                       attn_mask: Optional[torch.Tensor], ctx_keys: torch.Tensor,
                       ctx_values: torch.Tensor, centroids: torch.Tensor, offsets: torch.Tensor,
                       window_keys: torch.Tensor, window_values: torch.Tensor,
                       log_threshold: torch.Tensor, coarse_centroids: Optional[torch.Tensor],
                       coarse_offsets: Optional[torch.Tensor],
                       coarse_log_threshold: Optional[torch.Tensor], scale: float,
                       is_causal: bool, budget: int, block_q: int) -> torch.Tensor:
    """CUDA implementation of torch.ops.sqz.squeezed_attention: lookup, then sparse attention
    (decode: the lookup writes the kept keys' positions for the attention loop)."""
    h, n_ctx, d = ctx_keys.shape
    cfg = attention_config(q.shape[0], h, q.shape[1] // h, q.shape[2], int(block_q), n_ctx,
                           window_keys.shape[1], k_new.shape[2], d, _sm_count(q))
    sel = lookup(q, centroids, offsets, log_threshold, coarse_centroids, coarse_offsets,
                 coarse_log_threshold, scale, block_q, budget,
                 positions=n_ctx if cfg.pos_list else 0)
    return sparse_attention(q, k_new, v_new, attn_mask, ctx_keys, ctx_values, sel, window_keys,
                            window_values, scale, is_causal, block_q, config=cfg)
