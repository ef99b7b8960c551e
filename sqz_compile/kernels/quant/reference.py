"""Dequantization of a low-bit context (squeeze/quantize.py writes it), in float64: the reference
for the Triton helpers in quant/triton.py, and the CPU branch of the sqz op on low-bit contexts.

Stored row of D codes -> value: codebook[code] * scale + offset (keys: scale/offset per channel;
values: per token), then the row's outliers overwrite their channels, then (keys) RoPE at the key's
position p - L: k * cos + rotate_half(k) * sin with angle float32(p - L) * inv_freq in float32.
Packing (`planes`): 2 and 4 bits, v = 32 // bits codes per int32 word, code d at bits
(d % v) * bits of word d // v; 3 bits, two planes one after the other in the row, the codes' low
two bits (16 per word) then their high bit (32 per word), each packed the same way.
"""
from __future__ import annotations

import torch


def planes(d: int, bits: int) -> list[tuple[int, int, int]]:
    """The bit planes of a packed row of d codes, in storage order: (bits of the code they hold,
    its lowest bit, words). 2/4 bits: one plane of the whole code. 3 bits: the low two bits
    (16 codes per word), then the high bit (32 codes per word): exactly 3 bits per value when
    32 divides d, and both planes split the rotate_half halves of head dims 64 and 128 into
    whole words (the kernels' HALVES path), which 10 codes per word did not."""
    d, bits = int(d), int(bits)
    if bits == 3:
        return [(2, 0, -(-d // 16)), (1, 2, -(-d // 32))]
    return [(bits, 0, -(-d // (32 // bits)))]


def codebook_bits(codebooks: torch.Tensor) -> int:
    """The bits of a low-bit context from its codebooks [.., 2**bits]: 2, 3 or 4."""
    bits = int(codebooks.shape[-1]).bit_length() - 1
    if codebooks.shape[-1] != 1 << bits or bits not in (2, 3, 4):
        raise ValueError(f"sqz: codebooks of {codebooks.shape[-1]} levels: expected 2**bits for 2, 3 or 4 bits")
    return bits


def packed_words(d: int, bits: int) -> int:
    """int32 words per row of d codes (all planes)."""
    return sum(w for _, _, w in planes(d, bits))


def unpack(words: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """int32 words [..., W] -> codes [..., d] int64 (inverse of `pack`): in each plane of b bits,
    code c's bits sit at (c % (32 // b)) * b of the plane's word c // (32 // b)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    codes = torch.zeros((*words.shape[:-1], d), dtype=torch.int64, device=words.device)
    start = 0
    for b, low, n in planes(d, bits):
        shifts = torch.arange(32 // b, device=words.device, dtype=torch.int64) * b
        part = (w[..., start:start + n].unsqueeze(-1) >> shifts) & ((1 << b) - 1)
        codes |= part.reshape(*words.shape[:-1], -1)[..., :d] << low
        start += n
    return codes


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def dequantize_rows(q: tuple, bits: int, d: int, per_channel: bool) -> torch.Tensor:
    """float64 [.., N, D] from (packed, codebook, norm, outlier_idx, outlier_val) of any leading
    dims (a layer, or all layers): codebook[code] * scale + offset, outliers put back."""
    packed, cb, norm, oidx, oval = q
    codes = unpack(packed, bits, d)
    lead = packed.dim() - 3  # leading dims before [H, N, words]
    cbv = cb.double().reshape(*cb.shape[:lead], 1, 1, cb.shape[-1])
    y = torch.gather(cbv.expand(*codes.shape[:-1], cb.shape[-1]), -1, codes)
    n = norm.double()
    if per_channel:
        x = y * n[..., 0:1, :] + n[..., 1:2, :]
    else:
        x = y * n[..., 0:1] + n[..., 1:2]
    if oidx is not None and oidx.shape[-1]:
        x = x.scatter(-1, oidx.long(), oval.double())
    return x


def dequantize_context(keys: torch.Tensor, values: torch.Tensor, perm: torch.Tensor, rope: torch.Tensor,
                       codebooks: torch.Tensor, key_norm: torch.Tensor, value_norm: torch.Tensor,
                       outlier_idx: torch.Tensor | None, outlier_val: torch.Tensor | None,
                       head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 post-RoPE keys and values [.., H, N, D] of a low-bit context (one layer's op
    arguments, or all layers stacked): the kernels' arithmetic, as the reference."""
    bits = codebook_bits(codebooks)
    d = int(head_dim)
    oi = [None, None] if outlier_idx is None else [outlier_idx[..., 0, :], outlier_idx[..., 1, :]]
    ov = [None, None] if outlier_val is None else [outlier_val[..., 0, :], outlier_val[..., 1, :]]
    k = dequantize_rows((keys, codebooks[..., 0, :], key_norm, oi[0], ov[0]), bits, d, True)
    v = dequantize_rows((values, codebooks[..., 1, :], value_norm, oi[1], ov[1]), bits, d, False)
    r = rope.double()
    inv, mscale, length = r[..., :d].float(), r[..., d:d + 1], r[..., d + 1:d + 2]
    rel = (perm.to(torch.float64) - length.unsqueeze(-1)).float()        # [.., H, N]
    ang = (rel.unsqueeze(-1) * inv.reshape(*inv.shape[:-1], 1, 1, d)).double()
    ms = mscale.reshape(*mscale.shape[:-1], 1, 1, 1)
    return apply_rope(k, ang.cos() * ms, ang.sin() * ms), v
