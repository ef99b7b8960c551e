"""Decode at 128K on the GPU: how fast can the kept K/V rows be gathered at all, and how close
the attention kernel comes to that (benchmarks/NOTES.md v7).

A bare gather kernel (load the kept K and V rows through the position list, multiply-add, no
softmax) over 90 configs, then the sparse attention kernel over 48 configs (tile, warps,
stages, splits, maxnreg). Prints one JSON line per config and writes gather_ceiling.json.

    python benchmarks/gather_ceiling.py --out benchmarks/results/v7
"""
import argparse, json, os, sys
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch, triton, triton.language as tl
import bench_attention as B
from sqz_compile.kernels.attention import launch as KA, triton as SA  # noqa: E402
from sqz_compile.kernels.lookup import launch as KL  # noqa: E402
from sqz_compile.kernels.triton_common import launch  # noqa: E402

_ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
OUT = _ap.parse_args().out
res = []
def log(**kw):
    res.append(kw); print(json.dumps(kw), flush=True)
    json.dump(res, open(os.path.join(OUT, "gather_ceiling.json"), "w"), indent=1)

@triton.jit
def gather_sum(Pos, NKeys, Kc, Vc, Out, NPOS, H, skh, skn, SPLIT, BLOCK_N: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0); split = tl.program_id(1); h = row % H
    total = tl.load(NKeys + row); ntile = tl.cdiv(total, BLOCK_N)
    t0 = split * ntile // SPLIT; t1 = (split + 1) * ntile // SPLIT
    kk = tl.arange(0, BLOCK_N); d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_N, D], tl.float32)
    for t in range(t0, t1):
        v = t * BLOCK_N + kk
        ok = v < total
        pos = tl.load(Pos + row * NPOS + v, mask=ok, other=0)
        k = tl.load(Kc + h * skh + pos[:, None] * skn + d[None, :], mask=ok[:, None], other=0.0)
        vv = tl.load(Vc + h * skh + pos[:, None] * skn + d[None, :], mask=ok[:, None], other=0.0)
        acc += k.to(tl.float32) * vv.to(tl.float32)
    tl.store(Out + (row * SPLIT + split) * D + d, tl.sum(acc, 0))

n = 131072
bw = B.copy_bandwidth(); log(what="copy_bw_GBs", v=bw)
ctxs = [B.make_context(n, seed=i) for i in range(2)]
qs = [B.make_queries(c, 1, 100 + i) for i, c in enumerate(ctxs)]
kns = [torch.randn(1, B.H, 256, B.D, device="cuda").to(B.DT) for _ in ctxs]
vns = [torch.randn(1, B.H, 256, B.D, device="cuda").to(B.DT) for _ in ctxs]
thrs = [B.calibrate(B.best_scores(q, c["centroids"], c["sizes"], 64), c["sizes"], 0.1) for q, c in zip(qs, ctxs)]
sels = [KL.lookup(q, c["lookup_centroids"], c["offsets"], t, None, None, None, B.SCALE, 64, 0) for c, q, t in zip(ctxs, qs, thrs)]
poss = [KL.expand_positions(s, n) for s in sels]
sels = [s._replace(pos=p) for s, p in zip(sels, poss)]  # the attention timings exclude expansion
nk = sum(int(s.nkeys.sum()) for s in sels) / len(sels)
kv_bytes = nk * B.D * 2 * 2
log(what="kept", keys=nk, mb=kv_bytes / 1e6, floor_us=kv_bytes / bw / 1e3)
full = [(lambda c=c, q=q, kn=kn, vn=vn, t=t: B.sparse_step(c, q, kn, vn, t, False)()) for c, q, kn, vn, t in zip(ctxs, qs, kns, vns, thrs)]
log(what="full_step", us=B.graph_time(full) * 1e3, kernels=B.kernel_times(full))

for bn in (32, 64, 128):
    for nw in (4, 8):
        for st in (2, 3, 4):
            for split in (33, 49, 66, 99, 132):
                outs = [torch.empty(8 * split * B.D, device="cuda") for _ in ctxs]
                fns = [(lambda s=s, p=p, c=c, o=o: gather_sum[(8, split)](p, s.nkeys, c["keys"], c["values"], o, n, B.H,
                        c["keys"].stride(0), c["keys"].stride(1), split, BLOCK_N=bn, D=B.D,
                        num_warps=nw, num_stages=st)) for s, p, c, o in zip(sels, poss, ctxs, outs)]
                try:
                    us = B.graph_time(fns, reps_ms=60) * 1e3
                    log(what="gather", bn=bn, nw=nw, st=st, split=split, us=us, pct_bw=kv_bytes / (us * 1e3) / bw * 100)
                except Exception as e:
                    log(what="gather", bn=bn, nw=nw, st=st, split=split, error=repr(e)[:200])

# attention variants (position list given; expand not timed), maxnreg via direct launch
base = KA.attention_config(1, B.H, B.G, 1, 64, n, B.W, 256, B.D, 132)
o_ref = KA.sparse_attention(qs[0], kns[0], vns[0], None, ctxs[0]["keys"], ctxs[0]["values"], sels[0]._replace(pos=None),
                           ctxs[0]["window_keys"], ctxs[0]["window_values"], B.SCALE, False, 64,
                           config=base._replace(pos_list=False))
extra = {}
orig_launch = launch
def launch(kernel, grid, *a, **kw):
    if kernel is SA._sparse_attn_kernel:
        kw = {**kw, **extra}
    kernel[grid](*a, **kw)
launch = launch
for bn, nw, st in ((64, 4, 3), (64, 4, 2), (32, 4, 3), (32, 4, 4), (64, 8, 3), (128, 8, 2)):
    for split in (49, 66, 99, 132):
        for mr in (None, 128):
            extra.clear()
            if mr:
                extra["maxnreg"] = mr
            cfg = base._replace(block_n=bn, num_warps=nw, num_stages=st, split=split)
            fns = [(lambda c=c, q=q, kn=kn, vn=vn, s=s: KA.sparse_attention(q, kn, vn, None, c["keys"], c["values"], s,
                     c["window_keys"], c["window_values"], B.SCALE, False, 64, config=cfg))
                   for c, q, kn, vn, s in zip(ctxs, qs, kns, vns, sels)]
            try:
                err = (fns[0]().float() - o_ref.float()).abs().max().item()
                us = B.graph_time(fns, reps_ms=60) * 1e3
                kt = B.kernel_times(fns, iters=5)
                log(what="attn", bn=bn, nw=nw, st=st, split=split, maxnreg=mr, us=us, err=err,
                    attn_us=next((v for k, v in kt.items() if "sparse_attn" in k), None))
            except Exception as e:
                log(what="attn", bn=bn, nw=nw, st=st, split=split, maxnreg=mr, error=repr(e)[:200])
print("DONE")
