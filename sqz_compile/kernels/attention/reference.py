"""Squeezed attention: exact softmax attention over the selected context clusters, the
observation window and the new tokens.

For query row i of the new tokens (GQA: query head hq reads KV head hq // (Hq // H)):
    keys = {sorted context keys of the clusters selected for i's (batch row, KV head, block)}
         U {the W window keys}  U  {new keys j allowed by the model's mask}
    out_i = softmax(scale * q_i . keys) @ values        (exact, over that set)
The context and window are fully visible to every new token; the new tokens' own keys follow the
model's mask exactly as F.scaled_dot_product_attention would (bool: True attends; float: added;
is_causal: upper-left causal, as SDPA), so the op is a drop-in for the SDPA call it replaces.
"""
from __future__ import annotations

import torch

from ..lookup.reference import cluster_of, cluster_sizes


def key_cluster_ids(offsets: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[H, C+1] offsets -> [H, N] cluster index of each sorted key."""
    return cluster_of(offsets, num_keys)


def selection_from_compact(idx: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Compact selection (idx [B,H,NB,C] padded with -1) -> bool [B, H, NB, C]."""
    # Padding entries (-1) go to a spare slot C that is dropped again.
    slot = torch.where(idx >= 0, idx, torch.full_like(idx, num_clusters)).long()
    sel = torch.zeros((*idx.shape[:-1], num_clusters + 1), dtype=torch.bool, device=idx.device)
    return sel.scatter(-1, slot, torch.ones_like(slot, dtype=torch.bool))[..., :num_clusters]


def selected_key_mask(offsets: torch.Tensor, sel: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Kept clusters (bool [B, H, NB, C]) -> bool [B, H, NB, N] over the sorted keys."""
    c = offsets.shape[-1] - 1
    cid = key_cluster_ids(offsets, num_keys).clamp(max=c - 1)  # [H, N]
    b, h, nb, _ = sel.shape
    return torch.gather(sel, 3, cid.long()[None, :, None, :].expand(b, h, nb, num_keys))


def new_token_bias(attn_mask: torch.Tensor | None, is_causal: bool, m: int, s: int,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The model's mask over the new keys as an additive bias broadcastable to [B, Hq, M, S]."""
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            zero = torch.zeros((), dtype=dtype, device=device)
            return torch.where(attn_mask, zero, torch.full_like(zero, float("-inf")))
        return attn_mask.to(dtype)
    if is_causal:
        allowed = torch.ones(m, s, dtype=torch.bool, device=device).tril()
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(allowed, zero, torch.full_like(zero, float("-inf")))
    return None


def rest_logits(q: torch.Tensor, k_new: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
                window_keys: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the keys every query attends besides the context clusters: the window
    [B, H, G, M, W] and the new keys under the model's mask [B, H, G, M, S], in float32 (float64
    for float64 q)."""
    b, hq, m, d = q.shape
    h, s = k_new.shape[1], k_new.shape[2]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(work).reshape(b, h, hq // h, m, d)
    sc_win = torch.einsum("bhgmd,hwd->bhgmw", qg, window_keys.to(work)) * scale
    sc_new = torch.einsum("bhgmd,bhsd->bhgms", qg, k_new.to(work)) * scale
    bias = new_token_bias(attn_mask, is_causal, m, s, work, q.device)
    if bias is not None:
        sc_new = sc_new + torch.broadcast_to(bias, (b, hq, m, s)).reshape(b, h, hq // h, m, s)
    return sc_win, sc_new


def log_partition_rest(q: torch.Tensor, k_new: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
                       window_keys: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, H, G, M] log of sum exp over the window and new keys' logits (rest_logits): the part of
    each query's partition the certified selection knows exactly."""
    return torch.logsumexp(torch.cat(rest_logits(q, k_new, attn_mask, is_causal, window_keys, scale), -1), -1)


def squeezed_attention_reference(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    attn_mask: torch.Tensor | None,
    ctx_keys: torch.Tensor,
    ctx_values: torch.Tensor,
    offsets: torch.Tensor,
    sel: torch.Tensor,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    scale: float,
    is_causal: bool,
    block_q: int,
) -> torch.Tensor:
    """Plain-torch squeezed attention. q [B,Hq,M,D]; k_new/v_new [B,H,S,D]; ctx_keys/values
    [H,N,D]; window_keys/values [H,W,D]. Computes in float32 (float64 for float64 inputs) with
    static shapes only, so it traces to aten ops for export and AOTInductor."""
    b, hq, m, d = q.shape
    h, n, _ = ctx_keys.shape
    g = hq // h
    s = k_new.shape[2]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(work).reshape(b, h, g, m, d)

    sc_ctx = torch.einsum("bhgmd,hnd->bhgmn", qg, ctx_keys.to(work)) * scale
    keymask = selected_key_mask(offsets, sel, n)  # [B, H, NB, N]
    keymask = keymask.repeat_interleave(block_q, dim=2)[:, :, :m]  # [B, H, M, N]
    sc_ctx = sc_ctx.masked_fill(~keymask[:, :, None], float("-inf"))

    sc_win, sc_new = rest_logits(q, k_new, attn_mask, is_causal, window_keys, scale)
    p = torch.softmax(torch.cat([sc_ctx, sc_win, sc_new], dim=-1), dim=-1)
    w = window_keys.shape[1]
    out = (torch.einsum("bhgmn,hnd->bhgmd", p[..., :n], ctx_values.to(work))
           + torch.einsum("bhgmw,hwd->bhgmd", p[..., n:n + w], window_values.to(work))
           + torch.einsum("bhgms,bhsd->bhgmd", p[..., n + w:], v_new.to(work)))
    return out.reshape(b, hq, m, d).to(q.dtype)


__all__ = ["squeezed_attention_reference", "selection_from_compact", "selected_key_mask",
           "key_cluster_ids", "new_token_bias", "cluster_sizes", "rest_logits", "log_partition_rest"]
