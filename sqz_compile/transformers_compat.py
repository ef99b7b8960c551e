"""Every transformers quirk in one place: config access, the sliding-window and max-position
rules, switching the attention implementation, cache layout across versions, and the model
fingerprint / support checks that decide whether a model can be squeezed.

Callers (squeeze, passes, SqueezedModel, export, eval) read model configs only through here.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import torch

# rope types whose frequencies depend on absolute position or sequence length: relative
# positions p - L would not reproduce the model's attention.
ABSOLUTE_ROPE_TYPES = frozenset({"dynamic", "longrope"})
KNOWN_GOOD = frozenset({"llama", "mistral", "qwen2", "qwen3"})


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


def check_supported(model: torch.nn.Module, context_length: int) -> None:
    """Raise UnsupportedModelError unless squeezing `model` over `context_length` tokens is sound."""
    cfg = model_config(model)
    name = type(model).__name__
    if context_length < 1:
        raise ValueError("empty context: squeeze needs at least one context token")
    check_positions(model, context_length, f"context of {context_length} tokens",
                    "shorten the context (or use a model trained for longer contexts)")
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
    sw = sliding_window(cfg)
    if sw is not None:
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


# --------------------------------------------------------------------------- caches

def cache_layer(cache: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of layer i across transformers versions."""
    if hasattr(cache, "layers"):
        layer = cache.layers[i]
        return layer.keys, layer.values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[i], cache.value_cache[i]
    return cache[i][0], cache[i][1]


def drop_cache_layer(cache: Any, i: int) -> None:
    """Free layer i of the cache as soon as it has been copied out (long contexts are big)."""
    if hasattr(cache, "layers"):
        cache.layers[i].keys = cache.layers[i].values = None
    elif hasattr(cache, "key_cache"):
        cache.key_cache[i] = cache.value_cache[i] = None
