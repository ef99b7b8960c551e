"""The transformers attention function that runs a model with squeezed attention, eagerly.

    with squeezed_mode(model, ctx, stats=LayerStats(ctx.num_layers)):
        model(input_ids=user_ids)

"sqz_eval" (registered with `transformers.AttentionInterface`) calls
`torch.ops.sqz.squeezed_attention` with each layer's context tensors: the same op the compiled
model uses, without torch.compile (or, with oracle=True, the oracle selection of sqz_compile.eval).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from .context import SqueezedContext
from .kernels.attention.reference import squeezed_attention_reference
from .ops import DEFAULT_BLOCK_Q
from .eval.oracle import LayerStats, analyse_selection, per_key_offsets, record_stats
from .transformers_compat import cache_kwargs, register_attention, set_attn_implementation


EVAL_IMPL = "sqz_eval"


# --------------------------------------------------------------------------- attention function

class _State(threading.local):
    ctx: SqueezedContext | None = None
    method: str = "squeezed"
    block_q: int = DEFAULT_BLOCK_Q
    stats: LayerStats | None = None
    decode_only: bool = False
    layers: set | None = None  # layer indices that attended through this function, when collected


_state = _State()


def _eval_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                    scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """AttentionInterface function: squeezed (the sqz op) or oracle attention of the user's tokens
    over the current SqueezedContext; records per-layer recall when a LayerStats is active."""
    st = _state
    if st.ctx is None:
        raise RuntimeError(f"attention implementation {EVAL_IMPL!r} used outside "
                           f"sqz_compile.attention_function.squeezed_mode(model, ctx): nothing to attend to")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx: cannot pick its context layer")
    if st.layers is not None:
        st.layers.add(int(layer))
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    causal = bool(query.shape[2] > 1 and attention_mask is None
                  and (is_causal if is_causal is not None else getattr(module, "is_causal", True)))
    ctx, bq = st.ctx, st.block_q
    analysis = None
    record = st.stats is not None and (not st.decode_only or query.shape[2] == 1)
    if st.method == "oracle" or record:
        analysis = analyse_selection(query, key, attention_mask, causal, ctx, layer, scale, bq)
        if record:
            record_stats(st.stats, layer, analysis, bq)
    lc = ctx.layer(layer)
    if st.method == "oracle":
        out = squeezed_attention_reference(
            query, key, value, attention_mask, *ctx.dense_kv(layer), per_key_offsets(ctx, layer),
            analysis.oracle, lc.window_keys, lc.window_values, scale, causal, bq)
    else:
        out = torch.ops.sqz.squeezed_attention(
            query.contiguous(), key.contiguous(), value.contiguous(), attention_mask, *lc, scale, causal,
            ctx.layer_budget(layer), bq, ctx.layer_max_dropped_mass(layer))
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def squeezed_mode(model: torch.nn.Module, ctx: SqueezedContext, *, oracle: bool = False,
                  block_q: int = DEFAULT_BLOCK_Q, stats: LayerStats | None = None,
                  decode_only: bool = False, layers: set | None = None) -> Iterator[None]:
    """Run `model` with squeezed (or, with oracle=True, oracle) attention over `ctx` inside the
    block; the model's attention implementation is restored afterwards. stats: per-layer recall
    of every call, or (decode_only) only of one-token decode calls. layers: a set that collects
    the index of every layer that attended through the squeezed attention."""
    register_attention(EVAL_IMPL, _eval_attention)
    old = model.config._attn_implementation
    _state.ctx, _state.method, _state.block_q, _state.stats = ctx, ("oracle" if oracle else "squeezed"), block_q, stats
    _state.decode_only, _state.layers = decode_only, layers
    try:
        set_attn_implementation(model, EVAL_IMPL)
        yield
    finally:
        _state.ctx, _state.stats, _state.layers = None, None, None
        set_attn_implementation(model, old)


def attended_fraction(model: torch.nn.Module, ctx: SqueezedContext, ids: torch.Tensor,
                      decode: torch.Tensor | None = None) -> float:
    """Fraction of the fixed context's keys the lookup attends (clustered keys kept, averaged over
    layers and KV heads, plus the always-attended keys): per query block of the prefill of `ids`,
    or, given `decode` tokens, per token while decoding them one at a time after `ids`."""
    from transformers import DynamicCache

    stats = LayerStats(ctx.num_layers)
    with torch.no_grad(), squeezed_mode(model, ctx, stats=stats, decode_only=decode is not None):
        if decode is None:
            model(ids)
        else:
            cache = DynamicCache(config=model.config)
            model(ids, **cache_kwargs(model, cache))
            for t in decode.reshape(-1):
                model(t.view(1, 1), **cache_kwargs(model, cache))
    kept = LayerStats.metrics(stats.to_json())["kept_decode" if decode is not None else "kept_fraction"]
    clustered = ctx.context_length - ctx.window
    return (sum(kept) / len(kept) * clustered + ctx.window) / ctx.context_length
