"""Where one decode step's time goes: kernels per step and per layer, GPU time per kernel, and
the step's wall time, for sqz's decode and the same model's dense decode with its prefix cached.

    PYTHONPATH=. python benchmarks/profile_decode.py --real --context 4096        # SmolLM2 on the GPU
    PYTHONPATH=. python benchmarks/profile_decode.py --layers 4 --context 32768   # 8B shape, 4 layers
    PYTHONPATH=. python benchmarks/profile_decode.py --device cpu --tiny          # logic check on a CPU

Both peers run transformers' generate over a static cache with greedy decoding; sqz under
`CompileConfig(mode=...)` (default "reduce-overhead": decode steps replayed from CUDA graphs
without Dynamo; --decode-inductor compiles them with Inductor), dense through transformers' own
compile of the static-cache decode. Per peer: per-token latency (generate(33) - generate(1)) / 32
(medians of 3, bench_e2e.latency), then torch.profiler over generate(1 + STEPS): GPU kernels (CPU:
aten ops) counted and timed per decode step, the top ones by time, and the host time per step. Writes profile_decode.json, .md
and .png (GPU time per step by kernel, both peers) to --out.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from typing import Any, Callable

import torch

TOKENS = 33  # new tokens per timed generate: per token = (generate(33) - generate(1)) / 32

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import LLAMA3_8B, TINY, latency, prefix_cached, random_llama, sync, timed  # noqa: E402

import sqz_compile  # noqa: E402
from sqz_compile import CompileConfig, SqueezeConfig  # noqa: E402


def profile(gen: Callable[[int], Any], dev: str, steps: int) -> dict[str, Any]:
    """Kernels (GPU) or aten ops (CPU) of generate(1 + steps) minus generate(1), per decode step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = dev.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def events(k: int) -> tuple[collections.Counter, collections.Counter, float]:
        with torch_profile(activities=acts) as p:
            t0 = time.perf_counter()
            gen(k)
            sync(dev)
            wall = time.perf_counter() - t0
        count, us = collections.Counter(), collections.Counter()
        for e in p.events():
            is_kernel = e.device_type == torch.autograd.DeviceType.CUDA if cuda else e.name.startswith("aten::")
            if is_kernel and (cuda or e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")):
                count[e.name] += 1
                us[e.name] += e.device_time if cuda else e.cpu_time
        return count, us, wall

    c1, u1, w1 = events(1)
    cn, un, wn = events(1 + steps)
    count = {k: (cn[k] - c1.get(k, 0)) / steps for k in cn}
    us = {k: (un[k] - u1.get(k, 0)) / steps for k in un}
    top = sorted(us, key=us.get, reverse=True)
    return {"kernels_per_step": sum(count.values()), "kernel_us_per_step": sum(us.values()),
            "wall_ms_per_step_profiled": (wn - w1) / steps * 1e3,
            "top": [{"name": k[:120], "per_step": count.get(k, 0.0), "us_per_step": us[k]} for k in top[:25]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct on an essay (default: 8B shape)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (CPU logic check)")
    p.add_argument("--layers", type=int, default=4, help="layers of the random 8B-shaped model (default 4)")
    p.add_argument("--context", type=int, default=None, help="context tokens (default 4096; 256 with --tiny)")
    p.add_argument("--question", type=int, default=64)
    p.add_argument("--steps", type=int, default=16, help="decode steps profiled (default 16)")
    p.add_argument("--mode", default="reduce-overhead", help='CompileConfig.mode (default "reduce-overhead")')
    p.add_argument("--decode-inductor", action="store_true", help="CompileConfig(decode_inductor=True)")
    p.add_argument("--skip-dense", action="store_true", help="profile sqz only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = p.parse_args(argv)
    dev = args.device
    cuda = dev.startswith("cuda")
    n = args.context or (256 if args.tiny else 4096)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    if args.real:
        from sqz_compile.assets import essay_tokens, load_smollm2

        model, tok = load_smollm2(dtype, dev)
        name = "SmolLM2-135M"
        ids = essay_tokens(tok, n, seed=0).reshape(1, -1)[:, :n].to(dev)
    else:
        shape = TINY if args.tiny else LLAMA3_8B
        layers = 2 if args.tiny else args.layers
        model = random_llama(shape, layers, n + args.question + args.steps + 64, dtype, dev)
        name = f"{'tiny' if args.tiny else '8B-shape'} Llama ({layers} layers)"
        ids = torch.randint(3, shape["vocab_size"], (1, n), device=dev)
    layers = model.config.num_hidden_layers
    q = torch.randint(3, model.config.vocab_size, (1, args.question), device=dev)
    mask = torch.ones_like(q)
    ctx = sqz_compile.squeeze(model, ids, SqueezeConfig(keep=0.125), progress=False)
    mode = args.mode if cuda else None
    # on a CPU the untraced decode unless asked: Inductor's C++ compile takes minutes there
    decode_inductor = True if args.decode_inductor else (None if cuda else False)
    sm = sqz_compile.compile(model, ctx, CompileConfig(mode=mode, decode_inductor=decode_inductor))
    peers: dict[str, Callable[[int], Any]] = {
        "sqz": lambda k: sm.generate(q, attention_mask=mask, max_new_tokens=k, do_sample=False,
                                     cache_implementation="static")}
    if not args.skip_dense:
        peers["dense_prefix"] = prefix_cached(model, ids, q, TOKENS + args.steps, dev)[1]
    rows: dict[str, Any] = {}
    for peer, gen in peers.items():
        warm = timed(lambda: gen(4), dev)[0]  # compiles / captures / warms up
        tok_s = latency(gen, TOKENS, 3, dev)["per_token_s"]
        prof = profile(gen, dev, args.steps)
        rows[peer] = {"first_generate_s": warm, "per_token_ms": tok_s * 1e3, **prof,
                      "kernels_per_layer_step": prof["kernels_per_step"] / layers}
        print(f"{peer}: {tok_s * 1e3:.3f} ms/token, {prof['kernels_per_step']:.0f} "
              f"{'kernels' if cuda else 'aten ops'} per step ({prof['kernels_per_step'] / layers:.1f} per layer), "
              f"{prof['kernel_us_per_step']:.0f} us of {'GPU' if cuda else 'CPU'} time per step", flush=True)
    write(rows, args, name, n, layers, dev)
    return 0


def write(rows: dict[str, Any], args: argparse.Namespace, name: str, n: int, layers: int, dev: str) -> None:
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    env = {"model": name, "context": n, "layers": layers, "device": dev, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu", "mode": args.mode,
           "decode_inductor": args.decode_inductor, "steps": args.steps}
    stem = os.path.join(out, "profile_decode")
    with open(stem + ".json", "w") as f:
        json.dump({"env": env, "peers": rows}, f, indent=1)
    unit = "kernels" if dev.startswith("cuda") else "aten ops"
    lines = [f"# Decode step profile: {name}, context {n}, {dev}", "",
             f"| peer | ms/token | {unit}/step | per layer | device us/step | host-visible ms/step (profiled) |",
             "|---|---|---|---|---|---|"]
    for peer, r in rows.items():
        lines.append(f"| {peer} | {r['per_token_ms']:.3f} | {r['kernels_per_step']:.0f} | "
                     f"{r['kernels_per_layer_step']:.1f} | {r['kernel_us_per_step']:.0f} | "
                     f"{r['wall_ms_per_step_profiled']:.3f} |")
    for peer, r in rows.items():
        lines += ["", f"## {peer}: top {unit} by time per step", "", "| name | per step | us per step |", "|---|---|---|"]
        lines += [f"| `{t['name']}` | {t['per_step']:.1f} | {t['us_per_step']:.1f} |" for t in r["top"]]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(rows), figsize=(7 * len(rows), 5), squeeze=False)
        for ax, (peer, r) in zip(axes[0], rows.items()):
            top = r["top"][:12][::-1]
            ax.barh([t["name"][:40] for t in top], [t["us_per_step"] for t in top])
            ax.set_title(f"{peer}: {r['per_token_ms']:.2f} ms/token, {r['kernels_per_step']:.0f} {unit}/step")
            ax.set_xlabel("us per decode step")
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=100)
    except ImportError:
        pass
    print("\n".join(lines[:4 + len(rows)]))
    print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    raise SystemExit(main())
