"""Triton sparse flash attention over the selected context clusters + window + new tokens.

One kernel serves prefill and decode (the reference is `attention/reference.py`, the launcher `attention/launch.py`):

- GQA packing: a program's query tile holds the queries of every head of one KV head's group
  (row r = g * BQ + i: head g of the group, query i of the tile), so each K/V tile is loaded once
  for the whole group. Decode (one query) packs the group into a 16-row tile.
- Context keys are read in the cluster-sorted layout. The lookup gives, per (batch row, KV head,
  query block), the ascending list of kept clusters with `cum` (keys before slot j) and
  `delta` (cluster start - cum). The kept clusters are concatenated into a virtual key axis
  v = 0..nkeys-1 that is cut into BLOCK_N tiles; key v of slot j sits at sorted position
  v + delta[j]. Runs of keys of one cluster are contiguous rows, so a tile reads contiguous
  ranges (no per-key index list) and short clusters do not leave tiles half empty.
  With POS_LIST (decode, and prefill while the buffer is small) the lookup has written the
  sorted position of every kept key (lookup/launch.py), so the attention loop does one index load per
  tile instead of the slot search, and its K/V loads pipeline.
- Split-K: each program takes a share of the context tiles, the window tiles and the new-token
  tiles; with SPLIT > 1 it writes a normalised partial output and its log-sum-exp (base 2), and
  `_merge_kernel` combines the splits (decode: many splits per row to fill the GPU).
- Low-bit context (QBITS > 0): Kc/Vc hold packed int32 codes in the same sorted layout; each
  tile's rows are read packed and dequantized in registers (kernels/quant/triton.py: codebook
  level * scale + offset, outliers folded in, RoPE applied to the key at its context position),
  so only the selected clusters' packed bytes are read and no dense copy is made. HALVES (2/3/4
  bits, head dim 64/128): keys come as their two rotate_half halves and are scored as
  q[:, :D/2] @ k1^T + q[:, D/2:] @ k2^T; RoPE's attention scaling multiplies the context's
  score scale instead of every key entry. PAIRS (2/4 bits of a bf16/fp16 model, launch flag):
  each program first writes a table of level pairs, and the tiles dequantize two channels per
  load and HFMA2 in fp16 (quant/triton.py).
- The new tokens follow the model's mask with SDPA semantics: none, upper-left causal, bool
  (True attends) or additive float, loaded with broadcast strides (0 for broadcast dims).
"""
from __future__ import annotations

from ..triton_common import HAS_TRITON

