"""SqueezedModel (sqz_compile.squeezed_model.compile): forward and transformers generate over the user's tokens."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from sqz_compile import CompileConfig
from sqz_compile.context import SqueezedContextError
from sqz_compile.passes import SqueezeDenseError, SqueezeDenseWarning
from sqz_compile.squeezed_model import SqueezedModel, compile
from fixtures import (_selected_keys_impl, dense_full_rows, left_padded, real_rows, tiny_context,
                     tiny_model)

NEW = 6
EAGER = CompileConfig(inductor=False)  # the rewritten graph runs eagerly: no minutes of CPU compile


def dense_generate_rows(model, ctx_ids, ids, mask, **kw):
    """Per row: the new tokens dense generation makes from [context + row tokens]."""
    out = []
    for r in range(ids.shape[0]):
        full = torch.cat([ctx_ids[0], ids[r, mask[r].bool()]])[None]
        if kw.get("do_sample"):
            torch.manual_seed(123)
        out.append(model.generate(full, max_new_tokens=NEW, **kw)[0, full.shape[1]:])
    return out


def assert_model_untouched(model):
    assert "forward" not in model.__dict__, "SqueezedModel left its compiled forward on the model"


@pytest.mark.parametrize("arch,attn,kv_heads,cache", [
    ("llama", "sdpa", 2, None),
    ("llama", "sdpa", 2, "static"),
    ("qwen2", "eager", 4, None),
    ("mistral", "eager", 2, "static"),
])
def test_greedy_generate_at_keep_1_equals_dense_generation(arch, attn, kv_heads, cache):
    model = tiny_model(arch, attn, kv_heads)
    ctx_ids, ctx = tiny_context(model, keep=1.0)
    torch._dynamo.reset()
    sm = compile(model, ctx, EAGER)
    ids, am, _ = left_padded([7, 5, 3])
    out = sm.generate(ids, attention_mask=am, max_new_tokens=NEW, do_sample=False, cache_implementation=cache)
    assert out.shape == (3, ids.shape[1] + NEW)
    assert torch.equal(out[:, :ids.shape[1]], ids), "generate must return the user's prompt + new tokens"
    want = dense_generate_rows(model, ctx_ids, ids, am, do_sample=False, cache_implementation=cache)
    for r in range(3):
        assert out[r, ids.shape[1]:].tolist() == want[r].tolist(), f"row {r}"
    assert sm.report.layers == [0, 1] and not sm.report.dense
    assert_model_untouched(model)


def test_sampling_equals_dense_sampling_with_the_same_seed():
    model = tiny_model("llama", "sdpa", 2)
    ctx_ids, ctx = tiny_context(model, keep=1.0)
    torch._dynamo.reset()
    sm = compile(model, ctx, EAGER)
    ids, am, _ = left_padded([6])
    torch.manual_seed(123)
    out = sm.generate(ids, attention_mask=am, max_new_tokens=NEW, do_sample=True, temperature=1.5, top_k=0)
    want = dense_generate_rows(model, ctx_ids, ids, am, do_sample=True, temperature=1.5, top_k=0)
    assert out[0, ids.shape[1]:].tolist() == want[0].tolist()


def test_greedy_generate_below_keep_1_equals_the_selected_keys_reference():
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model, keep=0.3)
    torch._dynamo.reset()
    sm = compile(model, ctx, CompileConfig(inductor=False, block_q=4))
    ids, am, _ = left_padded([7, 5, 3])
    out = sm.generate(ids, attention_mask=am, max_new_tokens=NEW, do_sample=False)
    with _selected_keys_impl(model, ctx, 4):
        want = model.generate(ids, attention_mask=am, max_new_tokens=NEW, do_sample=False)
    assert out.tolist() == want.tolist()


def test_forward_returns_the_models_output_for_the_user_tokens():
    model = tiny_model("qwen2", "sdpa", 2)
    ctx_ids, ctx = tiny_context(model, keep=1.0)
    torch._dynamo.reset()
    sm = compile(model, ctx, EAGER)
    ids, am, pos = left_padded([7, 4])
    out = sm(ids, attention_mask=am, position_ids=pos)
    assert out.logits.shape == (2, ids.shape[1], model.config.vocab_size)
    for a, b in zip(real_rows(out.logits, am), dense_full_rows(model, ctx_ids, ids, am)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert sm.config is model.config and "SqueezedModel(Qwen2ForCausalLM" in repr(sm)
    assert_model_untouched(model)


def test_inductor_generate_with_static_cache():
    model = tiny_model("llama", "sdpa", 2)
    ctx_ids, ctx = tiny_context(model, keep=1.0)
    torch._dynamo.reset()
    sm = compile(model, ctx)
    ids, am, _ = left_padded([6, 4])
    out = sm.generate(ids, attention_mask=am, max_new_tokens=NEW, do_sample=False, cache_implementation="static")
    want = dense_generate_rows(model, ctx_ids, ids, am, do_sample=False, cache_implementation="static")
    for r in range(2):
        assert out[r, ids.shape[1]:].tolist() == want[r].tolist()
    assert sm.report.layers == [0, 1]


def test_up_front_checks():
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model, keep=1.0)
    other = tiny_model("llama", "sdpa", 2, seed=9)
    with pytest.raises(SqueezedContextError, match="made for another model.*weights_digest"):
        compile(other, ctx)
    with pytest.raises(SqueezedContextError, match="dtype"):
        compile(tiny_model("llama", "sdpa", 2).to(torch.bfloat16), ctx)
    with pytest.raises(TypeError, match="SqueezedContext"):
        compile(model, "ctx.safetensors")
    sm = compile(model, ctx, EAGER)
    ids, am, _ = left_padded([7])
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        sm.generate(ids, attention_mask=am, max_new_tokens=250)
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        sm(torch.zeros(1, 220, dtype=torch.long))
    assert_model_untouched(model)


def test_model_is_restored_after_a_failing_call():
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model, keep=1.0)
    torch._dynamo.reset()
    sm = SqueezedModel(model, ctx, EAGER)
    ids, am, _ = left_padded([4])
    with pytest.raises(Exception):
        sm.generate(ids, attention_mask=am, max_new_tokens=2, not_a_generate_argument=1)
    assert_model_untouched(model)
    plain = model(ids).logits  # the model still runs dense, without the context
    with torch.no_grad():
        assert not torch.allclose(sm(ids).logits, plain, atol=1e-4)


# --------------------------------------------------------------------------- strict by default

def sliding_window_model():
    model = tiny_model("mistral", "sdpa", 2)
    _, ctx = tiny_context(model, keep=1.0)
    model.config.sliding_window = 16  # after squeezing: squeeze itself refuses a sliding window
    return model, ctx


def test_compile_refuses_a_layer_it_cannot_rewrite_up_front():
    model, ctx = sliding_window_model()
    with pytest.raises(SqueezeDenseError, match=r"layers 0-1: sliding window of 16 tokens.*"
                                                r"CompileConfig\(strict=False\)"):
        compile(model, ctx, EAGER)
    assert_model_untouched(model)


def test_compile_opt_out_warns_once_per_model_over_prefill_and_decode():
    model, ctx = sliding_window_model()
    torch._dynamo.reset()
    sm = compile(model, ctx, CompileConfig(inductor=False, strict=False))
    ids, am, _ = left_padded([6, 4])
    with pytest.warns(SqueezeDenseWarning, match="layers 0-1: sliding window") as rec:
        out = sm.generate(ids, attention_mask=am, max_new_tokens=3, do_sample=False)
        sm(ids, attention_mask=am)
    assert len([w for w in rec if issubclass(w.category, SqueezeDenseWarning)]) == 1
    assert len(sm.reports) >= 2 and sm.report.rewritten == []
    with torch.no_grad():  # dense layers: the model without the context
        assert out.tolist() == model.generate(ids, attention_mask=am, max_new_tokens=3, do_sample=False).tolist()


def test_a_layer_refused_inside_the_graph_raises_the_plain_error_not_dynamos_wrapper():
    """Returned attention weights are only visible in the graph: the backend refuses them while
    Dynamo compiles, and SqueezedModel raises the SqueezeDenseError itself."""
    model = tiny_model("llama", "eager", 2)
    _, ctx = tiny_context(model, keep=1.0)
    torch._dynamo.reset()
    sm = compile(model, ctx, EAGER)
    ids, am, _ = left_padded([5])
    with pytest.raises(SqueezeDenseError, match="layers 0-1: the attention weights are used elsewhere"):
        sm(ids, attention_mask=am, output_attentions=True)
    assert_model_untouched(model)


def test_a_context_on_another_device_is_refused_not_moved():
    """'meta' stands in for another device on a CPU-only machine."""
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model, keep=1.0)
    with pytest.raises(SqueezedContextError, match=r"runs on cpu but the context is on meta.*ctx = ctx.to\('cpu'\)"):
        compile(model, ctx.to("meta"), EAGER)


class NoAttention(torch.nn.Module):
    """An attention module that attends to nothing: the graph has no attention for its layer."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


