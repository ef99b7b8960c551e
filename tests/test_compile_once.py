"""One compilation per model: generate compiles its prefill and decode graphs once, and later
questions, batches of the same kind and other contexts (other document, other length) reuse
them. Counted with Dynamo's graph counter and the backend's one RewriteReport per graph."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

import sqz_compile
from fixtures import dense_full_rows, left_padded, real_rows, selected_keys_reference, tiny_context, tiny_model


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def fresh() -> None:
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("lengths,other", [([5], [9]), ([7, 5, 3], [4, 8])])
def test_generate_compiles_prefill_and_decode_once(cache, lengths, other):
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model, keep=0.3)
    fresh()
    sm = sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(inductor=False))
    ids, am, _ = left_padded(lengths)
    sm.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False, cache_implementation=cache)
    # transformers takes other Python paths for a prompt and for one new token: two graphs, then
    # no recompile for the growing cache in any decode step
    assert graphs() == 2 == len(sm.reports)
    ids, am, _ = left_padded(other, seed=4)
    sm.generate(ids, attention_mask=am, max_new_tokens=9, do_sample=False, cache_implementation=cache)
    assert graphs() == 2, "a second question (other length, other max_new_tokens) compiled again"


def test_inductor_compiles_the_decode_once():
    """Inductor guards on strides: the prefill's cache layout is made the decode's (contiguous),
    so the second decode step does not compile the decode graph again."""
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model, keep=0.3)
    fresh()
    sm = sqz_compile.compile(model, ctx)
    ids, am, _ = left_padded([9, 6])
    sm.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False)
    assert graphs() == 1 == len(sm.reports)  # the decode graph; the prompt ran without Dynamo


@pytest.mark.parametrize("prefill_inductor", [False, True])
def test_inductor_compiles_the_decode_graph_and_the_prompt_graph_on_request(prefill_inductor):
    """By default (CompileConfig.prefill_inductor False) the prompt runs eagerly, without Dynamo (the
    model's forward with the sqz op as its attention function), and only the decode graph is
    compiled; prefill_inductor=True compiles both graphs with Inductor. Either way the tokens are
    those of the rewritten graphs run eagerly."""
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model, keep=0.3)
    ids, am, _ = left_padded([9, 6])
    fresh()
    want = sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(inductor=False)).generate(
        ids, attention_mask=am, max_new_tokens=4, do_sample=False)
    fresh()
    config = sqz_compile.CompileConfig(prefill_inductor=True) if prefill_inductor else sqz_compile.CompileConfig()
    sm = sqz_compile.compile(model, ctx, config)
    got = sm.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False)
    inductor = counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"]
    n = 2 if prefill_inductor else 1
    assert torch.equal(got, want) and graphs() == n == len(sm.reports) and inductor == n
    # a second question compiles nothing and still matches
    ids, am, _ = left_padded([4, 7], seed=3)
    again = sm.generate(ids, attention_mask=am, max_new_tokens=5, do_sample=False)
    want = sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(inductor=False)).generate(
        ids, attention_mask=am, max_new_tokens=5, do_sample=False)
    assert torch.equal(again, want) and len(sm.reports) == n


def test_static_cache_is_reused_at_fixed_addresses():
    """generate(cache_implementation="static") keeps one cache per (batch, length bucket) on the
    model, tagged as unguarded static addresses (CUDA graphs replay in place; tagged inside the
    compiled prefill it would not be), and reuses it: same tokens as a dynamic cache, no recompile."""
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model, keep=0.3)
    fresh()
    sm = sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(inductor=False))
    ids, am, _ = left_padded([9, 6])
    static = sm.generate(ids, attention_mask=am, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(static, sm.generate(ids, attention_mask=am, max_new_tokens=5, do_sample=False))
    (cache,) = model._sqz_static_caches.values()
    layer = cache.layers[0]
    assert all(getattr(layer, n)._dynamo_static_input_type == "unguarded" for n in ("keys", "values", "cumulative_length"))
    keys, n = layer.keys, graphs()
    ids, am, _ = left_padded([7, 11], seed=4)
    sm.generate(ids, attention_mask=am, max_new_tokens=9, do_sample=False, cache_implementation="static")
    assert model._sqz_static_caches[(2, 256)] is cache and cache.layers[0].keys is keys and graphs() == n


_OLD_TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)


@pytest.mark.parametrize("inductor", [False, pytest.param(True, marks=pytest.mark.xfail(
    _OLD_TORCH, strict=True, reason="torch 2.11's Inductor C++ codegen fails the dynamic recompile for the second "
    "context (CppCompileError: 'tmp2' was not declared, in an indirect-index bounds check; H200 image, "
    "2026-12-04); torch 2.13 compiles it"))])
def test_a_second_context_of_another_length_compiles_nothing(inductor):
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model, keep=0.3)
    _, other = tiny_context(model, length=61, keep=0.3, seed=5, observation_window=6)
    assert other.context_length != ctx.context_length and other.num_clusters != ctx.num_clusters
    ids, am, pos = left_padded([7, 5, 3])
    fresh()
    # prefill_inductor: these multi-token forwards are compiled, not run as eager prompts
    config = sqz_compile.CompileConfig(inductor=inductor, block_q=4, prefill_inductor=True)
    first = sqz_compile.compile(model, ctx, config)
    first(ids, attention_mask=am, position_ids=pos)
    assert graphs() == 1
    sm = sqz_compile.compile(model, other, config)
    got = sm(ids, attention_mask=am, position_ids=pos).logits
    assert graphs() == 1, "a second context compiled again"
    # exact for the new context: its clusters and thresholds, not the first one's
    want = selected_keys_reference(model, other, block_q=4, input_ids=ids, attention_mask=am, position_ids=pos)
    for a, b in zip(real_rows(got, am), real_rows(want, am)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    mine = first(ids, attention_mask=am, position_ids=pos).logits  # the first context still works
    assert graphs() == 1 and not torch.allclose(mine, got)


def test_generate_with_a_second_context_equals_dense_generation_over_it():
    model = tiny_model("qwen2", "eager", 4)
    _, ctx = tiny_context(model, keep=1.0)
    other_ids, other = tiny_context(model, length=37, keep=1.0, seed=8)
    ids, am, _ = left_padded([6, 3])
    fresh()
    eager = sqz_compile.CompileConfig(inductor=False)
    sqz_compile.compile(model, ctx, eager).generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False)
    n = graphs()
    sm = sqz_compile.compile(model, other, sqz_compile.CompileConfig(inductor=False))
    out = sm(ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    for a, b in zip(real_rows(out, am), dense_full_rows(model, other_ids, ids, am)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    before = graphs()
    sm.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False)
    assert graphs() == before and before == n + 1  # only the plain forward (no cache) was new


def test_a_context_of_another_structure_compiles_its_own_graphs():
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model, keep=0.3)
    _, budget = tiny_context(model, budget=12)  # fixed-budget selection: another op argument
    ids, am, pos = left_padded([5])
    fresh()
    sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(inductor=False))(ids, attention_mask=am, position_ids=pos)
    sqz_compile.compile(model, budget, sqz_compile.CompileConfig(inductor=False))(ids, attention_mask=am, position_ids=pos)
    assert graphs() == 2


def test_compiled_code_holds_no_context_data():
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model)
    ids, am, pos = left_padded([5])
    fresh()
    sm = sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(inductor=False))
    sm(ids, attention_mask=am, position_ids=pos)
    assert sm.report.layers == [0, 1] and sm.report.buffers == []  # inputs, not graph buffers
    gone = weakref.ref(ctx.keys)
    del sm, ctx
    gc.collect()
    assert gone() is None, "the compiled forward keeps the first context's tensors alive"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode,cache", [(None, None), ("reduce-overhead", "static")])
def test_counts_on_cuda_with_inductor(mode, cache):
    """The same counts on the GPU through Inductor and the Triton kernels (CUDA graphs too):
    generate compiles its graphs once; a second question and a second context compile nothing."""
    model = tiny_model("llama", "sdpa", 2, max_position_embeddings=1024).to("cuda", torch.bfloat16)
    _, ctx = tiny_context(model, length=300, keep=0.3, cluster_ratio=0.05)
    _, other = tiny_context(model, length=411, keep=0.3, cluster_ratio=0.05, seed=5)
    fresh()
    # decode_inductor: under reduce-overhead decode steps otherwise run untraced (test_decode_graphs_cuda.py)
    sm = sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(mode=mode, decode_inductor=True))
    ids, am, _ = (t.cuda() for t in left_padded([9, 6]))
    sm.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False, cache_implementation=cache)
    n = graphs()
    assert n == 1  # the decode graph (prompts run without tracing)
    if mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0, "CUDA graphs skipped the decode"
    ids2, am2, _ = (t.cuda() for t in left_padded([7, 11], seed=4))
    sm.generate(ids2, attention_mask=am2, max_new_tokens=9, do_sample=False, cache_implementation=cache)
    assert graphs() == n, "a second question compiled again"
    sqz_compile.compile(model, other, sqz_compile.CompileConfig(mode=mode, decode_inductor=True)).generate(
        ids2, attention_mask=am2, max_new_tokens=9, do_sample=False, cache_implementation=cache)
    assert graphs() == n, "a second context compiled again"
