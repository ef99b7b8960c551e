"""Accuracy of Squeezed Attention on a real model: what the speed costs.

Measured against the dense model over the same prompt:
- needle in a haystack (NIAH): a distinctive fact inserted into essay text at a sentence boundary
  at some depth; the fixed context is the chat prefix plus the essay, the user's input is the
  chat-formatted question; greedy answers; a hit is an answer containing the fact's key word;
- perplexity (PPL) of continuing an essay: context = its first N tokens, user input = the next T,
  scored by teacher forcing (T - 1 predictions: the first user token is predicted by the context);
- next-token top-1 agreement and mean KL(dense || squeezed) over the same teacher-forced positions
  (PPL continuations, and the dense answer tokens of the NIAH questions);
- an oracle at the same sparsity: per (layer, KV head, query block) it keeps the same *number* of
  clustered context keys as the lookup, but the ones with the highest true attention probability
  (max over the block's queries and the GQA group's heads), so the lookup's loss is told apart
  from the loss of sparsity itself; per layer, the lookup's recall against that oracle.

How the squeezed model runs here: a transformers attention function ("sqz_eval", registered with
`AttentionInterface`) calls `torch.ops.sqz.squeezed_attention` with the layer's context tensors,
i.e. the same op the compiled model uses. The dense baseline runs the model's own SDPA attention
over a KV cache holding the full context (un-permuted from the SqueezedContext, keys rotated for
positions p - L, user tokens at 0, 1, ...: the same attention as the full prompt, because RoPE
depends only on relative positions; `run_ppl` checks it against a literal full-prompt forward).

Recall definitions (per layer; "clustered keys" = the context minus the always-kept window;
p = dense attention probability of a query row over all keys):
- mass_recall = sum(p over lookup-kept keys) / sum(p over oracle-kept keys), summed over rows;
- key_recall = |lookup keys & oracle keys| / |oracle keys|, summed over (head, block);
- kept_fraction = kept clustered keys / clustered keys (what the lookup actually kept);
- lost_mass_lookup / lost_mass_oracle = mean over rows of the p mass of dropped clustered keys.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .config import SqueezeConfig
from .context import SqueezedContext
from .kernels.attention import key_cluster_ids, new_token_bias, selected_key_mask, squeezed_attention_reference
from .kernels.lookup import _block_max, selection_mask_reference
from .ops import DEFAULT_BLOCK_Q
from .transformers_compat import register_attention, set_attn_implementation

EVAL_IMPL = "sqz_eval"
LOOKUPS = ("flat", "hier")
MODES = ("threshold", "budget")


# --------------------------------------------------------------------------- needles

@dataclass(frozen=True)
class Needle:
    """A fact to hide, the question that asks for it, the key word a hit must contain, and the
    start of the assistant's answer (a RULER-style answer prefix: short, comparable answers)."""

    fact: str
    question: str
    answer: str
    lead: str


NEEDLES: tuple[Needle, ...] = (
    Needle("The secret ingredient of Hana's soup is cardamom.",
           "What is the secret ingredient of Hana's soup?", "cardamom",
           "The secret ingredient of Hana's soup is"),
    Needle("The name of Dr. Okafor's cat is Biscuit.",
           "What is the name of Dr. Okafor's cat?", "biscuit", "The name of Dr. Okafor's cat is"),
    Needle("The magic number of the Zephyr project is 7319.",
           "What is the magic number of the Zephyr project?", "7319",
           "The magic number of the Zephyr project is"),
    Needle("Lena hides her spare key under the blue flowerpot.",
           "Where does Lena hide her spare key?", "flowerpot", "Lena hides her spare key"),
    Needle("The Orion meeting takes place in room 42B.",
           "In which room does the Orion meeting take place?", "42b",
           "The Orion meeting takes place in room"),
)

_DOC = "\x00SQZ_DOCUMENT\x00"


def _chat_parts(tokenizer, question: str, lead: str = "") -> tuple[list[int], list[int]]:
    """(ids before the document, ids after it) of a one-turn chat: [doc]\\n\\n[question], then the
    assistant header and `lead` (the start of the answer, if any)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{_DOC}\n\n{question} Answer in a few words."}],
        tokenize=False, add_generation_prompt=True) + lead
    head, sep, tail = text.partition(_DOC)
    if not sep:
        raise ValueError("the tokenizer's chat template dropped the document text; cannot split the prompt")
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    return enc(head), enc(tail)


def _sentence_ends(tokenizer, ids: Sequence[int]) -> list[int]:
    """Token indices j where text ids[:j] ends a sentence (0 included: the start of the text)."""
    pieces = [tokenizer.decode([i]) for i in ids] + [" "]
    return [0] + [j for j in range(1, len(ids) + 1)
                  if pieces[j - 1].rstrip().endswith((".", "!", "?")) and pieces[j][:1].isspace()]


def niah_prompt(tokenizer, needle: Needle, context_len: int, depth: float, seed: int = 0,
                prime: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(context_ids [1, <= context_len], user_ids [1, M], needle token position) for one NIAH case.

    Context = chat prefix + essay text (cut after its last whole sentence, so a little shorter than
    `context_len`) with the needle at the sentence boundary nearest to `depth` (0 = start of the
    essay, 1 = end); user input = the question, the assistant header and (prime=True) the
    needle's answer lead.
    """
    from .assets import essay_tokens

    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth {depth} must lie in [0, 1]")
    head, tail = _chat_parts(tokenizer, needle.question, needle.lead if prime else "")
    fact = tokenizer.encode(" " + needle.fact, add_special_tokens=False)
    n_essay = context_len - len(head) - len(fact)
    if n_essay < 1:
        raise ValueError(f"context_len={context_len} leaves no room for essay text "
                         f"({len(head)} prefix + {len(fact)} needle tokens)")
    essay = essay_tokens(tokenizer, n_essay, seed=seed)[0].tolist()
    ends = _sentence_ends(tokenizer, essay)
    if len(ends) > 1:
        essay = essay[:ends[-1]]
    at = min(ends, key=lambda j: abs(j - depth * len(essay)))
    ctx = head + essay[:at] + fact + essay[at:]
    return (torch.tensor([ctx], dtype=torch.long), torch.tensor([tail], dtype=torch.long),
            len(head) + at)