def test_a_layer_without_any_attention_in_the_graph_is_refused_before_the_output_is_returned():
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model, keep=1.0)
    model.model.layers[1].self_attn = NoAttention()
    ids, am, _ = left_padded([5])
    torch._dynamo.reset()
    with pytest.raises(SqueezeDenseError, match="layer 1: no attention found in this layer"):
        compile(model, ctx, EAGER)(ids, attention_mask=am)
    assert_model_untouched(model)
    torch._dynamo.reset()
    sm = compile(model, ctx, CompileConfig(inductor=False, strict=False))
    with pytest.warns(SqueezeDenseWarning, match="layer 1: no attention found") as rec:
        sm(ids, attention_mask=am)
        sm(ids, attention_mask=am)
    assert len([w for w in rec if issubclass(w.category, SqueezeDenseWarning)]) == 1


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen2", "eager")])
def test_prompt_runs_without_dynamo_and_equals_the_rewritten_graph(arch, attn):
    """The default (inductor, prefill_inductor False): a prompt runs through the model's own forward
    with the sqz op as its attention function, no graph traced; its logits are the rewritten
    graph's (run eagerly), and the model is left as it was."""
    model = tiny_model(arch, attn, 2)
    _, ctx = tiny_context(model, keep=0.4)
    ids, am, pos = left_padded([7, 4])
    want = compile(model, ctx, EAGER)(ids, attention_mask=am, position_ids=pos).logits
    torch._dynamo.reset()
    counters.clear()
    sm = compile(model, ctx)
    got = sm(ids, attention_mask=am, position_ids=pos).logits
    assert counters["stats"]["unique_graphs"] == 0 and sm.reports == []
    for a, b in zip(real_rows(got, am), real_rows(want, am)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert_model_untouched(model)
    assert model.config._attn_implementation == attn


@pytest.mark.parametrize("arch,attn,cache", [("llama", "sdpa", None), ("llama", "sdpa", "static"),
                                             ("qwen2", "eager", "static")])
def test_decode_inductor_false_generates_without_dynamo_the_tokens_of_the_rewritten_graph(arch, attn, cache):
    """CompileConfig(decode_inductor=False): prompt and decode steps both untraced (no graph at
    all; mode="reduce-overhead" on the CPU has no CUDA graph to capture, so its steps run eagerly),
    with the greedy tokens of the rewritten graph run eagerly, over left-padded rows."""
    model = tiny_model(arch, attn, 2)
    _, ctx = tiny_context(model, keep=0.4)
    ids, am, _ = left_padded([7, 4])
    want = compile(model, ctx, EAGER).generate(ids, attention_mask=am, max_new_tokens=NEW, do_sample=False,
                                               cache_implementation=cache)
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        counters.clear()
        sm = compile(model, ctx, CompileConfig(decode_inductor=False, mode=mode))
        got = sm.generate(ids, attention_mask=am, max_new_tokens=NEW, do_sample=False, cache_implementation=cache)
        assert counters["stats"]["unique_graphs"] == 0 and sm.reports == []
        assert got.tolist() == want.tolist(), mode
        assert_model_untouched(model)
        assert model.config._attn_implementation == attn


def test_decode_inductor_defaults_to_untraced_steps_under_reduce_overhead_only():
    assert CompileConfig().decode_graph and CompileConfig(mode="max-autotune").decode_graph
    assert not CompileConfig(mode="reduce-overhead").decode_graph
    assert CompileConfig(mode="reduce-overhead", decode_inductor=True).decode_graph
    assert not CompileConfig(decode_inductor=False).decode_graph
    with pytest.raises(ValueError, match="decode_inductor='yes'"):
        CompileConfig(decode_inductor="yes")


def test_eager_prompt_refuses_a_layer_that_attends_without_the_context():
    """A layer whose attention does not go through the attention function would ignore the context
    in the eager prompt: strict refuses it after the call, before the output is returned; the
    opt-out warns once."""
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model, keep=1.0)
    model.model.layers[1].self_attn = NoAttention()
    ids, am, _ = left_padded([5])
    with pytest.raises(SqueezeDenseError, match="layer 1: no attention found"):
        compile(model, ctx)(ids, attention_mask=am)
    assert_model_untouched(model)
    sm = compile(model, ctx, CompileConfig(strict=False))
    with pytest.warns(SqueezeDenseWarning, match="layer 1: no attention found") as rec:
        sm(ids, attention_mask=am)
        sm(ids, attention_mask=am)
    assert len([w for w in rec if issubclass(w.category, SqueezeDenseWarning)]) == 1


def test_layers_the_config_keeps_dense_take_the_graph_for_prompts_too():
    """strict=False with a sliding-window model: those layers need the rewritten graph's dense path
    (the attention function knows no sliding window), so prompts are traced as before."""
    model, ctx = sliding_window_model()
    torch._dynamo.reset()
    counters.clear()
    sm = compile(model, ctx, CompileConfig(strict=False))
    ids, am, _ = left_padded([6, 4])
    with pytest.warns(SqueezeDenseWarning, match="layers 0-1: sliding window"):
        out = sm(ids, attention_mask=am).logits
    assert counters["stats"]["unique_graphs"] == 1 and sm.report.rewritten == []
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids, attention_mask=am).logits, rtol=1e-5, atol=1e-5)


def test_loose_keyword_arguments_of_the_old_api_warn_and_still_work():
    model = tiny_model("llama", "sdpa", 2)
    _, ctx = tiny_context(model, keep=1.0)
    with pytest.warns(DeprecationWarning, match=r"\['block_q', 'inductor'\].*CompileConfig"):
        sm = compile(model, ctx, inductor=False, block_q=4)
    assert sm.compile_config == CompileConfig(inductor=False, block_q=4)
