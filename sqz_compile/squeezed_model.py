"""SqueezedModel: a transformers causal LM compiled with its squeezed context, for forward and generate.

    sm = sqz_compile.compile(model, ctx)                  # Inductor; inductor=False runs eagerly
    logits = sm(input_ids, attention_mask=mask).logits   # logits for the user's tokens only
    out = sm.generate(input_ids, attention_mask=mask, max_new_tokens=32)

The user passes only their own tokens; the fixed context lives in the compiled graph (see
context.py: the user's tokens keep positions 0, 1, ...). By default only decode steps are compiled:
a prompt runs the model's own forward with the sqz op as its attention function (no tracing), the
same computation (CompileConfig.prefill_inductor). With mode="reduce-overhead" decode steps run
untraced too, replayed from CUDA graphs over a static cache (CompileConfig.decode_inductor,
decode_graphs.py): nothing is traced or compiled. `forward` behaves like the model's
(with left padding pass position_ids, as with the plain model); `generate` is transformers'
generate, so it returns the user's prompt plus the new tokens, with any cache implementation
(dynamic, `cache_implementation="static"`), greedy or sampling, and left-padded batches that share
the one context. The model itself is left untouched (apart from a private cache of compiled code,
`_sqz_compiled`, that every context of the model shares): its compiled forward is installed only
for the duration of a call.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch

from .attention_function import squeezed_mode
from .backend import NOTICE_KEY, sqz_backend
from .compiled_forward import dynamo_settings, graph_inputs, shared_forward, token_input
from .config import CompileConfig, resolve_compile_config
from .context import SqueezedContext, check_for_model
from .decode_graphs import DecodeGraphs
from .distributed import kv_shard, local_context
from .passes.rewrite import (ContextMismatchError, DenseNotice, RewriteReport, SqueezeDenseError, model_reasons,
                             refuse_or_warn, uncovered)
from .transformers_compat import (cache_kwargs, check_positions, make_cache_contiguous, mark_static_cache, model_config,
                                  num_layers, passed_cache, reusable_static_cache)


class SqueezedModel:
    """`model` bound to `ctx` through the "sqz" backend. Build it with `sqz_compile.compile`."""

    def __init__(self, model: torch.nn.Module, ctx: SqueezedContext, config: CompileConfig | None = None,
                 **deprecated: Any) -> None:
        config = resolve_compile_config(config, deprecated, "sqz_compile.SqueezedModel", rest_to_inductor=True)
        if not hasattr(model, "generate") or not hasattr(model, "config"):
            raise TypeError(f"sqz_compile.compile needs a transformers causal LM, got {type(model).__name__}")
        check_for_model(ctx, model, "sqz_compile.compile")
        reasons = model_reasons(model)
        if config.strict:  # what the config already forbids fails here, not at the first call
            refuse_or_warn(reasons, strict=True)
        ctx = local_context(ctx, model)  # tensor parallel: this rank's KV heads (distributed.py)
        self.model = model
        self.ctx = ctx
        self.compile_config = config  # (`config` is the wrapped model's, as for the model)
        self._notice = DenseNotice()  # one SqueezeDenseWarning per (layer, reason) for this model
        options: dict[str, Any] = {"config": config, "model": model, NOTICE_KEY: self._notice}
        # one compiled forward per model and context structure, the context an input (compiled_forward.py);
        # dynamic shapes by default: other questions, batches, cache lengths and contexts reuse it
        compiled = shared_forward(model, ctx, sqz_backend, options,
                                  True if config.dynamic is None else config.dynamic, config.fullgraph)
        self.reports: list[RewriteReport] = compiled.reports  # every graph of that compiled forward
        self._checked = len(self.reports)
        self._compiled, self._context = compiled, graph_inputs(ctx)
        # prompts (more than one token per row) without Dynamo: the model's own forward with the
        # sqz op as its attention function, where that is the rewritten graph's computation (every
        # layer rewritable: layers the config keeps dense need the graph's dense path; not
        # tensor-parallel: its sharded attention is proven only through the graph, tests/test_tp.py)
        untraced = config.inductor and not reasons.dense and kv_shard(model) is None
        self._eager_prompt = untraced and not config.prefill_inductor
        # decode steps untraced as well (CompileConfig.decode_inductor=False); CUDA graphs on request
        self._eager_decode = untraced and not config.decode_graph
        self._steps = (DecodeGraphs(self._eagerly) if config.mode == "reduce-overhead"
                       else lambda args, kwargs: self._eagerly(*args, **kwargs))
        self._forward = functools.partial(_forward_with_cache_layout, self._run)

    # ------------------------------------------------------------------ calls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        """The model's forward over the user's tokens, attending to the squeezed context (under
        torch.no_grad: the sqz ops are inference-only)."""
        past = passed_cache(kwargs)
        past_len = int(past.get_seq_length()) if past is not None and hasattr(past, "get_seq_length") else 0
        n = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
        self._check_length(past_len + n, "tokens")
        # inference only: the sqz ops have no backward
        with self._installed(), torch.no_grad():
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> Any:
        """transformers' generate over the user's prompt (left-pad batches), with the context."""
        gc = kwargs.get("generation_config") or self.model.generation_config
        n = input_ids.shape[1] if input_ids is not None else 0
        new = kwargs.get("max_new_tokens", gc.max_new_tokens)
        total = n + int(new) if new is not None else int(kwargs.get("max_length", gc.max_length))
        self._check_length(total, "prompt + new tokens")
        kwargs.setdefault("disable_compile", True)  # our compiled forward, not transformers' auto-compile
        if (self._eager_decode and isinstance(self._steps, DecodeGraphs) and self.model.device.type == "cuda"
                and passed_cache(kwargs) is None and kwargs.get("cache_implementation", gc.cache_implementation) is None):
            kwargs["cache_implementation"] = "static"  # CUDA graphs replay only over fixed addresses
        if kwargs.get("cache_implementation") == "static" and passed_cache(kwargs) is None and input_ids is not None:
            cache = reusable_static_cache(self.model, input_ids.shape[0], total)
            if cache is not None:
                del kwargs["cache_implementation"]
                kwargs.update(cache_kwargs(self.model, cache))
        with self._installed():
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ------------------------------------------------------------------ helpers

    @property
    def report(self) -> RewriteReport:
        """All rewrites so far (one graph per compile: prefill, decode, recompiles) merged."""
        out = RewriteReport()
        for r in self.reports:
            out = out.merge(r)
        return out

    def __getattr__(self, name: str) -> Any:
        # config, device, generation_config, ... of the wrapped model
        if name in ("model", "ctx", "compile_config", "reports", "_forward", "_checked", "_notice", "_compiled",
                    "_context", "_eager_prompt", "_eager_decode", "_steps"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return (f"SqueezedModel({type(self.model).__name__}, context of {self.ctx.context_length} tokens, "
                f"keep={self.ctx.config.keep}, budget={self.ctx.config.budget})")

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        """Install the compiled forward on the model for one call, then restore it exactly."""
        m = self.model
        had_own = "forward" in m.__dict__
        old = m.__dict__.get("forward")
        m.forward = self._forward
        try:
            with dynamo_settings():
                yield
        except torch._dynamo.exc.BackendCompilerFailed as e:
            # Dynamo wraps the backend's exceptions: sqz_compile's own are raised as they are
            inner = getattr(e, "inner_exception", None)
            if isinstance(inner, (SqueezeDenseError, ContextMismatchError)):
                raise inner from None
            raise
        finally:
            if had_own:
                m.forward = old
            else:
                del m.forward
        self._check_coverage()  # after a successful call: strict refuses before its output is returned

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        """One forward of the model: a prompt eagerly (see __init__), a decode step (one token per
        row) through the compiled forward or, with decode_inductor=False, untraced (CUDA graphs with
        mode="reduce-overhead"), and anything the untraced path does not cover through the
        compiled forward."""
        if (self._eager_prompt or self._eager_decode) and not kwargs.get("output_attentions"):
            decode = _tokens_per_row(args, kwargs) == 1
            if decode and self._eager_decode:
                return self._steps(args, kwargs)
            if not decode and self._eager_prompt:
                return self._eagerly(*args, **kwargs)
        return self._compiled(self._context, *args, **kwargs)

    def _eagerly(self, *args: Any, **kwargs: Any) -> Any:
        """A forward through the model's own code with torch.ops.sqz.squeezed_attention as its
        attention function (attention_function.py), not traced: a layer that did not attend through
        it ignored the context, which strict mode refuses as the rewrite does."""
        seen: set[int] = set()
        with squeezed_mode(self.model, self.ctx, block_q=self.compile_config.block_q, layers=seen):
            out = self._compiled.model_forward(*args, **kwargs)
        missing = uncovered(RewriteReport(rewritten=sorted(seen)), num_layers(model_config(self.model)))
        refuse_or_warn(missing, strict=self.compile_config.strict, notice=self._notice)
        return out

    def _check_length(self, n_tokens: int, what: str) -> None:
        total = self.ctx.context_length + n_tokens
        check_positions(self.model, total, f"context ({self.ctx.context_length}) + {what} ({n_tokens}) = {total} tokens",
                        "shorten the input, lower max_new_tokens, or squeeze a shorter context")

    def _check_coverage(self) -> None:
        """After new graphs were compiled: every decoder layer's attention must have been found
        (rewritten or reported) in some graph, else that layer silently ignores the context
        (strict: SqueezeDenseError; else one SqueezeDenseWarning)."""
        if len(self.reports) == self._checked:
            return
        self._checked = len(self.reports)
        missing = uncovered(self.report, num_layers(model_config(self.model)))
        refuse_or_warn(missing, strict=self.compile_config.strict, notice=self._notice)


def _tokens_per_row(args: tuple, kwargs: dict) -> int | None:
    """Tokens per row of a forward call's input_ids / inputs_embeds (1 for a decode step)."""
    key = token_input(args, kwargs)
    x = None if key is None else args[0] if key == 0 else kwargs[key]
    return int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else None


