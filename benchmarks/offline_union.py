"""The union-read decode path's Triton kernels compiled for sm_90 on a machine without a GPU, as
benchmarks/offline_sass.py does for the sparse attention kernel. union/launch.py itself runs on
meta tensors with its `launch` recording each call (so the constexprs, warps and stages are the
launcher's own, for 132 SMs), and every recorded launch is compiled with the argument
specialization triton's JIT would give it (ints equal to 1 constant, ints and 16-byte aligned
pointers divisible by 16). Per kernel: registers, stack and local loads/stores (spills) from the
cubin, shared memory against sm_90's 227 KB per block, instruction counts (offline_sass's
`loop_counts`: the largest loop body).

Each case is B:N[:key=value...]: batch rows and context keys; keys d (head dim, 128), s (new
keys per row, 1), mode (thr: the flat threshold lookup per group, the default; sel: a lookup's
lists through `_mark_kernel`), var (1/0: [mean, variance] centroids, the default 1), pos (1/0:
force the union's position list on/off). Llama-3-8B attention: 32 query heads over 8 KV heads,
bf16, clusters 5% of the context, a 116-key window, no attention mask.

    python benchmarks/offline_union.py 8:131072 32:131072 32:32768:mode=sel 32:131072:d=80
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_sass import loop_counts  # noqa: E402  (also: no interpreter, sys.path to the repo)

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sqz_compile.kernels.attention import launch as KA  # noqa: E402
from sqz_compile.kernels.lookup.launch import Selection  # noqa: E402
from sqz_compile.kernels.union import launch as KU  # noqa: E402

SMS = 132  # H200
SMEM_LIMIT = 227 * 1024
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def record(b: int, n: int, d: int = 128, s: int = 1, mode: str = "thr", var: int = 1, pos: int = -1):
    """The launches (kernel, args, kwargs) of one union-read decode call, on meta tensors."""
    calls = []
    for mod in (KU, KA):
        mod.launch = lambda kernel, grid, *args, **kw: calls.append((kernel, args, kw))
        mod.check_device = lambda *ts: None
    KU.sm_count = lambda t: SMS
    h, hq, c, w = 8, 32, max(1, round(0.05 * n)), 116

    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, device="meta", dtype=dtype)

    q = t(b, hq, 1, d)
    cfg = KU.union_config(b, h, hq // h, n, w, s, d, SMS)
    if pos >= 0:
        cfg = cfg._replace(pos_list=bool(pos))
    args = (q, t(b, h, s, d), t(b, h, s, d), None, t(h, n, d), t(h, n, d), t(h, c + 1, dtype=torch.int32))
    rest = (t(h, w, d), t(h, w, d), d ** -0.5, True, 64)
    if mode == "sel":
        sel = Selection(t(b, h, 1, c, dtype=torch.int32), t(b, h, 1, dtype=torch.int32), None, None, None)
        KU.union_decode_attention(*args, sel, *rest, config=cfg)
    else:
        lookup = (t(h, c, 2 * d if var else d), t(2, dtype=torch.float32))
        KU.union_decode_attention(*args, None, *rest, config=cfg, lookup=lookup)
    return cfg, calls


def compile_call(kernel, args, kw):
    """triton.compile of one recorded launch for sm_90, specialized as the JIT would."""
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if i < len(args):
            a = args[i]
        elif name in kw:
            sig[name], constexprs[name] = "constexpr", kw[name]
            continue
        else:
            sig[name], constexprs[name] = "constexpr", kernel.params[i].default
            continue
        if isinstance(a, torch.Tensor):
            ty = native_specialize_impl(BaseBackend, torch.empty(1, dtype=a.dtype), False, True, True)[0]
            key = "D" if a.storage_offset() * a.element_size() % 16 == 0 else ""
        else:
            ty, key = native_specialize_impl(BaseBackend, a, False, True, True)
        sig[name] = ty
        if ty == "constexpr":
            constexprs[name] = key
        elif key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    opts = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw}
    ck = triton.compile(ASTSource(kernel, sig, constexprs, attrs),
                        target=GPUTarget("cuda", 90, 32), options=opts)
    const = {k: v for k, v in constexprs.items() if kernel.params[kernel.arg_names.index(k)].is_constexpr}
    return ck, const, dict(warps=ck.metadata.num_warps, stages=ck.metadata.num_stages)


def ctas_per_sm(regs: int, shared: int, warps: int) -> int:
    """Resident programs per sm_90 SM: 64K registers (256 per warp granule), 228 KB of shared
    memory (1 KB reserved per block), 64 warps, 32 blocks."""
    by_regs = 65536 // (-(-regs * 32 // 256) * 256 * warps)
    by_smem = 228 * 1024 // (shared + 1024)
    return min(by_regs, by_smem, 64 // warps, 32)


def resources(ck) -> dict:
    """Registers / stack from the cubin, local loads/stores in the whole SASS, the largest loop."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        use = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                             text=True, check=True).stdout
        sass_path = os.path.join(tmp, "k.sass")
        lc = loop_counts(ck, sass_path)
        with open(sass_path) as f:
            sass = f.read()
    fields = dict(kv.split(":") for line in use.splitlines() if "REG:" in line for kv in line.split())
    return dict(regs=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]),
                ldl=sass.count("LDL"), stl=sass.count("STL"), shared=ck.metadata.shared,
                smem_ok=ck.metadata.shared <= SMEM_LIMIT,
                ctas=ctas_per_sm(int(fields["REG"]), ck.metadata.shared, ck.metadata.num_warps),
                total=lc["total"], loop=lc["loop"],
                loop_ldl=lc["ldl"], loop_stl=lc["stl"])


def main() -> None:
    seen = {}
    for spec in sys.argv[1:] or ["8:131072", "32:131072", "8:32768", "32:32768"]:
        b, n, *rest = spec.split(":")
        kw = {k: (v if k == "mode" else int(v)) for k, v in (item.split("=") for item in rest)}
        cfg, calls = record(int(b), int(n), **kw)
        for kernel, args, kwargs in calls:
            name = kernel.__name__
            row = dict(case=spec, triton=triton.__version__, kernel=name)
            try:
                ck, const, opts = compile_call(kernel, args, kwargs)
                row.update(const=const, **opts)
                if ck.hash not in seen:
                    seen[ck.hash] = resources(ck)
                row.update(ok=True, **seen[ck.hash])
            except Exception as e:  # noqa: BLE001  (report every kernel, failed or not)
                row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
            print(json.dumps(row, default=str), flush=True)


if __name__ == "__main__":
    main()
