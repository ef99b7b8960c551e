"""Squeeze-time self-check: does what the capture read reproduce the model's own attention?

    reference = window_reference(model, ids, W, chunk_size)   # before the capture
    cap = capture_context(model, ids, W, chunk_size)
    check_capture(model, cap, reference)                      # CaptureMismatchError naming the layer

For the observation window (the last W context tokens) and every layer, the window's attention is
recomputed from the captured tensors alone -- softmax(q.k * scaling, causal) v with the captured
window queries, post-RoPE keys (positions p - L) and values -- and compared with the output of the
attention function the model itself calls (its attn_implementation's AttentionInterface entry or
its modeling file's `eager_attention_forward`), recorded during an ordinary prefill at natural
positions 0..L-1 with no sqz machinery. That function is what the rewrite replaces, so whatever
the squeezed attention would not reproduce -- qk-norm after RoPE, position or per-key biases,
attention sinks, soft-capping, per-layer scales, a capture bug -- makes a layer differ.

Not covered: effects outside the attention function that depend on absolute positions of the
user's tokens (e.g. Llama-4's NoPE temperature tuning; transformers_compat refuses those up front).

Cost: one more prefill of the context (chunked like the capture; run before it so that its cache
and the captured K/V are never held together) plus a [group, W, L] softmax per (layer, KV head).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..transformers_compat import (UnsupportedModelError, cache_kwargs, model_config, num_layers,
                                   observing_attention, output_cache)
from .capture import Captured, window_probs

# The error is the median over output rows (head, window token) of |recomputed - model| / |model|
# (row_error): a wrong capture moves every row, while rounding moves only the rows of sharp,
# near-tied attention. Float32 noise is ~1e-6 at short contexts; on top, RoPE angles are computed in
# float32 at positions p (model) and p - L (capture): their rounding, ~p * 2^-24 radians, is noise
# the squeezed model shows at run time too, so the tolerance grows by 2^-24 per position. The max
# over rows was the float32 metric until SmolLM2 on the demo's 3,215-token essay failed a clean
# capture with it (layer 25: max 4.8e-4 over 1.4% of rows above 1e-4; median 1.2e-5, every layer's
# median <= 2e-5 against a tolerance of 2e-4).
# Half precision rounds the keys rotated at p and at p - L differently, and in sharp attention that
# flips near-tied rows entirely (the max error: SmolLM2 in bfloat16 at 2K 0.05, an 8B-shaped random
# model at 32K 0.34, tiny models with sharpened logits 0.8+); the median over rows stays small
# (SmolLM2 bfloat16 at 2K: 0.002-0.03 per layer; sharpened tiny models < 0.05), while a wrong
# capture moves every row (values off by 1.5x: 0.5).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}
HALF_TOLERANCE = 0.25
ROPE_ROUNDING = 2.0 ** -24


class CaptureMismatchError(UnsupportedModelError):
    """The captured context does not reproduce the model's attention: squeezing would be wrong."""


@dataclass
class SelfCheck:
    """Per-layer relative errors of the recomputed window attention, and the tolerance."""

    errors: list[float]
    tol: float
    seconds: float = 0.0

    @property
    def failing(self) -> list[int]:
        return [i for i, e in enumerate(self.errors) if not e <= self.tol]   # NaN fails


def tolerance(dtype: torch.dtype, positions: int) -> float:
    """The self-check's tolerance for a model in `dtype` over a context of `positions` tokens."""
    return TOLERANCE.get(dtype, HALF_TOLERANCE) + positions * ROPE_ROUNDING


