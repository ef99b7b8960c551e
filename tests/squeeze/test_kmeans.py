"""Batched spherical K-means (sqz_compile.squeeze.kmeans)."""
import torch
import torch.nn.functional as F

from sqz_compile.squeeze.kmeans import cluster_counts, cluster_sums, kmeans, nearest


def planted(B=4, K=24, per=40, D=32, noise=0.03, seed=0):
    """B problems, each K well-separated directions with `per` noisy points of random norm."""
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(B, K, D, generator=g), dim=-1)
    label = torch.arange(K).repeat_interleave(per).expand(B, -1)
    scale = 0.5 + 3 * torch.rand(B, K * per, 1, generator=g)
    x = dirs.gather(1, label.unsqueeze(-1).expand(-1, -1, D)) * scale
    x = x + noise * scale * torch.randn(B, K * per, D, generator=g)
    p = torch.randperm(K * per, generator=g)
    return x[:, p], label[:, p]


def test_recovers_planted_clusters():
    x, label = planted()
    res = kmeans(x, 24, iters=30, seed=1)
    for b in range(x.shape[0]):
        pairs = set(zip(res.assign[b].tolist(), label[b].tolist()))
        assert len(pairs) == 24, f"problem {b}: clusters are not a bijection of the planted ones"
    assert (res.counts == 40).all()
    # the returned centres are unit vectors pointing at their points
    best, idx = nearest(F.normalize(x, dim=-1), res.centers, 1 << 20)
    assert torch.equal(idx, res.assign)


def test_round_based_init_covers_planted_clusters():
    """Past the greedy phase the init draws centres in batched rounds (rejection-sampled to
    emulate sequential k-means++): it must still put a centre near almost every planted cluster."""
    from sqz_compile.squeeze import kmeans as km

    x, label = planted(B=4, K=64, per=12, D=48, noise=0.02, seed=3)
    xn = F.normalize(x, dim=-1)
    truth = torch.stack([F.normalize(torch.stack([xn[b][label[b] == k].mean(0) for k in range(64)]), dim=-1)
                         for b in range(4)])
    c = km._init_centers(xn, 64, torch.Generator().manual_seed(0), None, 1 << 20, greedy_steps=1)
    _, idx = nearest(c, truth, 1 << 20)
    covered = [len(set(idx[b].tolist())) for b in range(4)]
    assert min(covered) >= 56, covered


def test_deterministic_and_chunking_invariant():
    x, _ = planted(B=3, K=10, per=30, D=16, noise=0.3)
    a = kmeans(x, 10, seed=7)
    b = kmeans(x, 10, seed=7)
    c = kmeans(x, 10, seed=7, chunk_elems=97)  # many tiny similarity chunks
    assert torch.equal(a.assign, b.assign) and torch.equal(a.assign, c.assign)


def test_degenerate_identical_points_leave_empty_clusters():
    x = torch.ones(2, 10, 8)
    res = kmeans(x, 4, seed=0)
    assert res.counts.sum(1).tolist() == [10, 10]
    assert (res.counts == 0).any()
    assert (res.centers[res.counts == 0] == 0).all()


def test_one_point_per_cluster():
    x = torch.randn(3, 17, 8)
    res = kmeans(x, 17, seed=0)
    assert (res.counts == 1).all()


def test_zero_weight_points_never_seed_or_pull():
    x, label = planted(B=2, K=5, per=20, D=8)
    junk = torch.randn(2, 30, 8) * 100
    xw = torch.cat([x, junk], 1)
    w = torch.cat([torch.ones(2, 100), torch.zeros(2, 30)], 1)
    res = kmeans(xw, 5, seed=0, weights=w)
    for b in range(2):
        assert len(set(zip(res.assign[b, :100].tolist(), label[b].tolist()))) == 5


def test_sums_and_counts():
    x = torch.randn(2, 50, 4, dtype=torch.bfloat16)
    a = torch.randint(0, 6, (2, 50))
    s = cluster_sums(x, a, 6, step=7)
    n = cluster_counts(a, 6)
    for b in range(2):
        for c in range(6):
            assert torch.allclose(s[b, c], x[b][a[b] == c].float().sum(0), atol=1e-5)
            assert n[b, c] == (a[b] == c).sum()


def test_fused_assignment_matches_torch():
    """The Triton assignment kernel (CUDA, or the interpreter on CPU) picks the same centres."""
    from sqz_compile.squeeze import kmeans as km

    if km.triton is None:
        import pytest
        pytest.skip("triton not installed")
    cuda = torch.cuda.is_available()
    dev, dt = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    for B, N, K, D in [(3, 300, 70, 32), (2, 129, 5, 64)]:
        x = F.normalize(torch.randn(B, N, D, generator=g), dim=-1).to(dev, dt)
        c = F.normalize(torch.randn(B, K, D, generator=g), dim=-1).to(dev, dt)
        best, idx = km.nearest_fused(x, c, None if cuda else {"BLOCK_M": 32, "BLOCK_N": 32})
        ref_best, ref_idx = km.nearest_torch(x.float(), c.float(), 1 << 20)
        assert (idx == ref_idx).float().mean() > 0.99
        torch.testing.assert_close(best, ref_best, atol=2e-3 if cuda else 1e-5, rtol=0)


def test_fused_fallback_is_per_call_and_said_once(monkeypatch):
    """A failing fused kernel falls back to the torch path for the rest of that k-means call, with
    one warning; the next call tries the kernel again (nothing sticky for the process)."""
    import pytest

    from sqz_compile.squeeze import kmeans as km

    attempts = []

    def broken(xn, cn, config=None):
        attempts.append(1)
        raise RuntimeError("0 active drivers")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 80, 8, generator=g)
    want = km.kmeans(x, 5, seed=0)
    monkeypatch.setattr(km, "_use_triton", lambda xn: True)
    monkeypatch.setattr(km, "nearest_fused", broken)
    for call in (1, 2):
        with pytest.warns(UserWarning, match="fused Triton assignment failed .*0 active drivers") as rec:
            got = km.kmeans(x, 5, seed=0)
        assert len([w for w in rec if "fused Triton" in str(w.message)]) == 1
        assert len(attempts) == call  # one attempt per call: tried again, never sticky
        assert torch.equal(got.assign, want.assign) and got.iterations == want.iterations
