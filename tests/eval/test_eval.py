"""sqz_compile.eval (and the attention function): oracle selection, recall, the dense baseline and the harness end to end
(tiny random models; the harness test also uses the real SmolLM2 tokenizer for chat templates)."""
import json
import math

import pytest
import torch

from fixtures import tiny_context, tiny_model
from sqz_compile import attention_function as af
from sqz_compile.eval import needles, oracle, report, runs
from sqz_compile.kernels.lookup.reference import block_max


def test_top_count_mask_picks_exactly_the_top_keys():
    score = torch.tensor([[[0.1, 0.9, 0.3, 0.7, 0.5],
                           [0.5, 0.4, 0.3, 0.2, 0.1]]])
    counts = torch.tensor([[2, 0]])
    mask = oracle.top_count_mask(score, counts)
    assert mask.tolist() == [[[False, True, False, True, False], [False] * 5]]
    mask = oracle.top_count_mask(score, torch.tensor([[3, 5]]))
    assert mask.tolist() == [[[False, True, False, True, True], [True] * 5]]


def _user_ids(n: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_dense_cache_matches_the_model_over_the_full_prompt():
    model = tiny_model()
    ctx_ids, ctx = tiny_context(model, length=48)
    user = _user_ids(10)
    with torch.no_grad():
        full = model(torch.cat([ctx_ids, user], 1)).logits[0, -10:]
    via_cache = runs.user_logits(model, user, runs.dense_cache(model, runs.context_kv(ctx)))[0]
    torch.testing.assert_close(via_cache, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hierarchical", [False, True])
def test_keep_one_recall_is_one_and_matches_dense(hierarchical):
    model = tiny_model()
    ctx_ids, ctx = tiny_context(model, length=64, keep=1.0, hierarchical=hierarchical, coarse_ratio=0.1)
    user = _user_ids(20)
    dense = runs.user_logits(model, user, runs.dense_cache(model, runs.context_kv(ctx)))[0]
    stats = oracle.LayerStats(ctx.num_layers)
    with af.squeezed_mode(model, ctx, block_q=8, stats=stats):
        sq = runs.user_logits(model, user)[0]
    with af.squeezed_mode(model, ctx, oracle=True, block_q=8):
        orc = runs.user_logits(model, user)[0]
    torch.testing.assert_close(sq, dense, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(orc, dense, atol=1e-4, rtol=1e-4)
    m = oracle.LayerStats.metrics(stats.to_json())
    for name in ("mass_recall", "key_recall", "kept_fraction"):
        assert m[name] == pytest.approx([1.0] * ctx.num_layers), name
    assert m["lost_mass_lookup"] == pytest.approx([0.0] * ctx.num_layers, abs=1e-6)


def test_oracle_keeps_the_lookups_count_and_beats_it_on_its_own_score():
    model = tiny_model()
    _, base = tiny_context(model, length=96, cluster_ratio=0.2)
    user = _user_ids(12)
    for v in (runs.Variant(0.25, "flat", "threshold"), runs.Variant(0.25, "flat", "budget")):
        ctx = runs.variant_context(base, v)
        seen = []

        def spy(module, query, key, value, attention_mask, **kw):
            a = oracle.analyse_selection(query, key, attention_mask, query.shape[2] > 1 and attention_mask is None,
                                     ctx, module.layer_idx, kw["scaling"], 4)
            seen.append(a)
            return original(module, query, key, value, attention_mask, **kw)

        original = af._eval_attention
        from transformers import AttentionInterface
        try:
            with af.squeezed_mode(model, ctx, block_q=4):
                AttentionInterface.register(af.EVAL_IMPL, spy)  # squeezed_mode registered the original
                runs.user_logits(model, user)
        finally:
            AttentionInterface.register(af.EVAL_IMPL, original)
        assert len(seen) == ctx.num_layers
        for a in seen:
            assert torch.equal(a.lookup.sum(-1), a.oracle.sum(-1))
            assert 0 < int(a.lookup.sum()) < a.lookup.numel()
            score = block_max(a.p_ctx, 4)
            # the oracle maximises the summed block score among selections of the same size
            assert bool(((score * a.oracle).sum(-1) >= (score * a.lookup).sum(-1) - 1e-6).all())
        if v.mode == "budget":
            assert int(seen[0].lookup.sum(-1).max()) <= ctx.budget


def test_with_budget_and_flat_view():
    model = tiny_model()
    _, base = tiny_context(model, length=64, hierarchical=True, coarse_ratio=0.1)
    ctx = runs.variant_context(base, runs.Variant(0.5, "flat", "budget"))
    assert not ctx.hierarchical and ctx.budget == round(0.5 * base.keys.shape[2])
    assert runs.variant_context(base, runs.Variant(0.5, "hier", "threshold")).hierarchical
    with pytest.raises(ValueError, match="budget"):
        runs.with_budget(base, 0)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sqz_compile.assets import GGUF_FILE, smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=GGUF_FILE)


@pytest.mark.slow
def test_niah_prompt_places_the_needle_on_a_sentence_boundary(tokenizer):
    needle = needles.NEEDLES[0]
    for depth in (0.0, 0.5, 1.0):
        ctx_ids, user, at = needles.niah_prompt(tokenizer, needle, 300, depth)
        assert 250 < ctx_ids.shape[1] <= 300
        text = tokenizer.decode(ctx_ids[0])
        assert needle.fact in text and "<|im_start|>user" in text
        assert text.rstrip().endswith((".", "!", "?"))  # the essay ends on a whole sentence
        before = tokenizer.decode(ctx_ids[0, :at])
        assert before.endswith("user\n") or before.rstrip().endswith((".", "!", "?"))
        assert needle.question in tokenizer.decode(user[0])
    early = needles.niah_prompt(tokenizer, needle, 300, 0.25)[2]
    late = needles.niah_prompt(tokenizer, needle, 300, 0.75)[2]
    assert early < late


@pytest.mark.slow
def test_harness_end_to_end_on_a_tiny_model(tmp_path, tokenizer):
    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=1024)
    settings = runs.EvalSettings(contexts=(200,), keeps=(0.5,), depths=(0.0, 1.0), needles=1, ppl_tokens=24,
                               max_new_tokens=3, block_q=8, cluster_ratio=0.1, observation_window=16,
                               oracle=("flat-threshold",))
    records: list[dict] = []
    runs.run(model, tokenizer, settings, records.append)
    variants = len(settings.variants())
    assert len(records) == (1 + variants + 1) * (1 + 2)  # (dense + variants + 1 oracle) x (ppl + 2 depths)
    ppl_dense = next(r for r in records if r["task"] == "ppl" and r["method"] == "dense")
    assert ppl_dense["cache_vs_full_max_abs_logit_diff"] < 1e-3 and ppl_dense["n"] == 23
    assert all(math.isfinite(r["kl_sum"]) and r["kl_sum"] >= -1e-9 for r in records)
    out = tmp_path / "acc.json"
    result = {"meta": {"status": "complete"}, "records": records}
    report.write_reports(result, str(out))
    summary = json.loads(out.read_text())["summary"]
    sq = [r for r in summary if r["method"] == "squeezed"]
    assert len(sq) == variants and all(0 < r["kept_fraction"] <= 1 for r in sq)
    assert all(len(r["per_layer"]["mass_recall"]) == 2 for r in sq)
    assert "Per-layer recall" in (tmp_path / "acc.md").read_text()
    assert (tmp_path / "acc.png").stat().st_size > 0


def test_ppl_segments_pool_and_keep_per_token_nll(tokenizer):
    """--ppl-segments: one PPL record per (segment, method), each with its per-token NLLs (whose
    sum is nll_sum); the summary pools the segments' tokens."""
    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=1024)
    settings = runs.EvalSettings(contexts=(200,), keeps=(0.5,), lookups=("flat",), modes=("threshold",),
                                 oracle=(), tasks=("ppl",), ppl_tokens=24, ppl_segments=3, block_q=8,
                                 cluster_ratio=0.1, observation_window=16)
    records: list[dict] = []
    runs.run(model, tokenizer, settings, records.append)
    assert sorted({r["ppl_seed"] for r in records}) == [1, 2, 3] and len(records) == 6
    for r in records:
        assert len(r["nll_tokens"]) == r["n"] == 23 and math.isclose(sum(r["nll_tokens"]), r["nll_sum"], rel_tol=1e-5)
    sq = [r for r in records if r["method"] == "squeezed"]
    row = next(r for r in report.summarize(records) if r["method"] == "squeezed")
    assert row["ppl_segments"] == 3
    assert math.isclose(row["ppl"], math.exp(sum(r["nll_sum"] for r in sq) / sum(r["n"] for r in sq)))


