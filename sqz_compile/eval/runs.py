"""Running the experiments: context variants (flat/hierarchical, threshold/budget),
the dense baseline over a full-context KV cache, PPL and NIAH runs."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import torch

from ..context import SqueezedContext
from ..attention_function import squeezed_mode
from ..transformers_compat import cache_kwargs
from .needles import NEEDLES, niah_prompt
from .oracle import LayerStats
from .settings import LOOKUPS, MODES, EvalSettings, Variant  # noqa: F401  (re-exported)


# --------------------------------------------------------------------------- variants

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


def variant_context(base: SqueezedContext, v: Variant) -> SqueezedContext:
    """Derive `v` from one squeeze (no re-clustering): drop/keep the coarse level, recalibrate
    the thresholds for v.keep, and for budget mode set budget = keep * clustered keys (bounded
    mode: max_dropped_mass = v.eps)."""
    if v.lookup not in LOOKUPS or v.mode not in MODES:
        raise ValueError(f"unknown variant {v}: lookup must be one of {LOOKUPS}, mode one of {MODES}")
    if v.lookup == "hier" and not base.hierarchical:
        raise ValueError("a hierarchical variant needs a context squeezed with hierarchical=True")
    ctx = (flat_view(base) if v.lookup == "flat" else base).with_keep(v.keep)
    if v.mode == "bounded":
        cfg = dataclasses.replace(ctx.config, max_dropped_mass=float(v.eps))
        ctx = dataclasses.replace(ctx, config=cfg, fingerprint=dict(ctx.fingerprint), extra=dict(ctx.extra))
    if v.mode == "budget":
        ctx = with_budget(ctx, round(v.keep * base.keys.shape[2]))
    return ctx


# --------------------------------------------------------------------------- dense baseline

def context_kv(ctx: SqueezedContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Full context K/V [layers, H, L, D] in context order (un-permuted clusters + window)."""
    pos = torch.cat([ctx.perm, ctx.window_positions], dim=2).long()
    idx = pos.unsqueeze(-1).expand(*pos.shape, ctx.head_dim)
    k, v = ctx.dense_kv()
    keys = torch.cat([k, ctx.window_keys], dim=2)
    values = torch.cat([v, ctx.window_values], dim=2)
    return torch.empty_like(keys).scatter_(2, idx, keys), torch.empty_like(values).scatter_(2, idx, values)


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
    out = model(input_ids=ids, position_ids=pos, use_cache=cache is not None, **cache_kwargs(model, cache))
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


def compare_logits(dense: torch.Tensor, test: torch.Tensor, targets: torch.Tensor | None = None) -> dict[str, Any]:
    """Sums over positions (rows of [P, V] logits): top-1 agreement, KL(dense || test) and, given
    targets [P], the test model's NLL, also per token (`nll_tokens`: paired comparisons of runs)."""
    ld = torch.log_softmax(dense.double(), -1)
    lt = torch.log_softmax(test.double(), -1)
    r = {"n": int(dense.shape[0]),
         "agree": int((dense.argmax(-1) == test.argmax(-1)).sum()),
         "kl_sum": float((ld.exp() * (ld - lt)).sum())}
    if targets is not None:
        nll = -lt.gather(-1, targets.view(-1, 1).to(lt.device))[:, 0]
        r["nll_sum"] = float(nll.sum())
        r["nll_tokens"] = [round(float(x), 6) for x in nll]
    return r


# --------------------------------------------------------------------------- experiments

def _variant_fields(v: Variant | None, method: str) -> dict[str, Any]:
    if v is None:
        return {"method": method, "keep": 1.0, "lookup": None, "mode": None}
    return {"method": method, "keep": v.keep, "lookup": v.lookup, "mode": v.mode,
            **({"eps": v.eps} if v.eps is not None else {})}


def _scored_runs(settings: EvalSettings, base: SqueezedContext):
    """(variant, method, its context, LayerStats for squeezed runs else None) for every run a
    task scores: each variant squeezed, plus its oracle when asked for."""
    for v in settings.variants():
        vctx = variant_context(base, v)
        for method in ["squeezed"] + (["oracle"] if settings.wants_oracle(v) else []):
            yield v, method, vctx, LayerStats(base.num_layers) if method == "squeezed" else None


