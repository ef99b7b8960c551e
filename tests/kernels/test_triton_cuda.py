"""GPU checks of the sqz Triton kernels against float64 references over odd shapes.

Lengths that are no multiple of any block, empty and one-key clusters, keep 0 and 1, head dims
64/80/96/128, bf16/fp16, batch 1 and 3, GQA 1/4/8, decode and prefill, every mask kind.
Outputs are poisoned with NaN before each run and must come back fully written.
"""
from __future__ import annotations

import pytest
import torch

from cases import (assert_same_positions, coarse_block_shares, coarse_threshold_for_keep, make_case, reference_with_selection, rel_err,
                          threshold_for_keep)

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _launchers():
    """(lookup launcher, attention launcher) modules, imported only when a test runs (they need triton)."""
    from sqz_compile.kernels.attention import launch as attention_launch
    from sqz_compile.kernels.lookup import launch as lookup_launch

    return lookup_launch, attention_launch


def _poison_allocator(nbytes: int = 64 << 20) -> None:
    """Fill freed cached blocks with NaN bytes so buffers the kernels allocate start poisoned."""
    junk = torch.full((nbytes // 4,), float("nan"), device=DEV)
    del junk


def _best_f64(cs, block_q):
    from sqz_compile.kernels.lookup.reference import block_max, cluster_sizes, log_share

    b, hq, m, d = cs.q.shape
    h = cs.centroids.shape[0]
    qg = cs.q.double().reshape(b, h, hq // h, m, d)
    sc = torch.einsum("bhgmd,hcd->bhgmc", qg, cs.centroids.double()) * cs.scale
    log_n = cluster_sizes(cs.offsets).double().log()[None, :, None, None, :]
    return block_max(log_share(sc, log_n), block_q)


SHAPES = [
    # b, h, g, m, s, d, n, c, w, mask, dtype, block_q
    (1, 8, 4, 1, 1, 128, 20011, 1000, 100, "causal", torch.bfloat16, 64),
    (3, 2, 8, 1, 37, 64, 5003, 250, 17, "bool", torch.float16, 64),
    (1, 4, 1, 1, 5, 96, 3001, 151, 9, "float", torch.bfloat16, 64),
    (3, 2, 4, 2, 2, 80, 4099, 205, 33, "causal", torch.bfloat16, 64),
    (1, 8, 4, 203, 203, 128, 16001, 800, 100, "causal", torch.bfloat16, 64),
    (3, 2, 8, 77, 90, 64, 3001, 150, 20, "bool", torch.float16, 32),
    (1, 4, 1, 130, 130, 96, 6007, 300, 50, "float", torch.bfloat16, 64),
    (3, 1, 4, 65, 65, 80, 2003, 101, 7, "none", torch.float16, 16),
    (1, 2, 4, 100, 100, 128, 5000, 250, 64, "causal", torch.float32, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"b{s[0]}h{s[1]}g{s[2]}m{s[3]}d{s[5]}{s[9]}{str(s[10])[6:]}")
@pytest.mark.parametrize("mode", ["flat", "hier", "budget"])
def test_random_shapes(shape, mode):
    lookup_launch, attention_launch = _launchers()
    b, h, g, m, s, d, n, c, w, mask, dtype, block_q = shape
    hier = mode == "hier"
    cs = make_case(b=b, h=h, g=g, m=m, s=s, d=d, n=n, c=c, w=w, mask=mask, dtype=dtype,
                   coarse=max(2, c // 5) if hier else 0, device=DEV, seed=n + m)
    thr = threshold_for_keep(cs, 0.1, block_q)
    cthr = coarse_threshold_for_keep(cs, 0.5, block_q) if hier else None
    budget = n // 10 if mode == "budget" else 0
    _poison_allocator()
    sel = lookup_launch.lookup(cs.q, cs.centroids, cs.offsets, thr, cs.coarse_centroids, cs.coarse_offsets,
                      cthr, cs.scale, block_q, budget)
    from sqz_compile.kernels.lookup.reference import select_clusters_reference

    ridx, rcount = select_clusters_reference(cs.q, cs.centroids, cs.offsets, thr, cs.scale, block_q,
                                             budget, cs.coarse_centroids, cs.coarse_offsets, cthr)
    # Prefill scores centroids in the model dtype (tensor cores): near-threshold flips allowed.
    from sqz_compile.kernels.attention.reference import selection_from_compact

    got = selection_from_compact(sel.idx, c)
    want = selection_from_compact(ridx, c)
    flips = got != want
    assert bool((sel.idx >= -1).all()) and bool((sel.count >= 0).all())
    if mode == "flat":
        best = _best_f64(cs, block_q)
        assert bool((best[flips] - thr.double()).abs().le(0.05).all()), "flip far from threshold"
    assert flips.float().mean().item() < 0.01
    out_buf = torch.full_like(cs.q, float("nan"))
    out = attention_launch.sparse_attention(cs.q, cs.k_new, cs.v_new, cs.attn_mask, cs.keys, cs.values, sel,
                                cs.window_keys, cs.window_values, cs.scale, cs.is_causal, block_q,
                                out=out_buf)
    torch.cuda.synchronize()
    assert out.data_ptr() == out_buf.data_ptr()
    assert bool(torch.isfinite(out).all()), "unwritten (NaN-poisoned) output elements"
    ref = reference_with_selection(cs, sel.idx, block_q)
    tol = 1e-2 if dtype != torch.float32 else 1e-4
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("mode", ["flat", "hier"])
@pytest.mark.parametrize("b,h,g,m,n,c", [(1, 8, 4, 1, 131071, 6553), (3, 2, 8, 1, 20011, 1000),
                                         (2, 4, 2, 2, 5003, 250)])
def test_fused_decode_positions_match_cluster_list(b, h, g, m, n, c, mode):
    """Decode's one-kernel selection (scores, threshold, look-back over ~50 splits, positions)
    equals the cluster list expanded, with a skewed last cluster holding thousands of keys."""
    lookup_launch, attention_launch = _launchers()
    cs = make_case(b=b, h=h, g=g, m=m, s=1, d=128, n=n, c=c, w=8, dtype=torch.bfloat16,
                   coarse=max(2, c // 20) if mode == "hier" else 0, device=DEV, seed=n)
    thr = threshold_for_keep(cs, 0.1, 64)
    cthr = coarse_threshold_for_keep(cs, 0.5, 64) if mode == "hier" else None
    args = (cs.q, cs.centroids.to(cs.q.dtype), cs.offsets, thr, cs.coarse_centroids,
            cs.coarse_offsets, cthr, cs.scale, 64, 0)
    _poison_allocator()
    fused = lookup_launch.lookup(*args, positions=n)
    listing = {}
    plain = lookup_launch.lookup(*args, listing=listing)
    assert fused.idx is None
    assert_same_positions(fused, plain, n)
    if mode == "hier":  # the device list = children of the reference's kept coarse clusters
        from sqz_compile.kernels.lookup.reference import listed_children_reference

        want = listed_children_reference(cs.q, cs.centroids, cs.offsets, cs.coarse_centroids,
                                         cs.coarse_offsets, cthr, cs.scale, 64).reshape(-1, c)
        lst, listed = listing["list"].long(), listing["listed"].long()
        assert 0 < int(listed.sum()) < listed.numel() * c  # the coarse level prunes
        live = torch.arange(c, device=DEV)[None, :] < listed[:, None]
        got = torch.zeros(lst.shape[0], c + 1, dtype=torch.bool, device=DEV)
        got.scatter_(1, torch.where(live, lst, c), True)
        assert torch.equal(got[:, :c].sum(1), listed)  # the list holds `listed` distinct children
        # the kernel scores bf16 queries against the coarse centroids in float32 sums: a coarse
        # cluster within rounding of the threshold may go either way (its children with it)
        from sqz_compile.kernels.lookup.reference import cluster_of

        near = (coarse_block_shares(cs, 64) - cthr.double()).abs() < 2e-2  # [B, H, NB, K]
        parent = cluster_of(cs.coarse_offsets.long(), c)  # [H, C]
        near_fine = torch.gather(near, 3, parent[None, :, None, :].expand(*near.shape[:3], c)).reshape(-1, c)
        assert not bool(((got[:, :c] != want) & ~near_fine).any()), "a child of a clear coarse decision differs"
        assert int((got[:, :c] != want).sum()) <= 0.01 * int(want.sum())
        assert bool(((lst[:, 1:] > lst[:, :-1]) | ~live[:, 1:]).all())  # ascending


@pytest.mark.parametrize("keep", [0.0, 1.0])
@pytest.mark.parametrize("m", [1, 70])
def test_op_keep_extremes_equal_cpu_reference(keep, m):
    """torch.ops.sqz.squeezed_attention on CUDA (Triton) == its CPU branch (reference) when the
    selection is unambiguous (keep 0 or 1)."""
    import sqz_compile  # noqa: F401

    cs = make_case(b=3, h=2, g=4, m=m, d=128, n=3001, c=150, w=40, mask="causal",
                   dtype=torch.bfloat16, device=DEV, seed=5)
    thr = torch.tensor(float("inf") if keep == 0 else float("-inf"), device=DEV)
    args = (cs.q, cs.k_new, cs.v_new, None, cs.keys, cs.values, cs.centroids, cs.offsets,
            cs.window_keys, cs.window_values, thr, None, None, None, None, *(None,) * 7,
            cs.scale, True, 0, 64)
    out = torch.ops.sqz.squeezed_attention(*args)
    ref = torch.ops.sqz.squeezed_attention(*[a.cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() > 0
                                             else (a.cpu() if isinstance(a, torch.Tensor) else a) for a in args])
    assert rel_err(out.cpu(), ref) < 1e-2


def test_op_select_clusters_cuda_matches_reference_at_decode():
    import sqz_compile  # noqa: F401

    cs = make_case(b=1, h=8, g=4, m=1, d=128, n=8000, c=400, w=10, dtype=torch.bfloat16, device=DEV,
                   seed=9)
    thr = threshold_for_keep(cs, 0.1, 64)
    idx, count = torch.ops.sqz.select_clusters(cs.q, cs.centroids, cs.offsets, thr, None, None, None,
                                               cs.scale, 64, 0)
    ridx, rcount = torch.ops.sqz.select_clusters(cs.q.cpu(), cs.centroids.cpu(), cs.offsets.cpu(),
                                                 thr.cpu(), None, None, None, cs.scale, 64, 0)
    # decode scores in float32 (IEEE): the same clusters as the reference up to rounding ties
    from sqz_compile.kernels.attention.reference import selection_from_compact

    flips = selection_from_compact(idx.cpu(), 400) != selection_from_compact(ridx, 400)
    assert flips.float().mean().item() < 2e-3
    assert (count.cpu() - rcount).abs().max().item() <= 1
