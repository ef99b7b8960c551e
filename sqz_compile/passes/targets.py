"""What each FX node computes, in one vocabulary for Dynamo (torch-level) and export (aten) graphs.

Dynamo records `torch.matmul`, `operator.mul`, `x.softmax(...)` and friends as they were written;
`torch.export` records aten overloads. The matchers ask `kind(node)` ("matmul", "softmax", ...)
and read arguments with `arg(node, i, name)`, so each attention spelling is matched once for both
levels.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

aten = torch.ops.aten

# kind -> (call_function targets, call_method names)
_KINDS: dict[str, tuple[frozenset, frozenset[str]]] = {
    "sdpa": (frozenset({F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
                        aten.scaled_dot_product_attention.default}), frozenset()),
    "matmul": (frozenset({torch.matmul, operator.matmul, aten.matmul.default}),
               frozenset({"matmul", "__matmul__"})),
    "transpose": (frozenset({torch.transpose, torch.swapaxes, aten.transpose.int}),
                  frozenset({"transpose", "swapaxes"})),
    "softmax": (frozenset({torch.softmax, F.softmax, aten.softmax.int, aten._softmax.default}),
                frozenset({"softmax"})),
    "mul": (frozenset({operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}),
            frozenset({"mul", "__mul__", "__rmul__"})),
    "div": (frozenset({operator.truediv, torch.div, torch.true_divide, aten.div.Tensor, aten.div.Scalar}),
            frozenset({"div", "true_divide", "__truediv__"})),
    "add": (frozenset({operator.add, torch.add, aten.add.Tensor}), frozenset({"add", "__add__", "__radd__"})),
    # dtype casts and layout-only copies: value-preserving up to the cast
    "cast": (frozenset({aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.clone.default,
                        aten.contiguous.default, aten.alias.default}),
             frozenset({"to", "float", "half", "bfloat16", "double", "type_as", "contiguous", "clone"})),
    "dropout": (frozenset({F.dropout, torch.dropout, aten.dropout.default}),
                frozenset()),
    "expand": (frozenset({aten.expand.default}), frozenset({"expand"})),
    "reshape": (frozenset({torch.reshape, aten.reshape.default, aten.view.default, aten._unsafe_view.default}),
                frozenset({"reshape", "view"})),
    "unsqueeze": (frozenset({torch.unsqueeze, aten.unsqueeze.default}), frozenset({"unsqueeze"})),
    "getitem": (frozenset({operator.getitem}), frozenset({"__getitem__"})),
    "slice": (frozenset({aten.slice.Tensor}), frozenset()),
    "tanh": (frozenset({torch.tanh, F.tanh, aten.tanh.default}), frozenset({"tanh"})),
}


# metadata checks export inserts (they read a tensor but compute nothing)
_ASSERTS = frozenset(t for t in (getattr(aten, "_assert_tensor_metadata", None),
                                 getattr(aten, "_assert_scalar", None)) if t is not None)


def is_assert(node: Node) -> bool:
    return node.op == "call_function" and (
        node.target in _ASSERTS or getattr(node.target, "overloadpacket", None) in _ASSERTS)


def data_users(node: Node) -> list[Node]:
    """Users of `node` other than export's metadata assertions."""
    return [u for u in node.users if not is_assert(u)]


def kind(node: Any) -> str | None:
    """The kind of computation `node` performs, or None for anything else."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_function":
        for k, (fns, _) in _KINDS.items():
            if node.target in fns:
                return k
    elif node.op == "call_method":
        for k, (_, methods) in _KINDS.items():
            if node.target in methods:
                return k
    return None


def is_kind(node: Any, *kinds: str) -> bool:
    return kind(node) in kinds


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `name` of a call, given positionally at `index` (counting `self` for methods)
    or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def tensor_meta(node: Any) -> torch.Tensor | None:
    """The (fake) example value FX recorded for `node`: `val` (export, AOT) or `example_value`
    (Dynamo)."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("val", node.meta.get("example_value"))
    return val if isinstance(val, torch.Tensor) else None


def static_int(x: Any) -> int | None:
    """x as a Python int when it is one (or a SymInt with a fixed value), else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            return int(x.node.maybe_as_int()) if x.node.maybe_as_int() is not None else None
        except Exception:  # noqa: BLE001 - symbolic sizes without a fixed value
            return None
    return None


def shape_of(node: Any) -> tuple[int | None, ...] | None:
    """Static sizes of `node`'s value (None for symbolic ones), or None without metadata."""
    val = tensor_meta(node)
    if val is None:
        return None
    return tuple(static_int(s) for s in val.shape)
