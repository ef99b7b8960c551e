"""The rewrite: attention subgraphs -> torch.ops.sqz.squeezed_attention over a layer's context.

    report = rewrite_attention(gm, ctx, model=model)   # in place; gm must be yours to edit
    print(report)

Each layer's context tensors become buffers of the GraphModule (`sqz_L7_keys`, ...) read through
`get_attr` nodes: AOTAutograd/Inductor treat them as static parameters (no per-call copies, CUDA-graph
friendly) and `torch.export` makes them buffers of the ExportedProgram. They are views of the
context's tensors, not copies.

Safety: a subgraph the pass cannot prove equivalent stays dense (it then attends only to the
user's tokens, not to the squeezed context) and the pass warns once, naming the layers and reasons.
Mismatches that mean "wrong model for this context" (layer count, heads, head dim) and dtype or
device mismatches are errors: the pass never converts context tensors behind your back; move or
cast the context yourself (`ctx.to(device)`, or squeeze in the model's dtype).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..context import CENTROID_ARGS, CONTEXT_ARGS, SqueezedContext, check_fits
from ..ops import DEFAULT_BLOCK_Q
from ..transformers_compat import sliding_window, text_config
from .bound import bound_context
from .match import AttentionMatch, default_scale, find_attention, normalize_module_path
from .targets import is_assert, shape_of, tensor_meta

# mask-building code whose presence in a mask's provenance means "not a plain causal/padding mask"
_MASK_EVIDENCE = {
    "sliding_window": "sliding-window attention mask",
    "chunked_overlay": "chunked attention mask",
    "position_bias": "position bias in the mask",
    "alibi": "ALiBi bias in the mask",
}


class SqueezeDenseWarning(UserWarning):
    """Some attention layers were left dense (they ignore the squeezed context)."""


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


def config_reason(module: torch.nn.Module | None, layer: int) -> str | None:
    """Why the attention module's own settings forbid the rewrite (sliding window, soft-capping,
    dropout in training), or None."""
    if module is None:
        return None
    cfg = getattr(module, "config", None)
    if cfg is not None:
        cfg = text_config(cfg)
    window = sliding_window(cfg, layer, module)
    if window is not None:
        return (f"sliding window of {window} tokens (the squeezed context is attended in full; set "
                f"config.sliding_window = None if context + inputs fit in the window)")
    softcap = getattr(module, "attn_logit_softcapping", None)
    if softcap is None and cfg is not None:
        softcap = getattr(cfg, "attn_logit_softcapping", None)
    if softcap is not None:
        return f"logit soft-capping ({softcap})"
    dropout = float(getattr(module, "attention_dropout", 0.0) or 0.0)
    if module.training and dropout > 0:
        return f"attention dropout is active (p={dropout}, training)"
    return None


def mask_reason(mask: Node | None, limit: int = 400) -> str | None:
    """Graph evidence that `mask` is more than causal + padding: the recorded stack traces of the
    nodes that built it mention sliding windows, chunking or position biases."""
    if mask is None:
        return None
    seen, todo = set(), [mask]
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        trace = n.meta.get("stack_trace") or ""
        for needle, what in _MASK_EVIDENCE.items():
            if needle in trace:
                return what
        todo.extend(n.all_input_nodes)
    return None


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


_HALF = (torch.float16, torch.bfloat16)


def _layer_buffers(gm: GraphModule, ctx: SqueezedContext, layer: int, anchor_graph_start: Node,
                   cache: dict[int, list[Node | None]], report: RewriteReport, meta_key: str | None,
                   fake_mode: Any) -> list[Node | None]:
    if layer in cache:
        return cache[layer]
    lc = ctx.layer(layer)
    nodes: list[Node | None] = []
    with gm.graph.inserting_before(anchor_graph_start):
        for name, t in zip(CONTEXT_ARGS, lc):
            if t is None:
                nodes.append(None)
                continue
            if name in CENTROID_ARGS and lc.keys.dtype in _HALF and t.dtype != lc.keys.dtype:
                # the lookup reads every centroid at each step: half the bytes in the keys'
                # half dtype, and the products stay exact on tensor cores (kernels/lookup/launch.py)
                t = t.to(lc.keys.dtype)
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
                      warn: bool = True, model: torch.nn.Module | None = None) -> RewriteReport:
    """Rewrite every attention of `gm` (Dynamo or torch.export graph) that can use `ctx` into
    torch.ops.sqz.squeezed_attention, IN PLACE (copy Dynamo's graph module first).

    model: the module the graph was traced from, if known; its attention modules' settings
        (sliding window, soft-capping, dropout) decide which layers must stay dense. Without it
        the pass relies on what the graph shows.
    Raises ContextMismatchError for a context that does not fit the graph (wrong model, dtype,
    device); warns (SqueezeDenseWarning, once) for layers left dense."""
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
                reason = config_reason(find_submodule(model, m.module_path), m.layer)
            if reason is None:
                reason = mask_reason(m.attn_mask)
            if reason is None and (shape_of(m.query) is None or shape_of(m.key) is None):
                reason = "the graph has no shape metadata to check it against the context"
        plans.append((m, reason))

    start = _first_non_placeholder(gm) if plans else None
    cache: dict[int, list[Node | None]] = {}
    for m, reason in plans:
        if reason is not None:
            report.dense.append((m.layer, reason))
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

    if plans:
        gm.graph.lint()
        gm.recompile()
    if warn and report.dense:
        warn_dense(report)
    return report


def _fake_output(fake_mode: Any, args: tuple) -> Any:
    def fake(a: Any) -> Any:
        if isinstance(a, Node):
            return a.meta.get("val", a.meta.get("example_value"))
        return a

    with fake_mode:
        return torch.ops.sqz.squeezed_attention.default(*[fake(a) for a in args])


def warn_dense(report: RewriteReport) -> None:
    """The one warning for the layers a rewrite left dense."""
    items = "; ".join(f"layer {'?' if l is None else l}: {why}" for l, why in report.dense)
    warnings.warn(
        f"sqz: {len(report.dense)} attention(s) left dense - they attend only to the new tokens, not to "
        f"the squeezed context: {items}", SqueezeDenseWarning, stacklevel=3)


__all__ = ["rewrite_attention", "RewriteReport", "SqueezeDenseWarning", "ContextMismatchError",
           "config_reason", "mask_reason", "find_submodule", "normalize_module_path"]
