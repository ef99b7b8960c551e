"""The rewrite: attention subgraphs -> torch.ops.sqz.squeezed_attention over a layer's context.

    report = rewrite_attention(gm, ctx, model=model)   # in place; gm must be yours to edit
    print(report)

Each layer's context tensors become buffers of the GraphModule (`sqz_L7_keys`, ...) read through
`get_attr` nodes: AOTAutograd/Inductor treat them as static parameters (no per-call copies, CUDA-graph
friendly) and `torch.export` makes them buffers of the ExportedProgram. They are views of the
context's tensors, with one exception made on purpose: for a half-precision context the centroids
are read in the keys' dtype (half the lookup's bytes), from one cast copy per context that every
graph shares (`SqueezedContext.layer(i, centroid_dtype=...)`).

Safety: an attention the pass cannot prove equivalent (its module's or config's settings say
sliding window, chunked attention, soft-capping, ALiBi or training dropout; the graph shows
attention weights used elsewhere; the model is unknown, so its settings cannot be read) would,
left dense, attend only to the user's tokens and ignore the squeezed context. By default
(strict) that is a SqueezeDenseError naming the layers and reasons, raised before the graph is
touched; with strict=False (CompileConfig(strict=False)) those layers stay dense and a
SqueezeDenseWarning says so once per compiled model (a DenseNotice).
Mismatches that mean "wrong model for this context" (layer count, heads, head dim) and dtype or
device mismatches are errors: the pass never moves context tensors behind your back; move the
context yourself (`ctx.to(device)`), or squeeze in the model's dtype.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..config import DEFAULT_BLOCK_Q
from ..context import CONTEXT_ARGS, SqueezedContext, check_fits
from ..transformers_compat import (attention_dropout, max_positions, model_config, num_layers, sliding_window,
                                   sliding_window_fix, text_config)
from .bound import bound_context
from .match import AttentionMatch, default_scale, find_attention, normalize_module_path
from .targets import is_assert, shape_of, tensor_meta

OPT_OUT = ("opt out with sqz_compile.CompileConfig(strict=False), which leaves them dense: they then attend "
           "only to the user's tokens, ignoring the context, and a SqueezeDenseWarning says so")
NOT_FOUND = ("no attention found in this layer (unrecognised attention implementation? use "
             "attn_implementation='sdpa' or 'eager')")


class SqueezeDenseWarning(UserWarning):
    """Some attention layers were left dense (they ignore the squeezed context); strict=False only."""


class SqueezeDenseError(ValueError):
    """Some attention layers cannot use the squeezed context (strict mode, the default)."""


class ContextMismatchError(ValueError):
    """The graph's attention does not fit the SqueezedContext (wrong model, dtype or device)."""


@dataclass
class RewriteReport:
    """What `rewrite_attention` did to one graph."""

    rewritten: list[int] = field(default_factory=list)           # layer per rewritten attention
    dense: list[tuple[int | None, str]] = field(default_factory=list)   # (layer, reason)
    buffers: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        """Sorted distinct layers rewritten."""
        return sorted(set(self.rewritten))

    def __str__(self) -> str:
        lines = [f"sqz rewrite: {len(self.rewritten)} attention(s) rewritten, {len(self.dense)} left dense"]
        if self.rewritten:
            lines.append(f"  rewritten layers: {_ranges(self.layers)}")
        for layer, why in self.dense:
            lines.append(f"  dense: layer {'?' if layer is None else layer}: {why}")
        return "\n".join(lines)

    def merge(self, other: "RewriteReport") -> "RewriteReport":
        return RewriteReport(self.rewritten + other.rewritten, self.dense + other.dense,
                             self.buffers + [b for b in other.buffers if b not in self.buffers])


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


# --------------------------------------------------------------------------- why a layer stays dense

def find_submodule(model: torch.nn.Module, path: str | None) -> torch.nn.Module | None:
    """The module at `path` (normalized form) in `model`, trying shorter suffixes so that paths
    relative to a wrapper or to an inner model both resolve."""
    if model is None or not path:
        return None
    parts = path.split(".")
    for i in range(len(parts)):
        try:
            return model.get_submodule(".".join(parts[i:]))
        except AttributeError:
            continue
    return None


