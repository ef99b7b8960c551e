"""Shared pieces for the export / ONNX / package / CLI tests: a tiny random GQA Llama, its squeezed
context, a module calling the sqz op directly, and a fresh-interpreter runner."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from sqz_compile import SqueezeConfig
from sqz_compile.squeeze import squeeze

VOCAB = 128
CONTEXT_TOKENS = 200
CTX_FIELDS = ("keys", "values", "centroids", "offsets", "window_keys", "window_values", "log_threshold",
              "coarse_centroids", "coarse_offsets", "coarse_log_threshold")


def tiny_llama(seed: int = 0):
    """LlamaForCausalLM, 2 layers, hidden 64, 4 query / 2 KV heads, vocab 128, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def context_ids(n: int = CONTEXT_TOKENS, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def tiny_context(model, keep: float = 0.3, **config):
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
        for name, t in zip(CTX_FIELDS, ctx.layer(0)):
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
        ctx = [getattr(self, n, None) for n in CTX_FIELDS]
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
    from sqz_compile.exporting import LogitsModule
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
