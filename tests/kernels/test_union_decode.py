"""The union-read decode attention (kernels/union/) equals the float64 reference.

A decode batch of B rows over one context: per (group of rows, KV head) the kernels read each
cluster some row keeps once and mask every row to its own selection. Checked on fresh random
inputs with the output poisoned (NaN) first, odd cluster sizes and counts, B in {2, 3, 5},
group sizes 1/4, head dims 64/128, rows that keep nothing, identical and disjoint selections,
several row groups and splits. Under TRITON_INTERPRET=1 on CPU (conftest) or on the GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from sqz_compile.kernels.attention import launch as attention_launch  # noqa: E402
from sqz_compile.kernels.lookup import launch as lookup_launch  # noqa: E402
from sqz_compile.kernels.lookup.launch import Selection  # noqa: E402
from sqz_compile.kernels.union import launch as union_launch  # noqa: E402
from sqz_compile.kernels.union.reference import (  # noqa: E402
    kept_from_compact, row_bits_reference, union_list_reference, union_positions_reference)

from cases import between, make_case, reference_with_selection, rel_err, threshold_for_keep  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)


def compact(kept: torch.Tensor) -> Selection:
    """bool [B, H, C] -> a Selection holding only the compact lists (idx [B, H, 1, C] ascending,
    padded with -1; count [B, H, 1]): what the union read consumes."""
    b, h, c = kept.shape
    key = torch.where(kept, torch.arange(c, device=kept.device), c + torch.arange(c, device=kept.device))
    order = key.sort(-1).values
    count = kept.sum(-1).to(torch.int32)
    idx = torch.where(torch.arange(c, device=kept.device) < count[..., None], order, -1).to(torch.int32)
    return Selection(idx[:, :, None].contiguous(), count[:, :, None].contiguous(), None, None, None)


def kept_from_words(words: torch.Tensor, b: int, h: int, c: int, br: int) -> torch.Tensor:
    """Row words [NG*H*C (+ more)] -> kept clusters bool [B, H, C]."""
    ng = -(-b // br)
    w = words[:ng * h * c].long().reshape(ng, 1, h, c) & 0xFFFFFFFF
    bits = (w >> torch.arange(br, device=w.device)[None, :, None, None]) & 1
    return bits.reshape(ng * br, h, c)[:b].bool()


def safe_threshold(cs, keep: float) -> torch.Tensor:
    """A decode threshold halfway between two neighbouring float64 best log shares: no cluster
    near it for two tilings' float32 rounding to decide differently."""
    from sqz_compile.kernels.lookup.reference import block_max, cluster_sizes, log_share, lookup_queries

    q = lookup_queries(cs.q.double(), cs.centroids.shape[-1], cs.scale)
    b, hq, m, d = q.shape
    h = cs.centroids.shape[0]
    sc = torch.einsum("bhgmd,hcd->bhgmc", q.reshape(b, h, hq // h, m, d), cs.centroids.double()) * cs.scale
    best = block_max(log_share(sc, cluster_sizes(cs.offsets).double().log()[None, :, None, None, :]), 1)
    return torch.tensor(between(best, keep), dtype=torch.float32, device=cs.q.device)


def pattern_mask(kind: str, b: int, h: int, c: int, seed: int) -> torch.Tensor:
    """Kept clusters [B, H, C] (empty clusters may be marked too: the union list drops them)."""
    gen = torch.Generator().manual_seed(seed)
    kept = torch.rand(b, h, c, generator=gen) < 0.4
    if kind == "empty_row":
        kept[b // 2] = False
    elif kind == "identical":
        kept[:] = kept[:1]
    elif kind == "disjoint":
        owner = torch.randint(0, b, (h, c), generator=gen)
        kept = owner[None] == torch.arange(b)[:, None, None]
        kept[-1] = False  # and one row that keeps nothing
    elif kind == "none":
        kept[:] = False
    elif kind == "all":
        kept[:] = True
    return kept.to(DEV)


@pytest.mark.parametrize("b,br", [(5, 4), (5, 2), (3, 32), (2, 1)])
def test_union_list_matches_reference(b, br):
    cs = make_case(b=b, h=2, g=1, m=1, n=47, c=13, device=DEV, seed=b + br)
    kept = pattern_mask("random", b, 2, 13, seed=br)
    kept[0, 0] = False  # a row that keeps nothing in one head
    sel = compact(kept)
    assert torch.equal(kept_from_compact(sel.idx[:, :, 0], sel.count[:, :, 0], 13), kept)
    ng = -(-b // br)
    words, zero = union_launch.marked_words(sel, b, 2, 13, br)
    assert torch.equal(words[:ng * 2 * 13].long().cpu() & 0xFFFFFFFF,
                       row_bits_reference(kept.cpu(), br).reshape(-1))
    got = union_launch.union_list(words, cs.offsets, ng, 2)
    want = union_list_reference(kept.cpu(), cs.offsets.cpu(), br)
    assert zero.shape == (b * 2,) and bool((zero == 0).all())  # the own-keys launch's counts
    cum, delta, word, nkeys = (t.long().cpu() for t in got)
    assert torch.equal(cum, want[0]) and torch.equal(nkeys, want[3])
    assert torch.equal(delta, want[1])
    assert torch.equal(word & 0xFFFFFFFF, want[2])


@pytest.mark.parametrize("b,br,chunk", [(5, 4, 4), (3, 32, 0), (2, 1, 5)])
def test_union_positions_match_reference(b, br, chunk):
    """Per-key positions and row words, with clusters longer than a store step (64 keys) and
    several cluster chunks per (group, head)."""
    cs = make_case(b=b, h=2, g=1, m=1, n=400, c=13, device=DEV, seed=b + br)
    kept = pattern_mask("random", b, 2, 13, seed=br)
    kept[:, :, -1] = True  # the remainder cluster: the largest
    kept[0, 1] = False
    words, zero = union_launch.marked_words(compact(kept), b, 2, 13, br)
    pos, kword, nkeys = union_launch.union_positions(words, cs.offsets, -(-b // br), 2, 400, chunk=chunk)
    want = union_positions_reference(kept.cpu(), cs.offsets.cpu(), br)
    assert bool((zero == 0).all())
    for row, (p, w) in enumerate(want):
        k = int(nkeys[row])
        assert k == len(p)
        assert torch.equal(pos[row, :k].long().cpu(), p)
        assert torch.equal(kword[row, :k].long().cpu() & 0xFFFFFFFF, w)


# (case kwargs, selection pattern, config overrides): odd sizes everywhere (n, c, w, s, d80 aside)
CASES = [
    (dict(b=2, g=1, d=64, mask="causal"), "lookup", dict(split=3, block_n=16)),
    (dict(b=3, g=4, d=64, mask="bool"), "lookup", dict(split=2, block_n=16)),
    (dict(b=5, g=4, d=128, mask="float"), "random", dict(br=4, split=3, block_n=16)),  # 2 groups
    (dict(b=5, g=1, d=128, mask="none"), "empty_row", dict(split=4, block_n=16)),
    (dict(b=3, g=4, d=64, mask="causal"), "identical", dict(split=1, block_n=16, own_split=2)),
    (dict(b=5, g=4, d=64, mask="causal"), "disjoint", dict(br=4, split=5, block_n=16)),
    (dict(b=2, g=4, d=128, mask="bool"), "none", dict(split=2, block_n=16)),
    (dict(b=3, g=1, d=64, mask="causal", w=0), "all", dict(split=3, block_n=16)),
    (dict(b=3, g=4, d=80, mask="causal"), "random", dict(split=2, block_n=16)),       # padded head dim
    (dict(b=2, g=4, d=64, mask="causal", s=1), "random", dict()),                     # heuristic config
]


@pytest.mark.parametrize("kw,kind,over", CASES,
                         ids=lambda x: x if isinstance(x, str) else "-".join(f"{a}{v}" for a, v in x.items()))
@pytest.mark.parametrize("pos_list", [True, False], ids=["pos_list", "search"])
def test_union_decode_matches_reference(kw, kind, over, pos_list):
    """Both ways of walking the union: expanded positions + row words, and the slot search."""
    kw = dict(dict(h=2, m=1, n=71, c=13, w=5, s=9), **kw)
    seed = sum(map(ord, kind)) + kw["b"] * 7 + kw["d"]
    cs = make_case(**kw, device=DEV, seed=seed)
    b, hq, m, d = cs.q.shape
    h, c = cs.keys.shape[0], cs.centroids.shape[1]
    if kind == "lookup":
        sel = lookup_launch.lookup(cs.q, cs.centroids, cs.offsets, threshold_for_keep(cs, 0.4, 4),
                                   None, None, None, cs.scale, 4, 0)
    else:
        sel = compact(pattern_mask(kind, b, h, c, seed))
    cfg = union_launch.union_config(b, h, hq // h, cs.keys.shape[1], cs.window_keys.shape[1],
                                    cs.k_new.shape[2], d, 4)._replace(pos_list=pos_list, **over)
    out = torch.full_like(cs.q, float("nan"))
    got = union_launch.union_decode_attention(
        cs.q, cs.k_new, cs.v_new, cs.attn_mask, cs.keys, cs.values, cs.offsets, sel, cs.window_keys,
        cs.window_values, cs.scale, cs.is_causal, 4, config=cfg, out=out)
    assert got is out
    ref = reference_with_selection(cs, sel.idx, 4)
    assert rel_err(out, ref) < 1e-5


def _op(cs, thr, block_q=4):
    return attention_launch.squeezed_attention(
        cs.q, cs.k_new, cs.v_new, cs.attn_mask, cs.keys, cs.values, cs.centroids, cs.offsets,
        cs.window_keys, cs.window_values, thr, None, None, None, None, *(None,) * 7, cs.scale,
        cs.is_causal, 0, block_q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_takes_union_read_for_decode_batches(monkeypatch, dtype):
    """The CUDA launcher of the op dispatches a decode batch to the union read (per_row_reads()
    turns it off), and both paths give the reference's result for the lookup's selection (flat
    threshold: the union read's own per-group lookup)."""
    cs = make_case(b=3, h=2, g=4, m=1, n=67, c=11, w=3, s=5, d=64, mask="bool", dtype=dtype,
                   device=DEV, seed=5)
    thr = safe_threshold(cs, 0.5)
    calls = []
    real = union_launch.union_decode_attention
    monkeypatch.setattr(union_launch, "union_decode_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    out = _op(cs, thr)
    assert calls == [1]
    with union_launch.per_row_reads():
        per_row = _op(cs, thr)
    assert calls == [1] and union_launch.ENABLED
    sel = lookup_launch.lookup(cs.q, cs.centroids, cs.offsets, thr, None, None, None, cs.scale, 4, 0)
    ref = reference_with_selection(cs, sel.idx, 4)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and rel_err(out, ref) < tol and rel_err(per_row, ref) < tol
    # prefill and a single row stay on the per-row path
    assert not union_launch.applies(cs.q[:1], cs.keys, None)
    assert not union_launch.applies(cs.q.expand(-1, -1, 2, -1), cs.keys, None)
    assert not union_launch.applies(cs.q, cs.keys.view(torch.int32) if dtype == torch.float32 else cs.keys, cs.keys)


# b, h, g, d, n, c, s, w, mask, dtype: GPU sizes (128-row tiles at b=32, g=4; several row groups
# at b=40; odd lengths; GQA 1/4/8)
GPU_SHAPES = [
    (8, 8, 4, 128, 20011, 1001, 256, 128, "causal", torch.bfloat16),
    (32, 8, 4, 128, 8009, 401, 64, 128, "bool", torch.bfloat16),
    (40, 2, 4, 128, 5003, 251, 17, 33, "float", torch.float16),
    (5, 2, 1, 64, 3001, 151, 9, 9, "none", torch.bfloat16),
    (3, 2, 8, 64, 4099, 205, 37, 17, "causal", torch.float16),
    (2, 4, 4, 128, 2003, 101, 1, 0, "causal", torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"b{s[0]}h{s[1]}g{s[2]}d{s[3]}n{s[4]}{s[8]}{str(s[9])[6:]}")
@pytest.mark.parametrize("mode", ["flat", "hier", "budget"])
def test_union_decode_gpu_shapes(shape, mode):
    """GPU sizes with the heuristic config: the union read equals the float64 reference and the
    per-row read of the same selection, output fully written (poisoned first)."""
    b, h, g, d, n, c, s, w, mask, dtype = shape
    hier = mode == "hier"
    cs = make_case(b=b, h=h, g=g, m=1, s=s, d=d, n=n, c=c, w=w, mask=mask, dtype=dtype,
                   coarse=max(2, c // 5) if hier else 0, device=DEV, seed=n + b)
    from cases import coarse_threshold_for_keep

    thr = threshold_for_keep(cs, 0.1, 64)
    cthr = coarse_threshold_for_keep(cs, 0.5, 64) if hier else None
    budget = n // 10 if mode == "budget" else 0
    sel = lookup_launch.lookup(cs.q, cs.centroids, cs.offsets, thr, cs.coarse_centroids, cs.coarse_offsets,
                               cthr, cs.scale, 64, budget)
    torch.full(((64 << 20) // 4,), float("nan"), device=DEV)  # freed blocks come back poisoned
    out = torch.full_like(cs.q, float("nan"))
    union_launch.union_decode_attention(cs.q, cs.k_new, cs.v_new, cs.attn_mask, cs.keys, cs.values,
                                        cs.offsets, sel, cs.window_keys, cs.window_values, cs.scale,
                                        cs.is_causal, 64, out=out)
    per_row = attention_launch.sparse_attention(cs.q, cs.k_new, cs.v_new, cs.attn_mask, cs.keys, cs.values,
                                                sel, cs.window_keys, cs.window_values, cs.scale,
                                                cs.is_causal, 64)
    assert bool(torch.isfinite(out).all()), "unwritten (NaN-poisoned) output elements"
    ref = reference_with_selection(cs, sel.idx, 64)
    tol = 1e-2 if dtype != torch.float32 else 1e-4
    assert rel_err(out, ref) < tol and rel_err(out, per_row.double()) < tol


@pytest.mark.parametrize("b,g,d,variance,br", [(5, 4, 64, False, 4), (3, 1, 128, False, 16),
                                               (2, 4, 64, True, 4), (5, 8, 32, True, 2)])
def test_group_lookup_matches_reference(b, g, d, variance, br):
    """The flat threshold lookup per row group writes, for every cluster, the bits of exactly
    the rows whose per-row lookup (reference) keeps it, and zeroes the tail."""
    from sqz_compile.kernels.lookup.reference import select_clusters_reference

    cs = make_case(b=b, h=2, g=g, m=1, d=d, n=301, c=37, device=DEV, seed=b * g + d, variance=variance)
    thr = safe_threshold(cs, 0.3)
    words, zero = union_launch.group_words(cs.q, cs.centroids, cs.offsets, thr, cs.scale, br)
    idx, count = select_clusters_reference(cs.q, cs.centroids, cs.offsets, thr, cs.scale, 1, 0)
    want = kept_from_compact(idx[:, :, 0], count[:, :, 0], 37)
    got = kept_from_words(words, b, 2, 37, br)
    assert 0 < int(want.sum()) < want.numel()
    assert torch.equal(got.cpu(), want.cpu())
    assert zero.shape == (b * 2,) and bool((zero == 0).all())
    # bits of rows past B stay clear
    ng = -(-b // br)
    pad = (words[:ng * 2 * 37].long() & 0xFFFFFFFF) >> (b - (ng - 1) * br)
    assert bool((pad.reshape(ng, 2, 37)[-1] == 0).all())


@pytest.mark.parametrize("mask,pos_list", [("causal", True), ("bool", False), ("float", True)])
def test_union_decode_with_group_lookup(mask, pos_list):
    """The union read fed by the per-group lookup equals the float64 reference over the per-row
    reference lookup's selection."""
    from sqz_compile.kernels.lookup.reference import select_clusters_reference

    cs = make_case(b=5, h=2, g=4, m=1, d=64, n=171, c=23, w=5, s=7, mask=mask, device=DEV, seed=3)
    thr = safe_threshold(cs, 0.4)
    cfg = union_launch.union_config(5, 2, 4, 171, 5, 7, 64, 4)._replace(br=4, split=3, block_n=16,
                                                                       pos_list=pos_list)
    out = torch.full_like(cs.q, float("nan"))
    union_launch.union_decode_attention(cs.q, cs.k_new, cs.v_new, cs.attn_mask, cs.keys, cs.values, cs.offsets,
                                        None, cs.window_keys, cs.window_values, cs.scale, cs.is_causal, 4,
                                        config=cfg, out=out, lookup=(cs.centroids, thr))
    idx, _ = select_clusters_reference(cs.q, cs.centroids, cs.offsets, thr, cs.scale, 4, 0)
    assert rel_err(out, reference_with_selection(cs, idx, 4)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("b,g,d,variance", [(8, 4, 128, False), (32, 4, 128, False), (40, 4, 128, True),
                                            (5, 1, 64, False), (3, 8, 64, True)])
@pytest.mark.parametrize("cdtype", [torch.bfloat16, torch.float32])
def test_group_lookup_gpu_matches_per_row_lookup(b, g, d, variance, cdtype):
    """At GPU sizes the per-group lookup keeps what the per-row lookup keeps, up to clusters
    within rounding of the threshold (different tiles sum in different orders), and the op's
    union read equals its per-row read within bf16 rounding where the selections agree."""
    h, n, c = 8, 20011, 1001
    cs = make_case(b=b, h=h, g=g, m=1, d=d, n=n, c=c, s=64, w=64, dtype=torch.bfloat16, device=DEV,
                   seed=b + d, variance=variance)
    cent = cs.centroids.to(cdtype)
    thr = threshold_for_keep(cs, 0.1, 64)
    sel = lookup_launch.lookup(cs.q, cent, cs.offsets, thr, None, None, None, cs.scale, 64, 0)
    want = kept_from_compact(sel.idx[:, :, 0], sel.count[:, :, 0], c)
    br = union_launch.union_config(b, h, g, n, 64, 64, d, 132).br
    got = kept_from_words(union_launch.group_words(cs.q, cent, cs.offsets, thr, cs.scale, br)[0], b, h, c, br)
    flips = got != want
    from sqz_compile.kernels.lookup.reference import block_max, cluster_sizes, log_share, lookup_queries

    q = lookup_queries(cs.q.double(), cent.shape[-1], cs.scale)
    sc = torch.einsum("bhgmd,hcd->bhgmc", q.reshape(b, h, g, 1, -1), cent.double()) * cs.scale
    best = block_max(log_share(sc, cluster_sizes(cs.offsets).double().log()[None, :, None, None, :]), 1)[:, :, 0]
    assert bool((best[flips] - thr.double()).abs().le(0.05).all()), "flip far from threshold"
    assert flips.float().mean().item() < 1e-3
    args = (cs.q, cs.k_new, cs.v_new, None, cs.keys, cs.values, cent, cs.offsets, cs.window_keys,
            cs.window_values, thr, None, None, None, None, *(None,) * 7, cs.scale, True, 0, 64)
    out = attention_launch.squeezed_attention(*args)
    with union_launch.per_row_reads():
        per_row = attention_launch.squeezed_attention(*args)
    assert bool(torch.isfinite(out).all()) and rel_err(out, per_row) < 2e-2
