"""Decode steps without Dynamo on CUDA (CompileConfig(decode_inductor=False, mode="reduce-overhead"),
sqz_compile/decode_graphs.py): captured once per step shape over a static cache, checked against
the eager step, replayed question after question, with the tokens of the Inductor-compiled path."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fixtures import left_padded, tiny_context, tiny_model
from sqz_compile import CompileConfig
from sqz_compile.squeezed_model import compile

pytestmark = pytest.mark.gpu


def cuda_case(dtype):
    model = tiny_model("llama", kv_heads=2, layers=2, max_position_embeddings=1024).to("cuda", dtype)
    _, ctx = tiny_context(model, length=300, keep=0.3, cluster_ratio=0.05)
    return model, ctx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_decode_equals_the_compiled_decode_and_captures_once(dtype):
    model, ctx = cuda_case(dtype)
    ids, am, _ = left_padded([9, 5])
    ids, am = ids.cuda(), am.cuda()
    gen = dict(attention_mask=am, max_new_tokens=12, do_sample=False, cache_implementation="static")
    torch._dynamo.reset()
    want = compile(model, ctx, CompileConfig(mode="reduce-overhead", decode_inductor=True)).generate(ids, **gen)
    torch._dynamo.reset()
    counters.clear()
    sm = compile(model, ctx, CompileConfig(mode="reduce-overhead"))  # decode_inductor None: untraced
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no failed capture, no failed check
        first = sm.generate(ids, **gen)
        again = sm.generate(ids, **gen)  # the same reusable static cache: the graph replays
    assert counters["stats"]["unique_graphs"] == 0 and sm.reports == []
    assert sm._steps.captured == 1, "one decode graph for one batch size and cache"
    (entry,) = [e for e in sm._steps.graphs.values() if not isinstance(e, str)]
    assert entry.checked
    assert first.tolist() == again.tolist()
    agree = (first[:, ids.shape[1]:] == want[:, ids.shape[1]:]).float().mean().item()
    # float32: the same tokens; bf16: the compiled path rounds differently, so allow a late divergence
    assert agree == 1.0 if dtype == torch.float32 else agree >= 0.75, (first, want)


def test_a_graph_that_disagrees_with_the_eager_step_is_dropped_with_a_warning(monkeypatch):
    """A forward that bakes a per-step value into the graph is caught by the check on the third
    step: the graph is dropped, a RuntimeWarning says so, and the answer is the eager one."""
    model, ctx = cuda_case(torch.float32)
    ids, am, _ = left_padded([6])
    ids, am = ids.cuda(), am.cuda()
    gen = dict(attention_mask=am, max_new_tokens=6, do_sample=False, cache_implementation="static")
    want = compile(model, ctx, CompileConfig(decode_inductor=False)).generate(ids, **gen)
    sm = compile(model, ctx, CompileConfig(mode="reduce-overhead", decode_inductor=False))
    calls = []
    run = sm._steps.run

    def baking(*args, **kwargs):  # adds a host-side value that changes each call: a graph would freeze it
        calls.append(1)
        out = run(*args, **kwargs)
        out.logits.add_(float(len(calls)))
        return out

    sm._steps.run = baking
    with pytest.warns(RuntimeWarning, match="differs from the same step run eagerly"):
        got = sm.generate(ids, **gen)
    sm._steps.run = run
    assert sm._steps.captured == 1 and all(e == "eager" for e in sm._steps.graphs.values())
    # every step's argmax is unchanged by the constant shift, so the tokens are the eager ones
    assert got.tolist() == want.tolist()


def test_generate_under_reduce_overhead_takes_a_static_cache_by_default():
    """No cache asked for: generate uses a static cache, so the decode graph is captured and
    replayed (a dynamic cache would run every step eagerly); an explicit dynamic cache is obeyed."""
    model, ctx = cuda_case(torch.float32)
    ids, am, _ = left_padded([6, 3])
    ids, am = ids.cuda(), am.cuda()
    want = compile(model, ctx, CompileConfig(decode_inductor=False)).generate(ids, attention_mask=am, max_new_tokens=6,
                                                                               do_sample=False)
    sm = compile(model, ctx, CompileConfig(mode="reduce-overhead"))
    assert sm.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False).tolist() == want.tolist()
    assert sm._steps.captured == 1
    from transformers import DynamicCache

    from sqz_compile.transformers_compat import cache_kwargs

    sm2 = compile(model, ctx, CompileConfig(mode="reduce-overhead"))
    with pytest.warns(RuntimeWarning, match="decode steps over DynamicCache run eagerly, without CUDA graphs"):
        got = sm2.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False,
                           **cache_kwargs(model, DynamicCache(config=model.config)))
    assert got.tolist() == want.tolist() and sm2._steps.captured == 0
