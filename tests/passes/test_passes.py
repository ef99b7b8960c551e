"""The FX pass on its own: matchers (every SDPA spelling, the eager pattern), repeat_kv undo,
layer mapping, context buffers, dense fallbacks and errors, on Dynamo and torch.export graphs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sqz_compile import SqueezeConfig
from sqz_compile.backend import copy_graph_module
from sqz_compile.passes import (ContextMismatchError, SqueezeDenseError, SqueezeDenseWarning, find_attention,
                                layer_of_path, rewrite_attention)
from sqz_compile.squeeze import squeeze_kv
from fixtures import dense_full_rows, left_padded, real_rows, tiny_context, tiny_model

B, HQ, H, M, D, L = 2, 4, 2, 5, 16, 40


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def synthetic_context(layers: int = 3, keep: float = 0.5, heads: int = H, dim: int = D, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(layers, heads, L, dim, generator=g)
    values = torch.randn(layers, heads, L, dim, generator=g)
    queries = torch.randn(layers, HQ, 6, dim, generator=g)
    return squeeze_kv(keys, values, queries, dim ** -0.5, SqueezeConfig(keep=keep, cluster_ratio=0.25,
                                                                       observation_window=6), progress=False)


class Spelled(torch.nn.Module):
    """One 'layer' whose attention is written in a given spelling."""

    def __init__(self, spelling: str, training_dropout: float = 0.0):
        super().__init__()
        self.spelling = spelling
        self.p = training_dropout

    def forward(self, q, k, v, mask):
        s = self.spelling
        if s == "positional_mask":
            return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), mask)
        if s == "keyword_causal_scale":
            return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), is_causal=True, scale=0.3)
        if s == "gqa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        if s == "torch_c":
            return torch._C._nn.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), None, 0.0, True)
        kr, vr = repeat_kv(k, 2), repeat_kv(v, 2)
        if s == "eager_div":
            w = torch.matmul(q, kr.transpose(-2, -1)) / math.sqrt(D)
            w = (w + mask).softmax(-1)
        elif s == "eager_mul_cast":
            w = torch.matmul(q, kr.transpose(2, 3)) * 0.2
            w = F.softmax(w + mask, dim=-1, dtype=torch.float32).to(q.dtype)
            w = F.dropout(w, p=self.p, training=self.training)
        elif s == "eager_nomask":
            w = torch.softmax(q @ kr.transpose(2, 3) * 0.25, dim=-1)
        elif s == "softcap":
            w = torch.matmul(q, kr.transpose(2, 3)) * 0.25
            w = torch.tanh(w / 5.0) * 5.0
            w = torch.softmax(w + mask, dim=-1)
        elif s == "weights_reused":
            w = torch.softmax(torch.matmul(q, kr.transpose(2, 3)) * 0.25 + mask, dim=-1)
            return torch.matmul(w, vr), w
        else:
            raise ValueError(s)
        return torch.matmul(w, vr)


class Stack(torch.nn.Module):
    def __init__(self, spellings, **kw):
        super().__init__()
        self.layers = torch.nn.ModuleList(Spelled(s, **kw) for s in spellings)

    def forward(self, q, k, v, mask):
        outs = []
        for layer in self.layers:
            o = layer(q, k, v, mask)
            outs.append(o)
        return tuple(outs)


def inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, M, D, generator=g)
    k = torch.randn(B, H, M, D, generator=g)
    v = torch.randn(B, H, M, D, generator=g)
    pad = torch.ones(B, 1, M, M, dtype=torch.bool).tril()
    pad[0, :, :, :2] = False  # row 0 left-padded by 2
    return q, k, v, pad


def expected(ctx, layer, q, k, v, mask, scale, is_causal, block_q=64):
    lc = ctx.layer(layer)
    return torch.ops.sqz.squeezed_attention(q, k, v, mask, *lc, scale, is_causal, ctx.budget, block_q)


def float_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


class DynamoGraph:
    """The Dynamo graph module of fn(*args) (a copy: Dynamo keeps its own), callable with no
    arguments on the example inputs Dynamo lifted (in its own placeholder order)."""

    def __init__(self, fn, *args):
        got = []

        def capture(gm, example_inputs, **kw):
            got.append((copy_graph_module(gm), list(example_inputs)))
            return gm

        torch._dynamo.reset()
        torch.compile(fn, backend=capture, fullgraph=True)(*args)
        torch._dynamo.reset()
        self.gm, self.inputs = got[0]
        self.graph = self.gm.graph

    def __call__(self):
        with torch.no_grad():
            return self.gm(*self.inputs)


def dynamo_graph(fn, *args) -> DynamoGraph:
    return DynamoGraph(fn, *args)


SDPA_CASES = [("positional_mask", None, False), ("keyword_causal_scale", 0.3, True), ("gqa", None, False),
              ("torch_c", None, True)]
EAGER_CASES = [("eager_div", 1 / math.sqrt(D), False), ("eager_mul_cast", 0.2, False), ("eager_nomask", 0.25, False)]


@pytest.mark.parametrize("level", ["dynamo", "export"])
def test_every_spelling_is_rewritten_and_matches_the_op(level):
    cases = SDPA_CASES + EAGER_CASES
    ctx = synthetic_context(layers=len(cases))
    model = Stack([c[0] for c in cases]).eval()
    q, k, v, mask = inputs()
    fm = float_mask(mask)
    if level == "dynamo":
        dg = dynamo_graph(model, q, k, v, mask)
        gm, run = dg.gm, dg
    else:
        gm = torch.export.export(model, (q, k, v, mask)).module()
        run = lambda: gm(q, k, v, mask)  # noqa: E731
    dense = run()
    report = rewrite_attention(gm, ctx, model=model)
    assert report.layers == list(range(len(cases))), str(report)
    assert not report.dense
    assert "rewritten layers: 0-6" in str(report)
    got = run()
    for i, (spelling, scale, causal) in enumerate(cases):
        m = None if spelling in ("keyword_causal_scale", "torch_c", "eager_nomask") else (
            fm if spelling.startswith("eager") else mask)
        want = expected(ctx, i, q, k, v, m, scale if scale is not None else D ** -0.5, causal)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5, msg=spelling)
        assert not torch.allclose(got[i], dense[i], atol=1e-3), f"{spelling}: context had no effect"


def test_context_tensors_become_buffers_and_survive_reexport():
    ctx = synthetic_context(layers=2)
    model = Stack(["positional_mask", "eager_div"]).eval()
    q, k, v, mask = inputs()
    gm = torch.export.export(model, (q, k, v, mask)).module()
    report = rewrite_attention(gm, ctx, model=model)
    names = dict(gm.named_buffers())
    assert "sqz_L1_keys" in names and set(report.buffers) <= set(names)
    assert names["sqz_L1_keys"].data_ptr() == ctx.layer(1).keys.data_ptr(), "buffers must be views, not copies"
    get_attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert "sqz_L0_centroids" in get_attrs
    ep = torch.export.export(gm, (q, k, v, mask))
    assert any("sqz_L0_keys" in n for n in ep.graph_signature.buffers)
    ops = [n for n in ep.graph.nodes if n.target == torch.ops.sqz.squeezed_attention.default]
    assert len(ops) == 2
    torch.testing.assert_close(ep.module()(q, k, v, mask), gm(q, k, v, mask))


def test_half_precision_context_gets_centroid_buffers_in_its_dtype():
    """The lookup reads every centroid each step: a bf16 model's graph holds them in bf16 (half
    the bytes), one cast copy per context that every graph shares; the context keeps float32 and
    the keys stay views."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, H, L, D, generator=g).bfloat16()
    values = torch.randn(1, H, L, D, generator=g).bfloat16()
    queries = torch.randn(1, HQ, 6, D, generator=g)
    ctx = squeeze_kv(keys, values, queries, D ** -0.5,
                     SqueezeConfig(keep=0.5, cluster_ratio=0.25, observation_window=6), progress=False)
    assert ctx.centroids.dtype == torch.float32
    q, k, v, mask = (t.bfloat16() if t.is_floating_point() else t for t in inputs())
    model = Stack(["gqa"]).eval()
    gm = torch.export.export(model, (q, k, v, mask)).module()
    rewrite_attention(gm, ctx, model=model)
    bufs = dict(gm.named_buffers())
    assert bufs["sqz_L0_centroids"].dtype == torch.bfloat16
    assert bufs["sqz_L0_keys"].data_ptr() == ctx.layer(0).keys.data_ptr()
    assert all(torch.isfinite(o.float()).all() for o in gm(q, k, v, mask))
    again = torch.export.export(model, (q, k, v, mask)).module()  # e.g. the decode graph
    rewrite_attention(again, ctx, model=model)
    assert dict(again.named_buffers())["sqz_L0_centroids"].data_ptr() == bufs["sqz_L0_centroids"].data_ptr()
    assert bufs["sqz_L0_centroids"].data_ptr() == ctx.layer(0, centroid_dtype=torch.bfloat16).centroids.data_ptr()


