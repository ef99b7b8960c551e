"""Decode steps without Dynamo, replayed from CUDA graphs (CompileConfig(decode_inductor=False,
mode="reduce-overhead") over a static cache on a GPU).

A step is the model's own forward with the sqz op as its attention function (attention_function.py),
so the first answer waits for no tracing and no Inductor compile. Per call signature (the tensor
arguments' shapes, strides, dtypes and devices, the other arguments' values, the cache and the
addresses of its tensors):

1. first call: run eagerly, which warms up what must not happen inside a capture (Triton compiling
   the sqz kernels, cuBLAS choosing its kernels);
2. second call: captured in a torch.cuda.CUDAGraph that reads static copies of the tensor
   arguments, then replayed;
3. third call: checked. The graph replays the step, the cache is put back as it was, the step
   runs eagerly, and the two outputs must agree. A graph that disagrees (the forward baked in a
   value that changes from step to step) is dropped with a warning, the eager step's output and
   cache writes stand, and that signature runs eagerly from then on; a capture that fails (a host
   sync in the forward) does the same.
4. after that: copy the arguments in, replay, return the outputs cloned.
"""
from __future__ import annotations

import collections
import warnings
from typing import Any, Callable

import torch

from .transformers_compat import layer_step_state, passed_cache, static_cache_layers

_PLAIN = (type(None), bool, int, float, str)
MAX_GRAPHS = 8  # signatures kept (batch sizes x caches); the oldest graph is dropped beyond it
CHECK_TOLERANCE = 1e-2  # relative L2 difference of the outputs allowed between eager step and replay


class DecodeGraphs:
    """Decode steps of `run` (a forward call), captured per signature and replayed (module doc)."""

    def __init__(self, run: Callable[..., Any]) -> None:
        self.run = run
        self.graphs: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self.captured = 0  # graphs captured so far (tests count them)
        self.warned = False  # said once that CUDA steps run without graphs

    def __call__(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        step = _signature(args, kwargs)
        if step is None:
            if not self.warned and any(isinstance(v, torch.Tensor) and v.is_cuda for v in (*args, *kwargs.values())):
                self.warned = True
                cache = passed_cache(kwargs)
                warnings.warn(f"sqz_compile: decode steps over {type(cache).__name__ if cache is not None else 'no cache'}"
                              f" run eagerly, without CUDA graphs: they need a filled transformers StaticCache and "
                              f"plain arguments (generate picks a static cache unless another is passed)",
                              RuntimeWarning, stacklevel=4)
            return self.run(*args, **kwargs)
        key, values, rebuild = step
        entry = self.graphs.get(key)
        if entry is None:  # 1: warm up
            self._remember(key, "warm")
            return self.run(*args, **kwargs)
        if entry == "eager":
            return self.run(*args, **kwargs)
        if entry == "warm":  # 2: capture, then replay
            entry = self._capture(key, values, rebuild)
            if entry is None:
                return self.run(*args, **kwargs)
            return entry.replay(values)
        if not entry.checked:  # 3: eager and replay of the same step must agree
            return self._check(key, entry, values, args, kwargs)
        self.graphs.move_to_end(key)
        return entry.replay(values)

    def _remember(self, key: tuple, entry: Any) -> None:
        self.graphs[key] = entry
        self.graphs.move_to_end(key)
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)

    def _capture(self, key: tuple, values: list, rebuild: Callable) -> "_Graph | None":
        static = [v.clone() if isinstance(v, torch.Tensor) else v for v in values]
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                a, kw = rebuild(static)
                out = self.run(*a, **kw)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run this signature eagerly
            torch.cuda.synchronize()
            self._remember(key, "eager")
            warnings.warn(f"sqz_compile: a decode step could not be captured in a CUDA graph ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); these steps run eagerly", RuntimeWarning,
                          stacklevel=4)
            return None
        entry = _Graph(graph, static, out)
        self._remember(key, entry)
        self.captured += 1
        return entry

    def _check(self, key: tuple, entry: "_Graph", values: list, args: tuple, kwargs: dict[str, Any]) -> Any:
        # the replay first, then the cache put back as it was (a wrong graph may have written
        # anywhere in it; one copy of the user's tokens' K/V, once per graph), then the eager step,
        # whose writes are the ones that stay
        layers = static_cache_layers(passed_cache(kwargs)) or []
        state = [t for layer in layers for t in (layer.keys, layer.values)] + layer_step_state(layers)
        saved = [t.clone() for t in state]
        out = entry.replay(values)
        for t, s in zip(state, saved):
            t.copy_(s)
        del saved
        eager = self.run(*args, **kwargs)
        diff = _difference(eager, out)
        if diff > CHECK_TOLERANCE:
            self._remember(key, "eager")
            warnings.warn(f"sqz_compile: a decode step replayed from its CUDA graph differs from the same step run "
                          f"eagerly (relative difference {diff:.2e}); the graph is dropped and these steps run "
                          f"eagerly", RuntimeWarning, stacklevel=4)
            return eager
        entry.checked = True
        return out


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, static: list, out: Any) -> None:
        self.graph, self.static, self.out, self.checked = graph, static, out, False

    def replay(self, values: list) -> Any:
        for s, v in zip(self.static, values):
            if isinstance(s, torch.Tensor):
                s.copy_(v)
        self.graph.replay()
        return _clone_tensors(self.out)


