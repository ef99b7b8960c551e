"""The torch.compile backend "sqz": rewrite attention to the sqz op, then hand over to Inductor.

    model = torch.compile(model, backend="sqz", options={"context": ctx, "config": CompileConfig()})

Registered through the `torch_dynamo_backends` entry point (pyproject.toml), so the string "sqz"
works in any process with sqz_compile installed; passing `sqz_backend` itself works too. torch.compile
calls a backend as `backend(gm, example_inputs, options=..., mode=...)`, once per graph (prefill,
decode, recompiles), with the same options dict each time.

Options:
  context    SqueezedContext (required)
  config     CompileConfig: block_q, strict, inductor (False: run the rewritten graph eagerly),
             mode (for callers that must pass it in options: torch.compile refuses mode and
             options together), inductor_options, cache_dir (warm start across processes:
             compile_cache.py). Default CompileConfig(): strict, so a layer the
             pass cannot rewrite is an error (SqueezeDenseError) naming it.
  model      the module being compiled, when Dynamo's frame does not show it (it is found
             automatically for torch.compile(model) and torch.compile(model.forward)); without
             it the layers' settings cannot be checked, which strict mode refuses
  on_report  callable receiving each graph's RewriteReport
The loose options of earlier releases (block_q, inductor, mode, Inductor config names) still work
for one release, with a DeprecationWarning.

With CompileConfig(strict=False) the SqueezeDenseWarning is said once per compiled model: the
backend keeps its DenseNotice in the options dict (under `NOTICE_KEY`), which torch.compile hands
it for every graph of that model.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Callable

import torch
from torch.fx import GraphModule

from . import compile_cache
from .config import resolve_compile_config
from .context import SqueezedContext
from .distributed import local_context
from .passes.bound import is_skeleton
from .passes.rewrite import DenseNotice, RewriteReport, SqueezeDenseWarning, rewrite_attention

_OWN_OPTIONS = ("context", "config", "model", "on_report")
NOTICE_KEY = "_sqz_dense_notice"


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A GraphModule with its own copy of `gm`'s graph (nodes, meta and codegen), sharing its
    parameters and submodules. Dynamo keeps using its own graph module, so the pass edits a copy.
    Placeholders keep Dynamo's `_dynamo_source`: AOTAutograd reads it to find the static inputs
    (the context, a static cache); without it CUDA graphs copied the context on every replay and
    skipped any graph that writes a static cache."""
    graph = torch.fx.Graph()
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, copies, return_output_node=True)
    for old in gm.graph.find_nodes(op="placeholder"):
        if hasattr(old, "_dynamo_source"):
            copies[old]._dynamo_source = old._dynamo_source
    value, old_output = out if isinstance(out, tuple) else (out, None)
    new_out = graph.output(value)
    if old_output is not None:
        new_out.meta = copy.copy(old_output.meta)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    new = GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    if hasattr(gm, "_param_name_to_source"):  # with the sources above: AOTAutograd sees a Dynamo graph
        new._param_name_to_source = dict(gm._param_name_to_source)
    return new


def _name_new_buffers(gm: GraphModule) -> None:
    """Give the buffers the rewrite added (a context held by the graph) a source of their own, as
    AOTAutograd expects one for every parameter and buffer of a Dynamo graph; it then treats them
    as static inputs, as it does the model's own."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:
        return
    from torch._dynamo.source import ConstantSource

    for name, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        sources.setdefault(name, ConstantSource(f"sqz_graph_{name}"))


def _dynamo_root_module() -> torch.nn.Module | None:
    """The nn.Module whose frame Dynamo is compiling, if any: `self`, or a module (or a bound
    method of one) among the frame's locals or its `args` — torch >= 2.12 compiles a module
    through a wrapper frame (`fn`), transformers through decorator frames (`args[0]`). Best
    effort on a private API: None when no single module is found."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        f_locals = tx.output.root_tx.f_locals if tx is not None else {}
    except Exception:  # noqa: BLE001 - private API; the caller then needs options["model"]
        return None

    def as_module(v: Any) -> torch.nn.Module | None:
        v = getattr(v, "__self__", v)
        return v if isinstance(v, torch.nn.Module) else None

    if as_module(f_locals.get("self")) is not None:
        return as_module(f_locals["self"])
    values = list(f_locals.values())
    for v in list(values):
        if isinstance(v, (tuple, list)):
            values.extend(v)
        elif isinstance(v, dict):
            values.extend(v.values())
    mods = {id(m): m for m in map(as_module, values) if m is not None}
    return next(iter(mods.values())) if len(mods) == 1 else None


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    own = {k: options[k] for k in _OWN_OPTIONS if k in options}
    legacy = {k: v for k, v in options.items() if k not in _OWN_OPTIONS and k != NOTICE_KEY}
    return own, legacy