if HAS_TRITON:
    from ..quant.triton import dequant_key, key_halves, key_pairs, pair_table, value_pairs, value_rows

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _online_update(s, v, bias_ok, s_add, m_i, l_i, acc,
                       HAS_ADD: tl.constexpr, IEEE: tl.constexpr):
        """One flash step over a key tile of scaled scores s (base-2 exponentials; bias_ok False =
        masked out)."""
        if HAS_ADD:
            s = s + s_add
        s = tl.where(bias_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _ctx_tile(qa, qb, Kc, Vc, skch, skcn, svch, svcn, h, pos, vvalid, d, dmask, scale,
                  Perm, CB, VNorm, OIdx, OVal, NPOS, P, G, D, KNorm, Rope, length,
                  Tab, QBITS: tl.constexpr, NOUT: tl.constexpr, DT: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HALVES: tl.constexpr,
                  FAST: tl.constexpr, IEEE: tl.constexpr, PAIRS: tl.constexpr):
        """Scaled scores [BLOCK_M, BLOCK_N] and V [BLOCK_N, BLOCK_D] of the context keys at
        sorted positions `pos`: stored, or packed low-bit dequantized in registers to dtype DT.
        HALVES: the keys as their two rotate_half halves, scored against the query's halves
        (qa, qb); otherwise qa is the query. PAIRS: 2/4-bit HALVES on fp16 pair words through the
        program's level table Tab, scored against fp16 query halves; V comes back fp16. `scale`
        includes RoPE's attention scaling."""
        if QBITS == 0:
            kT = tl.load(Kc + h * skch + pos[None, :] * skcn + d[:, None],
                         mask=vvalid[None, :] & dmask[:, None], other=0.0)
            vt = tl.load(Vc + h * svch + pos[:, None] * svcn + d[None, :],
                         mask=vvalid[:, None] & dmask[None, :], other=0.0)
            s = _dot(qa, kT, IEEE)
        elif PAIRS:
            y1, y2 = key_pairs(Kc, KNorm, OIdx, OVal, Perm, Rope, Tab, h, pos, vvalid, NPOS, length,
                               BLOCK_N, BLOCK_D // 2, QBITS, NOUT, FAST)
            s = _dot(qa, tl.trans(y1), IEEE) + _dot(qb, tl.trans(y2), IEEE)
            vt = value_pairs(Vc, VNorm, OIdx, OVal, Tab, h, pos, vvalid, NPOS, BLOCK_N, BLOCK_D, QBITS, NOUT, FAST)
        else:
            if HALVES:
                y1, y2 = key_halves(Kc, CB, KNorm, OIdx, OVal, Perm, Rope, h, pos, vvalid, NPOS, length,
                                    BLOCK_N, BLOCK_D // 2, QBITS, NOUT, FAST)
                s = _dot(qa, tl.trans(y1.to(DT)), IEEE) + _dot(qb, tl.trans(y2.to(DT)), IEEE)
            else:
                k = dequant_key(Kc, CB, KNorm, OIdx, OVal, Perm, Rope, h, pos[:, None],
                                vvalid[:, None], d[None, :], dmask[None, :], NPOS, P, D, QBITS, NOUT,
                                FAST)
                s = _dot(qa, tl.trans(k.to(DT)), IEEE)
            vt = value_rows(Vc, CB + G, VNorm, OIdx, OVal, h, pos, vvalid, NPOS, P, D,
                            BLOCK_N, BLOCK_D, QBITS, NOUT, FAST, HALVES).to(DT)
        return (s * scale).to(tl.float32), vt  # Inductor may pass the scale as float64

    @triton.jit
    def _start_slot(cum_row, v0, C, SEARCH: tl.constexpr):
        """Slot holding virtual key v0: #{i >= 1 : cum[i] <= v0} (cum is non-decreasing), counted
        on a strided sample, then inside the one stride that holds the boundary: two vector loads."""
        stride = tl.cdiv(C + 1, SEARCH)
        sj = tl.arange(0, SEARCH)
        samp = tl.load(cum_row + sj * stride, mask=sj * stride <= C, other=2147483647)
        base = (tl.sum((samp <= v0).to(tl.int32), axis=0) - 1) * stride
        fi = base + 1 + sj
        fine = tl.load(cum_row + fi, mask=(sj < stride - 1) & (fi <= C), other=2147483647)
        return base + tl.sum((fine <= v0).to(tl.int32), axis=0)

    @triton.jit
    def _tile_slots(cum_row, delta_row, j, v, v_end, C):
        """Cluster-list walk: for a tile's key indices v (into the row's list of kept keys) whose
        first key lies in slot j, each key's slot, validity (v < v_end) and context position, and
        the slot bounds `bnd` that `_next_slot` advances j with."""
        jb = j + 1 + tl.arange(0, v.shape[0])
        bnd = tl.load(cum_row + jb, mask=jb <= C, other=2147483647)
        slot = j + tl.sum((bnd[None, :] <= v[:, None]).to(tl.int32), axis=1)
        vvalid = v < v_end
        pos = v + tl.load(delta_row + slot, mask=vvalid, other=0)
        return bnd, slot, vvalid, pos

    @triton.jit
    def _next_slot(j, bnd, v_next):
        """The slot of key index v_next (the next tile's first key), from this tile's bounds."""
        return j + tl.sum((bnd <= v_next).to(tl.int32), axis=0)

    @triton.jit
    def _window(q, Kw, Vw, h, swkh, swkn, swvh, swvn, W, rsplit, SPLIT, d, dmask, kk, zero_add,
                qk_scale, m_i, l_i, acc, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        """The observation window's W keys, which every query attends: this split's share of its
        tiles, the splits counted from the last (rsplit = SPLIT - 1 - split)."""
        nwt = tl.cdiv(W, BLOCK_N)
        per = tl.cdiv(nwt, SPLIT)
        for t in range(rsplit * per, tl.minimum(nwt, rsplit * per + per)):
            n = t * BLOCK_N + kk
            nvalid = n < W
            kT = tl.load(Kw + h * swkh + n[None, :] * swkn + d[:, None],
                         mask=nvalid[None, :] & dmask[:, None], other=0.0)
            vt = tl.load(Vw + h * swvh + n[:, None] * swvn + d[None, :],
                         mask=nvalid[:, None] & dmask[None, :], other=0.0)
            s = (_dot(q, kT, IEEE) * qk_scale).to(tl.float32)
            m_i, l_i, acc = _online_update(s, vt, nvalid[None, :], zero_add, m_i, l_i, acc,
                                           False, IEEE)
        return m_i, l_i, acc

    @triton.jit
    def _sparse_attn_kernel(
        Q, Kn, Vn, Mask, Kc, Vc, Kw, Vw, Cum, Delta, NKeys, Pos, Out, PartO, PartL,
        Perm, Rope, CB, KNorm, VNorm, OIdx, OVal, Tab, P, NLEV,
        sqb, sqh, sqm, skb, skh, sks, svb, svh, svs,
        smb, smh, smm, sms,
        skch, skcn, svch, svcn, swkh, swkn, swvh, swvn,
        sob, soh, som,
        B, H, G, M, S, W, NB, C, NPOS, block_q, TPB, SPLIT, qk_scale, D,
        BQ: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, PARTIAL: tl.constexpr,
        IEEE: tl.constexpr, SEARCH: tl.constexpr, POS_LIST: tl.constexpr,
        QBITS: tl.constexpr = 0, NOUT: tl.constexpr = 0, HALVES: tl.constexpr = False,
        FAST: tl.constexpr = False, PAIRS: tl.constexpr = False,
    ):
        BLOCK_M: tl.constexpr = GP * BQ
        LOG2E: tl.constexpr = 1.4426950408889634
        pid = tl.program_id(0)
        split = tl.program_id(1)
        tile = pid % TPB
        row = pid // TPB  # (b * H + h) * NB + nb
        nb = row % NB
        h = (row // NB) % H
        b = row // (NB * H)

        r = tl.arange(0, BLOCK_M)
        g = r // BQ
        i = r % BQ
        m0 = nb * block_q + tile * BQ
        m = m0 + i
        blk_end = tl.minimum(nb * block_q + block_q, M)
        rvalid = (g < G) & (m < blk_end)
        hq = h * G + g
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        qrow = Q + b * sqb + hq[:, None] * sqh + m[:, None] * sqm
        HALF: tl.constexpr = BLOCK_D // 2
        if HALVES:  # the context keys come as rotate_half halves: score them against q's halves
            dh = tl.arange(0, HALF)
            qa = tl.load(qrow + dh[None, :], mask=rvalid[:, None], other=0.0)
            qb = tl.load(qrow + HALF + dh[None, :], mask=rvalid[:, None], other=0.0)
        else:
            qa = tl.load(qrow + d[None, :], mask=rvalid[:, None] & dmask[None, :], other=0.0)
            qb = qa
        if PAIRS:  # the context tiles come as fp16 pairs: the query halves meet them in fp16
            qa = qa.to(tl.float16)
            qb = qb.to(tl.float16)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kk = tl.arange(0, BLOCK_N)
        zero_add = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)

        # low-bit context: RoPE's attention scaling goes into the context's score scale
        ctx_scale = qk_scale
        length = 0
        if QBITS > 0:
            ctx_scale = qk_scale * tl.load(Rope + D)
            length = tl.load(Rope + D + 1).to(tl.int32)
        tab = Tab
        if PAIRS:  # this program's level table (2 x 256 x 4 // QBITS words)
            tab = Tab + (pid * SPLIT + split) * (2048 // QBITS)
            pair_table(tab, CB, NLEV, QBITS, FAST)

        # --- selected context clusters -------------------------------------------------------
        total = tl.load(NKeys + row)
        ntile = tl.cdiv(total, BLOCK_N)
        # every split gets floor or ceil of ntile / SPLIT context tiles; the window and new-token
        # tiles go to the splits counted from the last one, so no split takes both extra loads
        t0 = split * ntile // SPLIT
        t1 = (split + 1) * ntile // SPLIT
        rsplit = SPLIT - 1 - split
        cum_row = Cum + row * (C + 1)
        if POS_LIST:
            # positions written by the lookup: one index load per tile, no search,
            # so the loop pipelines the K/V loads of the next tiles
            v_end = tl.minimum(total, t1 * BLOCK_N)
            for t in range(t0, t1):
                v = t * BLOCK_N + kk
                vvalid = v < v_end
                pos = tl.load(Pos + row * NPOS + v, mask=vvalid, other=0)
                s, vt = _ctx_tile(qa, qb, Kc, Vc, skch, skcn, svch, svcn, h, pos, vvalid, d, dmask,
                                  ctx_scale, Perm, CB, VNorm, OIdx, OVal, NPOS, P, NLEV, D, KNorm, Rope,
                                  length, tab, QBITS, NOUT, Q.dtype.element_ty,
                                  BLOCK_N, BLOCK_D, HALVES, FAST, IEEE, PAIRS)
                m_i, l_i, acc = _online_update(s, vt, vvalid[None, :], zero_add, m_i, l_i, acc,
                                               False, IEEE)
        elif t0 < t1:
            v0 = t0 * BLOCK_N
            j = _start_slot(cum_row, v0, C, SEARCH)
            # indices of the first tile; inside the loop those of the next tile are fetched while
            # the current K/V tile loads (the index chain stays off the critical path)
            v_end = tl.minimum(total, t1 * BLOCK_N)
            bnd, slot, vvalid, pos = _tile_slots(cum_row, Delta + row * C, j, v0 + kk, v_end, C)
            for t in range(t0, t1):
                s, vt = _ctx_tile(qa, qb, Kc, Vc, skch, skcn, svch, svcn, h, pos, vvalid, d, dmask,
                                  ctx_scale, Perm, CB, VNorm, OIdx, OVal, NPOS, P, NLEV, D, KNorm, Rope,
                                  length, tab, QBITS, NOUT, Q.dtype.element_ty,
                                  BLOCK_N, BLOCK_D, HALVES, FAST, IEEE, PAIRS)
                j = _next_slot(j, bnd, (t + 1) * BLOCK_N)
                bnd, slot, vvalid_n, pos_n = _tile_slots(cum_row, Delta + row * C, j, (t + 1) * BLOCK_N + kk,
                                                         v_end, C)
                m_i, l_i, acc = _online_update(s, vt, vvalid[None, :], zero_add, m_i, l_i, acc,
                                               False, IEEE)
                pos = pos_n
                vvalid = vvalid_n

        # --- observation window ----------------------------------------------------------------
        q = qa
        if HALVES:
            q = tl.load(qrow + d[None, :], mask=rvalid[:, None] & dmask[None, :], other=0.0)
        m_i, l_i, acc = _window(q, Kw, Vw, h, swkh, swkn, swvh, swvn, W, rsplit, SPLIT, d, dmask, kk,
                                zero_add, qk_scale, m_i, l_i, acc, BLOCK_N, IEEE)

        # --- new tokens under the model's mask -------------------------------------------------
        s_hi = S
        if IS_CAUSAL:
            s_hi = tl.minimum(S, tl.minimum(blk_end, m0 + BQ))
        nnt = tl.cdiv(s_hi, BLOCK_N)
        per = tl.cdiv(nnt, SPLIT)
        for t in range(rsplit * per, tl.minimum(nnt, rsplit * per + per)):
            n = t * BLOCK_N + kk
            nvalid = n < s_hi
            kT = tl.load(Kn + b * skb + h * skh + n[None, :] * sks + d[:, None],
                         mask=nvalid[None, :] & dmask[:, None], other=0.0)
            vt = tl.load(Vn + b * svb + h * svh + n[:, None] * svs + d[None, :],
                         mask=nvalid[:, None] & dmask[None, :], other=0.0)
            ok = nvalid[None, :] & rvalid[:, None]
            add = zero_add
            if IS_CAUSAL:
                ok = ok & (n[None, :] <= m[:, None])
            mptr = Mask + b * smb + hq[:, None] * smh + m[:, None] * smm + n[None, :] * sms
            if MASK_KIND == 1:
                ok = ok & (tl.load(mptr, mask=ok, other=0) != 0)
            if MASK_KIND == 2:
                add = tl.load(mptr, mask=ok, other=0.0).to(tl.float32) * LOG2E
            s = (_dot(q, kT, IEEE) * qk_scale).to(tl.float32)
            m_i, l_i, acc = _online_update(s, vt, ok, add, m_i, l_i, acc, MASK_KIND == 2, IEEE)

        # --- epilogue ------------------------------------------------------------------------------
        if PARTIAL:
            has = l_i > 0
            o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            prow = (split * B + b) * (G * H) * M + hq * M + m  # PartL [SPLIT, B, Hq, M]
            tl.store(PartL + prow, lse, mask=rvalid)
            tl.store(PartO + prow[:, None] * D + d[None, :], o, mask=rvalid[:, None] & dmask[None, :])
        else:
            o = acc / tl.where(rvalid, l_i, 1.0)[:, None]  # a fully masked row stays NaN (as SDPA)
            tl.store(Out + b * sob + hq[:, None] * soh + m[:, None] * som + d[None, :],
                     o.to(Out.dtype.element_ty), mask=rvalid[:, None] & dmask[None, :])

    @triton.jit
    def _merge_kernel(PartO, PartL, Out, R, HQ, M, sob, soh, som, SPLIT, D,
                      SP: tl.constexpr, BLOCK_D: tl.constexpr):
        """Out[row] = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max): log-sum-exp merge of
        the splits of one (batch row, query head, query), all splits in one 2-D load."""
        row = tl.program_id(0)
        sp = tl.arange(0, SP)
        spm = sp < SPLIT
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        ls = tl.load(PartL + sp * R + row, mask=spm, other=float("-inf"))
        o = tl.load(PartO + (sp * R + row)[:, None] * D + d[None, :],
                    mask=spm[:, None] & dm[None, :], other=0.0)
        mx = tl.max(ls, axis=0)
        w = tl.exp2(ls - tl.where(mx == float("-inf"), 0.0, mx))
        out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
        b = row // (HQ * M)
        hq = (row // M) % HQ
        m = row % M
        tl.store(Out + b * sob + hq * soh + m * som + d, out.to(Out.dtype.element_ty), mask=dm)
