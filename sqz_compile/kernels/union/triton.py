"""Triton kernels of the union-read decode attention (launched from union/launch.py; the union
list's rule is union/reference.py, the attention's semantics attention/reference.py).

Decode of B rows over ONE context: the per-row kernel (attention/triton.py) reads each row's kept
clusters separately, so a cluster kept by k rows is read k times. Here, per (group of R rows, KV
head):
  _group_lse_kernel,  flat threshold lookup (lookup/reference.py's rule) for all the group's rows
  _group_words_kernel at once: one centroid tile scored against a query tile of the R rows x the
                      GQA group, so the centroids are read once per group, not once per row.
                      Partial logsumexp per query and split, then per cluster tile each row's
                      best log share (max over its heads) against the threshold, written straight
                      as the cluster's word of row bits (no compact lists, no atomics)
  _mark_kernel        (other lookups: budget, hierarchical) OR-marks bit b % R of every
                      cluster row b keeps (the lookup's compact list) into a zeroed word per
                      (group, head, cluster)
  _union_list_kernel  (without POS_LIST) compacts the marked clusters into the union's cluster
                      list (cum, delta, the rows' word per slot), as the lookup's
                      `_compact_kernel` does for one row
  _union_pos_kernel   (POS_LIST, instead of the list) the sorted position and the rows' word of
                      every union key, from the words directly, so the attention loop loads two
                      index vectors per tile instead of searching slots (the per-row kernel's
                      position list, benchmarks/NOTES.md v6/v7)
  _union_attn_kernel  one query tile of all R rows x the group's heads (row r = br * GP + g;
                      R x GP >= 16 for tl.dot, <= 128)
                      walks its split of the union's key tiles: each K/V tile is loaded ONCE,
                      scored for every row, and a row's scores are -inf on the keys of clusters
                      its bit does not mark, so each row attends exactly its own selection. The
                      observation window (kept by every row) goes to the last splits. Each split
                      writes a normalised partial output and its log-sum-exp (base 2) in the
                      layout of the per-row kernel's partials, at split SPLIT0 + split, so the
                      per-row kernel adds the rows' own new keys as further splits and its
                      `_merge_kernel` combines them all.
"""
from __future__ import annotations

