"""What the lookup keeps: data-chosen dense tokens, per-granularity thresholds, budget = 0."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fixtures import check_always_attended, tiny_context, tiny_model
from sqz_compile import SqueezeConfig, SqueezedContext
from sqz_compile.squeeze.calibrate import kept_fraction
from sqz_compile.context import SqueezedContextError
from sqz_compile.kernels.lookup.reference import pick_threshold, select_clusters_reference
from sqz_compile.squeeze import squeeze_kv

from squeeze.test_squeeze import check_layout, synthetic_kv


def test_dense_tokens_are_the_keys_the_window_attends_to_most():
    """A planted sink (a key aligned with every window query) in each head leaves its cluster
    and is attended densely; the layout stays a permutation of the context."""
    keys, values, q, s = synthetic_kv(L=400)
    layers, H, L, D = keys.shape
    g = q.shape[1] // H
    sinks = torch.tensor([[17, 250], [3, 42], [299, 5]])[:layers, :H]  # per (layer, head)
    for l in range(layers):
        for h in range(H):
            keys[l, h, sinks[l, h]] = 8 * F.normalize(q[l, h * g:(h + 1) * g].mean((0, 1)), dim=0) * D ** 0.5
    ctx = squeeze_kv(keys, values, q, s, SqueezeConfig(dense_tokens=1, observation_window=100))
    assert ctx.extra["dense_tokens"] == 1 and ctx.window == 101
    assert torch.equal(ctx.window_positions[..., 0].long(), sinks)
    check_layout(ctx, keys, values)


def test_dense_tokens_count_clamps_to_the_context():
    keys, values, q, s = synthetic_kv(L=30)
    ctx = squeeze_kv(keys, values, q[:, :, :20], s, SqueezeConfig(dense_tokens=50, sink_tokens=2))
    assert ctx.extra["dense_tokens"] == 7 and ctx.keys.shape[2] == 1  # 30 - 20 window - 2 sinks - 7
    check_layout(ctx, keys, values)


def test_keep_zero_attends_the_dense_tokens_and_keep_one_is_exact():
    check_always_attended(dict(dense_tokens=6), dict(dense_tokens=0))


@pytest.mark.parametrize("keep", [0.0625, 0.125, 0.25])
def test_decode_and_prefill_thresholds_each_keep_the_requested_fraction(keep):
    """keep means the same per decoded token and per prefill block: without its own prefill
    threshold a block keeps the union of its queries' needs, far more than keep."""
    keys, values, q, s = synthetic_kv(L=1500)
    ctx = squeeze_kv(keys, values, q, s, SqueezeConfig(keep=keep, dense_tokens=0))
    args = (ctx.window_queries, ctx.centroids, ctx.offsets, ctx.log_threshold, s)
    assert abs(kept_fraction(*args).mean().item() - keep) <= 0.02
    assert abs(kept_fraction(*args, block_q=64).mean().item() - keep) <= 0.02
    one = torch.stack([ctx.log_threshold[:, 0]] * 2, dim=1)  # the decode threshold for both
    union = kept_fraction(ctx.window_queries, ctx.centroids, ctx.offsets, one, s, block_q=64).mean().item()
    assert union > keep + 0.05
    assert bool((ctx.log_threshold[:, 1] > ctx.log_threshold[:, 0]).all())


def test_the_lookup_applies_the_decode_threshold_to_one_token_and_the_prefill_one_to_blocks():
    thr = torch.tensor([float("inf"), float("-inf")])  # decode keeps nothing, prefill everything
    assert torch.equal(pick_threshold(thr, 1), thr[:1]) and torch.equal(pick_threshold(thr, 5), thr[1:])
    assert torch.equal(pick_threshold(torch.tensor([0.5]), 5), torch.tensor([0.5]))
    cent = torch.randn(2, 6, 8)
    off = torch.tensor([[0, 2, 4, 6, 8, 10, 12]] * 2, dtype=torch.int32)
    for m, want in ((1, 0), (5, 6)):
        _, count = select_clusters_reference(torch.randn(1, 4, m, 8), cent, off, thr, 0.3, 4)
        assert bool((count == want).all())


def test_budget_zero_keeps_no_cluster():
    model = tiny_model("llama", kv_heads=2, layers=2)
    _, ctx = tiny_context(model, length=60, budget=0)
    assert ctx.budget == 0 and torch.isposinf(ctx.log_threshold).all()
    lc = ctx.layer(0)
    for m in (1, 9):
        _, count = torch.ops.sqz.select_clusters(torch.randn(1, 4, m, 16), lc.centroids, lc.offsets,
                                                 lc.log_threshold, None, None, None, 0.25, 8, ctx.budget)
        assert int(count.sum()) == 0


def test_a_format_1_file_is_refused_with_the_fix(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    model = tiny_model("llama", kv_heads=2, layers=2)
    _, ctx = tiny_context(model, length=48)
    p = tmp_path / "c.sqz"
    ctx.save(p)
    with safe_open(str(p), framework="pt") as f:
        meta = json.loads(f.metadata()["sqz_meta"])
    meta["format_version"] = 1
    save_file(load_file(str(p)), str(p), metadata={"sqz_meta": json.dumps(meta)})
    with pytest.raises(SqueezedContextError, match="format version 1.*dense tokens.*re-create it"):
        SqueezedContext.load(p)
