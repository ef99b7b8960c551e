"""Serialized squeezed models: torch.export programs (AOTInductor packages: aoti.py; ONNX: onnx.py).

Every artifact maps the user's token ids [batch, length] (both dynamic) to their logits, with one
fixed context baked in as buffers; no KV cache goes in or out, attention over the user's tokens is
causal and their positions are 0..M-1 (context.py's RoPE convention: no offset anywhere).

How: torch.export the model behind a thin input_ids -> logits wrapper, run the attention rewrite
(`passes.rewrite_attention`) on `ep.module()`, and torch.export the rewritten module again with the
same dynamic shapes. The second program holds `torch.ops.sqz.*` nodes, which torch.export keeps
as custom ops (it never decomposes triton_ops), so loading it needs sqz_compile imported: use
`load_exported`. AOTInductor instead traces into the op bodies: a CPU package holds plain aten
code and needs no sqz_compile to run; a CUDA package holds the compiled sqz Triton kernels.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any, Mapping, Sequence

import torch
from torch.export import Dim, ExportedProgram

from ..config import CompileConfig, resolve_compile_config
from ..context import SqueezedContext, check_for_model
from ..transformers_compat import max_positions, model_config, num_layers

SQZ_NAMESPACE = "sqz"
META_FILE = "sqz_compile.json"  # extra file written by `save_exported`
LOAD_HINT = ("import sqz_compile before torch.export.load (it registers torch.ops.sqz), or load "
             "with sqz_compile.load_exported(path)")


class LogitsModule(torch.nn.Module):
    """input_ids [B, M] -> logits [B, M, vocab] of a causal LM, without a KV cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def max_input_length(model: torch.nn.Module | None, ctx: SqueezedContext | None = None) -> int | None:
    """Longest user input the model supports after the context (its max_position_embeddings minus
    the context length), or None when the model states no limit."""
    max_pos = max_positions(model)
    if not max_pos:
        return None
    return max_pos - (ctx.context_length if ctx is not None else 0)


def default_dynamic_shapes(model: torch.nn.Module | None = None,
                           ctx: SqueezedContext | None = None) -> dict[str, dict[int, Any]]:
    """Dynamic batch and length for `input_ids`, the length capped by `max_input_length` (the
    program then rejects longer inputs instead of running past the model's positions)."""
    limit = max_input_length(model, ctx)
    seq = Dim("seq", min=1, max=limit) if limit is not None and limit > 1 else Dim("seq", min=1)
    return {"input_ids": {0: Dim("batch", min=1), 1: seq}}


def _example_ids(example_inputs: Any) -> torch.Tensor:
    """Accept ids, (ids,) or {"input_ids": ids}; return a [B, M] integer tensor."""
    x = example_inputs
    if isinstance(x, Mapping):
        x = x.get("input_ids")
    elif isinstance(x, Sequence) and len(x) == 1:
        x = x[0]
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype.is_floating_point or x.dtype == torch.bool:
        raise TypeError("example_inputs must be token ids: an integer tensor [batch, length], (ids,) or "
                        f"{{'input_ids': ids}}; got {_describe(example_inputs)}")
    if x.numel() == 0:
        raise ValueError(f"example_inputs has an empty shape {tuple(x.shape)}: give at least one token")
    return x


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _trace_ids(ids: torch.Tensor) -> torch.Tensor:
    """torch.export specialises dims whose example size is 1, so trace with at least 2 rows and
    2 tokens (the graph does not depend on the ids' values)."""
    return ids.repeat(2 if ids.shape[0] == 1 else 1, 2 if ids.shape[1] == 1 else 1)


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def count_sqz_nodes(program: ExportedProgram | torch.fx.GraphModule) -> int:
    """Number of torch.ops.sqz calls in a program's (or GraphModule's) graph."""
    graph = program.graph
    return sum(1 for n in graph.nodes
               if n.op == "call_function" and getattr(n.target, "namespace", None) == SQZ_NAMESPACE)


def export_module(module: torch.nn.Module, example_inputs: Any, dynamic_shapes: Any = None) -> ExportedProgram:
    """torch.export a module mapping input_ids to logits whose forward already calls torch.ops.sqz
    (e.g. a rewritten GraphModule), with dynamic batch and length by default."""
    ids = _trace_ids(_example_ids(example_inputs))
    shapes = default_dynamic_shapes() if dynamic_shapes is None else dynamic_shapes
    if isinstance(shapes, Mapping) and "input_ids" in shapes and not _takes_input_ids(module):
        shapes = (shapes["input_ids"],)  # positional form for modules whose argument has another name
    with torch.no_grad():
        return _export_dynamic(module, ids, shapes)


def _export_dynamic(module: torch.nn.Module, ids: torch.Tensor, shapes: Any) -> ExportedProgram:
    """torch.export.export with guards kept as runtime asserts. On CUDA, SDPA's alignment checks
    (dense model) and Triton's integer specialisation of strides (sqz kernels) emit guards on the
    dynamic length that the solver cannot prove although they hold for every length >= 1."""
    return torch.export.export(module, (ids,), dynamic_shapes=shapes,
                               prefer_deferred_runtime_asserts_over_guards=True)


def _takes_input_ids(module: torch.nn.Module) -> bool:
    import inspect

    try:
        return "input_ids" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _own_storage(module: torch.nn.Module) -> None:
    """Give each buffer that views part of a larger storage (the pass registers per-layer views of
    the stacked context) its own copy, so saved programs hold exactly their tensors."""
    for name, buf in list(module.named_buffers()):
        if buf.untyped_storage().nbytes() != buf.numel() * buf.element_size():
            owner, _, attr = name.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            persistent = attr not in holder._non_persistent_buffers_set
            holder.register_buffer(attr, buf.clone(), persistent=persistent)