from ..triton_common import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ..attention.triton import _dot, _next_slot, _online_update, _start_slot, _tile_slots, _window
    from ..lookup.triton import _dot_mu

    @triton.jit
    def _group_queries(Q, pid, sqb, sqh, B, H, G, DQ,
                       BR: tl.constexpr, GP: tl.constexpr, BLOCK_D: tl.constexpr):
        """The query tile of (group, head) pid: row r = br * GP + g is head h * G + g of batch row
        (pid // H) * BR + br (decode: query 0). Returns (q, br, valid rows, head)."""
        h = pid % H
        r = tl.arange(0, BR * GP)
        br = r // GP
        g = r % GP
        b = (pid // H) * BR + br
        valid = (g < G) & (b < B)
        d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + b[:, None] * sqb + (h * G + g)[:, None] * sqh + d[None, :],
                    mask=valid[:, None] & (d[None, :] < DQ), other=0.0)
        return q, br, valid, h

    @triton.jit
    def _cluster_tile(Off, Cent, h, c, cvalid, soh, sch, scc, DQ, BLOCK_D: tl.constexpr):
        """(log n_c with -inf for empty / out-of-range clusters, non-empty flags, centroid tile
        [BLOCK_D, BC] transposed for the dot)."""
        n = (tl.load(Off + h * soh + c + 1, mask=cvalid, other=0)
             - tl.load(Off + h * soh + c, mask=cvalid, other=0))
        ok = cvalid & (n > 0)
        logn = tl.where(ok, tl.log(tl.maximum(n, 1).to(tl.float32)), float("-inf"))
        d = tl.arange(0, BLOCK_D)
        mu = tl.load(Cent + h * sch + c[None, :] * scc + d[:, None],
                     mask=cvalid[None, :] & (d[:, None] < DQ), other=0.0)
        return logn, ok, mu

    @triton.jit
    def _group_lse_kernel(Q, Cent, Off, PartL, sqb, sqh, sch, scc, soh, B, H, G, C, DQ, SPLIT, chunk,
                          scale, BR: tl.constexpr, GP: tl.constexpr, BC: tl.constexpr,
                          BLOCK_D: tl.constexpr, DOT: tl.constexpr):
        """PartL[pid, split, r] = logsumexp over this split's clusters of s q_r.mu_c + log n_c."""
        pid = tl.program_id(0)  # group * H + h
        split = tl.program_id(1)
        q, br, valid, h = _group_queries(Q, pid, sqb, sqh, B, H, G, DQ, BR, GP, BLOCK_D)
        mx = tl.full([BR * GP], float("-inf"), tl.float32)
        sm = tl.zeros([BR * GP], tl.float32)
        lo = split * chunk
        hi = tl.minimum(C, lo + chunk)
        for c0 in range(lo, hi, BC):
            c = c0 + tl.arange(0, BC)
            logn, ok, mu = _cluster_tile(Off, Cent, h, c, c < hi, soh, sch, scc, DQ, BLOCK_D)
            t = _dot_mu(q, mu, scale, DOT) + logn[None, :]
            new = tl.maximum(mx, tl.max(t, axis=1))
            safe = tl.where(new == float("-inf"), 0.0, new)
            sm = sm * tl.exp(mx - safe) + tl.sum(tl.exp(t - safe[:, None]), axis=1)
            mx = new
        lse = tl.where(sm > 0, mx + tl.log(tl.where(sm > 0, sm, 1.0)), float("-inf"))
        tl.store(PartL + (pid * SPLIT + split) * (BR * GP) + tl.arange(0, BR * GP), lse)

    @triton.jit
    def _group_words_kernel(Q, Cent, Off, PartL, Thr, Words, Zero, sqb, sqh, sch, scc, soh,
                            B, H, G, C, DQ, SPLIT, chunk, scale,
                            BR: tl.constexpr, GP: tl.constexpr, BC: tl.constexpr,
                            BLOCK_D: tl.constexpr, DOT: tl.constexpr, SP: tl.constexpr):
        """Words[pid, c] = sum over the group's rows br of (best_c(br) > thr) << br for this split's
        clusters, best_c(br) = max over br's heads of s q.mu_c - lse_q (-inf for empty clusters).
        Split 0 also zeroes Zero[b * H + h] for the group's rows (the own-keys launch's counts)."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        q, br, valid, h = _group_queries(Q, pid, sqb, sqh, B, H, G, DQ, BR, GP, BLOCK_D)
        BM: tl.constexpr = BR * GP
        sp = tl.arange(0, SP)
        part = tl.load(PartL + (pid * SPLIT + sp[:, None]) * BM + tl.arange(0, BM)[None, :],
                       mask=sp[:, None] < SPLIT, other=float("-inf"))
        mx = tl.max(part, axis=0)
        safe = tl.where(mx == float("-inf"), 0.0, mx)
        tot = tl.sum(tl.exp(part - safe[None, :]), axis=0)
        lse = tl.where(tot > 0, mx + tl.log(tl.where(tot > 0, tot, 1.0)), float("-inf"))
        thr = tl.load(Thr)
        rb = tl.arange(0, BR)
        rrow = (pid // H) * BR + rb < B
        lo = split * chunk
        hi = tl.minimum(C, lo + chunk)
        for c0 in range(lo, hi, BC):
            c = c0 + tl.arange(0, BC)
            cvalid = c < hi
            logn, ok, mu = _cluster_tile(Off, Cent, h, c, cvalid, soh, sch, scc, DQ, BLOCK_D)
            ls = tl.where(valid[:, None] & ok[None, :], _dot_mu(q, mu, scale, DOT) - lse[:, None],
                          float("-inf"))
            best = tl.max(tl.reshape(ls, (BR, GP, BC)), axis=1)  # [BR, BC]
            keep = (best > thr) & rrow[:, None]
            word = tl.sum(keep.to(tl.int32) << rb[:, None], axis=0)  # distinct bits: sum = OR
            tl.store(Words + pid * C + c, word, mask=cvalid)
        if split == 0:
            tl.store(Zero + ((pid // H) * BR + rb) * H + h, tl.zeros([BR], tl.int32), mask=rrow)

    @triton.jit
    def _mark_kernel(Idx, Count, Words, H, C, R, BLOCK: tl.constexpr):
        """Words[(b // R) * H + h, c] |= 1 << (b % R) for the clusters c that row (b, h) keeps
        (Idx [B*H, C] ascending, valid up to Count [B*H])."""
        row = tl.program_id(0)  # b * H + h
        b = row // H
        h = row % H
        bit = tl.full([BLOCK], 1, tl.int32) << (b % R)
        wrow = Words + ((b // R) * H + h) * C
        n = tl.load(Count + row)
        for j0 in range(0, n, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            ok = j < n
            c = tl.load(Idx + row * C + j, mask=ok, other=0)
            tl.atomic_or(wrow + c, bit, mask=ok)

    @triton.jit
    def _union_list_kernel(Words, Off, Cum, Delta, Word, NKeys, H, C, soh, BLOCK: tl.constexpr):
        """The union's cluster list of one (group, head): ascending marked non-empty clusters with
        Cum / Delta / Word per slot, padded past the count (Cum = total, Delta = Word = 0)."""
        pid = tl.program_id(0)  # group * H + h
        h = pid % H
        js = tl.zeros([], tl.int32)
        kbase = tl.zeros([], tl.int32)
        for c0 in range(0, C, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            cm = c < C
            wd = tl.load(Words + pid * C + c, mask=cm, other=0)
            start = tl.load(Off + h * soh + c, mask=cm, other=0)
            n = tl.load(Off + h * soh + c + 1, mask=cm, other=0) - start
            keep = cm & (wd != 0) & (n > 0)  # an empty slot would break the tile's slot count
            ki = keep.to(tl.int32)
            nk = tl.where(keep, n, 0)
            slot = js + tl.cumsum(ki, axis=0) - ki
            cpos = kbase + tl.cumsum(nk, axis=0) - nk
            tl.store(Cum + pid * (C + 1) + slot, cpos, mask=keep)
            tl.store(Delta + pid * C + slot, start - cpos, mask=keep)
            tl.store(Word + pid * C + slot, wd, mask=keep)
            js += tl.sum(ki, axis=0)
            kbase += tl.sum(nk, axis=0)
        for p0 in range(0, C, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            pm = (p < C) & (p >= js)
            tl.store(Cum + pid * (C + 1) + p, tl.zeros([BLOCK], tl.int32) + kbase, mask=pm)
            tl.store(Delta + pid * C + p, tl.zeros([BLOCK], tl.int32), mask=pm)
            tl.store(Word + pid * C + p, tl.zeros([BLOCK], tl.int32), mask=pm)
        tl.store(Cum + pid * (C + 1) + C, kbase)
        tl.store(NKeys + pid, kbase)

    @triton.jit
    def _union_pos_kernel(Words, Off, Pos, KWord, NKeys, H, C, NPOS, soh, CH,
                          BLOCK: tl.constexpr, SB: tl.constexpr, KB: tl.constexpr):
        """POS_LIST: Pos[row, v] (sorted position) and KWord[row, v] (the rows' word) of the union
        keys of one (group, head) whose clusters lie in this program's chunk [p * CH, (p+1) * CH).
        Its first key v is the union keys of the chunks before it (re-summed here from the words
        and sizes: independent vector loads, no hand-over between programs); then SB clusters at
        a time, KB keys each per step, with independent stores. The last chunk writes NKeys."""
        row = tl.program_id(0)  # group * H + h
        part = tl.program_id(1)
        h = row % H
        c_lo = part * CH
        c_hi = tl.minimum(C, c_lo + CH)
        kbase = tl.zeros([], tl.int32)
        for c0 in range(0, c_lo, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            cm = c < c_lo
            wd = tl.load(Words + row * C + c, mask=cm, other=0)
            n = (tl.load(Off + h * soh + c + 1, mask=cm, other=0)
                 - tl.load(Off + h * soh + c, mask=cm, other=0))
            kbase += tl.sum(tl.where(cm & (wd != 0), n, 0), axis=0)
        sb = tl.arange(0, SB)
        kb = tl.arange(0, KB)
        for c0 in range(c_lo, c_hi, SB):
            c = c0 + sb
            cm = c < c_hi
            wd = tl.load(Words + row * C + c, mask=cm, other=0)
            start = tl.load(Off + h * soh + c, mask=cm, other=0)
            n = tl.where(cm & (wd != 0), tl.load(Off + h * soh + c + 1, mask=cm, other=0) - start, 0)
            vb = kbase + tl.cumsum(n, axis=0) - n
            for k0 in range(0, tl.max(n, axis=0), KB):
                k = k0 + kb
                km = k[None, :] < n[:, None]
                v = vb[:, None] + k[None, :]
                tl.store(Pos + row * NPOS + v, start[:, None] + k[None, :], mask=km)
                tl.store(KWord + row * NPOS + v, wd[:, None] + tl.zeros([SB, KB], tl.int32), mask=km)
            kbase += tl.sum(n, axis=0)
        if part == tl.num_programs(1) - 1:
            tl.store(NKeys + row, kbase)

    @triton.jit
    def _union_attn_kernel(
        Q, Kc, Vc, Kw, Vw, Cum, Delta, Word, NKeys, Pos, KWord, PartO, PartL,
        sqb, sqh, skch, skcn, svch, svcn, swkh, swkn, swvh, swvn,
        B, H, G, W, C, NPOS, SPLIT, SPLIT0, qk_scale, D,
        BR: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr, SEARCH: tl.constexpr, POS_LIST: tl.constexpr,
    ):
        BLOCK_M: tl.constexpr = BR * GP
        pid = tl.program_id(0)  # group * H + h
        split = tl.program_id(1)
        h = pid % H
        grp = pid // H
        r = tl.arange(0, BLOCK_M)
        br = r // GP
        g = r % GP
        b = grp * BR + br
        rvalid = (g < G) & (b < B)
        hq = h * G + g
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(Q + b[:, None] * sqb + hq[:, None] * sqh + d[None, :],
                    mask=rvalid[:, None] & dmask[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kk = tl.arange(0, BLOCK_N)
        zero_add = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)

        # --- the union's context tiles, each key with the word of the rows that see it ------------
        total = tl.load(NKeys + pid)
        ntile = tl.cdiv(total, BLOCK_N)
        t0 = split * ntile // SPLIT
        t1 = (split + 1) * ntile // SPLIT
        cum_row = Cum + pid * (C + 1)
        if POS_LIST:  # positions and words per key: two index loads per tile, no search
            v_end = tl.minimum(total, t1 * BLOCK_N)
            for t in range(t0, t1):
                v = t * BLOCK_N + kk
                vvalid = v < v_end
                pos = tl.load(Pos + pid * NPOS + v, mask=vvalid, other=0)
                wd = tl.load(KWord + pid * NPOS + v, mask=vvalid, other=0)
                kT = tl.load(Kc + h * skch + pos[None, :] * skcn + d[:, None],
                             mask=vvalid[None, :] & dmask[:, None], other=0.0)
                vt = tl.load(Vc + h * svch + pos[:, None] * svcn + d[None, :],
                             mask=vvalid[:, None] & dmask[None, :], other=0.0)
                s = (_dot(q, kT, IEEE) * qk_scale).to(tl.float32)
                ok = ((wd[None, :] >> br[:, None]) & 1) != 0  # row br sees the key
                m_i, l_i, acc = _online_update(s, vt, ok, zero_add, m_i, l_i, acc, False, IEEE)
        elif t0 < t1:
            # the per-row kernel's cluster-list walk: slot search for the first tile, then the
            # next tile's slots fetched while this tile loads
            v0 = t0 * BLOCK_N
            j = _start_slot(cum_row, v0, C, SEARCH)
            v_end = tl.minimum(total, t1 * BLOCK_N)
            bnd, slot, vvalid, pos = _tile_slots(cum_row, Delta + pid * C, j, v0 + kk, v_end, C)
            wd = tl.load(Word + pid * C + slot, mask=vvalid, other=0)
            for t in range(t0, t1):
                kT = tl.load(Kc + h * skch + pos[None, :] * skcn + d[:, None],
                             mask=vvalid[None, :] & dmask[:, None], other=0.0)
                vt = tl.load(Vc + h * svch + pos[:, None] * svcn + d[None, :],
                             mask=vvalid[:, None] & dmask[None, :], other=0.0)
                s = (_dot(q, kT, IEEE) * qk_scale).to(tl.float32)
                # row br sees the key when its bit is set (words are 0 past the tile's end)
                ok = ((wd[None, :] >> br[:, None]) & 1) != 0
                j = _next_slot(j, bnd, (t + 1) * BLOCK_N)
                bnd, slot, vvalid_n, pos_n = _tile_slots(cum_row, Delta + pid * C, j, (t + 1) * BLOCK_N + kk,
                                                         v_end, C)
                wd_n = tl.load(Word + pid * C + slot, mask=vvalid_n, other=0)
                m_i, l_i, acc = _online_update(s, vt, ok, zero_add, m_i, l_i, acc, False, IEEE)
                pos = pos_n
                vvalid = vvalid_n
                wd = wd_n

        # --- observation window (every row attends it): the splits counted from the last -------
        rsplit = SPLIT - 1 - split
        m_i, l_i, acc = _window(q, Kw, Vw, h, swkh, swkn, swvh, swvn, W, rsplit, SPLIT, d, dmask, kk,
                                zero_add, qk_scale, m_i, l_i, acc, BLOCK_N, IEEE)

        # --- partial of split SPLIT0 + split, in the per-row kernel's layout [S, B, Hq, M=1] -----
        has = l_i > 0
        o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        prow = ((SPLIT0 + split) * B + b) * (G * H) + hq
        tl.store(PartL + prow, lse, mask=rvalid)
        tl.store(PartO + prow[:, None] * D + d[None, :], o, mask=rvalid[:, None] & dmask[None, :])
