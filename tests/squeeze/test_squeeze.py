"""sqz_compile.squeeze on synthetic K/V and tiny random-weight transformers models."""
import math

import pytest
import torch
import torch.nn.functional as F

import fixtures
from sqz_compile.config import SqueezeConfig
from sqz_compile.squeeze import squeeze, squeeze_kv
from sqz_compile.transformers_compat import cache_kwargs
from sqz_compile.squeeze.calibrate import group_log_shares, kept_fraction

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- helpers

def synthetic_kv(layers=3, H=2, g=2, L=700, D=16, seed=0, dtype=torch.float32):
    """Structured keys (a mixture of directions on the sphere) and queries that prefer some."""
    gen = torch.Generator().manual_seed(seed)
    modes = F.normalize(torch.randn(layers, H, 12, D, generator=gen), dim=-1)
    pick = torch.randint(0, 12, (layers, H, L), generator=gen)
    keys = modes.gather(2, pick.unsqueeze(-1).expand(-1, -1, -1, D)) * 3 + 0.6 * torch.randn(layers, H, L, D, generator=gen)
    values = torch.randn(layers, H, L, D, generator=gen)
    q = 2 * modes.repeat_interleave(g, 1)[:, :, :4].mean(2, keepdim=True) + torch.randn(layers, H * g, 100, D, generator=gen)
    return keys.to(dtype), values.to(dtype), q, D ** -0.5


def check_layout(ctx, keys, values):
    """Every context key exactly once (clustered or always attended), same permutation on K and
    V, the observation window always attended, offsets consistent, centroids = means of the keys
    they index (followed by the per-channel variances with cluster_variance)."""
    layers, H, L, D = keys.shape
    N, C = ctx.keys.shape[2], ctx.num_clusters
    A = L - N
    W, S, T = ctx.extra["window"], ctx.extra["sink_tokens"], ctx.extra["dense_tokens"]
    assert ctx.window == A == S + T + W and ctx.context_length == L
    assert torch.equal(ctx.window_positions[..., A - W:].long(), torch.arange(L - W, L).expand(layers, H, W))
    assert torch.equal(ctx.window_positions[..., :S].long(), torch.arange(S).expand(layers, H, S))
    assert ctx.perm.dtype == torch.int32 and ctx.offsets.dtype == torch.int32
    assert ctx.window_positions.dtype == torch.int32
    assert ctx.centroids.dtype == torch.float32
    for l in range(layers):
        for h in range(H):
            p, wp = ctx.perm[l, h].long(), ctx.window_positions[l, h].long()
            assert torch.equal(torch.cat([p, wp]).sort().values, torch.arange(L))
            assert torch.equal(ctx.keys[l, h], keys[l, h, p]) and torch.equal(ctx.values[l, h], values[l, h, p])
            assert torch.equal(ctx.window_keys[l, h], keys[l, h, wp])
            assert torch.equal(ctx.window_values[l, h], values[l, h, wp])
            off = ctx.offsets[l, h].long()
            assert off[0] == 0 and off[-1] == N and (off[1:] >= off[:-1]).all()
            for c in range(C):
                want = cluster_stats(ctx.keys[l, h, off[c]:off[c + 1]], ctx.config.cluster_variance)
                torch.testing.assert_close(ctx.centroids[l, h, c].double(), want, atol=1e-4, rtol=1e-4)


def cluster_stats(seg, variance):
    """What a centroid holds for the keys `seg` [n, D]: their mean, then (variance) their
    per-channel variance; zeros for an empty cluster."""
    seg = seg.double()
    stats = [seg.mean(0)] + ([seg.var(0, correction=0)] if variance else [])
    return torch.cat(stats) if len(seg) else torch.zeros(seg.shape[1] * len(stats), dtype=torch.float64)


