"""Low-bit context K/V in the kernels: the Triton dequant helpers and the sparse attention
kernel's QBITS path equal the float64 reference (kernels/quant/reference.py) over odd sizes, head
dims 64/80/96/128, 4/3/2 bits, outliers present and absent, decode and prefill, into poisoned
outputs. Interpreter on CPU (TRITON_INTERPRET=1), or CUDA."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from sqz_compile.config import SqueezeConfig  # noqa: E402
from sqz_compile.kernels.attention import launch as attention_launch  # noqa: E402
from sqz_compile.kernels.attention.reference import selection_from_compact, squeezed_attention_reference  # noqa: E402
from sqz_compile.kernels.lookup import launch as lookup_launch  # noqa: E402
from sqz_compile.kernels.quant.reference import dequantize_context  # noqa: E402
from sqz_compile.kernels.quant.triton import dequantize_layer, halves, sincos  # noqa: E402
from sqz_compile.squeeze.quantize import RopeTable, low_bit_fields  # noqa: E402

from cases import make_case, rel_err, threshold_for_keep  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)


FAST = [False, True] if DEV == "cuda" else [False]  # PTX sin/cos.approx and gather: CUDA only


def low_bit_case(cs, bits: int, outliers: float, datatype: str = "nuq", seed: int = 0, length: int = 0):
    """The case's context K/V (taken as post-RoPE keys at random positions of a context of
    `length` tokens, default n + 7) quantized as squeeze does: (packed keys, packed values, perm,
    rope, codebooks, key_norm, value_norm, outlier_idx, outlier_val) of one layer."""
    gen = torch.Generator().manual_seed(seed)
    h, n, d = cs.keys.shape
    length = length or n + 7
    perm = torch.stack([torch.randperm(length, generator=gen)[:n] for _ in range(h)]).to(torch.int32)
    rope = RopeTable(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)), 1.07)
    w = torch.rand(1, h, n, generator=gen)
    # scale a few entries up so that outliers matter
    keys, values = cs.keys.float().cpu().clone(), cs.values.float().cpu().clone()
    keys[:, ::5, 3] *= 8
    values[:, 2::7, -1] *= 8
    f = low_bit_fields(keys[None], values[None], perm[None], w, length, rope,
                       SqueezeConfig(kv_bits=bits, kv_datatype=datatype, kv_outliers=outliers))
    one = lambda t: None if t is None else t[0].to(DEV)  # noqa: E731
    return (one(f["keys"]), one(f["values"]), perm.to(DEV), one(f["rope"]), one(f["codebooks"]),
            one(f["key_norm"]), one(f["value_norm"]), one(f["outlier_idx"]), one(f["outlier_val"]))


@pytest.mark.parametrize("fast", FAST, ids=lambda f: "fast" if f else "libm")
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("bits,outliers,datatype", [(4, 0.01, "nuq"), (3, 0.0, "int"), (3, 0.02, "nuq"),
                                                    (2, 0.03, "nuq")])
def test_dequant_helpers_match_reference(d, bits, outliers, datatype, fast):
    cs = make_case(h=2, n=37, c=5, d=d, device="cpu", seed=d + bits)
    lb = low_bit_case(cs, bits, outliers, datatype)
    k_ref, v_ref = dequantize_context(*lb, d)
    k, v = dequantize_layer(*lb, d, fast=fast)
    assert rel_err(k, k_ref) < 1e-6 and rel_err(v, v_ref) < 1e-6


def test_halves_paths():
    """Which keys unpack by shifts in whole half-rows (HALVES): 2, 3 (two bit planes) and 4 bits
    at head dims 64 and 128; padded head dims (80, 96) take the per-entry path at every width."""
    for bits in (2, 3, 4):
        assert halves(64, bits) and halves(128, bits)
        assert not halves(80, bits) and not halves(96, bits)
    assert not halves(32, 3) and halves(256, 3) and halves(16, 4)  # 3 bits: 32 | D / 2


@pytest.mark.parametrize("fast", FAST, ids=lambda f: "fast" if f else "libm")
@pytest.mark.parametrize("d,bits", [(128, 4), (64, 2), (96, 4), (128, 3)])
def test_dequant_helpers_at_long_context_positions(d, bits, fast):
    """Keys at positions of a 128K-token context: RoPE angles up to ~1.3e5 rad, reduced in the
    kernel (`_sincos`), still equal the float64 rotation of the same float32 angles."""
    cs = make_case(h=2, n=40, c=5, d=d, device="cpu", seed=bits)
    lb = low_bit_case(cs, bits, 0.01, length=131072 + 100)
    assert int(lb[2].max()) > 100000
    k_ref, v_ref = dequantize_context(*lb, d)
    k, v = dequantize_layer(*lb, d, fast=fast)
    assert rel_err(k, k_ref) < 1e-6 and rel_err(v, v_ref) < 1e-6


@pytest.mark.parametrize("fast", FAST, ids=lambda f: "fast" if f else "libm")
def test_sincos_reduction_matches_float64(fast):
    """`_sincos` of float32 angles up to 1e6 rad (a 1M-token context at inv_freq 1) against
    float64 cos/sin of the same float32 values: the two-FMA reduction loses ~1e-7 rad, the fast
    hardware approximations ~7e-7 more; both far below a bf16 key's rounding (~4e-3)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.cat([torch.linspace(-1e6, 1e6, 4001), (torch.rand(4000, generator=gen) - 0.5) * 2.7e5,
                   torch.tensor([0.0, 3.1415925, -3.1415927, 6.2831855, 131071.0, -131072.0])]).float()
    c, s = sincos(a.to(DEV), fast=fast)
    ad = a.double()
    err = max(float((c.double().cpu() - ad.cos()).abs().max()), float((s.double().cpu() - ad.sin()).abs().max()))
    assert err < (1e-6 if fast else 3e-7)


