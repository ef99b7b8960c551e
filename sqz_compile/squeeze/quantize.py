"""Low-bit storage of the clustered context K/V (KVQuant, arXiv 2401.18079).

The fixed context is known offline, so its clustered K/V can be stored in 4, 3 or 2 bits:

- keys are quantized **pre-RoPE** (RoPE mixes channel pairs and smears the per-channel outlier
  structure) **per channel** (a scale and offset per (layer, KV head, channel) over the tokens);
  the kernels re-apply RoPE at each key's position after dequantizing;
- values are quantized **per token** (a float16 scale and offset per (layer, KV head, token));
- each quantity is first normalised to [-1, 1] by its (max + min) / 2 offset and (max - min) / 2
  scale, then rounded to the nearest entry of a 2**bits codebook in [-1, 1]: "int" is the uniform
  grid, "nuq" a per-layer codebook fitted by 1-D k-means over the normalised entries, each weighted
  by the attention the observation window gives its token (plus a uniform floor of 1/L, since later
  queries look elsewhere);
- dense-and-sparse: per key/value row the E = round(kv_outliers * D) entries farthest from their
  channel (keys) or row (values) statistics stay in float16 in a side table (channel index, value),
  and do not stretch the normalisation range. A fixed count per row keeps the side table in the
  cluster-sorted layout, so a selected cluster's outliers are one contiguous range too;
- sensitivity (keys, when the observation window's queries are given): a key's rounding error
  moves its scores by q . R_p dk, so channel d of the key at position p weighs E[(R_p^T q)_d^2]
  over the window's queries (`key_sensitivity`): the few slow-rotating channels that carry most
  of the queries' energy dominate. The codebook fit weighs each entry by it too, and each row's
  E outliers are then re-picked as the entries whose rounding costs the most score error
  (sensitivity x squared error), with the range and codebook fitted again without them.

Packing: the codes of one row go into int32 words, v = 32 // bits codes per word (4 bits: 8,
2 bits: 16), code d at bits (d % v) * bits of word d // v. 3 bits: two bit planes one after
the other, the low two bits of every code (16 per word) then the high bits (32 per word): 3 bits
per value, and each rotate_half half of a 64- or 128-channel row is whole words of each plane, so
the kernels unpack 3-bit rows by shifts as they do 2- and 4-bit ones (format 5; format 4 packed
10 codes per word, and its 3-bit files are refused).

`python -m sqz_compile.squeeze.quantize` prints the context size at Llama-3-8B shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..kernels.quant.reference import (apply_rope, dequantize_context, dequantize_rows,  # noqa: F401
                                      packed_words, planes, rotate_half, unpack)

from ..config import KV_BITS

# entries of one normalised dimension sampled for the nuq codebook fit (per layer)
_FIT_SAMPLES = 1 << 20


def outliers_per_row(d: int, fraction: float) -> int:
    """E: float16 entries kept per row of d (0 when fraction is 0)."""
    return 0 if fraction <= 0 else max(1, round(fraction * d))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [..., D] in [0, 2**bits) -> int32 words [..., packed_words(D, bits)], plane by plane
    (kernels/quant/reference.py `planes`)."""
    d = codes.shape[-1]
    c = codes.to(torch.int64)
    out = []
    for b, low, words in planes(d, bits):
        vpw = 32 // b
        padded = torch.zeros((*codes.shape[:-1], words * vpw), dtype=torch.int64, device=codes.device)
        padded[..., :d] = (c >> low) & ((1 << b) - 1)
        shifts = torch.arange(vpw, device=codes.device, dtype=torch.int64) * b
        w = (padded.reshape(*codes.shape[:-1], words, vpw) << shifts).sum(-1)
        out.append(torch.where(w >= 2 ** 31, w - 2 ** 32, w))  # the same 32 bits as int32
    return torch.cat(out, dim=-1).to(torch.int32)


# --------------------------------------------------------------------------- RoPE

