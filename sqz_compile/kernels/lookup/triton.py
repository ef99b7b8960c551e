"""Centroid lookup, Triton kernels (launched from lookup/launch.py; the plain-torch reference,
with the rule, is lookup/reference.py)."""
from __future__ import annotations

from ..triton_common import HAS_TRITON

# ---------------------------------------------------------------------------------------------
# Triton kernels (launched from lookup/launch.py). A "row" is one (batch row, KV head, query
# block); its queries are the block's queries of every head in the GQA group, packed as
# r = g * BQ + i. The cluster axis of a row is split over several programs ("splits") so that
# decode (few rows) still fills the GPU. Pipeline (flat):
#   _lse_kernel      partial logsumexp_c(s q.mu_c + log n_c) per query and split
#   _best_kernel     best_c = max over the row's queries of (s q.mu_c - lse_q); threshold mode
#                    also counts the kept clusters (and their keys) per split
#   _budget_kernel   budget mode only: per row, the key-threshold T on the float bits of best
#                    found by bisection (sum of sizes of clusters scoring >= T fits the budget),
#                    plus the tie cut-off, which reproduces the reference's stable sort exactly
#   _compact_kernel  ascending kept-cluster list, padded with -1, plus for the attention kernels
#                    the running key count `cum` and `delta` = cluster start - cum, so a packed
#                    key v of slot j lives at sorted position v + delta[j]
#   _expand_kernel   the attention's position list: sorted position of each kept key
# Decode in threshold mode (scores stored by _lse_kernel) replaces _best, _compact and _expand by
# one _select_kernel whose splits hand their counts on by decoupled look-back.
# Hierarchical: _lse on the coarse level; _best on the coarse level writes keep flags, the
# per-split child counts of the kept coarse clusters and the partial lse over the PRUNED coarse
# clusters (they stand for their children in the fine denominator) and each row's ascending list
# of the kept coarse clusters' children (contiguous fine ranges, placed by a look-back prefix sum
# over the splits' child counts); the fine passes (_lse, _best/_compact or _select) then walk
# only the listed slots [0, listed) (LIST: slot j holds fine cluster List[row, j]), each split
# taking an equal share of the row's listed slots, with the pruned lse merged as a second set.
# The list's capacity is C (all fine clusters), so it never overflows.
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _fkey(x):
        """Float32 -> int32 with the same order (bit trick), for the budget bisection."""
        b = x.to(tl.int32, bitcast=True)
        return tl.where(b < 0, b ^ 0x7FFFFFFF, b)

    @triton.jit
    def _row_queries(Q, row, qt, sqb, sqh, sqm, H, NB, G, BQ, M, block_q, D,
                     QT: tl.constexpr, BLOCK_D: tl.constexpr):
        b = row // (H * NB)
        h = (row // NB) % H
        nb = row % NB
        r = qt * QT + tl.arange(0, QT)
        g = r // BQ
        i = r % BQ
        valid = (g < G) & (i < tl.minimum(BQ, M - nb * block_q))
        m = nb * block_q + i
        d = tl.arange(0, BLOCK_D)
        ptr = Q + b * sqb + (h * G + g)[:, None] * sqh + m[:, None] * sqm + d[None, :]
        q = tl.load(ptr, mask=valid[:, None] & (d[None, :] < D), other=0.0)
        return q, r, valid

    @triton.jit
    def _log_sizes(Off, CO, Flags, row, h, c, cvalid, soh, scoh, NFLAG,
                   TWO_LEVEL: tl.constexpr, FILTER: tl.constexpr):
        """Sizes n_c and log n_c (-inf for empty, out-of-range or filtered-out clusters).
        FILTER 2: keep only pruned (unflagged) clusters (the coarse level's pruned lse)."""
        if TWO_LEVEL:
            lo = tl.load(CO + h * scoh + c, mask=cvalid, other=0)
            hi = tl.load(CO + h * scoh + c + 1, mask=cvalid, other=0)
            n = (tl.load(Off + h * soh + hi, mask=cvalid, other=0)
                 - tl.load(Off + h * soh + lo, mask=cvalid, other=0))
        else:
            n = (tl.load(Off + h * soh + c + 1, mask=cvalid, other=0)
                 - tl.load(Off + h * soh + c, mask=cvalid, other=0))
        ok = cvalid & (n > 0)
        if FILTER == 2:
            ok = ok & (tl.load(Flags + row * NFLAG + c, mask=cvalid, other=1) == 0)
        logn = tl.where(ok, tl.log(tl.maximum(n, 1).to(tl.float32)), float("-inf"))
        return n, logn, ok

    @triton.jit
    def _ids(List, row, j, jvalid, CAP, LIST: tl.constexpr):
        """Fine cluster of each slot j: List[row, j] (LIST), else j itself."""
        if LIST:
            cid = tl.load(List + row * CAP + j, mask=jvalid, other=0)
        else:
            cid = j
        return cid

    @triton.jit
    def _span(Listed, row, split, SPLIT, chunk, C, UNIT, LIST: tl.constexpr):
        """This split's slots [lo, hi): a static chunk of [0, C), or (LIST) an equal share,
        rounded to UNIT, of the row's listed slots [0, Listed[row])."""
        if LIST:
            n = tl.load(Listed + row)
            ch = tl.cdiv(tl.cdiv(n, SPLIT), UNIT) * UNIT
            lo = split * ch
            hi = tl.minimum(n, lo + ch)
        else:
            lo = split * chunk
            hi = tl.minimum(C, lo + chunk)
        return lo, hi

    @triton.jit
    def _load_mu(Cent, h, c, cvalid, sch, scc, D, BLOCK_D: tl.constexpr):
        """Centroid tile [BLOCK_D, BC] (transposed for the dot)."""
        d = tl.arange(0, BLOCK_D)
        return tl.load(Cent + h * sch + c[None, :] * scc + d[:, None],
                       mask=cvalid[None, :] & (d[:, None] < D), other=0.0)

    @triton.jit
    def _dot_mu(q, mu, scale, DOT: tl.constexpr):
        """s q.mu. DOT 0: centroids in q's dtype (tensor cores; the launcher passes a rounded
        copy); 1: exact float32 FMA; 2: tf32x3 (float32-accurate on tensor cores)."""
        if DOT == 1:
            s = tl.dot(q.to(tl.float32), mu.to(tl.float32), input_precision="ieee")
        elif DOT == 2:
            s = tl.dot(q.to(tl.float32), mu.to(tl.float32), input_precision="tf32x3")
        else:
            s = tl.dot(q, mu.to(q.dtype))
        return (s * scale).to(tl.float32)  # Inductor may pass the scale as float64

    @triton.jit
    def _scores(q, Cent, h, c, cvalid, sch, scc, D, scale,
                BLOCK_D: tl.constexpr, DOT: tl.constexpr):
        return _dot_mu(q, _load_mu(Cent, h, c, cvalid, sch, scc, D, BLOCK_D), scale, DOT)

    @triton.jit
    def _extent(Off, List, row, h, j, jm, soh, C, LIST: tl.constexpr):
        """(cluster, first sorted key, size) of the slots j."""
        c = _ids(List, row, j, jm, C, LIST)
        start = tl.load(Off + h * soh + c, mask=jm, other=0)
        return c, start, tl.load(Off + h * soh + c + 1, mask=jm, other=0) - start

    @triton.jit
    def _lse_rows(Q, Cent, Off, CO, Flags, List, PartL, Scores, row, split, h, c_lo, c_hi,
                  sqb, sqh, sqm, sch, scc, soh, scoh, H, NB, G, BQ, M, block_q, C, NFLAG, D,
                  SPLIT, NQT, scale,
                  QT: tl.constexpr, BC: tl.constexpr, BLOCK_D: tl.constexpr,
                  TWO_LEVEL: tl.constexpr, FILTER: tl.constexpr, LIST: tl.constexpr,
                  STORE_SCORES: tl.constexpr, LOAD_SCORES: tl.constexpr, DOT: tl.constexpr):
        """PartL[row, split, r] = logsumexp over the slots [c_lo, c_hi) of s q_r.mu_c + log n_c.
        Scores are stored / loaded per slot."""
        for qt in range(0, NQT):
            q, r, qvalid = _row_queries(Q, row, qt, sqb, sqh, sqm, H, NB, G, BQ, M, block_q, D,
                                        QT, BLOCK_D)
            mx = tl.full([QT], float("-inf"), tl.float32)
            sm = tl.zeros([QT], tl.float32)
            for c0 in range(c_lo, c_hi, BC):
                j = c0 + tl.arange(0, BC)
                jvalid = j < c_hi
                c = _ids(List, row, j, jvalid, C, LIST)
                n, logn, ok = _log_sizes(Off, CO, Flags, row, h, c, jvalid, soh, scoh, NFLAG,
                                         TWO_LEVEL, FILTER)
                # skip tiles with nothing to score only when a filter can empty them: a dynamic
                # branch around the loads stops Triton from pipelining the loop
                if FILTER != 0:
                    live = tl.max(ok.to(tl.int32), axis=0) > 0
                else:
                    live = True
                if live:
                    if LOAD_SCORES:
                        s = tl.load(Scores + (row * QT + r[:, None]) * C + j[None, :],
                                    mask=qvalid[:, None] & ok[None, :], other=0.0)
                    else:
                        s = _scores(q, Cent, h, c, ok, sch, scc, D, scale, BLOCK_D, DOT)
                    if STORE_SCORES:
                        tl.store(Scores + (row * QT + r[:, None]) * C + j[None, :], s,
                                 mask=qvalid[:, None] & ok[None, :])
                    t = s + logn[None, :]
                    new = tl.maximum(mx, tl.max(t, axis=1))
                    safe = tl.where(new == float("-inf"), 0.0, new)
                    sm = sm * tl.exp(mx - safe) + tl.sum(tl.exp(t - safe[:, None]), axis=1)
                    mx = new
            lse = tl.where(sm > 0, mx + tl.log(tl.where(sm > 0, sm, 1.0)), float("-inf"))
            tl.store(PartL + (row * SPLIT + split) * (NQT * QT) + r, lse)

    @triton.jit
    def _lse_kernel(Q, Cent, Off, CO, List, Listed, PartL, Scores, Sync,
                    sqb, sqh, sqm, sch, scc, soh, scoh,
                    H, NB, G, BQ, M, block_q, C, D, SPLIT, chunk, NQT, scale,
                    QT: tl.constexpr, BC: tl.constexpr, BLOCK_D: tl.constexpr,
                    TWO_LEVEL: tl.constexpr, LIST: tl.constexpr,
                    STORE_SCORES: tl.constexpr, LOAD_SCORES: tl.constexpr, DOT: tl.constexpr,
                    ZERO_SYNC: tl.constexpr):
        """PartL[row, split, r] = logsumexp over this split's clusters (LIST: listed slots) of
        s q_r.mu_c + log n_c. Decode stores the scores of the valid query rows (STORE_SCORES) for
        later passes to load instead of recompute. ZERO_SYNC: clear the flags `_select_kernel`
        publishes into."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        h = (row // NB) % H
        c_lo, c_hi = _span(Listed, row, split, SPLIT, chunk, C, BC, LIST)
        if ZERO_SYNC:
            tl.store(Sync + row * SPLIT + split, tl.zeros([], tl.int64))
        _lse_rows(Q, Cent, Off, CO, Off, List, PartL, Scores, row, split, h, c_lo, c_hi,
                  sqb, sqh, sqm, sch, scc, soh, scoh, H, NB, G, BQ, M, block_q, C, 1, D,
                  SPLIT, NQT, scale, QT, BC, BLOCK_D, TWO_LEVEL, 0, LIST,
                  STORE_SCORES, LOAD_SCORES, DOT)

    @triton.jit
    def _merged_lse(PartL, SPLIT_L, PartL2, SPLIT_L2, row, r, QRP, QT: tl.constexpr,
                    HAS_L2: tl.constexpr, SP1: tl.constexpr, SP2: tl.constexpr):
        """logsumexp over the partials of every split (one 2-D load per set, no serial chain)."""
        sp = tl.arange(0, SP1)
        x = tl.load(PartL + (row * SPLIT_L + sp[:, None]) * QRP + r[None, :],
                    mask=sp[:, None] < SPLIT_L, other=float("-inf"))
        mx = tl.max(x, axis=0)
        if HAS_L2:
            sp2 = tl.arange(0, SP2)
            x2 = tl.load(PartL2 + (row * SPLIT_L2 + sp2[:, None]) * QRP + r[None, :],
                         mask=sp2[:, None] < SPLIT_L2, other=float("-inf"))
            mx = tl.maximum(mx, tl.max(x2, axis=0))
        safe = tl.where(mx == float("-inf"), 0.0, mx)
        sm = tl.sum(tl.exp(x - safe[None, :]), axis=0)
        if HAS_L2:
            sm += tl.sum(tl.exp(x2 - safe[None, :]), axis=0)
        return tl.where(sm > 0, mx + tl.log(tl.where(sm > 0, sm, 1.0)), float("-inf"))

    @triton.jit
    def _best_kernel(Q, Cent, Off, CO, List, Listed, PartL, PartL2, Scores, Best, Thr,
                     CntS, SumS, KeepOut, PrunedL, Sync,
                     sqb, sqh, sqm, sch, scc, soh, scoh,
                     H, NB, G, BQ, M, block_q, C, D, SPLIT, chunk, NQT, SPLIT_L, SPLIT_L2,
                     CAP, scale,
                     QT: tl.constexpr, BC: tl.constexpr, BLOCK_D: tl.constexpr,
                     TWO_LEVEL: tl.constexpr, LIST: tl.constexpr, HAS_L2: tl.constexpr,
                     LOAD_SCORES: tl.constexpr, DOT: tl.constexpr, THRESH: tl.constexpr,
                     KEEP_FLAGS: tl.constexpr, SP1: tl.constexpr, SP2: tl.constexpr):
        """Best[row, j] = max_r (s q_r.mu_c - lse_r) for the cluster c of slot j (-inf if empty).
        THRESH: also count kept clusters / keys per split (CntS, SumS). KEEP_FLAGS (coarse level,
        threshold mode): write 0/1 flags, PrunedL[row, split, r] = the partial lse of the split's
        pruned clusters (s q_r.mu_k + log n_k), and the fine list: List[row, :Listed[row]] = the
        kept clusters' children, ascending (slots placed by a look-back prefix sum of the child
        counts over the splits; capacity CAP = all fine clusters)."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        h = (row // NB) % H
        c_lo, c_hi = _span(Listed, row, split, SPLIT, chunk, C, BC, LIST)
        QRP = NQT * QT
        if THRESH:
            thr = tl.load(Thr)
        cnt = tl.zeros([], tl.int32)
        ssum = tl.zeros([], tl.int32)
        if LOAD_SCORES:  # decode: one query tile, its lse merged once for the whole chunk
            q0, r0, rvalid0 = _row_queries(Q, row, 0, sqb, sqh, sqm, H, NB, G, BQ, M,
                                           block_q, D, QT, BLOCK_D)
            lse0 = _merged_lse(PartL, SPLIT_L, PartL2, SPLIT_L2, row, r0, QRP, QT, HAS_L2, SP1, SP2)
        for c0 in range(c_lo, c_hi, BC):
            j = c0 + tl.arange(0, BC)
            jvalid = j < c_hi
            c = _ids(List, row, j, jvalid, C, LIST)
            n, logn, ok = _log_sizes(Off, CO, Off, row, h, c, jvalid, soh, scoh, 1, TWO_LEVEL, 0)
            if LOAD_SCORES:
                s = tl.load(Scores + (row * QT + r0[:, None]) * C + j[None, :],
                            mask=rvalid0[:, None] & ok[None, :], other=0.0)
                ls = tl.where(rvalid0[:, None] & ok[None, :], s - lse0[:, None], float("-inf"))
                best = tl.max(ls, axis=0)
            else:
                mu = _load_mu(Cent, h, c, ok, sch, scc, D, BLOCK_D)  # once for all q tiles
                # elementwise max over the query tiles, then one (cross-warp) reduction
                # over the rows per cluster tile instead of one per query tile
                acc = tl.full([QT, BC], float("-inf"), tl.float32)
                for qt in range(0, NQT):
                    q, r, rvalid = _row_queries(Q, row, qt, sqb, sqh, sqm, H, NB, G, BQ, M,
                                                block_q, D, QT, BLOCK_D)
                    lse = _merged_lse(PartL, SPLIT_L, PartL2, SPLIT_L2, row, r, QRP, QT,
                                      HAS_L2, SP1, SP2)
                    s = _dot_mu(q, mu, scale, DOT)
                    acc = tl.maximum(acc, tl.where(rvalid[:, None], s - lse[:, None],
                                                   float("-inf")))
                best = tl.where(ok, tl.max(acc, axis=0), float("-inf"))
            tl.store(Best + row * C + j, best, mask=jvalid)
            if THRESH:
                keep = jvalid & (best > thr)
                cnt += tl.sum(keep.to(tl.int32), axis=0)
                if KEEP_FLAGS:
                    nch = (tl.load(CO + h * scoh + c + 1, mask=keep, other=0)
                           - tl.load(CO + h * scoh + c, mask=keep, other=0))
                    ssum += tl.sum(tl.where(keep, nch, 0), axis=0)
                    tl.store(KeepOut + row * C + j, keep.to(tl.int8), mask=jvalid)
                else:
                    ssum += tl.sum(tl.where(keep, n, 0), axis=0)
        if KEEP_FLAGS:
            # publish (flag bit 62 | kept children) for the splits after this one (Sync zeroed
            # by the coarse _lse_kernel), compute the pruned lse meanwhile, then wait for the
            # splits before (decoupled look-back, as in _select_kernel) and list the children
            tl.atomic_xchg(Sync + row * SPLIT + split,
                           tl.full([], 1 << 62, tl.int64) | ssum.to(tl.int64))
            tl.debug_barrier()  # the flags are re-read by other threads than those that stored them
            _lse_rows(Q, Cent, Off, CO, KeepOut, List, PrunedL, Scores, row, split, h, c_lo, c_hi,
                      sqb, sqh, sqm, sch, scc, soh, scoh, H, NB, G, BQ, M, block_q, C, C, D,
                      SPLIT, NQT, scale, QT, BC, BLOCK_D, TWO_LEVEL, 2, False,
                      False, LOAD_SCORES, DOT)
            sp = tl.arange(0, SP1)
            pred = sp < split
            word = tl.load(Sync + row * SPLIT + sp, mask=pred, other=1 << 62, volatile=True)
            while tl.min(word >> 62, axis=0) == 0:
                word = tl.load(Sync + row * SPLIT + sp, mask=pred, other=1 << 62, volatile=True)
            base = tl.sum(tl.where(pred, word & 0xFFFFFFFF, 0), axis=0).to(tl.int32)
            _list_children(CO, KeepOut, List, row, h, c_lo, c_hi, base, scoh, C, CAP, BC, 16)
            if split == SPLIT - 1:
                tl.store(Listed + row, base + ssum)
        elif THRESH:
            tl.store(CntS + row * SPLIT + split, cnt)
            tl.store(SumS + row * SPLIT + split, ssum)

    @triton.jit
    def _list_children(CO, Keep, List, row, h, c_lo, c_hi, base, scoh, CC, CAP,
                       BLOCK: tl.constexpr, KB: tl.constexpr):
        """Writes the children of the kept coarse clusters of [c_lo, c_hi) to List[row] from slot
        base on (children of coarse cluster k: the fine range [CO[k], CO[k+1]))."""
        kb = tl.arange(0, KB)
        for c0 in range(c_lo, c_hi, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            keep = tl.load(Keep + row * CC + c, mask=c < c_hi, other=0) != 0
            lo = tl.load(CO + h * scoh + c, mask=keep, other=0)
            nch = tl.where(keep, tl.load(CO + h * scoh + c + 1, mask=keep, other=0) - lo, 0)
            slot = base + tl.cumsum(nch, axis=0) - nch
            for k0 in range(0, tl.max(nch, axis=0), KB):
                k = k0 + kb
                tl.store(List + row * CAP + slot[:, None] + k[None, :], lo[:, None] + k[None, :],
                         mask=k[None, :] < nch[:, None])
            base += tl.sum(nch, axis=0)

    @triton.jit
    def _budget_kernel(Best, Off, List, Listed, CntS, SumS, TKey, CStar, budget, H, NB, C, soh,
                       SPLIT, chunk, UNIT, LIST: tl.constexpr, BLOCK: tl.constexpr):
        """Per row: smallest key T whose clusters (best >= T) fit the budget; the clusters tied at
        the next key down are then kept in ascending slot (= cluster) order while they still fit
        (the reference's stable descending sort). Writes T, the tie cut-off and per-split counts."""
        row = tl.program_id(0)
        h = (row // NB) % H
        if LIST:
            L = tl.load(Listed + row)
        else:
            L = C
        big = 2147483647
        kmin = tl.full([], big, tl.int32)
        kmax = tl.full([], -big, tl.int32)
        for c0 in range(0, L, BLOCK):
            j = c0 + tl.arange(0, BLOCK)
            x = tl.load(Best + row * C + j, mask=j < L, other=float("-inf"))
            fin = x > float("-inf")
            k = _fkey(x)
            kmin = tl.minimum(kmin, tl.min(tl.where(fin, k, big), axis=0))
            kmax = tl.maximum(kmax, tl.max(tl.where(fin, k, -big), axis=0))
        lo = kmin.to(tl.int64)
        hi = kmax.to(tl.int64) + 1
        while lo < hi:
            mid = lo + (hi - lo) // 2
            tot = tl.zeros([], tl.int64)
            for c0 in range(0, L, BLOCK):
                j = c0 + tl.arange(0, BLOCK)
                jm = j < L
                x = tl.load(Best + row * C + j, mask=jm, other=float("-inf"))
                c, start, n = _extent(Off, List, row, h, j, jm, soh, C, LIST)
                sel = (x > float("-inf")) & (_fkey(x).to(tl.int64) >= mid)
                tot += tl.sum(tl.where(sel, n, 0).to(tl.int64), axis=0)
            fits = tot <= budget
            hi = tl.where(fits, mid, hi)
            lo = tl.where(fits, lo, mid + 1)
        t = lo
        base = tl.zeros([], tl.int64)
        for c0 in range(0, L, BLOCK):
            j = c0 + tl.arange(0, BLOCK)
            jm = j < L
            x = tl.load(Best + row * C + j, mask=jm, other=float("-inf"))
            c, start, n = _extent(Off, List, row, h, j, jm, soh, C, LIST)
            sel = (x > float("-inf")) & (_fkey(x).to(tl.int64) >= t)
            base += tl.sum(tl.where(sel, n, 0).to(tl.int64), axis=0)
        cstar = tl.full([], -1, tl.int32)
        if t > kmin.to(tl.int64):
            run = base
            for c0 in range(0, L, BLOCK):
                j = c0 + tl.arange(0, BLOCK)
                jm = j < L
                x = tl.load(Best + row * C + j, mask=jm, other=float("-inf"))
                c, start, n = _extent(Off, List, row, h, j, jm, soh, C, LIST)
                tie = (x > float("-inf")) & (_fkey(x).to(tl.int64) == t - 1)
                nt = tl.where(tie, n, 0).to(tl.int64)
                inc = tl.cumsum(nt, axis=0) + run
                ok = tie & (inc <= budget)
                cstar = tl.maximum(cstar, tl.max(tl.where(ok, j, -1), axis=0))
                run += tl.sum(nt, axis=0)
        tl.store(TKey + row, t)
        tl.store(CStar + row, cstar)
        for sp in range(0, SPLIT):
            s_lo, s_hi = _span(Listed, row, sp, SPLIT, chunk, C, UNIT, LIST)
            cnt = tl.zeros([], tl.int32)
            ssum = tl.zeros([], tl.int32)
            for c0 in range(s_lo, s_hi, BLOCK):
                j = c0 + tl.arange(0, BLOCK)
                jm = j < s_hi
                x = tl.load(Best + row * C + j, mask=jm, other=float("-inf"))
                c, start, n = _extent(Off, List, row, h, j, jm, soh, C, LIST)
                k = _fkey(x).to(tl.int64)
                keep = jm & (x > float("-inf")) & ((k >= t) | ((k == t - 1) & (j <= cstar)))
                cnt += tl.sum(keep.to(tl.int32), axis=0)
                ssum += tl.sum(tl.where(keep, n, 0), axis=0)
            tl.store(CntS + row * SPLIT + sp, cnt)
            tl.store(SumS + row * SPLIT + sp, ssum)

    @triton.jit
    def _append_slots(Cum, Delta, Idx, row, C, keep, n, start, c, j, kbase,
                      STORE_IDX: tl.constexpr):
        """Appends a tile's kept clusters to the cluster list at slot j (keys so far: kbase):
        Cum = keys before the slot, Delta = cluster start - Cum, and (STORE_IDX) Idx = the
        cluster. Returns the next (j, kbase)."""
        ki = keep.to(tl.int32)
        nk = tl.where(keep, n, 0)
        slot = j + tl.cumsum(ki, axis=0) - ki
        cpos = kbase + tl.cumsum(nk, axis=0) - nk
        if STORE_IDX:
            tl.store(Idx + row * C + slot, c, mask=keep)
        tl.store(Cum + row * (C + 1) + slot, cpos, mask=keep)
        tl.store(Delta + row * C + slot, start - cpos, mask=keep)
        return j + tl.sum(ki, axis=0), kbase + tl.sum(nk, axis=0)

    @triton.jit
    def _compact_kernel(Best, Off, List, Listed, Thr, TKey, CStar, CntS, SumS, Idx, Count, Cum,
                        Delta, NKeys, H, NB, C, soh, SPLIT, chunk, UNIT,
                        BUDGET: tl.constexpr, LIST: tl.constexpr, BLOCK: tl.constexpr,
                        SPLIT_P: tl.constexpr):
        """Writes this split's share of the ascending kept list (Idx, Cum, Delta) and its static
        chunk of the padding."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        h = (row // NB) % H
        sp = tl.arange(0, SPLIT_P)
        spm = sp < SPLIT
        cnts = tl.load(CntS + row * SPLIT + sp, mask=spm, other=0)
        sums = tl.load(SumS + row * SPLIT + sp, mask=spm, other=0)
        base = tl.sum(tl.where(sp < split, cnts, 0), axis=0)
        cbase = tl.sum(tl.where(sp < split, sums, 0), axis=0)
        total = tl.sum(cnts, axis=0)
        tkeys = tl.sum(sums, axis=0)
        if BUDGET:
            t = tl.load(TKey + row)
            cstar = tl.load(CStar + row)
        else:
            thr = tl.load(Thr)
        c_lo, c_hi = _span(Listed, row, split, SPLIT, chunk, C, UNIT, LIST)
        for c0 in range(c_lo, c_hi, BLOCK):
            j = c0 + tl.arange(0, BLOCK)
            jm = j < c_hi
            x = tl.load(Best + row * C + j, mask=jm, other=float("-inf"))
            c, start, n = _extent(Off, List, row, h, j, jm, soh, C, LIST)
            if BUDGET:
                k = _fkey(x).to(tl.int64)
                keep = jm & (x > float("-inf")) & ((k >= t) | ((k == t - 1) & (j <= cstar)))
            else:
                keep = jm & (x > thr)
            base, cbase = _append_slots(Cum, Delta, Idx, row, C, keep, n, start, c, base, cbase,
                                        True)
        p_lo = split * chunk
        p_hi = tl.minimum(C, p_lo + chunk)
        for p0 in range(p_lo, p_hi, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            pm = (p < p_hi) & (p >= total)
            tl.store(Idx + row * C + p, tl.full([BLOCK], -1, tl.int32), mask=pm)
            tl.store(Cum + row * (C + 1) + p, tl.zeros([BLOCK], tl.int32) + tkeys, mask=pm)
            tl.store(Delta + row * C + p, tl.zeros([BLOCK], tl.int32), mask=pm)
        if split == 0:
            tl.store(Count + row, total)
            tl.store(NKeys + row, tkeys)
            tl.store(Cum + row * (C + 1) + C, tkeys)

    @triton.jit
    def _positions_from_slots(Pos, Cum, Delta, row, C, NPOS, j_lo, j_hi, v_lo, v_hi,
                              KB: tl.constexpr, LOG: tl.constexpr):
        """Pos[row, v] = v + Delta[row, j] for the kept keys v in [v_lo, v_hi), where slot j is the
        last one of [j_lo, j_hi) with Cum[row, j] <= v (kept clusters are never empty, so it is
        the slot holding v): a vector binary search of LOG steps (2**LOG >= j_hi - j_lo), so the
        work follows the number of keys, whatever the cluster sizes."""
        kb = tl.arange(0, KB)
        for v0 in range(v_lo, v_hi, KB):
            v = v0 + kb
            ok = v < v_hi
            lo = tl.zeros([KB], tl.int32) + j_lo  # Cum[lo] <= v
            hi = tl.zeros([KB], tl.int32) + j_hi  # the slot is below hi
            for _ in tl.static_range(LOG):
                go = ok & (hi - lo > 1)
                mid = (lo + hi) // 2
                right = go & (tl.load(Cum + row * (C + 1) + mid, mask=go, other=0) <= v)
                lo = tl.where(right, mid, lo)
                hi = tl.where(go & ~right, mid, hi)
            d = tl.load(Delta + row * C + lo, mask=ok, other=0)
            tl.store(Pos + row * NPOS + v, v + d, mask=ok)

    @triton.jit
    def _expand_kernel(Cum, Delta, NKeys, Pos, C, NPOS, PER, KB: tl.constexpr, LOG: tl.constexpr):
        """Pos[row, v] for the kept keys v of [p * PER, (p + 1) * PER), from a full cluster list
        (the lookups that do not write the positions themselves)."""
        row = tl.program_id(0)
        v_lo = tl.program_id(1) * PER
        v_hi = tl.minimum(tl.load(NKeys + row), v_lo + PER)
        if v_lo < v_hi:
            _positions_from_slots(Pos, Cum, Delta, row, C, NPOS, 0, C, v_lo, v_hi, KB, LOG)

    @triton.jit
    def _positions_by_slot(Pos, Cum, Delta, row, C, NPOS, j_lo, j_hi, v_hi,
                           SB: tl.constexpr, KB: tl.constexpr):
        """Pos[row, v] for the keys of slots [j_lo, j_hi) (the last one ends at v_hi): SB slots at
        a time, KB keys of each per step. The stores are independent, so a cluster of thousands
        of keys costs a few steps of stores, not a chain of loads."""
        sb = tl.arange(0, SB)
        kb = tl.arange(0, KB)
        for j0 in range(j_lo, j_hi, SB):
            j = j0 + sb
            ok = j < j_hi
            c0 = tl.load(Cum + row * (C + 1) + j, mask=ok, other=0)
            c1 = tl.where(j + 1 < j_hi, tl.load(Cum + row * (C + 1) + j + 1,
                                                 mask=j + 1 < j_hi, other=0), v_hi)
            n = tl.where(ok, c1 - c0, 0)
            start = c0 + tl.load(Delta + row * C + j, mask=ok, other=0)
            for k0 in range(0, tl.max(n, axis=0), KB):
                k = k0 + kb
                tl.store(Pos + row * NPOS + c0[:, None] + k[None, :], start[:, None] + k[None, :],
                         mask=k[None, :] < n[:, None])

    @triton.jit
    def _select_tile(Off, List, Scores, row, h, j, jvalid, r, rvalid, lse, thr, soh, C,
                     QT: tl.constexpr, LIST: tl.constexpr):
        """Threshold decision for a tile of slots from the stored scores: (keep, sizes, clusters)."""
        c = _ids(List, row, j, jvalid, C, LIST)
        n, logn, ok = _log_sizes(Off, Off, Off, row, h, c, jvalid, soh, 0, 1, False, 0)
        s = tl.load(Scores + (row * QT + r[:, None]) * C + j[None, :],
                    mask=rvalid[:, None] & ok[None, :], other=0.0)
        best = tl.max(tl.where(rvalid[:, None] & ok[None, :], s - lse[:, None], float("-inf")),
                      axis=0)
        return jvalid & (best > thr), n, c

    @triton.jit
    def _select_kernel(Off, List, Listed, PartL, PartL2, Scores, Keep, Thr, Sync, Cum, Delta,
                       Pos, NKeys,
                       soh, H, NB, G, BQ, M, block_q, C, SPLIT, chunk,
                       SPLIT_L2, NPOS,
                       QT: tl.constexpr, BC: tl.constexpr, LIST: tl.constexpr,
                       HAS_L2: tl.constexpr, SP1: tl.constexpr, SP2: tl.constexpr,
                       ONE_TILE: tl.constexpr, SB: tl.constexpr, KB: tl.constexpr):
        """Decode, threshold mode: _best_kernel, _compact_kernel and the attention's position
        list in one launch. Each program scores its chunk of slots from the stored scores,
        publishes (kept clusters, kept keys) into Sync[row, split] (zeroed by _lse_kernel) and
        waits for the splits before it (decoupled look-back: they have lower block ids, so they
        are already resident or done). Then it writes its slots of Cum/Delta and Pos[row, v],
        the sorted position of the row's v-th kept key, for its kept keys; the last split writes
        NKeys[row]."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        h = (row // NB) % H
        nb = row % NB
        r = tl.arange(0, QT)
        rvalid = (r // BQ < G) & (r % BQ < tl.minimum(BQ, M - nb * block_q))
        lse = _merged_lse(PartL, SPLIT, PartL2, SPLIT_L2, row, r, QT, QT, HAS_L2, SP1, SP2)
        thr = tl.load(Thr)
        c_lo, c_hi = _span(Listed, row, split, SPLIT, chunk, C, BC, LIST)
        if ONE_TILE:  # the whole chunk in one tile, kept in registers for the writes below
            j = c_lo + tl.arange(0, BC)
            keep, n, c = _select_tile(Off, List, Scores, row, h, j, j < c_hi, r, rvalid, lse, thr,
                                      soh, C, QT, LIST)
            cnt = tl.sum(keep.to(tl.int64), axis=0)
            ssum = tl.sum(tl.where(keep, n, 0).to(tl.int64), axis=0)
        else:
            cnt = tl.zeros([], tl.int64)
            ssum = tl.zeros([], tl.int64)
            for c0 in range(c_lo, c_hi, BC):
                j = c0 + tl.arange(0, BC)
                keep, n, c = _select_tile(Off, List, Scores, row, h, j, j < c_hi, r, rvalid, lse,
                                          thr, soh, C, QT, LIST)
                tl.store(Keep + row * C + j, keep.to(tl.int8), mask=j < c_hi)
                cnt += tl.sum(keep.to(tl.int64), axis=0)
                ssum += tl.sum(tl.where(keep, n, 0).to(tl.int64), axis=0)
        # publish (flag bit 62 | clusters << 32 | keys) in one atomic word, then sum the
        # predecessors' words once every one of them is set (polled with volatile loads: atomics
        # from hundreds of programs on the same lines would serialise in L2)
        ready = tl.full([], 1 << 62, tl.int64)
        tl.atomic_xchg(Sync + row * SPLIT + split, ready | (cnt << 32) | ssum)
        sp = tl.arange(0, SP1)
        pred = sp < split
        word = tl.load(Sync + row * SPLIT + sp, mask=pred, other=1 << 62, volatile=True)
        while tl.min(word >> 62, axis=0) == 0:
            word = tl.load(Sync + row * SPLIT + sp, mask=pred, other=1 << 62, volatile=True)
        jbase = tl.sum(tl.where(pred, (word >> 32) & 0x3FFFFFFF, 0), axis=0).to(tl.int32)
        kbase = tl.sum(tl.where(pred, word & 0xFFFFFFFF, 0), axis=0).to(tl.int32)
        # this split's slots of the cluster list (Cum, Delta; not padded), then its keys
        js = jbase
        cbase = kbase
        if ONE_TILE:  # the chunk is the tile scored above: still in registers
            start = tl.load(Off + h * soh + c, mask=keep, other=0)
            js, cbase = _append_slots(Cum, Delta, Cum, row, C, keep, n, start, c, js, cbase,
                                      False)
        else:
            tl.debug_barrier()  # the flags are re-read by other threads than those that stored them
            for c0 in range(c_lo, c_hi, BC):
                j = c0 + tl.arange(0, BC)
                keep = tl.load(Keep + row * C + j, mask=j < c_hi, other=0) != 0
                c, start, n = _extent(Off, List, row, h, j, keep, soh, C, LIST)
                js, cbase = _append_slots(Cum, Delta, Cum, row, C, keep, n, start, c, js, cbase,
                                          False)
        tl.debug_barrier()  # the slots are read back by other threads
        _positions_by_slot(Pos, Cum, Delta, row, C, NPOS, jbase, js, cbase, SB, KB)
        if split == SPLIT - 1:
            tl.store(NKeys + row, cbase.to(tl.int32))
