"""The sqz op compiled by Inductor under mode="reduce-overhead" (CUDA graphs): the generated code
contains the sqz Triton kernels, replays are correct, and nothing forces a graph skip."""
from __future__ import annotations

import pytest
import torch

from cases import coarse_threshold_for_keep, make_case, reference_with_selection, rel_err, threshold_for_keep

pytestmark = pytest.mark.gpu


class SqzAttention(torch.nn.Module):
    """A layer's attention call with its squeezed context held as buffers."""

    def __init__(self, cs, thr, budget: int, block_q: int, coarse_thr=None):
        super().__init__()
        for name in ("keys", "values", "centroids", "offsets", "window_keys", "window_values"):
            self.register_buffer(name, getattr(cs, name))
        self.register_buffer("thr", thr)
        self.hier = cs.coarse_centroids is not None
        if self.hier:
            self.register_buffer("coarse_centroids", cs.coarse_centroids)
            self.register_buffer("coarse_offsets", cs.coarse_offsets)
            self.register_buffer("coarse_thr", coarse_thr)
        self.scale, self.budget, self.block_q = cs.scale, budget, block_q

    def forward(self, q, k, v):
        q = q * 1.0  # a pointwise op around the custom op, fused by Inductor
        out = torch.ops.sqz.squeezed_attention(
            q, k, v, None, self.keys, self.values, self.centroids, self.offsets, self.window_keys,
            self.window_values, self.thr, self.coarse_centroids if self.hier else None,
            self.coarse_offsets if self.hier else None, self.coarse_thr if self.hier else None, None,
            *(None,) * 7, self.scale, True, self.budget, self.block_q)
        return out + 0.0


@pytest.mark.parametrize("m,hier,budget", [(1, False, 0), (70, False, 0), (1, True, 0), (70, True, 200)])
def test_reduce_overhead_runs_sqz_kernels(m, hier, budget):
    import sqz_compile  # noqa: F401
    from torch._inductor.utils import run_and_get_code
    from sqz_compile.kernels.lookup import launch as lookup_launch

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cs = make_case(b=2, h=2, g=4, m=m, d=128, n=3001, c=150, w=20, mask="causal",
                   dtype=torch.bfloat16, coarse=30 if hier else 0, device="cuda", seed=m)
    thr = threshold_for_keep(cs, 0.2, 64)
    # the coarse level keeps about half of its clusters (a fixed -5 kept almost none here)
    cthr = coarse_threshold_for_keep(cs, 0.5, 64) if hier else None
    mod = SqzAttention(cs, thr, budget, 64, cthr).cuda()
    compiled = torch.compile(mod, mode="reduce-overhead")
    out, codes = run_and_get_code(compiled, cs.q, cs.k_new, cs.v_new)
    code = "\n".join(codes)
    names = ["_sparse_attn_kernel", "_lse_kernel", "_best_kernel", "_compact_kernel"]
    if m == 1:  # a decode batch (B = 2) takes the union read (kernels/union/); in flat threshold
        # mode with its lookup per group of rows, else from the per-row lookup's lists
        names = ["_sparse_attn_kernel", "_union_pos_kernel", "_union_attn_kernel", "_merge_kernel"]
        names += (["_lse_kernel", "_best_kernel", "_compact_kernel", "_mark_kernel"] if hier or budget
                  else ["_group_lse_kernel", "_group_words_kernel"])
    for name in names:
        assert name in code, f"{name} not in Inductor's generated code"
    sel = lookup_launch.lookup(cs.q, cs.centroids, cs.offsets, thr, cs.coarse_centroids, cs.coarse_offsets,
                      cthr, cs.scale, 64, budget)
    ref = reference_with_selection(cs, sel.idx, 64)
    assert int(sel.count.sum()) > 0  # the selection is not empty: the test can tell kernels apart
    for _ in range(3):  # replays of the recorded CUDA graph, on fresh inputs of the same shapes
        out = compiled(cs.q, cs.k_new, cs.v_new).clone()
        assert rel_err(out, ref) < 1e-2
    q2 = torch.randn_like(cs.q)
    out2 = compiled(q2, cs.k_new, cs.v_new).clone()
    sel2 = lookup_launch.lookup(q2, cs.centroids, cs.offsets, thr, cs.coarse_centroids, cs.coarse_offsets,
                       cthr, cs.scale, 64, budget)
    cs.q = q2
    assert rel_err(out2, reference_with_selection(cs, sel2.idx, 64)) < 1e-2
    skips = torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)
    assert skips == 0, "Inductor skipped CUDA graphs"