# --------------------------------------------------------------------------- variants

@dataclass(frozen=True)
class Variant:
    """One squeezed configuration: target keep, lookup ("flat"/"hier"), mode ("threshold"/"budget")."""

    keep: float
    lookup: str
    mode: str

    @property
    def name(self) -> str:
        return f"keep={self.keep:g} {self.lookup} {self.mode}"


def with_budget(ctx: SqueezedContext, budget: int) -> SqueezedContext:
    """A copy of `ctx` in fixed-budget mode: `budget` clustered keys per (row, KV head, block)."""
    if int(budget) < 1:
        raise ValueError(f"budget={budget}: a fixed budget must be >= 1 key (the op reads 0 as "
                         f"threshold mode); use a larger keep or a longer context")
    cfg = dataclasses.replace(ctx.config, budget=int(budget))
    return dataclasses.replace(ctx, config=cfg, fingerprint=dict(ctx.fingerprint), extra=dict(ctx.extra))


def flat_view(ctx: SqueezedContext) -> SqueezedContext:
    """The same fine clusters without the coarse level (flat lookup)."""
    if not ctx.hierarchical:
        return ctx
    cfg = dataclasses.replace(ctx.config, hierarchical=False)
    return dataclasses.replace(ctx, config=cfg, fingerprint=dict(ctx.fingerprint), extra=dict(ctx.extra),
                               coarse_centroids=None, coarse_offsets=None, coarse_log_threshold=None)


def with_sink_tokens(ctx: SqueezedContext, n: int) -> SqueezedContext:
    """A copy of `ctx` whose first `n` context tokens are always attended (an ablation, not part of
    the squeeze): their keys leave their clusters (centroids recomputed as the mean of the keys
    left) and join the window. Exact for attention: keys are post-RoPE and order-free. Thresholds
    are stale; recalibrate with `with_keep`. Motivation: attention-sink tokens carry much of the
    softmax mass in deep layers, but their cluster's centroid does not show it. The copy keeps the
    W calibration queries, so it is for evaluation only (`validate` and `save` reject it)."""
    if n <= 0:
        return ctx
    layers, h, N, d = ctx.keys.shape
    if n >= N:
        raise ValueError(f"sink_tokens={n} must be smaller than the {N} clustered keys")
    perm = ctx.perm.long()
    sink = perm < n                                                    # [layers, H, N]
    rest = torch.sort(sink.to(torch.int8), dim=-1, stable=True).indices[..., :N - n]
    first = torch.sort(perm, dim=-1).indices[..., :n]                 # sorted index of positions 0..n-1
    take = lambda t, i: t.gather(2, i.unsqueeze(-1).expand(*i.shape, t.shape[-1]))  # noqa: E731
    cid = torch.stack([key_cluster_ids(ctx.offsets[li], N) for li in range(layers)]).long()  # [layers, H, N]
    sizes = (ctx.offsets[..., 1:] - ctx.offsets[..., :-1]).long()
    gone = torch.zeros_like(sizes).scatter_add_(2, cid, sink.long())
    sink_sum = torch.zeros_like(ctx.centroids).scatter_add_(
        2, cid.unsqueeze(-1).expand(-1, -1, -1, d), ctx.keys.float() * sink.unsqueeze(-1))
    new_sizes = sizes - gone
    centroids = (ctx.centroids * sizes.unsqueeze(-1) - sink_sum) / new_sizes.clamp(min=1).unsqueeze(-1)
    centroids = torch.where(new_sizes.unsqueeze(-1) > 0, centroids, torch.zeros_like(centroids))
    offsets = torch.cat([torch.zeros_like(new_sizes[..., :1]), new_sizes.cumsum(-1)], dim=-1).to(torch.int32)
    coarse = None
    if ctx.hierarchical:
        cc = ctx.coarse_centroids.shape[2]
        fine = torch.arange(ctx.num_clusters, dtype=ctx.coarse_offsets.dtype, device=ctx.keys.device)
        parent = torch.searchsorted(ctx.coarse_offsets[..., 1:].contiguous(),
                                    fine.expand(*ctx.coarse_offsets.shape[:2], -1).contiguous(), right=True).long()
        csum = torch.zeros_like(ctx.coarse_centroids).scatter_add_(
            2, parent.unsqueeze(-1).expand(-1, -1, -1, d), centroids * new_sizes.unsqueeze(-1))
        cn = torch.zeros(layers, h, cc, dtype=torch.long, device=ctx.keys.device).scatter_add_(2, parent, new_sizes)
        coarse = csum / cn.clamp(min=1).unsqueeze(-1)
    extra = dict(ctx.extra, sink_tokens=int(n))
    return dataclasses.replace(
        ctx, fingerprint=dict(ctx.fingerprint), extra=extra, keys=take(ctx.keys, rest), values=take(ctx.values, rest),
        perm=(perm.gather(2, rest) - n).to(torch.int32), centroids=centroids, offsets=offsets,
        window_keys=torch.cat([take(ctx.keys, first), ctx.window_keys], dim=2),
        window_values=torch.cat([take(ctx.values, first), ctx.window_values], dim=2),
        coarse_centroids=coarse if coarse is not None else ctx.coarse_centroids)