def _notice(options: dict[str, Any] | None) -> DenseNotice:
    """This compiled model's DenseNotice, kept in its options dict (a fresh one per direct call)."""
    if options is None:
        return DenseNotice()
    return options.setdefault(NOTICE_KEY, DenseNotice())


def sqz_backend(gm: GraphModule, example_inputs: list[Any], *, options: dict[str, Any] | None = None,
                mode: str | None = None, **kwargs: Any) -> Callable[..., Any]:
    """torch.compile backend: rewrite attention in a copy of `gm` to use the context, then compile
    it with Inductor (or run it eagerly with CompileConfig(inductor=False))."""
    own, legacy = _split_options({**(options or {}), **kwargs})
    config = resolve_compile_config(own.get("config"), legacy, 'the "sqz" backend options', rest_to_inductor=True)
    mode = config.mode or mode
    ctx = own.get("context")
    if ctx is None:
        raise ValueError(
            'the "sqz" backend needs the squeezed context: torch.compile(model, backend="sqz", '
            'options={"context": ctx}) with ctx = sqz_compile.squeeze(model, context_ids) or '
            "SqueezedContext.load(path)")
    if not isinstance(ctx, SqueezedContext):
        raise TypeError(f'options["context"] must be a sqz_compile.SqueezedContext, got {type(ctx).__name__}')
    model = own.get("model") or _dynamo_root_module()
    if model is not None:
        ctx = local_context(ctx, model)  # tensor parallel: this rank's KV heads (distributed.py)
    gm = copy_graph_module(gm)
    report = rewrite_attention(gm, ctx, block_q=config.block_q, strict=config.strict, model=model,
                               notice=_notice(options))
    _name_new_buffers(gm)
    on_report = own.get("on_report")
    if on_report is not None:
        on_report(report)
    inductor_options = dict(config.inductor_options)
    if config.inductor and not config.prefill_inductor and _query_tokens(gm, example_inputs) != 1:
        return gm  # the prompt's graph runs eagerly; decode graphs go through Inductor
    if not config.inductor:
        if mode not in (None, "default") or inductor_options or config.cache_dir is not None:
            warnings.warn(f"sqz: inductor=False runs the graph eagerly; ignoring mode={mode!r}, Inductor "
                          f"options {sorted(inductor_options)} and cache_dir={config.cache_dir!r}", stacklevel=2)
        return gm
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = {**(list_mode_options(mode) if mode not in (None, "default") else {}), **inductor_options}
    if config.cache_dir is not None:
        compile_cache.load_once(config.cache_dir)
    with _opaque_ops() if is_skeleton(ctx) else contextlib.nullcontext():
        compiled = compile_fx(gm, example_inputs, config_patches=patches or None)
    if config.cache_dir is not None:
        compile_cache.save_to(config.cache_dir)
    return compiled


def _query_tokens(gm: GraphModule, example_inputs: list[Any]) -> Any:
    """Tokens per row of the graph's input_ids / inputs_embeds (an int, a symbol when dynamic, None
    when the graph has neither): 1 for a decode step."""
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        source = getattr(node, "_dynamo_source", None)
        name = getattr(source, "name", "")
        name = name() if callable(name) else str(name)
        if ("'input_ids'" in name or "'inputs_embeds'" in name) and isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[1]
    return None


def _opaque_ops() -> contextlib.AbstractContextManager:
    """Inductor calls the sqz ops as they are instead of inlining their Triton kernels. Needed when
    the context arrives as graph inputs (SqueezedModel): inlined, Inductor 2.11 on the H200 fails
    its scheduler (KeyError 'op13', dynamic shapes) or launches on bad addresses (static shapes)
    with those inputs' per-layer views, while the op called as is gives the eager tokens."""
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, "decompose_custom_triton_ops"):
        return contextlib.nullcontext()
    return functorch_config.patch(decompose_custom_triton_ops=False)


__all__ = ["sqz_backend", "copy_graph_module", "RewriteReport", "SqueezeDenseWarning", "NOTICE_KEY"]
