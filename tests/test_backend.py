"""The "sqz" torch.compile backend on tiny random-weight Llama / Mistral / Qwen2 models."""
from __future__ import annotations

import pytest
import torch

from sqz_compile import CompileConfig
from sqz_compile.backend import sqz_backend
from sqz_compile.passes import SqueezeDenseWarning
from fixtures import (dense_full_rows, left_padded, real_rows, selected_keys_reference, tiny_context,
                     tiny_model)

LENGTHS = [7, 5, 2]  # batch 3, left padded


def compiled_logits(model, ctx, backend="sqz", **config):
    reports = []
    torch._dynamo.reset()
    opts = {"context": ctx, "config": CompileConfig(**{"inductor": False, **config}), "on_report": reports.append}
    compiled = torch.compile(model, backend=backend, options=opts)
    ids, am, pos = left_padded(LENGTHS)
    with torch.no_grad():
        logits = compiled(input_ids=ids, attention_mask=am, position_ids=pos).logits
    return logits, reports, (ids, am, pos)


def assert_rows_close(got, want, atol=1e-4):
    for r, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=atol, atol=atol, msg=f"row {r}")


@pytest.mark.parametrize("arch,attn,kv_heads", [
    ("llama", "sdpa", 2), ("llama", "sdpa", 4), ("llama", "eager", 2), ("llama", "eager", 4),
    ("mistral", "sdpa", 2), ("mistral", "eager", 4), ("qwen2", "sdpa", 4), ("qwen2", "eager", 2),
])
def test_keep_1_equals_dense_attention_over_the_full_prompt(arch, attn, kv_heads):
    model = tiny_model(arch, attn, kv_heads, layers=3)
    ctx_ids, ctx = tiny_context(model, keep=1.0)
    logits, reports, (ids, am, _) = compiled_logits(model, ctx)
    assert sorted(layer for r in reports for layer in r.rewritten) == [0, 1, 2]
    assert not any(r.dense for r in reports)
    assert_rows_close(real_rows(logits, am), dense_full_rows(model, ctx_ids, ids, am))


@pytest.mark.parametrize("arch,attn,kv_heads,config", [
    ("llama", "sdpa", 2, {}),
    ("qwen2", "eager", 4, {}),
    ("llama", "eager", 2, {"budget": 12}),
    ("mistral", "sdpa", 2, {"hierarchical": True, "coarse_ratio": 0.1}),
])
def test_keep_below_1_equals_dense_attention_over_the_selected_keys(arch, attn, kv_heads, config):
    model = tiny_model(arch, attn, kv_heads)
    ctx_ids, ctx = tiny_context(model, keep=0.3, **config)
    logits, reports, (ids, am, pos) = compiled_logits(model, ctx, block_q=4)
    assert reports[0].layers == [0, 1]
    want = selected_keys_reference(model, ctx, block_q=4, input_ids=ids, attention_mask=am, position_ids=pos)
    assert_rows_close(real_rows(logits, am), real_rows(want, am), atol=1e-5)
    full = dense_full_rows(model, ctx_ids, ids, am)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(real_rows(logits, am), full)), \
        "keep=0.3 selected every key: the test would not see a wrong selection"


def test_backend_passed_as_a_function_and_called_directly():
    model = tiny_model("llama", "sdpa", 2)
    ctx_ids, ctx = tiny_context(model)
    logits, reports, (ids, am, _) = compiled_logits(model, ctx, backend=sqz_backend)
    assert reports[0].layers == [0, 1]
    assert_rows_close(real_rows(logits, am), dense_full_rows(model, ctx_ids, ids, am))


def test_inductor_compiles_the_rewritten_graph():
    model = tiny_model("llama", "sdpa", 2)
    ctx_ids, ctx = tiny_context(model, keep=0.3)
    logits, reports, (ids, am, pos) = compiled_logits(model, ctx, inductor=True, block_q=4)
    assert reports[0].layers == [0, 1]
    want = selected_keys_reference(model, ctx, block_q=4, input_ids=ids, attention_mask=am, position_ids=pos)
    assert_rows_close(real_rows(logits, am), real_rows(want, am), atol=1e-4)


def test_missing_or_wrong_context_is_a_clear_error():
    model = tiny_model("llama", "sdpa", 2)
    ids, am, pos = left_padded([3])
    torch._dynamo.reset()
    with pytest.raises(Exception, match='needs the squeezed context.*options=\\{"context": ctx\\}'):
        torch.compile(model, backend="sqz")(input_ids=ids)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="must be a sqz_compile.SqueezedContext"):
        torch.compile(model, backend="sqz", options={"context": "ctx.safetensors"})(input_ids=ids)
    torch._dynamo.reset()


