"""The offline squeeze: fixed-context token ids -> SqueezedContext (see context.py for the layout).

    ctx = squeeze(model, context_ids, SqueezeConfig(keep=0.1))

1. prefill the context in chunks, capturing post-RoPE K/V of every layer and the observation
   window's queries (capture_context below; keys rotated for positions p - L);
2. K-means per (layer, KV head), all at once as one batched [layers*H, N, D] problem (kmeans.py),
   optionally a coarse level over each head's centroids;
3. sort each head's K/V by cluster (coarse parent first when hierarchical), store centroids
   (means of the original keys, float32) and offsets;
4. calibrate the log thresholds on the window queries (calibrate.py).

Capture runs the model over the context in chunks with a DynamicCache and explicit
`position_ids = arange(start, end) - L` (see context.py: keys are rotated for positions p - L), then
reads every layer's post-RoPE K/V from the cache. The observation window's post-RoPE queries are
recorded by a custom attention function registered with `transformers.AttentionInterface` as
"sqz_capture", which delegates to SDPA. The user's model is restored afterwards.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ..config import SqueezeConfig
from ..context import SqueezedContext
from ..distributed import KVShard, kv_shard
from ..transformers_compat import (UnsupportedModelError, cache_kwargs, cache_layer, check_supported,
                                   drop_cache_layer, model_config, model_fingerprint, num_layers,
                                   output_cache, register_attention, set_attn_implementation)
from .kmeans import cluster_counts, cluster_sums, kmeans

CAPTURE_IMPL = "sqz_capture"


@dataclass
class Captured:
    """What one prefill of the context yields (all stacked over layers on dim 0)."""

    keys: torch.Tensor          # [layers, H, L, D] model dtype, post-RoPE (positions p - L)
    values: torch.Tensor        # [layers, H, L, D]
    queries: torch.Tensor       # [layers, Hq, W, D] float32: the last W context tokens (Hq: this rank's)
    scaling: float              # the attention's softmax scale


# --------------------------------------------------------------------------- query capture

class _CaptureState:
    def __init__(self, num_layers: int, window_start: int, window: int) -> None:
        self.num_layers = num_layers
        self.window_start = window_start  # context position of the first window token
        self.window = window
        # [layers, Hq, W, D] float32, filled chunk by chunk; allocated at the first call, whose query
        # shows the heads this rank computes (all, or its piece under tensor parallelism)
        self.queries: torch.Tensor | None = None
        self.chunk_start = 0
        self.scaling: dict[int, float] = {}
        self._order: dict[int, int] = {}  # fallback layer index by first-call order

    def layer_index(self, module: torch.nn.Module) -> int:
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            idx = self._order.setdefault(id(module), len(self._order))
        return int(idx)


_local = threading.local()


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """AttentionInterface function: record the window's queries, then run SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    st: _CaptureState | None = getattr(_local, "state", None)
    if st is not None:
        li = st.layer_index(module)
        scaling = kwargs.get("scaling")
        st.scaling[li] = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        q_len = query.shape[2]
        lo = max(st.window_start, st.chunk_start)
        hi = st.chunk_start + q_len
        if st.queries is None:
            st.queries = query.new_zeros(st.num_layers, query.shape[1], st.window, query.shape[3],
                                         dtype=torch.float32)
        if lo < hi and li < st.num_layers:
            st.queries[li, :, lo - st.window_start:hi - st.window_start] = \
                query[0, :, lo - st.chunk_start:, :].to(st.queries.device, torch.float32)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)



@contextlib.contextmanager
def _capturing(model: torch.nn.Module, state: _CaptureState) -> Iterator[None]:
    """Switch `model` to the capture attention (eval mode, no grad) and restore it afterwards."""
    register_attention(CAPTURE_IMPL, _capture_attention)
    old_impl = model.config._attn_implementation
    was_training = model.training
    _local.state = state
    try:
        set_attn_implementation(model, CAPTURE_IMPL)
        model.eval()
        with torch.no_grad():
            yield
    finally:
        _local.state = None
        set_attn_implementation(model, old_impl)
        model.train(was_training)


def show_progress(progress: bool | None) -> bool:
    """Default: show tqdm bars only on an interactive terminal."""
    return bool(sys.stderr.isatty()) if progress is None else bool(progress)


