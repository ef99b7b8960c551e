"""ONNX export of a squeezed model: torch.ops.sqz written as standard ONNX ops (opset 18).

`export_onnx` takes the ExportedProgram of `program.export` through torch.onnx (dynamo=True)
with a `custom_translation_table` that spells each sqz op in plain ONNX, so onnxruntime (or any
runtime) runs the model without a custom-op library. Why a translation and not a decomposition:
the ops' CPU bodies (kernels/*.py) use aten.searchsorted and stable sorts that the stock exporter
does not translate, while the lookup maps directly onto ONNX:

  centroid scores   MatMul(q, centroids^T) * scale            (GQA: q reshaped to [B,H,G,M,D];
                    [q, s/2 q^2] for centroids holding variances)
  log shares        s - ReduceLogSumExp(s + log n)            (empty clusters: -inf)
  block decision    Pad to a whole number of query blocks, ReduceMax over the group and block
  keep rule         Greater(best, log_threshold), or TopK + CumSum of cluster sizes for a budget
  cluster -> keys   GatherElements on each key's cluster id (a CumSum over cluster starts,
                    constant-folded, since the context is a constant)
  attention         Softmax over [selected context | window | new keys + the model's mask]

The semantics are those of kernels/lookup/reference.py and kernels/attention/reference.py; tests compare the two.
Everything is computed in float32 and cast back to q's dtype.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Any, Callable

import torch

from ..config import DEFAULT_BLOCK_Q, CompileConfig, resolve_compile_config
from ..context import SqueezedContext

OPSET = 18
_NEG_INF = float("-inf")
_BIG = 2 ** 62  # "to the end" for Slice


def _ops():
    from onnxscript import opset18 as op

    return op


def _i64(op, *values: int):
    return op.Constant(value_ints=list(values))


def _f32(op, value: float):
    return op.Constant(value_float=float(value))


def _dim(op, x, i: int):
    return op.Shape(x, start=i, end=i + 1)


def _arange(op, n):
    """[1] int64 length -> 0..n-1."""
    return op.Range(op.Constant(value_int=0), op.Squeeze(n, _i64(op, 0)), op.Constant(value_int=1))


def _log_share(op, scores, log_n):
    """scores [..., K] (s q.mu) and log sizes broadcastable to them -> log shares; -inf where a
    cluster is empty."""
    lse = op.ReduceLogSumExp(op.Add(scores, log_n), _i64(op, -1), keepdims=1)
    empty = op.IsInf(log_n, detect_negative=1, detect_positive=0)
    return op.Where(empty, _f32(op, _NEG_INF), op.Sub(scores, lse))


def _block_max(op, x, block_q: int):
    """[B, H, G, M, K] -> [B, H, NB, K]: max over the GQA group and each block of queries (the
    last block padded with -inf)."""
    m = _dim(op, x, 3)
    bq = _i64(op, block_q)
    pad = op.Mod(op.Sub(bq, op.Mod(m, bq)), bq)
    pads = op.Concat(_i64(op, 0, 0, 0, 0, 0, 0, 0, 0), pad, _i64(op, 0), axis=0)
    xp = op.Pad(x, pads, _f32(op, _NEG_INF))
    shape = op.Concat(op.Shape(xp, start=0, end=3), _i64(op, -1, block_q), op.Shape(xp, start=4, end=5), axis=0)
    return op.ReduceMax(op.Reshape(xp, shape), _i64(op, 2, 4), keepdims=0)


def _per_query(op, x, block_q: int, m):
    """[B, H, NB, K] per query block -> [B, H, M, K] per query row."""
    k = _dim(op, x, 3)
    rep = op.Expand(op.Unsqueeze(x, _i64(op, 3)), _i64(op, 1, 1, 1, block_q, 1))
    rows = op.Reshape(rep, op.Concat(_i64(op, 0, 0, -1), k, axis=0))
    return op.Slice(rows, _i64(op, 0), m, _i64(op, 2))


def _heads_first(op, t):
    """[H, K, D] -> [1, H, 1, D, K] (to MatMul against q grouped as [B, H, G, M, D])."""
    return op.Unsqueeze(op.Transpose(op.Cast(t, to=1), perm=[0, 2, 1]), _i64(op, 0, 2))


def _sizes(op, offsets):
    """[H, C+1] offsets -> [H, C] float32 cluster sizes."""
    hi = op.Slice(offsets, _i64(op, 1), _i64(op, _BIG), _i64(op, 1))
    lo = op.Slice(offsets, _i64(op, 0), _i64(op, -1), _i64(op, 1))
    return op.Cast(op.Sub(hi, lo), to=1)


def _count_starts_at_or_before(op, offsets, length):
    """[H, K+1] non-decreasing offsets from 0 to `length` -> [H, length] int64: for each position
    p, how many of offsets[1..K-1] are <= p (the index of the range holding p)."""
    h = _dim(op, offsets, 0)
    inner = op.Cast(op.Slice(offsets, _i64(op, 1), _i64(op, -1), _i64(op, 1)), to=7)  # [H, K-1]
    zeros = op.Expand(_i64(op, 0), op.Concat(h, op.Add(length, _i64(op, 1)), axis=0))
    hits = op.ScatterElements(zeros, inner, op.Expand(_i64(op, 1), op.Shape(inner)), axis=1, reduction="add")
    return op.Slice(op.CumSum(hits, op.Constant(value_int=1)), _i64(op, 0), length, _i64(op, 1))


def _pick_threshold(op, thr, m):
    """kernels/lookup.pick_threshold: of a [decode, prefill] pair, entry min(m - 1, 1) (a single
    value applies to both), as a [1] float32 tensor."""
    t = op.Reshape(op.Cast(thr, to=1), _i64(op, -1))
    last = op.Sub(op.Shape(t), _i64(op, 1))
    i = op.Min(op.Min(op.Sub(m, _i64(op, 1)), _i64(op, 1)), last)
    return op.Gather(t, i, axis=0)


def _selection(op, qg, centroids, offsets, log_threshold, coarse_centroids, coarse_offsets,
               coarse_log_threshold, scale: float, budget: int, block_q: int):
    """Kept clusters as bool [B, H, NB, C] (kernels/lookup/reference.py's rule). qg: float32 [B,H,G,M,D]."""
    log_threshold = _pick_threshold(op, log_threshold, _dim(op, qg, 3))
    if coarse_log_threshold is not None:
        coarse_log_threshold = _pick_threshold(op, coarse_log_threshold, _dim(op, qg, 3))
    sizes = _sizes(op, offsets)  # [H, C]
    log_n = op.Unsqueeze(op.Log(sizes), _i64(op, 0, 2, 3))  # [1, H, 1, 1, C]
    # lookup_queries: [q, s/2 q^2] cut to the centroids' width (D means, or 2D means and variances)
    qa = op.Concat(qg, op.Mul(op.Mul(qg, qg), _f32(op, 0.5 * scale)), axis=-1)
    qg = op.Slice(qa, _i64(op, 0), _dim(op, centroids, 2), _i64(op, -1))
    scores = op.Mul(op.MatMul(qg, _heads_first(op, centroids)), _f32(op, scale))  # [B,H,G,M,C]
    if coarse_centroids is None:
        log_share = _log_share(op, scores, log_n)
    else:
        m = _dim(op, qg, 3)
        c = _dim(op, centroids, 1)
        parent = _count_starts_at_or_before(op, coarse_offsets, c)  # [H, C]
        ends = op.GatherElements(offsets, op.Cast(coarse_offsets, to=7), axis=1)  # [H, Cc+1]
        csizes = _sizes(op, ends)
        log_cn = op.Unsqueeze(op.Log(csizes), _i64(op, 0, 2, 3))
        cscores = op.Mul(op.MatMul(qg, _heads_first(op, coarse_centroids)), _f32(op, scale))
        ckeep = op.Greater(_block_max(op, _log_share(op, cscores, log_cn), block_q),
                           op.Cast(coarse_log_threshold, to=1))  # [B, H, NB, Cc]
        ckeep_q = _per_query(op, ckeep, block_q, m)  # [B, H, M, Cc]
        idx_shape = op.Concat(op.Shape(ckeep_q, start=0, end=3), c, axis=0)
        kept_child = op.GatherElements(ckeep_q, op.Expand(op.Unsqueeze(parent, _i64(op, 0, 2)), idx_shape),
                                       axis=3)
        kept_child = op.Unsqueeze(kept_child, _i64(op, 2))  # [B, H, 1, M, C]
        neg = _f32(op, _NEG_INF)
        fine_terms = op.Where(kept_child, op.Add(scores, log_n), neg)
        pruned = op.Where(op.Unsqueeze(ckeep_q, _i64(op, 2)), neg, op.Add(cscores, log_cn))
        lse = op.ReduceLogSumExp(op.Concat(fine_terms, pruned, axis=-1), _i64(op, -1), keepdims=1)
        nonempty = op.Not(op.IsInf(log_n, detect_negative=1, detect_positive=0))
        log_share = op.Where(op.And(kept_child, nonempty), op.Sub(scores, lse), neg)

    best = _block_max(op, log_share, block_q)  # [B, H, NB, C]
    if budget <= 0:
        return op.Greater(best, op.Cast(log_threshold, to=1))
    # Budget: best clusters first (TopK breaks ties by the lower index, as the stable sort does),
    # kept while the running total of their sizes fits.
    c = _dim(op, best, 3)
    vals, order = op.TopK(best, c, axis=-1, largest=1, sorted=1)
    sz = op.GatherElements(op.Expand(op.Unsqueeze(sizes, _i64(op, 0, 2)), op.Shape(best)), order, axis=3)
    ok = op.Not(op.IsInf(vals, detect_negative=1, detect_positive=0))
    total = op.CumSum(op.Where(ok, sz, _f32(op, 0.0)), op.Constant(value_int=3))
    fits = op.Cast(op.And(op.LessOrEqual(total, _f32(op, budget)), ok), to=1)
    kept = op.ScatterElements(op.Expand(_f32(op, 0.0), op.Shape(best)), order, fits, axis=3)
    return op.Greater(kept, _f32(op, 0.5))


def _group_queries(op, q, centroids):
    """q [B, Hq, M, D] -> float32 [B, H, G, M, D]."""
    shape = op.Concat(_dim(op, q, 0), _dim(op, centroids, 0), _i64(op, -1), op.Shape(q, start=2, end=4), axis=0)
    return op.Reshape(op.Cast(q, to=1), shape)


def sqz_squeezed_attention(q, k_new, v_new, attn_mask, ctx_keys, ctx_values, centroids, offsets,
                           window_keys, window_values, log_threshold, coarse_centroids=None,
                           coarse_offsets=None, coarse_log_threshold=None, radii=None, perm=None, rope=None,
                           codebooks=None, key_norm=None, value_norm=None, outlier_idx=None, outlier_val=None,
                           scale: float = 1.0,
                           is_causal: bool = False, budget: int = 0, block_q: int = DEFAULT_BLOCK_Q,
                           max_dropped_mass: float = 0.0):
    """ONNX translation of torch.ops.sqz.squeezed_attention (same arguments and semantics)."""
    if codebooks is not None:
        raise NotImplementedError("export_onnx: low-bit context K/V (SqueezeConfig.kv_bits < 16) have no ONNX "
                                  "translation; squeeze the context with kv_bits=16 to export it to ONNX")
    if max_dropped_mass > 0:
        raise NotImplementedError(
            "export_onnx: the error-bounded selection (SqueezeConfig.max_dropped_mass) has no ONNX "
            "translation yet; squeeze the context in threshold or budget mode to export it")
    op = _ops()
    neg = _f32(op, _NEG_INF)
    qg = _group_queries(op, q, centroids)  # [B, H, G, M, D]
    b, m = _dim(op, q, 0), _dim(op, q, 2)
    sel = _selection(op, qg, centroids, offsets, log_threshold, coarse_centroids, coarse_offsets,
                     coarse_log_threshold, scale, budget, block_q)  # [B, H, NB, C]

    n = _dim(op, ctx_keys, 1)
    cid = _count_starts_at_or_before(op, offsets, n)  # [H, N] cluster of each sorted key
    cid_shape = op.Concat(op.Shape(sel, start=0, end=3), n, axis=0)
    keymask = op.GatherElements(sel, op.Expand(op.Unsqueeze(cid, _i64(op, 0, 2)), cid_shape), axis=3)
    keymask = op.Unsqueeze(_per_query(op, keymask, block_q, m), _i64(op, 2))  # [B, H, 1, M, N]

    s = _f32(op, scale)
    sc_ctx = op.Where(keymask, op.Mul(op.MatMul(qg, _heads_first(op, ctx_keys)), s), neg)
    sc_win = op.Mul(op.MatMul(qg, _heads_first(op, window_keys)), s)
    k_t = op.Unsqueeze(op.Transpose(op.Cast(k_new, to=1), perm=[0, 1, 3, 2]), _i64(op, 2))  # [B,H,1,D,S]
    sc_new = op.Mul(op.MatMul(qg, k_t), s)  # [B, H, G, M, S]
    slen = _dim(op, k_new, 2)
    if attn_mask is not None:
        if attn_mask.dtype is not None and attn_mask.dtype.name == "BOOL":
            bias = op.Where(attn_mask, _f32(op, 0.0), neg)
        else:
            bias = op.Cast(attn_mask, to=1)
        full = op.Concat(b, _dim(op, q, 1), m, slen, axis=0)
        grouped = op.Concat(b, _dim(op, centroids, 0), _i64(op, -1), m, slen, axis=0)
        sc_new = op.Add(sc_new, op.Reshape(op.Expand(bias, full), grouped))
    elif is_causal:
        rows = op.Unsqueeze(_arange(op, m), _i64(op, 1))  # SDPA's is_causal: upper-left aligned
        cols = op.Unsqueeze(_arange(op, slen), _i64(op, 0))
        sc_new = op.Where(op.LessOrEqual(cols, rows), sc_new, neg)

    p = op.Softmax(op.Concat(sc_ctx, sc_win, sc_new, axis=-1), axis=-1)
    nw = op.Add(n, _dim(op, window_keys, 1))
    p_ctx = op.Slice(p, _i64(op, 0), n, _i64(op, -1))
    p_win = op.Slice(p, n, nw, _i64(op, -1))
    p_new = op.Slice(p, nw, _i64(op, _BIG), _i64(op, -1))
    vals = lambda t: op.Unsqueeze(op.Cast(t, to=1), _i64(op, 0, 2))  # noqa: E731  [1, H, 1, K, D]
    out = op.Add(op.Add(op.MatMul(p_ctx, vals(ctx_values)), op.MatMul(p_win, vals(window_values))),
                 op.MatMul(p_new, op.Unsqueeze(op.Cast(v_new, to=1), _i64(op, 2))))
    out = op.Reshape(out, op.Shape(q))
    return op.CastLike(out, q)


def sqz_select_clusters(q, centroids, offsets, log_threshold, coarse_centroids=None, coarse_offsets=None,
                        coarse_log_threshold=None, scale: float = 1.0, block_q: int = DEFAULT_BLOCK_Q,
                        budget: int = 0):
    """ONNX translation of torch.ops.sqz.select_clusters: (idx [B,H,NB,C] int32 ascending, padded
    with -1; count [B,H,NB] int32)."""
    op = _ops()
    qg = _group_queries(op, q, centroids)
    sel = _selection(op, qg, centroids, offsets, log_threshold, coarse_centroids, coarse_offsets,
                     coarse_log_threshold, scale, budget, block_q)
    c = _dim(op, sel, 3)
    count = op.ReduceSum(op.Cast(sel, to=7), _i64(op, -1), keepdims=0)
    # Kept clusters rank by C - index (ascending index first), dropped ones by 0.
    pos = _arange(op, c)
    key = op.Where(sel, op.Sub(c, pos), _i64(op, 0))
    _, order = op.TopK(key, c, axis=-1, largest=1, sorted=1)
    idx = op.Where(op.Less(pos, op.Unsqueeze(count, _i64(op, -1))), order, _i64(op, -1))
    return op.Cast(idx, to=6), op.Cast(count, to=6)


def translation_table() -> dict[Callable, Callable]:
    """custom_translation_table for torch.onnx.export covering every torch.ops.sqz op."""
    return {torch.ops.sqz.squeezed_attention.default: sqz_squeezed_attention,
            torch.ops.sqz.select_clusters.default: sqz_select_clusters}


def export_program_onnx(program: torch.export.ExportedProgram, path: str | os.PathLike, *,
                        optimize: bool = True, external_data: bool | None = None) -> Any:
    """Translate an exported program (with sqz ops) to ONNX at `path`; returns the ONNXProgram.
    Input and output are named input_ids and logits; dynamic dims stay dynamic. `optimize` runs
    `tidy` (constant folding, CSE, dead-node removal)."""
    _require_onnx()
    path = os.fspath(path)
    ids = program.example_inputs[0][0] if program.example_inputs else None
    onnx_program = torch.onnx.export(
        program, (ids,) if ids is not None else None, dynamo=True, opset_version=OPSET,
        custom_translation_table=translation_table(), input_names=["input_ids"], output_names=["logits"],
        optimize=False, verbose=False)
    if optimize:
        tidy(onnx_program.model)
    name_dynamic_dims(onnx_program.model)
    if external_data is None:
        external_data = _initializer_bytes(onnx_program) > (1 << 31) - (64 << 20)
    onnx_program.save(path, external_data=external_data)
    return onnx_program


def tidy(model: Any) -> None:
    """Fold constants (the cluster-id and size arithmetic on the context), drop dead nodes and
    merge common subexpressions, in place on an onnx_ir Model.

    Not torch.onnx's default optimizer: its pattern rewriter is superlinear in the node count
    (about 5 minutes on a 2-core CPU for SmolLM2-135M's ~9K nodes; these passes take ~2 s and
    leave ~3.6K nodes)."""
    try:
        import onnx_ir.passes.common as common
        from onnxscript import optimizer
    except ImportError as e:  # very old onnxscript: leave the graph as translated
        warnings.warn(f"sqz_compile: ONNX graph left unoptimized ({e}); onnxruntime still folds it at load")
        return
    names = ["InlinePass", None, "RemoveUnusedNodesPass", "CommonSubexpressionEliminationPass",
             "RemoveUnusedNodesPass", "LiftConstantsToInitializersPass", "DeduplicateInitializersPass",
             "RemoveUnusedOpsetsPass"]
    for name in names:
        if name is None:
            optimizer.fold_constants(model)
            continue
        cls = getattr(common, name, None)  # older onnx_ir releases lack some passes: skip them
        if cls is None:
            continue
        cls(lift_all_constants=True, size_limit=0)(model) if name.startswith("Lift") else cls()(model)


def name_dynamic_dims(model: Any) -> None:
    """Name the input's symbolic dims "batch" and "seq" (torch.onnx keeps export's s0, s1, ...)
    everywhere they occur, so the file reads input_ids[batch, seq] -> logits[batch, seq, vocab]."""
    import onnx_ir as ir

    dims = list(model.graph.inputs[0].shape or [])
    rename = {str(d): new for d, new in zip(dims, ("batch", "seq")) if isinstance(d, ir.SymbolicDim)
              and d.value is not None}
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")

    def renamed(d: Any) -> Any:
        if not isinstance(d, ir.SymbolicDim) or d.value is None:
            return d
        return pattern.sub(lambda m: rename[m.group(1)], d.value)  # also inside "s70 + 1"

    values = list(model.graph.inputs) + list(model.graph.outputs)
    values += [v for node in model.graph for v in node.outputs]
    for v in values:
        if v.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value for d in v.shape):
            v.shape = ir.Shape([renamed(d) for d in v.shape])


