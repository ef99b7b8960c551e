"""Attention matchers: find attention subgraphs in an FX graph and describe them.

In the style of Inductor's fuse_attention.py: each attention spelling is one small matcher
function, and `MATCHERS` is the one registration point. A matcher looks at one node; if that node
is the output of an attention it returns an `AttentionMatch` (what to feed the sqz op, which layer,
and - when the subgraph cannot be proven safe to rewrite - why it must stay dense), else None.

Spellings:
  match_sdpa   F.scaled_dot_product_attention / aten.scaled_dot_product_attention, any argument
               spelling (attn_mask, is_causal, scale, enable_gqa; positional or keyword)
  match_eager  matmul(q, k^T) -> scale (mul/div) -> (+ mask) -> softmax (dtype cast) -> (dropout)
               -> matmul(., v)
Both undo transformers' `repeat_kv` (x[:, :, None].expand(B, H, g, S, D).reshape(B, H*g, S, D))
to recover the real KV heads, and read the layer index from `node.meta["nn_module_stack"]`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.fx import Graph, Node

from .targets import arg, data_users, is_kind, kind, shape_of, static_int

aten = torch.ops.aten


@dataclass
class AttentionMatch:
    """One attention subgraph. `anchor` is the node whose value (the attention output
    [B, Hq, M, D]) the rewrite replaces; `pattern` are the nodes only it needed (removed when dead)."""

    kind: str                       # "sdpa" | "eager"
    anchor: Node
    query: Node
    key: Node                       # repeat_kv undone: the real KV heads
    value: Node
    attn_mask: Node | None
    scale: float | None             # None: the SDPA default 1/sqrt(head_dim)
    is_causal: bool
    layer: int | None
    module_path: str | None         # the attention module, e.g. "model.layers.7.self_attn"
    dense_reason: str | None = None
    pattern: list[Node] = field(default_factory=list)

    def __str__(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else "unknown layer"
        return f"{self.kind} attention at {self.anchor.name} ({where}, {self.module_path or '?'})"


# --------------------------------------------------------------------------- layer mapping

_DOTTED = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?=\.|$)")
_MANGLED = re.compile(r"(?:^|_)(?:layers|layer|h|blocks)_(\d+)(?=_|$)")


def normalize_module_path(path: str) -> str:
    """Dynamo/export module paths to dotted form: "L['self'].model.layers[7].self_attn",
    "L['self']._modules['model']..." and "model.layers.7.self_attn" all become
    "model.layers.7.self_attn" (the root local, L['self'] / L['model'], is dropped)."""
    p = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    p = re.sub(r"^L\['[^']*'\]\.?", "", p)
    p = re.sub(r"\['([^']*)'\]", r".\1", p)
    p = re.sub(r"\[(\d+)\]", r".\1", p)
    return p.lstrip(".")


def layer_of_path(path: str) -> int | None:
    """Decoder layer index named in a module path, dotted or Dynamo-mangled
    ("L__self___model_layers_7_self_attn"); the innermost one wins."""
    dotted = _DOTTED.findall(normalize_module_path(path))
    if dotted:
        return int(dotted[-1])
    mangled = _MANGLED.findall(path)
    return int(mangled[-1]) if mangled else None


def module_of(node: Node) -> tuple[int | None, str | None]:
    """(layer index, normalized module path) of the innermost module on `node`'s
    nn_module_stack that names a layer."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = list(stack.items())
    for key, value in reversed(entries):
        path = value[0] if isinstance(value, (tuple, list)) and value else str(value)
        for candidate in (str(path), str(key)):
            layer = layer_of_path(candidate)
            if layer is not None:
                return layer, normalize_module_path(str(path))
    if entries:
        value = entries[-1][1]
        return None, normalize_module_path(str(value[0] if isinstance(value, (tuple, list)) else value))
    return None, None


# --------------------------------------------------------------------------- repeat_kv

def _is_full_slice(s: Any) -> bool:
    return isinstance(s, slice) and s.start in (None, 0) and s.stop is None and s.step in (None, 1)


def _skip_identity_slices(x: Any) -> Any:
    """Walk back over aten.slice(x, dim, 0, <max>) nodes (how export spells `x[:, :]`)."""
    while is_kind(x, "slice"):
        start, end = arg(x, 2, "start", None), arg(x, 3, "end", None)
        step = arg(x, 4, "step", 1)
        if start not in (None, 0) or step != 1 or not (end is None or (isinstance(end, int) and end >= 2**62)):
            break
        x = x.args[0]
    return x


