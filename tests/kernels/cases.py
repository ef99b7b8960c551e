"""Random cluster-sorted contexts and float64 references for the kernel tests (interpreter and GPU)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sqz_compile.kernels.attention.reference import selection_from_compact, squeezed_attention_reference


@dataclass
class Case:
    q: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    attn_mask: Optional[torch.Tensor]
    is_causal: bool
    keys: torch.Tensor
    values: torch.Tensor
    centroids: torch.Tensor
    offsets: torch.Tensor
    window_keys: torch.Tensor
    window_values: torch.Tensor
    coarse_centroids: Optional[torch.Tensor]
    coarse_offsets: Optional[torch.Tensor]
    scale: float


def random_sizes(h: int, c: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """[H, C] cluster sizes summing to n per head, with empty and one-key clusters mixed in."""
    w = torch.rand(h, c, generator=gen) ** 2
    w[:, 0] = 0.0
    sizes = torch.floor(w / w.sum(1, keepdim=True).clamp(min=1e-9) * n).long()
    if c > 2:
        sizes[:, 1] = 1
    if c > 3:
        sizes[:, c // 2] = 0
    sizes[:, -1] += n - sizes.sum(1)
    assert bool((sizes >= 0).all()) and bool((sizes.sum(1) == n).all())
    return sizes


def make_case(b: int = 2, h: int = 2, g: int = 2, m: int = 5, d: int = 16, n: int = 50, c: int = 7,
              w: int = 3, s: Optional[int] = None, mask: str = "causal",
              dtype: torch.dtype = torch.float32, coarse: int = 0, device: str = "cpu",
              seed: int = 0, variance: bool = False) -> Case:
    """A random context of n clustered keys in c clusters (coarse > 0: a coarse level of that many
    clusters), window w, and b x (h*g) heads of m new queries over s new keys. variance: centroids
    hold [mean, per-channel variance] (SqueezeConfig.cluster_variance)."""
    gen = torch.Generator().manual_seed(seed)
    s = m if s is None else s

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dt)

    sizes = random_sizes(h, c, n, gen)
    offsets = torch.zeros(h, c + 1, dtype=torch.int32)
    offsets[:, 1:] = sizes.cumsum(1).to(torch.int32)
    keys, values = rnd(h, n, d), rnd(h, n, d)
    # centroids: the mean of each cluster's keys (random direction for empty clusters)
    cent = rnd(h, c, d, dt=torch.float32)
    for hh in range(h):
        for cc in range(c):
            lo, hi = int(offsets[hh, cc]), int(offsets[hh, cc + 1])
            if hi > lo:
                cent[hh, cc] = keys[hh, lo:hi].float().mean(0)
    if variance:  # the clusters' own variances (random for empty ones, which never count)
        var = rnd(h, c, d, dt=torch.float32).abs()
        for hh in range(h):
            for cc in range(c):
                lo, hi = int(offsets[hh, cc]), int(offsets[hh, cc + 1])
                if hi > lo:
                    var[hh, cc] = keys[hh, lo:hi].float().var(0, correction=0)
        cent = torch.cat([cent, var], dim=-1)
    coarse_c = coarse_o = None
    if coarse:
        cuts = torch.sort(torch.randint(0, c + 1, (h, coarse - 1), generator=gen), dim=1).values
        coarse_o = torch.zeros(h, coarse + 1, dtype=torch.int32)
        coarse_o[:, 1:coarse] = cuts.to(torch.int32)
        coarse_o[:, coarse] = c
        coarse_c = rnd(h, coarse, 2 * d if variance else d, dt=torch.float32)
        if variance:
            coarse_c[..., d:] = coarse_c[..., d:].abs()
    am, causal = None, False
    if mask == "causal":
        causal = True
    elif mask == "bool":
        am = torch.rand(b, 1, m, s, generator=gen) > 0.3
        am[..., 0] = True
    elif mask == "float":
        am = rnd(1, h * g, m, s)
        am[..., -1] = float("-inf")
    q = rnd(b, h * g, m, d) * 0.5
    cs = dict(q=q, k_new=rnd(b, h, s, d), v_new=rnd(b, h, s, d), attn_mask=am, is_causal=causal,
              keys=keys, values=values, centroids=cent, offsets=offsets,
              window_keys=rnd(h, w, d), window_values=rnd(h, w, d),
              coarse_centroids=coarse_c, coarse_offsets=coarse_o, scale=d ** -0.5)
    return Case(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in cs.items()})


def reference_with_selection(cs: Case, idx: torch.Tensor, block_q: int) -> torch.Tensor:
    """float64 squeezed attention over the clusters listed in idx (the kernel's own selection)."""
    d64 = {k: getattr(cs, k).double() for k in ("q", "k_new", "v_new", "keys", "values",
                                                 "window_keys", "window_values")}
    am = cs.attn_mask
    if am is not None and am.dtype != torch.bool:
        am = am.double()
    sel = selection_from_compact(idx, cs.centroids.shape[1])
    return squeezed_attention_reference(d64["q"], d64["k_new"], d64["v_new"], am, d64["keys"],
                                        d64["values"], cs.offsets, sel, d64["window_keys"],
                                        d64["window_values"], cs.scale, cs.is_causal, block_q)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def threshold_for_keep(cs: Case, keep: float, block_q: int) -> torch.Tensor:
    """A log threshold keeping about `keep` of the non-empty clusters (a quantile of the block-max
    log shares, computed as the reference does), so tests select a meaningful subset."""
    from sqz_compile.kernels.lookup.reference import block_max, cluster_sizes, log_share, lookup_queries

    q = lookup_queries(cs.q.float(), cs.centroids.shape[-1], cs.scale)
    b, hq, m, d = q.shape
    h = cs.centroids.shape[0]
    qg = q.reshape(b, h, hq // h, m, d)
    sc = torch.einsum("bhgmd,hcd->bhgmc", qg, cs.centroids.float()) * cs.scale
    log_n = cluster_sizes(cs.offsets).float().log()[None, :, None, None, :]
    best = block_max(log_share(sc, log_n), block_q)
    fin = best[torch.isfinite(best)].cpu()
    return torch.quantile(fin, 1.0 - keep).to(cs.q.device)


def between(values: torch.Tensor, keep: float) -> float:
    """A threshold halfway between two neighbouring distinct finite values, about `keep` of them
    above it: no value sits near it for float32 (or bf16) rounding to flip."""
    v = torch.unique(values.double()).cpu()
    v = v[torch.isfinite(v)]
    assert len(v) >= 2, "fewer than two finite shares"
    i = min(max(int(len(v) * (1.0 - keep)), 1), len(v) - 1)
    return float(v[i - 1] + v[i]) / 2


def coarse_block_shares(cs: Case, block_q: int) -> torch.Tensor:
    """float64 [B, H, NB, K]: each coarse cluster's block-max log share, as the reference computes
    it (the coarse level keeps a cluster when this exceeds its threshold)."""
    from sqz_compile.kernels.lookup.reference import coarse_log_shares

    return coarse_log_shares(cs.q.double(), cs.centroids, cs.offsets, cs.coarse_centroids, cs.coarse_offsets,
                             cs.scale, block_q)


def coarse_threshold_for_keep(cs: Case, keep: float, block_q: int) -> torch.Tensor:
    """A coarse log threshold keeping about `keep` of the coarse level's distinct block-max log
    shares (float64, as the reference computes them; between two of them), so a hierarchical test
    prunes some coarse clusters and keeps some."""
    return torch.tensor(between(coarse_block_shares(cs, block_q), keep), dtype=torch.float32, device=cs.q.device)


def assert_same_positions(fused, plain, n: int) -> None:
    """The fused decode lookup's kept-key positions equal the cluster list of `plain` expanded
    (same kept-key count per row, same positions up to it)."""
    from sqz_compile.kernels.lookup import launch as lookup_launch

    want = lookup_launch.expand_positions(plain, n)
    assert torch.equal(fused.nkeys.cpu(), plain.nkeys.cpu())
    for row in range(want.shape[0]):
        k = int(plain.nkeys[row])
        assert torch.equal(fused.pos[row, :k].cpu(), want[row, :k].cpu()), f"row {row}"
