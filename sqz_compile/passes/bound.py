"""Context tensors that enter a Dynamo graph as inputs (SqueezedModel) instead of as constants.

SqueezedModel compiles the model's forward with the stacked context tensors [layers, ...] as extra
inputs, tied into the graph by `torch.ops.sqz.bind_context(input_ids, [keys, values, ...])`.
`bound_context(gm, ctx)` removes that marker and gives the rewrite each layer's tensors as
`select`s of those inputs: the compiled code holds no context data and, compiled with dynamic
shapes, runs every context of the same structure (compiled_forward.structure_key) unchanged.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .. import ops  # noqa: F401  (registers torch.ops.sqz.bind_context)
from ..context import CONTEXT_ARGS, SqueezedContext
from .targets import tensor_meta

_BIND = (torch.ops.sqz.bind_context, torch.ops.sqz.bind_context.default)


def is_skeleton(ctx: SqueezedContext) -> bool:
    """A context without data (compiled_forward.skeleton): its tensors arrive as graph inputs.
    A real context has at least one clustered key (validate)."""
    return ctx.keys.shape[2] == 0


def _layer_meta(val: torch.Tensor, i: int) -> torch.Tensor:
    """A fake tensor with the sizes, strides, dtype and device of `val.select(0, i)`, for a node's
    metadata. Not a view of `val`: a view's fake kernel checks its bounds against `val`'s symbolic
    storage size, ~15 ms per view in a 32-layer graph (7 s of the backend's 8 s), and only the
    pass reads this metadata (the sqz op's fake output)."""
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return val.select(0, i)
    with mode:
        return torch.empty_strided(val.shape[1:], val.stride()[1:], dtype=val.dtype, device=val.device)


class BoundContext:
    """The stacked context inputs of one graph; `layer(i, before)` makes (once) layer i's views."""

    def __init__(self, gm: GraphModule, stacked: list[Node | None] | None) -> None:
        self.gm, self.stacked = gm, stacked
        self._layers: dict[int, list[Node | None]] = {}

    def layer(self, i: int, before: Node) -> list[Node | None]:
        if self.stacked is None:
            raise RuntimeError(
                "sqz: this graph has attention but not SqueezedModel's context inputs (a graph break "
                "between the forward's start and this layer?): find the break with fullgraph=True")
        if i not in self._layers:
            nodes: list[Node | None] = []
            with self.gm.graph.inserting_before(before):
                for src in self.stacked:
                    node = None if src is None else self.gm.graph.call_function(torch.select, (src, 0, i))
                    val = tensor_meta(src)
                    if node is not None and val is not None:
                        node.meta["example_value"] = _layer_meta(val, i)
                    nodes.append(node)
            self._layers[i] = nodes
        return self._layers[i]


def bound_context(gm: GraphModule, ctx: SqueezedContext) -> BoundContext | None:
    """Take the bind_context marker out of `gm` (its output becomes its input again) and return
    its context inputs; None when `gm` has none and `ctx` carries real data (constants then).
    The caller recompiles `gm` (rewrite_attention does, once, after all its edits)."""
    markers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _BIND]
    if not markers:
        return BoundContext(gm, None) if is_skeleton(ctx) else None
    stacked = list(markers[0].args[1])
    if len(stacked) != len(CONTEXT_ARGS) or any(s is not None and s.op != "placeholder" for s in stacked):
        raise ValueError(f"sqz: bind_context takes the {len(CONTEXT_ARGS)} stacked context inputs "
                         f"{CONTEXT_ARGS} as graph inputs, got {stacked}")
    for n in markers:
        n.replace_all_uses_with(n.args[0])
        gm.graph.erase_node(n)
    return BoundContext(gm, stacked)


__all__ = ["BoundContext", "bound_context", "is_skeleton"]
