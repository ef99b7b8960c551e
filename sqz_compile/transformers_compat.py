"""Every transformers quirk in one place: config access, the sliding-window and max-position
rules, switching the attention implementation, cache layout across versions, and the model
fingerprint / support checks that decide whether a model can be squeezed.

Callers (squeeze, passes, SqueezedModel, export, eval) read model configs only through here.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import threading
from typing import Any, Callable, Iterator

import torch

# rope types whose frequencies depend on absolute position or sequence length: relative
# positions p - L would not reproduce the model's attention.
ABSOLUTE_ROPE_TYPES = frozenset({"dynamic", "longrope"})
# layer types whose layers are softmax attention over cached keys (others: conv, linear attention, ...)
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# model types exact at keep = 1 in the family sweep (tests/test_family_sweep.py keeps this in step)
KNOWN_GOOD = frozenset({
    "apertus", "arcee", "cohere", "cohere2", "dots1", "ernie4_5", "exaone4", "falcon", "gemma", "gemma2",
    "gemma3_text", "glm", "glm4", "gpt_neox", "granite", "helium", "jais2", "lfm2", "llama", "llama4_text",
    "ministral", "mistral", "mixtral", "nemotron", "olmo", "olmo2", "olmo3", "olmoe", "persimmon", "phi", "phi3",
    "phimoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next", "seed_oss", "smollm3", "stablelm",
    "starcoder2"})


class UnsupportedModelError(ValueError):
    """The model cannot be squeezed (the message says why and what to do)."""



# --------------------------------------------------------------------------- config access

def text_config(cfg: Any) -> Any:
    """The text model's config of a (possibly multimodal) transformers config; `cfg` as is when it
    has no get_text_config."""
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def model_config(model: torch.nn.Module) -> Any:
    """The text config of a transformers model (UnsupportedModelError without a .config)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no .config: sqz_compile.squeeze needs a transformers model")
    return text_config(cfg)


def num_layers(cfg: Any) -> int:
    return int(cfg.num_hidden_layers)


def num_heads(cfg: Any) -> int:
    return int(cfg.num_attention_heads)


def num_kv_heads(cfg: Any) -> int:
    return int(getattr(cfg, "num_key_value_heads", None) or num_heads(cfg))


def head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads(cfg))


def max_positions(model_or_cfg: Any) -> int:
    """The model's max_position_embeddings (0 when it states no limit). Takes a model or a config."""
    if model_or_cfg is None:
        return 0
    cfg = getattr(model_or_cfg, "config", model_or_cfg) if isinstance(model_or_cfg, torch.nn.Module) else model_or_cfg
    cfg = text_config(cfg)
    return int(getattr(cfg, "max_position_embeddings", 0) or 0)


def check_positions(model: torch.nn.Module, total: int, what: str, fix: str) -> None:
    """ValueError when `total` positions exceed the model's max_position_embeddings; `what` says
    how the total is made up, `fix` what to do."""
    max_pos = max_positions(model)
    if max_pos and total > max_pos:
        raise ValueError(f"{what} exceeds {type(model).__name__}'s max_position_embeddings={max_pos}: {fix}")


def sliding_window(cfg: Any, layer: int | None = None, module: torch.nn.Module | None = None) -> int | None:
    """The sliding window that limits attention, or None. With `module` (an attention module) its
    own `sliding_window` decides; else the config's, for `layer` (per `layer_types`) or, with
    layer=None, for any layer. A window no shorter than max_position_embeddings limits nothing."""
    if cfg is not None:
        cfg = text_config(cfg)
    if module is not None and hasattr(module, "sliding_window"):
        window = module.sliding_window
    elif cfg is not None:
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if window is not None and types is not None:
            if layer is None:
                if "sliding_attention" not in types:
                    window = None
            elif layer < len(types) and types[layer] != "sliding_attention":
                window = None
    else:
        window = None
    max_pos = max_positions(cfg)
    if window is not None and (not max_pos or int(window) < max_pos):
        return int(window)
    return None


