"""Selection-rule proxy: which key-selection rule recovers the needle at keep = 1/8?

For real NIAH prompts (sqz_compile.eval.needles.niah_prompt, SmolLM2-135M-Instruct, Paul Graham
essays) this script captures, per layer and KV head, the context's keys (post-RoPE, positions
p - L, exactly as `squeeze` captures them), clusters them with the library's own code
(`squeeze_kv`: same dense tokens, window, k-means, variance centroids), and records the queries
of the question rows (the chat-formatted question + answer lead, then the dense model's greedy
answer, teacher-forced over a dense cache). Every rule below then picks, per query row and KV
head (one selection shared by the GQA group's query heads, as the sparse kernel does in decode),
EXACTLY K = round(N / 8) of the N clustered keys; the always-attended keys (window + dense
tokens) are kept by every rule.

Rules
  key_oracle          top-K keys by true probability (max over the group's heads): the ceiling.
  mean / variance     today's lookup score per cluster (variance = s q.mu + s^2/2 sum q_d^2 var_d,
                      via the library's best_log_shares), clusters taken best first until K keys
                      (the last cluster cut to fit: equal key counts for every rule).
  cluster_oracle      clusters ranked by true mass per key (max over heads): ceiling of any
                      cluster selection at this clustering.
  twostage_xF         variance-score clusters up to F*K candidate keys, then exact q.k over the
                      candidates' keys (log-softmax over candidates + always-attended keys, max over
                      heads), keep the top K.
  variance_cr10/20    today's rule over re-clustered keys, cluster_ratio 10% / 20%.
  sparq_rR            SparQ-style sketch: the R channels with the largest sum over the group of
                      |q_d|, approximate logits with SparQ's temperature correction, top K.
  kbitB               every key scored exactly against a B-bit copy of the keys (uniform, per
                      channel, groups of 64 tokens, fp16 scale + zero), top K.
  twostage_xF_kbitB   variance-score candidates (F*K keys), scored on their B-bit copy, top K.
  pca_rR              Loki-style: keys projected on their top-R principal directions (per layer and
                      head, offline), score q P P^T k, top K.

Metrics (pooled per layer over cases, query rows and query heads, then averaged over layers):
  needle_recall   kept attention mass on the needle's tokens / all attention mass on them
                  (mass-weighted needle-key recall; needle tokens that are always attended count as
                  kept), over all question rows, and `answer` over the rows that predict the answer.
  mass_recall     kept probability mass of the clustered keys / their total mass.
  bytes           per decode token, what the clustered part costs to read relative to dense K+V of
                  the same keys (16-bit K and V, 16-bit centroids as the compiled model reads them):
                  centroids (C x 2D with variance) + scoring reads (candidate K, sketch) + kept keys'
                  K and V not already read. The always-attended keys (same for every rule) are left
                  out; `bytes_total` adds them at this context length.

End-to-end check (--generate RULE ...): the greedy NIAH answer with a rule applied in every layer
to every query row (prompt and answer, decode-style: each row its own selection of exactly K
clustered keys, plus the always-attended and new keys; eager attention), hits per rule.

    nice python benchmarks/selection_proxy.py --out /tmp/p.json    # 9 cases at 2K (~5 min, 1 thread)
    nice python benchmarks/selection_proxy.py --needles 0 --depths 0.5 --out /tmp/p.json  # smoke
    nice python benchmarks/selection_proxy.py --needles 0 1 2 3 4 --generate variance key_oracle kbit2 --out /tmp/g.json

Writes --out (rewritten after every case); the published runs are results/v10/selection_proxy.json
and selection_proxy_generate*.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sqz_compile.assets import load_smollm2  # noqa: E402
from sqz_compile.config import SqueezeConfig  # noqa: E402
from sqz_compile.eval.needles import NEEDLES, niah_prompt  # noqa: E402
from sqz_compile.eval.runs import dense_cache, greedy_answer  # noqa: E402
from sqz_compile.kernels.lookup.reference import best_log_shares  # noqa: E402
from sqz_compile.squeeze.capture import capture_context, squeeze_kv  # noqa: E402
from sqz_compile.transformers_compat import (cache_kwargs, register_attention,  # noqa: E402
                                             set_attn_implementation)

KEEP = 0.125
GROUPS = {"0-6": range(0, 7), "7-13": range(7, 14), "14-29": range(14, 30)}
NEG = float("-inf")


# --------------------------------------------------------------------------- capture

class _QueryRecorder:
    """Attention function that records each layer's post-RoPE queries and full keys (cache +
    new), then runs SDPA."""

    name = "sqz_proxy_record"

    def __init__(self) -> None:
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.scaling = None

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        li = int(module.layer_idx)
        self.q[li] = query[0].detach().float().clone()
        self.k[li] = key[0].detach().float().clone()
        self.scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@torch.no_grad()
def question_queries(model, keys, values, rows: torch.Tensor):
    """Queries [layers, Hq, M, D] and the full keys [layers, H, L+M, D] of `rows` [1, M] run at
    positions 0..M-1 over a dense cache of the context (keys at positions p - L)."""
    rec = _QueryRecorder()
    register_attention(rec.name, rec)
    old = model.config._attn_implementation
    set_attn_implementation(model, rec.name)
    try:
        pos = torch.arange(rows.shape[1]).unsqueeze(0)
        model(input_ids=rows, position_ids=pos, use_cache=True,
              **cache_kwargs(model, dense_cache(model, (keys, values))))
    finally:
        set_attn_implementation(model, old)
    n = len(rec.q)
    return torch.stack([rec.q[i] for i in range(n)]), torch.stack([rec.k[i] for i in range(n)])


def true_probs(q: torch.Tensor, k_all: torch.Tensor, L: int, scale: float) -> torch.Tensor:
    """Causal softmax of one layer's question rows: q [Hq, M, D], k_all [H, L+M, D] ->
    probabilities [Hq, M, L] of the L context keys."""
    hq, m, _ = q.shape
    g = hq // k_all.shape[0]
    k = k_all.repeat_interleave(g, 0)
    logits = torch.matmul(q, k.transpose(1, 2)) * scale                       # [Hq, M, L+M]
    j = torch.arange(L + m)
    visible = j[None, :] < (L + 1 + torch.arange(m))[:, None]
    return logits.masked_fill(~visible, NEG).softmax(-1)[..., :L]


# --------------------------------------------------------------------------- selection helpers

def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of the k highest entries along the last dim."""
    idx = score.topk(k, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)


