"""Model-facing helpers for the offline squeeze: fingerprint, support checks, K/V/query capture.

Capture runs the model over the context in chunks with a DynamicCache and explicit
`position_ids = arange(start, end) - L` (see context.py: keys are rotated for positions p - L), then
reads every layer's post-RoPE K/V from the cache. The observation window's post-RoPE queries are
recorded by a custom attention function registered with `transformers.AttentionInterface` as
"sqz_capture", which delegates to SDPA. The user's model is restored afterwards.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import torch

CAPTURE_IMPL = "sqz_capture"
# rope types whose frequencies depend on absolute position or sequence length: relative
# positions p - L would not reproduce the model's attention.
ABSOLUTE_ROPE_TYPES = frozenset({"dynamic", "longrope"})
KNOWN_GOOD = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class UnsupportedModelError(ValueError):
    """The model cannot be squeezed (the message says why and what to do)."""


@dataclass
class Captured:
    """What one prefill of the context yields (all stacked over layers on dim 0)."""

    keys: torch.Tensor          # [layers, H, L, D] model dtype, post-RoPE (positions p - L)
    values: torch.Tensor        # [layers, H, L, D]
    queries: torch.Tensor       # [layers, Hq, W, D] float32: the last W context tokens
    scaling: float              # the attention's softmax scale


def _config(model: torch.nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no .config: sqz_compile.squeeze needs a transformers model")
    return getattr(cfg, "get_text_config", lambda: cfg)()


def _rope_params(cfg) -> list[dict[str, Any]]:
    """Every rope-parameter dict of the config (transformers 5 `rope_parameters`, older
    `rope_scaling`; nested per layer type in some models)."""
    found = []
    for name in ("rope_parameters", "rope_scaling"):
        p = getattr(cfg, name, None)
        if isinstance(p, dict):
            nested = [v for v in p.values() if isinstance(v, dict)]
            found.extend(nested if nested else [p])
    return found


def _rope_types(model: torch.nn.Module) -> set[str]:
    types = {str(p.get("rope_type", p.get("type", "default"))) for p in _rope_params(_config(model))}
    for name, mod in model.named_modules():
        if name.endswith("rotary_emb") and isinstance(getattr(mod, "rope_type", None), str):
            types.add(mod.rope_type)
    return types


def _has_rotary(model: torch.nn.Module) -> bool:
    return any(n.endswith("rotary_emb") for n, _ in model.named_modules())


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str, sort_keys=True))


def _weights_digest(model: torch.nn.Module, n: int = 4096) -> str:
    """Hash of a strided sample of a few weights, rounded to bf16 so that the same checkpoint
    loaded in float32 or bfloat16 hashes alike while a different fine-tune does not."""
    params = [p for _, p in model.named_parameters()]
    h = hashlib.sha256()
    for p in params[:3] + params[-3:]:
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // n)
        sample = flat[::step][:n].to("cpu", torch.float32).to(torch.bfloat16)
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What a SqueezedContext must match to be used with `model` (JSON-serialisable)."""
    cfg = _config(model)
    hq = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    archs = getattr(getattr(model, "config", cfg), "architectures", None) or [type(model).__name__]
    rope = {k: _jsonable(getattr(cfg, k)) for k in ("rope_parameters", "rope_scaling", "rope_theta")
            if getattr(cfg, k, None) is not None}
    return {
        "architecture": str(archs[0]),
        "model_type": str(getattr(cfg, "model_type", "")),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "num_attention_heads": hq,
        "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or hq),
        "head_dim": int(head_dim),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
        "rope": rope,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "max_position_embeddings": int(getattr(cfg, "max_position_embeddings", 0) or 0),
        "weights_digest": _weights_digest(model),
    }