@pytest.mark.parametrize("hierarchical", [False, True])
def test_dense_tokens_leave_their_clusters_exactly(hierarchical):
    """squeeze's data-chosen dense tokens: the full context K/V rebuilt from the layout equals the
    one without them, centroids are the means of the keys left, and keep = 1 equals dense."""
    from sqz_compile.kernels.attention.reference import key_cluster_ids

    model = tiny_model()
    ctx_ids, base = tiny_context(model, length=64, keep=1.0, hierarchical=hierarchical, coarse_ratio=0.1,
                                 dense_tokens=0)
    _, ctx = tiny_context(model, length=64, keep=1.0, hierarchical=hierarchical, coarse_ratio=0.1, dense_tokens=3)
    assert ctx.window == base.window + 3 and ctx.keys.shape[2] == base.keys.shape[2] - 3
    full_k, full_v = runs.context_kv(base)
    got_k, got_v = runs.context_kv(ctx)
    torch.testing.assert_close(got_k, full_k)
    torch.testing.assert_close(got_v, full_v)
    n = ctx.keys.shape[2]
    for li in range(ctx.num_layers):  # centroids are the means of the keys left in each cluster
        cid = key_cluster_ids(ctx.offsets[li], n)
        for h in range(ctx.num_kv_heads):
            for c in range(ctx.num_clusters):
                members = ctx.keys[li, h][cid[h] == c]
                if len(members):
                    torch.testing.assert_close(ctx.centroids[li, h, c, :ctx.head_dim], members.float().mean(0))
    user = _user_ids(12)
    dense = runs.user_logits(model, user, runs.dense_cache(model, (full_k, full_v)))[0]
    with af.squeezed_mode(model, ctx, block_q=8):
        sq = runs.user_logits(model, user)[0]
    torch.testing.assert_close(sq, dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["threshold", "budget"])
def test_eval_path_matches_the_compiled_squeezed_model(mode):
    """The harness's attention function and sqz_compile.compile run the same op: same logits."""
    import sqz_compile

    model = tiny_model()
    _, base = tiny_context(model, length=96, cluster_ratio=0.2)
    ctx = runs.variant_context(base, runs.Variant(0.25, "flat", mode))
    user = _user_ids(20)
    with af.squeezed_mode(model, ctx, block_q=8):
        ours = runs.user_logits(model, user)[0]
    sm = sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(block_q=8, inductor=False))
    theirs = sm(user).logits[0].float()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    dense = runs.user_logits(model, user, runs.dense_cache(model, runs.context_kv(base)))[0]
    assert not torch.allclose(ours, dense, atol=1e-3)  # keep < 1 really drops keys here
