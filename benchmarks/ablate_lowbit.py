"""Where the low-bit attention kernel's time goes, without hardware counters: time variants that
leave one stage of the in-register dequantization out (outputs wrong, timing only; NOTES v15).

VARIANT is `base` or any of these joined by `_`: `norope` (cos 1, sin 0: no angle reduction or
sin/cos), `nogather` (the code itself as the level: no codebook gather), `noout` (a context
quantized without outliers: no outlier loads or compare/select per entry), `nokey` (no packed key
reads, unpack, scales, outliers or RoPE), `noval` (the same for values), `pairs` (2 and 4 bits:
the tiles dequantized on fp16 pair words, attention launch PAIRS; the stubs above replace the
per-entry helpers and do not apply to it). One variant per
process: Triton hashes a kernel's dependencies once, so the helpers are swapped before the first
launch. Inputs are bench_attention's synthetic 8B-shaped context (2 copies, keep 10%), cached in
/tmp between processes. `--cfg BLOCK_N,WARPS,STAGES,SPLITS[,MAXNREG[,BQ]]` overrides the launcher's
shapes (SPLITS multiplies its split count; BQ: queries per tile and head); `--ncu` only launches three times (for ncu -k).
Env: ABL_N (context, 131072), ABL_KIND (decode or prefill).

    python benchmarks/ablate_lowbit.py 4 nokey_noval
    ABL_KIND=prefill python benchmarks/ablate_lowbit.py 4 base --cfg 64,8,2,1
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import bench_attention as BA  # noqa: E402
from sqz_compile.kernels.attention import launch as KA  # noqa: E402
from sqz_compile.kernels.attention import triton as SA  # noqa: E402
from sqz_compile.kernels.lookup import launch as KL  # noqa: E402
from sqz_compile.kernels.quant import triton as QT  # noqa: E402


@triton.jit
def _sincos_none(a, FAST: tl.constexpr):
    return a * 0.0 + 1.0, a * 0.0


@triton.jit
def _levels_none(code, CB, QBITS: tl.constexpr, FAST: tl.constexpr):
    return code.to(tl.float32)


@triton.jit
def _keys_none(Pk, CB, KNorm, OIdx, OVal, Perm, Rope, h, pos, pok, N, length,
               BLOCK_N: tl.constexpr, HALF: tl.constexpr, QBITS: tl.constexpr,
               NOUT: tl.constexpr, FAST: tl.constexpr):
    z = (pos[:, None] * 0 + tl.arange(0, HALF)[None, :]).to(tl.float32) * 1e-3
    return z, z


@triton.jit
def _values_none(Pv, CB, VNorm, OIdx, OVal, h, pos, pok, N, P, D, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, QBITS: tl.constexpr, NOUT: tl.constexpr, FAST: tl.constexpr,
                 HALVES: tl.constexpr = False):
    return (pos[:, None] * 0 + tl.arange(0, BLOCK_D)[None, :]).to(tl.float32) * 1e-3


def main():
    bits, variant = int(sys.argv[1]), sys.argv[2]
    ncu = "--ncu" in sys.argv
    cfgx = None
    if "--cfg" in sys.argv:
        cfgx = [float(x) if "." in x else int(x) for x in sys.argv[sys.argv.index("--cfg") + 1].split(",")]
    if "norope" in variant:
        QT._sincos = _sincos_none
    if "nogather" in variant:
        QT._code_levels = _levels_none
    if "nokey" in variant:
        SA.key_halves = _keys_none
    if "noval" in variant:
        SA.value_rows = _values_none
    KA.PAIRS = "pairs" in variant
    n = int(os.environ.get("ABL_N", 131072))
    kind = os.environ.get("ABL_KIND", "decode")
    if not torch.cuda.is_available():
        BA.DEVICE["dev"] = "cpu"
    noout = "noout" in variant
    if noout:
        quantize = BA.quantize_context
        BA.quantize_context = lambda ctx, b: quantize(ctx, b, outliers=0.0)
    path = f"/tmp/abl_{kind}_{bits}_{n}{'_noout' if noout else ''}.pt"
    t0 = time.time()
    if os.path.exists(path):
        ctxs, qs, kns, vns, thrs = torch.load(path)
    else:
        ctxs, qs, kns, vns, thrs = BA.step_inputs(kind, n, 0.10, 2, bits)
        for c in ctxs:  # only what the attention needs
            for k in ("keys", "values", "centroids", "dirs") if bits < 16 else ("centroids", "dirs"):
                c.pop(k, None)
        torch.save((ctxs, qs, kns, vns, thrs), path)
    tin = time.time() - t0
    m, s = BA.NEW_TOKENS[kind]
    base = KA.attention_config(1, BA.H, BA.G, m, BA.BLOCK_Q, n, BA.W, s, BA.D, KA.sm_count(qs[0]),
                               bits if bits < 16 else 0)
    cfg = base
    if cfgx:
        cfg = base._replace(block_n=cfgx[0], num_warps=cfgx[1], num_stages=cfgx[2], split=max(1, round(base.split * cfgx[3])),
                            fixed=True, maxnreg=cfgx[4] if len(cfgx) > 4 else 0,
                            bq=cfgx[5] if len(cfgx) > 5 else base.bq)
    sels = [KL.lookup(q, c["lookup_centroids"], c["offsets"], t, None, None, None, BA.SCALE, BA.BLOCK_Q, 0,
                      positions=n) for c, q, t in zip(ctxs, qs, thrs)]
    kept = sels[0].nkeys.float().sum().item()
    steps = []
    for c, q, kn, vn, sel in zip(ctxs, qs, kns, vns, sels):
        lb = c.get("low_bit")
        kc = lb["keys"] if lb else c["keys"]
        vc = lb["values"] if lb else c["values"]
        steps.append(lambda c=c, q=q, kn=kn, vn=vn, sel=sel, lb=lb, kc=kc, vc=vc: KA.sparse_attention(
            q, kn, vn, None, kc, vc, sel, c["window_keys"], c["window_values"], BA.SCALE, kind == "prefill", BA.BLOCK_Q,
            config=cfg, quant=lb["quant"] if lb else None))
    if not torch.cuda.is_available():
        print(variant, steps[0]().float().norm().item())
        return
    if ncu:
        for _ in range(3):
            steps[0]()
        torch.cuda.synchronize()
        return
    us = BA.graph_time(steps) * 1e3
    kt = BA.kernel_times(steps)
    print(f"{kind} bits={bits} variant={variant} cfg={tuple(cfg)} attn_us={us:.1f} kept_keys={kept:.0f} "
          f"kernels={kt} inputs_s={tin:.0f}", flush=True)


if __name__ == "__main__":
    main()