def fingerprint_mismatches(stored: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints ([] when they match)."""
    out = []
    for k in sorted(set(stored) | set(actual)):
        a, b = stored.get(k), actual.get(k)
        if _jsonable(a) != _jsonable(b):
            out.append(f"{k}: file has {a!r}, model has {b!r}")
    return out


def check_supported(model: torch.nn.Module, context_length: int) -> None:
    """Raise UnsupportedModelError unless squeezing `model` over `context_length` tokens is sound."""
    cfg = _config(model)
    name = type(model).__name__
    if context_length < 1:
        raise ValueError("empty context: squeeze needs at least one context token")
    max_pos = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    if max_pos and context_length > max_pos:
        raise ValueError(
            f"context of {context_length} tokens exceeds {name}'s max_position_embeddings={max_pos}: "
            f"shorten the context (or use a model trained for longer contexts)")
    if not _has_rotary(model) or (not _rope_params(cfg) and getattr(cfg, "rope_theta", None) is None):
        raise UnsupportedModelError(
            f"{name} has no rotary position embedding (rotary_emb): sqz_compile stores post-RoPE keys "
            f"at relative positions and supports RoPE models only (Llama, Mistral, Qwen2, ...)")
    bad = _rope_types(model) & ABSOLUTE_ROPE_TYPES
    if bad:
        raise UnsupportedModelError(
            f"{name} uses rope_type {sorted(bad)}, whose frequencies depend on the absolute position or "
            f"sequence length; keys rotated for positions p - L would not match the model. Use a model "
            f"with position-independent RoPE (default, linear, llama3, yarn)")
    sw = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    uses_sw = sw is not None and (layer_types is None or "sliding_attention" in layer_types)
    if uses_sw and (not max_pos or int(sw) < max_pos):
        raise UnsupportedModelError(
            f"{name} uses sliding-window attention (sliding_window={sw}): the squeezed context is "
            f"attended in full, which differs from the model. If the context plus inputs fit in the "
            f"window, set model.config.sliding_window = None before squeezing and compiling")
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise UnsupportedModelError(f"{name} uses attention logit soft-capping, which sqz does not support")
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        raise UnsupportedModelError(
            f"{name} does not dispatch attention through transformers.AttentionInterface, so its "
            f"queries cannot be captured")
    if str(getattr(cfg, "model_type", "")) not in KNOWN_GOOD:
        import warnings
        warnings.warn(f"sqz_compile: model_type {getattr(cfg, 'model_type', '?')!r} is not in the "
                      f"tested set {sorted(KNOWN_GOOD)}; squeezing it anyway", stacklevel=3)


# --------------------------------------------------------------------------- query capture

class _CaptureState:
    def __init__(self, num_layers: int, window_start: int, queries: torch.Tensor) -> None:
        self.num_layers = num_layers
        self.window_start = window_start  # context position of the first window token
        self.queries = queries            # [layers, Hq, W, D] float32, filled chunk by chunk
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
        if lo < hi and li < st.num_layers:
            st.queries[li, :, lo - st.window_start:hi - st.window_start] = \
                query[0, :, lo - st.chunk_start:, :].to(st.queries.device, torch.float32)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_capture() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPL, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_IMPL, sdpa_mask)


def _set_attn(model: torch.nn.Module, impl: str) -> None:
    try:
        model.set_attn_implementation(impl)
    except (AttributeError, KeyError, ValueError):
        # transformers without set_attn_implementation, or one that vets custom names differently:
        # every submodule reads its (shared) config's _attn_implementation at call time.
        for mod in model.modules():
            cfg = getattr(mod, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = impl
    if model.config._attn_implementation != impl:
        raise UnsupportedModelError(f"could not switch {type(model).__name__} to attention '{impl}'")


@contextlib.contextmanager
def _capturing(model: torch.nn.Module, state: _CaptureState) -> Iterator[None]:
    """Switch `model` to the capture attention (eval mode, no grad) and restore it afterwards."""
    _register_capture()
    old_impl = model.config._attn_implementation
    was_training = model.training
    _local.state = state
    try:
        _set_attn(model, CAPTURE_IMPL)
        model.eval()
        with torch.no_grad():
            yield
    finally:
        _local.state = None
        _set_attn(model, old_impl)
        model.train(was_training)


def _cache_layer(cache: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of layer i across transformers versions."""
    if hasattr(cache, "layers"):
        layer = cache.layers[i]
        return layer.keys, layer.values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[i], cache.value_cache[i]
    return cache[i][0], cache[i][1]


def _drop_cache_layer(cache: Any, i: int) -> None:
    """Free layer i of the cache as soon as it has been copied out (long contexts are big)."""
    if hasattr(cache, "layers"):
        cache.layers[i].keys = cache.layers[i].values = None
    elif hasattr(cache, "key_cache"):
        cache.key_cache[i] = cache.value_cache[i] = None


def show_progress(progress: bool | None) -> bool:
    """Default: show tqdm bars only on an interactive terminal."""
    return bool(sys.stderr.isatty()) if progress is None else bool(progress)


def capture_context(model: torch.nn.Module, ids: torch.Tensor, window: int, chunk_size: int,
                    progress: bool | None = None) -> Captured:
    """Prefill `ids` [1, L] in chunks and capture post-RoPE K/V of every layer and the queries of
    the last `window` tokens (positions p - L, see context.py)."""
    from tqdm.auto import tqdm

    cfg = _config(model)
    L = ids.shape[1]
    layers = int(cfg.num_hidden_layers)
    hq = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    device = next(model.parameters()).device
    ids = ids.to(device)
    queries = torch.zeros(layers, hq, window, head_dim, dtype=torch.float32, device=device)
    state = _CaptureState(layers, L - window, queries)
    base = getattr(model, "base_model", model)
    cache = None
    with _capturing(model, state):
        starts = range(0, L, chunk_size)
        for start in tqdm(starts, desc="sqz prefill", unit="chunk", disable=not show_progress(progress)):
            end = min(L, start + chunk_size)
            state.chunk_start = start
            pos = torch.arange(start - L, end - L, device=device).unsqueeze(0)
            out = base(input_ids=ids[:, start:end], position_ids=pos, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            del out
    if len(state.scaling) != layers:
        raise UnsupportedModelError(
            f"captured attention in {len(state.scaling)} of {layers} layers: {type(model).__name__} "
            f"does not route every layer through transformers.AttentionInterface")
    scales = set(state.scaling.values())
    if len(scales) != 1:
        raise UnsupportedModelError(f"layers use different attention scales {sorted(scales)}")
    k0, _ = _cache_layer(cache, 0)
    keys = torch.empty(layers, k0.shape[1], L, k0.shape[3], dtype=k0.dtype, device=device)
    values = torch.empty_like(keys)
    for i in range(layers):
        k, v = _cache_layer(cache, i)
        if k.shape[2] != L:
            raise UnsupportedModelError(
                f"layer {i} cached {k.shape[2]} of {L} context tokens (sliding window or cache limit?)")
        keys[i].copy_(k[0])
        values[i].copy_(v[0])
        _drop_cache_layer(cache, i)
    scaling = scales.pop()
    if not math.isfinite(scaling) or scaling <= 0:
        raise UnsupportedModelError(f"attention scale {scaling} is not a positive number")
    return Captured(keys, values, queries, scaling)