def _setting(name: str, module: torch.nn.Module | None, cfg: Any) -> Any:
    """An attention setting: the module's own attribute when it has one, else the config's."""
    if module is not None and hasattr(module, name):
        return getattr(module, name)
    return getattr(cfg, name, None) if cfg is not None else None


def config_reason(cfg: Any, layer: int, module: torch.nn.Module | None = None,
                  training: bool = False) -> str | None:
    """Why layer `layer`'s settings forbid the rewrite, or None. Read from the attention module's
    attributes (when given) and the (text) config: sliding window (per `layer_types`), chunked
    attention, logit soft-capping, ALiBi, and attention dropout while training."""
    own = getattr(module, "config", None)
    cfg = text_config(own if own is not None else cfg) if (own is not None or cfg is not None) else None
    window = sliding_window(cfg, layer, module)
    if window is not None:
        return (f"sliding window of {window} tokens (the squeezed context is attended in full; set "
                f"{sliding_window_fix(cfg)} if context + inputs fit in the window)")
    chunk = _setting("attention_chunk_size", module, cfg)
    types = getattr(cfg, "layer_types", None)
    max_pos = max_positions(cfg) if cfg is not None else None
    inert = bool(chunk) and bool(max_pos) and int(chunk) >= max_pos  # a plain causal mask at every length
    if chunk and not inert and (not types or layer >= len(types) or types[layer] == "chunked_attention"):
        return f"chunked attention ({chunk} tokens per chunk)"
    softcap = _setting("attn_logit_softcapping", module, cfg)
    if softcap is not None:
        return f"logit soft-capping ({softcap})"
    if _setting("alibi", module, cfg) or _setting("position_embedding_type", module, cfg) == "alibi":
        return "ALiBi position bias"
    dropout = (attention_dropout(module) if module is not None
               else float(_setting("attention_dropout", None, cfg) or 0.0))
    if (module.training if module is not None else training) and dropout > 0:
        return f"attention dropout is active (p={dropout}, training)"
    return None


def model_reasons(model: torch.nn.Module) -> "RewriteReport":
    """The layers of a transformers model whose config forbids the rewrite (`config_reason` per
    decoder layer), before any graph exists: compile and export refuse them up front."""
    cfg = model_config(model)
    found = ((i, config_reason(cfg, i, training=model.training)) for i in range(num_layers(cfg)))
    return RewriteReport(dense=[(i, why) for i, why in found if why is not None])


def _settings_reason(m: AttentionMatch, model: torch.nn.Module | None) -> str | None:
    """`config_reason` for a matched attention, from its module in `model` (or the model's
    config); a reason to refuse when neither can be found, since nothing could then be proven."""
    if model is None:
        return ("the model is unknown, so this layer's settings (sliding window, soft-capping, dropout, "
                "...) cannot be checked: pass model= (backend: options={'model': model})")
    module = find_submodule(model, m.module_path)
    # the outermost config: the model's own, or a wrapped model's (export traces a wrapper)
    cfg = next((mod.config for mod in model.modules() if getattr(mod, "config", None) is not None), None)
    if module is None and cfg is None:
        return (f"its module {m.module_path!r} is not in {type(model).__name__}, which has no config: "
                f"its settings cannot be checked")
    return config_reason(cfg, m.layer, module, training=model.training)


def uncovered(report: "RewriteReport", layers: int) -> "RewriteReport":
    """The decoder layers 0..layers-1 that `report` neither rewrote nor left dense, as dense
    entries (`NOT_FOUND`): such a layer would silently ignore the context."""
    seen = set(report.rewritten) | {layer for layer, _ in report.dense}
    return RewriteReport(dense=[(layer, NOT_FOUND) for layer in range(layers) if layer not in seen])


class DenseNotice:
    """Says each (layer, reason) left dense once per compiled model: one instance per compile
    (the backend keeps it in its options; SqueezedModel and export hold their own)."""

    def __init__(self) -> None:
        self._said: set[tuple[int | None, str]] = set()

    def __call__(self, report: "RewriteReport") -> None:
        new = [d for d in dict.fromkeys(report.dense) if d not in self._said]
        if new:
            self._said.update(new)
            warnings.warn(f"sqz: {len(new)} attention(s) left dense - they attend only to the new tokens, not "
                          f"to the squeezed context: {_by_reason(new)}", SqueezeDenseWarning, stacklevel=4)


