"""SqueezeConfig.sink_tokens: the first S context tokens join the always-attended window."""
from __future__ import annotations

import torch

from fixtures import check_always_attended, tiny_context, tiny_model
from sqz_compile import SqueezedContext


def test_sinks_join_the_window_and_the_layout_validates(tmp_path):
    model = tiny_model("llama", kv_heads=2, layers=2)
    ids, ctx = tiny_context(model, length=48, keep=0.25, sink_tokens=4)
    w, t = ctx.window_queries.shape[2], ctx.extra["dense_tokens"]
    assert ctx.window == 4 + t + w and ctx.keys.shape[2] == 48 - 4 - t - w
    assert ctx.extra["sink_tokens"] == 4
    assert torch.equal(ctx.window_positions[..., :4].long(), torch.arange(4).expand(2, 2, 4))
    ctx.validate(model)
    # the window's first 4 keys are the context's first 4 keys (the dense prefill's own cache)
    _, plain = tiny_context(model, length=48, keep=0.25, dense_tokens=0)
    first = torch.stack([plain.keys[l, h][torch.argsort(plain.perm[l, h].long())[:4]]
                         for l in range(2) for h in range(2)]).reshape(2, 2, 4, -1)
    torch.testing.assert_close(ctx.window_keys[:, :, :4], first)
    ctx.save(tmp_path / "c.sqz")
    back = SqueezedContext.load(tmp_path / "c.sqz", model=model)
    assert torch.equal(back.window_keys, ctx.window_keys) and back.config.sink_tokens == 4


def test_sinks_keep_one_equals_dense_and_sinks_are_always_attended():
    # keep = 0: only sinks + window + new tokens; differs from keep = 0 without sinks
    check_always_attended(dict(sink_tokens=4), {})
