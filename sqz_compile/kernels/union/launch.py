"""Launch glue of the union-read decode attention (the CUDA branch of torch.ops.sqz.squeezed_attention
for a decode batch over one 16-bit context; attention/launch.py dispatches here). Same rules as
the other launchers: wrap_triton launches, tile shapes and splits from static shapes, no host sync.

Pipeline: the selection as a word of row bits per (group of rows, KV head, cluster) -- flat
threshold mode: `_group_lse_kernel` + `_group_words_kernel` (centroids read once per group);
budget / hierarchical: the per-row lookup's compact lists (idx, count) OR-ed by `_mark_kernel` --
then `_union_pos_kernel` (position and row word of every union key; while that buffer is small,
else `_union_list_kernel`: the union's cluster list, walked by slot search) ->
`_union_attn_kernel` (context union + window, split-K) -> the per-row kernel for each row's own
new keys under the model's mask, as further splits -> the per-row `_merge_kernel`.

Low-bit contexts (kv_bits < 16) stay on the per-row path: the union kernel reads stored K/V only.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch

from ..attention.launch import _POS_LIST_BYTES, _search_width, attention_config, merge_splits, sparse_attention
from ..lookup.launch import Selection, lookup_inputs
from ..lookup.reference import pick_threshold
from ..triton_common import cdiv, check_device, hint, interpreting, lastdim, launch, pow2, sm_count, symbolic
from . import triton as _un

# Dispatch switch read when the op body runs (so at trace / capture time under torch.compile and
# CUDA graphs): False sends decode batches down the per-row path (benchmarks time both).
ENABLED = True

_MAX_ROWS = 128    # query tile rows (batch rows x padded group): a 128 x 64 score tile, 8 warps
_MAX_PARTS = 64    # union + own-key splits: the merge holds them all in one 2-D load
_MARK_BLOCK = 1024
_POS_CH = 256      # clusters per program of the union's position writer


class UnionConfig(NamedTuple):
    br: int         # batch rows per group (query tile = br x gp rows; row bits per word <= 32)
    gp: int         # group size padded to a power of two
    block_n: int    # keys per tile
    split: int      # programs per (group, KV head) along the union's keys
    own_split: int  # splits of the per-row kernel over the rows' own new keys
    num_warps: int
    num_stages: int
    pos_list: bool = True  # positions + row words per union key (buffer bounded), not slot search


@contextlib.contextmanager
def per_row_reads():
    """Within this block the decode op reads every row's kept clusters separately (the per-row
    path), e.g. for a benchmark to time both paths."""
    global ENABLED
    old, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = old


def _max_rows(d: int) -> int:
    """Query tile rows: 128 (a 128 x 64 score tile, 8 warps) up to head dim 128, 64 above (the
    float32 accumulator is rows x head dim)."""
    return _MAX_ROWS if d <= 128 else _MAX_ROWS // 2


def applies(q: torch.Tensor, ctx_keys: torch.Tensor, codebooks: Optional[torch.Tensor]) -> bool:
    """Union read for decode (one static query per row) of >= 2 rows over a 16-bit context whose
    GQA group fits a query tile."""
    m = q.shape[2]
    return (ENABLED and codebooks is None and ctx_keys.dtype != torch.int32 and not symbolic(m)
            and int(m) == 1 and hint(q.shape[0]) >= 2
            and pow2(q.shape[1] // ctx_keys.shape[0]) <= _max_rows(q.shape[3]) and q.shape[3] <= 256)


def union_config(bsz: int, h: int, g: int, n_ctx: int, w: int, s: int, d: int, sms: int) -> UnionConfig:
    """Groups of up to 32 rows in a query tile of at most 128 rows (at least 16, for tl.dot);
    ~4 programs per SM for small tiles and ~2 for 128-row tiles (8 warps, 3 stages: the prefill
    kernel's 128-row setting), capped so the merge takes every split in one load."""
    gp = pow2(g)
    cap = max(1, min(32, _max_rows(d) // gp))
    br = max(min(pow2(hint(bsz)), cap), cdiv(16, gp))
    block_m = br * gp
    block_n = 64 if d <= 128 else 32
    warps, stages = (8, 3) if block_m >= 128 else (4, 2)
    ng = cdiv(hint(bsz), br)
    progs = ng * h
    own = max(1, min(cdiv(max(hint(s), 1), block_n), cdiv(4 * sms, hint(bsz) * h), 16))
    want = (2 if block_m >= 128 else 4) * sms
    split = max(1, min(cdiv(want, progs), max(1, cdiv(n_ctx + w, block_n) // 4), _MAX_PARTS - own))
    pos_list = ng * h * n_ctx * 8 <= _POS_LIST_BYTES
    return UnionConfig(br, gp, block_n, split, own, warps, stages, pos_list)


def marked_words(sel: Selection, bsz: int, h: int, c: int, br: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(words, zero): words [NG*H*C (+ more)] int32, the rows' bits per (group, head, cluster)
    from any lookup's compact lists (sel.idx, sel.count); zero [B*H] int32 zeros, the per-row
    kernel's kept-key count for the own-keys launch (here the tail of the words' fill)."""
    ng = cdiv(bsz, br)
    words = torch.zeros(ng * h * c + bsz * h, device=sel.idx.device, dtype=torch.int32)
    launch(_un._mark_kernel, (bsz * h,), sel.idx, sel.count, words, h, c, br,
           BLOCK=_MARK_BLOCK, num_warps=4)
    return words, words[ng * h * c:]


def group_words(q: torch.Tensor, centroids: torch.Tensor, offsets: torch.Tensor,
                log_threshold: torch.Tensor, scale: float, br: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat threshold lookup of a decode batch (q [B, Hq, 1, D]) per group of br rows: what
    `marked_words` returns, computed straight from the scores, each
    centroid tile read once per (group, KV head). Same rule as the per-row lookup
    (lookup/reference.py); the float rounding of the scores and partition sums differs as between
    any two tilings (the per-row lookup's own splits change with the batch size)."""
    check_device(q, centroids, offsets, log_threshold)
    q, centroids, offsets = lookup_inputs(q, centroids, offsets, scale)
    thr = pick_threshold(log_threshold, 1).to(torch.float32)
    bsz, hq, _, dq = q.shape
    h, c, _ = centroids.shape
    g = hq // h
    gp = pow2(g)
    ng = cdiv(bsz, br)
    # dot mode as the per-row decode lookup's (lookup/launch.py): exact float32 under the
    # interpreter, tensor cores for centroids in q's half dtype, tf32x3 for float32 centroids
    if interpreting():
        dot = 1
    elif centroids.dtype == q.dtype and q.dtype != torch.float32:
        dot = 0
    else:
        dot = 2
    block_d = pow2(dq)
    bc = 64 if block_d <= 128 else 32
    split = max(1, min(cdiv(4 * sm_count(q), ng * h), cdiv(c, bc), 64))
    chunk = cdiv(cdiv(c, split), bc) * bc
    split = cdiv(c, chunk)
    part = torch.empty((ng * h, split, br * gp), device=q.device, dtype=torch.float32)
    args = (q.stride(0), q.stride(1), centroids.stride(0), centroids.stride(1), offsets.stride(0),
            bsz, h, g, c, dq, split, chunk, float(scale))
    warps = 8 if br * gp >= 128 else 4
    launch(_un._group_lse_kernel, (ng * h, split), q, centroids, offsets, part, *args,
           BR=br, GP=gp, BC=bc, BLOCK_D=block_d, DOT=dot, num_warps=warps)
    # two buffers: two kernel arguments aliasing one buffer, both written, could be
    # functionalized (torch.compile) into two clones, one of them lost
    cw = torch.empty(ng * h * c, device=q.device, dtype=torch.int32)
    zero = torch.empty(bsz * h, device=q.device, dtype=torch.int32)
    launch(_un._group_words_kernel, (ng * h, split), q, centroids, offsets, part, thr, cw, zero, *args,
           BR=br, GP=gp, BC=bc, BLOCK_D=block_d, DOT=dot, SP=max(2, pow2(split)), num_warps=warps)
    return cw, zero


def union_list(words: torch.Tensor, offsets: torch.Tensor, ng: int, h: int):
    """(cum, delta, word, nkeys): the union's cluster list per (group, KV head) from the words
    (union/reference.py says what each holds)."""
    c = offsets.shape[-1] - 1
    i32 = dict(device=offsets.device, dtype=torch.int32)
    offsets = offsets.to(torch.int32).contiguous()
    ucum = torch.empty((ng * h, c + 1), **i32)
    udelta = torch.empty((ng * h, c), **i32)
    uword = torch.empty((ng * h, c), **i32)
    unkeys = torch.empty(ng * h, **i32)
    launch(_un._union_list_kernel, (ng * h,), words, offsets, ucum, udelta, uword, unkeys, h, c,
           offsets.stride(0), BLOCK=min(2048, max(16, pow2(c))), num_warps=8)
    return ucum, udelta, uword, unkeys


def union_positions(words: torch.Tensor, offsets: torch.Tensor, ng: int, h: int, n_ctx: int,
                    chunk: int = 0):
    """(pos, kword, nkeys): per (group, KV head) the sorted position and the rows' word of each
    union key ([NG*H, n_ctx] int32, valid up to nkeys [NG*H]). chunk: clusters per program
    (tests force several)."""
    chunk = chunk or _POS_CH
    c = offsets.shape[-1] - 1
    i32 = dict(device=offsets.device, dtype=torch.int32)
    offsets = offsets.to(torch.int32).contiguous()
    upos = torch.empty((ng * h, n_ctx), **i32)
    kword = torch.empty((ng * h, n_ctx), **i32)
    unkeys = torch.empty(ng * h, **i32)
    launch(_un._union_pos_kernel, (ng * h, cdiv(c, chunk)), words, offsets, upos, kword, unkeys,
           h, c, n_ctx, offsets.stride(0), chunk, BLOCK=2048, SB=16, KB=64, num_warps=4)
    return upos, kword, unkeys


def union_decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                           attn_mask: Optional[torch.Tensor], ctx_keys: torch.Tensor,
                           ctx_values: torch.Tensor, offsets: torch.Tensor,
                           sel: Optional[Selection], window_keys: torch.Tensor,
                           window_values: torch.Tensor, scale: float, is_causal: bool, block_q: int,
                           config: Optional[UnionConfig] = None, out: Optional[torch.Tensor] = None,
                           lookup: Optional[tuple] = None) -> torch.Tensor:
    """Decode attention (q [B, Hq, 1, D]) over each row's selection + window + the row's new
    keys, reading each kept cluster's K/V once per group of rows instead of once per row. The
    selection: `sel` (any lookup's compact lists, sel.idx / sel.count; then the result equals
    attention/launch.py `sparse_attention` with it), or `lookup` = (centroids, log_threshold):
    the flat threshold lookup run per group (`group_words`). `out`: as in sparse_attention."""
    check_device(q, k_new, v_new, attn_mask, ctx_keys, ctx_values, offsets, window_keys, window_values)
    if (sel is None) == (lookup is None):
        raise ValueError("sqz: the union read takes either a selection or (centroids, log_threshold)")
    if sel is not None and sel.idx is None:
        raise ValueError("sqz: the union read needs the lookup's cluster lists (lookup without positions=)")
    bsz, hq, m, d = q.shape
    if symbolic(m) or int(m) != 1:
        raise ValueError(f"sqz: the union read is for decode (one query per row), got {m}")
    if ctx_keys.dtype == torch.int32:
        raise ValueError("sqz: the union read takes a 16-bit context (low-bit stays per row)")
    q, ctx_keys, ctx_values = lastdim(q), lastdim(ctx_keys), lastdim(ctx_values)
    window_keys, window_values = lastdim(window_keys), lastdim(window_values)
    offsets = offsets.to(torch.int32).contiguous()  # once for the lookup and the union's walk
    h, n_ctx, _ = ctx_keys.shape
    g = hq // h
    c = offsets.shape[-1] - 1
    w = window_keys.shape[1]
    sms = sm_count(q)
    cfg = config or union_config(bsz, h, g, n_ctx, w, k_new.shape[2], d, sms)
    dev = q.device
    ng = cdiv(bsz, cfg.br)

    if sel is not None:
        words, zero = marked_words(sel, bsz, h, c, cfg.br)
    else:
        words, zero = group_words(q, lookup[0], offsets, lookup[1], scale, cfg.br)
    if cfg.pos_list:
        upos, kword, unkeys = union_positions(words, offsets, ng, h, n_ctx)
        ucum = udelta = uword = unkeys  # placeholders, never read
    else:
        ucum, udelta, uword, unkeys = union_list(words, offsets, ng, h)
        upos = kword = unkeys  # placeholders, never read

    if out is None:
        out = torch.empty((bsz, hq, m, d), device=dev, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"sqz: out must be a contiguous {tuple(q.shape)} {q.dtype} tensor")
    parts = cfg.own_split + cfg.split
    part_o = torch.empty((parts, bsz, hq, m, d), device=dev, dtype=torch.float32)
    part_l = torch.empty((parts, bsz, hq, m), device=dev, dtype=torch.float32)
    # splits [own_split, parts): the union of the context's kept clusters and the window
    launch(_un._union_attn_kernel, (ng * h, cfg.split),
           q, ctx_keys, ctx_values, window_keys, window_values, ucum, udelta, uword, unkeys,
           upos, kword, part_o, part_l,
           q.stride(0), q.stride(1), ctx_keys.stride(0), ctx_keys.stride(1),
           ctx_values.stride(0), ctx_values.stride(1), window_keys.stride(0), window_keys.stride(1),
           window_values.stride(0), window_values.stride(1),
           bsz, h, g, w, c, n_ctx, cfg.split, cfg.own_split, float(scale) * 1.4426950408889634, d,
           BR=cfg.br, GP=cfg.gp, BLOCK_N=cfg.block_n, BLOCK_D=pow2(d),
           IEEE=q.dtype == torch.float32 or interpreting(), SEARCH=_search_width(c),
           POS_LIST=cfg.pos_list, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # splits [0, own_split): each row's own new keys under the model's mask, by the per-row
    # kernel with no context keys and no window
    own_sel = Selection(None, None, None, None, zero, zero)
    own_cfg = attention_config(bsz, h, g, m, block_q, 0, 0, k_new.shape[2], d, sms)._replace(
        split=cfg.own_split, pos_list=True)
    sparse_attention(q, k_new, v_new, attn_mask, ctx_keys, ctx_values, own_sel,
                     window_keys[:, :0], window_values[:, :0], scale, is_causal, block_q,
                     config=own_cfg, out=out, partials=(part_o, part_l))
    merge_splits(part_o, part_l, out, parts)
    return out
