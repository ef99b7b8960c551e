"""One compiled forward per model, shared by every context of the same structure.

SqueezedModel runs `model.forward` through `CompiledForward`: torch.compile of

    forward_with_context(context, **inputs) = model.forward(input_ids=bind_context(input_ids, context), ...)

where `context` is a context's stacked tensors (`graph_inputs`). They are graph inputs, not
constants (passes/bound.py), and shapes are dynamic, so a second context (another document,
another length, other thresholds) and a second question run the code compiled for the first.
`shared_forward` keeps one CompiledForward per (model, settings, `structure_key`) on the model
(the private attribute `_sqz_compiled`), so `sqz_compile.compile(model, other_ctx)` compiles nothing.

The backend only sees `skeleton(ctx)`: the first context's layout without its data, for the
rewrite's checks, so compiled code never keeps a context alive.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.fx.experimental._config  # noqa: F401  (use_duck_shape)

from .context import CENTROID_ARGS, CONTEXT_ARGS, SqueezedContext
from .passes.rewrite import DenseNotice

_inputs: "weakref.WeakKeyDictionary[SqueezedContext, list]" = weakref.WeakKeyDictionary()


def structure_key(ctx: SqueezedContext) -> tuple:
    """What compiled code depends on besides sizes: which tensors exist, their dtypes, device and
    fixed dims (layers, heads, head dim, centroid width, packed words), the K/V bits, each layer's op budget and dropped-mass
    bound (constants of the op), the shard."""
    fixed = tuple((n, t.dtype, t.shape[:2], t.shape[3:]) if t is not None else (n, None)
                  for n, t in zip(CONTEXT_ARGS, _stacked(ctx)))
    per_layer = tuple((ctx.layer_budget(i), ctx.layer_max_dropped_mass(i)) for i in range(ctx.num_layers))
    return (fixed, ctx.keys.device, per_layer, ctx.shard, ctx.kv_bits)


def _stacked(ctx: SqueezedContext) -> list[torch.Tensor | None]:
    return ctx.op_tensors()


def graph_inputs(ctx: SqueezedContext) -> list[torch.Tensor | None]:
    """`ctx`'s stacked tensors in CONTEXT_ARGS order as the compiled graph takes them, made once per
    context: centroids in the keys' dtype when that is half precision (the lookup reads every
    centroid at each step: half the bytes), and static addresses (CUDA graphs read them in place;
    a new context re-records a graph rather than recompiling it)."""
    if ctx not in _inputs:
        half = ctx.lookup_centroid_dtype
        out = []
        for name, t in zip(CONTEXT_ARGS, _stacked(ctx)):
            if t is not None and half is not None and name in CENTROID_ARGS:
                t = t.to(half)
            if t is not None:
                torch._dynamo.mark_static_address(t, guard=False)
            out.append(t)
        _inputs[ctx] = out
    return _inputs[ctx]


def skeleton(ctx: SqueezedContext) -> SqueezedContext:
    """`ctx` without its data: every tensor of 3+ dims gets 0 entries along dim 2 (keys, clusters,
    window), so shapes elsewhere, dtypes, device, config and fingerprint stay for the checks."""
    def empty(t: torch.Tensor) -> torch.Tensor:
        return t.new_empty((*t.shape[:2], 0, *t.shape[3:])) if t.dim() >= 3 else t.clone()

    return dataclasses.replace(ctx, **{n: empty(t) for n, t in ctx.tensors().items()},
                               fingerprint=dict(ctx.fingerprint), extra=dict(ctx.extra))


@contextlib.contextmanager
def dynamo_settings() -> Iterator[None]:
    """Dynamo settings for a SqueezedModel call: the softmax scale traces as a constant (dynamic
    shapes would make model floats symbols and leave every layer dense); no duck sizing (a
    context's sizes that happen to be equal, say 10 clusters and 10 window keys, would otherwise
    share one symbol, and the next context recompile); running out of recompiles is an error, not
    a silent fallback to the model's dense forward; and the limit counts every model's graphs
    (their compiled forwards share one code object), so it is raised to match."""
    want = {"specialize_float": True, "fail_on_recompile_limit_hit": True,
            "recompile_limit": max(256, torch._dynamo.config.recompile_limit)}
    with torch._dynamo.config.patch(**{k: v for k, v in want.items() if hasattr(torch._dynamo.config, k)}), \
            torch.fx.experimental._config.patch(use_duck_shape=False):
        yield


def token_input(args: tuple, kwargs: dict) -> str | int | None:
    """Where a forward call's token ids (or embeddings) are: "input_ids" / "inputs_embeds" in
    kwargs, 0 for the first positional argument, None when it has neither."""
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return key
    return 0 if args and isinstance(args[0], torch.Tensor) else None


def _bind(context: list, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The forward's arguments with its token ids (or embeddings) passed through bind_context."""
    key = token_input(args, kwargs)
    if key is None:
        raise ValueError("sqz: the forward got neither input_ids nor inputs_embeds")
    if key == 0:
        return (torch.ops.sqz.bind_context(args[0], context), *args[1:]), kwargs
    return args, {**kwargs, key: torch.ops.sqz.bind_context(kwargs[key], context)}


class CompiledForward:
    """`model.forward` compiled once with the "sqz" backend, the context as an input: call it as
    `cf(graph_inputs(ctx), *args, **kwargs)`. `reports`: one RewriteReport per compiled graph."""

    def __init__(self, model: torch.nn.Module, ctx: SqueezedContext, backend: Callable, options: dict[str, Any],
                 dynamic: bool | None, fullgraph: bool) -> None:
        self.reports: list = []
        forward = model.forward
        self.model_forward = forward  # the model's own forward, for calls that bypass the compiled one

        def forward_with_context(context: list, *args: Any, **kwargs: Any) -> Any:
            args, kwargs = _bind(context, args, kwargs)
            return forward(*args, **kwargs)

        options = {**options, "context": skeleton(ctx), "on_report": self.reports.append}
        self._fn = torch.compile(forward_with_context, backend=backend, options=options, dynamic=dynamic,
                                 fullgraph=fullgraph)

    def __call__(self, context: list, *args: Any, **kwargs: Any) -> Any:
        return self._fn(context, *args, **kwargs)


def shared_forward(model: torch.nn.Module, ctx: SqueezedContext, backend: Callable, options: dict[str, Any],
                   dynamic: bool | None, fullgraph: bool) -> CompiledForward:
    """The model's CompiledForward for these settings and `ctx`'s structure, made on first use."""
    # not part of the key: the model (the cache lives on it) and a per-SqueezedModel warning notice
    settings = sorted((k, v) for k, v in options.items() if k != "model" and not isinstance(v, DenseNotice))
    key = (structure_key(ctx), repr(settings), dynamic, fullgraph, backend)
    cache = model.__dict__.setdefault("_sqz_compiled", {})
    if key not in cache:
        cache[key] = CompiledForward(model, ctx, backend, options, dynamic, fullgraph)
    return cache[key]


__all__ = ["CompiledForward", "shared_forward", "dynamo_settings", "graph_inputs", "skeleton", "structure_key", "token_input"]