@pytest.mark.parametrize("spelling,reason", [
    ("softcap", "soft-capping"),
    ("weights_reused", "attention weights are used elsewhere"),
])
def test_unsafe_eager_variants_are_refused_by_default(spelling, reason):
    ctx = synthetic_context(layers=2)
    model = Stack(["eager_div", spelling]).eval()
    q, k, v, mask = inputs()
    dg = dynamo_graph(model, q, k, v, float_mask(mask))
    before = dg.gm.code
    with pytest.raises(SqueezeDenseError, match=f"layer 1: .*{reason}.*CompileConfig\\(strict=False\\)"):
        rewrite_attention(dg.gm, ctx, model=model)
    assert dg.gm.code == before, "a refused rewrite must leave the graph untouched"


@pytest.mark.parametrize("spelling,reason", [
    ("softcap", "soft-capping"),
    ("weights_reused", "attention weights are used elsewhere"),
])
def test_unsafe_eager_variants_stay_dense_with_one_warning_on_opt_out(spelling, reason):
    ctx = synthetic_context(layers=2)
    model = Stack(["eager_div", spelling]).eval()
    q, k, v, mask = inputs()
    dg = dynamo_graph(model, q, k, v, float_mask(mask))
    dense = dg()
    with pytest.warns(SqueezeDenseWarning, match=reason) as rec:
        report = rewrite_attention(dg.gm, ctx, model=model, strict=False)
    assert len([w for w in rec if issubclass(w.category, SqueezeDenseWarning)]) == 1
    assert report.layers == [0] and report.dense[0][0] == 1 and reason in report.dense[0][1]
    torch.testing.assert_close(dg()[1], dense[1])


