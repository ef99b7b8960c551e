"""Launch glue for the sparse attention's Triton kernels: the CUDA branch of
torch.ops.sqz.squeezed_attention (lookup from lookup/launch.py, then the attention kernel and the
split-K merge). Same rules as lookup/launch.py: wrap_triton launches, static-shape heuristics, no
host sync."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..lookup.launch import Selection, expand_positions, lookup
from ..triton_common import cdiv, check_device, hint, interpreting, lastdim, launch, pow2, sm_count, symbolic
from ..quant import triton as _qt
from ..quant.reference import codebook_bits
from . import triton as _sa


class AttnConfig(NamedTuple):
    bq: int       # queries per tile (per head of the group)
    gp: int       # group size padded to a power of two
    block_n: int  # keys per tile
    split: int    # programs per query tile along the keys
    num_warps: int
    num_stages: int
    pos_list: bool = False  # read the kept keys through their positions (Selection.pos)
    fixed: bool = False     # stages as given, also for a low-bit context (sweeps)
    maxnreg: int = 0        # ptxas register cap per thread (0: ptxas picks)


# low-bit decode, per bits: (keys per tile, pipeline stages, ptxas register cap, programs per SM
# the split aims at). NOTES v15, decode step at 128K on the H200: 4 bits 16-key tiles 79.0 us
# (64-key tiles uncapped: 96.4); 2 bits 32-key tiles 80.8 us, 16-key tiles 108 us (its select
# tree); 3 bits measured with the 32-key shape only (89.4 us, v13: 108)
LOWBIT_DECODE = {4: (16, 3, 128, 4), 3: (32, 2, 128, 8), 2: (32, 2, 128, 8)}

# 2- and 4-bit HALVES tiles of a bf16/fp16 model can dequantize on packed pairs (quant/triton.py
# "PAIRS"). Off: on the H200 it matches the float64 reference but made the 4-bit decode step slower
# (128K: 85.5 vs 77.8 us) and the 4-bit prefill no faster (NOTES v17); the tests and benchmarks switch
# it on explicitly.
PAIRS = False

# positions buffer [rows, context keys] int32: used only while it stays this small (prefill of
# 1024 tokens over 128K context with 8 KV heads needs 64 MiB + 4 MiB)
_POS_LIST_BYTES = 128 << 20


def attention_config(bsz: int, h: int, g: int, m: int, block_q: int, n_ctx: int, w: int, s: int,
                     d: int, sms: int, qbits: int = 0, register_cap: bool = True) -> AttnConfig:
    """Tile shapes and split count from static shapes (prefill: 64-row GQA-packed tiles;
    decode: one 16-row tile per KV head and many splits). `qbits`: a low-bit context's bits
    (0: 16-bit), whose decode tiles dequantize in registers and take their own shapes; without
    `register_cap` (a traced launch, which cannot pass one), or on a layout other than HALVES
    (padded head dims: untimed), they keep v13's uncapped shape."""
    gp = pow2(g)
    dynamic_m = symbolic(m)
    bqv = block_q if dynamic_m else min(block_q, m)  # symbolic M: tiles cover a whole block
    decode = not dynamic_m and gp * pow2(bqv) <= 16
    maxnreg = 0
    per_sm = 4  # decode: ~4 programs per SM keep enough K/V bytes in flight
    if decode:
        bq = max(pow2(bqv), 16 // gp)
        block_n = 64 if d <= 128 else 32
        # more stages gain nothing here (NOTES v7)
        warps, stages = 4, 2
        if qbits and register_cap and _qt.halves(d, qbits):
            # the low-bit tile is bound by the dequantization's dependent ALU chains, with two warps
            # per scheduler at 255 registers: small tiles under a 128-register cap fit four
            # programs per SM (4-bit attention kernel: 32K 33.0 -> 23.8 us, 128K 73.0 -> 60.6 us)
            block_n, stages, maxnreg, per_sm = LOWBIT_DECODE[qbits]
    else:
        bq = max(1, min(pow2(bqv), 128 // gp)) if gp <= 128 else 1
        block_n = 64 if d <= 128 else 32
        warps, stages = (8, 3) if gp * bq >= 128 else (4, 2)
    nb = cdiv(hint(m), block_q)
    tpb = cdiv(bqv, bq)
    progs = hint(bsz) * h * nb * tpb
    max_tiles = cdiv(n_ctx + w + hint(s), block_n)
    # prefill: split only when the query tiles alone leave SMs idle
    want = per_sm * sms if decode else sms
    split = max(1, min(cdiv(want, progs), max(1, max_tiles // 4)))
    # a list of the kept keys' positions (written by the lookup) takes the slot search out of
    # the attention loop, whose K/V loads then pipeline; its buffer is bounded
    pos_list = hint(bsz) * h * nb * n_ctx * 4 <= _POS_LIST_BYTES
    return AttnConfig(bq, gp, block_n, split, warps, stages, pos_list, maxnreg=maxnreg)


def _stages(cfg: AttnConfig, qbits: int, halves: bool) -> int:
    """Software-pipeline depth of the attention launch: the config's for a 16-bit context. Low-bit
    with HALVES: the next tiles' packed words and positions load by cp.async while this tile
    dequantizes; at most 3 for a decode tile (16 rows; 3 with 4-bit 16-key tiles: NOTES v15) and 2
    for prefill (sm_90: 64 KB of shared memory at 2). Other low-bit layouts (padded head dims): 1
    (their per-entry gathers do not pipeline, and the old 3-bit per-entry prefill took 147 KB at
    2 stages)."""
    if not qbits or cfg.fixed:
        return cfg.num_stages
    if not halves:
        return 1
    return min(cfg.num_stages, 3 if cfg.gp * cfg.bq <= 16 else 2)


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
                     out: Optional[torch.Tensor] = None, quant: Optional[tuple] = None,
                     partials: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Exact attention over the lookup's selection + window + new tokens (Triton). `out`: a
    contiguous [B, Hq, M, D] tensor of q's dtype to write into (tests poison it first). `quant`:
    a low-bit context's (perm, rope, codebooks, key_norm, value_norm, outlier_idx, outlier_val)
    of this layer; ctx_keys/ctx_values are then its packed int32 codes. `partials`: (part_o
    [P, B, Hq, M, D], part_l [P, B, Hq, M]) float32 with P >= config.split: write the splits'
    partial outputs and log-sum-exps into their first config.split entries and leave `out` and
    the merge to the caller (the union-read decode adds its own splits)."""
    check_device(q, k_new, v_new, attn_mask, ctx_keys, ctx_values, window_keys, window_values)
    q, k_new, v_new = lastdim(q), lastdim(k_new), lastdim(v_new)
    ctx_keys, ctx_values = lastdim(ctx_keys), lastdim(ctx_values)
    window_keys, window_values = lastdim(window_keys), lastdim(window_values)
    bsz, hq, m, d = q.shape
    h, n_ctx, words = ctx_keys.shape
    g = hq // h
    qargs, qbits, nout = _quant_args(quant, ctx_keys, ctx_values, d)
    if qbits:  # the dequant helpers address packed rows as (h * N + pos) * words: no strides
        ctx_keys, ctx_values = ctx_keys.contiguous(), ctx_values.contiguous()
    halves = bool(qbits) and _qt.halves(d, qbits)
    s = k_new.shape[2]
    w = window_keys.shape[1]
    c = sel.delta.shape[1] if sel.delta is not None else 1
    block_q = int(block_q)
    nb = cdiv(m, block_q)
    cap = _can_cap(q)
    cfg = config or attention_config(bsz, h, g, m, block_q, n_ctx, w, s, d, sm_count(q), qbits, cap)
    tpb = cdiv(block_q if symbolic(m) else min(block_q, m), cfg.bq)
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
    partial = cfg.split > 1 or partials is not None
    if partials is not None:
        part_o, part_l = partials
    elif partial:
        part_o = torch.empty((cfg.split, bsz, hq, m, d), device=dev, dtype=torch.float32)
        part_l = torch.empty((cfg.split, bsz, hq, m), device=dev, dtype=torch.float32)
    else:
        part_o = part_l = torch.empty(1, device=dev, dtype=torch.float32)
    grid = (bsz * h * nb * tpb, cfg.split)
    fast = bool(qbits) and _qt.fast_math(dev)
    pairs = PAIRS and halves and qbits in (2, 4) and q.dtype in (torch.bfloat16, torch.float16)
    # PAIRS: each program writes its level table (2 x 256 bytes x 4 // bits int32) into its own
    # slice; otherwise the kernel never reads Tab and the int32 perm argument stands in
    tab = torch.empty(grid[0] * grid[1] * 2048 // qbits, device=dev, dtype=torch.int32) if pairs else qargs[0]
    launch(_sa._sparse_attn_kernel, grid,
            q, k_new, v_new, mask, ctx_keys, ctx_values, window_keys, window_values,
            cum, delta, sel.nkeys, pos, out, part_o, part_l, *qargs, tab, words, qargs[2].shape[-1],
            q.stride(0), q.stride(1), q.stride(2),
            k_new.stride(0), k_new.stride(1), k_new.stride(2),
            v_new.stride(0), v_new.stride(1), v_new.stride(2),
            *mstr,
            ctx_keys.stride(0), ctx_keys.stride(1), ctx_values.stride(0), ctx_values.stride(1),
            window_keys.stride(0), window_keys.stride(1), window_values.stride(0), window_values.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            bsz, h, g, m, s, w, nb, c, n_ctx, block_q, tpb, cfg.split, float(scale) * 1.4426950408889634, d,
            BQ=cfg.bq, GP=cfg.gp, BLOCK_N=cfg.block_n, BLOCK_D=pow2(d),
            MASK_KIND=mask_kind, IS_CAUSAL=bool(is_causal), PARTIAL=partial,
            IEEE=q.dtype == torch.float32 or interpreting(), SEARCH=_search_width(c),
            POS_LIST=use_pos, QBITS=qbits, NOUT=nout, HALVES=halves, FAST=fast, PAIRS=pairs,
            num_warps=cfg.num_warps, num_stages=_stages(cfg, qbits, halves),
            **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and cap else {}))
    if partial and partials is None:
        merge_splits(part_o, part_l, out, cfg.split)
    return out


def _can_cap(t: torch.Tensor) -> bool:
    """Whether a launch on `t` may pass ptxas a register cap (`maxnreg`): a direct launch on a GPU.
    The interpreter has no registers, and a traced launch (Dynamo, AOT, export, Inductor: fake
    tensors) takes only the standard launch options."""
    from torch._guards import detect_fake_mode

    return not (interpreting() or torch.compiler.is_compiling() or detect_fake_mode((t,)) is not None)


def merge_splits(part_o: torch.Tensor, part_l: torch.Tensor, out: torch.Tensor, splits: int) -> None:
    """out [B, Hq, M, D] from the first `splits` partial outputs and log-sum-exps (part_o [P, B,
    Hq, M, D], part_l [P, B, Hq, M] float32) of a split-K attention launch."""
    bsz, hq, m, d = out.shape
    rows = bsz * hq * m
    launch(_sa._merge_kernel, (rows,),
           part_o, part_l, out, rows, hq, m, out.stride(0), out.stride(1), out.stride(2),
           splits, d, SP=max(2, pow2(splits)), BLOCK_D=pow2(d), num_warps=4)


def _quant_args(quant: Optional[tuple], ctx_keys: torch.Tensor, ctx_values: torch.Tensor,
                d: int) -> tuple[list[torch.Tensor], int, int]:
    """The attention kernel's low-bit arguments (contiguous), QBITS and NOUT; placeholders
    (never read) and QBITS = 0 for a 16-bit context."""
    if quant is None:  # torch.empty: no kernel launch per call (a decode step's graph grows by each)
        def dummy(dtype):
            return torch.empty(1, device=ctx_keys.device, dtype=dtype)

        f32 = dummy(torch.float32)
        return [dummy(torch.int32), f32, f32, f32, dummy(torch.float16), dummy(torch.int16), dummy(torch.float16)], 0, 0
    perm, rope, codebooks, key_norm, value_norm, oidx, oval = quant
    if ctx_keys.dtype != torch.int32 or ctx_values.dtype != torch.int32:
        raise ValueError("sqz: a low-bit context's keys/values must be packed int32 codes")
    if int(d) % 2:
        raise ValueError(f"sqz: low-bit keys are re-rotated with RoPE, which needs an even head dim, got {d}")
    qbits = codebook_bits(codebooks)
    nout = 0
    if oidx is None:
        oidx, oval = perm.new_empty(1, dtype=torch.int16), perm.new_empty(1, dtype=torch.float16)
    else:
        nout = int(oidx.shape[-1])
    args = [perm, rope, codebooks, key_norm, value_norm, oidx, oval]
    return [t.contiguous() for t in args], qbits, nout


def squeezed_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                       attn_mask: Optional[torch.Tensor], ctx_keys: torch.Tensor,
                       ctx_values: torch.Tensor, centroids: torch.Tensor, offsets: torch.Tensor,
                       window_keys: torch.Tensor, window_values: torch.Tensor,
                       log_threshold: torch.Tensor, coarse_centroids: Optional[torch.Tensor],
                       coarse_offsets: Optional[torch.Tensor],
                       coarse_log_threshold: Optional[torch.Tensor], radii: Optional[torch.Tensor],
                       perm: Optional[torch.Tensor], rope: Optional[torch.Tensor],
                       codebooks: Optional[torch.Tensor], key_norm: Optional[torch.Tensor],
                       value_norm: Optional[torch.Tensor], outlier_idx: Optional[torch.Tensor],
                       outlier_val: Optional[torch.Tensor],
                       scale: float, is_causal: bool, budget: int, block_q: int) -> torch.Tensor:
    """CUDA implementation of torch.ops.sqz.squeezed_attention: lookup, then sparse attention
    (decode: the lookup writes the kept keys' positions for the attention loop). A decode batch
    (B >= 2) over a 16-bit context takes the union read (kernels/union/launch.py: each kept
    cluster read once for all rows that keep it; in flat threshold mode the lookup too runs per
    group of rows) unless `union.launch.ENABLED` is False. radii serve only the error-bounded
    mode, which the op runs in torch ops before reaching this launcher."""
    from ..union import launch as _union

    if _union.applies(q, ctx_keys, codebooks):
        if coarse_centroids is None and budget <= 0:  # flat threshold: the lookup per row group
            return _union.union_decode_attention(q, k_new, v_new, attn_mask, ctx_keys, ctx_values, offsets,
                                                 None, window_keys, window_values, scale, is_causal, block_q,
                                                 lookup=(centroids, log_threshold))
        sel = lookup(q, centroids, offsets, log_threshold, coarse_centroids, coarse_offsets,
                     coarse_log_threshold, scale, block_q, budget)
        return _union.union_decode_attention(q, k_new, v_new, attn_mask, ctx_keys, ctx_values, offsets,
                                             sel, window_keys, window_values, scale, is_causal, block_q)
    h, n_ctx = ctx_keys.shape[:2]
    d = q.shape[3]
    qbits = 0 if codebooks is None else codebook_bits(codebooks)
    cfg = attention_config(q.shape[0], h, q.shape[1] // h, q.shape[2], int(block_q), n_ctx,
                           window_keys.shape[1], k_new.shape[2], d, sm_count(q), qbits, _can_cap(q))
    sel = lookup(q, centroids, offsets, log_threshold, coarse_centroids, coarse_offsets,
                 coarse_log_threshold, scale, block_q, budget,
                 positions=n_ctx if cfg.pos_list else 0)
    return sparse_attention(q, k_new, v_new, attn_mask, ctx_keys, ctx_values, sel, window_keys,
                            window_values, scale, is_causal, block_q, config=cfg,
                            quant=None if codebooks is None else
                            (perm, rope, codebooks, key_norm, value_norm, outlier_idx, outlier_val))