def tiny_model(kind="llama", kv_heads=2, layers=2, **kw):
    """fixtures.tiny_model with the squeeze tests' sizes (vocab 96, 2048 positions, no pad token)."""
    common = dict(vocab_size=96, intermediate_size=96, max_position_embeddings=2048, pad_token_id=None)
    common.update(kw)
    return fixtures.tiny_model(kind, None, kv_heads, layers, **common)


# ----------------------------------------------------------------------------- synthetic

@pytest.mark.parametrize("hier", [False, True])
def test_layout_invariants(hier):
    keys, values, q, s = synthetic_kv()
    ctx = squeeze_kv(keys, values, q, s, SqueezeConfig(hierarchical=hier, cluster_ratio=0.05))
    ctx.validate()
    assert ctx.keys.shape[2] == 700 - 100 - 16  # window and the default 16 dense tokens leave the clusters
    assert ctx.num_clusters == round(0.05 * ctx.keys.shape[2])
    check_layout(ctx, keys, values)
    if hier:
        Cc = ctx.coarse_centroids.shape[2]
        assert Cc == round(0.01 * 600)
        for l in range(keys.shape[0]):
            for h in range(keys.shape[1]):
                co = ctx.coarse_offsets[l, h].long()
                assert co[0] == 0 and co[-1] == ctx.num_clusters and (co[1:] >= co[:-1]).all()
                for cc in range(Cc):
                    lo, hi = ctx.offsets[l, h, co[cc]].item(), ctx.offsets[l, h, co[cc + 1]].item()
                    want = cluster_stats(ctx.keys[l, h, lo:hi], ctx.config.cluster_variance)
                    torch.testing.assert_close(ctx.coarse_centroids[l, h, cc].double(), want, atol=1e-4, rtol=1e-4)


def test_bf16_keys_keep_dtype():
    keys, values, q, s = synthetic_kv(dtype=torch.bfloat16)
    ctx = squeeze_kv(keys, values, q, s)
    assert ctx.keys.dtype == ctx.window_keys.dtype == torch.bfloat16
    check_layout(ctx, keys, values)


@pytest.mark.parametrize("keep", [0.05, 0.125, 0.5])
@pytest.mark.parametrize("per_layer", [False, True])
def test_calibration_keeps_requested_fraction(keep, per_layer):
    keys, values, q, s = synthetic_kv(L=1100)
    ctx = squeeze_kv(keys, values, q, s, SqueezeConfig(keep=keep, per_layer_threshold=per_layer))
    frac = kept_fraction(ctx.window_queries, ctx.centroids, ctx.offsets, ctx.log_threshold, s)
    assert abs(frac.mean().item() - keep) <= 0.02
    if per_layer:
        assert (frac - keep).abs().max() <= 0.02
    else:
        assert (ctx.log_threshold == ctx.log_threshold[0]).all()  # one pair for every layer


def test_keep_zero_and_one_and_with_keep_shares_tensors():
    keys, values, q, s = synthetic_kv()
    ctx = squeeze_kv(keys, values, q, s, SqueezeConfig(hierarchical=True))
    zero, one = ctx.with_keep(0.0), ctx.with_keep(1.0)
    assert torch.isposinf(zero.log_threshold).all() and torch.isposinf(zero.coarse_log_threshold).all()
    assert torch.isneginf(one.log_threshold).all() and torch.isneginf(one.coarse_log_threshold).all()
    assert one.keys is ctx.keys and one.centroids is ctx.centroids and one.config.keep == 1.0
    assert kept_fraction(q, ctx.centroids, ctx.offsets, one.log_threshold, s).eq(1).all()
    assert kept_fraction(q, ctx.centroids, ctx.offsets, zero.log_threshold, s).eq(0).all()