DENSE_ERROR = r"(?s)SqueezeDenseError.*layers 0-1: {}.*CompileConfig\(strict=False\)"


def sliding_window_model():
    model = tiny_model("mistral", "sdpa", 2)
    _, ctx = tiny_context(model)
    model.config.sliding_window = 16  # longer than the batch: HF drops the mask, only the config shows it
    return model, ctx


def test_sliding_window_model_is_refused_by_default_naming_layers_reason_and_opt_out():
    model, ctx = sliding_window_model()
    with pytest.raises(Exception, match=DENSE_ERROR.format("sliding window of 16 tokens")):
        compiled_logits(model, ctx)
    torch._dynamo.reset()


def test_sliding_window_model_opt_out_stays_dense_with_one_warning():
    model, ctx = sliding_window_model()
    with pytest.warns(SqueezeDenseWarning, match="layers 0-1: sliding window of 16 tokens") as rec:
        logits, reports, (ids, am, pos) = compiled_logits(model, ctx, strict=False)
    assert len([w for w in rec if issubclass(w.category, SqueezeDenseWarning)]) == 1
    assert reports[0].rewritten == [] and [layer for layer, _ in reports[0].dense] == [0, 1]
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    assert_rows_close(real_rows(logits, am), real_rows(plain, am), atol=1e-5)


def test_opt_out_warns_once_per_compiled_model_not_once_per_process():
    """One torch.compile: its prefill and decode graphs warn once together; a second compile of
    the same model and context warns again (it is another compiled model)."""
    model, ctx = sliding_window_model()
    ids, am, _ = left_padded([5, 3])
    for _ in range(2):
        torch._dynamo.reset()
        reports = []
        compiled = torch.compile(model, backend="sqz", options={
            "context": ctx, "config": CompileConfig(inductor=False, strict=False), "on_report": reports.append})
        with pytest.warns(SqueezeDenseWarning) as rec, torch.no_grad():
            compiled(input_ids=ids, attention_mask=am)
            compiled(input_ids=ids[:1, :4], attention_mask=am[:1, :4])  # another shape: another graph
        assert len(reports) >= 2, "the test needs two graphs of one compiled model"
        assert len([w for w in rec if issubclass(w.category, SqueezeDenseWarning)]) == 1
    torch._dynamo.reset()


def test_loose_options_of_the_old_api_still_work_with_a_deprecation_warning():
    model = tiny_model("llama", "sdpa", 2)
    ctx_ids, ctx = tiny_context(model)
    torch._dynamo.reset()
    reports = []
    compiled = torch.compile(model, backend="sqz", options={"context": ctx, "inductor": False, "block_q": 4,
                                                            "on_report": reports.append})
    ids, am, pos = left_padded(LENGTHS)
    with pytest.warns(DeprecationWarning, match=r"\['block_q', 'inductor'\].*CompileConfig"), torch.no_grad():
        logits = compiled(input_ids=ids, attention_mask=am, position_ids=pos).logits
    assert reports[0].layers == [0, 1]
    assert_rows_close(real_rows(logits, am), dense_full_rows(model, ctx_ids, ids, am))
    torch._dynamo.reset()


def test_a_model_the_backend_cannot_find_is_refused_not_unchecked():
    """A function that reaches the model through another object hides it from the backend:
    nothing about its layers' settings can be proven, so strict mode refuses (and names
    options={'model': model})."""
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model)
    ids, am, pos = left_padded(LENGTHS)
    holder = type("Holder", (), {"model": model})()

    def run(i):
        return holder.model(input_ids=i).logits

    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"(?s)SqueezeDenseError.*settings .* cannot be checked.*'model': model"):
        torch.compile(run, backend="sqz", options={"context": ctx, "config": CompileConfig(inductor=False)})(ids)
    torch._dynamo.reset()
    reports = []
    out = torch.compile(run, backend="sqz", options={"context": ctx, "model": model, "on_report": reports.append,
                                                     "config": CompileConfig(inductor=False)})(ids)
    assert reports[0].layers == [0, 1] and out.shape[:2] == ids.shape
    torch._dynamo.reset()