def test_active_dropout_stays_dense():
    ctx = synthetic_context(layers=1)
    model = Stack(["eager_mul_cast"], training_dropout=0.5).train()
    q, k, v, mask = inputs()
    dg = dynamo_graph(model, q, k, v, float_mask(mask))
    with pytest.raises(SqueezeDenseError, match="dropout is active"):
        rewrite_attention(dg.gm, ctx, model=model)
    with pytest.warns(SqueezeDenseWarning, match="dropout is active"):
        report = rewrite_attention(dg.gm, ctx, model=model, strict=False)
    assert report.rewritten == []
    model.eval()  # dropout inactive: the same spelling is rewritten
    dg = dynamo_graph(model, q, k, v, float_mask(mask))
    assert rewrite_attention(dg.gm, ctx, model=model).layers == [0]


def test_wrong_model_for_context_is_an_error():
    q, k, v, mask = inputs()
    model = Stack(["positional_mask"] * 2).eval()
    gm = torch.export.export(model, (q, k, v, mask)).module()
    with pytest.raises(ContextMismatchError, match="head dim 16, the context 8"):
        rewrite_attention(gm, synthetic_context(layers=2, dim=8))
    with pytest.raises(ContextMismatchError, match="2 key heads .* context has 4 KV heads"):
        rewrite_attention(gm, synthetic_context(layers=2, heads=4))
    with pytest.raises(ContextMismatchError, match="only 1 layers"):
        rewrite_attention(gm, synthetic_context(layers=1))
    ctx = synthetic_context(layers=2)
    half = type(ctx)(**{**ctx.__dict__, "keys": ctx.keys.half(), "values": ctx.values.half(),
                        "window_keys": ctx.window_keys.half(), "window_values": ctx.window_values.half()})
    with pytest.raises(ContextMismatchError, match="float32 but the context keys are torch.float16"):
        rewrite_attention(gm, half)