def variant_context(base: SqueezedContext, v: Variant) -> SqueezedContext:
    """Derive `v` from one squeeze (no re-clustering): drop/keep the coarse level, recalibrate
    the thresholds for v.keep, and for budget mode set budget = keep * clustered keys."""
    if v.lookup not in LOOKUPS or v.mode not in MODES:
        raise ValueError(f"unknown variant {v}: lookup must be one of {LOOKUPS}, mode one of {MODES}")
    if v.lookup == "hier" and not base.hierarchical:
        raise ValueError("a hierarchical variant needs a context squeezed with hierarchical=True")
    ctx = (flat_view(base) if v.lookup == "flat" else base).with_keep(v.keep)
    if v.mode == "budget":
        ctx = with_budget(ctx, round(v.keep * base.keys.shape[2]))
    return ctx


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
              "keys_lookup", "keys_overlap")

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
    b, hq, m, d = q.shape
    h, n, _ = lc.keys.shape
    g, s = hq // h, k_new.shape[2]
    qg = q.float().reshape(b, h, g, m, d)
    sc_ctx = torch.einsum("bhgmd,hnd->bhgmn", qg, lc.keys.float()) * scale
    sc_win = torch.einsum("bhgmd,hwd->bhgmw", qg, lc.window_keys.float()) * scale
    sc_new = torch.einsum("bhgmd,bhsd->bhgms", qg, k_new.float()) * scale
    bias = new_token_bias(attn_mask, is_causal, m, s, torch.float32, q.device)
    if bias is not None:
        sc_new = sc_new + torch.broadcast_to(bias, (b, hq, m, s)).reshape(b, h, g, m, s)
    lse = torch.logsumexp(torch.cat([sc_ctx, sc_win, sc_new], dim=-1), dim=-1, keepdim=True)
    p_ctx = torch.exp(sc_ctx - lse)
    sel = selection_mask_reference(q, lc.centroids, lc.offsets, lc.log_threshold, scale, block_q, ctx.budget,
                                   lc.coarse_centroids, lc.coarse_offsets, lc.coarse_log_threshold)
    lookup = selected_key_mask(lc.offsets, sel, n)
    oracle = top_count_mask(_block_max(p_ctx, block_q), lookup.sum(-1))
    return _Analysis(p_ctx, lookup, oracle)


def record_stats(stats: LayerStats, layer: int, a: _Analysis, block_q: int) -> None:
    """Add one call's masses and key counts to `stats`."""
    m = a.p_ctx.shape[3]
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


# --------------------------------------------------------------------------- attention function

class _State(threading.local):
    ctx: SqueezedContext | None = None
    method: str = "squeezed"
    block_q: int = DEFAULT_BLOCK_Q
    stats: LayerStats | None = None


_state = _State()


def _eval_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                    scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """AttentionInterface function: squeezed (the sqz op) or oracle attention of the user's tokens
    over the current SqueezedContext; records per-layer recall when a LayerStats is active."""
    st = _state
    if st.ctx is None:
        raise RuntimeError(f"attention implementation {EVAL_IMPL!r} used outside "
                           f"sqz_compile.evaluate.squeezed_mode(model, ctx): nothing to attend to")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx: cannot pick its context layer")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    causal = bool(query.shape[2] > 1 and attention_mask is None
                  and (is_causal if is_causal is not None else getattr(module, "is_causal", True)))
    ctx, bq = st.ctx, st.block_q
    analysis = None
    if st.method == "oracle" or st.stats is not None:
        analysis = analyse_selection(query, key, attention_mask, causal, ctx, layer, scale, bq)
        if st.stats is not None:
            record_stats(st.stats, layer, analysis, bq)
    lc = ctx.layer(layer)
    if st.method == "oracle":
        out = squeezed_attention_reference(
            query, key, value, attention_mask, lc.keys, lc.values, per_key_offsets(ctx, layer),
            analysis.oracle, lc.window_keys, lc.window_values, scale, causal, bq)
    else:
        out = torch.ops.sqz.squeezed_attention(
            query.contiguous(), key.contiguous(), value.contiguous(), attention_mask, lc.keys, lc.values,
            lc.centroids, lc.offsets, lc.window_keys, lc.window_values, lc.log_threshold,
            lc.coarse_centroids, lc.coarse_offsets, lc.coarse_log_threshold, scale, causal, ctx.budget, bq)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def squeezed_mode(model: torch.nn.Module, ctx: SqueezedContext, *, oracle: bool = False,
                  block_q: int = DEFAULT_BLOCK_Q, stats: LayerStats | None = None) -> Iterator[None]:
    """Run `model` with squeezed (or, with oracle=True, oracle) attention over `ctx` inside the
    block; the model's attention implementation is restored afterwards."""
    register_attention(EVAL_IMPL, _eval_attention)
    old = model.config._attn_implementation
    _state.ctx, _state.method, _state.block_q, _state.stats = ctx, ("oracle" if oracle else "squeezed"), block_q, stats
    try:
        set_attn_implementation(model, EVAL_IMPL)
        yield
    finally:
        _state.ctx, _state.stats = None, None
        set_attn_implementation(model, old)


