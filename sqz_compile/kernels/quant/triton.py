"""Triton dequantization of a low-bit context's K/V in registers (reference: quant/reference.py).

The attention kernel (attention/triton.py, QBITS > 0) dequantizes a tile of BLOCK_N keys at
sorted positions `pos` (rows = keys); `_dequant_kernel` runs the same helpers alone, for the tests.

- HALVES (2, 3 or 4 bits, D a power of two whose half is a whole number of words of every
  plane: head dims 64 and 128): `key_halves` loads the words of each rotate_half half of a row
  as their own tile and unpacks them by shifts, so channels j and j + D/2 land in the same thread
  and RoPE rotates them without moving data, with one angle per (key, pair); `value_rows` unpacks
  [BLOCK_N, D] the same way. 2/4 bits (`_word_levels`): each thread unpacks whole words. 3 bits
  (`_plane_levels`): the row holds two bit planes (squeeze/quantize.py), the codes' low two bits
  (16 per word) and their high bit (32 per word); a thread loads a pair of low words and the high
  word that covers the same 32 channels, and code = lo | hi << 2 in registers. Codebook levels
  (`_code_levels`): a select tree, or on CUDA at 3 and 4 bits an inline-PTX L1 gather that,
  unlike a tl.load, imposes no layout.
- Otherwise (padded head dims pair j with j + D/2, not j + BLOCK_D/2): `dequant_key` and
  `_levels`, a word gather per plane and a codebook gather per entry (values keep the tile
  unpack); their index arguments are 2-D broadcastable (`pos`/`pok` rows and validity,
  `chan`/`cok` channels and validity).

Keys come back rotated but not multiplied by the attention scaling (the attention kernel folds it
into the score scale; `_dequant_kernel` multiplies). Angles are the reference's float32 product
float32(p - L) * inv_freq; `_sincos` reduces them to [-pi, pi] before the sine and cosine.
Per-layer tensors are contiguous: packed codes [H, N, P] int32, codebooks [2, G] float32,
key_norm [H, 2, D] float32, value_norm [H, N, 2] float16, outliers [H, N, 2, E], perm [H, N]
int32, rope [D + 2] float32 (inv_freq per channel, attention scaling, context length).
"""
from __future__ import annotations

import math
import struct

from ..triton_common import HAS_TRITON


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


# 2 pi split in float32: hi = float32(2 pi) (24 significant bits, so k * hi is exact in an FMA and
# a - k * hi is exact for |a| < 2**24), lo = float32(2 pi - hi)
TWO_PI_HI = _f32(2 * math.pi)
TWO_PI_LO = _f32(2 * math.pi - TWO_PI_HI)

