"""The offline squeeze: fixed-context token ids -> SqueezedContext (see context.py for the layout).

    ctx = squeeze(model, context_ids, SqueezeConfig(keep=0.1))

1. prefill the context in chunks, capturing post-RoPE K/V of every layer and the observation
   window's queries (models.capture_context; keys rotated for positions p - L);
2. K-means per (layer, KV head), all at once as one batched [layers*H, N, D] problem (kmeans.py),
   optionally a coarse level over each head's centroids;
3. sort each head's K/V by cluster (coarse parent first when hierarchical), store centroids
   (means of the original keys, float32) and offsets;
4. calibrate the log thresholds on the window queries (calibrate.py).
"""
from __future__ import annotations

import hashlib
import time

import torch

from .config import SqueezeConfig
from .context import SqueezedContext
from .kmeans import cluster_counts, cluster_sums, kmeans
from .models import capture_context, check_supported, model_fingerprint, show_progress


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


def _sort_by(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return x.gather(1, perm.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def squeeze_kv(keys: torch.Tensor, values: torch.Tensor, window_queries: torch.Tensor, scaling: float,
               config: SqueezeConfig | None = None, *, fingerprint: dict | None = None,
               context_hash: str = "", progress: bool | None = None) -> SqueezedContext:
    """Cluster captured K/V into a SqueezedContext (the model-free half of `squeeze`).

    keys, values [layers, H, L, D] post-RoPE (positions p - L); window_queries [layers, Hq, W, D]:
    the queries of the last W context tokens (W < L); scaling: the attention's softmax scale.
    """
    return _squeeze_owned([keys, values], window_queries, scaling, config or SqueezeConfig(),
                          fingerprint=fingerprint, context_hash=context_hash, progress=progress)


def _squeeze_owned(kv: list[torch.Tensor], window_queries: torch.Tensor, scaling: float,
                   config: SqueezeConfig, *, fingerprint: dict | None, context_hash: str,
                   progress: bool | None) -> SqueezedContext:
    """squeeze_kv taking ownership of kv = [keys, values]: emptied as soon as they are copied, so a
    128K context does not hold two full copies of its K/V while clustering."""
    keys, values = kv
    kv.clear()
    layers, H, L, D = keys.shape
    W = window_queries.shape[2]
    if not 0 <= W < L:
        raise ValueError(f"observation window of {W} tokens needs a context longer than that, got {L}")
    if window_queries.shape[1] % H:
        raise ValueError(f"{window_queries.shape[1]} query heads is not a multiple of {H} KV heads")
    S = max(0, min(int(config.sink_tokens), L - W - 1))  # sinks never empty the clustered part
    N = L - W - S
    C, Cc = cluster_counts_for(N, config)
    B = layers * H
    t0 = time.perf_counter()
    # always-attended keys: the S sink tokens, then the W window tokens
    window_keys = torch.cat([keys[:, :, :S], keys[:, :, S + N:]], dim=2).contiguous()
    window_values = torch.cat([values[:, :, :S], values[:, :, S + N:]], dim=2).contiguous()
    ck = keys[:, :, S:S + N].reshape(B, N, D)
    cv = values[:, :, S:S + N].reshape(B, N, D)
    device = keys.device
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
            coarse_offsets = _offsets(cluster_counts(parent, Cc))
            coarse_keys = cluster_counts(parent, Cc, fine.counts.float())  # keys under each coarse cluster
            coarse_centroids = _means(cluster_sums(fsums, parent, Cc), coarse_keys)
            del fsums
    t1 = time.perf_counter()

    counts = cluster_counts(assign, C)
    perm = assign.argsort(dim=1, stable=True)
    centroids = _means(cluster_sums(ck, assign, C), counts)
    sorted_keys = _sort_by(ck, perm)
    del ck
    sorted_values = _sort_by(cv, perm)
    del cv
    shape4 = lambda t: t.reshape(layers, H, *t.shape[1:])  # noqa: E731
    ctx = SqueezedContext(
        config=config,
        fingerprint=dict(fingerprint or {}),
        context_length=L,
        token_hash=context_hash,
        keys=shape4(sorted_keys),
        values=shape4(sorted_values),
        perm=shape4(perm.to(torch.int32)),
        centroids=shape4(centroids),
        offsets=shape4(_offsets(counts)),
        window_keys=window_keys,
        window_values=window_values,
        window_queries=window_queries.to(device, torch.float32).contiguous(),
        log_threshold=torch.full((layers,), float("-inf"), device=device),
        coarse_centroids=None if coarse_centroids is None else shape4(coarse_centroids),
        coarse_offsets=None if coarse_offsets is None else shape4(coarse_offsets),
        coarse_log_threshold=(torch.full((layers,), float("-inf"), device=device)
                              if config.hierarchical else None),
        extra={"scaling": float(scaling), "clusters": C, "coarse_clusters": Cc if config.hierarchical else 0,
               "window": W, "sink_tokens": S, "kmeans_iterations": iterations},
    )
    if config.budget is None:
        ctx = ctx.with_keep(config.keep)
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
    """
    config = config or SqueezeConfig()
    ids = _context_ids(context_ids)
    L = ids.shape[1]
    check_supported(model, L)
    W = min(int(config.observation_window), L - 1)
    t0 = time.perf_counter()
    cap = capture_context(model, ids, W, int(config.chunk_size), progress)
    t1 = time.perf_counter()
    kv = [cap.keys, cap.values]
    cap.keys = cap.values = None
    ctx = _squeeze_owned(kv, cap.queries, cap.scaling, config, fingerprint=model_fingerprint(model),
                         context_hash=token_hash(ids), progress=progress)
    ctx.extra["seconds"]["prefill"] = round(t1 - t0, 3)
    return ctx
