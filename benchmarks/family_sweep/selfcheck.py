"""Squeeze-time self-check prototype: does what `capture_context` captured reproduce the model's attention?

    cap = sqz_compile.models.capture_context(model, ids, W, chunk_size)
    res = self_check(model, ids, cap)          # raises CaptureMismatchError naming the layer(s)

For the observation window (the last W context tokens) and every layer it recomputes, from the captured
tensors alone,

    out[l] = softmax(q_l . K_l^T * scaling + causal) V_l        (GQA: KV head = query head // group)

and compares it with the model's own attention output for the same tokens: the output of the attention
function the model really calls (the AttentionInterface entry of its attn_implementation, or its
modeling file's `eager_attention_forward`), recorded by a thin wrapper while the *unmodified* model
(its own attn_implementation, natural positions 0..L-1, no sqz machinery) prefills the context. That
function is exactly what the sqz rewrite replaces, so post-attention gates / norms do not matter. Anything the squeezed attention would not reproduce -- score soft-capping, sinks,
ALiBi / position biases, sliding-window masks, per-layer scales, keys or values the cache holds in a
different form than attention uses, position-dependent query scaling, a capture bug -- shows up as a
layer whose recomputed output differs from the model's.

Cost: one extra prefill of the context (chunked like the capture) plus a [Hq, W, L] softmax per layer.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator
from dataclasses import dataclass, field

import torch

class CaptureMismatchError(RuntimeError):
    """The captured K/V/queries do not reproduce the model's attention (squeezing would be wrong)."""


@dataclass
class SelfCheckResult:
    errors: list[float]                    # per layer: max |recomputed - model| / max |model|
    tol: float
    failing: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failing

    def __str__(self) -> str:
        errs = ", ".join(f"L{i}: {e:.2e}" for i, e in enumerate(self.errors))
        verdict = "ok" if self.ok else f"FAIL layers {self.failing}"
        return f"self-check {verdict} (tol {self.tol:.0e}; {errs}; {self.seconds:.3f}s)"


@contextlib.contextmanager
def _recording_attention(model: torch.nn.Module, record) -> Iterator[None]:
    """Wrap the attention function the model really calls (its own `eager_attention_forward` global, or
    the AttentionInterface entry of its attn_implementation) so that `record(module, output)` sees every
    call's output [B, M, Hq, Dv]; the model's settings are left alone and everything is restored."""
    from transformers import AttentionInterface

    impl = model.config._attn_implementation
    restore: list = []

    def wrap(fn):
        def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
            out = fn(module, query, key, value, attention_mask, *args, **kwargs)
            record(module, out[0] if isinstance(out, tuple) else out)
            return out
        return wrapped

    try:
        if impl not in (None, "eager"):
            # the class-wide mapping, plus any modeling file's own AttentionInterface instance that
            # overrides the entry locally (e.g. doge keeps its own ALL_ATTENTION_FUNCTIONS)
            gm = AttentionInterface._global_mapping
            if impl in gm:
                orig = gm[impl]
                gm[impl] = wrap(orig)
                restore.append(lambda: gm.__setitem__(impl, orig))
            seen = set()
            for mod in model.modules():
                inst = sys.modules[type(mod).__module__].__dict__.get("ALL_ATTENTION_FUNCTIONS")
                if inst is None or id(inst) in seen or impl not in getattr(inst, "_local_mapping", {}):
                    continue
                seen.add(id(inst))
                orig_l = inst._local_mapping[impl]
                inst._local_mapping[impl] = wrap(orig_l)
                restore.append(lambda inst=inst, f=orig_l: inst._local_mapping.__setitem__(impl, f))
        else:  # eager: each modeling file's own `eager_attention_forward`, looked up as a global at call time
            seen = set()
            for mod in model.modules():
                ns = sys.modules[type(mod).__module__].__dict__
                if id(ns) in seen or not callable(ns.get("eager_attention_forward")):
                    continue
                seen.add(id(ns))
                orig_e = ns["eager_attention_forward"]
                ns["eager_attention_forward"] = wrap(orig_e)
                restore.append(lambda ns=ns, f=orig_e: ns.__setitem__("eager_attention_forward", f))
        yield
    finally:
        for r in reversed(restore):
            r()