if HAS_TRITON:
    import triton
    import triton.language as tl

    _HI = tl.constexpr(TWO_PI_HI)
    _LO = tl.constexpr(TWO_PI_LO)
    _INV_2PI = tl.constexpr(1 / (2 * math.pi))

    @triton.jit
    def _sincos(a, FAST: tl.constexpr):
        """cos(a), sin(a) of float32 angles |a| < 2**24 (a context of 1M tokens reaches ~1e6 rad).
        r = a - k * 2pi, k = round(a / 2pi), by two FMAs against 2pi = hi + lo: the first is exact,
        the second rounds once, so |r| <= pi is a's float64 remainder to ~1.2e-7 rad. Then FAST
        (CUDA): the hardware approximations sin/cos.approx.f32 (MUFU, ~2**-20.5 absolute error on
        [-pi, pi]), where libdevice's sinf/cosf reduce the raw angle themselves (Payne-Hanek past
        ~1e5 rad); else tl.cos/tl.sin (the interpreter cannot run PTX)."""
        k = tl.floor(a * _INV_2PI + 0.5)
        r = tl.fma(-k, _HI, a)
        r = tl.fma(-k, _LO, r)
        if FAST:
            c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32,
                                          is_pure=True, pack=1)
            s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32,
                                          is_pure=True, pack=1)
        else:
            c = tl.cos(r)
            s = tl.sin(r)
        return c, s

    @triton.jit
    def _sincos_kernel(A, C, S, n, FAST: tl.constexpr, BLOCK: tl.constexpr):
        """cos/sin of float32 angles through `_sincos` (tests: its reduction against float64)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a = tl.load(A + i, mask=i < n, other=0.0)
        c, s = _sincos(a, FAST)
        tl.store(C + i, c, mask=i < n)
        tl.store(S + i, s, mask=i < n)

    @triton.jit
    def _levels(Pk, CB, h, pos, pok, chan, cok, N, P, D, QBITS: tl.constexpr):
        """codebook[code] of the packed rows: code `chan` of row (h, pos), one word gather per
        plane (3 bits: the low-bits word and the high-bit word after the ceil(D / 16) low ones)."""
        ok = pok & cok
        row = Pk + (h * N + pos) * P
        if QBITS == 3:
            lo = tl.load(row + chan // 16, mask=ok, other=0)
            hi = tl.load(row + (D + 15) // 16 + chan // 32, mask=ok, other=0)
            code = ((lo >> ((chan % 16) * 2)) & 3) | (((hi >> (chan % 32)) & 1) << 2)
        else:
            VPW: tl.constexpr = 32 // QBITS
            w = tl.load(row + chan // VPW, mask=ok, other=0)
            code = (w >> ((chan % VPW) * QBITS)) & ((1 << QBITS) - 1)
        return tl.load(CB + code, mask=ok, other=0.0)

    @triton.jit
    def _fold_outliers(x, OIdx, OVal, which, h, pos, pok, chan, N, NOUT: tl.constexpr):
        """Entries kept in float16 (row (h, pos), K (which=0) or V (1)) overwrite their channels."""
        for e in tl.static_range(NOUT):
            o = ((h * N + pos) * 2 + which) * NOUT + e
            oi = tl.load(OIdx + o, mask=pok, other=-1).to(tl.int32)
            ov = tl.load(OVal + o, mask=pok, other=0.0).to(tl.float32)
            x = tl.where(chan == oi, ov, x)
        return x

    @triton.jit
    def _prerope_key(Pk, CB, KNorm, OIdx, OVal, h, pos, pok, chan, cok, N, P, D,
                     QBITS: tl.constexpr, NOUT: tl.constexpr):
        lev = _levels(Pk, CB, h, pos, pok, chan, cok, N, P, D, QBITS)
        sc = tl.load(KNorm + h * 2 * D + chan, mask=cok, other=0.0)
        off = tl.load(KNorm + h * 2 * D + D + chan, mask=cok, other=0.0)
        return _fold_outliers(lev * sc + off, OIdx, OVal, 0, h, pos, pok, chan, N, NOUT)

    @triton.jit
    def dequant_key(Pk, CB, KNorm, OIdx, OVal, Perm, Rope, h, pos, pok, chan, cok, N, P, D,
                    QBITS: tl.constexpr, NOUT: tl.constexpr, FAST: tl.constexpr):
        """float32 post-RoPE key entries (without the attention scaling): dequantized pre-RoPE
        channel and its rotate_half partner, rotated by angle float32(p - L) * inv_freq (p: the
        key's context position); 0 outside the valid rows and channels."""
        half = D // 2
        partner = tl.where(chan < half, chan + half, chan - half)
        x = _prerope_key(Pk, CB, KNorm, OIdx, OVal, h, pos, pok, chan, cok, N, P, D, QBITS, NOUT)
        xp = _prerope_key(Pk, CB, KNorm, OIdx, OVal, h, pos, pok, partner, cok, N, P, D, QBITS, NOUT)
        length = tl.load(Rope + D + 1).to(tl.int32)
        rel = (tl.load(Perm + h * N + pos, mask=pok, other=0) - length).to(tl.float32)
        c, s = _sincos(rel * tl.load(Rope + chan, mask=cok, other=0.0), FAST)
        sgn = tl.where(chan < half, -1.0, 1.0)
        return tl.where(pok & cok, x * c + sgn * xp * s, 0.0)

    @triton.jit
    def _select_level(code, CB, BASE: tl.constexpr, BITS: tl.constexpr):
        """CB[BASE + (code mod 2**BITS)]: a binary tree of selects on the code's bits, from the
        2**BITS levels as scalars. Registers only: a gather from memory would be a load whose
        coalesced layout (one channel per thread, every row) Triton then imposes on the tile."""
        if BITS == 0:
            return tl.load(CB + BASE)
        else:
            BIT: tl.constexpr = 1 << (BITS - 1)
            lo = _select_level(code, CB, BASE, BITS - 1)
            hi = _select_level(code, CB, BASE + BIT, BITS - 1)
            return tl.where((code & BIT) != 0, hi, lo)

    @triton.jit
    def _code_levels(code, CB, QBITS: tl.constexpr, FAST: tl.constexpr):
        """codebook[code] of int32 codes already in registers. FAST at 3 and 4 bits: an L1 gather
        by inline PTX (one multiply-add and one load per entry; as a tl.load Triton would give
        the tile that load's one-channel-per-thread layout); otherwise the select tree (2 bits:
        2 bit tests and 3 selects; 3 bits: 3 and 7)."""
        if FAST and QBITS > 2:
            lev = tl.inline_asm_elementwise(
                "{ .reg .u64 a; mad.wide.u32 a, $1, 4, $2; ld.global.nc.f32 $0, [a]; }", "=f,r,l",
                [code, CB.to(tl.int64, bitcast=True)], dtype=tl.float32, is_pure=True, pack=1)
        else:
            lev = _select_level(code, CB, 0, QBITS)
        return lev

    @triton.jit
    def _word_levels(row, rok, nw, CB, BLOCK_N: tl.constexpr, NW: tl.constexpr, QBITS: tl.constexpr,
                     FAST: tl.constexpr, RUN: tl.constexpr = 0):
        """codebook[code] [BLOCK_N, NW * 32 // QBITS] of the NW words at row [BLOCK_N] (2 or 4
        bits; words past nw and rows not in rok read 0): code c of a row at bits (c % VPW) *
        QBITS of its word c // VPW. The words load as [BLOCK_N, columns, 1] and broadcast along
        the codes, so each thread unpacks its own words and holds whole runs of channels (a 2-D
        load made Triton move each word to VPW lanes). RUN = 0: a column per word. RUN > 0: runs
        of RUN codes, a column per run (each word loaded by the VPW // RUN columns that share it):
        for short rows, whose whole-word runs leave few threads per row (2 bits at head dim 64)."""
        VPW: tl.constexpr = 32 // QBITS
        if RUN == 0:
            wi = tl.arange(0, NW)
            w = tl.load(row[:, None, None] + wi[None, :, None], mask=rok[:, None, None] & (wi < nw)[None, :, None],
                        other=0)
            sh = tl.arange(0, VPW) * QBITS
        else:
            q = tl.arange(0, NW * VPW // RUN)
            wi = q * RUN // VPW
            w = tl.load(row[:, None, None] + wi[None, :, None], mask=rok[:, None, None] & (wi < nw)[None, :, None],
                        other=0)
            w = w >> (((q * RUN) % VPW) * QBITS)[None, :, None]
            sh = tl.arange(0, RUN) * QBITS
        code = (w >> sh[None, None, :]) & ((1 << QBITS) - 1)
        return tl.reshape(_code_levels(code, CB, QBITS, FAST), [BLOCK_N, NW * VPW])

    @triton.jit
    def _plane_levels(lo_row, hi_row, rok, nlo, nhi, CB, BLOCK_N: tl.constexpr, NH: tl.constexpr,
                      FAST: tl.constexpr):
        """3 bits: codebook[code] [BLOCK_N, 32 * NH] of 32 * NH consecutive channels from their
        two planes: low two bits in the 2 * NH words at lo_row [BLOCK_N] (16 codes per word),
        high bit in the NH words at hi_row (32 per word). Both load as [BLOCK_N, NH, (2 | 1), 1]
        tiles (a high-bit word covers a pair of low-bits words) and broadcast along the 16 codes
        of a low word, so each thread unpacks its own word pairs with shifts and the two planes
        meet in registers: code = lo | hi << 2, the high bits moved into place once per word
        (per entry then a shift and a LOP3 more than at 4 bits). NH == 1 (the 32-channel halves
        of head dim 64): runs of 8 channels per thread instead, each word loaded by the 2 or 4
        threads that share it; 16 left 2 threads per 32-channel row, and the sm_90 compile moved
        the tile through shared memory (loop 1309 -> 707 instructions, 4 bits: 598). Words past
        nlo / nhi (padded channels) and rows not in rok read 0."""
        if NH == 1:
            NQ: tl.constexpr = 4 * NH  # runs of 8 channels: a thread holds 8, as at 4 bits
            q = tl.arange(0, NQ)
            c = tl.arange(0, 8)
            lo = tl.load(lo_row[:, None, None] + (q // 2)[None, :, None],
                         mask=rok[:, None, None] & (q // 2 < nlo)[None, :, None], other=0)
            hi = tl.load(hi_row[:, None, None] + (q // 4)[None, :, None],
                         mask=rok[:, None, None] & (q // 4 < nhi)[None, :, None], other=0)
            lq = lo >> ((q % 2) * 16)[None, :, None]
            hq = (hi >> ((q % 4) * 8)[None, :, None]) << 2
            c3 = c[None, None, :]
            code = ((lq >> (2 * c3)) & 3) | ((hq >> c3) & 4)
        else:
            k = tl.arange(0, NH)
            pr = tl.arange(0, 2)
            c = tl.arange(0, 16)
            lw = 2 * k[:, None] + pr[None, :]  # [NH, 2] low-bits word of each pair
            lo = tl.load(lo_row[:, None, None, None] + lw[None, :, :, None],
                         mask=rok[:, None, None, None] & (lw < nlo)[None, :, :, None], other=0)
            hi = tl.load(hi_row[:, None, None, None] + k[None, :, None, None],
                         mask=rok[:, None, None, None] & (k < nhi)[None, :, None, None], other=0)
            # the high bits of each low word's 16 codes, moved to bits 2..17 once per word: per entry
            # then one shift and one LOP3 ((h >> c) & 4 | low bits)
            hp = (hi >> (16 * pr)[None, None, :, None]) << 2
            c4 = c[None, None, None, :]
            code = ((lo >> (2 * c4)) & 3) | ((hp >> c4) & 4)
        return tl.reshape(_code_levels(code, CB, 3, FAST), [BLOCK_N, NH * 32])

    # PAIRS (2 or 4 bits, HALVES, a bf16 or fp16 model): each byte of a packed word holds the codes
    # of 2 (4 bits) or 4 (2 bits) adjacent channels. A per-program table of the 256 byte values'
    # levels as f16x2 pair words (1 or 2 per byte) turns unpack + gather + scale/offset into a byte
    # extract, one load and one HFMA2 per two entries; the outlier fold and RoPE run on pair words
    # too, and the tiles meet the query (cast to fp16 once) in an fp16 mma (NOTES v16). fp16, not
    # the model's bf16: its 3 more mantissa bits keep the pair arithmetic's roundings below the
    # bf16 path's one (error against float64 on a bf16 model: 3.2-3.5e-3, per entry 4.2-5.9e-3;
    # bf16 pairs: 1.0-1.5e-2); `squeeze` refuses contexts whose entries leave fp16's range.
    # The helpers hold pair words as int32 tensors [BLOCK_N, words, pairs per word] (pair p of
    # word w: channels VPW * w + 2p (low half) and + 1 (high half)), so every asm works on one
    # element (pack=1) whatever layout Triton picks; they become fp16 [BLOCK_N, channels] at the
    # end by a join. FAST: inline PTX (an asm writes its outputs after its last read of an input,
    # which may share an output's register); otherwise (the interpreter) the same table and
    # arithmetic lane by lane, one rounding per multiply-add as f16x2 does, which the tests check
    # against float64 on CPU.

    @triton.jit
    def _bits16(x):
        """The 16 bits of an fp16 tensor as int32 in [0, 65536)."""
        return x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF

    @triton.jit
    def _lanes(p):
        """float32 (low, high) halves of int32 pair words."""
        lo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        hi = ((p >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        return lo.to(tl.float32), hi.to(tl.float32)

    @triton.jit
    def _pack2(lo, hi, FAST: tl.constexpr):
        """Pair words of float32 (lo, hi), each rounded to fp16."""
        if FAST:
            return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [lo, hi], dtype=tl.int32,
                                             is_pure=True, pack=1)
        return _bits16(lo.to(tl.float16)) | (_bits16(hi.to(tl.float16)) << 16)

    @triton.jit
    def _fma2(a, b, c, FAST: tl.constexpr):
        """a * b + c on pair words, one rounding per half."""
        if FAST:
            return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                             is_pure=True, pack=1)
        al, ah = _lanes(a)
        bl, bh = _lanes(b)
        cl, ch = _lanes(c)
        return _pack2(al * bl + cl, ah * bh + ch, False)

    @triton.jit
    def _rotate2(x1, x2, c, s, FAST: tl.constexpr):
        """RoPE on pair words: y1 = x1 c - x2 s, y2 = x2 c + x1 s, the products x2 s and x1 s
        rounded, then one rounding per multiply-add."""
        if FAST:
            y1, y2 = tl.inline_asm_elementwise(
                "{ .reg .b32 t, u; mul.rn.f16x2 t, $3, $5; neg.f16x2 t, t; fma.rn.f16x2 u, $2, $4, t; "
                "mul.rn.f16x2 t, $2, $5; fma.rn.f16x2 $1, $3, $4, t; mov.b32 $0, u; }",
                "=r,=r,r,r,r,r", [x1, x2, c, s], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            l1, h1 = _lanes(x1)
            l2, h2 = _lanes(x2)
            lc, hc = _lanes(c)
            ls, hs = _lanes(s)
            t = _pack2(l2 * ls, h2 * hs, False)
            tl_, th = _lanes(t)
            y1 = _pack2(l1 * lc - tl_, h1 * hc - th, False)
            t = _pack2(l1 * ls, h1 * hs, False)
            tl_, th = _lanes(t)
            y2 = _pack2(l2 * lc + tl_, h2 * hc + th, False)
        return y1, y2

    @triton.jit
    def _to_halves(p, FAST: tl.constexpr):
        """fp16 [BLOCK_N, NW * PPW * 2] channels from pair words [BLOCK_N, NW, PPW]."""
        if FAST:
            lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [p],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        else:
            lo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            hi = ((p >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        x = tl.join(lo, hi)
        return tl.reshape(x, [x.shape[0], x.shape[1] * x.shape[2] * 2])

    @triton.jit
    def pair_table(Tab, CB, NLEV, QBITS: tl.constexpr, FAST: tl.constexpr):
        """Write a program's table at Tab: per side s (0 keys, 1 values) 256 bytes x WPB = 4 // QBITS
        pair words, word q of byte b = the levels of its codes 2q and 2q + 1 (bits 2q*QBITS and
        (2q+1)*QBITS); then a barrier, so that every thread of the program reads it (plain loads:
        the table changes within the launch)."""
        WPB: tl.constexpr = 4 // QBITS
        e = tl.arange(0, 512 * WPB)
        side = e // (256 * WPB)
        b = (e // WPB) % 256
        sh = (e % WPB) * (2 * QBITS)
        mask = (1 << QBITS) - 1
        lo = tl.load(CB + side * NLEV + ((b >> sh) & mask))
        hi = tl.load(CB + side * NLEV + ((b >> (sh + QBITS)) & mask))
        tl.store(Tab + e, _pack2(lo, hi, FAST))
        tl.debug_barrier()

    @triton.jit
    def _pair_levels(w, tab, sc, off, QBITS: tl.constexpr, FAST: tl.constexpr):
        """Pair words [BLOCK_N, NW, 16 // QBITS] of level * sc + off for the codes of the words w
        [BLOCK_N, NW, 1]: a byte extract, one table load (2 bits: of two pair words) and one HFMA2
        per pair; sc, off pair words broadcast to that shape."""
        b = tl.arange(0, 4)
        byte = (w >> (b * 8)[None, None, :]) & 255  # [BLOCK_N, NW, 4]
        if QBITS == 4:
            if FAST:
                lev = tl.inline_asm_elementwise(
                    "{ .reg .u64 a; mad.wide.u32 a, $1, 4, $2; ld.global.b32 $0, [a]; }", "=r,r,l",
                    [byte, tab.to(tl.int64, bitcast=True)], dtype=tl.int32, is_pure=True, pack=1)
            else:
                lev = tl.load(tab + byte)
        else:
            if FAST:
                l0, l1 = tl.inline_asm_elementwise(
                    "{ .reg .u64 a; mad.wide.u32 a, $2, 8, $3; ld.global.v2.b32 {$0, $1}, [a]; }", "=r,=r,r,l",
                    [byte, tab.to(tl.int64, bitcast=True)], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
            else:
                l0 = tl.load(tab + byte * 2)
                l1 = tl.load(tab + byte * 2 + 1)
            lev = tl.join(l0, l1)
            lev = tl.reshape(lev, [lev.shape[0], lev.shape[1], 8])
        return _fma2(lev, sc, off, FAST)

    @triton.jit
    def _pair_outliers(x, OIdx, OVal, which, h, pos, pok, pidx, lo, N, NOUT: tl.constexpr):
        """Pair words x [BLOCK_N, NW, PPW] holding channel pairs pidx (same shape; lo: the first
        channel) of the rows at pos, with the row's outliers (K: which 0, V: 1) folded in: the half
        of the outlier's pair takes its fp16 value (a compare, a LOP3 and a select per pair)."""
        for e in tl.static_range(NOUT):
            o = ((h * N + pos) * 2 + which) * NOUT + e
            oi = tl.load(OIdx + o, mask=pok, other=-1).to(tl.int32) - lo
            ob = _bits16(tl.load(OVal + o, mask=pok, other=0.0).to(tl.float16))
            half = tl.where((oi & 1) == 1, -65536, 0xFFFF)  # the outlier's half of the word
            merged = (x & ~half[:, None, None]) | (((ob << 16) | ob) & half)[:, None, None]
            x = tl.where(pidx == tl.where(oi >= 0, oi >> 1, -1)[:, None, None], merged, x)
        return x

    @triton.jit
    def key_pairs(Pk, KNorm, OIdx, OVal, Perm, Rope, Tab, h, pos, pok, N, length,
                  BLOCK_N: tl.constexpr, HALF: tl.constexpr, QBITS: tl.constexpr, NOUT: tl.constexpr,
                  FAST: tl.constexpr):
        """`key_halves` for PAIRS: the rotated halves y1, y2 as fp16 [BLOCK_N, HALF], dequantized,
        outlier-folded and rotated on pair words (cos/sin from the float32 angle, packed once)."""
        VPW: tl.constexpr = 32 // QBITS
        NW: tl.constexpr = HALF // VPW
        PPW: tl.constexpr = VPW // 2
        wi = tl.arange(0, NW)
        pidx = (wi[:, None] * PPW + tl.arange(0, PPW)[None, :])[None, :, :]  # [1, NW, PPW] pair in the half
        ch = 2 * pidx[:, :, :, None] + tl.arange(0, 2)[None, None, None, :]  # [1, NW, PPW, 2] channels
        kn = KNorm + h * 4 * HALF + ch
        sc1 = _pack2(*tl.split(tl.load(kn)), FAST)
        sc2 = _pack2(*tl.split(tl.load(kn + HALF)), FAST)
        off1 = _pack2(*tl.split(tl.load(kn + 2 * HALF)), FAST)
        off2 = _pack2(*tl.split(tl.load(kn + 3 * HALF)), FAST)
        row = Pk + (h * N + pos) * (2 * NW)
        rok = pok[:, None, None]
        w1 = tl.load(row[:, None, None] + wi[None, :, None], mask=rok, other=0)
        w2 = tl.load(row[:, None, None] + NW + wi[None, :, None], mask=rok, other=0)
        x1 = _pair_outliers(_pair_levels(w1, Tab, sc1, off1, QBITS, FAST), OIdx, OVal, 0, h, pos, pok, pidx, 0,
                            N, NOUT)
        x2 = _pair_outliers(_pair_levels(w2, Tab, sc2, off2, QBITS, FAST), OIdx, OVal, 0, h, pos, pok, pidx, HALF,
                            N, NOUT)
        rel = (tl.load(Perm + h * N + pos, mask=pok, other=0) - length).to(tl.float32)[:, None, None]
        f0, f1 = tl.split(tl.load(Rope + ch))
        c0, s0 = _sincos(rel * f0, FAST)
        c1, s1 = _sincos(rel * f1, FAST)
        y1, y2 = _rotate2(x1, x2, _pack2(c0, c1, FAST), _pack2(s0, s1, FAST), FAST)
        return _to_halves(y1, FAST), _to_halves(y2, FAST)

    @triton.jit
    def value_pairs(Pv, VNorm, OIdx, OVal, Tab, h, pos, pok, N, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    QBITS: tl.constexpr, NOUT: tl.constexpr, FAST: tl.constexpr):
        """`value_rows` for PAIRS: fp16 [BLOCK_N, BLOCK_D], the row's scale and offset per pair."""
        VPW: tl.constexpr = 32 // QBITS
        NW: tl.constexpr = BLOCK_D // VPW
        PPW: tl.constexpr = VPW // 2
        wi = tl.arange(0, NW)
        pidx = (wi[:, None] * PPW + tl.arange(0, PPW)[None, :])[None, :, :]
        row = Pv + (h * N + pos) * NW
        w = tl.load(row[:, None, None] + wi[None, :, None], mask=pok[:, None, None], other=0)
        sc = tl.load(VNorm + (h * N + pos) * 2, mask=pok, other=0.0).to(tl.float32)
        off = tl.load(VNorm + (h * N + pos) * 2 + 1, mask=pok, other=0.0).to(tl.float32)
        x = _pair_levels(w, Tab + 1024 // QBITS, _pack2(sc, sc, FAST)[:, None, None],
                         _pack2(off, off, FAST)[:, None, None], QBITS, FAST)
        return _to_halves(_pair_outliers(x, OIdx, OVal, 1, h, pos, pok, pidx, 0, N, NOUT), FAST)

    @triton.jit
    def key_halves(Pk, CB, KNorm, OIdx, OVal, Perm, Rope, h, pos, pok, N, length,
                   BLOCK_N: tl.constexpr, HALF: tl.constexpr, QBITS: tl.constexpr,
                   NOUT: tl.constexpr, FAST: tl.constexpr):
        """float32 post-RoPE keys (without the attention scaling) as their two rotate_half halves
        y1 = channels [0, D/2), y2 = [D/2, D), each [BLOCK_N, D/2] (HALVES: D = 2 * HALF is a
        whole number of words); finite on invalid rows (the caller masks their scores). The
        per-channel scale, offset and inv_freq are re-read per tile (L1 hits): kept across the
        attention loop they only spill."""
        NWH: tl.constexpr = HALF * QBITS // 32  # words per half row (3 bits: both planes)
        j = tl.arange(0, HALF)
        kn = KNorm + h * 4 * HALF + j
        sc1 = tl.load(kn)
        sc2 = tl.load(kn + HALF)
        off1 = tl.load(kn + 2 * HALF)
        off2 = tl.load(kn + 3 * HALF)
        # row stride 2 * NWH (== P here) as a constant: the compiler then vectorizes the loads
        row = Pk + (h * N + pos) * (2 * NWH)
        if QBITS == 3:  # [low bits of half 1 | of half 2 | high bits of half 1 | of half 2]
            NHI: tl.constexpr = HALF // 32
            x1 = _plane_levels(row, row + 4 * NHI, pok, 2 * NHI, NHI, CB, BLOCK_N, NHI, FAST)
            x2 = _plane_levels(row + 2 * NHI, row + 5 * NHI, pok, 2 * NHI, NHI, CB, BLOCK_N, NHI, FAST)
        elif QBITS == 2 and NWH <= 2:
            # 32-channel halves (head dim 64): runs of 8 channels per thread, as at 4 bits; whole
            # 16-code words left 2 threads per half row and went through shared memory on sm_90
            # (as 3 bits did: _plane_levels)
            x1 = _word_levels(row, pok, NWH, CB, BLOCK_N, NWH, QBITS, FAST, 8)
            x2 = _word_levels(row + NWH, pok, NWH, CB, BLOCK_N, NWH, QBITS, FAST, 8)
        else:
            x1 = _word_levels(row, pok, NWH, CB, BLOCK_N, NWH, QBITS, FAST)
            x2 = _word_levels(row + NWH, pok, NWH, CB, BLOCK_N, NWH, QBITS, FAST)
        x1 = x1 * sc1[None, :] + off1[None, :]
        x2 = x2 * sc2[None, :] + off2[None, :]
        for e in tl.static_range(NOUT):
            o = (h * N + pos) * 2 * NOUT + e
            oi = tl.load(OIdx + o, mask=pok, other=-1).to(tl.int32)
            ov = tl.load(OVal + o, mask=pok, other=0.0).to(tl.float32)
            x1 = tl.where(j[None, :] == oi[:, None], ov[:, None], x1)
            x2 = tl.where(j[None, :] == (oi - HALF)[:, None], ov[:, None], x2)
        rel = (tl.load(Perm + h * N + pos, mask=pok, other=0) - length).to(tl.float32)
        c, s = _sincos(rel[:, None] * tl.load(Rope + j)[None, :], FAST)
        return x1 * c - x2 * s, x2 * c + x1 * s

    @triton.jit
    def value_rows(Pv, CB, VNorm, OIdx, OVal, h, pos, pok, N, P, D, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, QBITS: tl.constexpr, NOUT: tl.constexpr, FAST: tl.constexpr,
                   HALVES: tl.constexpr = False):
        """float32 values [BLOCK_N, BLOCK_D], per-token scale/offset loaded once per row; finite on
        invalid rows and padded channels (the attention masks or drops them). The packed words
        load as tiles unpacked in registers (2/4 bits: one [BLOCK_N, BLOCK_D // VPW] tile; 3 bits:
        a tile per plane, the high-bit plane after the ceil(D / 16) low-bits words); rows under a
        word of codes (3 bits: under 32 channels) take a word and a codebook gather per entry.
        HALVES (D == BLOCK_D, whole words): the row stride and plane offsets are constants, so
        the compiler knows the words' alignment."""
        VPW: tl.constexpr = 32 // QBITS
        d = tl.arange(0, BLOCK_D)
        if HALVES:
            row = Pv + (h * N + pos) * (BLOCK_D * QBITS // 32)
        else:
            row = Pv + (h * N + pos) * P
        if QBITS == 3 and HALVES:
            NLO: tl.constexpr = BLOCK_D // 16
            lev = _plane_levels(row, row + NLO, pok, NLO, NLO // 2, CB, BLOCK_N, BLOCK_D // 32, FAST)
        elif QBITS == 3 and BLOCK_D >= 32:
            nlo = (D + 15) // 16
            lev = _plane_levels(row, row + nlo, pok, nlo, (D + 31) // 32, CB, BLOCK_N, BLOCK_D // 32,
                                FAST)
        elif QBITS != 3 and BLOCK_D >= VPW:
            lev = _word_levels(row, pok, P, CB, BLOCK_N, BLOCK_D // VPW, QBITS, FAST)
        else:
            lev = _levels(Pv, CB, h, pos[:, None], pok[:, None], d[None, :], (d < D)[None, :],
                          N, P, D, QBITS)
        sc = tl.load(VNorm + (h * N + pos) * 2, mask=pok, other=0.0).to(tl.float32)
        off = tl.load(VNorm + (h * N + pos) * 2 + 1, mask=pok, other=0.0).to(tl.float32)
        return _fold_outliers(lev * sc[:, None] + off[:, None], OIdx, OVal, 1, h, pos[:, None],
                              pok[:, None], d[None, :], N, NOUT)

    @triton.jit
    def _dequant_kernel(Pk, Pv, CB, KNorm, VNorm, OIdx, OVal, Perm, Rope, Kout, Vout, N, P, D, G,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HALVES: tl.constexpr,
                        QBITS: tl.constexpr, NOUT: tl.constexpr, FAST: tl.constexpr):
        """Dense float32 K, V [H, N, D] of one layer through the helpers the attention kernel
        uses (tests only: the hot path never writes them)."""
        h = tl.program_id(1)
        pos = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        pok = pos < N
        cok = d < D
        mscale = tl.load(Rope + D)
        length = tl.load(Rope + D + 1).to(tl.int32)
        if HALVES:
            HALF: tl.constexpr = BLOCK_D // 2
            y1, y2 = key_halves(Pk, CB, KNorm, OIdx, OVal, Perm, Rope, h, pos, pok, N, length,
                                BLOCK_N, HALF, QBITS, NOUT, FAST)
            j = tl.arange(0, HALF)
            o = (h * N + pos[:, None]) * D + j[None, :]
            tl.store(Kout + o, y1 * mscale, mask=pok[:, None])
            tl.store(Kout + o + HALF, y2 * mscale, mask=pok[:, None])
        else:
            k = dequant_key(Pk, CB, KNorm, OIdx, OVal, Perm, Rope, h, pos[:, None], pok[:, None],
                            d[None, :], cok[None, :], N, P, D, QBITS, NOUT, FAST)
            tl.store(Kout + (h * N + pos[:, None]) * D + d[None, :], k * mscale,
                     mask=pok[:, None] & cok[None, :])
        v = value_rows(Pv, CB + G, VNorm, OIdx, OVal, h, pos, pok, N, P, D, BLOCK_N, BLOCK_D, QBITS, NOUT,
                       FAST, HALVES)
        tl.store(Vout + (h * N + pos[:, None]) * D + d[None, :], v, mask=pok[:, None] & cok[None, :])


def halves(d: int, bits: int) -> bool:
    """Whether keys of head dim d in `bits` bits take the HALVES path (see the module docstring)."""
    d, bits = int(d), int(bits)
    # 3 bits: each plane's codes per word (16, 32) must divide the half
    return bits in (2, 3, 4) and d & (d - 1) == 0 and (d // 2) % (32 if bits == 3 else 32 // bits) == 0


def fast_math(device) -> bool:
    """FAST: the inline PTX (sin/cos.approx in `_sincos`, the 4-bit codebook gather in
    `_word_levels`) on NVIDIA GPUs; not under the interpreter, which cannot run PTX, or on ROCm."""
    import torch

    from ..triton_common import interpreting

    return device.type == "cuda" and not interpreting() and torch.version.hip is None


def dequantize_layer(keys, values, perm, rope, codebooks, key_norm, value_norm, outlier_idx, outlier_val,
                     head_dim: int, fast: bool | None = None):
    """float32 post-RoPE K, V [H, N, D] of one layer's op arguments through the Triton helpers
    (CUDA, or CPU under TRITON_INTERPRET=1): the test of quant/triton.py against reference.py.
    `fast`: `_sincos`'s FAST (default: as the attention launch picks it)."""
    import torch

    from ..triton_common import launch, pow2
    from .reference import codebook_bits

    h, n, p = keys.shape
    d = int(head_dim)
    g = codebooks.shape[-1]
    bits = codebook_bits(codebooks)
    nout = 0 if outlier_idx is None else outlier_idx.shape[-1]
    dummy = torch.zeros(1, dtype=torch.int16, device=keys.device)
    kout = torch.full((h, n, d), float("nan"), dtype=torch.float32, device=keys.device)
    vout = torch.full_like(kout, float("nan"))
    block_n = 16
    launch(_dequant_kernel, (-(-n // block_n), h), keys.contiguous(), values.contiguous(), codebooks.contiguous(),
           key_norm.contiguous(), value_norm.contiguous(),
           dummy if outlier_idx is None else outlier_idx.contiguous(),
           dummy.half() if outlier_val is None else outlier_val.contiguous(),
           perm.contiguous(), rope.contiguous(), kout, vout, n, p, d, g,
           BLOCK_N=block_n, BLOCK_D=pow2(d), HALVES=halves(d, bits), QBITS=bits, NOUT=nout,
           FAST=fast_math(keys.device) if fast is None else bool(fast))
    return kout, vout


def sincos(a, fast: bool | None = None):
    """cos, sin of a float32 tensor through `_sincos` (tests)."""
    import torch

    from ..triton_common import launch

    a = a.contiguous()
    c, s = torch.empty_like(a), torch.empty_like(a)
    launch(_sincos_kernel, (-(-a.numel() // 1024),), a, c, s, a.numel(),
           FAST=fast_math(a.device) if fast is None else bool(fast), BLOCK=1024)
    return c, s
