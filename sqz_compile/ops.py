"""The sqz custom ops (torch.ops.sqz.*).

Defined with `torch.library.triton_op` so Inductor traces into their bodies: on CUDA the body
launches Triton kernels through `wrap_triton` (inlined into Inductor's generated code and packed
by AOTInductor); on CPU it runs the plain-torch reference, which traces to aten ops. Each op has
a fake implementation for tracing with fake tensors and dynamic shapes.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch.library import triton_op

from .config import DEFAULT_BLOCK_Q  # noqa: F401  (re-exported: the op's default)
from .context import CONTEXT_ARGS
from .kernels.attention.reference import log_partition_rest, squeezed_attention_reference
from .kernels.lookup.reference import certified_selection, select_clusters_reference, selection_mask_reference


def _check_inputs(q: torch.Tensor, centroids: torch.Tensor, offsets: torch.Tensor) -> None:
    torch._check(q.dim() == 4, lambda: f"sqz: q must be [B, Hq, M, D], got {tuple(q.shape)}")
    torch._check(centroids.dim() == 3, lambda: "sqz: centroids must be [H, C, D]")
    torch._check(q.shape[1] % centroids.shape[0] == 0,
                 lambda: f"sqz: {q.shape[1]} query heads is not a multiple of "
                         f"{centroids.shape[0]} KV heads in the context (wrong model?)")
    torch._check((q.shape[3] == centroids.shape[2]) | (2 * q.shape[3] == centroids.shape[2]),
                 lambda: f"sqz: head dim {q.shape[3]} does not match the context's centroids "
                         f"({centroids.shape[2]} columns: D means, or 2D means and variances)")
    torch._check(offsets.shape[-1] == centroids.shape[1] + 1, lambda: "sqz: offsets must be [H, C+1]")


def _use_cuda_kernels(q: torch.Tensor) -> bool:
    return q.device.type == "cuda"


@triton_op("sqz::select_clusters", mutates_args=())
def select_clusters(
    q: torch.Tensor,
    centroids: torch.Tensor,
    offsets: torch.Tensor,
    log_threshold: torch.Tensor,
    coarse_centroids: Optional[torch.Tensor],
    coarse_offsets: Optional[torch.Tensor],
    coarse_log_threshold: Optional[torch.Tensor],
    scale: float,
    block_q: int,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clusters kept per (batch row, KV head, query block): (idx [B,H,NB,C] int32 ascending,
    padded with -1; count [B,H,NB] int32). See kernels/lookup/reference.py for the rule."""
    _check_inputs(q, centroids, offsets)
    if _use_cuda_kernels(q):
        from .kernels.lookup.launch import select_clusters as cuda_select_clusters

        return cuda_select_clusters(q, centroids, offsets, log_threshold, coarse_centroids,
                                    coarse_offsets, coarse_log_threshold, scale, block_q, budget)
    return select_clusters_reference(q, centroids, offsets, log_threshold, scale, block_q, budget,
                                     coarse_centroids, coarse_offsets, coarse_log_threshold)


@select_clusters.register_fake
def _(q, centroids, offsets, log_threshold, coarse_centroids, coarse_offsets,
      coarse_log_threshold, scale, block_q, budget):
    b, m = q.shape[0], q.shape[2]
    h, c = centroids.shape[0], centroids.shape[1]
    nb = (m + block_q - 1) // block_q
    idx = q.new_empty((b, h, nb, c), dtype=torch.int32)
    count = q.new_empty((b, h, nb), dtype=torch.int32)
    return idx, count