@dataclass(frozen=True)
class RopeTable:
    """The model's rotary embedding as the kernels recompute it: angle(p, d) = float32(p) *
    inv_freq[d % (D/2)] in float32 (as transformers does), cos/sin of it times attention_scaling,
    rotate_half pairing (d, d + D/2)."""

    inv_freq: torch.Tensor  # [D/2] float32
    attention_scaling: float = 1.0

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] (int) -> cos, sin [..., D] float64."""
        f = self.inv_freq.to(positions.device, torch.float32)
        ang = (positions.to(torch.float32)[..., None] * torch.cat([f, f]))  # float32 product, as the model
        ang = ang.double()
        return ang.cos() * self.attention_scaling, ang.sin() * self.attention_scaling

    def as_row(self, context_length: int) -> torch.Tensor:
        """[D + 2] float32: inv_freq for each channel, attention_scaling, context length (the op's
        `rope` argument: a key at context position p gets angle (p - L) * inv_freq)."""
        f = self.inv_freq.float().cpu()
        return torch.cat([f, f, torch.tensor([float(self.attention_scaling), float(context_length)])])


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys from post-RoPE x (float64): the inverse rotation, divided by the squared
    attention scaling that cos and sin carry."""
    m2 = cos * cos + sin * sin
    return (x.double() * cos - rotate_half(x.double()) * sin) / m2


def rope_from_model(model: torch.nn.Module, context_length: int, head_dim: int) -> RopeTable:
    """The model's rotary embedding as a RopeTable, checked against the cos/sin the model itself
    computes at the context's positions (-L .. -1). Raises UnsupportedModelError when it cannot
    be read or does not match (partial rotary, interleaved pairs, position-dependent scaling)."""
    from ..transformers_compat import UnsupportedModelError

    mod = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
    inv = getattr(mod, "inv_freq", None)
    fix = "squeeze it with SqueezeConfig(kv_bits=16)"
    if not isinstance(inv, torch.Tensor) or inv.dim() != 1 or 2 * inv.numel() != head_dim:
        raise UnsupportedModelError(
            f"low-bit keys are stored pre-RoPE, but the model's rotary embedding (inv_freq of "
            f"{None if inv is None else tuple(inv.shape)}, head dim {head_dim}) is not a plain "
            f"rotate_half RoPE over the whole head: {fix}")
    table = RopeTable(inv.detach().float().cpu(), float(getattr(mod, "attention_scaling", 1.0)))
    L = int(context_length)
    pos = torch.unique(torch.cat([torch.arange(-min(L, 64), 0), torch.linspace(-L, -1, 64).long()]))
    dev = inv.device
    with torch.no_grad():
        cos, sin = mod(torch.zeros(1, dtype=torch.float32, device=dev), pos[None].to(dev))
    want_cos, want_sin = table.cos_sin(pos)
    err = max(float((cos[0].double().cpu() - want_cos).abs().max()),
              float((sin[0].double().cpu() - want_sin).abs().max()))
    if cos.shape[-1] != head_dim or err > 1e-4:
        raise UnsupportedModelError(
            f"low-bit keys are stored pre-RoPE and re-rotated in the kernels, but the model's rotary "
            f"embedding differs from the table read from it (max |cos/sin| difference {err:.2g}): {fix}")
    return table


# --------------------------------------------------------------------------- quantization

@dataclass
class QuantizedKV:
    """One (K or V) quantized tensor set, stacked over layers (see context.py for the shapes)."""

    packed: torch.Tensor        # [layers, H, N, words] int32
    codebook: torch.Tensor      # [layers, 2**bits] float32, in [-1, 1] (Q-Norm: may pass it a little)
    norm: torch.Tensor          # keys: [layers, H, 2, D] float32 (scale, offset per channel);
                                # values: [layers, H, N, 2] float16 (scale, offset per token)
    outlier_idx: torch.Tensor   # [layers, H, N, E] int16 channel
    outlier_val: torch.Tensor   # [layers, H, N, E] float16