def export(model: torch.nn.Module, ctx: SqueezedContext, example_inputs: Any, dynamic_shapes: Any = None,
           *, config: CompileConfig | None = None, **deprecated: Any) -> ExportedProgram:
    """torch.export `model` (a transformers causal LM) with `ctx` baked in.

    The program takes input_ids [batch, length] (both dynamic unless `dynamic_shapes` says
    otherwise; keyed by "input_ids") and returns the logits of those tokens, attending to the
    squeezed context; its graph holds torch.ops.sqz.squeezed_attention nodes and the context
    tensors as buffers. Save it with `save_exported` (or torch.export.save) and load it with
    `load_exported`.

    `config` (CompileConfig): block_q and strict are read. Strict (the default) refuses, naming
    the layer and the reason, any layer that would stay dense (it would ignore the context);
    CompileConfig(strict=False) exports such layers dense with one SqueezeDenseWarning. The
    context must be on the model's device already (`ctx.to(device)`; nothing is moved here).
    """
    from ..passes.rewrite import DenseNotice, model_reasons, refuse_or_warn, rewrite_attention

    config = resolve_compile_config(config, deprecated, "sqz_compile.export")
    check_for_model(ctx, model, "sqz_compile.export")
    example = _example_ids(example_inputs)
    limit = max_input_length(model, ctx)
    if limit is not None and (limit < 2 or example.shape[1] > limit):
        raise ValueError(f"context ({ctx.context_length} tokens) + example input ({example.shape[1]}) leaves "
                         f"no room within {type(model).__name__}'s max_position_embeddings "
                         f"({ctx.context_length + limit}): use a shorter example input or context")
    ids = _trace_ids(example).to(_model_device(model))
    shapes = default_dynamic_shapes(model, ctx) if dynamic_shapes is None else dynamic_shapes
    wrapper = LogitsModule(model)
    was_training = model.training
    model.eval()  # the program is for inference: traced, and its settings checked, in eval mode
    try:
        if config.strict:  # refused before the (slow) dense export
            refuse_or_warn(model_reasons(model), strict=True)
        with torch.no_grad():
            gm = _export_dynamic(wrapper, ids, shapes).module()
        # model= lets the pass read each attention module's settings (sliding window, softcap, ...);
        # layers= makes a layer whose attention was not found at all a dense layer too
        rewrite_attention(gm, ctx, block_q=config.block_q, strict=config.strict, model=wrapper,
                          layers=num_layers(model_config(model)), notice=DenseNotice())
    finally:
        model.train(was_training)
    _own_storage(gm)
    return export_module(gm, ids, shapes)


# --------------------------------------------------------------------------- save / load

def save_exported(program: ExportedProgram, path: str | os.PathLike) -> str:
    """torch.export.save plus a small `sqz_compile.json` note inside the archive saying which
    ops it needs and how to load it."""
    note = {"ops": sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function"
                           and getattr(n.target, "namespace", None) == SQZ_NAMESPACE}),
            "load": LOAD_HINT, "torch": torch.__version__}
    path = os.fspath(path)
    torch.export.save(program, path, extra_files={META_FILE: json.dumps(note)})
    return path


def _sqz_ops_named_in(path: str) -> list[str]:
    """sqz op names referenced by a saved program archive (scans its JSON model files)."""
    found: set[str] = set()
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith(".json"):
                    text = z.read(name).decode("utf-8", "replace")
                    for part in text.split('"')[1::2]:
                        if part.startswith(f"torch.ops.{SQZ_NAMESPACE}."):
                            found.add(part)
    except (zipfile.BadZipFile, OSError):
        pass
    return sorted(found)


def load_exported(path: str | os.PathLike) -> ExportedProgram:
    """Load a program written by `save_exported` / torch.export.save. Importing this module has
    registered torch.ops.sqz, which a plain torch.export.load in a fresh process lacks (it then
    fails with "We ran into an error when deserializing the saved file")."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported program at {path!r}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is not a torch.export archive (.pt2 zip file)")
    try:
        return torch.export.load(path)
    except RuntimeError as e:
        missing = [op for op in _sqz_ops_named_in(path) if not _op_exists(op)]
        if missing:
            raise RuntimeError(f"{path!r} uses {missing}, which this sqz_compile does not define: load it "
                               f"with the sqz_compile version that exported it, or re-export") from e
        raise RuntimeError(f"could not load the exported program {path!r}: {e} (an AOTInductor package "
                           f"is loaded with torch._inductor.aoti_load_package instead)") from e


def _op_exists(qualname: str) -> bool:
    """'torch.ops.sqz.name.default' -> whether that overload is registered."""
    parts = qualname.split(".")[2:]
    try:
        obj: Any = torch.ops
        for p in parts:
            obj = getattr(obj, p)
        return True
    except (AttributeError, RuntimeError):
        return False


def read_package_note(path: str | os.PathLike) -> dict[str, Any] | None:
    """The `sqz_compile.json` note of a program saved by `save_exported` (None if absent)."""
    with zipfile.ZipFile(os.fspath(path)) as z:
        for name in z.namelist():
            if name.rsplit("/", 1)[-1] == META_FILE:
                return json.load(io.BytesIO(z.read(name)))
    return None


__all__ = ["LogitsModule", "count_sqz_nodes", "default_dynamic_shapes", "export", "export_module",
           "max_input_length", "load_exported", "read_package_note", "save_exported"]