def _squeezed_attention_impl(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    ctx_keys: torch.Tensor,
    ctx_values: torch.Tensor,
    centroids: torch.Tensor,
    offsets: torch.Tensor,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    log_threshold: torch.Tensor,
    coarse_centroids: Optional[torch.Tensor],
    coarse_offsets: Optional[torch.Tensor],
    coarse_log_threshold: Optional[torch.Tensor],
    radii: Optional[torch.Tensor],
    perm: Optional[torch.Tensor],
    rope: Optional[torch.Tensor],
    codebooks: Optional[torch.Tensor],
    key_norm: Optional[torch.Tensor],
    value_norm: Optional[torch.Tensor],
    outlier_idx: Optional[torch.Tensor],
    outlier_val: Optional[torch.Tensor],
    scale: float,
    is_causal: bool,
    budget: int,
    block_q: int,
    max_dropped_mass: float = 0.0,
) -> torch.Tensor:
    """Attention of the new tokens' queries q [B,Hq,M,D] over the selected clusters of one
    layer's fixed context, its observation window and the new keys/values k_new, v_new
    [B,H,S,D] under the model's mask (attn_mask / is_causal, SDPA semantics). Returns
    [B,Hq,M,D] in q's dtype. budget 0 selects by log_threshold; budget > 0 keeps the best
    clusters up to that many keys. block_q: queries that share one selection in prefill.
    max_dropped_mass > 0: error-bounded selection with the clusters' radii (lookup/reference.py),
    in plain torch ops on every device (no fused kernel yet).
    Low-bit context (ctx_keys/ctx_values packed int32, squeeze/quantize.py): perm, rope,
    codebooks, key_norm, value_norm and (optional) outlier_idx/outlier_val describe them; the CUDA
    kernel dequantizes the selected clusters in registers, the CPU branch dequantizes in float64."""
    _check_inputs(q, centroids, offsets)
    quant = (perm, rope, codebooks, key_norm, value_norm, outlier_idx, outlier_val)
    low_bit = ctx_keys.dtype == torch.int32
    if low_bit:
        torch._check(all(t is not None for t in quant[:5]) and ctx_values.dtype == torch.int32,
                     lambda: "sqz: packed int32 context K/V need perm, rope, codebooks, key_norm and value_norm "
                             "(pass every field of SqueezedContext.layer(i))")
    else:
        torch._check(all(t is None for t in quant),
                     lambda: f"sqz: low-bit context arguments given but ctx_keys are {ctx_keys.dtype}, not packed int32")

    def dense_kv():
        if not low_bit:
            return ctx_keys, ctx_values
        from .kernels.quant.reference import dequantize_context

        return dequantize_context(ctx_keys, ctx_values, *quant, q.shape[3])

    if max_dropped_mass > 0:
        torch._check(radii is not None, lambda: "sqz: max_dropped_mass needs the clusters' radii (context format 3)")
        ctx_keys, ctx_values = dense_kv()
        log_rest = log_partition_rest(q, k_new, attn_mask, is_causal, window_keys, scale)
        sel = certified_selection(q, centroids, offsets, radii, scale, block_q, max_dropped_mass, log_rest)
        return squeezed_attention_reference(q, k_new, v_new, attn_mask, ctx_keys, ctx_values, offsets, sel,
                                            window_keys, window_values, scale, is_causal, block_q)
    if _use_cuda_kernels(q):
        from .kernels.attention.launch import squeezed_attention as cuda_squeezed_attention

        return cuda_squeezed_attention(
            q, k_new, v_new, attn_mask, ctx_keys, ctx_values, centroids, offsets, window_keys,
            window_values, log_threshold, coarse_centroids, coarse_offsets, coarse_log_threshold, radii,
            *quant, scale, is_causal, budget, block_q)
    ctx_keys, ctx_values = dense_kv()
    sel = selection_mask_reference(
        q, centroids, offsets, log_threshold, scale, block_q, budget,
        coarse_centroids, coarse_offsets, coarse_log_threshold)
    return squeezed_attention_reference(
        q, k_new, v_new, attn_mask, ctx_keys, ctx_values, offsets, sel,
        window_keys, window_values, scale, is_causal, block_q)


squeezed_attention = triton_op("sqz::squeezed_attention", _squeezed_attention_impl, mutates_args=())


def _inference_only(ctx, *grads):
    raise RuntimeError(
        "sqz ops are inference-only (no gradients flow through a squeezed context): run the model "
        "under torch.no_grad() or torch.inference_mode()")


squeezed_attention.register_autograd(_inference_only)
select_clusters.register_autograd(_inference_only)


def context_params(fn, start: int = 4) -> tuple[str, ...]:
    """The context parameters of `fn` (the op, its CUDA launcher or its ONNX translation): the
    len(CONTEXT_ARGS) parameters after the first `start` (q, k_new, v_new, attn_mask), with the
    op's `ctx_` prefix dropped. They must equal context.CONTEXT_ARGS, the one ordered schema."""
    names = list(inspect.signature(fn).parameters)[start:start + len(CONTEXT_ARGS)]
    return tuple(n.removeprefix("ctx_") for n in names)


if context_params(_squeezed_attention_impl) != CONTEXT_ARGS:  # pragma: no cover
    raise AssertionError(f"torch.ops.sqz.squeezed_attention takes {context_params(_squeezed_attention_impl)}, "
                         f"context.CONTEXT_ARGS says {CONTEXT_ARGS}: keep them in one order")


@squeezed_attention.register_fake
def _(q, k_new, v_new, attn_mask, ctx_keys, ctx_values, centroids, offsets, window_keys,
      window_values, log_threshold, coarse_centroids, coarse_offsets, coarse_log_threshold, radii,
      perm, rope, codebooks, key_norm, value_norm, outlier_idx, outlier_val,
      scale, is_causal, budget, block_q, max_dropped_mass=0.0):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("sqz::bind_context", mutates_args=())
def bind_context(x: torch.Tensor, context: list[Optional[torch.Tensor]]) -> torch.Tensor:
    """Identity on `x` (a copy: a custom op may not alias its input) that ties a context's stacked
    tensors (CONTEXT_ARGS order, None where absent) into a traced graph as inputs. SqueezedModel
    calls it on the token ids; the rewrite feeds the sqz ops from its arguments and removes it
    (passes/bound.py), so no context data is compiled into the graph."""
    return x.clone()


@bind_context.register_fake
def _(x, context):
    return torch.empty_like(x)
