"""Squeezed attention (Triton lookup + sparse attention) vs dense SDPA and FlexAttention.

Llama-3-8B attention shapes (32 query heads, 8 KV heads, d=128, bf16, batch 1 except the batch
rows), keep ~10% of the context keys, clusters = 5% of the context. Sparse times INCLUDE the
centroid lookup. Synthetic but clustered data: keys drawn around cluster directions, cluster
sizes random (empty and one-key clusters included), centroids = cluster means, queries built
from a few cluster directions so the selection is meaningful. No K-means runs here.

  decode   1 query over N context keys + 128-token window + 256 new tokens
  prefill  1024 new tokens (causal among themselves) over N + window
  lookup   decode lookup time vs N (32K..512K), flat vs hierarchical (coarse = 1% of N)
  hier     flat vs hierarchical on the SAME coarse-structured context (32K..1M): decode lookup
           rows (kind hier_lookup) and decode rows (kind hier_decode, vs dense SDPA), with the
           fraction of fine clusters the coarse level lists, the recall of the hierarchical
           selection vs the flat one (kept keys), both levels' centroid bytes and byte floors
  batch    many users, one context (--batches, default 8,32; contexts from --contexts): kinds
           batch_decode (each row 1 query + its own 256 new keys) and batch_prefill (each row
           1024 new tokens, causal among themselves). Sparse: one step over the batch, each row its
           own queries, new K/V and selection; decode takes the union read (each cluster some
           row keeps read once for all of them, kernels/union/, with its lookup per group of rows:
           sqz_union_lookup_ms, union_lookup_match_fraction), timed beside the per-row read
           (each row's lookup, each row's kept clusters read apart: sqz_per_row_read_ms). Dense peers: sdpa_per_row (one SDPA call over
           per-row caches [context | own keys], as a batched generate holds them) and
           shared_prefix (per KV head the batch's queries folded into one sequence over ONE read of
           the context K/V, each row's own keys apart, merged by log-sum-exp; the LSE comes from
           aten's flash / cuDNN kernels, flash-for-CPU under --tiny), checked against float64
           before timing. Rows record selection batch-invariance, kept and union fractions (keys
           some row keeps) and each variant's bytes; latency vs batch in bench_attention_batch.png
  lowbit_sweep  the low-bit decode attention kernel alone (--kv-bits < 16, default 4; contexts
           from --contexts) under each (keys per tile, warps, stages, splits, register cap) of LOWBIT_SWEEP, output
           checked against the launcher's default config: which launch hides the dequantization's
           latency best (not in the default --only)

`--tiny` smoke-tests the script on CPU under TRITON_INTERPRET=1 (toy shapes, eager timing; hier,
batch and lowbit_sweep rows):
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --tiny --out /tmp/bench_tiny

The lookup reads the centroids in bf16, as a compiled bf16 model's graph holds them (the
thresholds are calibrated on the float32 centroids, as `squeeze` does).

Timing: CUDA graphs whose body runs the step once per input copy (copies rotate so L2 cannot
hold the working set between runs); median of triton.testing.do_bench over replays, divided
by the number of copies. Copy bandwidth is measured in the same run (device-to-device copy,
bytes read + written). Writes <out>/bench_attention.json, <out>/bench_attention.png and, with
batch rows, <out>/bench_attention_batch.png.

    python benchmarks/bench_attention.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sqz_compile.kernels.attention import launch as sqz_attn  # noqa: E402
from sqz_compile.kernels.lookup import launch as sqz_lookup  # noqa: E402
from sqz_compile.kernels.lookup.reference import cluster_of  # noqa: E402
from sqz_compile.kernels.union import launch as sqz_union  # noqa: E402

HQ, H, D = 32, 8, 128
G = HQ // H
DT = torch.bfloat16
W = 128
SCALE = D ** -0.5
BLOCK_Q = 64
L2_BYTES = 50 << 20
# --variance: centroids carry the clusters' per-channel variances (SqueezeConfig.cluster_variance,
# the default): 2D columns, the lookup scores [q, s/2 q^2]
VARIANCE = {"on": False}
DEVICE = {"dev": "cuda"}  # --tiny: "cpu" (kernels under the Triton interpreter)
NOMINAL_BW_GBPS = 4200.0  # H200 HBM3e datasheet; floors use the measured copy bandwidth on a GPU
# (new query tokens, new keys) per row; --tiny shrinks them
NEW_TOKENS = {"decode": (1, 256), "prefill": (1024, 1024)}


# ----------------------------------------------------------------------------- data
def make_context(n: int, seed: int, coarse_ratio: float = 0.0, with_kv: bool = True) -> dict:
    """Clustered synthetic context for H heads: sorted keys/values, centroids (cluster means),
    offsets; with coarse_ratio > 0 fine clusters are children of coarse directions."""
    dev = DEVICE["dev"]
    g = torch.Generator(device=dev).manual_seed(seed)
    c = max(1, int(n * 0.05))

    def unit(*shape):
        x = torch.randn(*shape, device=dev, generator=g)
        return x / x.norm(dim=-1, keepdim=True)

    ctx = {"n": n, "c": c}
    if coarse_ratio > 0:
        cc = max(1, int(n * coarse_ratio))
        parent_dir = unit(H, cc, D)
        # children per coarse cluster: random, grouped by parent (fine index order = parent order)
        par = torch.sort(torch.randint(0, cc, (H, c), device=dev, generator=g), dim=1).values
        fine_dir = parent_dir.gather(1, par[..., None].expand(H, c, D)) + 0.45 * unit(H, c, D)
        fine_dir = fine_dir / fine_dir.norm(dim=-1, keepdim=True)
        counts = torch.zeros(H, cc, dtype=torch.long, device=dev).scatter_add_(1, par, torch.ones_like(par))
        co = torch.zeros(H, cc + 1, dtype=torch.int32, device=dev)
        co[:, 1:] = counts.cumsum(1).to(torch.int32)
        ctx.update(coarse_offsets=co, cc=cc, parent=par)
    else:
        fine_dir = unit(H, c, D)
    # cluster sizes: log-normal weights -> integer sizes summing to n (zeros and ones appear)
    wts = torch.exp(1.0 * torch.randn(H, c, device=dev, generator=g))
    sizes = torch.floor(wts / wts.sum(1, keepdim=True) * n).long()
    sizes[:, 0] += n - sizes.sum(1)
    off = torch.zeros(H, c + 1, dtype=torch.int32, device=dev)
    off[:, 1:] = sizes.cumsum(1).to(torch.int32)
    ctx.update(offsets=off, sizes=sizes, dirs=fine_dir)
    cid = cluster_of(off, n).clamp(max=c - 1)
    keys32 = 6.0 * fine_dir.gather(1, cid[..., None].expand(H, n, D)) \
        + 0.6 * torch.randn(H, n, D, device=dev, generator=g)
    sums = torch.zeros(H, c, D, device=dev).scatter_add_(1, cid[..., None].expand(H, n, D), keys32)
    cent = sums / sizes.clamp(min=1)[..., None].float()
    cent = torch.where(sizes[..., None] > 0, cent, 6.0 * fine_dir)
    if VARIANCE["on"]:
        sq = torch.zeros(H, c, D, device=dev).scatter_add_(1, cid[..., None].expand(H, n, D), keys32 * keys32)
        mean_sq = sq / sizes.clamp(min=1)[..., None].float()
        cent = torch.cat([cent, (mean_sq - cent * cent).clamp(min=0)], -1)
    ctx["centroids"] = cent.contiguous()
    # what a compiled bf16 model's graph holds (passes/rewrite.py): the lookup reads these
    ctx["lookup_centroids"] = cent.to(DT).contiguous()
    if coarse_ratio > 0:
        csum = torch.zeros(H, ctx["cc"], D, device=dev).scatter_add_(1, ctx["parent"][..., None].expand(H, c, D),
                                                                      sums)
        cn = torch.zeros(H, ctx["cc"], device=dev).scatter_add_(1, ctx["parent"], sizes.float())
        cmean = csum / cn.clamp(min=1)[..., None]
        if VARIANCE["on"]:
            csq = torch.zeros(H, ctx["cc"], D, device=dev).scatter_add_(
                1, ctx["parent"][..., None].expand(H, c, D), sq)
            cmean = torch.cat([cmean, (csq / cn.clamp(min=1)[..., None] - cmean * cmean).clamp(min=0)], -1)
        ctx["coarse_centroids"] = cmean.contiguous()
        ctx["lookup_coarse_centroids"] = ctx["coarse_centroids"].to(DT)
    if with_kv:
        ctx["keys"] = keys32.to(DT)
        ctx["values"] = torch.randn(H, n, D, device=dev, generator=g).to(DT)
        ctx["window_keys"] = (6.0 * unit(H, W, D) + 0.6 * torch.randn(H, W, D, device=dev, generator=g)).to(DT)
        ctx["window_values"] = torch.randn(H, W, D, device=dev, generator=g).to(DT)
    del keys32
    return ctx


def make_queries(ctx: dict, m: int, seed: int) -> torch.Tensor:
    """[1, HQ, m, D]: each query mixes 4 random cluster directions of its KV head (+ noise)."""
    dev = DEVICE["dev"]
    g = torch.Generator(device=dev).manual_seed(seed)
    pick = torch.randint(0, ctx["c"], (HQ, m, 4), device=dev, generator=g)
    dirs = ctx["dirs"].repeat_interleave(G, 0)  # [HQ, C, D]
    q = dirs.gather(1, pick.reshape(HQ, m * 4, 1).expand(HQ, m * 4, D)).reshape(HQ, m, 4, D).sum(2)
    q = 2.0 * q + 0.3 * torch.randn(HQ, m, D, device=dev, generator=g)
    return q[None].to(DT)


def best_scores(q: torch.Tensor, cent: torch.Tensor, sizes: torch.Tensor, block_q: int) -> torch.Tensor:
    """Block-max log shares [B, H, NB, C] as the reference computes them (float32)."""
    from sqz_compile.kernels.lookup.reference import block_max, log_share, lookup_queries

    q = lookup_queries(q.float(), cent.shape[-1], SCALE)
    b, hq, m, d = q.shape
    qg = q.float().reshape(b, H, hq // H, m, d)
    sc = torch.einsum("bhgmd,hcd->bhgmc", qg, cent.float()) * SCALE
    return block_max(log_share(sc, sizes.float().log()[None, :, None, None, :]), block_q)


def calibrate(best: torch.Tensor, sizes: torch.Tensor, keep: float) -> torch.Tensor:
    """A global log threshold keeping about `keep` of the keys per row (median over rows)."""
    b, h, nb, c = best.shape
    order = torch.sort(best, dim=-1, descending=True)
    sz = sizes[None, :, None, :].expand_as(best).gather(-1, order.indices).float()
    frac = sz.cumsum(-1) / sizes.sum(-1)[None, :, None, None].float()
    pos = (frac < keep).sum(-1, keepdim=True).clamp(max=c - 1)
    return order.values.gather(-1, pos).median()


# ----------------------------------------------------------------------------- timing
def graph_time(fns: list, reps_ms: int = 200) -> float:
    """ms per call: a CUDA graph runs every fn once (rotating inputs); median replay / len."""
    import triton

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for f in fns:
            f()
    ms = triton.testing.do_bench(gr.replay, warmup=50, rep=reps_ms, return_mode="median")
    del gr
    return ms / len(fns)


def eager_time(fns: list, reps_ms: int = 200) -> float:
    import triton

    def run():
        for f in fns:
            f()

    run()
    return triton.testing.do_bench(run, warmup=50, rep=reps_ms, return_mode="median") / len(fns)


def kernel_times(fns: list, iters: int = 10) -> dict:
    """Per-kernel device time (us per call) of the sparse path, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    for f in fns:
        f()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            for f in fns:
                f()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t:
            out[e.key[:40]] = round(t / (iters * len(fns)), 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:10])


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    import triton

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=20, rep=200, return_mode="median")
    return 2 * x.numel() / ms / 1e6