def _initializer_bytes(onnx_program: Any) -> int:
    total = 0
    for v in onnx_program.model.graph.initializers.values():
        if v.const_value is not None:
            total += v.const_value.nbytes
    return total


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"ONNX export needs {missing}: pip install 'sqz_compile[export]' "
                                  f"(onnx, onnxscript; onnxruntime to run the result)")


def export_onnx(model: torch.nn.Module, ctx: SqueezedContext, example_inputs: Any, path: str | os.PathLike,
                dynamic_shapes: Any = None, *, config: CompileConfig | None = None, optimize: bool = True,
                **deprecated: Any) -> Any:
    """Export `model` with `ctx` baked in to an ONNX file at `path` (input `input_ids` [batch,
    length], both dynamic; output `logits`), runnable by onnxruntime with no custom ops. Returns
    the torch.onnx ONNXProgram. `config` (CompileConfig): block_q and strict as in `export`.
    `optimize`: tidy the ONNX graph (`tidy`); a property of the file, not of the compile."""
    from .program import export

    config = resolve_compile_config(config, deprecated, "sqz_compile.export_onnx")
    if isinstance(ctx, SqueezedContext) and ctx.quantized:
        raise NotImplementedError(
            f"export_onnx: this context stores its K/V in {ctx.kv_bits} bits (SqueezeConfig.kv_bits), which has "
            f"no ONNX translation (packed int32 codes dequantized in the kernels): squeeze the context with "
            f"kv_bits=16 to export it to ONNX, or use sqz_compile.export / package for the low-bit one")
    _require_onnx()
    program = export(model, ctx, example_inputs, dynamic_shapes, config=config)
    return export_program_onnx(program, path, optimize=optimize)


__all__ = ["OPSET", "export_onnx", "export_program_onnx", "sqz_select_clusters", "sqz_squeezed_attention",
           "name_dynamic_dims", "tidy", "translation_table"]
