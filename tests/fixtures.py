"""The one fixtures module of the tests: tiny random-weight models, contexts and references.

tiny_model       Llama / Mistral / Qwen2 causal LMs (hidden 64, 4 query heads, head dim 16): the
                 one tiny-model builder (tiny_llama and the squeeze tests' variant call it)
tiny_context     (context ids, SqueezedContext) from the real sqz_compile.squeeze
export_context   the export / ONNX / package tests' SqueezedContext (200 tokens, 10% clusters)
DirectSqz, squeezed_eager, run_fresh, assert_fresh_ok, dense_logits, user_ids
                 export plumbing (see their docstrings)
left_padded      a left-padded batch with HF-style position ids
dense_full_rows  the dense model over [context + row tokens], per batch row (the keep = 1 truth)
selected_keys_reference
                 the model run eagerly with an attention function that computes dense SDPA over
                 exactly the keys the lookup selects (context clusters + window + new tokens):
                 the truth for keep < 1, computed without the sqz op or the FX pass
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading

import torch
import torch.nn.functional as F

from sqz_compile import SqueezeConfig, SqueezedContext
from sqz_compile.context import CONTEXT_ARGS
from sqz_compile.kernels.lookup.reference import selection_mask_reference
from sqz_compile.ops import DEFAULT_BLOCK_Q
from sqz_compile.squeeze import squeeze
from sqz_compile.transformers_compat import register_attention, set_attn_implementation

VOCAB = 128


def tiny_model(arch: str = "llama", attn: str = "sdpa", kv_heads: int = 2, layers: int = 2, seed: int = 0,
               **overrides) -> torch.nn.Module:
    """A random-weight causal LM in eval mode (float32, CPU). attn=None keeps transformers' default
    attention; keyword overrides go to the config."""
    import transformers as tf

    classes = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
               "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}
    cfg_cls, model_cls = classes[arch]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    cfg = cfg_cls(**kw)
    if attn is not None:  # None: transformers' default
        cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    model.generation_config.eos_token_id = None  # random weights: let every row run to max_new_tokens
    return model


def tiny_context(model: torch.nn.Module, length: int = 48, keep: float = 1.0, seed: int = 1,
                 **config) -> tuple[torch.Tensor, SqueezedContext]:
    """(context ids [1, length], SqueezedContext) squeezed for `model`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (1, length), generator=g)
    cfg = dict(keep=keep, cluster_ratio=0.25, observation_window=8, dense_tokens=2)
    cfg.update(config)
    return ids, squeeze(model, ids, SqueezeConfig(**cfg), progress=False)


