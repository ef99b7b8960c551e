"""The "sqz" torch.compile backend on tiny random-weight Llama / Mistral / Qwen2 models."""
from __future__ import annotations

import pytest
import torch

from sqz_compile.backend import sqz_backend
from sqz_compile.passes import SqueezeDenseWarning
from fixtures import (dense_full_rows, left_padded, real_rows, selected_keys_reference, tiny_context,
                     tiny_model)

LENGTHS = [7, 5, 2]  # batch 3, left padded


def compiled_logits(model, ctx, backend="sqz", **options):
    reports = []
    torch._dynamo.reset()
    opts = {"context": ctx, "inductor": False, "on_report": reports.append, **options}
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


def test_sliding_window_model_stays_dense_with_one_warning():
    model = tiny_model("mistral", "sdpa", 2)
    _, ctx = tiny_context(model)
    model.config.sliding_window = 16  # longer than the batch: HF drops the mask, only the config shows it
    with pytest.warns(SqueezeDenseWarning, match="layer 0: sliding window of 16 tokens") as rec:
        logits, reports, (ids, am, pos) = compiled_logits(model, ctx)
    assert len([w for w in rec if issubclass(w.category, SqueezeDenseWarning)]) == 1
    assert reports[0].rewritten == [] and [layer for layer, _ in reports[0].dense] == [0, 1]
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    assert_rows_close(real_rows(logits, am), real_rows(plain, am), atol=1e-5)


def test_returned_attention_weights_stay_dense():
    model = tiny_model("llama", "eager", 2)
    _, ctx = tiny_context(model)
    torch._dynamo.reset()
    reports = []
    compiled = torch.compile(model, backend="sqz", options={"context": ctx, "inductor": False,
                                                            "on_report": reports.append})
    ids, am, pos = left_padded(LENGTHS)
    with pytest.warns(SqueezeDenseWarning, match="attention weights are used elsewhere"), torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=am, position_ids=pos, output_attentions=True)
    assert reports[0].rewritten == []
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=am, position_ids=pos, output_attentions=True)
    assert_rows_close(real_rows(out.logits, am), real_rows(plain.logits, am), atol=1e-5)
    torch.testing.assert_close(out.attentions[1], plain.attentions[1])


def test_dropout_in_training_stays_dense():
    model = tiny_model("qwen2", "sdpa", 2, attention_dropout=0.5)
    _, ctx = tiny_context(model)
    model.train()
    with pytest.warns(SqueezeDenseWarning, match="dropout is active"):
        _, reports, _ = compiled_logits(model, ctx)
    assert reports[0].rewritten == [] and len(reports[0].dense) == 2


def test_two_models_with_two_contexts_in_one_process():
    a, b = tiny_model("llama", "sdpa", 2, seed=0), tiny_model("llama", "sdpa", 2, seed=5)
    (ids_a, ctx_a), (ids_b, ctx_b) = tiny_context(a, seed=1), tiny_context(b, seed=7)
    torch._dynamo.reset()
    ca = torch.compile(a, backend="sqz", options={"context": ctx_a, "inductor": False})
    cb = torch.compile(b, backend="sqz", options={"context": ctx_b, "inductor": False})
    ids, am, pos = left_padded(LENGTHS)
    with torch.no_grad():
        la = ca(input_ids=ids, attention_mask=am, position_ids=pos).logits
        lb = cb(input_ids=ids, attention_mask=am, position_ids=pos).logits
        la2 = ca(input_ids=ids, attention_mask=am, position_ids=pos).logits
    assert_rows_close(real_rows(la, am), dense_full_rows(a, ids_a, ids, am))
    assert_rows_close(real_rows(lb, am), dense_full_rows(b, ids_b, ids, am))
    torch.testing.assert_close(la, la2)