def test_coarse_threshold_covers_fine_selection():
    keys, values, q, s = synthetic_kv(L=1100)
    ctx = squeeze_kv(keys, values, q, s, SqueezeConfig(hierarchical=True, keep=0.2))
    sizes = (ctx.offsets[..., 1:] - ctx.offsets[..., :-1]).float()
    csizes = torch.stack([torch.stack([sizes[l, h].new_tensor(
        [sizes[l, h, ctx.coarse_offsets[l, h, c]:ctx.coarse_offsets[l, h, c + 1]].sum() for c in range(ctx.coarse_centroids.shape[2])])
        for h in range(ctx.num_kv_heads)]) for l in range(ctx.num_layers)])
    total = covered = 0.0
    for l in range(ctx.num_layers):
        fine = group_log_shares(q[l], ctx.centroids[l], sizes[l], s) > ctx.log_threshold[l, 0]  # decode
        coarse = group_log_shares(q[l], ctx.coarse_centroids[l], csizes[l], s) > ctx.coarse_log_threshold[l, 0]
        for h in range(ctx.num_kv_heads):
            parent = torch.searchsorted(ctx.coarse_offsets[l, h], torch.arange(ctx.num_clusters, dtype=torch.int32), right=True) - 1
            kept = fine[h] * sizes[l, h]
            total += kept.sum().item()
            covered += (kept * coarse[h][:, parent]).sum().item()
    assert covered >= 0.99 * total - 1e-6
    assert (ctx.coarse_log_threshold[0] > -math.inf).all()  # it does prune something


def test_budget_mode_stores_unused_thresholds():
    keys, values, q, s = synthetic_kv()
    ctx = squeeze_kv(keys, values, q, s, SqueezeConfig(budget=64, hierarchical=True))
    assert ctx.budget == 64
    assert torch.isneginf(ctx.log_threshold).all() and torch.isneginf(ctx.coarse_log_threshold).all()


@pytest.mark.parametrize("L", [1, 2, 5, 30])
def test_short_contexts(L):
    """Context shorter than the window and than the cluster count: W = L - 1, N >= 1, C >= 1."""
    keys, values, q, s = synthetic_kv(L=L)
    W = min(100, L - 1)
    ctx = squeeze_kv(keys, values, q[:, :, :W], s, SqueezeConfig(hierarchical=True))
    ctx.validate()
    assert ctx.keys.shape[2] == L - W >= 1 and 1 <= ctx.num_clusters <= L - W
    check_layout(ctx, keys, values)


def test_one_key_clusters():
    keys, values, q, s = synthetic_kv(L=160)
    ctx = squeeze_kv(keys, values, q, s, SqueezeConfig(cluster_ratio=1.0, coarse_ratio=0.5, hierarchical=True))
    assert ctx.num_clusters == 160 - 100 - 16
    assert ((ctx.offsets[..., 1:] - ctx.offsets[..., :-1]) == 1).all()
    check_layout(ctx, keys, values)


def test_identical_keys_leave_empty_clusters_that_validate():
    keys = torch.ones(1, 1, 300, 8)
    ctx = squeeze_kv(keys, torch.randn(1, 1, 300, 8), torch.randn(1, 1, 100, 8), 8 ** -0.5,
                     SqueezeConfig(hierarchical=True))
    ctx.validate()
    sizes = ctx.offsets[..., 1:] - ctx.offsets[..., :-1]
    assert (sizes == 0).any() and sizes.sum() == 300 - 100 - ctx.extra["dense_tokens"]
    assert (ctx.centroids[sizes == 0] == 0).all()
    assert torch.isfinite(ctx.log_threshold).all() or torch.isinf(ctx.log_threshold).all()


# ----------------------------------------------------------------------------- tiny models

def _unsort(ctx, field):
    t = torch.cat([getattr(ctx, field), getattr(ctx, "window_" + field)], 2)
    pos = torch.cat([ctx.perm, ctx.window_positions], 2).long()
    return torch.empty_like(t).scatter_(2, pos.unsqueeze(-1).expand_as(t), t)


