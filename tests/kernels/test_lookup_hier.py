"""The hierarchical lookup walks only the children of the kept coarse clusters, and selects exactly
what the float64 plain-torch reference selects.

Interpreter on CPU (conftest sets TRITON_INTERPRET=1) or the GPU. Every buffer the launcher
allocates starts poisoned (NaN / huge ints), so a kernel that reads an unwritten slot of the
list, a flag or a sync word fails the comparison.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from sqz_compile.kernels.lookup import launch as lookup_launch  # noqa: E402
from sqz_compile.kernels.lookup.reference import (  # noqa: E402
    best_log_shares, cluster_sizes, listed_children_reference, select_clusters_reference)

from cases import assert_same_positions, between, coarse_threshold_for_keep, make_case  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

INF = float("inf")


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty returns NaN floats and huge ints (int8: 77) while the test runs."""
    real = torch.empty

    def empty(*args, **kw):
        t = real(*args, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.int8:
            t.fill_(77)
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(987654321)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def coarse_threshold(cs, block_q, which: str) -> torch.Tensor:
    """+inf keeps no coarse cluster, -inf all non-empty ones, 'some' about half of them."""
    if which == "none":
        return torch.tensor(INF, device=DEV)
    if which == "all":
        return torch.tensor(-INF, device=DEV)
    return coarse_threshold_for_keep(cs, 0.5, block_q)


def fine_threshold(cs, keep: float, block_q: int, cthr) -> torch.Tensor:
    """A fine threshold keeping about `keep` of the finite float64 shares (flat rule if cthr is
    None)."""
    hier = (cs.coarse_centroids, cs.coarse_offsets, cthr) if cthr is not None else ()
    best = best_log_shares(cs.q.double(), cs.centroids, cs.offsets, cs.scale, block_q, *hier)
    fin = best[torch.isfinite(best)]
    if fin.numel() == 0:  # nothing listed: any threshold
        return torch.tensor(0.0, device=DEV)
    if torch.unique(fin).numel() == 1:
        return torch.tensor(float(fin[0]) - 1.0, device=DEV)
    return torch.tensor(between(best, keep), dtype=torch.float32, device=DEV)


def _check_list(cs, listing, cthr, block_q):
    """The device list equals the reference's children of kept coarse clusters, ascending."""
    want = listed_children_reference(cs.q, cs.centroids, cs.offsets, cs.coarse_centroids,
                                     cs.coarse_offsets, cthr, cs.scale, block_q)
    want = want.reshape(-1, want.shape[-1]).cpu()
    lst, listed = listing["list"].cpu(), listing["listed"].cpu()
    for row in range(want.shape[0]):
        kids = torch.nonzero(want[row]).flatten().to(torch.int32)
        assert int(listed[row]) == len(kids), f"row {row}"
        assert torch.equal(lst[row, :len(kids)], kids), f"row {row}"
    return listed


# odd sizes; (16, 16) tiles force several splits of both levels (decode: stored scores; the
# m=9 case: two query sub-tiles per block, scores recomputed)
SHAPES = [
    (dict(b=2, h=2, g=2, m=1, n=61, c=23), 4, (16, 16), 5),
    (dict(b=1, h=3, g=2, m=9, n=71, c=37), 8, (16, 16), 19),
    (dict(b=3, h=1, g=1, m=3, n=7, c=5), 2, None, 3),
]


@pytest.mark.parametrize("shape,block_q,tiles,coarse", SHAPES)
@pytest.mark.parametrize("which", ["none", "some", "all"])
@pytest.mark.parametrize("budget", [0, 13])
def test_hier_matches_reference(poisoned, shape, block_q, tiles, coarse, which, budget):
    cs = make_case(**shape, coarse=coarse, device=DEV, seed=shape["c"] + budget)
    cthr = coarse_threshold(cs, block_q, which)
    thr = fine_threshold(cs, 0.3, block_q, cthr)
    listing = {}
    sel = lookup_launch.lookup(cs.q, cs.centroids, cs.offsets, thr, cs.coarse_centroids,
                               cs.coarse_offsets, cthr, cs.scale, block_q, budget, tiles=tiles,
                               listing=listing)
    idx, count = select_clusters_reference(cs.q.double(), cs.centroids, cs.offsets, thr, cs.scale,
                                           block_q, budget, cs.coarse_centroids,
                                           cs.coarse_offsets, cthr)
    assert torch.equal(sel.idx.cpu(), idx.cpu()) and torch.equal(sel.count.cpu(), count.cpu())
    listed = _check_list(cs, listing, cthr, block_q)
    c = cs.centroids.shape[1]
    if which == "none":
        assert int(listed.max()) == 0 and int(sel.count.max()) == 0 and int(sel.nkeys.max()) == 0
    elif which == "some":  # the coarse level really prunes, and the fine level still keeps some
        assert 0 < int(listed.sum()) < listed.numel() * c
    if which == "all":  # every child of a coarse cluster holding keys (all C when all do)
        h = cs.centroids.shape[0]
        nb = listed.numel() // (shape["b"] * h)
        co, off = cs.coarse_offsets.long().cpu(), cs.offsets.long().cpu()
        for row in range(listed.numel()):
            hh = (row // nb) % h
            keys = off[hh, co[hh, 1:]] - off[hh, co[hh, :-1]]
            assert int(listed[row]) == int((co[hh, 1:] - co[hh, :-1])[keys > 0].sum()) <= c


@pytest.mark.parametrize("budget", [0, 9])
def test_hier_keep_all_coarse_is_flat(poisoned, budget):
    """With every coarse cluster kept the rule is the flat one: same selection."""
    cs = make_case(b=2, h=2, g=3, m=5, n=83, c=29, coarse=7, device=DEV, seed=4)
    thr = fine_threshold(cs, 0.4, 4, None)
    hier = lookup_launch.lookup(cs.q, cs.centroids, cs.offsets, thr, cs.coarse_centroids,
                                cs.coarse_offsets, torch.tensor(-INF, device=DEV), cs.scale, 4,
                                budget, tiles=(16, 16))
    flat = lookup_launch.lookup(cs.q, cs.centroids, cs.offsets, thr, None, None, None, cs.scale, 4,
                                budget, tiles=(16, 16))
    assert torch.equal(hier.idx.cpu(), flat.idx.cpu()) and torch.equal(hier.nkeys, flat.nkeys)


@pytest.mark.parametrize("fine", ["keep0", "keep1"])
@pytest.mark.parametrize("which", ["none", "some", "all"])
def test_hier_fine_keep_zero_and_one(poisoned, fine, which):
    """Fine threshold +inf keeps nothing; -inf keeps exactly the listed non-empty children."""
    cs = make_case(b=1, h=2, g=2, m=1, n=45, c=17, coarse=4, device=DEV, seed=11)
    thr = torch.tensor(INF if fine == "keep0" else -INF, device=DEV)
    cthr = coarse_threshold(cs, 1, which)
    listing = {}
    sel = lookup_launch.lookup(cs.q, cs.centroids, cs.offsets, thr, cs.coarse_centroids,
                               cs.coarse_offsets, cthr, cs.scale, 1, 0, tiles=(16, 16),
                               listing=listing)
    idx, count = select_clusters_reference(cs.q.double(), cs.centroids, cs.offsets, thr, cs.scale,
                                           1, 0, cs.coarse_centroids, cs.coarse_offsets, cthr)
    assert torch.equal(sel.idx.cpu(), idx.cpu()) and torch.equal(sel.count.cpu(), count.cpu())
    _check_list(cs, listing, cthr, 1)
    want = listed_children_reference(cs.q, cs.centroids, cs.offsets, cs.coarse_centroids,
                                     cs.coarse_offsets, cthr, cs.scale, 1)
    nonempty = (cluster_sizes(cs.offsets) > 0)[None, :, None, :]
    expect = 0 if fine == "keep0" else int((want & nonempty).sum())
    assert int(sel.count.sum()) == expect


def test_hier_empty_coarse_and_one_key_clusters(poisoned):
    """A coarse cluster without children, one whose children hold no keys, one holding a single
    one-key child: the two empty ones are never listed, the one-key child is when its parent is
    kept, and the selection equals the reference's at every coarse threshold."""
    cs = make_case(b=2, h=1, g=2, m=1, n=40, c=9, coarse=5, device=DEV, seed=2)
    # fine sizes: children 0,1 of coarse 1 hold no keys; child 2 (coarse 2) one key
    sizes = torch.tensor([[0, 0, 1, 5, 9, 0, 12, 3, 10]], dtype=torch.int32)
    cs.offsets = torch.cat([torch.zeros(1, 1, dtype=torch.int32), sizes.cumsum(1)], 1).to(torch.int32).to(DEV)
    # coarse 0: no children; 1: fine 0-1; 2: fine 2; 3: fine 3-5; 4: fine 6-8
    cs.coarse_offsets = torch.tensor([[0, 0, 2, 3, 6, 9]], dtype=torch.int32, device=DEV)
    for which in ("none", "some", "all"):
        cthr = coarse_threshold(cs, 1, which)
        listing = {}
        for fine in (fine_threshold(cs, 0.5, 1, cthr), torch.tensor(-INF, device=DEV)):
            sel = lookup_launch.lookup(cs.q, cs.centroids, cs.offsets, fine, cs.coarse_centroids,
                                       cs.coarse_offsets, cthr, cs.scale, 1, 0, tiles=(16, 16),
                                       listing=listing)
            idx, count = select_clusters_reference(cs.q.double(), cs.centroids, cs.offsets, fine,
                                                   cs.scale, 1, 0, cs.coarse_centroids,
                                                   cs.coarse_offsets, cthr)
            assert torch.equal(sel.idx.cpu(), idx.cpu()) and torch.equal(sel.count.cpu(), count.cpu())
        lst = listing["list"].cpu()
        listed = _check_list(cs, listing, cthr, 1)
        for row in range(lst.shape[0]):
            assert not bool((lst[row, :int(listed[row])] < 2).any())  # zero-key parents: never
        if which == "all":
            assert listed.tolist() == [7, 7]  # fine 2..8: every child of a coarse cluster with keys


@pytest.mark.parametrize("which", ["none", "some", "all"])
@pytest.mark.parametrize("kw,block_q", [(dict(b=2, h=2, g=2, m=1, n=61, c=23), 4),
                                        (dict(b=1, h=3, g=4, m=1, n=97, c=41), 1),
                                        (dict(b=4, h=4, g=1, m=1, n=81, c=41), 4)])
def test_hier_fused_decode_positions(poisoned, kw, block_q, which):
    """Decode (stored scores, one fused select over the listed slots) writes the kept keys'
    positions; they equal the cluster list expanded, which equals the reference's selection."""
    cs = make_case(**kw, coarse=7, device=DEV, seed=kw["c"])
    cthr = coarse_threshold(cs, block_q, which)
    thr = fine_threshold(cs, 0.3, block_q, cthr)
    n = cs.keys.shape[1]
    args = (cs.q, cs.centroids, cs.offsets, thr, cs.coarse_centroids, cs.coarse_offsets, cthr,
            cs.scale, block_q, 0)
    fused = lookup_launch.lookup(*args, tiles=(16, 16), positions=n)
    assert fused.idx is None
    plain = lookup_launch.lookup(*args, tiles=(16, 16))
    idx, _ = select_clusters_reference(cs.q.double(), cs.centroids, cs.offsets, thr, cs.scale,
                                       block_q, 0, cs.coarse_centroids, cs.coarse_offsets, cthr)
    assert torch.equal(plain.idx.cpu(), idx.cpu())
    assert_same_positions(fused, plain, n)
