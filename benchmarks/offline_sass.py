"""The sparse attention kernel compiled for sm_90 on a machine without a GPU (triton's bundled
ptxas and nvdisasm): SASS instruction counts of its hottest loop (the context loop), per
instruction class, and shared memory. The counts in benchmarks/NOTES.md "q3" (it gives the
"v11-lowbit" 4-bit decode loop within 1%); for comparing layouts before a GPU run, not instead.

Each case is BITS:MODE[:key=value...]: BITS 16 (the bf16 context), 4, 3 or 2; MODE decode (one
query) or prefill (1024 queries), warps and stages as the launcher picks them; keys d (head dim,
128), halves (1/0, default: as the launcher picks), fast (1/0: the PTX codebook gather and
sin/cos), pairs (1/0: 2/4 bits on fp16 pair words; default as the launcher, whose PAIRS flag is
off until checked on a GPU), nout (outliers per row, 1), warps, stages, bn (keys per tile),
bq (queries per tile and head), maxnreg (ptxas register cap; 0 for none): the launcher's
(attention_config) unless given. Shapes: 8 KV heads x 4 query heads each, POS_LIST, bf16.
Prints the registers and stack (spill) bytes per thread too.

    python benchmarks/offline_sass.py 4:decode 3:decode 2:decode 3:prefill 3:decode:d=64
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sqz_compile.kernels.attention import launch as KA  # noqa: E402
from sqz_compile.kernels.attention import triton as SA  # noqa: E402
from sqz_compile.kernels.quant.reference import packed_words  # noqa: E402
from sqz_compile.kernels.quant.triton import halves as halves_path  # noqa: E402


def compile_case(qbits: int, decode: bool, d: int = 128, halves: bool | None = None, fast: bool = True,
                 nout: int = 1, warps: int | None = None, stages: int | None = None, bn: int | None = None,
                 maxnreg: int | None = None, pairs: bool | None = None, bq: int | None = None):
    """The compiled kernel of one case (signature, constexprs and divisibility as the launcher's
    JIT would specialize them at 128K context)."""
    fn = SA._sparse_attn_kernel
    halves = halves_path(d, qbits) if halves is None and qbits else bool(halves)
    p = packed_words(d, qbits) if qbits else d
    n, h, g, m = 112000, 8, 4, 1 if decode else 1024
    block_d = 1 << (d - 1).bit_length()
    ptr = dict(Q="*bf16", Kn="*bf16", Vn="*bf16", Mask="*u8", Kc="*i32" if qbits else "*bf16",
               Vc="*i32" if qbits else "*bf16", Kw="*bf16", Vw="*bf16", Cum="*i32", Delta="*i32",
               NKeys="*i32", Pos="*i32", Out="*bf16", PartO="*fp32", PartL="*fp32", Perm="*i32",
               Rope="*fp32", CB="*fp32", KNorm="*fp32", VNorm="*fp16", OIdx="*i16", OVal="*fp16", Tab="*i32")
    ints = dict(P=p, NLEV=1 << qbits if qbits else 1,
                sqb=h * g * m * d, sqh=m * d, sqm=d, skb=h * m * d, skh=m * d, sks=d, svb=h * m * d, svh=m * d,
                svs=d, smb=0, smh=0, smm=0, sms=0, skch=n * p, skcn=p, svch=n * p, svcn=p,
                swkh=116 * d, swkn=d, swvh=116 * d, swvn=d, sob=h * g * m * d, soh=m * d, som=d,
                B=1, H=h, G=g, M=m, S=m, W=116, NB=1 if decode else 16, C=6000, NPOS=n, block_q=64,
                TPB=1 if decode else 64 // (bq or 32), SPLIT=33 if decode else 1, D=d)
    cfg = KA.attention_config(1, h, g, m, 64, n, 116, m, d, 132, qbits)
    bn = bn or cfg.block_n
    const = dict(BQ=bq or (4 if decode else 32), GP=g, BLOCK_N=bn, BLOCK_D=block_d, MASK_KIND=0, IS_CAUSAL=True,
                 PARTIAL=decode, IEEE=False, SEARCH=128, POS_LIST=True, QBITS=qbits, NOUT=nout,
                 HALVES=halves, FAST=fast,
                 PAIRS=(KA.PAIRS and halves and qbits in (2, 4)) if pairs is None else pairs)
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name], constexprs[name] = "constexpr", const[name]
        elif name in ptr:
            sig[name], attrs[(i,)] = ptr[name], [["tt.divisibility", 16]]
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif ints[name] == 1:  # the JIT specializes ints equal to 1
            sig[name], constexprs[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    warps = warps or cfg.num_warps
    stages = stages or KA._stages(cfg, qbits, halves)
    maxnreg = cfg.maxnreg if maxnreg is None else maxnreg
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {})))


_INS = re.compile(r"\s+/\*[0-9a-f]{4,}\*/")


def loop_counts(kernel, sass_path: str | None = None) -> dict:
    """Instruction counts of the largest loop body (the largest backward branch) and the whole."""
    import tempfile

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
        cuobjdump = os.path.join(os.path.dirname(nvdisasm), "cuobjdump")
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    if sass_path:
        with open(sass_path, "w") as out:
            out.write(sass)
    ins, label_at = [], {}
    for line in sass.splitlines():
        lab = re.match(r"\.L_x_(\d+):", line.strip())
        if lab:
            label_at[lab.group(1)] = len(ins)
        elif _INS.match(line):
            ins.append(line)
    loops = []
    for i, line in enumerate(ins):
        b = re.search(r"BRA[^;]*\.L_x_(\d+)", line)
        if b and label_at.get(b.group(1), i + 1) <= i:
            loops.append((i - label_at[b.group(1)] + 1, label_at[b.group(1)], i))
    size, lo, hi = max(loops) if loops else (0, 0, -1)
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    body = ins[lo:hi + 1]

    def count(pattern):
        return sum(1 for line in body if re.search(pattern, line))

    return dict(regs=int(regs.group(1)) if regs else None, stack=int(stack.group(1)) if stack else None,
                total=len(ins), loop=size, ldg=count(r"\bLDG"), lds=count(r"\bLDS"), ldl=count(r"\bLDL"),
                stl=count(r"\bSTL"), mufu=count(r"MUFU"), sel=count(r"\bF?SEL\b"),
                shift_logic=count(r"\bSHF|\bLOP3|\bSGXT"), shared=kernel.metadata.shared)


def main() -> None:
    cases = sys.argv[1:] or ["4:decode", "3:decode", "2:decode", "4:prefill", "3:prefill", "2:prefill"]
    for spec in cases:
        bits, mode, *rest = spec.split(":")
        kw = {}
        for item in rest:
            k, v = item.split("=")
            kw[k] = v == "1" if k in ("halves", "fast", "pairs") else int(v)
        qbits = 0 if int(bits) >= 16 else int(bits)
        counts = loop_counts(compile_case(qbits, mode == "decode", **kw))
        print(json.dumps({"case": spec, "triton": triton.__version__, **counts}), flush=True)


if __name__ == "__main__":
    main()