def _run_mode(model, vctx: SqueezedContext, method: str, settings: EvalSettings,
              stats: "LayerStats | None" = None, decode_only: bool = False):
    return squeezed_mode(model, vctx, oracle=method == "oracle", block_q=settings.block_q, stats=stats,
                         decode_only=decode_only)


def run_ppl(model, tokenizer, settings: EvalSettings, context_len: int,
            emit: Callable[[dict], None], seed: int | None = None) -> None:
    """Perplexity / agreement / KL on an essay continuation for one context length (essay order
    `seed`, default settings.ppl_seed)."""
    from ..assets import essay_tokens
    from ..squeeze import squeeze

    t = settings.ppl_tokens
    seed = settings.ppl_seed if seed is None else seed
    ids = essay_tokens(tokenizer, context_len + t, seed=seed)
    ctx_ids, user = ids[:, :context_len], ids[:, context_len:]
    targets = user[0, 1:]
    t0 = time.perf_counter()
    with torch.no_grad():
        full = model(input_ids=ids.to(_device(model)), logits_to_keep=t).logits.float()[0, :-1]
    base = squeeze(model, ctx_ids, settings.squeeze_config())
    via_cache = user_logits(model, user, dense_cache(model, context_kv(base)))[0, :-1]
    dense = compare_logits(full, full, targets)
    dense["cache_vs_full_max_abs_logit_diff"] = float((via_cache - full).abs().max())
    if base.kv_bits < 16:  # dense attention over the dequantized context K/V: the quantization alone
        over = compare_logits(full, via_cache, targets)
        dense.update(dense_kv_nll_sum=over["nll_sum"], dense_kv_nll_tokens=over["nll_tokens"])
    emit({"task": "ppl", "context": context_len, "ppl_seed": seed, **_variant_fields(None, "dense"), **dense,
          "seconds": round(time.perf_counter() - t0, 2)})
    for v, method, vctx, stats in _scored_runs(settings, base):
        t0 = time.perf_counter()
        with _run_mode(model, vctx, method, settings, stats):
            logits = user_logits(model, user)[0, :-1]
        rec = {"task": "ppl", "context": context_len, "ppl_seed": seed, **_variant_fields(v, method),
               **compare_logits(full, logits, targets), "seconds": round(time.perf_counter() - t0, 2)}
        if stats is not None:
            rec["layers"] = stats.to_json()
        emit(rec)


def run_niah(model, tokenizer, settings: EvalSettings, context_len: int, needle_index: int, depth: float,
             emit: Callable[[dict], None]) -> None:
    """One needle case: dense answer, then every variant (squeezed, optional oracle): greedy
    answer + hit, teacher-forced agreement/KL on the dense answer, per-layer recall."""
    from ..squeeze import squeeze

    needle = NEEDLES[needle_index]
    ctx_ids, user, where = niah_prompt(tokenizer, needle, context_len, depth, settings.essay_seed,
                                       settings.prime)
    case = {"task": "niah", "context": context_len, "needle": needle_index, "depth": depth,
            "context_tokens": ctx_ids.shape[1], "needle_token": where}
    t0 = time.perf_counter()
    base = squeeze(model, ctx_ids, settings.squeeze_config())
    kv = context_kv(base)
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
        with _run_mode(model, vctx, method, settings, stats, decode_only=True):
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
            for seed in range(settings.ppl_seed, settings.ppl_seed + settings.ppl_segments):
                log(f"ppl context={n} segment seed={seed}")
                run_ppl(model, tokenizer, settings, n, emit, seed)
    if "niah" in settings.tasks:
        for n in settings.contexts:
            for i in range(settings.needles):
                for d in settings.depths:
                    log(f"niah context={n} needle={i} depth={d}")
                    run_niah(model, tokenizer, settings, n, i, d, emit)