def clusters_to_keys(cscore: torch.Tensor, offsets: torch.Tensor, budget: int) -> torch.Tensor:
    """Clusters best first until `budget` keys (the last one cut to fit; empty / -inf clusters
    never): cscore [M, C], offsets [C+1] (keys sorted by cluster) -> key mask [M, N], exactly
    min(budget, keys in finite clusters) keys per row."""
    sizes = (offsets[1:] - offsets[:-1]).long()
    n = int(offsets[-1])
    assign = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)        # [N]
    within = torch.arange(n) - offsets[:-1].long()[assign]
    ok = torch.isfinite(cscore) & (sizes > 0)
    order = cscore.masked_fill(~ok, NEG).sort(dim=-1, descending=True, stable=True).indices
    sz = (sizes[None, :] * ok).gather(1, order)
    before_sorted = sz.cumsum(-1) - sz
    before = torch.empty_like(before_sorted).scatter_(1, order, before_sorted)  # [M, C]
    okk = ok[:, assign]
    return okk & (before[:, assign] + within[None, :] < budget)


def group_max(x: torch.Tensor, g: int) -> torch.Tensor:
    """[g, M, ...] -> max over the group."""
    return x.amax(0)


def log_softmax_rows(logits: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """log-softmax of logits [g, M, N] over N (plus `extra` [g, M, E] logits in the denominator)."""
    full = logits if extra is None else torch.cat([logits, extra], -1)
    return logits - torch.logsumexp(full, -1, keepdim=True)


def quantize_keys(k: torch.Tensor, bits: int, group: int = 64) -> torch.Tensor:
    """Dequantised copy of keys [N, D]: uniform asymmetric per channel over groups of `group`
    tokens (KIVI-style key quantisation; fp16 scale and zero per channel and group)."""
    n, d = k.shape
    pad = (-n) % group
    x = torch.cat([k, k[-1:].expand(pad, d)]) if pad else k
    x = x.reshape(-1, group, d)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    levels = 2 ** bits - 1
    step = ((hi - lo) / levels).clamp(min=1e-8).half().float()
    lo = lo.half().float()
    codes = ((x - lo) / step).round().clamp(0, levels)
    return (codes * step + lo).reshape(-1, d)[:n]


# --------------------------------------------------------------------------- rules

def rule_masks(q: torch.Tensor, ctx_l: dict, extra_ctx: dict, scale: float, p_clu: torch.Tensor,
               rules: list[str]) -> dict[str, torch.Tensor]:
    """Key masks [M, N] (one per rule) for one layer and KV head.

    q [g, M, D] the group's question queries; ctx_l: keys [N, D] (sorted by cluster), offsets,
    centroids [C, 2D], always-attended keys `fixed` [F, D]; extra_ctx: {ratio: (keys, offsets,
    centroids, perm-into-base)} for the re-clustered variants; p_clu [g, M, N] true probabilities
    of the clustered keys."""
    keys, offsets, cent = ctx_l["keys"], ctx_l["offsets"], ctx_l["centroids"]
    g, m, d = q.shape
    n = keys.shape[0]
    K = max(1, round(KEEP * n))
    out: dict[str, torch.Tensor] = {}
    exact = log_softmax_rows(torch.matmul(q, keys.T) * scale, torch.matmul(q, ctx_l["fixed"].T) * scale)

    def cluster_score(c, off, variance=True):
        c = c if variance else c[:, :d]
        return best_log_shares(q[None], c[None], off[None], scale, 1)[0, 0]     # [M, C]

    var_score = cluster_score(cent, offsets)
    for r in rules:
        if r == "key_oracle":
            out[r] = top_k_mask(group_max(p_clu.log(), g), K)
        elif r == "mean":
            out[r] = clusters_to_keys(cluster_score(cent, offsets, False), offsets, K)
        elif r == "variance":
            out[r] = clusters_to_keys(var_score, offsets, K)
        elif r == "cluster_oracle":
            sizes = (offsets[1:] - offsets[:-1]).long()
            assign = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
            mass = torch.zeros(g, m, sizes.numel()).index_add_(2, assign, p_clu)
            dens = group_max(mass / sizes.clamp(min=1), g).masked_fill(sizes == 0, NEG)
            out[r] = clusters_to_keys(dens, offsets, K)
        elif r.startswith("twostage_x"):
            parts = r[len("twostage_x"):].split("_")
            f = int(parts[0])
            cand = clusters_to_keys(var_score, offsets, f * K)
            if len(parts) == 1:
                s = exact
            else:
                bits = int(parts[1][len("kbit"):])
                qk = quantize_keys(keys, bits)
                s = log_softmax_rows(torch.matmul(q, qk.T) * scale,
                                     torch.matmul(q, ctx_l["fixed"].T) * scale)
            out[r] = top_k_mask(group_max(s, g).masked_fill(~cand, NEG), K)
        elif r.startswith("variance_cr"):
            ratio = int(r[len("variance_cr"):]) / 100
            ek, eoff, ecent, to_base = extra_ctx[ratio]
            sc = best_log_shares(q[None], ecent[None], eoff[None], scale, 1)[0, 0]
            mk = clusters_to_keys(sc, eoff, K)
            out[r] = torch.zeros_like(mk).index_copy_(1, to_base, mk)         # into base key order
        elif r.startswith("cluster_oracle_cr"):
            ratio = int(r[len("cluster_oracle_cr"):]) / 100
            ek, eoff, ecent, to_base = extra_ctx[ratio]
            sizes = (eoff[1:] - eoff[:-1]).long()
            assign = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
            mass = torch.zeros(g, m, sizes.numel()).index_add_(2, assign, p_clu[:, :, to_base])
            dens = group_max(mass / sizes.clamp(min=1), g).masked_fill(sizes == 0, NEG)
            mk = clusters_to_keys(dens, eoff, K)
            out[r] = torch.zeros_like(mk).index_copy_(1, to_base, mk)
        elif r.startswith("sparq_r"):
            rr = int(r[len("sparq_r"):])
            ch = q.abs().sum(0).topk(rr, dim=-1).indices                             # [M, rr]
            qr = q.gather(2, ch[None].expand(g, -1, -1))                             # [g, M, rr]
            kr = keys[:, ch].permute(1, 0, 2)                                        # [M, N, rr]
            frac = qr.abs().sum(-1, keepdim=True) / q.abs().sum(-1, keepdim=True)   # [g, M, 1]
            approx = torch.einsum("gmr,mnr->gmn", qr, kr) * (scale / frac.sqrt())
            out[r] = top_k_mask(group_max(log_softmax_rows(approx), g), K)
        elif r.startswith("kbit"):
            bits = int(r[len("kbit"):])
            s = log_softmax_rows(torch.matmul(q, quantize_keys(keys, bits).T) * scale,
                                 torch.matmul(q, ctx_l["fixed"].T) * scale)
            out[r] = top_k_mask(group_max(s, g), K)
        elif r.startswith("pca_r"):
            rr = int(r[len("pca_r"):])
            # Loki: principal directions of the (uncentred) keys, computed offline per head
            _, _, vh = torch.linalg.svd(keys, full_matrices=False)
            p = vh[:rr].T                                                            # [D, rr]
            approx = torch.matmul(q @ p, (keys @ p).T) * scale
            out[r] = top_k_mask(group_max(log_softmax_rows(approx), g), K)
        else:
            raise ValueError(f"unknown rule {r}")
    return out


def rule_bytes(rule: str, d: int, ratios: dict[float, float]) -> float:
    """Bytes read per decode token for the clustered part, relative to dense 16-bit K+V of the
    same keys (4D bytes per key). ratios: cluster_ratio -> clusters / N actually used."""
    kv = KEEP                                   # kept keys' K and V
    cent = lambda cr: ratios[cr] * (2 * d * 2) / (4 * d)  # noqa: E731  C x [mean, var] 16-bit
    if rule in ("key_oracle",):
        return kv
    if rule in ("variance", "cluster_oracle"):
        return cent(0.05) + kv
    if rule == "mean":
        return ratios[0.05] * (d * 2) / (4 * d) + kv
    if rule.startswith("twostage_x"):
        parts = rule[len("twostage_x"):].split("_")
        f = int(parts[0])
        if len(parts) == 1:                     # candidate K read in full, then kept V
            return cent(0.05) + f * KEEP * 0.5 + KEEP * 0.5
        bits = int(parts[1][len("kbit"):])       # candidate low-bit K (+ fp16 scale/zero per 64), kept K+V
        return cent(0.05) + f * KEEP * _kbit_frac(bits) + kv
    if rule.startswith("variance_cr") or rule.startswith("cluster_oracle_cr"):
        cr = int(rule.split("_cr")[1]) / 100
        return cent(cr) + kv
    if rule.startswith("sparq_r"):
        return int(rule[len("sparq_r"):]) / (2 * d) + kv
    if rule.startswith("kbit"):
        return _kbit_frac(int(rule[len("kbit"):])) + kv
    if rule.startswith("pca_r"):
        return int(rule[len("pca_r"):]) / (2 * d) + kv
    raise ValueError(rule)


def _kbit_frac(bits: int, group: int = 64) -> float:
    """B-bit keys (+ two fp16 per channel per `group` tokens) relative to 16-bit K+V (32 bits per
    channel and token)."""
    return (bits + 32 / group) / 32


# --------------------------------------------------------------------------- one case

FIELDS = ("needle_kept", "needle_total", "ans_needle_kept", "ans_needle_total", "mass_kept", "mass_total")


@torch.no_grad()
def run_case(model, tok, needle_i: int, depth: float, context: int, rules: list[str], ratios_extra,
             acc: dict, log) -> dict:
    t0 = time.perf_counter()
    needle = NEEDLES[needle_i]
    ctx_ids, user, where = niah_prompt(tok, needle, context, depth)
    n_fact = len(tok.encode(" " + needle.fact, add_special_tokens=False))
    L = ctx_ids.shape[1]
    cfg = SqueezeConfig(keep=KEEP, self_check=False)
    cap = capture_context(model, ctx_ids, cfg.observation_window, 1024, progress=False)
    keys, values, wq, scale = cap.keys, cap.values, cap.queries, cap.scaling
    base = squeeze_kv(keys.clone(), values.clone(), wq, scale, cfg, progress=False)
    extra = {r: squeeze_kv(keys.clone(), values.clone(), wq, scale,
                           SqueezeConfig(keep=KEEP, self_check=False, cluster_ratio=r), progress=False)
             for r in ratios_extra}
    gen = greedy_answer(model, user, dense_cache(model, (keys, values)), tok, 12)
    answer = tok.decode(gen, skip_special_tokens=True).strip()
    rows = torch.cat([user, torch.tensor([gen[:-1]], dtype=torch.long)], 1) if len(gen) > 1 else user
    qs, ks = question_queries(model, keys, values, rows)                   # [layers, Hq, M, D]
    m = rows.shape[1]
    assert ks.shape[2] == L + m, (ks.shape, L, m)
    ans_rows = torch.zeros(m, dtype=torch.bool)
    ans_rows[user.shape[1] - 1:] = True                                    # rows predicting the answer
    layers, H, N, D = base.keys.shape
    g = qs.shape[1] // H
    needle_pos = torch.zeros(L, dtype=torch.bool)
    needle_pos[where:where + n_fact] = True
    used_ratio = {0.05: base.centroids.shape[2] / N, **{r: e.centroids.shape[2] / N for r, e in extra.items()}}
    for li in range(layers):
        p = true_probs(qs[li], ks[li], L, scale)                           # [Hq, M, L]
        for h in range(H):
            ph = p[h * g:(h + 1) * g]                                      # [g, M, L]
            perm = base.perm[li, h].long()
            fixed_pos = base.window_positions[li, h].long()
            ctx_l = {"keys": base.keys[li, h].float(), "offsets": base.offsets[li, h].long(),
                     "centroids": base.centroids[li, h].float(), "fixed": base.window_keys[li, h].float()}
            ex = {}
            inv = torch.empty(L, dtype=torch.long)
            inv[perm] = torch.arange(N)
            for r, e in extra.items():
                eperm = e.perm[li, h].long()
                ex[r] = (e.keys[li, h].float(), e.offsets[li, h].long(), e.centroids[li, h].float(), inv[eperm])
            p_clu = ph[:, :, perm]                                         # [g, M, N]
            masks = rule_masks(qs[li, h * g:(h + 1) * g], ctx_l, ex, scale, p_clu, rules)
            nd_clu = needle_pos[perm]                                      # [N]
            nd_fixed = ph[:, :, fixed_pos[needle_pos[fixed_pos]]].sum(-1)   # [g, M] always kept
            nd_total = ph[:, :, needle_pos].sum(-1)                        # [g, M]
            mass_total = p_clu.sum(-1)
            for r, mk in masks.items():
                kept = p_clu * mk[None]
                nk = kept[:, :, nd_clu].sum(-1) + nd_fixed
                a = acc.setdefault(r, torch.zeros(layers, len(FIELDS), dtype=torch.float64))
                a[li] += torch.tensor([nk.sum(), nd_total.sum(), nk[:, ans_rows].sum(),
                                       nd_total[:, ans_rows].sum(), kept.sum(), mass_total.sum()],
                                      dtype=torch.float64)
    info = {"needle": needle_i, "depth": depth, "context_tokens": L, "needle_token": where,
            "needle_tokens": n_fact, "clustered_keys": N, "fixed_keys": int(base.window_keys.shape[2]),
            "budget_keys": max(1, round(KEEP * N)), "rows": m, "answer": answer,
            "hit": needle.answer in answer.lower(), "cluster_ratio_used": used_ratio,
            "seconds": round(time.perf_counter() - t0, 1)}
    log(f"case needle={needle_i} depth={depth}: {info['seconds']} s, answer {answer!r}")
    return info



# --------------------------------------------------------------------------- end-to-end check

class _MaskedAttention:
    """Attention function that applies one rule per query row (decode-style, every row its own
    selection) to the clustered context keys and attends exactly (eager softmax) to the kept ones,
    the always-attended keys and the new tokens (causal). `rule` None: dense attention."""

    name = "sqz_proxy_masked"

    def __init__(self, base, rule: str | None) -> None:
        self.base, self.rule = base, rule

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        li = int(module.layer_idx)
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        q, k, v = query[0].float(), key[0].float(), value[0].float()             # [Hq, m, D], [H, T, D]
        hq, m, _ = q.shape
        H, T, _ = k.shape
        g = hq // H
        L = int(self.base.context_length)
        logits = torch.matmul(q, k.repeat_interleave(g, 0).transpose(1, 2)) * scale
        visible = torch.arange(T)[None, :] <= (T - m + torch.arange(m))[:, None]  # [m, T]
        logits = logits.masked_fill(~visible, NEG)
        if self.rule is not None:
            p = logits.softmax(-1)
            b = self.base
            for h in range(H):
                perm = b.perm[li, h].long()
                ctx_l = {"keys": b.keys[li, h].float(), "offsets": b.offsets[li, h].long(),
                         "centroids": b.centroids[li, h].float(), "fixed": b.window_keys[li, h].float()}
                mk = rule_masks(q[h * g:(h + 1) * g], ctx_l, {}, scale, p[h * g:(h + 1) * g][:, :, perm],
                                [self.rule])[self.rule]                           # [m, N]
                allow = torch.ones(m, T, dtype=torch.bool)
                allow[:, perm] = mk
                logits[h * g:(h + 1) * g] = logits[h * g:(h + 1) * g].masked_fill(~allow, NEG)
        out = torch.matmul(logits.softmax(-1), v.repeat_interleave(g, 0))         # [Hq, m, D]
        return out.transpose(0, 1).unsqueeze(0).to(query.dtype), None


@torch.no_grad()
def generate_case(model, tok, needle_i: int, depth: float, context: int, rules: list[str], log) -> dict:
    """Greedy answers of one NIAH case with each rule applied in every layer (per query row)."""
    needle = NEEDLES[needle_i]
    ctx_ids, user, where = niah_prompt(tok, needle, context, depth)
    cfg = SqueezeConfig(keep=KEEP, self_check=False)
    cap = capture_context(model, ctx_ids, cfg.observation_window, 1024, progress=False)
    keys, values = cap.keys, cap.values
    base = squeeze_kv(keys.clone(), values.clone(), cap.queries, cap.scaling, cfg, progress=False)
    rec = {"needle": needle_i, "depth": depth, "context_tokens": ctx_ids.shape[1]}
    old = model.config._attn_implementation
    for r in ["dense"] + rules:
        fn = _MaskedAttention(base, None if r == "dense" else r)
        register_attention(fn.name, fn)
        set_attn_implementation(model, fn.name)
        try:
            gen = greedy_answer(model, user, dense_cache(model, (keys, values)), tok, 12)
        finally:
            set_attn_implementation(model, old)
        ans = tok.decode(gen, skip_special_tokens=True).strip()
        rec[r] = {"answer": ans, "hit": needle.answer in ans.lower()}
    log(f"generate needle={needle_i} depth={depth}: " + ", ".join(f"{r}={int(rec[r]['hit'])}" for r in ["dense"] + rules))
    return rec


# --------------------------------------------------------------------------- summary

def summarise(acc: dict, d: int, ratios: dict, fixed_frac: float) -> dict:
    out = {}
    for r, a in acc.items():
        a = a.numpy()
        per = lambda i, j: [float(x / y) if y > 0 else float("nan") for x, y in zip(a[:, i], a[:, j])]  # noqa: E731
        nr, ar, mr = per(0, 1), per(2, 3), per(4, 5)
        mean = lambda v, idx=None: float(sum(v[i] for i in (idx or range(len(v)))) / len(idx or v))  # noqa: E731
        b = rule_bytes(r, d, ratios)
        out[r] = {"needle_recall": mean(nr), **{f"needle_recall_{k}": mean(nr, list(v)) for k, v in GROUPS.items()},
                  "needle_recall_answer_rows": mean(ar), "mass_recall": mean(mr),
                  **{f"mass_recall_{k}": mean(mr, list(v)) for k, v in GROUPS.items()},
                  "bytes": round(b, 4), "bytes_total": round(b * (1 - fixed_frac) + fixed_frac, 4),
                  "needle_recall_per_layer": nr, "mass_recall_per_layer": mr,
                  "needle_recall_answer_rows_per_layer": ar}
    return out


def table(summary: dict) -> str:
    head = ("| rule | needle recall | 0-6 | 7-13 | 14-29 | answer rows | mass recall | bytes / dense K+V |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r, s in summary.items():
        lines.append(f"| {r} | {s['needle_recall']:.3f} | {s['needle_recall_0-6']:.3f} | {s['needle_recall_7-13']:.3f} | "
                     f"{s['needle_recall_14-29']:.3f} | {s['needle_recall_answer_rows']:.3f} | "
                     f"{s['mass_recall']:.3f} | {s['bytes']:.3f} |")
    return "\n".join(lines)


DEFAULT_RULES = ["key_oracle", "mean", "variance", "cluster_oracle", "twostage_x2", "twostage_x4",
                 "variance_cr10", "variance_cr20", "cluster_oracle_cr10", "cluster_oracle_cr20",
                 "sparq_r16", "sparq_r32", "kbit1", "kbit2", "kbit4", "twostage_x2_kbit2",
                 "twostage_x4_kbit2", "pca_r16", "pca_r32"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--needles", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--rules", nargs="+", default=DEFAULT_RULES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--generate", nargs="+", default=None, metavar="RULE",
                    help="instead of the proxy: greedy NIAH answers with these rules applied in every layer "
                         "(written to --out)")
    ap.add_argument("--out", required=True,
                    help="JSON to write (rewritten after every case; the published runs are "
                         "results/v10/selection_proxy*.json: give another path to keep them)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    ratios_extra = sorted({int(r.split("_cr")[1]) / 100 for r in args.rules if "_cr" in r})
    model, tok = load_smollm2()
    if args.generate:
        out = args.out
        recs = []
        for i in args.needles:
            for dep in args.depths:
                recs.append(generate_case(model, tok, i, dep, args.context, args.generate, log))
                hits = {r: sum(c[r]["hit"] for c in recs) for r in ["dense"] + args.generate}
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with open(out, "w") as f:
                    json.dump({"setup": {"context": args.context, "keep": KEEP, "selection": "every layer, "
                                         "every query row (prompt and answer) its own rule selection of exactly "
                                         "round(N/8) clustered keys + window + dense tokens; eager attention"},
                               "hits": hits, "cases": recs}, f, indent=1)
        log(f"hits: {hits} of {len(recs)}")
        return 0
    d = model.config.hidden_size // model.config.num_attention_heads
    acc: dict = {}
    cases = []
    for i in args.needles:
        for dep in args.depths:
            cases.append(run_case(model, tok, i, dep, args.context, args.rules, ratios_extra, acc, log))
            ratios = {0.05: 0.05, **{r: r for r in ratios_extra}}
            ratios.update({k: sum(c["cluster_ratio_used"][k] for c in cases) / len(cases) for k in ratios})
            fixed = sum(c["fixed_keys"] / (c["fixed_keys"] + c["clustered_keys"]) for c in cases) / len(cases)
            summary = summarise({r: acc[r] for r in args.rules}, d, ratios, fixed)
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"setup": {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, float32, CPU)",
                                     "context": args.context, "keep": KEEP, "head_dim": d,
                                     "selection": "per query row and KV head (decode-style, block_q=1), "
                                                  "shared by the GQA group; exactly round(N/8) clustered keys",
                                     "always_attended_fraction": fixed, "cluster_ratio_used": ratios,
                                     "torch": torch.__version__},
                           "cases": cases, "rules": summary}, f, indent=1)
            log(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