def _unsqueezed_at_2(u: Any) -> Node | None:
    """The source of `u = src.unsqueeze(2)` (or `src[:, :, None]`), else None."""
    if is_kind(u, "unsqueeze") and arg(u, 1, "dim") in (2, -3):
        return _skip_identity_slices(u.args[0])
    if is_kind(u, "getitem") and isinstance(u.args[1], tuple):
        idx = u.args[1]
        rest = idx[3:]
        if (len(idx) >= 3 and _is_full_slice(idx[0]) and _is_full_slice(idx[1]) and idx[2] is None
                and all(_is_full_slice(s) or s is Ellipsis for s in rest)):
            return u.args[0]
    return None


def _expand_sizes(e: Node) -> list[Any]:
    sizes = list(e.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    return sizes


def undo_repeat_kv(x: Any) -> tuple[Any, int, list[Node]]:
    """If x = repeat_kv(src, g) as transformers writes it, return (src, g, the repeat nodes);
    else (x, 1, []). The group factor is read from the recorded shapes (or the expand sizes)."""
    if not is_kind(x, "reshape"):
        return x, 1, []
    e = x.args[0]
    between = []
    while kind(e) == "cast" and (e.target in ("contiguous", "clone") or e.target in (
            aten.clone.default, aten.contiguous.default)):
        between.append(e)
        e = e.args[0]
    if not is_kind(e, "expand"):
        return x, 1, []
    u = e.args[0]
    src = _unsqueezed_at_2(u)
    if src is None:
        return x, 1, []
    s_src, s_exp, s_out = shape_of(src), shape_of(e), shape_of(x)
    if s_src is not None and s_exp is not None and s_out is not None:
        if len(s_src) != 4 or len(s_exp) != 5 or len(s_out) != 4:
            return x, 1, []
        h, g, hq = s_exp[1], s_exp[2], s_out[1]
        if None in (h, g, hq) or h != s_src[1] or h * g != hq or s_exp[4] != s_src[3] or s_out[3] != s_src[3]:
            return x, 1, []
    else:
        sizes = _expand_sizes(e)
        g = static_int(sizes[2]) if len(sizes) == 5 else None
        if g is None:
            return x, 1, []
    return src, int(g), [x, *between, e, u]


# --------------------------------------------------------------------------- matchers

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


def _num(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def match_sdpa(node: Node) -> AttentionMatch | None:
    """F.scaled_dot_product_attention / aten.scaled_dot_product_attention in any spelling."""
    if not is_kind(node, "sdpa"):
        return None
    a = {n: arg(node, i, n, d) for i, (n, d) in enumerate(zip(_SDPA_ARGS, _SDPA_DEFAULTS))}
    q, k0, v0 = a["query"], a["key"], a["value"]
    k, _, k_pat = undo_repeat_kv(k0)
    v, _, v_pat = undo_repeat_kv(v0)
    layer, path = module_of(node)
    reason = None
    dropout = _num(a["dropout_p"])
    scale = a["scale"]
    if dropout is None or dropout != 0.0:
        reason = f"attention dropout is active (dropout_p={a['dropout_p']})"
    elif not isinstance(a["is_causal"], bool):
        reason = "is_causal is not a constant"
    elif scale is not None and _num(scale) is None:
        reason = "the softmax scale is not a constant"
    elif a["attn_mask"] is not None and not isinstance(a["attn_mask"], Node):
        reason = "attn_mask is not a tensor"
    qs = shape_of(q)
    if reason is None and qs is not None and len(qs) != 4:
        reason = f"query is {len(qs)}-D, not [B, H, M, D]"
    return AttentionMatch(
        "sdpa", node, q, k, v, a["attn_mask"], _num(scale), bool(a["is_causal"]) if reason is None else False,
        layer, path, reason, [node, *k_pat, *v_pat])


def _is_last_two_transpose(t: Any) -> bool:
    if not is_kind(t, "transpose"):
        return False
    d0, d1 = arg(t, 1, "dim0"), arg(t, 2, "dim1")
    return {d0 % 4 if isinstance(d0, int) else d0, d1 % 4 if isinstance(d1, int) else d1} == {2, 3}


@dataclass
class _Scores:
    """What happens to q.k^T between the first matmul and the softmax."""

    mm: Node
    scale: float = 1.0
    mask: Node | None = None
    problems: list[str] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)


def _walk_scores(x: Any, depth: int = 0) -> _Scores | None:
    """Follow the softmax input back to matmul(q, k^T), classifying each step."""
    if not isinstance(x, Node) or depth > 12:
        return None
    k = kind(x)
    if k == "matmul":
        return _Scores(x) if _is_last_two_transpose(x.args[1]) else None
    inputs = [a for a in x.args if isinstance(a, Node)]
    if k in ("mul", "div"):
        for i, a in enumerate(x.args[:2]):
            if not isinstance(a, Node) or (k == "div" and i == 1):
                continue
            found = _walk_scores(a, depth + 1)
            if found is None:
                continue
            other = x.args[1 - i]
            c = _num(other)
            if c is None:
                found.problems.append(f"the scores are {'multiplied' if k == 'mul' else 'divided'} by a tensor "
                                      f"({getattr(other, 'name', other)}), a score modification")
            elif found.mask is not None:
                found.problems.append("the mask is added before the scores are scaled")
            else:
                found.scale = found.scale * c if k == "mul" else found.scale / c
            found.nodes.append(x)
            return found
        return None
    if k == "add":
        if len(x.args) > 2 or "alpha" in x.kwargs:
            return None
        for i, a in enumerate(x.args[:2]):
            found = _walk_scores(a, depth + 1)
            if found is None:
                continue
            other = x.args[1 - i]
            if isinstance(other, Node) and found.mask is None:
                found.mask = other
            else:
                found.problems.append(f"the scores get a second bias ({getattr(other, 'name', other)})")
            found.nodes.append(x)
            return found
        return None
    if k == "cast" or k == "tanh" or (x.op in ("call_function", "call_method") and len(inputs) == 1):
        found = _walk_scores(inputs[0], depth + 1) if inputs else None
        if found is None:
            return None
        if k == "tanh":
            found.problems.append("logit soft-capping (tanh on the attention scores)")
        elif k != "cast":
            found.problems.append(f"unsupported op {getattr(x.target, '__name__', x.target)} on the attention scores")
        found.nodes.append(x)
        return found
    return None


def match_eager(node: Node) -> AttentionMatch | None:
    """matmul(softmax(scale * q @ k^T (+ mask)) (dropout), v), as transformers' eager attention."""
    if not is_kind(node, "matmul") or len(node.args) < 2:
        return None
    w, v0 = node.args[0], node.args[1]
    post: list[Node] = []
    problems: list[str] = []
    while is_kind(w, "cast", "dropout"):
        if is_kind(w, "dropout"):
            p = _num(arg(w, 1, "p", 0.5))
            training = arg(w, 2, "training", arg(w, 2, "train", True))
            if p is None or not isinstance(training, bool):
                problems.append("dropout with non-constant arguments")
            elif p > 0 and training:
                problems.append(f"attention dropout is active (p={p}, training)")
        post.append(w)
        w = w.args[0]
    if not is_kind(w, "softmax"):
        return None
    dim = arg(w, 1, "dim")
    if not isinstance(dim, int) or dim % 4 != 3:
        return None
    scores = _walk_scores(w.args[0])
    if scores is None:
        return None
    mm = scores.mm
    q, kt = mm.args[0], mm.args[1]
    if any(len(data_users(n)) != 1 for n in [w, *post]):
        problems.append("the attention weights are used elsewhere (returned or reused)")
    problems += scores.problems
    k, _, k_pat = undo_repeat_kv(kt.args[0])
    v, _, v_pat = undo_repeat_kv(v0)
    layer, path = module_of(node)
    return AttentionMatch(
        "eager", node, q, k, v, scores.mask, scores.scale, False, layer, path,
        "; ".join(dict.fromkeys(problems)) or None,
        [node, *post, w, *reversed(scores.nodes), mm, kt, *k_pat, *v_pat])


Matcher = Callable[[Node], "AttentionMatch | None"]

# The one registration point: every attention spelling the pass understands.
MATCHERS: tuple[Matcher, ...] = (match_sdpa, match_eager)


def find_attention(graph: Graph, matchers: Iterable[Matcher] = MATCHERS) -> list[AttentionMatch]:
    """Every attention subgraph of `graph`, in graph order."""
    matchers = tuple(matchers)
    found = []
    for node in graph.nodes:
        for m in matchers:
            hit = m(node)
            if hit is not None:
                found.append(hit)
                break
    return found


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
