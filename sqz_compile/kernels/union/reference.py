"""The union list of a decode batch that shares one context (plain torch, the rule the kernels in
union/triton.py follow).

Decode rows b = 0..B-1 are cut into groups of R consecutive rows (row b is bit b % R of group
b // R). Per (group, KV head) the union list holds, in ascending cluster order, every non-empty
cluster that at least one row of the group keeps, with
    cum[j]   keys of the slots before j (slots past the count hold the total),
    delta[j] cluster start - cum[j]   (a union key v of slot j sits at sorted position v + delta[j]),
    word[j]  the bits of the group's rows that keep the slot's cluster (0 past the count),
    nkeys    the union's keys.
`union_positions_reference` expands it per key (the position list the attention loop reads).
This is the per-row lookup's cluster list (lookup/triton.py `_compact_kernel`) for the union of the
rows' selections, plus one word per slot that tells the attention kernel which rows may see it.
"""
from __future__ import annotations

import torch


def kept_from_compact(idx: torch.Tensor, count: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Compact selection (idx [B, H, C] ascending, padded with -1; count [B, H]) -> bool [B, H, C]."""
    j = torch.arange(idx.shape[-1], device=idx.device)
    live = j < count[..., None]
    slot = torch.where(live, idx.long(), torch.full_like(idx, num_clusters, dtype=torch.long))
    kept = torch.zeros((*idx.shape[:-1], num_clusters + 1), dtype=torch.bool, device=idx.device)
    return kept.scatter(-1, slot, torch.ones_like(slot, dtype=torch.bool))[..., :num_clusters]


def row_bits_reference(kept: torch.Tensor, rows_per_group: int) -> torch.Tensor:
    """kept [B, H, C] bool -> int64 [NG, H, C]: bit b % R of group b // R set where row b keeps."""
    b, h, c = kept.shape
    r = int(rows_per_group)
    ng = -(-b // r)
    pad = torch.zeros((ng * r - b, h, c), dtype=torch.bool, device=kept.device)
    k = torch.cat([kept, pad]).reshape(ng, r, h, c).long()
    bit = (1 << torch.arange(r, device=kept.device, dtype=torch.long))[None, :, None, None]
    return (k * bit).sum(1)


def union_list_reference(kept: torch.Tensor, offsets: torch.Tensor, rows_per_group: int):
    """kept [B, H, C] bool, offsets [H, C+1] -> (cum [NG*H, C+1], delta [NG*H, C],
    word [NG*H, C] (int64, the rows' bits), nkeys [NG*H]), laid out as the module docstring says."""
    words = row_bits_reference(kept, rows_per_group)  # [NG, H, C]
    ng, h, c = words.shape
    off = offsets.long()
    size = off[:, 1:] - off[:, :-1]
    cum = torch.zeros((ng * h, c + 1), dtype=torch.long)
    delta = torch.zeros((ng * h, c), dtype=torch.long)
    word = torch.zeros((ng * h, c), dtype=torch.long)
    nkeys = torch.zeros(ng * h, dtype=torch.long)
    for gi in range(ng):
        for hh in range(h):
            row = gi * h + hh
            cl = torch.nonzero((words[gi, hh] != 0) & (size[hh] > 0)).flatten().cpu()
            n = size[hh, cl].cpu()
            cs = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)])
            k = len(cl)
            cum[row, :k + 1] = cs
            cum[row, k + 1:] = cs[-1]
            delta[row, :k] = off[hh, cl].cpu() - cs[:-1]
            word[row, :k] = words[gi, hh, cl].cpu()
            nkeys[row] = cs[-1]
    return cum, delta, word, nkeys


def union_positions_reference(kept: torch.Tensor, offsets: torch.Tensor, rows_per_group: int):
    """The union list expanded per key: a list over (group, head) rows of (pos, word) int64
    vectors: the sorted position of each union key, ascending, and its cluster's rows' bits."""
    cum, delta, word, nkeys = union_list_reference(kept, offsets, rows_per_group)
    out = []
    for row in range(cum.shape[0]):
        n = cum[row, 1:] - cum[row, :-1]
        k = int((n > 0).sum())
        v = torch.arange(int(nkeys[row]))
        slot = torch.repeat_interleave(torch.arange(k), n[:k])
        out.append((v + delta[row, slot], word[row, slot]))
    return out
