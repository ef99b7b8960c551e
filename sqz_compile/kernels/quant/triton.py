"""Triton dequantization of a low-bit context's K/V in registers (reference: quant/reference.py).

The attention kernel (attention/triton.py, QBITS > 0) calls `dequant_key_rows` /
`dequant_value_rows` on a tile of BLOCK_N keys at sorted positions `pos` (rows = keys);
`_dequant_kernel` runs the same helpers alone, for the tests. The per-entry helpers (`_levels`,
`dequant_key`) serve what the row fast path does not: 3-bit words (32 % 3 != 0) and padded head
dims (rotate_half pairs j with j + D/2, not j + BLOCK_D/2); their index arguments are 2-D
broadcastable (`pos`/`pok` rows and validity, `chan`/`cok` channels and validity).
Per-layer tensors are contiguous: packed codes [H, N, P] int32, codebooks [2, G] float32,
key_norm [H, 2, D] float32, value_norm [H, N, 2] float16, outliers [H, N, 2, E], perm [H, N]
int32, rope [D + 2] float32 (inv_freq per channel, attention scaling, context length).
"""
from __future__ import annotations

from ..triton_common import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _levels(Pk, CB, h, pos, pok, chan, cok, N, P, QBITS: tl.constexpr):
        """codebook[code] of the packed rows: code `chan` of row (h, pos)."""
        VPW: tl.constexpr = 32 // QBITS
        ok = pok & cok
        w = tl.load(Pk + (h * N + pos) * P + chan // VPW, mask=ok, other=0)
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
        lev = _levels(Pk, CB, h, pos, pok, chan, cok, N, P, QBITS)
        sc = tl.load(KNorm + h * 2 * D + chan, mask=cok, other=0.0)
        off = tl.load(KNorm + h * 2 * D + D + chan, mask=cok, other=0.0)
        return _fold_outliers(lev * sc + off, OIdx, OVal, 0, h, pos, pok, chan, N, NOUT)

    @triton.jit
    def dequant_key(Pk, CB, KNorm, OIdx, OVal, Perm, Rope, h, pos, pok, chan, cok, N, P, D,
                    QBITS: tl.constexpr, NOUT: tl.constexpr):
        """float32 post-RoPE key entries: dequantized pre-RoPE channel and its rotate_half partner,
        rotated by angle float32(p - L) * inv_freq (p: the key's context position)."""
        half = D // 2
        partner = tl.where(chan < half, chan + half, chan - half)
        x = _prerope_key(Pk, CB, KNorm, OIdx, OVal, h, pos, pok, chan, cok, N, P, D, QBITS, NOUT)
        xp = _prerope_key(Pk, CB, KNorm, OIdx, OVal, h, pos, pok, partner, cok, N, P, D, QBITS, NOUT)
        length = tl.load(Rope + D + 1).to(tl.int32)
        mscale = tl.load(Rope + D)
        rel = (tl.load(Perm + h * N + pos, mask=pok, other=0) - length).to(tl.float32)
        ang = rel * tl.load(Rope + chan, mask=cok, other=0.0)
        sgn = tl.where(chan < half, -1.0, 1.0)
        k = (x * tl.cos(ang) + sgn * xp * tl.sin(ang)) * mscale
        return tl.where(pok & cok, k, 0.0)

    @triton.jit
    def _levels_rows(Pk, CB, h, pos, pok, N, P, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     QBITS: tl.constexpr):
        """codebook[code] [BLOCK_N, BLOCK_D] of the packed rows (h, pos) (keys along rows). When
        32 % QBITS == 0: one [BLOCK_N, BLOCK_D // VPW] word load, unpacked by shifts in registers
        (code d at bits (d % VPW) * QBITS of word d // VPW: the reshape's row-major order);
        3 bits: one word gather per entry."""
        VPW: tl.constexpr = 32 // QBITS
        d = tl.arange(0, BLOCK_D)
        if (32 % QBITS == 0) and (BLOCK_D >= VPW):
            NW: tl.constexpr = BLOCK_D // VPW
            wi = tl.arange(0, NW)
            w = tl.load(Pk + (h * N + pos)[:, None] * P + wi[None, :],
                        mask=pok[:, None] & (wi[None, :] < P), other=0)
            sh = tl.arange(0, VPW) * QBITS
            code = (w[:, :, None] >> sh[None, None, :]) & ((1 << QBITS) - 1)
            code = tl.reshape(code, [BLOCK_N, BLOCK_D])
            return tl.load(CB + code)  # code < 2**QBITS: always in bounds (tiny, L1-resident)
        else:
            return _levels(Pk, CB, h, pos[:, None], pok[:, None], d[None, :], (d < D)[None, :],
                           N, P, QBITS)

    @triton.jit
    def dequant_key_rows(Pk, CB, KNorm, OIdx, OVal, Perm, Rope, h, pos, pok, N, P, D,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                         QBITS: tl.constexpr, NOUT: tl.constexpr):
        """float32 post-RoPE keys [BLOCK_N, BLOCK_D] (rows = keys at sorted positions `pos`).
        EVEN_D (D == BLOCK_D): each entry dequantized once, the rotate_half halves split in
        registers ([N, 2, D/2] -> two [N, D/2]) and rotated with cos/sin of [N, D/2] angles
        (inv_freq repeats per half). Padded head dims pair channel j with j + D/2, not
        j + BLOCK_D/2: they take `dequant_key` (partner dequantized by a second gather)."""
        d = tl.arange(0, BLOCK_D)
        cok = d < D
        if EVEN_D:
            HALF: tl.constexpr = BLOCK_D // 2
            lev = _levels_rows(Pk, CB, h, pos, pok, N, P, D, BLOCK_N, BLOCK_D, QBITS)
            sc = tl.load(KNorm + h * 2 * D + d)
            off = tl.load(KNorm + h * 2 * D + D + d)
            x = _fold_outliers(lev * sc[None, :] + off[None, :], OIdx, OVal, 0, h, pos[:, None],
                               pok[:, None], d[None, :], N, NOUT)
            x1, x2 = tl.split(tl.permute(tl.reshape(x, [BLOCK_N, 2, HALF]), (0, 2, 1)))
            length = tl.load(Rope + D + 1).to(tl.int32)
            mscale = tl.load(Rope + D)
            rel = (tl.load(Perm + h * N + pos, mask=pok, other=0) - length).to(tl.float32)
            ang = rel[:, None] * tl.load(Rope + tl.arange(0, HALF))[None, :]
            c = tl.cos(ang)
            s = tl.sin(ang)
            y1 = (x1 * c - x2 * s) * mscale
            y2 = (x2 * c + x1 * s) * mscale
            k = tl.reshape(tl.permute(tl.join(y1, y2), (0, 2, 1)), [BLOCK_N, BLOCK_D])
            return tl.where(pok[:, None], k, 0.0)
        else:
            return dequant_key(Pk, CB, KNorm, OIdx, OVal, Perm, Rope, h, pos[:, None], pok[:, None],
                               d[None, :], cok[None, :], N, P, D, QBITS, NOUT)

    @triton.jit
    def dequant_value_rows(Pv, CB, VNorm, OIdx, OVal, h, pos, pok, N, P, G, D,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           QBITS: tl.constexpr, NOUT: tl.constexpr):
        """float32 values [BLOCK_N, BLOCK_D]: per-token scale/offset loaded once per row."""
        d = tl.arange(0, BLOCK_D)
        lev = _levels_rows(Pv, CB + G, h, pos, pok, N, P, D, BLOCK_N, BLOCK_D, QBITS)
        sc = tl.load(VNorm + (h * N + pos) * 2, mask=pok, other=0.0).to(tl.float32)
        off = tl.load(VNorm + (h * N + pos) * 2 + 1, mask=pok, other=0.0).to(tl.float32)
        v = _fold_outliers(lev * sc[:, None] + off[:, None], OIdx, OVal, 1, h, pos[:, None],
                           pok[:, None], d[None, :], N, NOUT)
        return tl.where(pok[:, None] & (d < D)[None, :], v, 0.0)

    @triton.jit
    def _dequant_kernel(Pk, Pv, CB, KNorm, VNorm, OIdx, OVal, Perm, Rope, Kout, Vout, N, P, D, G,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                        QBITS: tl.constexpr, NOUT: tl.constexpr):
        """Dense float32 K, V [H, N, D] of one layer through the row helpers the attention kernel
        uses (tests only: the hot path never writes them)."""
        h = tl.program_id(1)
        pos = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        pok = pos < N
        cok = d < D
        k = dequant_key_rows(Pk, CB, KNorm, OIdx, OVal, Perm, Rope, h, pos, pok, N, P, D,
                             BLOCK_N, BLOCK_D, EVEN_D, QBITS, NOUT)
        v = dequant_value_rows(Pv, CB, VNorm, OIdx, OVal, h, pos, pok, N, P, G, D,
                               BLOCK_N, BLOCK_D, QBITS, NOUT)
        o = (h * N + pos[:, None]) * D + d[None, :]
        tl.store(Kout + o, k, mask=pok[:, None] & cok[None, :])
        tl.store(Vout + o, v, mask=pok[:, None] & cok[None, :])


def dequantize_layer(keys, values, perm, rope, codebooks, key_norm, value_norm, outlier_idx, outlier_val,
                     head_dim: int):
    """float32 post-RoPE K, V [H, N, D] of one layer's op arguments through the Triton helpers
    (CUDA, or CPU under TRITON_INTERPRET=1): the test of quant/triton.py against reference.py."""
    import torch

    from ..triton_common import launch, pow2

    h, n, p = keys.shape
    d = int(head_dim)
    g = codebooks.shape[-1]
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
           BLOCK_N=block_n, BLOCK_D=pow2(d), EVEN_D=d == pow2(d), QBITS=g.bit_length() - 1, NOUT=nout)
    return kout, vout
