"""The sqz Triton kernels equal the plain-torch references at small sizes.

On a CPU-only machine conftest sets TRITON_INTERPRET=1 and the launchers run on CPU tensors under
the Triton interpreter; with CUDA the same checks run on the GPU. Sizes are tiny (the interpreter
is slow); tile sizes are forced small so the multi-split and merge paths run too.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from sqz_compile.kernels.attention import launch as attention_launch  # noqa: E402
from sqz_compile.kernels.lookup import launch as lookup_launch  # noqa: E402
from sqz_compile.kernels.attention.reference import selection_from_compact  # noqa: E402
from sqz_compile.kernels.lookup.reference import select_clusters_reference  # noqa: E402

from cases import (  # noqa: E402
    assert_same_positions, make_case, reference_with_selection, rel_err, threshold_for_keep)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)


def _lookup(cs, thr, block_q, budget=0, coarse_thr=None, tiles=None):
    return lookup_launch.lookup(cs.q, cs.centroids, cs.offsets, thr, cs.coarse_centroids, cs.coarse_offsets,
                       coarse_thr, cs.scale, block_q, budget, tiles=tiles)


def _ref_lookup(cs, thr, block_q, budget=0, coarse_thr=None):
    return select_clusters_reference(cs.q, cs.centroids, cs.offsets, thr, cs.scale, block_q, budget,
                                     cs.coarse_centroids, cs.coarse_offsets, coarse_thr)


def _check_selection_tables(cs, sel):
    """cum/delta/nkeys agree with idx: slot j covers sorted keys delta[j]+cum[j] .. +size."""
    b, h, nb, c = sel.idx.shape
    idx = sel.idx.reshape(-1, c).long().cpu()
    off = cs.offsets.long().cpu()
    cum, delta = sel.cum.long().cpu(), sel.delta.long().cpu()
    for row in range(idx.shape[0]):
        hh = (row // nb) % h
        kept = idx[row][idx[row] >= 0]
        sizes = off[hh, kept + 1] - off[hh, kept]
        want = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        assert torch.equal(cum[row, :len(kept) + 1], want)
        assert torch.equal(delta[row, :len(kept)] + cum[row, :len(kept)], off[hh, kept])
        assert int(sel.nkeys[row]) == int(sizes.sum())


# (case kwargs, block_q, tiles): decode-like rows (stored scores) and prefill-like rows (two
# query sub-tiles), each with cluster tiles small enough to split the cluster axis.
LOOKUP_SHAPES = [
    (dict(b=2, h=2, g=2, m=1, n=60, c=21), 4, (16, 16)),
    (dict(b=1, h=2, g=4, m=9, n=70, c=24), 8, (16, 16)),
    (dict(b=3, h=1, g=1, m=3, n=5, c=5), 2, None),
]


@pytest.mark.parametrize("shape,block_q,tiles", LOOKUP_SHAPES)
@pytest.mark.parametrize("mode", ["flat", "flat-budget", "hier", "hier-budget", "flat-var", "hier-budget-var"])
def test_lookup_matches_reference(shape, block_q, tiles, mode):
    """-var: centroids with per-channel variances (the lookup scores [q, s/2 q^2])."""
    hier = mode.startswith("hier")
    cs = make_case(**shape, coarse=5 if hier else 0, device=DEV, seed=len(mode) + shape["c"],
                   variance=mode.endswith("var"))
    thr = threshold_for_keep(cs, 0.3, block_q)
    cthr = torch.tensor(-2.0, device=DEV) if hier else None
    budget = 12 if "budget" in mode else 0
    sel = _lookup(cs, thr, block_q, budget, cthr, tiles)
    idx, count = _ref_lookup(cs, thr, block_q, budget, cthr)
    assert torch.equal(sel.idx.cpu(), idx.cpu()) and torch.equal(sel.count.cpu(), count.cpu())
    _check_selection_tables(cs, sel)


@pytest.mark.parametrize("hier", [False, True], ids=["flat", "hier"])
@pytest.mark.parametrize("kw,block_q", [(dict(b=2, h=2, g=2, m=1, n=60, c=21), 4),
                                        (dict(b=2, h=2, g=2, m=1, n=60, c=21, variance=True), 4),
                                        (dict(b=1, h=3, g=4, m=1, n=97, c=40), 1),
                                        (dict(b=1, h=1, g=1, m=3, n=9, c=1), 4),
                                        (dict(b=4, h=4, g=1, m=1, n=80, c=40), 4)])
def test_fused_decode_positions(kw, block_q, hier):
    """Decode in threshold mode writes the kept keys' positions in one kernel (scores, threshold,
    look-back over the splits): they equal the cluster list expanded, for every row. The last
    case has chunks of several cluster tiles (16 rows: one split)."""
    cs = make_case(**kw, coarse=3 if hier else 0, device=DEV, seed=kw["c"])
    thr = threshold_for_keep(cs, 0.3, block_q)
    cthr = torch.tensor(-2.0, device=DEV) if hier else None
    n = cs.keys.shape[1]
    args = (cs.q, cs.centroids, cs.offsets, thr, cs.coarse_centroids, cs.coarse_offsets, cthr,
            cs.scale, block_q, 0)
    fused = lookup_launch.lookup(*args, tiles=(16, 16), positions=n)
    assert fused.idx is None  # the fused path ran (no cluster list)
    plain = lookup_launch.lookup(*args, tiles=(16, 16))
    idx, _ = _ref_lookup(cs, thr, block_q, 0, cthr)
    assert torch.equal(plain.idx.cpu(), idx.cpu())
    assert_same_positions(fused, plain, n)


def test_lookup_budget_ties_and_extremes():
    """Tied scores (duplicated centroids of equal-size clusters) are cut in ascending index order;
    budget 1 and a budget above N behave like the reference."""
    cs = make_case(b=1, h=2, g=2, m=1, n=40, c=10, device=DEV, seed=3)
    off = torch.arange(0, 41, 4, dtype=torch.int32, device=DEV).expand(2, 11).contiguous()
    cs.offsets = off
    cs.centroids[:, 1::2] = cs.centroids[:, 0::2]  # pairs of identical clusters -> exact ties
    thr = torch.tensor(0.0, device=DEV)
    for budget in (1, 4, 6, 8, 12, 20, 1000):
        sel = _lookup(cs, thr, 4, budget)
        idx, count = _ref_lookup(cs, thr, 4, budget)
        assert torch.equal(sel.idx.cpu(), idx.cpu()), budget
        assert torch.equal(sel.count.cpu(), count.cpu()), budget


ATTN_CASES = [
    dict(mask="causal"),
    dict(mask="bool"),
    dict(mask="float"),
    dict(mask="none", b=1, g=4, m=12, s=20),
    dict(mask="causal", m=1, s=1),                      # decode, one new key
    dict(mask="bool", m=1, s=9, g=8, h=1),              # decode, GQA 8
    dict(mask="causal", d=80, n=40, c=6),               # non-power-of-2 head dim
]


@pytest.mark.parametrize("kw", ATTN_CASES, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("pos_list", [False, True], ids=["search", "pos_list"])
def test_attention_matches_reference(kw, split, pos_list):
    """Both ways of addressing the kept keys: the in-kernel slot search and the expanded
    position list (decode's default)."""
    block_q = 4
    cs = make_case(**kw, device=DEV, seed=split)
    thr = threshold_for_keep(cs, 0.4, block_q)
    sel = _lookup(cs, thr, block_q)
    b, hq, m, d = cs.q.shape
    h = cs.keys.shape[0]
    cfg = attention_launch.attention_config(b, h, hq // h, m, block_q, cs.keys.shape[1], cs.window_keys.shape[1],
                                cs.k_new.shape[2], d, 4)._replace(split=split, block_n=16,
                                                                 pos_list=pos_list)
    out = attention_launch.sparse_attention(cs.q, cs.k_new, cs.v_new, cs.attn_mask, cs.keys, cs.values, sel,
                                cs.window_keys, cs.window_values, cs.scale, cs.is_causal, block_q,
                                config=cfg)
    ref = reference_with_selection(cs, sel.idx, block_q)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_keep_zero_and_one(keep):
    """keep 0: only window + new tokens; keep 1: every context key (dense over the prompt)."""
    cs = make_case(b=2, h=2, g=2, m=6, n=30, c=5, device=DEV, seed=7)
    thr = torch.tensor(float("inf") if keep == 0 else float("-inf"), device=DEV)
    out = attention_launch.squeezed_attention(cs.q, cs.k_new, cs.v_new, None, cs.keys, cs.values, cs.centroids,
                                  cs.offsets, cs.window_keys, cs.window_values, thr, None, None,
                                  None, None, *(None,) * 7, cs.scale, True, 0, 4)
    q, k, v = cs.q.double(), cs.k_new.double(), cs.v_new.double()
    hq, h = q.shape[1], k.shape[1]
    ctx_k = cs.keys.double() if keep else cs.keys.double()[:, :0]
    ctx_v = cs.values.double() if keep else cs.values.double()[:, :0]
    kk = torch.cat([ctx_k, cs.window_keys.double()], 1)[None].expand(q.shape[0], -1, -1, -1)
    vv = torch.cat([ctx_v, cs.window_values.double()], 1)[None].expand(q.shape[0], -1, -1, -1)
    kk, vv = torch.cat([kk, k], 2), torch.cat([vv, v], 2)
    m, s, p = q.shape[2], k.shape[2], kk.shape[2] - k.shape[2]
    allowed = torch.ones(m, s, dtype=torch.bool, device=DEV).tril()
    allowed = torch.cat([torch.ones(m, p, dtype=torch.bool, device=DEV), allowed], 1)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, kk.repeat_interleave(hq // h, 1), vv.repeat_interleave(hq // h, 1), attn_mask=allowed,
        scale=cs.scale)
    assert rel_err(out, dense) < 1e-5


def test_full_op_path_matches_cpu_reference_bf16():
    """attention_launch.squeezed_attention in bf16 (hierarchical, budget) against the op's reference."""
    cs = make_case(b=2, h=2, g=4, m=10, n=80, c=12, coarse=4, dtype=torch.bfloat16, device=DEV,
                   seed=11)
    thr = torch.tensor(-1.0, device=DEV)
    cthr = torch.tensor(-3.0, device=DEV)
    block_q = 8
    sel = _lookup(cs, thr, block_q, 30, cthr)
    out = attention_launch.squeezed_attention(cs.q, cs.k_new, cs.v_new, None, cs.keys, cs.values, cs.centroids,
                                  cs.offsets, cs.window_keys, cs.window_values, thr,
                                  cs.coarse_centroids, cs.coarse_offsets, cthr, None, *(None,) * 7, cs.scale, True, 30,
                                  block_q)
    ref = reference_with_selection(cs, sel.idx, block_q)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2
