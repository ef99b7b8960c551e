"""Cluster variance, the certified logit bound and the error-bounded selection, dense layers, and
reading format-2 files (issue 11)."""
from __future__ import annotations

import json

import pytest
import torch

import sqz_compile
from fixtures import dense_full_rows, tiny_context, tiny_model
from sqz_compile import SqueezeConfig, SqueezedContext
from sqz_compile.kernels.attention.reference import log_partition_rest, selected_key_mask
from sqz_compile.kernels.lookup.reference import (
    block_max, certified_selection, cluster_sizes, log_share, logit_bounds, selection_mask_reference)
from sqz_compile.squeeze import squeeze_kv
from sqz_compile.squeeze.capture import cluster_radii

from cases import make_case
from test_squeeze import synthetic_kv


def _cluster_ids(offsets: torch.Tensor, n: int) -> torch.Tensor:
    from sqz_compile.kernels.lookup.reference import cluster_of
    return cluster_of(offsets.long(), n)


# ----------------------------------------------------------------------------- variance score

def test_variance_score_is_the_gaussian_log_mean_exp():
    """With [mean, variance] centroids the lookup ranks by s q.mu + s^2/2 sum q_d^2 var_d."""
    cs = make_case(b=2, h=2, g=3, m=5, d=8, n=40, c=6, variance=True, seed=4)
    q, d, s = cs.q.double(), 8, cs.scale
    mu, var = cs.centroids[..., :d].double(), cs.centroids[..., d:].double()
    qg = q.reshape(2, 2, 3, 5, d)
    score = s * torch.einsum("bhgmd,hcd->bhgmc", qg, mu) + 0.5 * s * s * torch.einsum("bhgmd,hcd->bhgmc", qg ** 2, var)
    log_n = cluster_sizes(cs.offsets).double().log()[None, :, None, None, :]
    best = block_max(log_share(score, log_n), 4)
    thr = torch.tensor([-2.5], dtype=torch.float64)
    got = selection_mask_reference(q, cs.centroids.double(), cs.offsets, thr, s, 4)
    assert torch.equal(got, best > thr)
    with pytest.raises(ValueError, match="wrong model"):
        selection_mask_reference(q, cs.centroids[..., :d + 1].double(), cs.offsets, thr, s, 4)


def test_variance_helps_a_cluster_whose_mean_hides_its_best_key():
    """Two clusters with about the same mean along q: the spread one holds a key q favours; only the
    variance term ranks it first."""
    d = 4
    q = torch.tensor([[[[3.0, 0, 0, 0]]]], dtype=torch.float64)   # [1, 1, 1, D]
    tight = torch.tensor([[0.2, 0, 0, 0]] * 4, dtype=torch.float64)  # a slightly better mean
    spread = torch.tensor([[2.1, 0, 0, 0], [-1.9, 0, 0, 0], [0.1, 1, 0, 0], [0.1, -1, 0, 0]], dtype=torch.float64)
    mean = torch.stack([tight.mean(0), spread.mean(0)])[None]
    var = torch.stack([tight.var(0, correction=0), spread.var(0, correction=0)])[None]
    off = torch.tensor([[0, 4, 8]], dtype=torch.int32)
    thr = torch.tensor([float("-inf")], dtype=torch.float64)
    plain = selection_mask_reference(q, mean, off, thr, 1.0, 1, budget=4)
    with_var = selection_mask_reference(q, torch.cat([mean, var], -1), off, thr, 1.0, 1, budget=4)
    assert plain[0, 0, 0].tolist() == [True, False] and with_var[0, 0, 0].tolist() == [False, True]


# ----------------------------------------------------------------------------- certified bound

