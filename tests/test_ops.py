"""The sqz custom ops: torch.library.opcheck (schema, fake impl, autograd registration, AOT
dispatch) and agreement of the op with dense attention at keep = 1."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sqz_compile  # noqa: F401  (registers torch.ops.sqz)


def _case(seed: int, b=2, hq=4, h=2, m=5, s=5, d=8, n=40, c=6, w=3, coarse=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    sizes = torch.randint(0, 2 * n // c, (h, c), generator=g)
    sizes[:, -1] += n - sizes.sum(1)  # rows sum to n (last cluster absorbs the rest)
    sizes = sizes.clamp(min=0)
    offsets = torch.cat([torch.zeros(h, 1, dtype=torch.long), sizes.cumsum(1)], 1).to(torch.int32)
    n_eff = int(offsets[:, -1].max())
    ctx_k, ctx_v = r(h, n_eff, d), r(h, n_eff, d)
    offsets[:, -1] = n_eff
    cc = dict(coarse_centroids=None, coarse_offsets=None, coarse_log_threshold=None)
    if coarse:
        cc = dict(coarse_centroids=r(h, 2, d), coarse_offsets=torch.tensor([[0, 3, c]] * h, dtype=torch.int32),
                  coarse_log_threshold=torch.tensor(-4.0))
    return dict(q=r(b, hq, m, d), k_new=r(b, h, s, d), v_new=r(b, h, s, d), ctx_keys=ctx_k,
                ctx_values=ctx_v, centroids=r(h, c, d), offsets=offsets, window_keys=r(h, w, d),
                window_values=r(h, w, d), **cc)


def _args(t, thr, mask=None, causal=True, budget=0, block_q=2, max_dropped_mass=0.0):
    radii = torch.rand(t["centroids"].shape[:2], generator=torch.Generator().manual_seed(9)) * 3
    return (t["q"], t["k_new"], t["v_new"], mask, t["ctx_keys"], t["ctx_values"], t["centroids"],
            t["offsets"], t["window_keys"], t["window_values"], torch.tensor(thr),
            t["coarse_centroids"], t["coarse_offsets"], t["coarse_log_threshold"], radii,
            *(None,) * 7, t["q"].shape[-1] ** -0.5, causal, budget, block_q, max_dropped_mass)


def _low_bit(t, args, bits=4):
    """args with the context K/V packed in `bits` bits (taken as post-RoPE at positions 0..N-1)."""
    from sqz_compile.config import SqueezeConfig
    from sqz_compile.squeeze.quantize import RopeTable, low_bit_fields

    h, n, d = t["ctx_keys"].shape
    perm = torch.arange(n, dtype=torch.int32).expand(h, n).contiguous()
    f = low_bit_fields(t["ctx_keys"][None], t["ctx_values"][None], perm[None], torch.ones(1, h, n), n + 3,
                       RopeTable(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))),
                       SqueezeConfig(kv_bits=bits, kv_outliers=0.1))
    quant = [perm] + [f[k][0] for k in ("rope", "codebooks", "key_norm", "value_norm", "outlier_idx", "outlier_val")]
    return (*args[:4], f["keys"][0], f["values"][0], *args[6:15], *quant, *args[22:])


@pytest.mark.parametrize("variant", ["threshold", "budget", "hierarchical", "bool_mask", "float_mask", "error_bounded",
                                     "low_bit"])
def test_opcheck_squeezed_attention(variant):
    t = _case(0, coarse=variant == "hierarchical")
    mask, causal = None, True
    if variant == "bool_mask":
        mask, causal = torch.rand(2, 1, 5, 5) > 0.3, False
    if variant == "float_mask":
        mask, causal = torch.randn(1, 4, 5, 5), False
    args = _args(t, -3.0, mask, causal, budget=12 if variant == "budget" else 0,
                 max_dropped_mass=0.05 if variant == "error_bounded" else 0.0)
    if variant == "low_bit":
        args = _low_bit(t, args)
    torch.library.opcheck(torch.ops.sqz.squeezed_attention.default, args)


def test_opcheck_select_clusters():
    t = _case(1)
    args = (t["q"], t["centroids"], t["offsets"], torch.tensor(-3.0), None, None, None,
            t["q"].shape[-1] ** -0.5, 2, 0)
    torch.library.opcheck(torch.ops.sqz.select_clusters.default, args)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_all_equals_dense_sdpa(seed):
    t = _case(seed, m=7, s=7)
    out = torch.ops.sqz.squeezed_attention(*_args(t, float("-inf"), block_q=3))
    b, h = t["q"].shape[0], t["ctx_keys"].shape[0]
    keys = torch.cat([t["ctx_keys"][None].expand(b, -1, -1, -1), t["window_keys"][None].expand(b, -1, -1, -1),
                      t["k_new"]], 2)
    vals = torch.cat([t["ctx_values"][None].expand(b, -1, -1, -1),
                      t["window_values"][None].expand(b, -1, -1, -1), t["v_new"]], 2)
    fixed = keys.shape[2] - 7
    allowed = torch.ones(7, keys.shape[2], dtype=torch.bool)
    allowed[:, fixed:] = torch.ones(7, 7, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(t["q"].double(), keys.double(), vals.double(), attn_mask=allowed,
                                         enable_gqa=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_backward_is_refused_clearly():
    t = _case(3)
    args = list(_args(t, -3.0))
    args[0] = args[0].clone().requires_grad_()
    out = torch.ops.sqz.squeezed_attention(*args)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


def test_op_launcher_and_onnx_translation_follow_the_one_context_schema():
    """The op, its CUDA launcher and its ONNX translation take the context in CONTEXT_ARGS order
    (the rewrite and the fixtures zip it with LayerContext, which defines it)."""
    from sqz_compile.context import CONTEXT_ARGS, LayerContext
    from sqz_compile.export.onnx import sqz_squeezed_attention
    from sqz_compile.ops import context_params

    assert LayerContext._fields == CONTEXT_ARGS
    schema = torch.ops.sqz.squeezed_attention.default._schema.arguments[4:4 + len(CONTEXT_ARGS)]
    assert tuple(a.name.removeprefix("ctx_") for a in schema) == CONTEXT_ARGS
    assert context_params(sqz_squeezed_attention) == CONTEXT_ARGS
    launch = pytest.importorskip("sqz_compile.kernels.attention.launch")
    assert context_params(launch.squeezed_attention) == CONTEXT_ARGS