@torch.no_grad()
def window_reference(model: torch.nn.Module, ids: torch.Tensor, window: int, chunk_size: int) -> list[torch.Tensor]:
    """Per layer, the model's own attention-function output [Hq, W, Dv] (float32) for the last
    `window` tokens of `ids` [1, L], from a chunked prefill at natural positions (eval mode;
    the model is left as it was)."""
    cfg = model_config(model)
    layers, L = num_layers(cfg), ids.shape[1]
    device = next(model.parameters()).device
    ids = ids.to(device)
    got: dict[int, list[torch.Tensor]] = {}
    order: dict[int, int] = {}
    chunk = {"start": 0}

    def record(module: torch.nn.Module, out: torch.Tensor) -> None:
        li = getattr(module, "layer_idx", None)
        li = int(li) if li is not None else order.setdefault(id(module), len(order))
        lo = max(L - window - chunk["start"], 0)
        if out.dim() == 4 and lo < out.shape[1]:    # [B, M, Hq, Dv]; Hq: this rank's under tensor parallel
            got.setdefault(li, []).append(out[0, lo:].float().transpose(0, 1))

    was_training = model.training
    base = getattr(model, "base_model", model)
    model.eval()
    try:
        with observing_attention(model, record):
            cache = None
            for start in range(0, L, chunk_size):
                end = min(L, start + chunk_size)
                chunk["start"] = start
                pos = torch.arange(start, end, device=device).unsqueeze(0)
                out = base(input_ids=ids[:, start:end], position_ids=pos, use_cache=end < L,
                           **cache_kwargs(base, cache))
                cache = output_cache(out) if end < L else None
                del out
    finally:
        model.train(was_training)
    missing = sorted(set(range(layers)) - set(got))
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__}: the squeeze self-check saw no output of the model's own attention "
            f"function in layers {missing}, so it cannot prove the capture there")
    return [torch.cat(got[i], 1) for i in range(layers)]


def recompute_window(cap: Captured, layer: int) -> torch.Tensor:
    """The window's attention [Hq, W, Dv] (float32) of one layer from the captured tensors alone."""
    keys, values, queries = cap.keys[layer], cap.values[layer], cap.queries[layer]
    g = queries.shape[0] // keys.shape[0]
    return torch.cat([window_probs(queries[h * g:(h + 1) * g], keys[h], cap.scaling) @ values[h].float()
                      for h in range(keys.shape[0])])


def row_error(rec: torch.Tensor, ref: torch.Tensor) -> float:
    """Median over (head, window token) of |rec - ref| / |ref| per output row: a wrong capture moves
    every row, while rounding moves only the rows of near-tied sharp attention."""
    rows = (rec - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-6)
    return rows.flatten().median().item()


def measure(cap: Captured, reference: list[torch.Tensor]) -> SelfCheck:
    """Per-layer row_error of the recomputed window attention (inf where the shapes differ)."""
    errors = []
    for i, ref in enumerate(reference):
        rec = recompute_window(cap, i)
        if rec.shape != ref.shape:
            errors.append(float("inf"))
            continue
        errors.append(row_error(rec, ref.to(rec.device)))
    return SelfCheck(errors, tolerance(cap.keys.dtype, cap.keys.shape[2]))


def check_capture(model: torch.nn.Module, cap: Captured, reference: list[torch.Tensor]) -> SelfCheck:
    """The self-check's verdict; raises CaptureMismatchError naming the first failing layer, its
    error and what to do."""
    t0 = time.perf_counter()
    res = measure(cap, reference)
    res.seconds = time.perf_counter() - t0
    failing = res.failing
    if failing:
        i, W, L = failing[0], cap.queries.shape[2], cap.keys.shape[2]
        dtype = str(cap.keys.dtype).removeprefix("torch.")
        raise CaptureMismatchError(
            f"{type(model).__name__} cannot be squeezed: in layer {i} the attention recomputed from the "
            f"captured context differs from the model's own attention by {res.errors[i]:.3g} ("
            f"median relative error over output rows, "
            f"tolerance {res.tol:.2g} for {dtype} at {L} positions, over the last {W} context tokens; failing layers "
            f"{failing}). Squeezing would silently change the model's outputs: this architecture's attention "
            f"is not softmax(q.k * {cap.scaling:.4g}) v over its cached keys at relative positions (e.g. "
            f"qk-norm after RoPE, position or per-key biases, attention sinks). Use a supported model"
            f"{'; if the error is close to the tolerance, squeeze in float32 to tell rounding from a real mismatch' if dtype != 'float32' else ''}.")
    return res
