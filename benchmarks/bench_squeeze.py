"""Time the offline squeeze (K-means + layout + calibration) on a synthetic 8B-shaped KV set.

Default shape: Llama-3-8B (32 layers x 8 KV heads x 32 query heads, head dim 128, bf16 keys) at
32K and 128K context, flat and hierarchical. Keys are a mixture of Gaussians on the sphere
(a few hundred modes per head, random norms, plus a shared mean direction as in real models).
The paper's reference implementation needs ~24 min per 128K context; the target here is <= 30 s
on one H100.

    PYTHONPATH=. python3 benchmarks/bench_squeeze.py                       # GPU, full size
    PYTHONPATH=. python3 benchmarks/bench_squeeze.py --layers 2 --kv-heads 2 --query-heads 4 \\
        --head-dim 32 --contexts 2048 4096                                 # CPU, tiny
    PYTHONPATH=. python3 benchmarks/bench_squeeze.py --cuda-smoke         # squeeze tiny HF models on CUDA

Prints a table and writes JSON (benchmarks/results/bench_squeeze.json, and --out too).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sqz_compile.config import SqueezeConfig  # noqa: E402
from sqz_compile.squeeze import squeeze_kv  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def synthetic_kv(layers: int, heads: int, qheads: int, L: int, D: int, window: int, dtype: torch.dtype,
                 device: torch.device, modes: int = 256, seed: int = 0):
    """Keys: per (layer, head) a mixture of `modes` directions (+ a shared mean direction), random
    norms and noise; values: Gaussian; window queries: near a few of the modes. Generated a few
    heads at a time so the fp32 temporaries stay small."""
    g = torch.Generator(device=device).manual_seed(seed)
    B = layers * heads
    keys = torch.empty(B, L, D, dtype=dtype, device=device)
    values = torch.empty(B, L, D, dtype=dtype, device=device)
    centres = F.normalize(torch.randn(B, modes, D, generator=g, device=device), dim=-1)
    mean_dir = F.normalize(torch.randn(B, 1, D, generator=g, device=device), dim=-1)
    step = max(1, (1 << 28) // (L * D))
    for b in range(0, B, step):
        e = min(B, b + step)
        pick = torch.randint(0, modes, (e - b, L), generator=g, device=device)
        k = centres[b:e].gather(1, pick.unsqueeze(-1).expand(-1, -1, D))
        k = k + (0.6 / D ** 0.5) * torch.randn(e - b, L, D, generator=g, device=device) + 0.8 * mean_dir[b:e]
        norm = 8.0 + 4.0 * torch.rand(e - b, L, 1, generator=g, device=device)
        keys[b:e] = (F.normalize(k, dim=-1) * norm).to(dtype)
        values[b:e] = torch.randn(e - b, L, D, generator=g, device=device).to(dtype)
    g_ = qheads // heads
    target = centres[:, :8].mean(1, keepdim=True).repeat_interleave(g_, 0)  # [B*g, 1, D]
    q = 6.0 * target + torch.randn(B * g_, window, D, generator=g, device=device)
    return (keys.view(layers, heads, L, D), values.view(layers, heads, L, D),
            q.view(layers, qheads, window, D).float())


def cohesion(ctx) -> float:
    """Mean cosine between a clustered key and its cluster's centroid (higher = tighter)."""
    sizes = (ctx.offsets[..., 1:] - ctx.offsets[..., :-1]).long().flatten(0, 1)   # [B, C]
    cent = F.normalize(ctx.centroids.flatten(0, 1), dim=-1)                     # [B, C, D]
    keys = ctx.keys.flatten(0, 1)
    total = 0.0
    for b in range(keys.shape[0]):
        rep = cent[b].repeat_interleave(sizes[b], dim=0)
        total += (F.normalize(keys[b].float(), dim=-1) * rep).sum(-1).mean().item()
    return total / keys.shape[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(args, L: int, hier: bool, device: torch.device) -> dict:
    dtype = DTYPES[args.dtype]
    keys, values, q = synthetic_kv(args.layers, args.kv_heads, args.query_heads, L, args.head_dim,
                                   args.window, dtype, device, modes=args.modes, seed=args.seed)
    cfg = SqueezeConfig(keep=args.keep, hierarchical=hier, observation_window=args.window,
                        kmeans_iters=args.iters, seed=args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    sync(device)
    t0 = time.perf_counter()
    ctx = squeeze_kv(keys, values, q, args.head_dim ** -0.5, cfg, progress=args.progress)
    sync(device)
    total = time.perf_counter() - t0
    row = {
        "context": L, "mode": "hierarchical" if hier else "flat",
        "layers": args.layers, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": args.dtype,
        "clusters": ctx.num_clusters, "coarse_clusters": ctx.extra["coarse_clusters"],
        "kmeans_iterations": ctx.extra["kmeans_iterations"],
        "seconds_total": round(total, 3),
        "seconds_kmeans": ctx.extra["seconds"]["kmeans"],
        "seconds_layout_calibration": ctx.extra["seconds"]["layout_and_calibration"],
        "cohesion": round(cohesion(ctx), 4) if not args.no_quality else None,
        "empty_clusters_frac": round(((ctx.offsets[..., 1:] - ctx.offsets[..., :-1]) == 0).float().mean().item(), 5),
    }
    if device.type == "cuda":
        row["peak_gib_above_inputs"] = round((torch.cuda.max_memory_allocated(device) - base_mem) / 2**30, 2)
    del ctx, keys, values, q
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def time_call(fn, device: torch.device, reps: int = 3) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return sorted(out)[len(out) // 2]


ASSIGN_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 256, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4},
]


def assign_bench(args, L: int, device: torch.device) -> dict:
    """Per-iteration pieces of K-means at one context size: assignment (torch chunked vs fused
    Triton configs), cluster sums, the farthest-point sort."""
    from sqz_compile.squeeze import kmeans as km
    from sqz_compile.squeeze import cluster_counts_for

    W = min(args.window, L - 1)
    C, _ = cluster_counts_for(L - W, SqueezeConfig())
    keys, _, _ = synthetic_kv(args.layers, args.kv_heads, args.query_heads, L, args.head_dim, W,
                              DTYPES[args.dtype], device, modes=args.modes, seed=args.seed)
    xn = km.normalize(keys[:, :, :L - W].flatten(0, 1), km.compute_dtype(device))
    del keys
    B, N, D = xn.shape
    cn = xn[:, torch.randperm(N, device=device)[:C]].contiguous()
    res = {"context": L, "B": B, "N": N, "K": C, "D": D}
    ref_best, ref_idx = km.nearest_torch(xn, cn, km.default_chunk_elems(device))
    res["torch_chunked_s"] = time_call(lambda: km.nearest_torch(xn, cn, km.default_chunk_elems(device)), device)
    flops = 2.0 * B * N * C * D
    res["configs"] = []
    if km.triton is not None and device.type == "cuda":
        for cfg in ASSIGN_CONFIGS:
            try:
                best, idx = km.nearest_fused(xn, cn, cfg)
                # fused picks a centre at least as similar as torch's (up to fp16 rounding)?
                sl = slice(0, min(B, 16))
                got = cn[sl].gather(1, idx[sl].unsqueeze(-1).expand(-1, -1, D)).float()
                val = (xn[sl].float() * got).sum(-1)
                agree = (val >= ref_best[sl] - 2e-3).float().mean().item()
                del got, val
                t = time_call(lambda: km.nearest_fused(xn, cn, cfg), device)
                res["configs"].append({**cfg, "s": round(t, 4), "tflops": round(flops / t / 1e12, 1),
                                       "as_good_as_torch": round(agree, 5),
                                       "same_index": round((idx == ref_idx).float().mean().item(), 5)})
            except Exception as e:  # a config that does not compile on this GPU
                res["configs"].append({**cfg, "error": f"{type(e).__name__}: {e}"[:200]})
    _, assign = ref_best, ref_idx
    res["cluster_sums_s"] = time_call(lambda: km.cluster_sums(xn, assign, C), device)
    res["argsort_s"] = time_call(lambda: ref_best.argsort(dim=1), device)
    return res


def cuda_smoke() -> list[dict]:
    """Squeeze tiny random Llama / Mistral / Qwen2 (MHA, GQA) on CUDA and check the stored keys
    reproduce the dense forward (position convention), with the installed transformers."""
    import transformers
    from sqz_compile.squeeze import squeeze
    from sqz_compile.transformers_compat import cache_kwargs

    out = []
    for kind, kvh in (("llama", 4), ("mistral", 2), ("qwen2", 1)):
        torch.manual_seed(0)
        kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kvh, max_position_embeddings=4096)
        cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
        if kind == "mistral":
            kw["sliding_window"] = None
        model = cls[1](cls[0](**kw)).cuda().eval()
        ids = torch.randint(0, 96, (1, 700), device="cuda")
        qn = torch.randint(0, 96, (1, 9), device="cuda")
        ctx = squeeze(model, ids, SqueezeConfig(chunk_size=256, hierarchical=True))
        ctx.validate(model)
        k = torch.empty_like(ctx.keys).scatter_(2, ctx.perm.long().unsqueeze(-1).expand_as(ctx.keys), ctx.keys)
        v = torch.empty_like(ctx.values).scatter_(2, ctx.perm.long().unsqueeze(-1).expand_as(ctx.values), ctx.values)
        k, v = torch.cat([k, ctx.window_keys], 2), torch.cat([v, ctx.window_values], 2)
        with torch.no_grad():
            dense = model(torch.cat([ids, qn], 1)).logits[:, -9:]
            cache = transformers.DynamicCache(config=model.config)
            for i in range(ctx.num_layers):
                cache.update(k[i:i + 1], v[i:i + 1], i)
            got = model(qn, **cache_kwargs(model, cache), position_ids=torch.arange(9, device="cuda")[None]).logits
        err = (got - dense).abs().max().item()
        out.append({"model": kind, "kv_heads": kvh, "max_abs_logit_diff": err, "ok": err < 1e-3,
                    "attn_impl_restored": model.config._attn_implementation})
        print(f"cuda smoke {kind:8s} kv_heads={kvh}: max |logit diff| {err:.2e}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--query-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--modes", type=int, default=256, help="mixture components per head in the synthetic keys")
    p.add_argument("--flat-only", action="store_true")
    p.add_argument("--hier-only", action="store_true")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=SqueezeConfig.kmeans_iters)
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--keep", type=float, default=0.125)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-quality", action="store_true", help="skip the cohesion metric")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--cuda-smoke", action="store_true", help="also squeeze tiny HF models on CUDA")
    p.add_argument("--assign-bench", action="store_true",
                   help="time the K-means assignment paths (torch vs fused Triton configs) at the largest context")
    p.add_argument("--tune-assign", action="store_true",
                   help="with --assign-bench: use the fastest fused config for the squeeze runs")
    p.add_argument("--no-triton", action="store_true", help="K-means assignment with torch only")
    p.add_argument("--out", default=None, help="extra JSON copy (e.g. $OUT/bench_squeeze.json)")
    p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "bench_squeeze.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "argv": sys.argv[1:]}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    report = {"env": env, "rows": []}

    def save() -> None:  # after every row, so a run cut short still leaves its numbers
        for path in filter(None, [args.results, args.out]):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump(report, f, indent=2)
    if args.no_triton:
        os.environ["SQZ_KMEANS_TRITON"] = "0"
    if args.cuda_smoke and device.type == "cuda":
        report["cuda_smoke"] = cuda_smoke()
        save()
    if args.assign_bench:
        from sqz_compile.squeeze import kmeans as km

        ab = assign_bench(args, max(args.contexts), device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["assign_bench"] = ab
        print(f"assignment at B={ab['B']} N={ab['N']} K={ab['K']} D={ab['D']}: torch chunked "
              f"{ab['torch_chunked_s']:.3f} s, cluster sums {ab['cluster_sums_s']:.3f} s, argsort {ab['argsort_s']:.3f} s")
        for c in ab["configs"]:
            print("  fused", c, flush=True)
        ok = [c for c in ab["configs"] if "s" in c and c["as_good_as_torch"] > 0.999]
        if args.tune_assign and ok:
            best = min(ok, key=lambda c: c["s"])
            km.ASSIGN_CONFIG = {k: best[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
        save()
    if device.type == "cuda":
        from sqz_compile.squeeze import kmeans as km
        env["assign"] = ("torch" if args.no_triton or km.triton is None else f"triton {km.ASSIGN_CONFIG}")
    # warm-up (CUDA context, cuBLAS handles, allocator) at a small size, not reported
    warm = argparse.Namespace(**{**vars(args), "layers": 1, "kv_heads": 1, "query_heads": args.query_heads // args.kv_heads})
    run_one(warm, 2048, True, device)
    modes = [False, True]
    if args.flat_only:
        modes = [False]
    if args.hier_only:
        modes = [True]
    print(f"{'context':>8} {'mode':>12} {'C':>6} {'Cc':>5} {'iters':>8} {'kmeans s':>9} {'layout+cal s':>12} "
          f"{'total s':>8} {'cohesion':>8} {'peak GiB':>8}", flush=True)
    for L in args.contexts:
        for hier in modes:
            r = run_one(args, L, hier, device)
            report["rows"].append(r)
            print(f"{r['context']:>8} {r['mode']:>12} {r['clusters']:>6} {r['coarse_clusters']:>5} "
                  f"{'/'.join(map(str, r['kmeans_iterations'])):>8} {r['seconds_kmeans']:>9.2f} "
                  f"{r['seconds_layout_calibration']:>12.2f} {r['seconds_total']:>8.2f} "
                  f"{r['cohesion'] if r['cohesion'] is not None else '-':>8} {r.get('peak_gib_above_inputs', '-'):>8}",
                  flush=True)
            save()
    print("wrote", ", ".join(filter(None, [args.results, args.out])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