def left_padded(lengths: list[int], seed: int = 2, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of random rows of the given lengths, left padded."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.full((len(lengths), n), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, length in enumerate(lengths):
        ids[r, n - length:] = torch.randint(3, VOCAB, (length,), generator=g)
        mask[r, n - length:] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def dense_full_rows(model: torch.nn.Module, ctx_ids: torch.Tensor, ids: torch.Tensor,
                    mask: torch.Tensor) -> list[torch.Tensor]:
    """Per row: the dense model's logits for that row's tokens, over [context + row tokens]."""
    out = []
    for r in range(ids.shape[0]):
        row = ids[r, mask[r].bool()]
        full = torch.cat([ctx_ids[0], row])[None]
        out.append(model(full).logits[0, ctx_ids.shape[1]:])
    return out


def real_rows(x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per row: x's entries at the row's real (unpadded) positions."""
    return [x[r, mask[r].bool()] for r in range(x.shape[0])]


# --------------------------------------------------------------------------- selected-keys reference

_REF_IMPL = "sqz_test_selected_keys"
_state = threading.local()


def _selected_keys_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense SDPA over [selected context keys | window | new keys] with one explicit bool mask."""
    ctx: SqueezedContext = _state.ctx
    block_q: int = _state.block_q
    lc = ctx.layer(module.layer_idx)
    b, hq, m, d = query.shape
    h = key.shape[1]
    g = hq // h
    scale = scaling if scaling is not None else d ** -0.5
    sel = selection_mask_reference(query, lc.centroids, lc.offsets, lc.log_threshold, scale, block_q, ctx.budget,
                                   lc.coarse_centroids, lc.coarse_offsets, lc.coarse_log_threshold)  # [B,H,NB,C]
    n = lc.keys.shape[1]
    sizes = (lc.offsets[:, 1:] - lc.offsets[:, :-1]).long()                   # [H, C]
    cid = torch.stack([torch.repeat_interleave(torch.arange(sizes.shape[1]), sizes[hh]) for hh in range(h)])
    nb_of_query = torch.arange(m) // block_q
    vis_ctx = torch.stack([sel[:, hh][:, :, cid[hh]] for hh in range(h)], dim=1)   # [B, H, NB, N]
    vis_ctx = vis_ctx[:, :, nb_of_query]                                     # [B, H, M, N]
    w = lc.window_keys.shape[1]
    s = key.shape[2]
    is_causal = m > 1 and attention_mask is None and getattr(module, "is_causal", True)
    if attention_mask is None:
        new = torch.ones(m, s, dtype=torch.bool).tril() if is_causal else torch.ones(m, s, dtype=torch.bool)
        new = new.expand(b, 1, m, s)
    else:
        new = attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask == 0
        new = new.expand(b, 1, m, s)
    vis = torch.cat([vis_ctx.repeat_interleave(g, dim=1), torch.ones(b, hq, m, w, dtype=torch.bool),
                     new.expand(b, hq, m, s)], dim=-1)
    keys = torch.cat([lc.keys.expand(b, h, n, d), lc.window_keys.expand(b, h, w, d), key], dim=2)
    values = torch.cat([lc.values.expand(b, h, n, d), lc.window_values.expand(b, h, w, d), value], dim=2)
    keys, values = keys.repeat_interleave(g, dim=1), values.repeat_interleave(g, dim=1)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=vis, scale=scale)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _selected_keys_impl(model, ctx: SqueezedContext, block_q: int):
    register_attention(_REF_IMPL, _selected_keys_attention)
    old = model.config._attn_implementation
    _state.ctx, _state.block_q = ctx, block_q
    try:
        set_attn_implementation(model, _REF_IMPL)
        yield
    finally:
        set_attn_implementation(model, old)
        _state.ctx = None


@torch.no_grad()
def selected_keys_reference(model, ctx: SqueezedContext, block_q: int = DEFAULT_BLOCK_Q, **inputs):
    """The model's logits when every attention is dense SDPA over exactly the selected keys."""
    with _selected_keys_impl(model, ctx, block_q):
        return model(**inputs).logits


# --------------------------------------------------------------------------- export plumbing

CONTEXT_TOKENS = 200


def tiny_llama(seed: int = 0):
    """The export tests' model: tiny_model("llama") with room for 1024 positions, no pad token."""
    return tiny_model("llama", "sdpa", 2, 2, seed, max_position_embeddings=1024, pad_token_id=None)


def context_ids(n: int = CONTEXT_TOKENS, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def export_context(model, keep: float = 0.3, **config):
    """Squeeze random context tokens for `model` (10% clusters, a 16-token window by default)."""
    cfg = dict(keep=keep, cluster_ratio=0.1, observation_window=16) | config
    return squeeze(model, context_ids(), SqueezeConfig(**cfg))


def user_ids(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class DirectSqz(torch.nn.Module):
    """A one-layer token model that calls torch.ops.sqz.squeezed_attention itself, with one
    layer of a context as buffers: the export plumbing without the attention rewrite."""

    def __init__(self, ctx, mask: str = "causal", block_q: int = 16, seed: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.mask, self.block_q, self.budget = mask, block_q, ctx.budget
        self.scale = ctx.scaling
        self.hq, self.h, self.d = ctx.window_queries.shape[1], ctx.num_kv_heads, ctx.head_dim
        width = 64
        self.emb = torch.nn.Embedding(VOCAB, width)
        self.q = torch.nn.Linear(width, self.hq * self.d)
        self.kv = torch.nn.Linear(width, 2 * self.h * self.d)
        self.head = torch.nn.Linear(self.hq * self.d, VOCAB)
        for name, t in zip(CONTEXT_ARGS, ctx.layer(0)):
            if t is not None:
                self.register_buffer(name, t.clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        b, m, _ = x.shape
        # Large queries make the lookup selective (the context keys are not tiny-model sized).
        q = 4 * self.q(x).view(b, m, self.hq, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, m, 2 * self.h, self.d).transpose(1, 2).chunk(2, dim=1)
        mask, causal = None, self.mask == "causal"
        if self.mask == "bool":
            mask = torch.ones(m, m, dtype=torch.bool, device=x.device).tril()[None, None].expand(b, 1, m, m)
        elif self.mask == "float":
            allowed = torch.ones(m, m, dtype=torch.bool, device=x.device).tril()
            mask = torch.zeros(m, m, device=x.device).masked_fill(~allowed, float("-inf"))
        ctx = [getattr(self, n, None) for n in CONTEXT_ARGS]
        o = torch.ops.sqz.squeezed_attention(q, k, v, mask, *ctx, self.scale, causal, self.budget, self.block_q)
        return self.head(o.transpose(1, 2).reshape(b, m, self.hq * self.d))


def run_fresh(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter (nothing imported beforehand); raise with its output on
    failure."""
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc


def assert_fresh_ok(code: str, *args: str, timeout: float = 300) -> str:
    proc = run_fresh(code, *args, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def squeezed_eager(model, ctx, block_q: int = 64):
    """The eager squeezed model: the dense export's module with the attention rewrite applied
    (input_ids -> logits), run as a plain GraphModule."""
    from sqz_compile.export.program import LogitsModule
    from sqz_compile.passes import rewrite_attention

    wrapper = LogitsModule(model)
    example = user_ids(2, 4).to(next(model.parameters()).device)
    with torch.no_grad():
        # runtime asserts instead of guards: on CUDA, SDPA's alignment checks add unprovable ones
        gm = torch.export.export(wrapper, (example,), dynamic_shapes=(
            {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=1024)},),
            prefer_deferred_runtime_asserts_over_guards=True).module()
    report = rewrite_attention(gm, ctx, block_q=block_q, model=wrapper)
    assert report.layers == list(range(ctx.num_layers)), str(report)
    return gm


def dense_logits(model, ctx_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits of `ids` with the whole context in front (the unsqueezed model)."""
    full = torch.cat([ctx_ids.expand(ids.shape[0], -1), ids], dim=1)
    with torch.no_grad():
        return model(full).logits[:, -ids.shape[1]:]


def check_always_attended(config: dict, without: dict) -> None:
    """Tokens that `config` makes always attended (sinks, dense tokens): at keep = 1 the squeezed
    model equals dense; at keep = 0 those tokens are still attended, so the logits differ from a
    keep = 0 context squeezed with `without` instead."""
    import sqz_compile

    torch._dynamo.reset()
    model = tiny_model("llama", kv_heads=2, layers=2)
    ctx_ids, ctx = tiny_context(model, length=48, keep=1.0, **config)
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    want = dense_full_rows(model, ctx_ids, ids, torch.ones_like(ids))[0]
    eager = sqz_compile.CompileConfig(inductor=False)
    got = sqz_compile.compile(model, ctx, eager)(ids).logits[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()
    none = sqz_compile.compile(model, ctx.with_keep(0.0), eager)(ids).logits[0]
    _, plain = tiny_context(model, length=48, keep=0.0, **without)
    torch._dynamo.reset()
    other = sqz_compile.compile(model, plain, eager)(ids).logits[0]
    assert not torch.allclose(none, other, atol=1e-4)