def capture_context(model: torch.nn.Module, ids: torch.Tensor, window: int, chunk_size: int,
                    progress: bool | None = None) -> Captured:
    """Prefill `ids` [1, L] in chunks and capture post-RoPE K/V of every layer and the queries of
    the last `window` tokens (positions p - L, see context.py)."""
    from tqdm.auto import tqdm

    cfg = model_config(model)
    L = ids.shape[1]
    layers = num_layers(cfg)
    device = next(model.parameters()).device
    ids = ids.to(device)
    state = _CaptureState(layers, L - window, window)
    base = getattr(model, "base_model", model)
    cache = None
    with _capturing(model, state):
        starts = range(0, L, chunk_size)
        for start in tqdm(starts, desc="sqz prefill", unit="chunk", disable=not show_progress(progress)):
            end = min(L, start + chunk_size)
            state.chunk_start = start
            pos = torch.arange(start - L, end - L, device=device).unsqueeze(0)
            out = base(input_ids=ids[:, start:end], position_ids=pos, use_cache=True, **cache_kwargs(base, cache))
            cache = output_cache(out)
            del out
    if len(state.scaling) != layers:
        raise UnsupportedModelError(
            f"captured attention in {len(state.scaling)} of {layers} layers: {type(model).__name__} "
            f"does not route every layer through transformers.AttentionInterface")
    scales = set(state.scaling.values())
    if len(scales) != 1:
        raise UnsupportedModelError(f"layers use different attention scales {sorted(scales)}")
    k0, _ = cache_layer(cache, 0)
    keys = torch.empty(layers, k0.shape[1], L, k0.shape[3], dtype=k0.dtype, device=device)
    values = torch.empty_like(keys)
    for i in range(layers):
        k, v = cache_layer(cache, i)
        if k.shape[2] != L:
            raise UnsupportedModelError(
                f"layer {i} cached {k.shape[2]} of {L} context tokens (sliding window or cache limit?)")
        keys[i].copy_(k[0])
        values[i].copy_(v[0])
        drop_cache_layer(cache, i)
    scaling = scales.pop()
    if not math.isfinite(scaling) or scaling <= 0:
        raise UnsupportedModelError(f"attention scale {scaling} is not a positive number")
    queries = state.queries
    if queries.shape[3] != keys.shape[3] or values.shape[3] != keys.shape[3]:
        raise UnsupportedModelError(
            f"{type(model).__name__}: queries [x {queries.shape[3]}], keys [x {keys.shape[3]}], values "
            f"[x {values.shape[3]}]: the context layout needs one head dim for queries, keys and values")
    return Captured(keys, values, queries, scaling)


# --------------------------------------------------------------------------- clustering and layout

def token_hash(ids: torch.Tensor) -> str:
    """sha256 of the context token ids (as int64), identifying the context in saved files."""
    return hashlib.sha256(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def cluster_counts_for(n: int, config: SqueezeConfig) -> tuple[int, int]:
    """(C, Cc) for n clustered keys: round(ratio * n) clamped to [1, n] and [1, C]."""
    c = min(max(round(config.cluster_ratio * n), 1), n)
    return c, min(max(round(config.coarse_ratio * n), 1), c)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(counts.shape[0], 1), counts.cumsum(1)], dim=1).to(torch.int32)


def _means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """sums / counts with zeros for empty clusters (float32)."""
    return sums / counts.clamp(min=1).unsqueeze(-1).to(sums.dtype)


def _with_variance(means: torch.Tensor, mean_squares: torch.Tensor) -> torch.Tensor:
    """[..., D] means and means of squares -> [..., 2D] [mean, per-channel variance] (clamped at
    0 against rounding): the centroids SqueezeConfig.cluster_variance stores."""
    return torch.cat([means, (mean_squares - means * means).clamp_(min=0)], dim=-1)


def cluster_radii(x: torch.Tensor, assign: torch.Tensor, means: torch.Tensor, step: int = 16) -> torch.Tensor:
    """[B, C] float32: the largest distance of a cluster's points x [B, N, D] from its mean
    [B, C, D] (0 for an empty cluster), a few problems at a time. With it every key's logit obeys
    q.k <= q.mu + |q| r (Cauchy-Schwarz): the certified bound of max_dropped_mass."""
    B, N, D = x.shape
    out = torch.zeros(B, means.shape[1], dtype=torch.float32, device=x.device)
    for b in range(0, B, step):
        a = assign[b:b + step]
        mu = means[b:b + step].float().gather(1, a.unsqueeze(-1).expand(-1, -1, D))
        dist = (x[b:b + step].float() - mu).norm(dim=-1)
        out[b:b + step].scatter_reduce_(1, a, dist, reduce="amax")
    return out * (1 + 1e-5)  # a margin so that float32 rounding never breaks the bound


