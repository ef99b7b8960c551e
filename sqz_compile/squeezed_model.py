"""SqueezedModel: a transformers causal LM compiled with its squeezed context, for forward and generate.

    sm = sqz_compile.compile(model, ctx)                  # Inductor; inductor=False runs eagerly
    logits = sm(input_ids, attention_mask=mask).logits   # logits for the user's tokens only
    out = sm.generate(input_ids, attention_mask=mask, max_new_tokens=32)

The user passes only their own tokens; the fixed context lives in the compiled graph (see
context.py: the user's tokens keep positions 0, 1, ...). `forward` behaves like the model's
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
import warnings
from typing import Any, Iterator

import torch

from .backend import sqz_backend
from .compiled_forward import dynamo_settings, graph_inputs, shared_forward
from .context import SqueezedContext, check_fits
from .distributed import local_context
from .ops import DEFAULT_BLOCK_Q
from .passes.rewrite import RewriteReport, SqueezeDenseWarning
from .transformers_compat import check_positions, model_config, num_layers


class SqueezedModel:
    """`model` bound to `ctx` through the "sqz" backend. Build it with `sqz_compile.compile`."""

    def __init__(self, model: torch.nn.Module, ctx: SqueezedContext, *, block_q: int = DEFAULT_BLOCK_Q,
                 inductor: bool = True, mode: str | None = None, dynamic: bool | None = None,
                 fullgraph: bool = False, **inductor_options: Any) -> None:
        _check_model_and_context(model, ctx)
        ctx = local_context(ctx, model)  # tensor parallel: this rank's KV heads (distributed.py)
        self.model = model
        self.ctx = ctx
        options: dict[str, Any] = {"block_q": int(block_q), "inductor": bool(inductor), "model": model,
                                   **inductor_options}
        if mode is not None:
            options["mode"] = mode  # torch.compile takes mode or options, not both
        # one compiled forward per model and context structure, the context an input (compiled_forward.py);
        # dynamic shapes by default: other questions, batches, cache lengths and contexts reuse it
        compiled = shared_forward(model, ctx, sqz_backend, options, True if dynamic is None else dynamic, fullgraph)
        self.reports: list[RewriteReport] = compiled.reports  # every graph of that compiled forward
        self._checked = len(self.reports)
        self._forward = functools.partial(compiled, graph_inputs(ctx))

    # ------------------------------------------------------------------ calls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        """The model's forward over the user's tokens, attending to the squeezed context (under
        torch.no_grad: the sqz ops are inference-only)."""
        past = kwargs.get("past_key_values")
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
        if name in ("model", "ctx", "reports", "_forward", "_checked"):
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
        finally:
            if had_own:
                m.forward = old
            else:
                del m.forward
            self._check_coverage()

    def _check_length(self, n_tokens: int, what: str) -> None:
        total = self.ctx.context_length + n_tokens
        check_positions(self.model, total, f"context ({self.ctx.context_length}) + {what} ({n_tokens}) = {total} tokens",
                        "shorten the input, lower max_new_tokens, or squeeze a shorter context")

    def _check_coverage(self) -> None:
        """Warn once per compile if some decoder layer's attention was not found at all (it would
        silently ignore the context)."""
        new = self.reports[self._checked:]
        self._checked = len(self.reports)
        if not new:
            return
        layers = num_layers(model_config(self.model))
        seen = {r for rep in new for r in rep.rewritten} | {l for rep in new for l, _ in rep.dense}
        missing = sorted(set(range(layers)) - seen)
        if missing:
            warnings.warn(
                f"sqz: no attention found in layers {missing} of {type(self.model).__name__}: those layers "
                f"attend only to the new tokens, not to the squeezed context (unrecognised attention "
                f"implementation? use attn_implementation='sdpa' or 'eager')", SqueezeDenseWarning, stacklevel=3)


def _check_model_and_context(model: torch.nn.Module, ctx: SqueezedContext) -> None:
    if not isinstance(ctx, SqueezedContext):
        raise TypeError(f"ctx must be a sqz_compile.SqueezedContext, got {type(ctx).__name__}")
    if not hasattr(model, "generate") or not hasattr(model, "config"):
        raise TypeError(f"sqz_compile.compile needs a transformers causal LM, got {type(model).__name__}")
    ctx.check_model_or_warn(model, "sqz", stacklevel=3)
    p = next(model.parameters())
    check_fits(ctx, "the model", layers=num_layers(model_config(model)), dtype=p.dtype, device=p.device)


def compile(model: torch.nn.Module, ctx: SqueezedContext, *, block_q: int = DEFAULT_BLOCK_Q,
            inductor: bool = True, mode: str | None = None, dynamic: bool | None = None,
            **inductor_options: Any) -> SqueezedModel:
    """Compile `model` with its squeezed context: a SqueezedModel whose forward and generate take
    only the user's tokens. Checks up front that `ctx` was made for `model` (fingerprint, layers,
    dtype, device). `inductor=False` runs the rewritten graph eagerly; `mode` and other keyword
    options go to Inductor (as torch.compile's mode/options)."""
    return SqueezedModel(model, ctx, block_q=block_q, inductor=inductor, mode=mode, dynamic=dynamic,
                         **inductor_options)


__all__ = ["SqueezedModel", "compile"]
