"""The oracle at the same sparsity and the lookup's recall against it (definitions in
sqz_compile.eval's docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..context import SqueezedContext
from ..kernels.attention.reference import rest_logits, selected_key_mask
from ..kernels.lookup.reference import block_max, certified_selection, selection_mask_reference


# --------------------------------------------------------------------------- oracle and recall

def top_count_mask(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool mask of the `counts[...]` highest entries of score [..., N] (ties: lower index first)."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(score.shape[-1], device=score.device)
                                             .expand_as(order).contiguous())
    return ranks < counts.unsqueeze(-1)


class LayerStats:
    """Per-layer sums over every attention call made while recording (see the module docstring)."""

    FIELDS = ("rows", "mass_total", "mass_lookup", "mass_oracle", "blocks", "keys_total",
              "keys_lookup", "keys_overlap", "decode_keys_total", "decode_keys_lookup")

    def __init__(self, num_layers: int) -> None:
        self.sums = torch.zeros(num_layers, len(self.FIELDS), dtype=torch.float64)

    def add(self, layer: int, **values: float) -> None:
        for k, v in values.items():
            self.sums[layer, self.FIELDS.index(k)] += float(v)

    def merge(self, other: "LayerStats") -> None:
        self.sums += other.sums

    def to_json(self) -> dict[str, list[float]]:
        return {f: self.sums[:, i].tolist() for i, f in enumerate(self.FIELDS)}

    @staticmethod
    def metrics(sums: dict[str, Sequence[float]]) -> dict[str, list[float]]:
        """Per-layer recall metrics from summed fields (NaN where nothing was recorded)."""
        def ratio(a: str, b: str) -> list[float]:
            return [x / y if y else float("nan") for x, y in zip(sums[a], sums[b])]

        def lost(a: str) -> list[float]:
            return [(t - x) / r if r else float("nan")
                    for t, x, r in zip(sums["mass_total"], sums[a], sums["rows"])]

        return {"mass_recall": ratio("mass_lookup", "mass_oracle"),
                "key_recall": ratio("keys_overlap", "keys_lookup"),
                "kept_fraction": ratio("keys_lookup", "keys_total"),
                "kept_decode": ratio("decode_keys_lookup", "decode_keys_total"),
                "lost_mass_lookup": lost("mass_lookup"), "lost_mass_oracle": lost("mass_oracle"),
                "clustered_mass": ratio("mass_total", "rows")}


@dataclass
class _Analysis:
    p_ctx: torch.Tensor     # [B, H, G, M, N] dense probability of each clustered key
    lookup: torch.Tensor    # [B, H, NB, N] keys the lookup keeps
    oracle: torch.Tensor    # [B, H, NB, N] same count per block, highest p


def analyse_selection(q: torch.Tensor, k_new: torch.Tensor, attn_mask: torch.Tensor | None,
                      is_causal: bool, ctx: SqueezedContext, layer: int, scale: float,
                      block_q: int) -> _Analysis:
    """Dense probabilities of the clustered keys, the lookup's key selection (the reference rule,
    as the op applies it) and the oracle selection of the same size, for one layer's call."""
    lc = ctx.layer(layer)
    keys = ctx.dense_kv(layer)[0]
    b, hq, m, d = q.shape
    h, n, _ = keys.shape
    g = hq // h
    qg = q.float().reshape(b, h, g, m, d)
    sc_ctx = torch.einsum("bhgmd,hnd->bhgmn", qg, keys.float()) * scale
    sc_win, sc_new = rest_logits(q, k_new, attn_mask, is_causal, lc.window_keys, scale)
    lse = torch.logsumexp(torch.cat([sc_ctx, sc_win, sc_new], dim=-1), dim=-1, keepdim=True)
    p_ctx = torch.exp(sc_ctx - lse)
    eps = ctx.layer_max_dropped_mass(layer)
    if eps > 0:
        log_rest = torch.logsumexp(torch.cat([sc_win, sc_new], -1), -1)
        sel = certified_selection(q, lc.centroids, lc.offsets, lc.radii, scale, block_q, eps, log_rest)
    else:
        sel = selection_mask_reference(q, lc.centroids, lc.offsets, lc.log_threshold, scale, block_q,
                                       ctx.layer_budget(layer), lc.coarse_centroids, lc.coarse_offsets,
                                       lc.coarse_log_threshold)
    lookup = selected_key_mask(lc.offsets, sel, n)
    oracle = top_count_mask(block_max(p_ctx, block_q), lookup.sum(-1))
    return _Analysis(p_ctx, lookup, oracle)


def record_stats(stats: LayerStats, layer: int, a: _Analysis, block_q: int) -> None:
    """Add one call's masses and key counts to `stats`; a decode call (one query token) counts
    its keys apart, so the report shows what is kept per decode token and per prefill block."""
    m = a.p_ctx.shape[3]
    if m == 1:
        stats.add(layer, decode_keys_total=a.lookup.numel(), decode_keys_lookup=a.lookup.sum())
        return
    rows = lambda k: k.repeat_interleave(block_q, dim=2)[:, :, :m].unsqueeze(2)  # noqa: E731
    stats.add(layer,
              rows=a.p_ctx[..., 0].numel(),
              mass_total=a.p_ctx.sum(),
              mass_lookup=(a.p_ctx * rows(a.lookup)).sum(),
              mass_oracle=(a.p_ctx * rows(a.oracle)).sum(),
              blocks=a.lookup[..., 0].numel(),
              keys_total=a.lookup.numel(),
              keys_lookup=a.lookup.sum(),
              keys_overlap=(a.lookup & a.oracle).sum())


def per_key_offsets(ctx: SqueezedContext, layer: int) -> torch.Tensor:
    """[H, N+1] offsets that make every sorted key its own cluster (key-level masks)."""
    h, n = ctx.keys.shape[1], ctx.keys.shape[2]
    return torch.arange(n + 1, dtype=torch.int32, device=ctx.keys.device).expand(h, n + 1).contiguous()