@pytest.mark.parametrize("adversarial", [False, True])
def test_no_key_logit_exceeds_its_cluster_bound(adversarial):
    """Every key's logit <= s (q.mu_c + |q| r_c), float64, on squeezed synthetic contexts; the
    adversarial queries point along the residual of each cluster's farthest key."""
    keys, values, q, s = synthetic_kv(L=600)
    ctx = squeeze_kv(keys.double().float(), values, q, s, SqueezeConfig(dense_tokens=4))
    for li in range(ctx.num_layers):
        lc = ctx.layer(li)
        h, n, d = lc.keys.shape
        cid = _cluster_ids(lc.offsets, n)
        mu = lc.centroids[..., :d].double()
        resid = lc.keys.double() - mu.gather(1, cid[..., None].expand(-1, -1, d))
        if adversarial:  # per head: the residual of the farthest key in each of 6 clusters, scaled up
            far = resid.norm(dim=-1).topk(6, dim=-1).indices
            qq = 50 * resid.gather(1, far[..., None].expand(-1, -1, d))              # [H, 6, D]
            qq = qq.unsqueeze(0)                                                      # [1, H, 6, D]
        else:
            qq = 3 * torch.randn(2, h, 7, d, dtype=torch.float64)
        bound = logit_bounds(qq, lc.centroids.double(), lc.radii, s)                  # [B, H, 1, M, C]
        logits = s * torch.einsum("bhmd,hnd->bhmn", qq, lc.keys.double())
        per_key = bound[:, :, 0].gather(3, cid[None, :, None, :].expand(qq.shape[0], -1, qq.shape[2], -1))
        assert bool((logits <= per_key + 1e-9).all())


def test_radii_are_the_farthest_member_distance():
    x = torch.randn(3, 50, 8, dtype=torch.float64)
    a = torch.randint(0, 5, (3, 50))
    a[:, :5] = torch.arange(5)
    means = torch.zeros(3, 5, 8, dtype=torch.float64)
    for b in range(3):
        for c in range(5):
            means[b, c] = x[b][a[b] == c].mean(0)
    r = cluster_radii(x, a, means)
    for b in range(3):
        for c in range(5):
            want = (x[b][a[b] == c] - means[b, c]).norm(dim=-1).max()
            assert want <= r[b, c] <= want * (1 + 2e-5) + 1e-6


@pytest.mark.parametrize("eps", [0.3, 0.05, 0.005])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_bounded_mode_drops_at_most_eps(eps, seed):
    """The op in error-bounded mode: in every query row the dense softmax mass of the context keys
    it leaves out is <= eps (float64, random cases with masks, GQA and blocks)."""
    cs = make_case(b=2, h=2, g=3, m=7, d=8, n=120, c=15, w=3, mask="causal", seed=seed)
    f64 = {k: getattr(cs, k).double() for k in ("q", "k_new", "v_new", "keys", "values", "window_keys",
                                                 "window_values", "centroids")}
    cid = _cluster_ids(cs.offsets, 120)
    mu = f64["centroids"]
    radii = torch.zeros(2, 15, dtype=torch.float64)
    for h in range(2):
        for c in range(15):
            mem = f64["keys"][h][cid[h] == c]
            if len(mem):
                radii[h, c] = (mem - mu[h, c]).norm(dim=-1).max()
    q = f64["q"] * 4  # sharper attention: the bound has work to do
    block_q = 4
    log_rest = log_partition_rest(q, f64["k_new"], None, True, f64["window_keys"], cs.scale)
    sel = certified_selection(q, mu, cs.offsets, radii, cs.scale, block_q, eps, log_rest)
    # dense probabilities over [context | window | new] with the causal mask on the new keys
    qg = q.reshape(2, 2, 3, 7, 8)
    sc_ctx = cs.scale * torch.einsum("bhgmd,hnd->bhgmn", qg, f64["keys"])
    full = torch.cat([sc_ctx, log_rest.unsqueeze(-1)], -1)
    p_ctx = torch.exp(sc_ctx - torch.logsumexp(full, -1, keepdim=True))
    keep = selected_key_mask(cs.offsets, sel, 120).repeat_interleave(block_q, 2)[:, :, :7][:, :, None]
    dropped = (p_ctx * ~keep).sum(-1)
    assert float(dropped.max()) <= eps + 1e-12
    assert bool(sel.any()) or eps >= 0.3  # the mode keeps clusters when it must
    out = torch.ops.sqz.squeezed_attention(q, f64["k_new"], f64["v_new"], None, f64["keys"], f64["values"], mu,
                                           cs.offsets, f64["window_keys"], f64["window_values"],
                                           torch.tensor([0.0]), None, None, None, radii, *(None,) * 7, cs.scale, True, 0,
                                           block_q, eps)
    assert torch.isfinite(out).all()