# ----------------------------------------------------------------------------- methods
def sparse_step(ctx, q, kn, vn, thr, causal, hier=False, cthr=None):
    low = ctx.get("low_bit")  # --kv-bits < 16: packed K/V read by the kernel (quantize_context)
    return lambda: sqz_attn.squeezed_attention(
        q, kn, vn, None, low["keys"] if low else ctx["keys"], low["values"] if low else ctx["values"],
        ctx["lookup_centroids"], ctx["offsets"],
        ctx["window_keys"], ctx["window_values"], thr,
        ctx.get("lookup_coarse_centroids") if hier else None, ctx.get("coarse_offsets") if hier else None,
        cthr if hier else None, None, *(low["quant"] if low else (None,) * 7), SCALE, causal, 0, BLOCK_Q)


def per_row_read(step):
    """The step with the decode batch on the per-row read (union read off while it runs, which
    covers CUDA-graph capture: the switch is read when the op body runs)."""
    def f():
        with sqz_union.per_row_reads():
            return step()
    return f


def quantize_context(ctx: dict, bits: int, outliers: float = 0.01) -> None:
    """Add ctx["low_bit"]: the synthetic keys (taken as post-RoPE at random context positions)
    and values in `bits` bits, as squeeze stores them (squeeze/quantize.py); the 16-bit K/V stay
    for the dense baselines."""
    from sqz_compile.config import SqueezeConfig
    from sqz_compile.squeeze.quantize import RopeTable, low_bit_fields

    n, dev = ctx["n"], DEVICE["dev"]
    g = torch.Generator(device=dev).manual_seed(n + bits)
    perm = torch.stack([torch.randperm(n + W, device=dev, generator=g)[:n] for _ in range(H)]).to(torch.int32)
    rope = RopeTable(1.0 / (500000.0 ** (torch.arange(0, D, 2).float() / D)))
    f = low_bit_fields(ctx["keys"][None], ctx["values"][None], perm[None], torch.ones(1, H, n, device=dev),
                       n + W, rope, SqueezeConfig(kv_bits=bits, kv_outliers=outliers))
    one = lambda t: None if t is None else t[0].contiguous()  # noqa: E731
    quant = (perm, one(f["rope"]), one(f["codebooks"]), one(f["key_norm"]), one(f["value_norm"]),
             one(f["outlier_idx"]), one(f["outlier_val"]))
    ctx["low_bit"] = {"keys": one(f["keys"]), "values": one(f["values"]), "quant": quant,
                      "bytes_per_key": (2 * f["keys"].shape[-1] * 4 + 4 + 4
                                        + (0 if quant[5] is None else 2 * quant[5].shape[-1] * 4))}


def dense_inputs(ctx, kn, vn):
    k = torch.cat([ctx["keys"], ctx["window_keys"]], 1)[None]
    v = torch.cat([ctx["values"], ctx["window_values"]], 1)[None]
    return torch.cat([k, kn], 2).contiguous(), torch.cat([v, vn], 2).contiguous()