def _by_reason(dense: list[tuple[int | None, str]]) -> str:
    """'layers 0-1, 5: why; layer ?: other' - each reason once, with the layers it applies to."""
    groups: dict[str, list[int | None]] = {}
    for layer, why in dense:
        groups.setdefault(why, []).append(layer)
    parts = []
    for why, layers in groups.items():
        known = sorted({l for l in layers if l is not None})
        names = ([_ranges(known)] if known else []) + (["?"] if None in layers else [])
        many = len(known) + (None in layers) > 1
        parts.append(f"layer{'s' if many else ''} {', '.join(names)}: {why}")
    return "; ".join(parts)


def refuse_or_warn(report: "RewriteReport", *, strict: bool, notice: DenseNotice | None = None) -> None:
    """The one rule for layers left dense: strict -> SqueezeDenseError naming each layer, its reason
    and the opt-out; else a SqueezeDenseWarning, once per compiled model (`notice`)."""
    if not report.dense:
        return
    if strict:
        raise SqueezeDenseError(f"sqz: {len(report.dense)} attention(s) cannot use the squeezed context - "
                                f"{_by_reason(report.dense)}. Remove the cause, or {OPT_OUT}")
    (notice if notice is not None else DenseNotice())(report)


# --------------------------------------------------------------------------- checks

def _check(m: AttentionMatch, ctx: SqueezedContext) -> None:
    """Raise ContextMismatchError when this attention cannot use `ctx` at all."""
    qs, ks = shape_of(m.query), shape_of(m.key)
    shapes = {}
    if qs is not None and ks is not None and len(qs) == 4 and len(ks) == 4:
        shapes = dict(q_heads=qs[1], head_dim=qs[3], kv_heads=ks[1])
    qv = tensor_meta(m.query)
    check_fits(ctx, f"sqz: layer {m.layer} ({m.module_path or m.anchor.name})", error=ContextMismatchError,
               layer=m.layer, **shapes, dtype=None if qv is None else qv.dtype,
               device=None if qv is None else qv.device)


# --------------------------------------------------------------------------- rewrite

def _fake_mode(node: Node):
    val = tensor_meta(node)
    return getattr(val, "fake_mode", None)


def _layer_buffers(gm: GraphModule, ctx: SqueezedContext, layer: int, anchor_graph_start: Node,
                   cache: dict[int, list[Node | None]], report: RewriteReport, meta_key: str | None,
                   fake_mode: Any) -> list[Node | None]:
    if layer in cache:
        return cache[layer]
    lc = ctx.layer(layer, centroid_dtype=ctx.lookup_centroid_dtype)  # one shared half copy
    nodes: list[Node | None] = []
    with gm.graph.inserting_before(anchor_graph_start):
        for name, t in zip(CONTEXT_ARGS, lc):
            if t is None:
                nodes.append(None)
                continue
            attr = f"sqz_L{layer}_{name}"
            gm.register_buffer(attr, t)
            node = gm.graph.get_attr(attr)
            if meta_key is not None and fake_mode is not None:
                node.meta[meta_key] = fake_mode.from_tensor(t, static_shapes=True)
            nodes.append(node)
            report.buffers.append(attr)
    cache[layer] = nodes
    return nodes


def _first_non_placeholder(gm: GraphModule) -> Node:
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            return n
    raise ValueError("sqz: empty graph")


def _erase_dead(gm: GraphModule, nodes: list[Node]) -> None:
    """Remove the matched pattern's nodes that nothing reads any more (never anything else: a
    graph-wide DCE could drop in-place cache updates)."""
    changed = True
    pending = list(dict.fromkeys(nodes))
    while changed:
        changed = False
        for n in list(pending):
            if n.graph is gm.graph and n.users and all(is_assert(u) for u in n.users):
                for u in list(n.users):
                    gm.graph.erase_node(u)
            if n.graph is gm.graph and not n.users and n.op in ("call_function", "call_method"):
                gm.graph.erase_node(n)
                pending.remove(n)
                changed = True