def test_returned_attention_weights_are_refused_by_default_and_stay_dense_on_opt_out():
    model = tiny_model("llama", "eager", 2)
    _, ctx = tiny_context(model)
    ids, am, pos = left_padded(LENGTHS)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sqz", options={"context": ctx, "config": CompileConfig(inductor=False)})
    with pytest.raises(Exception, match=DENSE_ERROR.format("the attention weights are used elsewhere")), torch.no_grad():
        compiled(input_ids=ids, attention_mask=am, position_ids=pos, output_attentions=True)
    torch._dynamo.reset()
    reports = []
    compiled = torch.compile(model, backend="sqz", options={
        "context": ctx, "config": CompileConfig(inductor=False, strict=False), "on_report": reports.append})
    with pytest.warns(SqueezeDenseWarning, match="attention weights are used elsewhere"), torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=am, position_ids=pos, output_attentions=True)
    assert reports[0].rewritten == []
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=am, position_ids=pos, output_attentions=True)
    assert_rows_close(real_rows(out.logits, am), real_rows(plain.logits, am), atol=1e-5)
    torch.testing.assert_close(out.attentions[1], plain.attentions[1])


def test_dropout_in_training_is_refused_by_default_and_stays_dense_on_opt_out():
    model = tiny_model("qwen2", "sdpa", 2, attention_dropout=0.5)
    _, ctx = tiny_context(model)
    model.train()
    with pytest.raises(Exception, match=DENSE_ERROR.format("attention dropout is active")):
        compiled_logits(model, ctx)
    with pytest.warns(SqueezeDenseWarning, match="dropout is active"):
        _, reports, _ = compiled_logits(model, ctx, strict=False)
    assert reports[0].rewritten == [] and len(reports[0].dense) == 2


def test_two_models_with_two_contexts_in_one_process():
    a, b = tiny_model("llama", "sdpa", 2, seed=0), tiny_model("llama", "sdpa", 2, seed=5)
    (ids_a, ctx_a), (ids_b, ctx_b) = tiny_context(a, seed=1), tiny_context(b, seed=7)
    torch._dynamo.reset()
    eager = CompileConfig(inductor=False)
    ca = torch.compile(a, backend="sqz", options={"context": ctx_a, "config": eager})
    cb = torch.compile(b, backend="sqz", options={"context": ctx_b, "config": eager})
    ids, am, pos = left_padded(LENGTHS)
    with torch.no_grad():
        la = ca(input_ids=ids, attention_mask=am, position_ids=pos).logits
        lb = cb(input_ids=ids, attention_mask=am, position_ids=pos).logits
        la2 = ca(input_ids=ids, attention_mask=am, position_ids=pos).logits
    assert_rows_close(real_rows(la, am), dense_full_rows(a, ids_a, ids, am))
    assert_rows_close(real_rows(lb, am), dense_full_rows(b, ids_b, ids, am))
    torch.testing.assert_close(la, la2)


def test_the_rewritten_copy_keeps_what_aot_needs_to_find_static_inputs():
    """AOTAutograd finds a Dynamo graph's static inputs (parameters, the context, a static cache:
    tensors CUDA graphs must neither copy per replay nor refuse to mutate) through the placeholders'
    `_dynamo_source` and the module's `_param_name_to_source`; the pass edits a copy that must keep
    both, and the buffers the rewrite adds need sources of their own."""
    from sqz_compile.backend import _name_new_buffers, copy_graph_module

    seen = {}

    def backend(gm, example_inputs):
        new = copy_graph_module(gm)
        new.register_buffer("sqz_added", torch.zeros(2))
        _name_new_buffers(new)
        seen.update(old=gm, new=new)
        return gm

    class Cache:
        keys = torch.zeros(4, 8)

    lin = torch.nn.Linear(8, 8)
    torch._dynamo.mark_static_address(Cache.keys, guard=False)
    torch.compile(lambda x, cache: lin(x) + cache.keys.sum(), backend=backend, fullgraph=True)(torch.ones(1, 8), Cache)
    old = [n for n in seen["old"].graph.nodes if n.op == "placeholder"]
    new = [n for n in seen["new"].graph.nodes if n.op == "placeholder"]
    assert [n._dynamo_source for n in new] == [n._dynamo_source for n in old] and new
    names = [n for n, _ in [*seen["new"].named_parameters(), *seen["new"].named_buffers()]]
    assert "sqz_added" in names and set(names) <= set(seen["new"]._param_name_to_source)