@torch.no_grad()
def model_window_attention(model: torch.nn.Module, ids: torch.Tensor, window: int, chunk_size: int,
                           layers: int, hq: int) -> list[torch.Tensor]:
    """Per layer: the model's own attention-function output [Hq, W, Dv] (float32) for the last `window`
    context tokens, from an ordinary prefill at natural positions 0..L-1."""
    L = ids.shape[1]
    got: dict[int, list[torch.Tensor]] = {}
    order: dict[int, int] = {}
    state = {"start": 0}

    def record(module, out):
        li = getattr(module, "layer_idx", None)
        li = int(li) if li is not None else order.setdefault(id(module), len(order))
        lo = max(L - window - state["start"], 0)
        if out.dim() == 4 and out.shape[2] == hq and lo < out.shape[1]:   # [B, M, Hq, Dv]
            got.setdefault(li, []).append(out[0, lo:].float().transpose(0, 1))

    was_training = model.training
    model.eval()
    base = getattr(model, "base_model", model)
    try:
        with _recording_attention(model, record):
            cache = None
            for start in range(0, L, chunk_size):
                end = min(L, start + chunk_size)
                state["start"] = start
                out = base(input_ids=ids[:, start:end], position_ids=torch.arange(start, end, device=ids.device)[None],
                           past_key_values=cache, use_cache=end < L)
                cache = out.past_key_values
                del out
    finally:
        model.train(was_training)
    missing = sorted(set(range(layers)) - set(got))
    if missing:
        raise CaptureMismatchError(f"self-check: saw no attention output for layers {missing}")
    return [torch.cat(got[i], 1) for i in range(layers)]


def recompute_window_attention(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                               scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling, causal) v for the window queries of one layer, from captured tensors.
    keys/values [H, L, D(v)], queries [Hq, W, D] -> [Hq, W, Dv] float32."""
    H, L, _ = keys.shape
    hq, W, _ = queries.shape
    g = hq // H
    k = keys.float().repeat_interleave(g, 0)
    v = values.float().repeat_interleave(g, 0)
    s = queries.float() @ k.transpose(1, 2) * scaling     # [Hq, W, L]
    pos_q = torch.arange(L - W, L, device=s.device)[:, None]
    s = s.masked_fill(torch.arange(L, device=s.device)[None, :] > pos_q, float("-inf"))
    return s.softmax(-1) @ v


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float64: 1e-8}.get(dtype, 3e-2)


def self_check(model: torch.nn.Module, ids: torch.Tensor, cap, *, chunk_size: int = 4096,
               tol: float | None = None, raise_on_fail: bool = True) -> SelfCheckResult:
    """Check a `Captured` (keys/values [layers, H, L, D] post-RoPE at p - L, queries [layers, Hq, W, D],
    scaling) against the model's own attention over the window. Raises CaptureMismatchError naming the
    first failing layer (or returns the result with raise_on_fail=False)."""
    t0 = time.perf_counter()
    layers, H, L, _ = cap.keys.shape
    hq, W = cap.queries.shape[1], cap.queries.shape[2]
    tol = tolerance(cap.keys.dtype) if tol is None else tol
    ref = model_window_attention(model, ids.to(cap.keys.device), W, chunk_size, layers, hq)
    errors = []
    for i in range(layers):
        rec = recompute_window_attention(cap.keys[i], cap.values[i], cap.queries[i], cap.scaling)
        r = ref[i]
        if r.shape != rec.shape:
            errors.append(float("inf"))
            continue
        errors.append(((rec - r).abs().max() / r.abs().max().clamp(min=1e-6)).item())
    failing = [i for i, e in enumerate(errors) if not e <= tol]
    res = SelfCheckResult(errors, tol, failing, time.perf_counter() - t0)
    if failing and raise_on_fail:
        i = failing[0]
        raise CaptureMismatchError(
            f"{type(model).__name__}: the captured context does not reproduce the model's attention in layer "
            f"{i} (relative error {errors[i]:.3g} > {tol:g} over the last {W} context tokens; failing layers "
            f"{failing}). Squeezing it would silently change the model's output: its attention differs from "
            f"softmax(q.k * {cap.scaling:.4g}) v over the cached keys (soft-capping, sinks, position bias, "
            f"sliding window, or keys/queries the capture cannot see)")
    return res