@pytest.mark.parametrize("kind,kv_heads", [("llama", 4), ("llama", 2), ("mistral", 2), ("qwen2", 1), ("qwen2", 4)])
def test_tiny_models_squeeze_and_match_dense(kind, kv_heads):
    """Squeeze runs on MHA and GQA configs, leaves the model as it was, and the stored keys
    (positions p - L) reproduce the dense forward over [context + question] exactly."""
    model = tiny_model(kind, kv_heads)
    model.train()  # squeeze must not leave it in eval mode either
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    ctx_ids = torch.randint(0, 96, (1, 300), generator=torch.Generator().manual_seed(1))
    question = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    ctx = squeeze(model, ctx_ids, SqueezeConfig(chunk_size=128, hierarchical=True))
    assert model.training and model.config._attn_implementation == impl
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ctx.validate(model)
    assert ctx.keys.shape == (2, kv_heads, 300 - 100 - 16, 16) and ctx.window_queries.shape == (2, 4, 100, 16)
    assert ctx.window_positions.shape == (2, kv_heads, 116)
    model.eval()
    with torch.no_grad():
        dense = model(torch.cat([ctx_ids, question], 1)).logits[:, -12:]
        cache = transformers.DynamicCache(config=model.config)
        keys, values = _unsort(ctx, "keys"), _unsort(ctx, "values")
        for i in range(ctx.num_layers):
            cache.update(keys[i:i + 1], values[i:i + 1], i)
        out = model(question, **cache_kwargs(model, cache), position_ids=torch.arange(12).unsqueeze(0)).logits
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=1e-4)


def test_window_queries_are_post_rope_at_relative_positions():
    """Layer 0's captured queries equal q_proj(norm(embed)) rotated for positions p - L."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_model("llama", 2)
    ids = torch.randint(0, 96, (1, 150), generator=torch.Generator().manual_seed(3))
    ctx = squeeze(model, ids, SqueezeConfig(observation_window=20, chunk_size=64))
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        q = model.model.layers[0].self_attn.q_proj(h).view(1, 150, 4, 16).transpose(1, 2)
        pos = torch.arange(-150, 0).unsqueeze(0)
        cos, sin = model.model.rotary_emb(h, pos)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    torch.testing.assert_close(ctx.window_queries[0], q[0, :, -20:], atol=1e-5, rtol=1e-5)
    assert ctx.scaling == 16 ** -0.5


def test_chunking_does_not_change_the_result():
    model = tiny_model("qwen2", 2)
    ids = torch.randint(0, 96, (1, 257), generator=torch.Generator().manual_seed(4))
    a = squeeze(model, ids, SqueezeConfig(chunk_size=4096))
    b = squeeze(model, ids, SqueezeConfig(chunk_size=50))
    torch.testing.assert_close(_unsort(a, "keys"), _unsort(b, "keys"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.window_queries, b.window_queries, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- refusals

def test_refuses_bad_context_ids():
    model = tiny_model()
    with pytest.raises(ValueError, match="empty context"):
        squeeze(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[1, L\]"):
        squeeze(model, torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        squeeze(model, torch.zeros(1, 2049, dtype=torch.long))


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "longrope",
                                  "short_factor": [1.0] * 8, "long_factor": [1.0] * 8, "original_max_position_embeddings": 1024}])
def test_refuses_position_dependent_rope(rope):
    rope = dict(rope, rope_theta=10000.0)
    try:
        model = tiny_model("llama", 2, rope_parameters=rope)
    except Exception as e:  # pragma: no cover - older transformers spell it rope_scaling
        pytest.skip(f"cannot build config: {e}")
    with pytest.raises(ValueError, match="rope_type"):
        squeeze(model, torch.zeros(1, 10, dtype=torch.long))


def test_refuses_sliding_window():
    model = tiny_model("mistral", 2, sliding_window=64)
    with pytest.raises(ValueError, match="sliding"):
        squeeze(model, torch.zeros(1, 10, dtype=torch.long))


def test_refuses_non_rope_model():
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=128)
    with pytest.raises(ValueError, match="rotary"):
        squeeze(transformers.GPT2LMHeadModel(cfg), torch.zeros(1, 10, dtype=torch.long))