def sliding_window_fix(cfg: Any) -> str:
    """The setting that turns a model's sliding-window layers into full attention without breaking
    it: `layer_types` where the config has them (there `sliding_window = None` crashes the model's
    own cache and mask code), else `sliding_window = None`."""
    cfg = text_config(cfg) if cfg is not None else None
    types = getattr(cfg, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return f'model.config.layer_types = ["full_attention"] * {len(types)}'
    return "model.config.sliding_window = None"


def attention_dropout(module: torch.nn.Module) -> float:
    """The attention module's dropout probability, whether it stores a float or an nn.Dropout
    (Persimmon)."""
    p = getattr(module, "attention_dropout", 0.0)
    if isinstance(p, torch.nn.Dropout):
        p = p.p
    return float(p or 0.0)


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
    types = {str(p.get("rope_type", p.get("type", "default"))) for p in _rope_params(model_config(model))}
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
    loaded in float32 or bfloat16 hashes alike while a different fine-tune does not (and a
    tensor-parallel model like the unsharded one)."""
    from .distributed import weight_for_digest

    params = [p for _, p in model.named_parameters()]
    h = hashlib.sha256()
    for p in params[:3] + params[-3:]:
        flat = weight_for_digest(p.detach()).reshape(-1)
        step = max(1, flat.numel() // n)
        sample = flat[::step][:n].to("cpu", torch.float32).to(torch.bfloat16)
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What a SqueezedContext must match to be used with `model` (JSON-serialisable)."""
    cfg = model_config(model)
    hq = num_heads(cfg)
    archs = getattr(getattr(model, "config", cfg), "architectures", None) or [type(model).__name__]
    rope = {k: _jsonable(getattr(cfg, k)) for k in ("rope_parameters", "rope_scaling", "rope_theta")
            if getattr(cfg, k, None) is not None}
    return {
        "architecture": str(archs[0]),
        "model_type": str(getattr(cfg, "model_type", "")),
        "num_hidden_layers": num_layers(cfg),
        "num_attention_heads": hq,
        "num_key_value_heads": num_kv_heads(cfg),
        "head_dim": head_dim(cfg),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
        "rope": rope,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "max_position_embeddings": max_positions(cfg),
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


def _limited_layers(cfg: Any, kind: str, size: Any, what: str) -> str | None:
    """Why layers of `kind` ("sliding_attention", "chunked_attention") forbid squeezing, or None:
    a limit shorter than max_position_embeddings drops context keys; a sliding window no shorter
    changes nothing but still builds a sliding-window mask, which the pass does not rewrite (an
    inert chunk size builds a plain causal mask: the family sweep shows Llama-4 exact)."""
    types = list(getattr(cfg, "layer_types", None) or [])
    if kind == "sliding_attention" and not types:
        types = [kind] * num_layers(cfg) if size is not None else []
    n = sum(t == kind for t in types)
    if not n or size is None:
        return None
    fix = sliding_window_fix(cfg)
    max_pos = max_positions(cfg)
    if max_pos and int(size) >= max_pos:
        if kind != "sliding_attention":
            return None
        return (f"{n} {what} layer(s) with a window of {size} >= max_position_embeddings={max_pos}: they "
                f"attend in full at every length, but their mask is built as a windowed mask, which the "
                f"pass does not rewrite. Set {fix} before squeezing and compiling: same outputs")
    return (f"{what} attention ({what}={size}, {n} layer(s)): the squeezed context is attended in full, "
            f"which differs from the model. If the context plus inputs fit in {size} tokens, set {fix} "
            f"before squeezing and compiling")


def unsupported_reasons(model: torch.nn.Module) -> list[str]:
    """Why the pass cannot read `model`'s attention as softmax(q.k * scale) v over RoPE keys at
    relative positions, from its config and attention modules' attributes ([] when none applies).

    Each rule names an architecture feature that the capture, the rewrite or the runtime would get
    silently wrong; the squeeze-time self-check catches what these rules do not know."""
    cfg = model_config(model)
    out = []
    if getattr(cfg, "alibi", False) or "alibi" in str(getattr(cfg, "position_embedding_type", "")):
        out.append("ALiBi position biases (alibi=True): sqz_compile supports RoPE position encoding only")
    if not _has_rotary(model) or (not _rope_params(cfg) and getattr(cfg, "rope_theta", None) is None):
        out.append("no rotary position embedding (rotary_emb): sqz_compile stores post-RoPE keys at relative "
                   "positions and supports RoPE models only (Llama, Mistral, Qwen2, ...)")
    bad = _rope_types(model) & ABSOLUTE_ROPE_TYPES
    if bad:
        out.append(f"rope_type {sorted(bad)}, whose frequencies depend on the absolute position or sequence "
                   f"length: keys rotated for positions p - L would not match the model. Use a model with "
                   f"position-independent RoPE (default, linear, llama3, yarn)")
    other = sorted(set(getattr(cfg, "layer_types", None) or []) - ATTENTION_LAYER_TYPES)
    if other:
        out.append(f"layer_types {other}: such layers keep state over the context that is not attention "
                   f"keys and values, which a squeezed context cannot carry")
    for kind, size, what in (("sliding_attention", getattr(cfg, "sliding_window", None), "sliding_window"),
                             ("chunked_attention", getattr(cfg, "attention_chunk_size", None), "attention_chunk_size")):
        why = _limited_layers(cfg, kind, size, what)
        if why:
            out.append(why)
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        out.append(f"attention logit soft-capping (attn_logit_softcapping={cfg.attn_logit_softcapping})")
    qk = sum(int(getattr(cfg, a, 0) or 0) for a in ("qk_nope_head_dim", "qk_rope_head_dim"))
    v = int(getattr(cfg, "v_head_dim", 0) or 0)
    if qk and (qk != head_dim(cfg) or (v and v != qk)):
        out.append(f"query/key head dim {qk} differs from config.head_dim={head_dim(cfg)} or the value head dim "
                   f"{v or '?'} (multi-head latent attention): the context layout needs one head dim for "
                   f"queries, keys and values")
    mods = list(model.modules())
    if any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in mods):
        out.append("learned attention sinks (a per-head logit joins the softmax): the squeezed attention's "
                   "softmax has no such term")
    if any(getattr(getattr(m, n, None), "weight", None) is not None for m in mods
           for n in ("query_layernorm", "key_layernorm")):
        out.append("query/key norms with learned weights applied after RoPE (query_layernorm/key_layernorm): "
                   "scores then depend on absolute positions, not only on p - s, so keys rotated for "
                   "positions p - L give different scores")
    if any(hasattr(m, "dt_proj") and hasattr(m, "A") for m in mods):
        out.append("a dynamic attention mask (dt_proj, A): every context key carries a bias computed from "
                   "its value, which the squeezed attention does not add")
    nope = [getattr(m, "layer_idx", "?") for m in mods if getattr(m, "attn_temperature_tuning", False) and not getattr(m, "use_rope", True)]
    if nope:
        out.append(f"NoPE layers {nope} with attn_temperature_tuning: their queries are scaled by "
                   f"log1p(floor((pos + 1) / floor_scale)) with pos counted from the cache, which starts at "
                   f"0 for the user's tokens instead of at the context length. Below floor_scale="
                   f"{getattr(cfg, 'floor_scale', '?')} total tokens the scale is 1: if context plus inputs "
                   f"stay below it, set attn_temperature_tuning = False on those attention modules (same outputs)")
    return out


def check_supported(model: torch.nn.Module, context_length: int) -> None:
    """Raise UnsupportedModelError unless squeezing `model` over `context_length` tokens is sound
    (each reason from unsupported_reasons, and the context length); ValueError for an empty or too
    long context."""
    name = type(model).__name__
    if context_length < 1:
        raise ValueError("empty context: squeeze needs at least one context token")
    check_positions(model, context_length, f"context of {context_length} tokens",
                    "shorten the context (or use a model trained for longer contexts)")
    reasons = unsupported_reasons(model)
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        reasons.append("attention not dispatched through transformers.AttentionInterface, so its queries "
                       "cannot be captured")
    if reasons:
        raise UnsupportedModelError(f"{name} cannot be squeezed: " + "; ".join(reasons))
    if str(getattr(model_config(model), "model_type", "")) not in KNOWN_GOOD:
        import warnings
        warnings.warn(f"sqz_compile: model_type {getattr(model_config(model), 'model_type', '?')!r} is not in "
                      f"the family sweep (tests/test_family_sweep.py); squeezing it, its capture proven by the "
                      f"self-check", stacklevel=3)


# --------------------------------------------------------------------------- attention implementation

def register_attention(name: str, fn: Callable) -> None:
    """Register `fn` as transformers attention implementation `name` (SDPA-style masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def set_attn_implementation(model: torch.nn.Module, impl: str) -> None:
    """Switch `model` to attention implementation `impl` across transformers versions (raises
    UnsupportedModelError if the model does not take it)."""
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
def observing_attention(model: torch.nn.Module, record: Callable[[torch.nn.Module, torch.Tensor], None]) -> Iterator[None]:
    """While active, `record(module, output)` sees the output [B, M, Hq, Dv] of every call that
    `model`'s attention modules make to the attention function they really use: the entry of
    their attn_implementation in transformers' AttentionInterface (the shared mapping and any
    modeling file's own instance), or for "eager" each modeling file's `eager_attention_forward`
    global. The model's settings are untouched; calls from other models or threads are not
    recorded; everything is restored on exit."""
    import sys

    from transformers import AttentionInterface

    impl = model.config._attn_implementation
    ours = {id(m) for m in model.modules()}
    thread = threading.get_ident()
    restore: list[Callable[[], None]] = []

    def wrap(fn: Callable) -> Callable:
        def observed(module, query, key, value, attention_mask, *args, **kwargs):
            out = fn(module, query, key, value, attention_mask, *args, **kwargs)
            if id(module) in ours and threading.get_ident() == thread:
                record(module, out[0] if isinstance(out, tuple) else out)
            return out
        return observed

    def patch(mapping: dict, key: str) -> None:
        orig = mapping[key]
        mapping[key] = wrap(orig)
        restore.append(lambda: mapping.__setitem__(key, orig))

    namespaces = {id(ns): ns for ns in (sys.modules[type(m).__module__].__dict__ for m in model.modules())}
    try:
        if impl in (None, "eager"):
            for ns in namespaces.values():
                if callable(ns.get("eager_attention_forward")):
                    patch(ns, "eager_attention_forward")
        else:
            if impl in AttentionInterface._global_mapping:
                patch(AttentionInterface._global_mapping, impl)
            local = {id(i): i for i in (ns.get("ALL_ATTENTION_FUNCTIONS") for ns in namespaces.values())
                     if i is not None and impl in getattr(i, "_local_mapping", {})}
            for inst in local.values():   # a modeling file's own override (e.g. Doge)
                patch(inst._local_mapping, impl)
        yield
    finally:
        for undo in reversed(restore):
            undo()


# --------------------------------------------------------------------------- caches

def cache_layer(cache: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of layer i across transformers versions."""
    if hasattr(cache, "layers"):
        layer = cache.layers[i]
        return layer.keys, layer.values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[i], cache.value_cache[i]
    return cache[i][0], cache[i][1]


def make_cache_contiguous(cache: Any) -> None:
    """Store a dynamic cache's K/V contiguously. A prefill leaves each layer holding its keys in
    the projection's transposed layout; the first decode step's concatenation makes them
    contiguous, and Inductor, which guards on the strides it compiled for, would compile the
    decode graph a second time. Copies only the user's tokens' K/V, once after a prefill."""
    for layer in getattr(cache, "layers", ()):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and not keys.is_contiguous():
            layer.keys = keys.contiguous()
        if isinstance(values, torch.Tensor) and not values.is_contiguous():
            layer.values = values.contiguous()


def mark_static_cache(cache: Any) -> None:
    """Tag a static cache's tensors as fixed addresses, unguarded: CUDA graphs may mutate them in
    place, and another cache (another batch size) re-records the graph instead of recompiling it.
    transformers tags them (guarded) only when it allocates them outside a compiled region; a cache
    first filled inside the compiled prefill is not tagged, and CUDA graphs then skip the decode."""
    for layer in getattr(cache, "layers", ()):
        if not hasattr(layer, "max_cache_len") or not getattr(layer, "is_initialized", True):
            continue
        for name in ("keys", "values", "cumulative_length"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and getattr(t, "_dynamo_static_input_type", None) != "unguarded":
                torch._dynamo.mark_static_address(t, guard=False)


def static_cache_layers(cache: Any) -> list | None:
    """The layers of `cache` when a decode step over it can be captured in a CUDA graph: every
    layer a filled transformers StaticLayer (fixed-address K/V, per-step state in tensors); None
    for any other cache (dynamic, sliding-window, offloaded, quantized, not yet filled)."""
    layers = list(getattr(cache, "layers", None) or ())
    ok = layers and all(type(layer).__name__ == "StaticLayer" and getattr(layer, "is_initialized", False)
                        and isinstance(getattr(layer, "keys", None), torch.Tensor) for layer in layers)
    return layers if ok else None


def layer_step_state(layers: list) -> list[torch.Tensor]:
    """The tensors static cache layers carry besides keys and values (the step counter of recent
    transformers): what a decode step run twice over the same cache must restore in between."""
    return [t for layer in layers for name, t in vars(layer).items()
            if isinstance(t, torch.Tensor) and name not in ("keys", "values")]


def reusable_static_cache(model: torch.nn.Module, batch: int, total: int, keep: int = 4) -> Any:
    """A StaticCache for `batch` rows of up to `total` tokens, allocated once per (batch, length
    bucket: a power of two >= 256) on the model and reset when reused, so CUDA graphs replay at the
    same addresses question after question (transformers' generate allocates a new one per call).
    It holds only the user's tokens. None when transformers cannot allocate it up front."""
    init_shape = getattr(model, "_get_static_cache_init_shape", None)
    shape = init_shape() if init_shape is not None else None
    if shape is None:
        return None
    from transformers import StaticCache

    key = (batch, max(256, 1 << (total - 1).bit_length()))
    caches = model.__dict__.setdefault("_sqz_static_caches", {})
    cache = caches.pop(key, None)
    if cache is None:
        cache = StaticCache(config=model.config, max_cache_len=key[1])
        cache.early_initialization(batch_size=batch, num_heads=shape[0], head_dim=shape[1], dtype=model.dtype,
                                   device=model.device)
    else:
        cache.reset()
    caches[key] = cache  # most recently used last
    while len(caches) > keep:
        caches.pop(next(iter(caches)))
    mark_static_cache(cache)
    return cache


def drop_cache_layer(cache: Any, i: int) -> None:
    """Free layer i of the cache as soon as it has been copied out (long contexts are big)."""
    if hasattr(cache, "layers"):
        cache.layers[i].keys = cache.layers[i].values = None
    elif hasattr(cache, "key_cache"):
        cache.key_cache[i] = cache.value_cache[i] = None


@functools.lru_cache(maxsize=None)
def _cache_kwarg(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """{name: cache} for `model(...)`: transformers 5.24 renamed `past_key_values` to `cache`
    (the old name warns, removal announced for 5.40), 5.17 knows only the old one. Read once
    per model class from its forward's signature."""
    return {_cache_kwarg(type(model)): cache}


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The cache in a forward's keyword arguments, under either name (None without one)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def output_cache(output: Any) -> Any:
    """The cache a model output returns (`cache` from transformers 5.24, `past_key_values` before),
    read without the deprecation warning."""
    fields = getattr(output, "__dataclass_fields__", {})
    return getattr(output, "cache" if "cache" in fields else "past_key_values")