def test_error_bounded_squeeze_is_close_to_dense_and_refuses_onnx(tmp_path):
    """max_dropped_mass from squeeze through compile: the logits stay near dense (every row drops
    <= 1% of its context mass); the file round-trips the radii and the setting."""
    torch._dynamo.reset()
    model = tiny_model("llama", kv_heads=2, layers=2)
    ctx_ids, ctx = tiny_context(model, length=64, keep=0.125, max_dropped_mass=0.01)
    assert ctx.radii is not None and ctx.radii.shape == ctx.centroids.shape[:3]
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    want = dense_full_rows(model, ctx_ids, ids, torch.ones_like(ids))[0]
    got = sqz_compile.compile(model, ctx, inductor=False)(ids).logits[0]
    torch.testing.assert_close(got, want, atol=5e-2, rtol=0)
    ctx.save(tmp_path / "c.sqz")
    back = SqueezedContext.load(tmp_path / "c.sqz")
    assert back.config.max_dropped_mass == 0.01 and torch.equal(back.radii, ctx.radii)
    from sqz_compile.export.onnx import sqz_squeezed_attention
    with pytest.raises(NotImplementedError, match="max_dropped_mass"):
        sqz_squeezed_attention(*([None] * 14), max_dropped_mass=0.01)


def test_error_bounded_config_is_checked():
    with pytest.raises(ValueError, match="max_dropped_mass"):
        SqueezeConfig(max_dropped_mass=1.5)
    with pytest.raises(ValueError, match="two selection modes"):
        SqueezeConfig(max_dropped_mass=0.1, budget=100)


# ----------------------------------------------------------------------------- dense layers

def test_dense_layers_keep_everything_and_the_rest_keep_keep():
    keys, values, q, s = synthetic_kv(L=1200)
    ctx = squeeze_kv(keys, values, q, s, SqueezeConfig(keep=0.125, dense_tokens=0, dense_layers=1))
    assert torch.isneginf(ctx.log_threshold[0]).all() and torch.isfinite(ctx.log_threshold[1:]).all()
    assert ctx.layer_budget(0) == 0 and ctx.dense_layers == 1
    from sqz_compile.squeeze.calibrate import kept_fraction
    kept = kept_fraction(ctx.window_queries, ctx.centroids, ctx.offsets, ctx.log_threshold, s)
    assert kept[0] == 1.0 and abs(kept[1:].mean().item() - 0.125) <= 0.02
    budget = squeeze_kv(keys, values, q, s, SqueezeConfig(budget=0, dense_tokens=0, dense_layers=1))
    assert torch.isneginf(budget.log_threshold[0]).all() and torch.isposinf(budget.log_threshold[1:]).all()
    assert budget.layer_budget(0) == 0 and budget.layer_budget(1) == 0


# ----------------------------------------------------------------------------- format 2

def test_a_format_2_file_is_read_with_variance_off(tmp_path):
    """Format 2 had mean-only centroids and no radii: read as cluster_variance=False."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama", kv_heads=2, layers=2)
    _, ctx = tiny_context(model, length=48, cluster_variance=False)
    p = tmp_path / "c.sqz"
    ctx.save(p)
    with safe_open(str(p), framework="pt") as f:
        meta = json.loads(f.metadata()["sqz_meta"])
    meta["format_version"] = 2
    for k in ("cluster_variance", "dense_layers", "max_dropped_mass"):
        meta["config"].pop(k)
    tensors = load_file(str(p))
    tensors.pop("radii")
    meta["sha256"].pop("radii")
    save_file(tensors, str(p), metadata={"sqz_meta": json.dumps(meta)})
    old = SqueezedContext.load(p)
    assert old.config.cluster_variance is False and old.radii is None
    assert old.centroids.shape[-1] == old.head_dim