@pytest.mark.parametrize("path,layer", [
    ("model.layers.7.self_attn", 7),
    ("L['self'].model.layers[7].self_attn", 7),
    ("L['self'].model.layers.12.self_attn", 12),
    ("L__self___model_layers_7_self_attn", 7),
    ("L['self']._modules['model']._modules['layers']._modules['3']._modules['self_attn']", 3),
    ("transformer.h.5.attn", 5),
    ("model.norm", None),
])
def test_layer_index_from_module_path(path, layer):
    assert layer_of_path(path) == layer


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_hf_graphs_match_every_layer_with_real_kv_heads(attn, kv_heads):
    model = tiny_model("llama", attn, kv_heads, layers=3)
    ids, am, pos = left_padded([6, 4])
    gm = dynamo_graph(lambda i, a, p: model(input_ids=i, attention_mask=a, position_ids=p).logits, ids, am, pos)
    found = find_attention(gm.graph)
    assert [m.layer for m in found] == [0, 1, 2]
    assert all(m.kind == attn for m in found)
    assert all(m.dense_reason is None for m in found)
    heads = {m.key.meta["example_value"].shape[1] for m in found}
    assert heads == {kv_heads}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_export_of_hf_model_rewrites_to_dense_truth_at_keep_1(attn):
    model = tiny_model("qwen2", attn, 2)
    ctx_ids, ctx = tiny_context(model, keep=1.0)
    ids, am, pos = left_padded([7, 4, 2])
    kwargs = dict(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False)
    gm = torch.export.export(model, (), kwargs).module()
    report = rewrite_attention(gm, ctx, model=model)
    assert report.layers == [0, 1] and not report.dense
    with torch.no_grad():
        got = gm(**kwargs).logits
    for a, b in zip(real_rows(got, am), dense_full_rows(model, ctx_ids, ids, am)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def hf_graph(model, lengths=(7, 7)):
    ids, am, pos = left_padded(list(lengths))
    return dynamo_graph(lambda i, a, p: model(input_ids=i, attention_mask=a, position_ids=p).logits, ids, am, pos)


def test_sliding_window_is_read_from_the_models_config_not_from_the_graph():
    model = tiny_model("mistral", "sdpa", 2)
    _, ctx = tiny_context(model)
    model.config.sliding_window = 3
    with pytest.raises(SqueezeDenseError, match="layers 0-1: sliding window of 3 tokens"):
        rewrite_attention(hf_graph(model).gm, ctx, model=model)
    model.config.layer_types = ["full_attention", "sliding_attention"]  # per-layer rule
    with pytest.warns(SqueezeDenseWarning, match="layer 1: sliding window of 3 tokens"):
        report = rewrite_attention(hf_graph(model).gm, ctx, model=model, strict=False)
    assert report.layers == [0] and [layer for layer, _ in report.dense] == [1]


@pytest.mark.parametrize("setting,value,reason", [
    ("attn_logit_softcapping", 30.0, "logit soft-capping"),
    ("attention_chunk_size", 4, "chunked attention"),
    ("alibi", True, "ALiBi"),
])
def test_attention_flags_on_the_module_or_config_are_refused(setting, value, reason):
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model)
    setattr(model.model.layers[1].self_attn, setting, value)  # the module's own attribute
    with pytest.raises(SqueezeDenseError, match=f"layer 1: {reason}"):
        rewrite_attention(hf_graph(model).gm, ctx, model=model)
    delattr(model.model.layers[1].self_attn, setting)
    setattr(model.config, setting, value)  # the config's: every layer
    with pytest.raises(SqueezeDenseError, match=f"layers 0-1: {reason}"):
        rewrite_attention(hf_graph(model).gm, ctx, model=model)


def test_without_the_model_nothing_is_proven_so_strict_refuses():
    """No model: the layers' settings (here a sliding window) cannot be read, so the pass does
    not skip the check: strict refuses, the opt-out leaves every layer dense with one warning."""
    model = tiny_model("mistral", "sdpa", 2)
    _, ctx = tiny_context(model)
    model.config.sliding_window = 3
    dg = hf_graph(model)
    with pytest.raises(SqueezeDenseError, match="settings .* cannot be checked: pass model="):
        rewrite_attention(dg.gm, ctx)
    with pytest.warns(SqueezeDenseWarning, match="cannot be checked") as rec:
        report = rewrite_attention(dg.gm, ctx, strict=False)
    assert len([w for w in rec if issubclass(w.category, SqueezeDenseWarning)]) == 1
    assert report.rewritten == [] and len(report.dense) == 2