def sdpa_step(q, k, v, backend, causal_new: int):
    """Dense SDPA over the whole prompt (the new tokens see all context keys). Prefill uses no
    mask (the causal part over the new tokens is <1% of the work at these lengths)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def f():
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True)
    return f


_FLEX = {}


def flex_step(ctx, q, k, v, thr, m, s):
    """FlexAttention over the dense [context | window | new] layout with a BlockMask built from
    the same lookup (our Triton lookup kernel, included in the time) at 128-key granularity:
    a KV block is computed in full when any selected cluster overlaps it."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]
    n = ctx["n"]
    blk = 128
    p = n + W
    nkv = (p + s) // blk
    nctx_blk = n // blk
    qb = max(1, -(-m // blk))
    from sqz_compile.kernels.attention.reference import key_cluster_ids, selection_from_compact

    cid = key_cluster_ids(ctx["offsets"], n).long()  # [H, N] (setup, not timed)
    import inspect

    fwd_only = ({"compute_q_blocks": False}
                if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters else {})

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < p) | (kv_idx - p <= q_idx + (s - m))

    def f():
        sel = sqz_lookup.lookup(q, ctx["lookup_centroids"], ctx["offsets"], thr, None, None, None,
                              SCALE, BLOCK_Q, 0)
        selm = selection_from_compact(sel.idx, ctx["c"])  # [1, H, NB, C]
        keym = torch.gather(selm, 3, cid[None, :, None, :].expand(1, H, selm.shape[2], n))
        blkm = keym.reshape(1, H, keym.shape[2], nctx_blk, blk).any(-1)  # [1, H, NB, KBctx]
        per = blk // BLOCK_Q  # 64-query selection blocks per 128-query flex block
        nbp = -(-blkm.shape[2] // per) * per
        if nbp != blkm.shape[2]:
            blkm = F.pad(blkm, (0, 0, 0, nbp - blkm.shape[2]))
        blkm = blkm.reshape(1, H, nbp // per, per, nctx_blk).any(3)[:, :, :qb]
        blkm = blkm.repeat_interleave(G, 1)  # [1, HQ, QB, KBctx]
        tail = torch.ones(1, HQ, qb, nkv - nctx_blk, dtype=torch.bool, device=q.device)
        full = torch.cat([blkm, tail], -1)
        qi = torch.arange(qb, device=q.device)[:, None]
        kj = torch.arange(nkv, device=q.device)[None, :]
        newblk = kj * blk >= p
        # new-token blocks: full below the diagonal, partial (mask_mod) on it, absent above
        first_new = (kj * blk - p) // blk
        diag = newblk & (first_new == qi + (s - m) // blk) if m > 1 else torch.zeros_like(newblk)
        above = newblk & (first_new > qi + (s - m) // blk) if m > 1 else torch.zeros_like(newblk)
        full = full & ~diag & ~above
        part = diag.expand_as(full)
        fnum = full.sum(-1, dtype=torch.int32)
        fidx = torch.argsort(full.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        pnum = part.sum(-1, dtype=torch.int32)
        pidx = torch.argsort(part.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        bm = BlockMask.from_kv_blocks(pnum, pidx, fnum, fidx, BLOCK_SIZE=blk, mask_mod=mask_mod,
                                      seq_lengths=(m, p + s), **fwd_only)
        return flex(q, k, v, block_mask=bm, scale=SCALE, enable_gqa=True)
    return f


# ----------------------------------------------------------------------------- experiments
def step_inputs(kind: str, n: int, keep: float, copies: int, kv_bits: int = 16) -> tuple[list, ...]:
    """Per input copy: the context (quantized below 16 bits), the kind's queries, new K/V and the
    threshold that keeps `keep` of the keys: (ctxs, qs, kns, vns, thrs)."""
    m, s = NEW_TOKENS[kind]
    dev = DEVICE["dev"]
    ctxs = [make_context(n, seed=i) for i in range(copies)]
    for c in ctxs if kv_bits < 16 else ():
        quantize_context(c, kv_bits)
    qs = [make_queries(c, m, 100 + i) for i, c in enumerate(ctxs)]
    kns = [torch.randn(1, H, s, D, device=dev).to(DT) for _ in ctxs]
    vns = [torch.randn(1, H, s, D, device=dev).to(DT) for _ in ctxs]
    thrs = [calibrate(best_scores(q, c["centroids"], c["sizes"], BLOCK_Q), c["sizes"], keep)
            for q, c in zip(qs, ctxs)]
    return ctxs, qs, kns, vns, thrs


def run_attention(kind: str, n: int, keep: float, copies: int, results: list, bw: float, kv_bits: int = 16,
                  dequant: str = "") -> None:
    """One decode/prefill row. `dequant`: a low-bit context's tiles dequantized "per-entry" in
    float32 or on fp16 "pairs" (attention launch PAIRS off / on; 2 and 4 bits), "" as the launcher
    does by default."""
    from sqz_compile.kernels.attention import launch as KA

    pairs = KA.PAIRS
    KA.PAIRS = {"": pairs, "per-entry": False, "pairs": True}[dequant]
    try:
        _run_attention(kind, n, keep, copies, results, bw, kv_bits, dequant)
    finally:
        KA.PAIRS = pairs


def _run_attention(kind: str, n: int, keep: float, copies: int, results: list, bw: float, kv_bits: int,
                   dequant: str) -> None:
    m, s = NEW_TOKENS[kind]
    causal = kind == "prefill"
    ctxs, qs, kns, vns, thrs = step_inputs(kind, n, keep, copies, kv_bits)
    row = {"kind": kind, "context": n, "kv_bits": kv_bits, "new_tokens": m, "new_keys": s, "copies": copies}
    if dequant:
        row["dequant"] = dequant

    # the sparse path, checked once against the float64 reference on its own selection
    sel = sqz_lookup.lookup(qs[0], ctxs[0]["lookup_centroids"], ctxs[0]["offsets"], thrs[0], None,
                          None, None, SCALE, BLOCK_Q, 0)
    kept = sel.nkeys.float().mean().item()
    row["kept_fraction"] = kept / n
    row["kept_clusters"] = sel.count.float().mean().item() / ctxs[0]["c"]
    out = sparse_step(ctxs[0], qs[0], kns[0], vns[0], thrs[0], causal)()
    if m <= 64:
        from sqz_compile.kernels.attention.reference import selection_from_compact, squeezed_attention_reference

        c0 = ctxs[0]
        k64, v64 = c0["keys"].double(), c0["values"].double()
        if kv_bits < 16:
            from sqz_compile.kernels.quant.reference import dequantize_context

            k64, v64 = dequantize_context(c0["low_bit"]["keys"], c0["low_bit"]["values"], *c0["low_bit"]["quant"], D)
        ref = squeezed_attention_reference(
            qs[0].double(), kns[0].double(), vns[0].double(), None, k64, v64, c0["offsets"], selection_from_compact(sel.idx, c0["c"]),
            c0["window_keys"].double(), c0["window_values"].double(), SCALE, causal, BLOCK_Q)
        row["rel_err_vs_f64"] = float((out.double() - ref).norm() / ref.norm())

    steps = [sparse_step(c, q, kn, vn, t, causal) for c, q, kn, vn, t in zip(ctxs, qs, kns, vns, thrs)]
    row["kernel_us"] = kernel_times(steps)
    row["sqz_ms"] = graph_time(steps)
    row["sqz_eager_ms"] = eager_time(steps)
    lk = [(lambda c=c, q=q, t=t: sqz_lookup.lookup(q, c["lookup_centroids"], c["offsets"], t, None, None,
                                                  None, SCALE, BLOCK_Q, 0)) for c, q, t in zip(ctxs, qs, thrs)]
    row["sqz_lookup_ms"] = graph_time(lk)
    # bytes the sparse path must read: centroids + offsets, kept K/V, window and new K/V, q
    per_key = ctxs[0]["low_bit"]["bytes_per_key"] if kv_bits < 16 else D * 2 * 2  # K + V (+ scales, outliers)
    byt = (H * ctxs[0]["c"] * ctxs[0]["centroids"].shape[-1] * 2 + kept * H * per_key + (W + s) * H * D * 2 * 2
           + HQ * m * D * 2 * 2)
    row["sqz_bytes"] = byt
    row["sqz_GBps"] = byt / row["sqz_ms"] / 1e6
    row["sqz_frac_of_copy_bw"] = row["sqz_GBps"] / bw

    dense = [dense_inputs(c, kn, vn) for c, kn, vn in zip(ctxs, kns, vns)]
    for be in ("cudnn", "flash"):
        try:
            fns = [sdpa_step(q, k, v, be, s) for q, (k, v) in zip(qs, dense)]
            row[f"sdpa_{be}_ms"] = graph_time(fns)
        except Exception as e:  # a backend may reject the shape; record why
            row[f"sdpa_{be}_ms"] = None
            row[f"sdpa_{be}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    try:
        fx = [flex_step(c, q, k, v, t, m, s) for c, q, (k, v), t in zip(ctxs, qs, dense, thrs)]
        fo = fx[0]()
        row["flex_ms"] = eager_time(fx)
        try:
            row["flex_graph_ms"] = graph_time(fx)
        except Exception as e:
            row["flex_graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["flex_vs_sqz_rel_diff"] = float((fo.float() - out.float()).norm() / out.float().norm())
    except Exception as e:
        row["flex_ms"] = None
        row["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    dens = [row[k] for k in ("sdpa_cudnn_ms", "sdpa_flash_ms") if row.get(k)]
    if dens:
        row["best_dense_ms"] = min(dens)
        row["speedup_vs_best_dense"] = row["best_dense_ms"] / row["sqz_ms"]
    if row.get("flex_ms"):
        row["speedup_vs_flex"] = min(row["flex_ms"], row.get("flex_graph_ms") or 1e9) / row["sqz_ms"]
    results.append(row)
    print(json.dumps(row), flush=True)
    _save(results)
    del ctxs, dense
    torch.cuda.empty_cache()


# low-bit decode launch configs swept by --only lowbit_sweep: (keys per tile, warps, stages, splits x
# the launcher's, ptxas register cap or 0); the first is the launcher's 4-bit default. The sm_90 compile
# takes ~250 registers at 32 and 64 keys per tile and 4 warps, so two programs per SM: smaller
# tiles and register caps trade spills and per-tile overhead for more programs per SM, fewer
# splits trade load balance for less per-program overhead (NOTES v15)
LOWBIT_SWEEP = [(16, 4, 3, 1, 128), (64, 4, 2, 1, 0), (32, 4, 2, 1, 128), (16, 4, 2, 1, 128), (16, 4, 3, 2, 128),
                (32, 4, 2, 2, 128), (64, 4, 2, 0.5, 0)]


def run_lowbit_sweep(n: int, keep: float, copies: int, results: list, bw: float, kv_bits: int) -> None:
    """The low-bit decode attention kernel alone (lookup done once, outside the timing) under each
    launch config of LOWBIT_SWEEP, each output checked against the default config's first."""
    from sqz_compile.kernels.attention import launch as KA

    m, s = NEW_TOKENS["decode"]
    dev = DEVICE["dev"]
    ctxs, qs, kns, vns, thrs = step_inputs("decode", n, keep, copies, kv_bits)
    base = KA.attention_config(1, H, G, m, BLOCK_Q, n, W, s, D, KA.sm_count(qs[0]), kv_bits)
    sels = [sqz_lookup.lookup(q, c["lookup_centroids"], c["offsets"], t, None, None, None, SCALE, BLOCK_Q, 0,
                              positions=n if base.pos_list else 0) for c, q, t in zip(ctxs, qs, thrs)]
    low = [c["low_bit"] for c in ctxs]
    kept = sels[0].nkeys.float().mean().item()
    ref = None
    for bn, warps, stages, more, maxnreg in LOWBIT_SWEEP:
        cfg = base._replace(block_n=bn, num_warps=warps, num_stages=stages, split=max(1, round(base.split * more)),
                            fixed=True, maxnreg=maxnreg)
        row = {"kind": "lowbit_sweep", "context": n, "kv_bits": kv_bits, "block_n": bn, "warps": warps,
               "stages": stages, "split": cfg.split, "maxnreg": maxnreg, "copies": copies, "kept_fraction": kept / n}
        try:
            steps = [(lambda c=c, q=q, kn=kn, vn=vn, sel=sel, lb=lb: KA.sparse_attention(
                q, kn, vn, None, lb["keys"], lb["values"], sel, c["window_keys"], c["window_values"], SCALE,
                False, BLOCK_Q, config=cfg, quant=lb["quant"]))
                for c, q, kn, vn, sel, lb in zip(ctxs, qs, kns, vns, sels, low)]
            out = steps[0]().float()
            ref = out if ref is None else ref
            row["rel_diff_vs_default"] = float((out - ref).norm() / ref.norm())
            row["attn_ms"] = timed(steps)
            if dev == "cuda":
                row["kernel_us"] = kernel_times(steps)
                row["attn_GBps"] = kept * H * low[0]["bytes_per_key"] / row["attn_ms"] / 1e6
                row["attn_frac_of_copy_bw"] = row["attn_GBps"] / bw
        except Exception as e:  # a config may not compile (shared memory, registers): say which
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        results.append(row)
        print(json.dumps(row), flush=True)
        _save(results)
    del ctxs
    if dev == "cuda":
        torch.cuda.empty_cache()


def run_lookup_scaling(ns: list, copies: int, results: list) -> None:
    for n in ns:
        row = {"kind": "lookup", "context": n}
        for hier in (False, True):
            ctxs = [make_context(n, seed=i, coarse_ratio=0.01 if hier else 0.0, with_kv=False)
                    for i in range(copies)]
            qs = [make_queries(c, 1, 7 + i) for i, c in enumerate(ctxs)]
            thrs = [calibrate(best_scores(q, c["centroids"], c["sizes"], BLOCK_Q), c["sizes"], 0.1)
                    for q, c in zip(qs, ctxs)]
            cthrs = []
            if hier:
                for q, c in zip(qs, ctxs):
                    cn = torch.zeros(H, c["cc"], device="cuda").scatter_add_(1, c["parent"], c["sizes"].float())
                    cthrs.append(calibrate(best_scores(q, c["coarse_centroids"], cn, BLOCK_Q), cn, 0.3))
            else:
                cthrs = [None] * copies
            fns = [(lambda c=c, q=q, t=t, ct=ct: sqz_lookup.lookup(
                q, c["lookup_centroids"], c["offsets"], t, c.get("lookup_coarse_centroids"),
                c.get("coarse_offsets"), ct, SCALE, BLOCK_Q, 0)) for c, q, t, ct in zip(ctxs, qs, thrs, cthrs)]
            sel = fns[0]()
            key = "hier" if hier else "flat"
            row[f"{key}_ms"] = graph_time(fns)
            row[f"{key}_kept_fraction"] = sel.nkeys.float().mean().item() / n
            del ctxs
            torch.cuda.empty_cache()
        results.append(row)
        print(json.dumps(row), flush=True)
        _save(results)


def timed(fns: list) -> float:
    """ms per call: CUDA-graph replays on a GPU; one eager pass of wall clock on CPU (--tiny)."""
    if DEVICE["dev"] == "cuda":
        return graph_time(fns)
    t = time.perf_counter()
    for f in fns:
        f()
    return (time.perf_counter() - t) * 1e3 / len(fns)


def _kept_mask(sel, c: int) -> torch.Tensor:
    from sqz_compile.kernels.attention.reference import selection_from_compact

    return selection_from_compact(sel.idx, c)  # [B, H, NB, C] bool


def run_hier(ns: list, copies: int, results: list, bw: float, decode: bool) -> None:
    """Flat vs hierarchical lookup (and decode) on the same coarse-structured contexts."""
    dev = DEVICE["dev"]
    for n in ns:
        ctxs = [make_context(n, seed=i, coarse_ratio=0.01, with_kv=decode) for i in range(copies)]
        qs = [make_queries(c, 1, 7 + i) for i, c in enumerate(ctxs)]
        thrs = [calibrate(best_scores(q, c["centroids"], c["sizes"], BLOCK_Q), c["sizes"], 0.1)
                for q, c in zip(qs, ctxs)]
        cthrs = []
        for q, c in zip(qs, ctxs):  # coarse threshold: the coarse clusters cover 30% of the keys
            cn = torch.zeros(H, c["cc"], device=dev).scatter_add_(1, c["parent"], c["sizes"].float())
            cthrs.append(calibrate(best_scores(q, c["coarse_centroids"], cn, BLOCK_Q), cn, 0.3))

        def lk(c, q, t, ct, hier, listing=None):
            return sqz_lookup.lookup(q, c["lookup_centroids"], c["offsets"], t,
                                     c["lookup_coarse_centroids"] if hier else None,
                                     c["coarse_offsets"] if hier else None, ct if hier else None,
                                     SCALE, BLOCK_Q, 0, listing=listing)

        c0, nc, ncc = ctxs[0], ctxs[0]["c"], ctxs[0]["cc"]
        listing = {}
        flat_sel = lk(c0, qs[0], thrs[0], cthrs[0], False)
        hier_sel = lk(c0, qs[0], thrs[0], cthrs[0], True, listing)
        sizes = c0["sizes"][None, :, None, :].float()
        mf, mh = _kept_mask(flat_sel, nc), _kept_mask(hier_sel, nc)
        recall = float((sizes * (mf & mh)).sum() / (sizes * mf).sum().clamp(min=1))
        listed = float(listing["listed"].float().mean()) / nc
        width = c0["lookup_centroids"].shape[-1]
        elt = c0["lookup_centroids"].element_size()
        fine_b, coarse_b = H * nc * width * elt, H * ncc * width * elt
        gbps = bw or NOMINAL_BW_GBPS
        row = {"kind": "hier_lookup", "context": n, "fine_clusters": nc, "coarse_clusters": ncc,
               "hier_listed_fraction": listed, "hier_recall_vs_flat": recall,
               "flat_kept_fraction": float(flat_sel.nkeys.float().mean()) / n,
               "hier_kept_fraction": float(hier_sel.nkeys.float().mean()) / n,
               "centroid_bytes_fine": fine_b, "centroid_bytes_coarse": coarse_b,
               "flat_floor_us": fine_b / gbps / 1e3,
               "hier_floor_us": (coarse_b + listed * fine_b) / gbps / 1e3}
        for hier in (False, True):
            fns = [(lambda c=c, q=q, t=t, ct=ct, hier=hier: lk(c, q, t, ct, hier))
                   for c, q, t, ct in zip(ctxs, qs, thrs, cthrs)]
            row[("hier" if hier else "flat") + "_us"] = timed(fns) * 1e3
        row["speedup_hier_vs_flat"] = row["flat_us"] / row["hier_us"]
        results.append(row)
        print(json.dumps(row), flush=True)
        _save(results)
        if decode:
            s = NEW_TOKENS["decode"][1]
            kns = [torch.randn(1, H, s, D, device=dev).to(DT) for _ in ctxs]
            vns = [torch.randn(1, H, s, D, device=dev).to(DT) for _ in ctxs]
            drow = {"kind": "hier_decode", "context": n, "new_tokens": 1, "new_keys": s,
                    "hier_listed_fraction": listed, "hier_recall_vs_flat": recall}
            for hier in (False, True):
                steps = [sparse_step(c, q, kn, vn, t, False, hier, ct)
                         for c, q, kn, vn, t, ct in zip(ctxs, qs, kns, vns, thrs, cthrs)]
                drow[("hier" if hier else "flat") + "_ms"] = timed(steps)
            dense = [dense_inputs(c, kn, vn) for c, kn, vn in zip(ctxs, kns, vns)]
            dens = []
            for be in (("cudnn", "flash") if dev == "cuda" else ("math",)):
                try:
                    if be == "math":
                        fns = [(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                            q, k, v, scale=SCALE, enable_gqa=True)) for q, (k, v) in zip(qs, dense)]
                    else:
                        fns = [sdpa_step(q, k, v, be, s) for q, (k, v) in zip(qs, dense)]
                    drow[f"sdpa_{be}_ms"] = timed(fns)
                    dens.append(drow[f"sdpa_{be}_ms"])
                except Exception as e:
                    drow[f"sdpa_{be}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if dens:
                drow["best_dense_ms"] = min(dens)
                drow["speedup_vs_best_dense"] = drow["best_dense_ms"] / drow["hier_ms"]
                drow["flat_speedup_vs_best_dense"] = drow["best_dense_ms"] / drow["flat_ms"]
            results.append(drow)
            print(json.dumps(drow), flush=True)
            _save(results)
            del dense, kns, vns
        del ctxs
        if dev == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- batch rows
def lse_attention(q, k, v, causal: bool, backend: str):
    """Attention with its natural-log log-sum-exp: (out [B, Hq, M, D], lse [B, Hq, M] float32),
    from the aten kernel behind SDPA's `backend` (cuDNN, flash, or flash-for-CPU on CPU). Flash
    takes grouped K/V heads as they are; causal is top-left (M == S where it is used here)."""
    if backend == "flash":
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=SCALE)
    elif backend == "cudnn":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                               scale=SCALE)
    elif backend == "cpu":
        r = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=SCALE)
    else:
        raise ValueError(backend)
    b, h, m = q.shape[:3]
    # cuDNN may hand back [B, H, M, 1]; drop any padding past M
    return r[0], r[1].reshape(b, h, -1)[..., :m]


def shared_prefix_step(prefix_k, prefix_v, q, kn, vn, causal: bool, backend: str):
    """The dense peer for a shared prefix: per KV head, the batch's B*G*M queries as one query
    sequence over ONE read of the prefix K/V [1, H, P, D] (no mask), then each row's queries over
    its own new keys (causal in prefill; flash on a GPU, which takes the grouped heads), the two
    partial results merged by their log-sum-exps."""
    b, _, m, d = q.shape
    own = "cpu" if q.device.type == "cpu" else "flash"

    def f():
        qf = q.view(b, H, G, m, d).transpose(0, 1).reshape(1, H, b * G * m, d)
        o1, l1 = lse_attention(qf, prefix_k, prefix_v, False, backend)
        o2, l2 = lse_attention(q, kn, vn, causal, own)
        # views in the rows' [B, H, G, M] order (the kernels may return transposed layouts)
        o1 = o1.reshape(H, b, G, m, d).transpose(0, 1)
        l1 = l1.reshape(H, b, G, m).transpose(0, 1)
        w = torch.sigmoid(l1 - l2.reshape(b, H, G, m))  # exp(l1) / (exp(l1) + exp(l2))
        o = torch.lerp(o2.reshape(b, H, G, m, d).float(), o1.float(), w[..., None])
        return o.to(q.dtype).reshape(b, HQ, m, d)
    return f


def dense_reference(ctx, q, kn, vn, causal: bool, qpos: torch.Tensor) -> torch.Tensor:
    """float64 attention of one row's queries at positions qpos (q [HQ, M, D] -> [HQ, len(qpos), D])
    over [context | window | own new keys]; in prefill new query i sees new keys j <= i + S - M."""
    m, s = q.shape[1], kn.shape[1]
    p = ctx["n"] + W
    out = []
    for h in range(H):  # one KV head at a time bounds the float64 scores
        k = torch.cat([ctx["keys"][h], ctx["window_keys"][h], kn[h]]).double()
        v = torch.cat([ctx["values"][h], ctx["window_values"][h], vn[h]]).double()
        sc = q[h * G:(h + 1) * G, qpos].double() @ k.T * SCALE  # [G, len(qpos), P + S]
        if causal:
            hidden = torch.arange(s, device=q.device)[None] > qpos[:, None] + (s - m)
            sc[..., p:] = sc[..., p:].masked_fill(hidden, float("-inf"))
        out.append(torch.softmax(sc, -1) @ v)
    return torch.cat(out)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def run_batch(kind: str, n: int, bsz: int, keep: float, results: list, bw) -> None:
    """B users sharing one context (kinds batch_decode / batch_prefill): the sparse step over the
    batch (lookup included; each row its own queries, new K/V and selection) vs SDPA over per-row
    caches [context | own keys] and vs the shared-prefix dense peer; correctness of both checked
    before timing."""
    from sqz_compile.kernels.attention.reference import squeezed_attention_reference

    dev = DEVICE["dev"]
    m, s = NEW_TOKENS[kind]
    causal = kind == "prefill"
    kv_row = H * D * 2 * 2  # K + V bytes per key position
    if dev == "cuda":  # rotate copies past ~2x the L2, counting every row's kept keys
        copies = max(2, min(4, math.ceil(2 * L2_BYTES / (bsz * 0.15 * n * kv_row))))
    else:
        copies = 1
    ctxs = [make_context(n, seed=i) for i in range(copies)]
    qs = [torch.cat([make_queries(c, m, 1000 * i + b) for b in range(bsz)]) for i, c in enumerate(ctxs)]
    kns = [torch.randn(bsz, H, s, D, device=dev).to(DT) for _ in ctxs]
    vns = [torch.randn(bsz, H, s, D, device=dev).to(DT) for _ in ctxs]
    # one threshold per context (a property of the context, not of a row), calibrated on row 0
    thrs = [calibrate(best_scores(q[:1], c["centroids"], c["sizes"], BLOCK_Q), c["sizes"], keep)
            for q, c in zip(qs, ctxs)]
    row = {"kind": f"batch_{kind}", "context": n, "batch": bsz, "new_tokens": m, "new_keys": s, "copies": copies}
    c0, q0, kn0, vn0, t0 = ctxs[0], qs[0], kns[0], vns[0], thrs[0]
    nc = c0["c"]

    def lk(q):
        return sqz_lookup.lookup(q, c0["lookup_centroids"], c0["offsets"], t0, None, None, None, SCALE, BLOCK_Q, 0)

    # selection: batch-invariant (each row's clusters as if it ran alone), kept and union fractions
    sel = _kept_mask(lk(q0), nc)  # [B, H, NB, C]
    alone = torch.cat([_kept_mask(lk(q0[b:b + 1]), nc) for b in range(bsz)])
    row["selection_match_fraction"] = float((sel == alone).all(-1).float().mean())
    sizes = c0["sizes"][None, :, None, :].float()
    row["kept_fraction"] = float((sel * sizes).sum(-1).mean()) / n  # per (row, head, query block)
    # context keys that some query block of the row keeps (prefill: more than one block's share)
    row_kept = (sel.any(2) * sizes[:, :, 0]).sum(-1) / n  # [B, H]
    row["row_kept_fraction"] = float(row_kept.mean())
    # context keys that some row keeps: what the union read (decode) reads once for all the rows
    # that keep them
    row["union_kept_fraction"] = float((sel.any(2).any(0) * sizes[0, :, 0]).sum(-1).mean()) / n

    out = sparse_step(c0, q0, kn0, vn0, t0, causal)()
    per_row = torch.cat([sparse_step(c0, q0[b:b + 1], kn0[b:b + 1], vn0[b:b + 1], t0, causal)()
                         for b in range(bsz)])
    row["sqz_batch_vs_per_row_rel_diff"] = _rel(out, per_row.double())
    row["sqz_path"] = "union_read" if sqz_union.applies(q0, c0["keys"], None) else "per_row_read"
    if row["sqz_path"] == "union_read":
        row_read = per_row_read(sparse_step(c0, q0, kn0, vn0, t0, causal))()
        row["sqz_union_vs_per_row_read_rel_diff"] = _rel(out, row_read.double())
        # the union read's own lookup (per group of rows) vs each row's: kept clusters that agree
        br = sqz_union.union_config(bsz, H, G, n, W, s, D, 1).br  # rows per group (no SM count in it)
        words, _ = sqz_union.group_words(q0, c0["lookup_centroids"], c0["offsets"], t0, SCALE, br)
        ng = -(-bsz // br)
        bits = (words[:ng * H * nc].long().reshape(ng, 1, H, nc) & 0xFFFFFFFF) >> torch.arange(br, device=dev)[None, :, None, None]
        union_sel = (bits & 1).reshape(ng * br, H, nc)[:bsz].bool()
        row["union_lookup_match_fraction"] = float((union_sel == sel[:, :, 0]).float().mean())
    if m <= 64:
        ref = squeezed_attention_reference(
            q0[:1].double(), kn0[:1].double(), vn0[:1].double(), None, c0["keys"].double(), c0["values"].double(),
            c0["offsets"], sel[:1], c0["window_keys"].double(), c0["window_values"].double(), SCALE, causal, BLOCK_Q)
        row["rel_err_vs_f64"] = _rel(out[:1], ref)

    steps = [sparse_step(c, q, kn, vn, t, causal) for c, q, kn, vn, t in zip(ctxs, qs, kns, vns, thrs)]
    if dev == "cuda":
        row["kernel_us"] = kernel_times(steps)
    row["sqz_ms"] = timed(steps)
    if row["sqz_path"] == "union_read":
        row_steps = [per_row_read(f) for f in steps]
        if dev == "cuda":
            row["per_row_read_kernel_us"] = kernel_times(row_steps)
        row["sqz_per_row_read_ms"] = timed(row_steps)
        row["sqz_union_lookup_ms"] = timed([(lambda c=c, q=q, t=t: sqz_union.group_words(
            q, c["lookup_centroids"], c["offsets"], t, SCALE, br)) for c, q, t in zip(ctxs, qs, thrs)])
        row["union_read_speedup"] = row["sqz_per_row_read_ms"] / row["sqz_ms"]
    row["sqz_lookup_ms"] = timed([(lambda c=c, q=q, t=t: sqz_lookup.lookup(
        q, c["lookup_centroids"], c["offsets"], t, None, None, None, SCALE, BLOCK_Q, 0))
        for c, q, t in zip(ctxs, qs, thrs)])

    # bytes each variant must read from DRAM (q read + out written by all; sqz: centroids and
    # window once, every row's kept keys and own new K/V; union: each kept key once)
    qo = 2 * bsz * HQ * m * D * 2
    cent = H * nc * c0["lookup_centroids"].shape[-1] * c0["lookup_centroids"].element_size()
    own = bsz * s * kv_row
    byts = {"sqz": cent + float(row_kept.sum(0).mean()) * n * kv_row + W * kv_row + own + qo,
            "union": cent + row["union_kept_fraction"] * n * kv_row + W * kv_row + own + qo,
            "sdpa_per_row": bsz * (n + W + s) * kv_row + qo,
            "shared_prefix": (n + W) * kv_row + own + qo}
    gbps = bw or NOMINAL_BW_GBPS
    for k, v in byts.items():
        row[f"{k}_bytes"] = v
        row[f"{k}_floor_us"] = v / gbps / 1e3

    # peer (b), checked against float64 on the first and last row before it is timed
    qpos = torch.arange(m, device=dev)
    if m > 128:  # both ends of the causal range bound the float64 work
        qpos = torch.cat([qpos[:64], qpos[-64:]])
    refs = {b: dense_reference(c0, q0[b], kn0[b], vn0[b], causal, qpos) for b in sorted({0, bsz - 1})}
    prefixes = [(torch.cat([c["keys"], c["window_keys"]], 1)[None].contiguous(),
                 torch.cat([c["values"], c["window_values"]], 1)[None].contiguous()) for c in ctxs]
    sp = {}
    for be in (("cudnn", "flash") if dev == "cuda" else ("cpu",)):
        try:
            o = shared_prefix_step(*prefixes[0], q0, kn0, vn0, causal, be)()
            err = max(_rel(o[b][:, qpos], r) for b, r in refs.items())
            row[f"shared_prefix_{be}_rel_err_vs_f64"] = err
            if not err < 2e-2:
                row[f"shared_prefix_{be}_error"] = "wrong result (see rel_err_vs_f64): not timed"
                continue
            sp[be] = timed([shared_prefix_step(*pk, q, kn, vn, causal, be)
                            for pk, q, kn, vn in zip(prefixes, qs, kns, vns)])
            row[f"shared_prefix_{be}_ms"] = sp[be]
        except Exception as e:
            row[f"shared_prefix_{be}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if sp:
        be = min(sp, key=sp.get)
        row["shared_prefix_backend"] = be
        row["shared_prefix_ms"] = sp[be]
        row["shared_prefix_rel_err_vs_f64"] = row[f"shared_prefix_{be}_rel_err_vs_f64"]

    # peer (a): per-row caches [context | window | own keys], one batched SDPA call (prefill
    # without a mask, as the prefill row); its bytes exceed the L2 many times: fewer copies
    dcopies = max(1, min(copies, math.ceil(2 * L2_BYTES / byts["sdpa_per_row"])))
    pr = {}
    try:
        dense = [(torch.cat([pk.expand(bsz, -1, -1, -1), kn], 2), torch.cat([pv.expand(bsz, -1, -1, -1), vn], 2))
                 for (pk, pv), kn, vn in zip(prefixes[:dcopies], kns, vns)]
        if m == 1:
            o = F.scaled_dot_product_attention(q0, *dense[0], scale=SCALE, enable_gqa=True)
            row["sdpa_per_row_rel_err_vs_f64"] = max(_rel(o[b], r) for b, r in refs.items())
        for be in (("cudnn", "flash") if dev == "cuda" else ("math",)):
            try:
                if be == "math":
                    fns = [(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True))
                           for q, (k, v) in zip(qs, dense)]
                else:
                    fns = [sdpa_step(q, k, v, be, s) for q, (k, v) in zip(qs, dense)]
                pr[be] = row[f"sdpa_per_row_{be}_ms"] = timed(fns)
            except Exception as e:
                row[f"sdpa_per_row_{be}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        del dense
    except torch.OutOfMemoryError as e:
        row["sdpa_per_row_error"] = f"OutOfMemoryError: {str(e)[:200]}"
    del prefixes
    if pr:
        row["sdpa_per_row_ms"] = min(pr.values())

    dens = {k: row[f"{k}_ms"] for k in ("sdpa_per_row", "shared_prefix") if row.get(f"{k}_ms")}
    for k, v in dens.items():
        row[f"speedup_vs_{k}"] = v / row["sqz_ms"]
    if dens:
        row["best_dense_ms"] = min(dens.values())
        row["speedup_vs_best_dense"] = row["best_dense_ms"] / row["sqz_ms"]
    for k in ("sqz", "sdpa_per_row", "shared_prefix"):
        if row.get(f"{k}_ms"):
            row[f"{k}_GBps"] = byts[k] / row[f"{k}_ms"] / 1e6
            row[f"{k}_frac_of_copy_bw"] = row[f"{k}_GBps"] / bw if bw else None
    results.append(row)
    print(json.dumps(row), flush=True)
    _save(results)
    del ctxs, qs, kns, vns, steps
    if dev == "cuda":
        torch.cuda.empty_cache()


_SAVE = {}


def _save(results: list) -> None:
    """Rewrite the JSON after every row, so a run cut short still leaves its numbers."""
    if "path" in _SAVE:
        with open(_SAVE["path"], "w") as f:
            json.dump({"info": _SAVE["info"], "results": results}, f, indent=1)


def plot(results: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, kind in zip(axes[:2], ("decode", "prefill")):
        rows = [r for r in results if r["kind"] == kind]
        variants = sorted({(r.get("kv_bits", 16), r.get("dequant", "")) for r in rows}, reverse=True)
        series = []
        for bits, deq in variants:  # one squeezed line per context format; dense peers from the 16-bit rows
            vrows = [r for r in rows if (r.get("kv_bits", 16), r.get("dequant", "")) == (bits, deq)]
            tag = "" if bits == 16 else f", {bits}-bit context" + (f" ({deq})" if deq else "")
            series.append((vrows, "sqz_ms", "squeezed (lookup incl.)" + tag))
        dense_rows = [r for r in rows if r.get("kv_bits", 16) == 16] or rows
        series += [(dense_rows, key, lab) for key, lab in (
            ("sdpa_cudnn_ms", "SDPA cuDNN"), ("sdpa_flash_ms", "SDPA flash"), ("flex_ms", "FlexAttention + BlockMask"))]
        for srows, key, lab in series:
            xs = [r["context"] for r in srows]
            ys = [r.get(key) for r in srows]
            if any(y is not None for y in ys):
                ax.plot([x for x, y in zip(xs, ys) if y], [y for y in ys if y], "o-", label=lab)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_ylabel("ms")
        ax.set_title(f"{kind} (32q/8kv heads, d=128, bf16)")
        ax.legend(fontsize=8)
    rows = [r for r in results if r["kind"] == "lookup"]
    ax = axes[2]
    for key in ("flat_ms", "hier_ms"):
        ax.plot([r["context"] for r in rows], [r[key] * 1e3 for r in rows], "o-", label=key[:-3])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("us")
    ax.set_title("decode lookup")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_batch(results: list, path: str) -> None:
    """Latency vs batch size of the batch rows: sqz (decode: union read and per-row read), SDPA
    over per-row caches, shared prefix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind in zip(axes, ("batch_decode", "batch_prefill")):
        rows = [r for r in results if r["kind"] == kind]
        for i, n in enumerate(sorted({r["context"] for r in rows})):
            rs = sorted((r for r in rows if r["context"] == n), key=lambda r: r["batch"])
            for key, style, lab in (("sqz_ms", "o-", "squeezed"),
                                    ("sqz_per_row_read_ms", "x-.", "squeezed, per-row read"),
                                    ("sdpa_per_row_ms", "s--", "SDPA per row"),
                                    ("shared_prefix_ms", "^:", "shared prefix (LSE merge)")):
                pts = [(r["batch"], r[key]) for r in rs if r.get(key)]
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{lab}, {n // 1024}K" if n % 1024 == 0
                            else f"{lab}, {n}")
        ax.set_xscale("log", base=2)
        bs = sorted({r["batch"] for r in rows})
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.set_yscale("log")
        ax.set_xlabel("batch (rows sharing one context)")
        ax.set_ylabel("ms")
        ax.set_title(f"{kind} (32q/8kv heads, d=128, bf16)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _kv_bits_token(tok: str) -> tuple[int, str]:
    """(bits, dequant) of one --kv-bits entry: "4" (as the launcher), "4e" (per entry), "4p" (pairs)."""
    return int(tok.rstrip("ep")), {"e": "per-entry", "p": "pairs"}.get(tok[-1], "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--contexts", default=None, help="decode/prefill/batch contexts (default 32768,131072)")
    ap.add_argument("--lookup-contexts", default="32768,65536,131072,262144,524288")
    ap.add_argument("--keep", type=float, default=0.10)
    ap.add_argument("--only", default=None, help="comma-separated kinds (default decode,prefill,lookup,hier,batch)")
    ap.add_argument("--batches", default=None, help="batch sizes of the batch rows (default 8,32)")
    ap.add_argument("--hier-contexts", default="32768,131072,524288,1048576")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke test under TRITON_INTERPRET=1: toy shapes, the hier and batch rows only")
    ap.add_argument("--kv-bits", default="16",
                    help="comma-separated context K/V bits for decode/prefill rows, e.g. 16,4,3,2 (field kv_bits); "
                         "a suffix picks the low-bit tiles' dequantization: 4e per entry in float32, 4p on fp16 "
                         "pairs (2 and 4 bits; default: as the launcher)")
    ap.add_argument("--variance", action="store_true",
                    help="centroids with per-channel variances (SqueezeConfig.cluster_variance)")
    args = ap.parse_args()
    VARIANCE["on"] = args.variance
    if args.tiny:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--tiny runs the kernels on CPU: set TRITON_INTERPRET=1")
        global HQ, H, D, G, W, SCALE
        HQ, H, D, W = 4, 2, 16, 8
        G, SCALE = HQ // H, D ** -0.5
        NEW_TOKENS.update(decode=(1, 16), prefill=(80, 80))  # prefill: two query blocks, the second partial
        DEVICE["dev"] = "cpu"
        args.hier_contexts = "1500,3001"
        args.only = args.only or "hier,batch"
        args.contexts = args.contexts or "1500"
        args.batches = args.batches or "2,3"
        if set(args.only.split(",")) - {"hier", "batch", "lowbit_sweep"}:
            sys.exit("--tiny runs the hier, batch and lowbit_sweep rows only")
    elif not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA GPU (or --tiny on CPU)")
    args.only = args.only or "decode,prefill,lookup,hier,batch"
    args.contexts = args.contexts or "32768,131072"
    args.batches = args.batches or "8,32"
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
    import triton

    info = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "lookup_centroids": str(DT).replace("torch.", ""), "cluster_variance": args.variance}
    bw = copy_bandwidth() if not args.tiny else None
    info["copy_bandwidth_GBps"] = bw
    info["gpu"] = info["gpu"] if not args.tiny else "cpu (TRITON_INTERPRET=1, --tiny)"
    print(json.dumps(info), flush=True)
    _SAVE.update(path=os.path.join(args.out, "bench_attention.json"), info=info)
    results: list = []
    only = set(args.only.split(","))
    t0 = time.time()
    for kind in ("decode", "prefill"):
        if kind not in only:
            continue
        for n in [int(x) for x in args.contexts.split(",")]:
            # sparse bytes per copy ~ 15% of the KV bytes: rotate copies past ~2x the L2
            per_copy = 0.15 * n * H * D * 2 * 2
            copies = max(2, min(4, math.ceil(2 * L2_BYTES / per_copy)))
            for tok in args.kv_bits.split(","):
                bits, dequant = _kv_bits_token(tok)
                run_attention(kind, n, args.keep, copies, results, bw, kv_bits=bits, dequant=dequant)
    if "lowbit_sweep" in only:
        for n in [int(x) for x in args.contexts.split(",")]:
            for bits in [b for b, _ in map(_kv_bits_token, args.kv_bits.split(",")) if b < 16] or [4]:
                run_lowbit_sweep(n, args.keep, 2, results, bw, bits)
    if "lookup" in only:
        run_lookup_scaling([int(x) for x in args.lookup_contexts.split(",")], 3, results)
    if "hier" in only:
        run_hier([int(x) for x in args.hier_contexts.split(",")], 1 if args.tiny else 2, results,
                 bw, decode=True)
    if "batch" in only:
        for kind in ("decode", "prefill"):
            for n in [int(x) for x in args.contexts.split(",")]:
                for b in [int(x) for x in args.batches.split(",")]:
                    run_batch(kind, n, b, args.keep, results, bw)
    info["seconds"] = time.time() - t0
    with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
        json.dump({"info": info, "results": results}, f, indent=1)
    try:
        if not args.tiny and only & {"decode", "prefill", "lookup"}:
            plot(results, os.path.join(args.out, "bench_attention.png"))
        if "batch" in only:
            plot_batch(results, os.path.join(args.out, "bench_attention_batch.png"))
    except Exception as e:  # the numbers matter more than the picture
        print("plot failed:", e)
    print(f"\ncopy bandwidth {bw or 0:.0f} GB/s  ({info['gpu']}, torch {info['torch']}, triton {info['triton']})")
    if any(r["kind"] in ("decode", "prefill") for r in results):
        print(f"{'kind':8} {'ctx':>7} {'kept':>6} {'sqz ms':>8} {'lookup':>8} {'cudnn':>8} {'flash':>8} "
              f"{'flex':>8} {'x dense':>8} {'x flex':>7} {'%copyBW':>8}")
    for r in results:
        if r["kind"] not in ("decode", "prefill"):
            continue

        def fmt(x, p=3):
            return f"{x:.{p}f}" if isinstance(x, (int, float)) else "-"
        tag = {"per-entry": "e", "pairs": "p"}.get(r.get("dequant"), "b")
        print(f"{r['kind'] + '/' + str(r.get('kv_bits', 16)) + tag:8} {r['context']:>7} {fmt(r.get('kept_fraction'), 3):>6} {fmt(r['sqz_ms']):>8} "
              f"{fmt(r['sqz_lookup_ms']):>8} {fmt(r.get('sdpa_cudnn_ms')):>8} {fmt(r.get('sdpa_flash_ms')):>8} "
              f"{fmt(r.get('flex_ms')):>8} {fmt(r.get('speedup_vs_best_dense'), 2):>8} "
              f"{fmt(r.get('speedup_vs_flex'), 2):>7} {fmt(100 * r['sqz_frac_of_copy_bw'], 1):>8}")
    hrows = [r for r in results if r["kind"] == "hier_lookup"]
    if hrows:
        dec = {r["context"]: r for r in results if r["kind"] == "hier_decode"}
        print(f"\n{'hier ctx':>9} {'flat us':>9} {'hier us':>9} {'floor f/h':>11} {'listed':>7} "
              f"{'recall':>7} {'dec flat':>9} {'dec hier':>9} {'x dense':>8}")
        for r in hrows:
            d = dec.get(r["context"], {})
            sp = d.get("speedup_vs_best_dense")
            print(f"{r['context']:>9} {r['flat_us']:>9.1f} {r['hier_us']:>9.1f} "
                  f"{r['flat_floor_us']:>5.1f}/{r['hier_floor_us']:<5.1f} {r['hier_listed_fraction']:>7.3f} "
                  f"{r['hier_recall_vs_flat']:>7.3f} {d.get('flat_ms', float('nan')) * 1e3:>9.1f} "
                  f"{d.get('hier_ms', float('nan')) * 1e3:>9.1f} {sp if sp is None else round(sp, 2)!s:>8}")
    brows = [r for r in results if r["kind"].startswith("batch_")]
    if brows:
        def ms(x):
            return f"{x:.3f}" if isinstance(x, float) else "-"
        print(f"\n{'batch kind':14} {'ctx':>7} {'B':>3} {'kept':>6} {'union':>6} {'sqz ms':>8} {'sqz per-row-read ms':>19} {'per-row':>8} "
              f"{'shared':>8} {'x row':>6} {'x shared':>8} {'sel same':>8} {'sp err':>8}")
        for r in brows:
            print(f"{r['kind']:14} {r['context']:>7} {r['batch']:>3} {r['row_kept_fraction']:>6.3f} "
                  f"{r['union_kept_fraction']:>6.3f} {ms(r['sqz_ms']):>8} {ms(r.get('sqz_per_row_read_ms')):>19} "
                  f"{ms(r.get('sdpa_per_row_ms')):>8} "
                  f"{ms(r.get('shared_prefix_ms')):>8} {ms(r.get('speedup_vs_sdpa_per_row')):>6} "
                  f"{ms(r.get('speedup_vs_shared_prefix')):>8} {r['selection_match_fraction']:>8.3f} "
                  f"{ms(r.get('shared_prefix_rel_err_vs_f64')):>8}")
    rows = [r for r in results if r["kind"] == "lookup"]
    if rows:
        print(f"\n{'lookup ctx':>10} {'flat us':>9} {'hier us':>9} {'flat kept':>9} {'hier kept':>9}")
        for r in rows:
            print(f"{r['context']:>10} {r['flat_ms'] * 1e3:>9.1f} {r['hier_ms'] * 1e3:>9.1f} "
                  f"{r['flat_kept_fraction']:>9.3f} {r['hier_kept_fraction']:>9.3f}")
        print(f"hierarchical growth {rows[-1]['hier_ms'] / rows[0]['hier_ms']:.2f}x over "
              f"{rows[-1]['context'] // rows[0]['context']}x context; flat "
              f"{rows[-1]['flat_ms'] / rows[0]['flat_ms']:.2f}x")


if __name__ == "__main__":
    main()