def _gather_tokens(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [layers, H, L, D], pos [layers, H, n] -> x at those token positions [layers, H, n, D]."""
    return x.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])).contiguous()


def window_probs(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """The attention probabilities [g, W, L] (float32) of the last W context tokens' queries
    [g, W, D] over one KV head's context keys [L, D]: causal softmax of q.k * scaling."""
    L, W = keys.shape[0], queries.shape[1]
    logits = torch.matmul(queries.to(keys.device, torch.float32), keys.float().T) * scaling
    visible = torch.arange(L, device=keys.device)[None, :] <= torch.arange(L - W, L, device=keys.device)[:, None]
    return logits.masked_fill(~visible, float("-inf")).softmax(-1)


def dense_positions(keys: torch.Tensor, window_queries: torch.Tensor, scaling: float, lo: int, hi: int,
                    count: int) -> torch.Tensor:
    """Per (layer, KV head), the `count` context positions in [lo, hi) that the observation window
    attends to most: mean over the window's queries of the largest probability any query head of
    the GQA group gives the key (causal softmax over the whole context). [layers, H, count] int64.

    These are the keys a cluster's mean would hide although the model attends to them whatever
    the query (attention sinks and the like). One layer and KV head at a time, so a 128K context
    needs [group, W, L] floats of scratch, not [layers, Hq, W, L]."""
    layers, H, L, D = keys.shape
    g = window_queries.shape[1] // H
    out = torch.zeros(layers, H, count, dtype=torch.long, device=keys.device)
    if count == 0:
        return out
    for i in range(layers):
        for h in range(H):
            p = window_probs(window_queries[i, h * g:(h + 1) * g], keys[i, h], scaling)  # [g, W, L]
            received = p.amax(0).mean(0)[lo:hi]                                           # [hi - lo]
            out[i, h] = received.topk(count).indices + lo
    return out


def split_positions(keys: torch.Tensor, window_queries: torch.Tensor, scaling: float, sinks: int,
                    dense_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (layer, KV head) of keys [layers, H, L, D]: the always-attended context positions
    [layers, H, S + T + W] (the S sinks, the T dense_positions in ascending order, then the last
    W = window_queries.shape[2] tokens) and the clustered ones [layers, H, N], ascending."""
    layers, H, L, _ = keys.shape
    S, T, W = sinks, dense_tokens, window_queries.shape[2]
    device = keys.device
    dense = dense_positions(keys, window_queries, scaling, S, L - W, T)            # [layers, H, T]
    free = torch.ones(layers, H, L, dtype=torch.bool, device=device)
    free[:, :, :S] = False
    free[:, :, L - W:] = False
    free.scatter_(2, dense, False)
    clustered = free.nonzero()[:, 2].reshape(layers, H, L - S - T - W)
    lead = torch.arange(S, device=device).expand(layers, H, S)
    tail = torch.arange(L - W, L, device=device).expand(layers, H, W)
    return torch.cat([lead, dense.sort(dim=2).values, tail], dim=2), clustered


def _sort_by(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return x.gather(1, perm.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def squeeze_kv(keys: torch.Tensor, values: torch.Tensor, window_queries: torch.Tensor, scaling: float,
               config: SqueezeConfig | None = None, *, fingerprint: dict | None = None,
               context_hash: str = "", progress: bool | None = None, rope=None) -> SqueezedContext:
    """Cluster captured K/V into a SqueezedContext (the model-free half of `squeeze`).

    keys, values [layers, H, L, D] post-RoPE (positions p - L); window_queries [layers, Hq, W, D]:
    the queries of the last W context tokens (W < L); scaling: the attention's softmax scale.
    rope: the model's quantize.RopeTable, needed when config.kv_bits < 16 (keys are stored pre-RoPE).
    """
    return _squeeze_owned([keys, values], window_queries, scaling, config or SqueezeConfig(),
                          fingerprint=fingerprint, context_hash=context_hash, progress=progress, rope=rope)


def _squeeze_owned(kv: list[torch.Tensor], window_queries: torch.Tensor, scaling: float,
                   config: SqueezeConfig, *, fingerprint: dict | None, context_hash: str,
                   progress: bool | None, shard: KVShard | None = None, rope=None) -> SqueezedContext:
    """squeeze_kv taking ownership of kv = [keys, values]: emptied as soon as they are copied, so a
    128K context does not hold two full copies of its K/V while clustering. `shard`: the KV
    heads are this rank's piece (tensor parallelism; calibration then spans every rank)."""
    keys, values = kv
    kv.clear()
    layers, H, L, D = keys.shape
    W = window_queries.shape[2]
    if not 0 <= W < L:
        raise ValueError(f"observation window of {W} tokens needs a context longer than that, got {L}")
    if window_queries.shape[1] % H:
        raise ValueError(f"{window_queries.shape[1]} query heads is not a multiple of {H} KV heads")
    low_bit = int(config.kv_bits) < 16
    if low_bit and rope is None:
        raise ValueError(f"SqueezeConfig(kv_bits={config.kv_bits}) stores keys pre-RoPE: pass the model's "
                         f"rotary table (rope=sqz_compile.squeeze.quantize.RopeTable(inv_freq, scaling)), or "
                         f"use squeeze(model, ...), which reads it from the model")
    S = max(0, min(int(config.sink_tokens), L - W - 1))  # sinks never empty the clustered part
    T = max(0, min(int(config.dense_tokens), L - W - S - 1))
    N = L - W - S - T
    C, Cc = cluster_counts_for(N, config)
    B = layers * H
    t0 = time.perf_counter()
    device = keys.device
    window_pos, clustered = split_positions(keys, window_queries, scaling, S, T)
    window_keys = _gather_tokens(keys, window_pos)
    window_values = _gather_tokens(values, window_pos)
    weights = None
    if low_bit:  # attention the window gives each token: the nuq codebook fit's weights
        from .quantize import token_weights

        weights = token_weights(keys, window_queries, scaling,
                                torch.arange(L, device=device).expand(layers, H, L))
    ck = _gather_tokens(keys, clustered).reshape(B, N, D)
    cv = _gather_tokens(values, clustered).reshape(B, N, D)
    del keys, values

    from tqdm.auto import tqdm
    total = config.kmeans_iters * (2 if config.hierarchical else 1)
    with tqdm(total=total, desc="sqz k-means", unit="it", disable=not show_progress(progress)) as bar:
        fine = kmeans(ck, C, iters=config.kmeans_iters, seed=config.seed, progress=bar)
        assign = fine.assign
        coarse_centroids = coarse_offsets = None
        iterations = [fine.iterations]
        if config.hierarchical:
            # K-means over each head's fine centroids (empty ones weigh 0), then renumber the fine
            # clusters so that each coarse cluster's children are contiguous.
            fsums = cluster_sums(ck, assign, C)
            parent_res = kmeans(_means(fsums, fine.counts), Cc, iters=config.kmeans_iters,
                                seed=config.seed + 1, weights=(fine.counts > 0).float(), progress=bar)
            parent = parent_res.assign                                     # [B, C]
            iterations.append(parent_res.iterations)
            order = parent.argsort(dim=1, stable=True)
            renumber = torch.empty_like(order).scatter_(
                1, order, torch.arange(C, device=order.device).expand(B, C).contiguous())
            assign = renumber.gather(1, assign)
            parent = parent.gather(1, order)  # coarse parent of each renumbered fine cluster
            coarse_offsets = _offsets(cluster_counts(parent, Cc))
            coarse_keys = cluster_counts(parent, Cc, fine.counts.gather(1, order).float())  # keys under each
            del fsums
    t1 = time.perf_counter()

    counts = cluster_counts(assign, C)
    perm = assign.argsort(dim=1, stable=True)
    positions = clustered.reshape(B, N).gather(1, perm)  # context position of each sorted key
    sums = cluster_sums(ck, assign, C)
    centroids = _means(sums, counts)
    radii = cluster_radii(ck, assign, centroids)
    squares = cluster_sums(ck, assign, C, squared=True) if config.cluster_variance else None
    if config.hierarchical:
        coarse_centroids = _means(cluster_sums(sums, parent, Cc), coarse_keys)
        if squares is not None:
            coarse_centroids = _with_variance(coarse_centroids, _means(cluster_sums(squares, parent, Cc), coarse_keys))
    if squares is not None:
        centroids = _with_variance(centroids, _means(squares, counts))
    del sums, squares
    sorted_keys = _sort_by(ck, perm)
    del ck
    sorted_values = _sort_by(cv, perm)
    del cv
    shape4 = lambda t: t.reshape(layers, H, *t.shape[1:])  # noqa: E731
    low = {}
    if low_bit:
        from .quantize import low_bit_fields

        low = low_bit_fields(shape4(sorted_keys), shape4(sorted_values), shape4(positions),
                             weights.gather(2, shape4(positions)), L, rope, config, window_queries)
        sorted_keys, sorted_values = low.pop("keys").flatten(0, 1), low.pop("values").flatten(0, 1)
    ctx = SqueezedContext(
        config=config,
        fingerprint=dict(fingerprint or {}),
        context_length=L,
        token_hash=context_hash,
        keys=shape4(sorted_keys),
        values=shape4(sorted_values),
        perm=shape4(positions.to(torch.int32)),
        centroids=shape4(centroids),
        offsets=shape4(_offsets(counts)),
        window_keys=window_keys,
        window_values=window_values,
        window_positions=window_pos.to(torch.int32).contiguous(),
        window_queries=window_queries.to(device, torch.float32).contiguous(),
        log_threshold=torch.full((layers, 2), float("-inf"), device=device),
        coarse_centroids=None if coarse_centroids is None else shape4(coarse_centroids),
        coarse_offsets=None if coarse_offsets is None else shape4(coarse_offsets),
        coarse_log_threshold=(torch.full((layers, 2), float("-inf"), device=device)
                              if config.hierarchical else None),
        radii=shape4(radii),
        **low,
        extra={"scaling": float(scaling), "clusters": C, "coarse_clusters": Cc if config.hierarchical else 0,
               "window": W, "sink_tokens": S, "dense_tokens": T, "kmeans_iterations": iterations},
        shard=shard,
    )
    if config.max_dropped_mass is not None:
        pass  # error-bounded: the op selects per query from the radii; no threshold to calibrate
    elif config.budget is None:
        ctx = ctx.with_keep(config.keep)
    elif int(config.budget) == 0:  # a budget of no keys: keep no cluster (the op's budget 0 is threshold mode)
        ctx.log_threshold[ctx.dense_layers:] = float("inf")
        if ctx.coarse_log_threshold is not None:
            ctx.coarse_log_threshold[ctx.dense_layers:] = float("inf")
    ctx.extra["seconds"] = {"kmeans": round(t1 - t0, 3), "layout_and_calibration": round(time.perf_counter() - t1, 3)}
    return ctx


def _context_ids(context_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(context_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"context_ids must be [1, L] (one shared context), got shape {tuple(ids.shape)}; "
                         f"squeeze each context separately")
    if ids.shape[1] == 0:
        raise ValueError("empty context: squeeze needs at least one context token")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"context_ids must be integer token ids, got {ids.dtype}")
    return ids.long()


def squeeze(model: torch.nn.Module, context_ids: torch.Tensor, config: SqueezeConfig | None = None, *,
            progress: bool | None = None) -> SqueezedContext:
    """Squeeze one fixed context for `model`: capture, cluster, lay out, calibrate.

    model: a transformers causal LM with RoPE (Llama, Mistral, Qwen2, ...; MHA or GQA), on any
        device; it is left exactly as it was. context_ids: [1, L] (or [L]) token ids.
    progress: tqdm bars for prefill and clustering (default: only on a terminal).
    Budget mode (config.budget set) skips calibration: both log thresholds are -inf and unused.
    Refuses (UnsupportedModelError) architectures the pass cannot read up front, and, with
    config.self_check (default), any model whose capture fails the self-check (selfcheck.py:
    CaptureMismatchError naming the layer), at the cost of one more prefill.
    """
    from .selfcheck import check_capture, window_reference

    config = config or SqueezeConfig()
    ids = _context_ids(context_ids)
    L = ids.shape[1]
    check_supported(model, L)
    shard = kv_shard(model)  # tensor parallel: this rank squeezes its own KV heads
    W = min(int(config.observation_window), L - 1)
    t0 = time.perf_counter()
    reference = window_reference(model, ids, W, int(config.chunk_size)) if config.self_check and W else None
    t1 = time.perf_counter()
    cap = capture_context(model, ids, W, int(config.chunk_size), progress)
    t2 = time.perf_counter()
    check = check_capture(model, cap, reference) if reference is not None else None
    kv = [cap.keys, cap.values]
    cap.keys = cap.values = None
    rope = None
    if int(config.kv_bits) < 16:
        from .quantize import rope_from_model

        rope = rope_from_model(model, L, kv[0].shape[3])
    ctx = _squeeze_owned(kv, cap.queries, cap.scaling, config, fingerprint=model_fingerprint(model),
                         context_hash=token_hash(ids), progress=progress, shard=shard, rope=rope)
    ctx.extra["seconds"]["prefill"] = round(t2 - t1, 3)
    if check is not None:
        ctx.extra["seconds"]["self_check"] = round(t1 - t0 + check.seconds, 3)
        ctx.extra["self_check_errors"] = [float(f"{e:.3g}") for e in check.errors]
    return ctx
