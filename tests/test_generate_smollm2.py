"""SmolLM2-135M-Instruct over a ~2K-token Paul Graham essay context with a needle (CPU, slow).

keep = 1 must reproduce dense greedy generation over [context + question] token for token;
keep = 1/8 must still find the needle. The rewritten graph runs eagerly (inductor=False): Inductor
on a 30-layer model costs minutes on a 2-core CPU, and the tiny-model tests cover Inductor.

Found while writing this test: with the default 5% clusters (~20 keys each) SmolLM2 misses the
needle at keep = 1/8 (also with per-layer thresholds, keep = 1/4 and a fixed budget of N/8): the
question's queries keep far fewer keys than the observation window they were calibrated on, and no
centroid of a 20-key cluster singles out the needle's digits. With 25% clusters (~4 keys each) the
global threshold for keep = 1/8 finds it, so the test squeezes with cluster_ratio=0.25.
"""
from __future__ import annotations

import pytest
import torch

from sqz_compile import CompileConfig, SqueezeConfig
from sqz_compile.squeezed_model import compile

pytestmark = pytest.mark.slow

NEEDLE = " The secret code of the blue door is 7294. "
QUESTION = "\n\nWhat is the secret code of the blue door?"
LEAD = "The secret code of the blue door is"  # the start of the answer (RULER-style), for keep < 1
ANSWER = "7294"
NEW = 16


@pytest.fixture(scope="module")
def setup():
    """(model, tokenizer, context ids, question ids, dense new tokens, keep-1 context)."""
    assets = pytest.importorskip("sqz_compile.assets")
    from sqz_compile.squeeze import squeeze

    try:
        model, tok = assets.load_smollm2()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"real model not installed: {e}")
    essay = assets.essay_tokens(tok, 2000)[0]
    half = essay.shape[0] // 2
    chat = tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False, add_generation_prompt=True)
    head, tail = chat.split("\x00")
    # the context is the chat header + essay with the needle in the middle; the user's tokens are
    # the question and the end of the chat turn
    ctx_ids = torch.cat([torch.tensor(tok.encode(head, add_special_tokens=False)), essay[:half],
                         torch.tensor(tok.encode(NEEDLE, add_special_tokens=False)), essay[half:]])[None]
    question = torch.tensor(tok.encode(QUESTION + tail, add_special_tokens=False))[None]
    full = torch.cat([ctx_ids, question], dim=1)
    with torch.no_grad():
        dense = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=NEW,
                               do_sample=False)[0, full.shape[1]:]
    assert ANSWER in tok.decode(dense), f"the dense model misses the needle: {tok.decode(dense)!r}"
    ctx = squeeze(model, ctx_ids, SqueezeConfig(keep=1.0, cluster_ratio=0.25), progress=False)
    return model, tok, ctx_ids, question, dense, ctx


def _generate(model, ctx, question):
    torch._dynamo.reset()
    sm = compile(model, ctx, CompileConfig(inductor=False))
    out = sm.generate(question, attention_mask=torch.ones_like(question), max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out[:, :question.shape[1]], question)
    layers = model.config.num_hidden_layers
    assert sm.report.layers == list(range(layers)) and not sm.report.dense, str(sm.report)
    assert "forward" not in model.__dict__
    return out[0, question.shape[1]:]


def test_keep_1_reproduces_dense_greedy_generation(setup):
    model, tok, ctx_ids, question, dense, ctx = setup
    assert ctx.context_length == ctx_ids.shape[1] > 1900
    got = _generate(model, ctx, question)
    assert got.tolist() == dense.tolist(), f"{tok.decode(got)!r} != {tok.decode(dense)!r}"


def test_keep_one_eighth_finds_the_needle(setup):
    model, tok, _, question, _, ctx = setup
    primed = torch.cat([question, torch.tensor(tok.encode(LEAD, add_special_tokens=False))[None]], dim=1)
    got = _generate(model, ctx.with_keep(1 / 8), primed)
    assert ANSWER in tok.decode(got), tok.decode(got)