def _outliers(x: torch.Tensor, dim: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x [.., N, D], the e entries farthest (in standard deviations) from their
    channel's (dim=-2) or row's (dim=-1) mean: (idx [.., N, e] int64, mask [.., N, D] bool)."""
    mask = torch.zeros_like(x, dtype=torch.bool)
    if e == 0:
        return torch.zeros((*x.shape[:-1], 0), dtype=torch.long, device=x.device), mask
    z = (x - x.mean(dim, keepdim=True)).abs() / x.std(dim, keepdim=True).clamp_min(1e-12)
    idx = z.topk(e, dim=-1).indices.sort(-1).values
    return idx, mask.scatter_(-1, idx, True)


def _normalise(x: torch.Tensor, keep: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) over dim from the entries of x where keep: x -> (x - offset) / scale in [-1, 1]."""
    hi = torch.where(keep, x, torch.full_like(x, -math.inf)).amax(dim, keepdim=True)
    lo = torch.where(keep, x, torch.full_like(x, math.inf)).amin(dim, keepdim=True)
    none = ~torch.isfinite(hi)
    hi, lo = torch.where(none, 0.0, hi), torch.where(none, 0.0, lo)
    # at least float16's smallest normal: value scales are stored in float16, and a constant row
    # (hi == lo) must dequantize to its offset, not divide by a scale rounded to 0
    return ((hi - lo) / 2).clamp_min(2.0 ** -14), (hi + lo) / 2


def fit_codebook(y: torch.Tensor, w: torch.Tensor, bits: int, datatype: str, iters: int = 30,
                 seed: int = 0) -> torch.Tensor:
    """2**bits sorted levels in [-1, 1] float32: the uniform grid ("int") or the weighted 1-D
    k-means of normalised entries y with weights w ("nuq", on a sample of at most 2**20)."""
    k = 1 << bits
    grid = torch.linspace(-1, 1, k, dtype=torch.float64, device=y.device)
    if datatype == "int":
        return grid.float()
    y, w = y.reshape(-1).double(), w.reshape(-1).double()
    if y.numel() > _FIT_SAMPLES:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        pick = torch.randint(0, y.numel(), (_FIT_SAMPLES,), generator=gen).to(y.device)
        y, w = y[pick], w[pick]
    cb = grid.clone()
    for _ in range(iters):
        a = assign(y, cb)
        num = torch.zeros(k, dtype=torch.float64, device=y.device).index_add_(0, a, w * y)
        den = torch.zeros(k, dtype=torch.float64, device=y.device).index_add_(0, a, w)
        new = torch.where(den > 0, num / den.clamp_min(1e-300), cb).clamp(-1, 1).sort().values
        if torch.equal(new, cb):
            break
        cb = new
    return cb.float()


def assign(y: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (codebook sorted ascending) for every entry of y."""
    cb = codebook.to(y.device, torch.float64)
    mid = (cb[1:] + cb[:-1]) / 2
    return torch.bucketize(y.double().contiguous(), mid.contiguous())


def qnorm_codebook(y: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Q-Norm: `codebook` moved and scaled (an increasing affine map, so still sorted) so that the
    levels the entries y got (`codes`) have y's mean and standard deviation."""
    cb = codebook.double()
    y, yh = y.double(), cb[codes]
    spread = yh.std(unbiased=False)
    if y.numel() < 2 or spread <= 0:
        return codebook
    return ((cb - yh.mean()) * (y.std(unbiased=False) / spread) + y.mean()).to(codebook.dtype)


def _fit_rows(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, bits: int, datatype: str,
              per_channel: bool, seed: int):
    """Normalisation and codebook of one layer's x [H, N, D] without the entries in mask:
    (scale, offset, y = normalised x, codebook, codes)."""
    dim = -2 if per_channel else -1
    scale, offset = _normalise(x, ~mask, dim)
    if not per_channel:  # stored in float16: normalise with the rounded numbers
        scale, offset = scale.half().double(), offset.half().double()
    y = ((x - offset) / scale).clamp(-1, 1)
    cb = fit_codebook(y[~mask], w[~mask], bits, datatype, seed=seed)
    return scale, offset, y, cb, assign(y, cb)


def quantize_rows(x: torch.Tensor, weights: torch.Tensor, bits: int, datatype: str, outliers: float,
                  per_channel: bool, seed: int = 0, qnorm: bool = False,
                  sensitivity: Callable[[int], torch.Tensor] | None = None) -> QuantizedKV:
    """Quantize x [layers, H, N, D] (keys already pre-RoPE): per channel (over N) when
    per_channel, else per token; weights [layers, H, N] weigh each token in the nuq fit;
    qnorm: each layer's codebook corrected by qnorm_codebook over its non-outlier entries;
    sensitivity(i) -> [H, N, D]: what an error in each entry of layer i costs (it multiplies the
    fit's weights, and each row's outliers are re-picked as its costliest rounding errors)."""
    layers, H, N, D = x.shape
    e = outliers_per_row(D, outliers)
    dim = -2 if per_channel else -1
    packed = torch.empty(layers, H, N, packed_words(D, bits), dtype=torch.int32, device=x.device)
    cbs = torch.empty(layers, 1 << bits, dtype=torch.float32, device=x.device)
    norm_shape = (layers, H, 2, D) if per_channel else (layers, H, N, 2)
    norm = torch.empty(norm_shape, dtype=torch.float32 if per_channel else torch.float16, device=x.device)
    oidx = torch.empty(layers, H, N, e, dtype=torch.int16, device=x.device)
    oval = torch.empty(layers, H, N, e, dtype=torch.float16, device=x.device)
    for i in range(layers):  # one layer at a time: float64 scratch of one layer only
        xi = x[i].double()
        idx, mask = _outliers(xi, dim, e)
        wi = weights[i].double()[..., None].expand_as(xi)
        s = None
        if sensitivity is not None:
            s = sensitivity(i).to(xi.device, torch.float64)
            s = s + 1e-3 * s.mean() + 1e-300  # no entry weighs nothing in the fit
            wi = wi * s
        scale, offset, y, cb, codes = _fit_rows(xi, wi, mask, bits, datatype, per_channel, seed + i)
        if s is not None and e:
            cost = s * (xi - (cb.double()[codes] * scale + offset)).square()
            idx = cost.topk(e, dim=-1).indices.sort(-1).values
            mask = torch.zeros_like(mask).scatter_(-1, idx, True)
            scale, offset, y, cb, codes = _fit_rows(xi, wi, mask, bits, datatype, per_channel, seed + i)
        packed[i] = pack(codes, bits)
        cbs[i] = qnorm_codebook(y[~mask], codes[~mask], cb) if qnorm else cb
        if per_channel:
            norm[i] = torch.cat([scale, offset], dim=-2).float()
        else:
            norm[i] = torch.cat([scale, offset], dim=-1).half()
        oidx[i] = idx.to(torch.int16)
        oval[i] = xi.gather(-1, idx).half()
    return QuantizedKV(packed, cbs, norm, oidx, oval)


def query_moments(window_queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[layers, H, D, D] float64: E[q q^T] over the (post-RoPE) window queries of each KV head's
    query-head group."""
    layers, Hq, W, D = window_queries.shape
    q = window_queries.double().reshape(layers, kv_heads, (Hq // kv_heads) * W, D)
    return q.transpose(-1, -2) @ q / q.shape[2]


def key_sensitivity(moments: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[H, N, D]: E[(R_p^T q)_d^2] for the pre-RoPE key channel d at each key's rotation R_p
    (cos, sin [H, N, D] as RopeTable.cos_sin gives them), from moments [H, D, D] = E[q q^T].
    Column d of R_p is cos_d e_d + sin_d e_(d+D/2) in the first half and cos_d e_d - sin_d
    e_(d-D/2) in the second (rotate_half), so the diagonal of R_p^T M R_p needs only M's diagonal
    and the (d, d +- D/2) entries."""
    D = moments.shape[-1]
    h = D // 2
    diag = moments.diagonal(dim1=-2, dim2=-1)                              # [H, D]
    cross = torch.cat([moments[:, torch.arange(h), torch.arange(h) + h]] * 2, dim=-1)
    sign = torch.cat([torch.ones(h), -torch.ones(h)]).to(moments)
    partner = diag.roll(h, dims=-1)
    c, s = cos.double(), sin.double()
    return (c * c * diag[:, None] + s * s * partner[:, None] + 2 * c * s * (sign * cross)[:, None]).clamp_min(0)


def low_bit_fields(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor,
                   context_length: int, rope: RopeTable, config,
                   window_queries: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
    """The SqueezedContext fields of a low-bit context from its sorted post-RoPE keys and values
    [layers, H, N, D], their context positions [layers, H, N] and token weights; window_queries
    [layers, Hq, W, D] (post-RoPE): what weighs the keys' channels (None: all alike)."""
    bits, dt, frac = int(config.kv_bits), config.kv_datatype, float(config.kv_outliers)
    layers, H, N, D = keys.shape
    # float32 scratch (quantize_rows works in float64 one layer at a time): 17 GB, not 34, at 128K
    # tokens of Llama-3-8B shapes
    pre = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
    for i in range(layers):  # pre-RoPE keys: undo the rotation at each key's position p - L
        cos, sin = rope.cos_sin(positions[i].long() - context_length)
        pre[i] = invert_rope(keys[i], cos, sin)
    sensitivity = None
    if window_queries is not None:
        moments = query_moments(window_queries.to(keys.device), H)

        def sensitivity(i: int) -> torch.Tensor:
            return key_sensitivity(moments[i], *rope.cos_sin(positions[i].long() - context_length))
    qnorm = bool(getattr(config, "kv_qnorm", False))
    qk = quantize_rows(pre, weights, bits, dt, frac, per_channel=True, seed=config.seed, qnorm=qnorm,
                       sensitivity=sensitivity)
    del pre
    qv = quantize_rows(values, weights, bits, dt, frac, per_channel=False, seed=config.seed + 1, qnorm=qnorm)
    codebooks = torch.stack([qk.codebook, qv.codebook], dim=1)
    problem = fp16_range_problem(codebooks, qk.norm, qv.norm)
    if problem:
        raise ValueError(f"sqz: {problem}")
    e = qk.outlier_idx.shape[-1]
    return {
        "keys": qk.packed, "values": qv.packed,
        "rope": rope.as_row(context_length).to(keys.device).expand(layers, D + 2).contiguous(),
        "codebooks": codebooks,
        "key_norm": qk.norm, "value_norm": qv.norm,
        "outlier_idx": torch.stack([qk.outlier_idx, qv.outlier_idx], dim=3) if e else None,
        "outlier_val": torch.stack([qk.outlier_val, qv.outlier_val], dim=3) if e else None,
    }


FP16_MAX = 65504.0


def fp16_range_problem(codebooks: torch.Tensor, key_norm: torch.Tensor, value_norm: torch.Tensor) -> str | None:
    """What is wrong, if a low-bit context's dequantized entries could leave float16's range (the
    kernels may hold levels, scales, offsets and rotated keys in fp16; outliers and value scales are
    stored in float16 already), else None. Bounds from codebooks [layers, 2, G], key_norm [layers,
    H, 2, D] and value_norm [layers, H, N, 2]: |scale| * max |level| + |offset| per key channel
    (times sqrt(2) for the rotation) and per value row."""
    lev = codebooks.abs().amax(-1).float()  # [layers, 2]
    kb = vb = 0.0
    for i in range(lev.shape[0]):  # a layer at a time: value_norm holds every context token
        kn, vn = key_norm[i].float(), value_norm[i].float()
        if kn.numel():
            kb = max(kb, float((kn[:, 0].abs() * lev[i, 0] + kn[:, 1].abs()).amax()) * 2 ** 0.5)
        if vn.numel():
            vb = max(vb, float((vn[..., 0].abs() * lev[i, 1] + vn[..., 1].abs()).amax()))
    for what, bound in (("keys", kb), ("values", vb)):
        if not bound < FP16_MAX:
            return (f"this context's {what} reach {bound:.4g} once dequantized, past float16's {FP16_MAX:g}, "
                    "which the low-bit kernels compute in; keep it at kv_bits=16")
    return None


def token_weights(keys: torch.Tensor, window_queries: torch.Tensor, scaling: float,
                  positions: torch.Tensor) -> torch.Tensor:
    """[layers, H, n] float32: mean attention probability the observation window's queries (all
    heads of the group) give the tokens at `positions` [layers, H, n], plus 1/L."""
    from .capture import window_probs

    layers, H, L, _ = keys.shape
    g = window_queries.shape[1] // H
    out = torch.empty(positions.shape, dtype=torch.float32, device=keys.device)
    for i in range(layers):
        for h in range(H):
            p = window_probs(window_queries[i, h * g:(h + 1) * g], keys[i, h], scaling).mean((0, 1))
            out[i, h] = p[positions[i, h].long()] + 1.0 / L
    return out


# --------------------------------------------------------------------------- sizes

def context_bytes(context_length: int, layers: int, kv_heads: int, head_dim: int, q_heads: int, kv_bits: int = 16,
                  outliers: float = 0.01, cluster_ratio: float = 0.05, cluster_variance: bool = True,
                  window: int = 100, dense_tokens: int = 16, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes of a SqueezedContext file's tensors by part (default SqueezeConfig otherwise)."""
    L, H, D = int(context_length), int(kv_heads), int(head_dim)
    a = min(L - 1, window + dense_tokens)
    n = L - a
    c = min(max(round(cluster_ratio * n), 1), n)
    lh = layers * H
    parts = {
        "window": 2 * lh * a * D * dtype_bytes + lh * a * 4 + layers * q_heads * window * D * 4,
        "clusters": lh * c * D * 4 * (2 if cluster_variance else 1) + lh * (c + 1) * 4 + lh * c * 4,
        "perm": lh * n * 4,
    }
    if kv_bits >= 16:
        parts["kv"] = 2 * lh * n * D * dtype_bytes
    else:
        e = outliers_per_row(D, outliers)
        parts["kv"] = 2 * lh * n * packed_words(D, kv_bits) * 4
        parts["scales"] = lh * 2 * D * 4 + lh * n * 2 * 2 + layers * 2 * (1 << kv_bits) * 4 + layers * (D + 2) * 4
        parts["outliers"] = 2 * lh * n * e * (2 + 2)
    parts["total"] = sum(parts.values())
    return parts


LLAMA3_8B = dict(layers=32, kv_heads=8, head_dim=128, q_heads=32)


def size_table(context_length: int = 131072, shape: dict[str, Any] | None = None,
               outliers: float = 0.01) -> list[dict[str, Any]]:
    """Rows {kv_bits, MB, kv_MB, vs_16}: the context file size at `shape` (Llama-3-8B by default)."""
    shape = shape or LLAMA3_8B
    base = context_bytes(context_length, **shape)["total"]
    rows = []
    for bits in KV_BITS:
        p = context_bytes(context_length, **shape, kv_bits=bits, outliers=outliers)
        rows.append({"kv_bits": bits, "MB": round(p["total"] / 1e6), "kv_MB": round(p["kv"] / 1e6),
                     "vs_16": round(p["total"] / base, 3)})
    return rows


def main() -> None:
    print("SqueezedContext size, 131072-token context at Llama-3-8B shapes "
          "(32 layers, 8 KV heads, head dim 128), 1% outliers, default SqueezeConfig:")
    print(f"{'kv_bits':>7} {'MB':>8} {'K/V MB':>8} {'vs 16':>6}")
    for r in size_table():
        print(f"{r['kv_bits']:>7} {r['MB']:>8,} {r['kv_MB']:>8,} {r['vs_16']:>6}")


if __name__ == "__main__":
    main()