def _signature(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, list, Callable] | None:
    """(key, argument values, rebuild(values) -> (args, kwargs)) of a capturable step: CUDA tensors,
    plain values and a static cache only; None otherwise (the step runs eagerly)."""
    cache = passed_cache(kwargs)
    layers = static_cache_layers(cache)
    if layers is None or not layers[0].keys.is_cuda:
        return None
    names = [k for k in kwargs if kwargs[k] is not cache]
    values = [*args, *(kwargs[k] for k in names)]
    parts = []
    for v in values:
        if isinstance(v, torch.Tensor):
            if not v.is_cuda:
                return None
            parts.append((tuple(v.shape), v.stride(), v.dtype, v.device))
        elif isinstance(v, _PLAIN):
            parts.append((type(v), v))
        else:
            return None
    ptrs = tuple(t.data_ptr() for t in (*(t for layer in layers for t in (layer.keys, layer.values)),
                                         *layer_step_state(layers)))
    cache_name = next(k for k in kwargs if kwargs[k] is cache)
    key = (len(args), tuple(names), tuple(parts), id(cache), ptrs)

    def rebuild(vals: list) -> tuple[tuple, dict[str, Any]]:
        return tuple(vals[:len(args)]), {**dict(zip(names, vals[len(args):])), cache_name: cache}

    return key, values, rebuild


def _clone_tensors(out: Any) -> Any:
    """A model output with its tensors copied out of the graph's memory (the next replay
    overwrites them); the cache and other fields as they are."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if hasattr(out, "items") and hasattr(out, "__dataclass_fields__"):
        return type(out)(**{k: _clone_tensors(v) for k, v in out.items()})
    if isinstance(out, tuple):
        return type(out)(_clone_tensors(v) for v in out)
    return out


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "items") and hasattr(out, "__dataclass_fields__"):
        return [t for _, v in out.items() for t in _tensors(v)]
    if isinstance(out, tuple):
        return [t for v in out for t in _tensors(v)]
    return []


def _difference(a: Any, b: Any) -> float:
    """Largest relative L2 difference between the outputs' tensors (inf when they do not pair up)."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf")
    worst = 0.0
    for x, y in zip(ta, tb):
        x, y = x.double(), y.double()
        worst = max(worst, float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(x).clamp_min(1e-30)))
    return worst


__all__ = ["DecodeGraphs", "MAX_GRAPHS", "CHECK_TOLERANCE"]