ATTN = [
    dict(kw=dict(mask="causal", b=2, h=2, g=2, m=7, d=64, n=45, c=6), bits=4, out=0.01),
    dict(kw=dict(mask="bool", b=1, h=2, g=3, m=5, s=6, d=80, n=33, c=5), bits=3, out=0.0),
    dict(kw=dict(mask="causal", b=2, h=1, g=4, m=1, s=1, d=96, n=29, c=7), bits=2, out=0.02),  # decode
    dict(kw=dict(mask="none", b=1, h=2, g=2, m=1, s=3, d=128, n=41, c=5), bits=4, out=0.0),   # decode
    dict(kw=dict(mask="float", b=1, h=2, g=1, m=9, d=128, n=23, c=4), bits=3, out=0.02),
    # 3 bits on the HALVES path (two bit planes), odd cluster sizes: decode and prefill, with and
    # without outliers
    dict(kw=dict(mask="causal", b=2, h=1, g=4, m=1, s=1, d=64, n=39, c=7), bits=3, out=0.03),  # decode
    dict(kw=dict(mask="causal", b=1, h=2, g=2, m=6, d=64, n=27, c=5), bits=3, out=0.0),
    dict(kw=dict(mask="none", b=1, h=2, g=2, m=1, s=3, d=128, n=35, c=6), bits=3, out=0.0),   # decode
    dict(kw=dict(mask="causal", b=2, h=2, g=1, m=5, d=96, n=31, c=4), bits=3, out=0.02),
]


@pytest.mark.parametrize("case", ATTN, ids=lambda c: f"d{c['kw']['d']}-m{c['kw']['m']}-b{c['bits']}-o{c['out']}")
@pytest.mark.parametrize("split,pos_list", [(1, False), (3, True), (None, None)],
                         ids=["search", "pos_list-split3", "launcher-config"])
