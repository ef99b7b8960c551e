"""Squeeze on the real SmolLM2-135M-Instruct (GQA 9/3 heads, 30 layers) over a ~2K-token essay, CPU."""
import pytest
import torch

from sqz_compile import assets
from sqz_compile.squeeze.calibrate import kept_fraction
from sqz_compile.config import SqueezeConfig
from sqz_compile.context import SqueezedContext
from sqz_compile.squeeze import squeeze
from sqz_compile.transformers_compat import cache_kwargs

pytestmark = pytest.mark.slow
L, Q = 2048, 16


@pytest.fixture(scope="module")
def real():
    try:
        model, tok = assets.load_smollm2()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    ids = assets.essay_tokens(tok, L)
    question = tok("\nQuestion: what did the author do at Viaweb?", return_tensors="pt",
                   add_special_tokens=False).input_ids[:, :Q]
    ctx = squeeze(model, ids, SqueezeConfig(keep=0.125, hierarchical=True, chunk_size=512), progress=False)
    return model, ids, question, ctx


def test_real_squeeze_layout(real):
    model, ids, _, ctx = real
    ctx.validate(model)
    n = L - 100 - 16  # the window and the 16 default dense tokens leave the clusters
    assert ctx.keys.shape == (30, 3, n, 64) and ctx.window_queries.shape == (30, 9, 100, 64)
    assert ctx.num_clusters == round(0.05 * n) and ctx.coarse_centroids.shape[2] == round(0.01 * n)
    # real attention sinks: the first context token is among every head's dense tokens in deep layers
    assert bool((ctx.window_positions[15:, :, :16] == 0).any(-1).all())
    assert ctx.scaling == 64 ** -0.5 and model.config._attn_implementation == "sdpa"
    sizes = ctx.offsets[..., 1:] - ctx.offsets[..., :-1]
    assert (sizes > 0).float().mean() > 0.95  # real keys leave (almost) no cluster empty


def test_real_position_convention(real):
    """Dense forward over [context + question] == question attending the stored context K/V
    (un-sorted, rotated for positions p - L) with the question at positions 0.."""
    import transformers

    model, ids, question, ctx = real
    q = question.shape[1]

    def unsort(field):
        t = torch.cat([getattr(ctx, field), getattr(ctx, "window_" + field)], 2)
        pos = torch.cat([ctx.perm, ctx.window_positions], 2).long()
        return torch.empty_like(t).scatter_(2, pos.unsqueeze(-1).expand_as(t), t)

    keys, values = unsort("keys"), unsort("values")
    with torch.no_grad():
        dense = model(torch.cat([ids, question], 1), logits_to_keep=q).logits
        cache = transformers.DynamicCache(config=model.config)
        for i in range(ctx.num_layers):
            cache.update(keys[i:i + 1], values[i:i + 1], i)
        out = model(question, **cache_kwargs(model, cache), position_ids=torch.arange(q).unsqueeze(0)).logits
    torch.testing.assert_close(out, dense, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("keep", [0.05, 0.125, 0.5])
def test_real_calibration(real, keep):
    *_, ctx = real
    c = ctx.with_keep(keep)
    frac = kept_fraction(c.window_queries, c.centroids, c.offsets, c.log_threshold, c.scaling)
    assert abs(frac.mean().item() - keep) <= 0.02
    blocks = kept_fraction(c.window_queries, c.centroids, c.offsets, c.log_threshold, c.scaling, block_q=64)
    assert abs(blocks.mean().item() - keep) <= 0.02
    assert torch.isfinite(c.coarse_log_threshold).all() and (c.coarse_log_threshold < c.log_threshold).all()


def test_real_save_load(tmp_path, real):
    model, _, _, ctx = real
    ctx.save(tmp_path / "essay.sqz")
    back = SqueezedContext.load(tmp_path / "essay.sqz", model=model)
    assert all(torch.equal(a, b) for a, b in zip(ctx.tensors().values(), back.tensors().values()))