# --------------------------------------------------------------------------- dense baseline

def context_kv(ctx: SqueezedContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Full context K/V [layers, H, L, D] in context order (un-permuted clusters + window)."""
    layers, h, n, d = ctx.keys.shape
    idx = ctx.perm.long().unsqueeze(-1).expand(layers, h, n, d)
    keys = torch.cat([torch.empty_like(ctx.keys).scatter_(2, idx, ctx.keys), ctx.window_keys], dim=2)
    values = torch.cat([torch.empty_like(ctx.values).scatter_(2, idx, ctx.values), ctx.window_values], dim=2)
    return keys, values


def dense_cache(model: torch.nn.Module, kv: tuple[torch.Tensor, torch.Tensor]):
    """A fresh DynamicCache holding the whole context (from `context_kv`), batch 1."""
    from transformers import DynamicCache

    keys, values = kv
    cache = DynamicCache(config=model.config)
    for i in range(keys.shape[0]):
        cache.update(keys[i].unsqueeze(0), values[i].unsqueeze(0), i)
    return cache


# --------------------------------------------------------------------------- running the model

def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def user_logits(model: torch.nn.Module, ids: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
    """Logits [1, M, V] (float32) of the user tokens `ids` at positions start, start+1, ...
    (context, if any, is in `cache`)."""
    ids = ids.to(_device(model))
    pos = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    out = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=cache is not None)
    return out.logits.float()


@torch.no_grad()
def greedy_answer(model: torch.nn.Module, user_ids: torch.Tensor, cache, tokenizer,
                  max_new_tokens: int = 12) -> list[int]:
    """Greedy continuation of `user_ids` (context in `cache`), stopping after an end-of-turn /
    EOS token or a token containing a newline; the stop token is included."""
    from transformers import DynamicCache

    cache = cache if cache is not None else DynamicCache(config=model.config)
    stops = {t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if t is not None}
    out: list[int] = []
    ids, done = user_ids, 0
    for _ in range(max_new_tokens):
        logits = user_logits(model, ids, cache, done)
        done += ids.shape[1]
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt in stops or "\n" in tokenizer.decode([nxt]):
            break
        ids = torch.tensor([[nxt]])
    return out


def answer_text(tokenizer, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


def compare_logits(dense: torch.Tensor, test: torch.Tensor, targets: torch.Tensor | None = None) -> dict[str, float]:
    """Sums over positions (rows of [P, V] logits): top-1 agreement, KL(dense || test) and, given
    targets [P], the test model's NLL."""
    ld = torch.log_softmax(dense.double(), -1)
    lt = torch.log_softmax(test.double(), -1)
    r = {"n": int(dense.shape[0]),
         "agree": int((dense.argmax(-1) == test.argmax(-1)).sum()),
         "kl_sum": float((ld.exp() * (ld - lt)).sum())}
    if targets is not None:
        r["nll_sum"] = float(-lt.gather(-1, targets.view(-1, 1).to(lt.device)).sum())
    return r


# --------------------------------------------------------------------------- experiments

@dataclass
class EvalSettings:
    """What to measure (the CLI's flags)."""

    contexts: tuple[int, ...] = (2048, 4096)
    keeps: tuple[float, ...] = (0.25, 0.125)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    needles: int = 3
    lookups: tuple[str, ...] = LOOKUPS
    modes: tuple[str, ...] = MODES
    oracle: tuple[str, ...] = ("flat-threshold", "flat-budget")  # variants with an oracle run: LOOKUP-MODE, all
    ppl_tokens: int = 512
    ppl_contexts: tuple[int, ...] | None = None
    tasks: tuple[str, ...] = ("ppl", "niah")
    max_new_tokens: int = 12
    prime: bool = True               # start the assistant's answer with the needle's lead
    block_q: int = DEFAULT_BLOCK_Q
    cluster_ratio: float = 0.05
    observation_window: int = 100
    sink_tokens: int = 0             # ablation: first tokens always attended (with_sink_tokens)
    essay_seed: int = 0
    ppl_seed: int = 1

    def variants(self) -> list[Variant]:
        return [Variant(k, lu, mo) for k in self.keeps for lu in self.lookups for mo in self.modes]

    def wants_oracle(self, v: Variant) -> bool:
        return "all" in self.oracle or f"{v.lookup}-{v.mode}" in self.oracle

    def squeeze_config(self) -> SqueezeConfig:
        return SqueezeConfig(keep=self.keeps[0], cluster_ratio=self.cluster_ratio,
                             hierarchical="hier" in self.lookups,
                             observation_window=self.observation_window)


def _variant_fields(v: Variant | None, method: str) -> dict[str, Any]:
    if v is None:
        return {"method": method, "keep": 1.0, "lookup": None, "mode": None}
    return {"method": method, "keep": v.keep, "lookup": v.lookup, "mode": v.mode}


def _scored_runs(settings: EvalSettings, base: SqueezedContext):
    """(variant, method, its context, LayerStats for squeezed runs else None) for every run a
    task scores: each variant squeezed, plus its oracle when asked for."""
    for v in settings.variants():
        vctx = variant_context(base, v)
        for method in ["squeezed"] + (["oracle"] if settings.wants_oracle(v) else []):
            yield v, method, vctx, LayerStats(base.num_layers) if method == "squeezed" else None


def _run_mode(model, vctx: SqueezedContext, method: str, settings: EvalSettings,
              stats: "LayerStats | None" = None):
    return squeezed_mode(model, vctx, oracle=method == "oracle", block_q=settings.block_q, stats=stats)


def run_ppl(model, tokenizer, settings: EvalSettings, context_len: int,
            emit: Callable[[dict], None]) -> None:
    """Perplexity / agreement / KL on an essay continuation for one context length."""
    from .assets import essay_tokens
    from .squeeze import squeeze

    t = settings.ppl_tokens
    ids = essay_tokens(tokenizer, context_len + t, seed=settings.ppl_seed)
    ctx_ids, user = ids[:, :context_len], ids[:, context_len:]
    targets = user[0, 1:]
    t0 = time.perf_counter()
    with torch.no_grad():
        full = model(input_ids=ids.to(_device(model)), logits_to_keep=t).logits.float()[0, :-1]
    base = squeeze(model, ctx_ids, settings.squeeze_config())
    via_cache = user_logits(model, user, dense_cache(model, context_kv(base)))[0, :-1]
    base = with_sink_tokens(base, settings.sink_tokens)
    dense = compare_logits(full, full, targets)
    dense["cache_vs_full_max_abs_logit_diff"] = float((via_cache - full).abs().max())
    emit({"task": "ppl", "context": context_len, **_variant_fields(None, "dense"), **dense,
          "seconds": round(time.perf_counter() - t0, 2)})
    for v, method, vctx, stats in _scored_runs(settings, base):
        t0 = time.perf_counter()
        with _run_mode(model, vctx, method, settings, stats):
            logits = user_logits(model, user)[0, :-1]
        rec = {"task": "ppl", "context": context_len, **_variant_fields(v, method),
               **compare_logits(full, logits, targets), "seconds": round(time.perf_counter() - t0, 2)}
        if stats is not None:
            rec["layers"] = stats.to_json()
        emit(rec)


def run_niah(model, tokenizer, settings: EvalSettings, context_len: int, needle_index: int, depth: float,
             emit: Callable[[dict], None]) -> None:
    """One needle case: dense answer, then every variant (squeezed, optional oracle): greedy
    answer + hit, teacher-forced agreement/KL on the dense answer, per-layer recall."""
    from .squeeze import squeeze

    needle = NEEDLES[needle_index]
    ctx_ids, user, where = niah_prompt(tokenizer, needle, context_len, depth, settings.essay_seed,
                                       settings.prime)
    case = {"task": "niah", "context": context_len, "needle": needle_index, "depth": depth,
            "context_tokens": ctx_ids.shape[1], "needle_token": where}
    t0 = time.perf_counter()
    base = squeeze(model, ctx_ids, settings.squeeze_config())
    kv = context_kv(base)
    base = with_sink_tokens(base, settings.sink_tokens)
    gen = greedy_answer(model, user, dense_cache(model, kv), tokenizer, settings.max_new_tokens)
    tf = torch.cat([user, torch.tensor([gen])], dim=1)
    scored = slice(user.shape[1] - 1, tf.shape[1] - 1)   # predictions of the dense answer tokens
    dense_logits = user_logits(model, tf, dense_cache(model, kv))[0, scored]
    ans = answer_text(tokenizer, gen)
    emit({**case, **_variant_fields(None, "dense"), "answer": ans, "hit": needle.answer in ans.lower(),
          **compare_logits(dense_logits, dense_logits), "seconds": round(time.perf_counter() - t0, 2)})
    for v, method, vctx, stats in _scored_runs(settings, base):
        t0 = time.perf_counter()
        with _run_mode(model, vctx, method, settings, stats):
            logits = user_logits(model, tf)[0, scored]
        with _run_mode(model, vctx, method, settings):
            ans = answer_text(tokenizer, greedy_answer(model, user, None, tokenizer, settings.max_new_tokens))
        rec = {**case, **_variant_fields(v, method), "answer": ans, "hit": needle.answer in ans.lower(),
               **compare_logits(dense_logits, logits), "seconds": round(time.perf_counter() - t0, 2)}
        if stats is not None:
            rec["layers"] = stats.to_json()
        emit(rec)


def run(model, tokenizer, settings: EvalSettings, emit: Callable[[dict], None],
        log: Callable[[str], None] = lambda s: None) -> None:
    """Every configured experiment, emitting one record per (case, method, variant)."""
    if "ppl" in settings.tasks:
        for n in settings.ppl_contexts or settings.contexts:
            log(f"ppl context={n}")
            run_ppl(model, tokenizer, settings, n, emit)
    if "niah" in settings.tasks:
        for n in settings.contexts:
            for i in range(settings.needles):
                for d in settings.depths:
                    log(f"niah context={n} needle={i} depth={d}")
                    run_niah(model, tokenizer, settings, n, i, d, emit)


# --------------------------------------------------------------------------- summary and reports

def _key(r: dict) -> tuple:
    return (r["method"], r["keep"], r["lookup"], r["mode"])


def _label(key: tuple) -> str:
    method, keep, lookup, mode = key
    return "dense" if method == "dense" else f"{method} keep={keep:g} {lookup} {mode}"


def summarize(records: Sequence[dict]) -> list[dict]:
    """One row per (method, keep, lookup, mode) and context length with NIAH hits, PPL, ΔPPL,
    agreement, KL and layer-averaged recall."""
    dense_ppl = {r["context"]: math.exp(r["nll_sum"] / r["n"]) for r in records
                 if r["task"] == "ppl" and r["method"] == "dense"}
    groups: dict[tuple, dict] = {}
    for r in records:
        g = groups.setdefault((*_key(r), r["context"]), {"niah": [], "ppl": []})
        g[r["task"]].append(r)
    rows = []
    for (method, keep, lookup, mode, n), g in sorted(groups.items(), key=lambda kv: (
            kv[0][0] != "dense", -kv[0][1], str(kv[0][2]), str(kv[0][3]), kv[0][0], kv[0][4])):
        row: dict[str, Any] = {"method": method, "keep": keep, "lookup": lookup, "mode": mode, "context": n}
        if g["niah"]:
            row["niah_hits"] = sum(bool(r["hit"]) for r in g["niah"])
            row["niah_cases"] = len(g["niah"])
            row["answer_agree"] = sum(r["agree"] for r in g["niah"]) / max(1, sum(r["n"] for r in g["niah"]))
            row["answer_kl"] = sum(r["kl_sum"] for r in g["niah"]) / max(1, sum(r["n"] for r in g["niah"]))
        for r in g["ppl"]:
            row["ppl"] = math.exp(r["nll_sum"] / r["n"])
            if n in dense_ppl:
                row["delta_ppl"] = row["ppl"] / dense_ppl[n] - 1.0
            row["ppl_agree"] = r["agree"] / r["n"]
            row["ppl_kl"] = r["kl_sum"] / r["n"]
            if "cache_vs_full_max_abs_logit_diff" in r:
                row["cache_vs_full_max_abs_logit_diff"] = r["cache_vs_full_max_abs_logit_diff"]
        layered = [r["layers"] for r in g["niah"] + g["ppl"] if "layers" in r]
        if layered:
            sums = {f: [sum(x) for x in zip(*(l[f] for l in layered))] for f in LayerStats.FIELDS}
            per_layer = LayerStats.metrics(sums)
            row["per_layer"] = per_layer
            tot = {f: [sum(sums[f])] for f in LayerStats.FIELDS}
            row.update({k: v[0] for k, v in LayerStats.metrics(tot).items()})
        rows.append(row)
    return rows


def _fmt(x: Any, pct: bool = False, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if pct:
        return f"{100 * x:+.2f}%" if signed else f"{100 * x:.1f}%"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def targets_check(rows: Sequence[dict], keep: float = 0.125) -> list[str]:
    """The issue's targets at `keep` (hits equal to dense, ΔPPL <= +1%, top-1 agreement >= 98%)."""
    dense = {r["context"]: r for r in rows if r["method"] == "dense"}
    out = []
    for r in rows:
        if r["method"] != "squeezed" or abs(r["keep"] - keep) > 1e-9:
            continue
        name = f"{r['lookup']} {r['mode']} @ {r['context']}"
        d = dense.get(r["context"], {})
        parts = []
        if "niah_hits" in r and "niah_hits" in d:
            ok = r["niah_hits"] >= d["niah_hits"]
            parts.append(f"hits {r['niah_hits']}/{r['niah_cases']} vs dense {d['niah_hits']} "
                         f"{'✅' if ok else '❌'}")
        if "delta_ppl" in r:
            parts.append(f"ΔPPL {_fmt(r['delta_ppl'], True, True)} {'✅' if r['delta_ppl'] <= 0.01 else '❌'}")
        agrees = [(k, r[k]) for k in ("ppl_agree", "answer_agree") if k in r]
        for k, a in agrees:
            parts.append(f"{'PPL' if k == 'ppl_agree' else 'answer'} agreement {_fmt(a, True)} "
                         f"{'✅' if a >= 0.98 else '❌'}")
        out.append(f"- {name}: " + "; ".join(parts))
    return out


def write_markdown(result: dict, path: str) -> None:
    """Tables (summary, per-layer recall at the smallest keep, targets) as markdown."""
    rows = result["summary"]
    meta = result["meta"]
    lines = [f"# Accuracy: {meta.get('model', '?')}",
             "",
             f"Status: **{meta.get('status')}** · device `{meta.get('device')}` · dtype `{meta.get('dtype')}` · "
             f"torch {meta.get('torch')} · transformers {meta.get('transformers')} · "
             f"command `{meta.get('command')}`",
             "",
             "Squeezed = `torch.ops.sqz.squeezed_attention` run through a transformers attention function "
             "(`sqz_compile.evaluate`); oracle = same number of clustered keys per (layer, KV head, query block) "
             "as the lookup, chosen by true attention probability. NIAH hits: answers containing the needle's key "
             "word; agreement/KL on the dense answer tokens (teacher-forced) and on the PPL continuation. "
             "ΔPPL = PPL/PPL_dense − 1. kept = clustered context keys actually kept (window always kept); "
             "mass recall = Σp(lookup keys)/Σp(oracle keys); key recall = |lookup ∩ oracle|/|oracle|.",
             "",
             *(["## Findings", "", meta["notes"].strip(), "", "## Results", ""] if meta.get("notes") else []),
             "| context | method | keep | lookup | mode | NIAH hits | answer agree | answer KL | PPL | ΔPPL | "
             "PPL agree | PPL KL | kept | mass recall | key recall | lost mass (lookup / oracle) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["context"]):
        hits = f"{r['niah_hits']}/{r['niah_cases']}" if "niah_hits" in r else "–"
        lost = (f"{_fmt(r.get('lost_mass_lookup'))} / {_fmt(r.get('lost_mass_oracle'))}"
                if "lost_mass_lookup" in r else "–")
        lines.append(
            f"| {r['context']} | {r['method']} | {r['keep']:g} | {r['lookup'] or '–'} | {r['mode'] or '–'} | "
            f"{hits} | "
            f"{_fmt(r.get('answer_agree'), True)} | {_fmt(r.get('answer_kl'))} | {_fmt(r.get('ppl'))} | "
            f"{_fmt(r.get('delta_ppl'), True, True)} | {_fmt(r.get('ppl_agree'), True)} | {_fmt(r.get('ppl_kl'))} | "
            f"{_fmt(r.get('kept_fraction'), True)} | {_fmt(r.get('mass_recall'), True)} | "
            f"{_fmt(r.get('key_recall'), True)} | {lost} |")
    keeps = sorted({r["keep"] for r in rows if r["method"] == "squeezed"})
    if keeps:
        k = 0.125 if 0.125 in keeps else keeps[0]
        lines += ["", f"## Targets at keep = {k:g}", ""] + targets_check(rows, k)
        lines += ["", f"## Per-layer recall vs the oracle, keep = {k:g} (all contexts pooled per row)", ""]
        sel = [r for r in rows if r["method"] == "squeezed" and r["keep"] == k and "per_layer" in r]
        if sel:
            head = "| layer | " + " | ".join(f"{r['lookup']} {r['mode']} @{r['context']} mass / key / lost"
                                            for r in sel) + " |"
            lines += [head, "|---" * (len(sel) + 1) + "|"]
            for li in range(len(sel[0]["per_layer"]["mass_recall"])):
                cells = [f"{_fmt(r['per_layer']['mass_recall'][li], True)} / "
                         f"{_fmt(r['per_layer']['key_recall'][li], True)} / "
                         f"{_fmt(r['per_layer']['lost_mass_lookup'][li])}" for r in sel]
                lines.append(f"| {li} | " + " | ".join(cells) + " |")
    dense_rows = [r for r in rows if "cache_vs_full_max_abs_logit_diff" in r]
    if dense_rows:
        lines += ["", "Dense baseline check (KV cache from the SqueezedContext, user tokens at positions 0.. vs "
                  "the model over the full prompt at natural positions), max |Δlogit|: "
                  + ", ".join(f"{r['context']}: {r['cache_vs_full_max_abs_logit_diff']:.2e}" for r in dense_rows)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(result: dict, path: str) -> None:
    """Hit rate, ΔPPL and per-layer mass recall vs keep. Colour: lookup + mode; line: squeezed
    (solid) / oracle (dashed); marker: context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    colours = {(lu, mo): f"C{i}" for i, (lu, mo) in enumerate((lu, mo) for lu in LOOKUPS for mo in MODES)}
    contexts = sorted({r["context"] for r in rows})
    markers = dict(zip(contexts, "osD^v<>p*"))
    lines = dict(zip(contexts, ("-", "-.", ":", (0, (5, 1)), (0, (1, 1)))))
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["method"] != "dense":
            series.setdefault((r["method"], r["lookup"], r["mode"], r["context"]), []).append(r)
    for (method, lookup, mode, n), rs in sorted(series.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=lambda r: r["keep"])
        kw = dict(color=colours[(lookup, mode)], marker=markers[n], ls="--" if method == "oracle" else "-",
                  alpha=0.6 if method == "oracle" else 1.0, label=f"{method} {lookup} {mode} @{n}")
        pts = [(r["keep"], r["niah_hits"] / r["niah_cases"]) for r in rs if "niah_hits" in r]
        if pts:
            axes[0].plot(*zip(*pts), **kw)
        pts = [(r["keep"], 100 * r["delta_ppl"]) for r in rs if "delta_ppl" in r]
        if pts:
            axes[1].plot(*zip(*pts), **kw)
    for r in rows:
        if r["method"] == "dense" and "niah_hits" in r:
            axes[0].axhline(r["niah_hits"] / r["niah_cases"], color="k", lw=0.8, ls=":")
    axes[1].axhline(1.0, color="r", lw=0.8, ls=":")
    for ax, title, yl in ((axes[0], "NIAH hit rate (dotted: dense)", "hit rate"),
                          (axes[1], "ΔPPL vs dense (red dotted: +1% target)", "ΔPPL %")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("keep")
        ax.set_ylabel(yl)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    keeps = sorted({r["keep"] for r in rows if r["method"] == "squeezed"})
    k = 0.125 if 0.125 in keeps else (keeps[0] if keeps else None)
    for r in rows:
        if r["method"] == "squeezed" and r["keep"] == k and "per_layer" in r:
            axes[2].plot(r["per_layer"]["mass_recall"], color=colours[(r["lookup"], r["mode"])],
                         ls=lines[r["context"]], marker=markers[r["context"]], ms=3,
                         label=f"{r['lookup']} {r['mode']} @{r['context']}")
    axes[2].set_title(f"per-layer mass recall vs oracle, keep={k:g}" if k else "per-layer recall")
    axes[2].set_xlabel("layer")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=6)
    sub = result.get("meta", {}).get("command", "")
    if sub:
        fig.suptitle(f"{result['meta'].get('model', '')} · {sub}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _atomic_json(obj: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)


def write_reports(result: dict, json_path: str, plot: bool = True) -> None:
    """accuracy.json plus the .md table (and the .png plot, unless plot=False) beside it."""
    result["summary"] = summarize(result["records"])
    _atomic_json(result, json_path)
    stem = os.path.splitext(json_path)[0]
    write_markdown(result, stem + ".md")
    if plot:
        write_plot(result, stem + ".png")


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    d = EvalSettings()
    p = argparse.ArgumentParser(prog="sqz eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=list(d.contexts), help="context lengths (tokens)")
    p.add_argument("--keeps", type=float, nargs="+", default=list(d.keeps))
    p.add_argument("--depths", type=float, nargs="+", default=list(d.depths), help="needle depths in [0, 1]")
    p.add_argument("--needles", type=int, default=d.needles, help=f"how many needles (1..{len(NEEDLES)})")
    p.add_argument("--lookups", nargs="+", choices=LOOKUPS, default=list(d.lookups))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(d.modes))
    p.add_argument("--oracle", nargs="+", default=list(d.oracle),
                   help="variants that also get an oracle run: LOOKUP-MODE names (e.g. flat-threshold), all, none")
    p.add_argument("--tasks", nargs="+", choices=("ppl", "niah"), default=list(d.tasks))
    p.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens, help="user tokens scored for PPL")
    p.add_argument("--ppl-contexts", type=int, nargs="+", default=None, help="default: --contexts")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--no-prime", action="store_true",
                   help="do not start the assistant's answer with the needle's lead (longer answers)")
    p.add_argument("--block-q", type=int, default=d.block_q)
    p.add_argument("--cluster-ratio", type=float, default=d.cluster_ratio)
    p.add_argument("--observation-window", type=int, default=d.observation_window)
    p.add_argument("--sink-tokens", type=int, default=d.sink_tokens,
                   help="ablation: attend the first K context tokens always (moved out of the clusters)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/results/accuracy.json",
                   help="JSON results; the .md table and .png plot go beside it")
    p.add_argument("--report-only", action="store_true", help="rewrite .md/.png from an existing --out JSON")
    p.add_argument("--notes", default=None, help="markdown file whose text is stored in the JSON and shown "
                                                 "under 'Findings' in the .md (e.g. with --report-only)")
    return p


def settings_from_args(a: argparse.Namespace) -> EvalSettings:
    if not 1 <= a.needles <= len(NEEDLES):
        raise SystemExit(f"--needles must be 1..{len(NEEDLES)}")
    valid = {"all", "none"} | {f"{lu}-{mo}" for lu in LOOKUPS for mo in MODES}
    if set(a.oracle) - valid:
        raise SystemExit(f"--oracle {sorted(set(a.oracle) - valid)}: use names from {sorted(valid)}")
    if any(not 0.0 < k <= 1.0 for k in a.keeps):
        raise SystemExit("--keeps must lie in (0, 1]")
    return EvalSettings(contexts=tuple(a.contexts), keeps=tuple(a.keeps), depths=tuple(a.depths),
                        needles=a.needles, lookups=tuple(a.lookups), modes=tuple(a.modes), oracle=tuple(a.oracle),
                        ppl_tokens=a.ppl_tokens, ppl_contexts=tuple(a.ppl_contexts) if a.ppl_contexts else None,
                        tasks=tuple(a.tasks), max_new_tokens=a.max_new_tokens, prime=not a.no_prime, block_q=a.block_q,
                        cluster_ratio=a.cluster_ratio, observation_window=a.observation_window,
                        sink_tokens=a.sink_tokens)


def main(argv: Sequence[str] | None = None) -> int:
    """`sqz eval`: run the accuracy benchmark on SmolLM2-135M-Instruct and the Paul Graham essays."""
    import sys

    a = build_parser().parse_args(argv)
    if a.report_only:
        with open(a.out, encoding="utf-8") as f:
            result = json.load(f)
        if a.notes:
            with open(a.notes, encoding="utf-8") as f:
                result["meta"]["notes"] = f.read()
        write_reports(result, a.out)
        return 0
    settings = settings_from_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers

    from .assets import load_smollm2

    model, tok = load_smollm2(dtype=getattr(torch, a.dtype), device=a.device)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    result: dict[str, Any] = {
        "meta": {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)", "device": str(_device(model)),
                 "device_name": (torch.cuda.get_device_name() if _device(model).type == "cuda"
                                 else platform.processor() or platform.machine()),
                 "dtype": a.dtype, "torch": torch.__version__, "transformers": transformers.__version__,
                 "threads": torch.get_num_threads(), "command": "sqz eval " + " ".join(argv or sys.argv[1:]),
                 "settings": dataclasses.asdict(settings), "needles": [dataclasses.asdict(n) for n in NEEDLES],
                 "status": "running", "started": time.strftime("%Y-%m-%d %H:%M:%S")},
        "records": []}
    t0 = time.perf_counter()

    def emit(rec: dict) -> None:
        result["records"].append(rec)
        result["meta"]["elapsed_s"] = round(time.perf_counter() - t0, 1)
        write_reports(result, a.out, plot=False)
        print(f"  {_label(_key(rec))}: " + ", ".join(
            f"{k}={rec[k]}" for k in ("answer", "hit", "agree", "n", "seconds") if k in rec), flush=True)

    run(model, tok, settings, emit, log=lambda s: print(s, flush=True))
    result["meta"]["status"] = "complete"
    result["meta"]["elapsed_s"] = round(time.perf_counter() - t0, 1)
    write_reports(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