def test_low_bit_attention_matches_reference(case, split, pos_list):
    """Kernel vs float64 reference; "launcher-config": the launch shapes the launcher picks for a
    low-bit context (decode: 16- or 32-key tiles under a register cap on the GPU)."""
    block_q = 4
    seed = 7 if split is None else split
    cs = make_case(**case["kw"], device=DEV, seed=seed + case["bits"])
    lb = low_bit_case(cs, case["bits"], case["out"], seed=seed)
    keys64, values64 = dequantize_context(*[None if t is None else t.cpu() for t in lb], cs.q.shape[3])
    cs.keys, cs.values = keys64.float().to(DEV), values64.float().to(DEV)  # centroids stay: selection only
    thr = threshold_for_keep(cs, 0.5, block_q)
    sel = lookup_launch.lookup(cs.q, cs.centroids, cs.offsets, thr, None, None, None, cs.scale, block_q, 0)
    b, hq, m, d = cs.q.shape
    h, n = lb[0].shape[:2]
    cfg = attention_launch.attention_config(b, h, hq // h, m, block_q, n, cs.window_keys.shape[1],
                                            cs.k_new.shape[2], d, 4, case["bits"])
    if split is not None:
        cfg = cfg._replace(split=split, block_n=16, pos_list=pos_list, maxnreg=0)
    assert _attend_vs_reference(cs, lb, keys64, values64, sel, block_q, cfg) < 1e-5


def _attend_vs_reference(cs, lb, keys64, values64, sel, block_q, cfg=None) -> float:
    """rel_err of the kernel over the packed context lb (into a poisoned output) against the float64
    reference over its dequantized K/V, on the same selection."""
    out = torch.full_like(cs.q, float("nan"))
    attention_launch.sparse_attention(cs.q, cs.k_new, cs.v_new, cs.attn_mask, lb[0], lb[1], sel, cs.window_keys,
                                      cs.window_values, cs.scale, cs.is_causal, block_q, config=cfg, out=out,
                                      quant=lb[2:])
    am = cs.attn_mask
    am = am.double() if am is not None and am.dtype != torch.bool else am
    ref = squeezed_attention_reference(
        cs.q.double(), cs.k_new.double(), cs.v_new.double(), am, keys64.to(DEV), values64.to(DEV), cs.offsets,
        selection_from_compact(sel.idx, cs.centroids.shape[1]), cs.window_keys.double(),
        cs.window_values.double(), cs.scale, cs.is_causal, block_q)
    assert int(sel.nkeys.sum()) > 0
    return rel_err(out, ref)