def _forward_with_cache_layout(run: Any, *args: Any, **kwargs: Any) -> Any:
    """`run` (SqueezedModel._run); after the call that first fills a cache (the prefill), the cache
    made ready for the decode graph: a dynamic cache stored contiguously (one decode graph, not
    two), a static one's tensors tagged as fixed addresses (CUDA graphs not skipped). See
    transformers_compat. Decode steps skip it (their layers are initialized already)."""
    cache = passed_cache(kwargs)
    layers = getattr(cache, "layers", None)
    filling = bool(layers) and not getattr(layers[0], "is_initialized", False)
    out = run(*args, **kwargs)
    if filling:
        make_cache_contiguous(cache)
        mark_static_cache(cache)
    return out


def compile(model: torch.nn.Module, ctx: SqueezedContext, config: CompileConfig | None = None,
            **deprecated: Any) -> SqueezedModel:
    """Compile `model` with its squeezed context: a SqueezedModel whose forward and generate take
    only the user's tokens. Checks up front that `ctx` was made for `model` (fingerprint, layers,
    dtype, device; nothing is moved or cast) and, in strict mode (the default), that no layer's
    settings forbid the rewrite. `config` (CompileConfig) sets block_q, strict, inductor (False
    runs the rewritten graph eagerly), mode, dynamic, fullgraph and Inductor options; the loose
    keyword arguments of earlier releases still work for one release (DeprecationWarning)."""
    config = resolve_compile_config(config, deprecated, "sqz_compile.compile", rest_to_inductor=True)
    return SqueezedModel(model, ctx, config)


__all__ = ["SqueezedModel", "compile"]