def rewrite_attention(gm: GraphModule, ctx: SqueezedContext, *, block_q: int = DEFAULT_BLOCK_Q,
                      strict: bool = True, model: torch.nn.Module | None = None, layers: int | None = None,
                      notice: DenseNotice | None = None) -> RewriteReport:
    """Rewrite every attention of `gm` (Dynamo or torch.export graph) that can use `ctx` into
    torch.ops.sqz.squeezed_attention, IN PLACE (copy Dynamo's graph module first).

    model: the module the graph was traced from; its attention modules' settings and config
        (sliding window, soft-capping, dropout, ...) decide which layers are safe. Without it
        nothing can be proven: every attention is reported dense.
    layers: the decoder layers the graph must cover (a whole-model graph, as export makes);
        any without an attention is reported dense too.
    strict: raise SqueezeDenseError, before touching the graph, if any attention would stay
        dense; strict=False leaves them dense and warns once per `notice` (default: this call).
    Raises ContextMismatchError for a context that does not fit the graph (wrong model, dtype,
    device)."""
    report = RewriteReport()
    bound = bound_context(gm, ctx)  # SqueezedModel: the context arrives as graph inputs, not constants
    matches = find_attention(gm.graph)
    plans: list[tuple[AttentionMatch, str | None]] = []
    for m in matches:
        reason = m.dense_reason
        if m.layer is None:
            reason = reason or "cannot tell which decoder layer it belongs to (no nn_module_stack)"
        else:
            _check(m, ctx)
            if reason is None:
                reason = _settings_reason(m, model)
            if reason is None and (shape_of(m.query) is None or shape_of(m.key) is None):
                reason = "the graph has no shape metadata to check it against the context"
        plans.append((m, reason))
    planned = RewriteReport(rewritten=[m.layer for m, why in plans if why is None],
                            dense=[(m.layer, why) for m, why in plans if why is not None])
    if layers is not None:
        planned = planned.merge(uncovered(planned, layers))
    if strict:
        refuse_or_warn(planned, strict=True)
    report.dense = planned.dense

    start = _first_non_placeholder(gm) if plans else None
    cache: dict[int, list[Node | None]] = {}
    for m, reason in plans:
        if reason is not None:
            continue
        meta_key = "val" if "val" in m.query.meta else ("example_value" if "example_value" in m.query.meta else None)
        fake_mode = _fake_mode(m.query)
        bufs = (bound.layer(m.layer, start) if bound is not None
                else _layer_buffers(gm, ctx, m.layer, start, cache, report, meta_key, fake_mode))
        qs = shape_of(m.query)
        scale = m.scale if m.scale is not None else default_scale(qs[3] if qs and qs[3] else ctx.head_dim)
        args = (m.query, m.key, m.value, m.attn_mask, *bufs, float(scale), bool(m.is_causal), ctx.layer_budget(m.layer),
                int(block_q), ctx.layer_max_dropped_mass(m.layer))
        with gm.graph.inserting_before(m.anchor):
            op = gm.graph.call_function(torch.ops.sqz.squeezed_attention.default, args)
        op.meta.update({k: v for k, v in m.anchor.meta.items() if k in ("nn_module_stack", "stack_trace",
                                                                         "source_fn_stack", "seq_nr")})
        if meta_key is not None and fake_mode is not None:
            op.meta[meta_key] = _fake_output(fake_mode, args)
        m.anchor.replace_all_uses_with(op)
        _erase_dead(gm, m.pattern)
        report.rewritten.append(m.layer)

    if plans or (bound is not None and bound.stacked is not None):  # the graph changed: one recompile
        gm.graph.lint()
        gm.recompile()
    refuse_or_warn(report, strict=False, notice=notice)
    return report


def _fake_output(fake_mode: Any, args: tuple) -> Any:
    def fake(a: Any) -> Any:
        if isinstance(a, Node):
            return a.meta.get("val", a.meta.get("example_value"))
        return a

    with fake_mode:
        return torch.ops.sqz.squeezed_attention.default(*[fake(a) for a in args])


__all__ = ["rewrite_attention", "RewriteReport", "SqueezeDenseWarning", "SqueezeDenseError",
           "ContextMismatchError", "DenseNotice", "config_reason", "model_reasons", "refuse_or_warn",
           "uncovered", "find_submodule", "normalize_module_path"]