LOW_PRECISION = [
    dict(kw=dict(mask="none", b=1, h=2, g=4, m=1, s=3, d=128, n=203, c=9), bits=4, out=0.01),  # decode
    dict(kw=dict(mask="causal", b=1, h=2, g=2, m=70, d=64, n=157, c=8), bits=4, out=0.02),
    dict(kw=dict(mask="causal", b=2, h=1, g=4, m=1, s=1, d=64, n=95, c=6), bits=4, out=0.0),   # decode
    dict(kw=dict(mask="none", b=1, h=2, g=4, m=1, s=3, d=128, n=181, c=7), bits=2, out=0.02),  # decode
    dict(kw=dict(mask="causal", b=1, h=1, g=2, m=40, d=128, n=77, c=5), bits=2, out=0.0),
    dict(kw=dict(mask="causal", b=1, h=2, g=4, m=1, s=1, d=64, n=113, c=6), bits=2, out=0.02),  # decode
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("pairs", [True, False], ids=["pairs", "per-entry"])
@pytest.mark.parametrize("case", LOW_PRECISION, ids=lambda c: f"d{c['kw']['d']}-m{c['kw']['m']}-b{c['bits']}-o{c['out']}")
def test_low_bit_attention_half_precision(case, pairs, dtype, monkeypatch):
    """bf16/fp16 models over a 4- or 2-bit context at the launcher's shapes, the tiles dequantized
    on fp16 pair words (PAIRS: per-program level table, scale/offset, outliers and RoPE on pairs)
    or per entry in float32: both equal the float64 reference within the model dtype's rounding. The GPU runs PAIRS as inline PTX, the
    interpreter the same arithmetic in Triton ops."""
    monkeypatch.setattr(attention_launch, "PAIRS", pairs)
    block_q = 16
    cs = make_case(**case["kw"], dtype=dtype, device=DEV, seed=11)
    lb = low_bit_case(cs, case["bits"], case["out"], seed=3)
    keys64, values64 = dequantize_context(*[None if t is None else t.cpu() for t in lb], cs.q.shape[3])
    cs.keys, cs.values = keys64.to(dtype).to(DEV), values64.to(dtype).to(DEV)
    thr = threshold_for_keep(cs, 0.5, block_q)
    sel = lookup_launch.lookup(cs.q, cs.centroids, cs.offsets, thr, None, None, None, cs.scale, block_q, 0)
    err = _attend_vs_reference(cs, lb, keys64, values64, sel, block_q)
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_low_bit_op_cpu_matches_dense_over_dequantized():
    """torch.ops.sqz.squeezed_attention with packed K/V (CPU branch) equals the op over the
    dequantized dense K/V, and a 16-bit tensor with low-bit arguments is refused."""
    import sqz_compile  # noqa: F401  (registers the ops)

    cs = make_case(b=1, h=2, g=2, m=3, d=64, n=31, c=4, device="cpu", seed=5)
    lb = low_bit_case(cs, 4, 0.01)
    lb = tuple(None if t is None else t.cpu() for t in lb)
    k64, v64 = dequantize_context(*lb, 64)
    thr = torch.tensor([-3.0, -3.0])
    rest = (cs.centroids, cs.offsets, cs.window_keys, cs.window_values, thr, None, None, None, None)
    got = torch.ops.sqz.squeezed_attention(cs.q, cs.k_new, cs.v_new, None, lb[0], lb[1], *rest, *lb[2:],
                                           cs.scale, True, 0, 4)
    want = torch.ops.sqz.squeezed_attention(cs.q, cs.k_new, cs.v_new, None, k64.float(), v64.float(), *rest,
                                            *([None] * 7), cs.scale, True, 0, 4)
    assert rel_err(got, want) < 1e-5
    with pytest.raises(RuntimeError, match="not packed int32"):
        torch.ops.sqz.squeezed_attention(cs.q, cs.k_new, cs.v_new, None, k64.float(), v64.float(), *rest,
                                         *lb[2:], cs.scale, True, 0, 4)


def test_low_bit_decode_shape_and_register_cap(monkeypatch):
    """Low-bit decode takes its own tiles under a register cap only where the launch can pass one:
    a direct launch, not the interpreter or a traced launch (fake tensors), which keep v13's
    uncapped 64-key shape, as do padded head dims; 16-bit decode and prefill are unchanged."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = (1, 8, 4, 1, 64, 131072, 128, 256, 128, 132)
    capped = attention_launch.attention_config(*shape, 4)
    assert capped.maxnreg == 128 and capped.block_n == attention_launch.LOWBIT_DECODE[4][0]
    plain = attention_launch.attention_config(*shape, 4, register_cap=False)
    assert plain == attention_launch.attention_config(*shape, 0)
    assert plain.maxnreg == 0 and plain.block_n == 64
    prefill = (1, 8, 4, 1024, 64, 131072, 128, 1024, 128, 132)
    assert attention_launch.attention_config(*prefill, 4) == attention_launch.attention_config(*prefill, 0)
    padded = shape[:8] + (96, 132)  # not HALVES: its per-entry gathers were never timed capped
    assert attention_launch.attention_config(*padded, 4) == attention_launch.attention_config(*padded, 0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert attention_launch._can_cap(torch.zeros(2))
    with FakeTensorMode():
        assert not attention_launch._can_cap(torch.zeros(2))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not attention_launch._can_cap(torch.zeros(2))
