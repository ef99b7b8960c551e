"""End to end, as a user sees it: squeeze, compile, time to first token, per-token decode, memory.

Default (the GPU machine): a Llama-3-8B-shaped model with random weights (32 layers, hidden 4096,
32 query / 8 KV heads, head dim 128, bf16) at 32K and 128K context, a 64-token question, 128 new
tokens, batch 1 and 8 (eight questions over one context). Per context length and batch:

  sqz         sqz_compile.squeeze (timed) + sqz_compile.compile; compile to first token cold (the
              first generate, empty caches) and warm (after torch._dynamo.reset(): Dynamo traces
              again, Inductor's caches answer), compiled graphs counted (none may appear while
              timing); TTFT = generate(max_new_tokens=1); per token = (generate(N) - TTFT) / (N-1)
  dense-prefix the same model dense, the context's KV prefilled once into a StaticCache that is
              copied per question (copy included in TTFT); transformers compiles its decode
              (static cache: torch.compile, CUDA graphs) - what a careful transformers user runs
  dense       transformers' default generate on the whole prompt (context + question)

Warm start across processes (--warm-cache DIR, sqz_compile.CompileConfig(cache_dir=DIR)): run the
same command twice; the first process compiles and writes DIR/compile-<tag>.sqzcache ("cold"),
the second loads it before compiling ("warm": Dynamo traces again, Inductor and Triton do not).
Then the first call is generate(max_new_tokens=1), timed as compile_to_first_token_s, with
Inductor's cache hits and misses; the decode graph compiles in the next generate.

Peak memory per run (torch.cuda.max_memory_allocated) beside the bytes of the weights, the
squeezed context and the dense KV cache. A peer that runs out of memory is recorded as "OOM".

    PYTHONPATH=. python benchmarks/bench_e2e.py                          # H200, full size
    PYTHONPATH=. python benchmarks/bench_e2e.py --real                   # SmolLM2-135M, essays
    PYTHONPATH=. python benchmarks/bench_e2e.py --device cpu --tiny      # logic check on a CPU
    PYTHONPATH=. python benchmarks/bench_e2e.py --real --sqz-only --warm-cache /tmp/sqzc   # twice: cold, warm

Writes bench_e2e.json, bench_e2e.md (table) and bench_e2e.png (latency per token vs context)
to --out (default benchmarks/results; with --tiny a temporary directory).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sqz_compile  # noqa: E402
from sqz_compile import SqueezeConfig  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=512)


# --------------------------------------------------------------------------- setup

def random_llama(shape: dict[str, int], layers: int, max_positions: int, dtype: torch.dtype,
                 device: str, attn: str = "sdpa") -> torch.nn.Module:
    """A LlamaForCausalLM with random weights, built directly on `device` in `dtype`, attention
    implementation `attn`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=max_positions)
    cfg._attn_implementation = attn
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.generation_config.eos_token_id = None  # random weights: every row runs to max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


_T0 = time.perf_counter()


def stage(msg: str) -> None:
    """Progress on stderr with the seconds since start (a long run shows where it is)."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def kv_bytes(model: torch.nn.Module, tokens: int, batch: int) -> int:
    """Bytes of a dense KV cache for `tokens` positions."""
    c = model.config
    elt = next(model.parameters()).element_size()
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * hd * tokens * batch * elt


class Peak:
    """Peak GPU memory of a block (None on CPU)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.bytes: int | None = None

    def __enter__(self) -> "Peak":
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.bytes = int(torch.cuda.max_memory_allocated())


def oom_safe(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn()'s result, or {"error": "OOM"} when it runs out of GPU memory."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "OOM"}


# --------------------------------------------------------------------------- measurements

def latency(gen: Callable[[int], Any], new_tokens: int, reps: int, device: str) -> dict[str, float]:
    """TTFT = gen(1); per token = (gen(new_tokens) - TTFT) / (new_tokens - 1); medians of `reps`."""
    ttft = statistics.median(timed(lambda: gen(1), device)[0] for _ in range(reps))
    full = statistics.median(timed(lambda: gen(new_tokens), device)[0] for _ in range(reps))
    return {"ttft_s": ttft, "per_token_s": max(full - ttft, 0.0) / max(new_tokens - 1, 1), "generate_s": full}


def inductor_cache_counts() -> dict[str, int]:
    """Inductor's FX-graph cache hits and misses so far in this process."""
    from torch._dynamo.utils import counters

    return {k: int(counters["inductor"][k]) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}


def compile_seconds() -> dict[str, float]:
    """Dynamo's compile-time metrics so far (seconds per stage: bytecode_tracing,
    OutputGraph.call_user_compiler = the backend with Inductor, build_guards, ...)."""
    from torch._dynamo.utils import compilation_time_metrics

    return {k: sum(v) for k, v in compilation_time_metrics.items()}


def since(before: dict[str, float]) -> dict[str, float]:
    """compile_seconds() minus `before`, the stages that took at least 10 ms."""
    now = compile_seconds()
    return {k: round(v - before.get(k, 0.0), 2) for k, v in now.items() if v - before.get(k, 0.0) >= 0.01}


def run_sqz(model, ctx, questions: torch.Tensor, args, compiled_before: bool) -> dict[str, Any]:
    """Compile to first token (cold unless this model was compiled before; then warm), then the
    timed generates; the graphs compiled at each stage."""
    dev = args.device
    sm = sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(inductor=not args.eager, mode=args.mode,
                                                                   cache_dir=args.warm_cache,
                                                                   prefill_inductor=args.prefill_inductor,
                                                                   decode_inductor=args.decode_inductor))
    mask = torch.ones_like(questions)
    cache = {"cache_implementation": "static"} if args.cache == "static" else {}

    def gen(n: int):
        return sm.generate(questions, attention_mask=mask, max_new_tokens=n, do_sample=False, **cache)

    out: dict[str, Any] = {"compiled_before": compiled_before}
    if args.warm_cache and not compiled_before:
        from sqz_compile.compile_cache import cache_file

        path = cache_file(args.warm_cache)
        out["warm_cache"] = {"file": str(path), "existed": path.is_file()}
        stage(f"sqz: compile to first token ({'warm: loads' if path.is_file() else 'cold: writes'} {path})")
        c0, g0 = inductor_cache_counts(), graphs()
        out["compile_to_first_token_s"] = timed(lambda: gen(1), dev)[0]  # the prompt only (untraced unless --prefill-inductor)
        out["compile_to_first_token_graphs"] = graphs() - g0
        out["compile_to_first_token_inductor"] = {k: v - c0[k] for k, v in inductor_cache_counts().items()}
        stage(f"sqz: first token after {out['compile_to_first_token_s']:.1f} s "
              f"({out['compile_to_first_token_inductor']})")
    g0, t0 = graphs(), compile_seconds()
    stage("sqz: first generate (compiles unless compiled before)")
    # prefill, the first decode step and the next (two graphs: tests/test_compile_once.py)
    first, _ = timed(lambda: gen(3), dev)
    out.update(first_generate_s=first, first_generate_graphs=graphs() - g0, first_generate_compile=since(t0))
    stage(f"sqz: first generate {first:.1f} s, {out['first_generate_graphs']} graphs, where: "
          f"{ {k: v for k, v in out['first_generate_compile'].items() if v >= 1.0} }")
    if not compiled_before and not args.warm_cache:  # --warm-cache: the second process is the warm run
        torch._dynamo.reset()  # a new process with warm on-disk caches, as far as one process can tell
        stage(f"sqz: cold {first:.1f} s; warm compile")
        g0, t0 = graphs(), compile_seconds()
        out["compile_warm_s"] = timed(lambda: gen(3), dev)[0]
        out["compile_warm_graphs"] = graphs() - g0
        out["compile_warm_compile"] = since(t0)
    g0 = graphs()
    stage("sqz: timing")
    with Peak(dev) as peak:
        out.update(latency(gen, args.new_tokens, args.reps, dev))
    out["graphs_while_timing"] = graphs() - g0
    out["peak_bytes"] = peak.bytes
    out["decode_cuda_graphs"] = getattr(sm._steps, "captured", 0)  # untraced decode (decode_graphs.py)
    from torch._dynamo.utils import counters

    out["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])  # so far in this process
    return out


def prefix_cached(model, ctx_ids: torch.Tensor, questions: torch.Tensor, new_tokens: int,
                  device: str) -> tuple[float, Callable[[int], Any]]:
    """Dense with prefix caching: the context prefilled once into a StaticCache (batch rows share
    it; the prefill's seconds are returned) and gen(n), a greedy generate of n tokens over a deep
    copy of it per question; transformers compiles the static-cache decode itself on CUDA."""
    from transformers import StaticCache

    b = questions.shape[0]
    total = ctx_ids.shape[1] + questions.shape[1] + new_tokens
    prompt = torch.cat([ctx_ids.expand(b, -1), questions], dim=1)

    def prefill() -> Any:
        cache = StaticCache(config=model.config, max_cache_len=total)
        with torch.no_grad():
            model(ctx_ids.expand(b, -1), past_key_values=cache, use_cache=True)
        return cache

    prefill_s, cache = timed(prefill, device)

    def gen(n: int):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=copy.deepcopy(cache),
                              max_new_tokens=n, do_sample=False)

    return prefill_s, gen


def run_dense_prefix(model, ctx_ids: torch.Tensor, questions: torch.Tensor, args) -> dict[str, Any]:
    """The prefix-cached dense peer (prefix_cached), timed."""
    def body() -> dict[str, Any]:
        stage("dense-prefix: prefill the context")
        prefill_s, gen = prefix_cached(model, ctx_ids, questions, args.new_tokens, args.device)
        first_s = timed(lambda: gen(2), args.device)[0]  # transformers' own compile, if it compiles
        stage(f"dense-prefix: first generate {first_s:.1f} s; timing")
        with Peak(args.device) as peak:
            out = latency(gen, args.new_tokens, args.reps, args.device)
        return {"context_prefill_s": prefill_s, "first_generate_s": first_s, **out, "peak_bytes": peak.bytes}

    return oom_safe(body)


def run_dense(model, ctx_ids: torch.Tensor, questions: torch.Tensor, args) -> dict[str, Any]:
    """transformers' default generate over the whole prompt (the context read again every time)."""
    b = questions.shape[0]
    prompt = torch.cat([ctx_ids.expand(b, -1), questions], dim=1)

    def gen(n: int):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False)

    def body() -> dict[str, Any]:
        stage("dense: timing")
        with Peak(args.device) as peak:
            out = latency(gen, args.new_tokens, args.reps, args.device)
        return {**out, "peak_bytes": peak.bytes}

    return oom_safe(body)


# --------------------------------------------------------------------------- report

def table(rows: list[dict[str, Any]]) -> str:
    def ms(r: dict[str, Any], key: str) -> str:
        return r.get("error") or (f"{1e3 * r[key]:.1f}" if key in r else "-")

    def gib(x: int | None) -> str:
        return "-" if x is None else f"{x / 2**30:.1f}"

    lines = ["| model | context | batch | squeeze s | compile cold s | warm s | graphs | sqz TTFT ms | "
             "dense-prefix TTFT ms | dense TTFT ms | sqz ms/token | dense-prefix ms/token | dense ms/token | "
             "decode × prefix | TTFT × dense | sqz peak GiB | prefix peak GiB |",
             "|" + "---|" * 17]
    for r in rows:
        s, p, d = r["sqz"], r["dense_prefix"], r["dense"]
        speed = (f"{p['per_token_s'] / s['per_token_s']:.2f}" if "per_token_s" in p and s["per_token_s"] else "-")
        ttft = f"{d['ttft_s'] / s['ttft_s']:.1f}" if "ttft_s" in d and s["ttft_s"] else "-"
        cold = "reused" if not s["first_generate_graphs"] else f"{s['first_generate_s']:.1f}"
        if "compile_to_first_token_s" in s:  # --warm-cache: this process's compile to first token
            cold = f"{s['compile_to_first_token_s']:.1f} ({'warm' if s['warm_cache']['existed'] else 'cold'})"
        warm = f"{s['compile_warm_s']:.1f}" if "compile_warm_s" in s else "-"
        lines.append(f"| {r['model']} | {r['context']} | {r['batch']} | {r['squeeze_s']:.2f} | {cold} | {warm} | "
                     f"{s['first_generate_graphs']}+{s['graphs_while_timing']} | {ms(s, 'ttft_s')} | {ms(p, 'ttft_s')} | "
                     f"{ms(d, 'ttft_s')} | {ms(s, 'per_token_s')} | {ms(p, 'per_token_s')} | {ms(d, 'per_token_s')} | "
                     f"{speed} | {ttft} | {gib(s['peak_bytes'])} | {gib(p.get('peak_bytes'))} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> bool:
    """Latency per token vs context length, sqz vs the dense peers, one line per (model, batch)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = sorted({(r["model"], r["batch"]) for r in rows})
    for (model, batch) in series:
        rs = sorted((r for r in rows if r["model"] == model and r["batch"] == batch), key=lambda r: r["context"])
        for peer, style in (("sqz", "-o"), ("dense_prefix", "--s"), ("dense", ":^")):
            pts = [(r["context"], 1e3 * r[peer]["per_token_s"]) for r in rs if "per_token_s" in r[peer]]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{peer} ({model}, batch {batch})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("decode latency per token (ms)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main

def write(rows: list[dict[str, Any]], args: argparse.Namespace, dtype: torch.dtype, out_dir: str) -> None:
    """JSON, Markdown table and plot of the rows so far."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
           "dtype": str(dtype), "keep": args.keep, "question": args.question, "new_tokens": args.new_tokens,
           "reps": args.reps, "sqz_cache": args.cache, "sqz_inductor": not args.eager, "sqz_mode": args.mode,
           "sqz_prefill_inductor": args.prefill_inductor, "sqz_decode_inductor": args.decode_inductor,
           "warm_cache": args.warm_cache}
    stem = os.path.join(out_dir, "bench_e2e" + ("_real" if args.real else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table(rows) + "\n")
    drew = plot(rows, stem + ".png")
    stage(f"wrote {stem}.json, .md{', .png' if drew else ''}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", help="context lengths (default 32768 131072)")
    p.add_argument("--batches", type=int, nargs="+", help="questions per batch over one context (default 1 8)")
    p.add_argument("--question", type=int, help="question tokens (default 64)")
    p.add_argument("--new-tokens", type=int, help="new tokens per answer (default 128)")
    p.add_argument("--layers", type=int, help="decoder layers of the random model (default 32; 2 with --tiny)")
    p.add_argument("--keep", type=float, default=0.125, help="SqueezeConfig.keep")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 (fp32 with --tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", default=None, help='Inductor mode for sqz, e.g. "reduce-overhead"')
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                   help="sqz's generate cache (static with --mode reduce-overhead: one CUDA graph per decode shape)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random Llama, short contexts, few tokens, eager sqz: checks the logic on a CPU")
    p.add_argument("--eager", action="store_true", help="run sqz's rewritten graph without Inductor")
    p.add_argument("--prefill-inductor", action="store_true",
                   help="CompileConfig(prefill_inductor=True): Inductor compiles the prompt's graph too "
                        "(default: only the decode graph; prompts run untraced)")
    p.add_argument("--untraced-decode", dest="decode_inductor", action="store_false", default=None,
                   help="CompileConfig(decode_inductor=False): decode steps untraced too (no Dynamo, no Inductor); "
                        "with --mode reduce-overhead --cache static, replayed from CUDA graphs (the default "
                        "under reduce-overhead)")
    p.add_argument("--decode-inductor", dest="decode_inductor", action="store_true",
                   help="CompileConfig(decode_inductor=True): Inductor compiles the decode step (the default "
                        "without reduce-overhead)")
    p.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct and essay text instead of the 8B shape")
    p.add_argument("--skip-dense", action="store_true", help="skip transformers' default generate (slow at 128K)")
    p.add_argument("--sqz-only", action="store_true", help="skip both dense peers")
    p.add_argument("--dense-max-batch", type=int,
                   help="run transformers' default generate only up to this batch (it prefills the whole "
                        "context again for every row: minutes at 128K x 8)")
    p.add_argument("--warm-cache", metavar="DIR",
                   help="CompileConfig(cache_dir=DIR): run twice, the second process starts warm (see above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results directory")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.contexts = args.contexts or ([256, 384] if tiny else [32768, 131072])
    args.batches = args.batches or ([1, 2] if tiny else [1, 8])
    args.question = args.question or (8 if tiny else 64)
    args.new_tokens = args.new_tokens or (4 if tiny else 128)
    if args.warm_cache and args.eager:
        p.error("--warm-cache needs Inductor: drop --eager")
    args.eager = args.eager or (tiny and args.device == "cpu" and not args.warm_cache)
    dtype = DTYPES[args.dtype or ("fp32" if tiny else "bf16")]
    out_dir = args.out or (tempfile.mkdtemp(prefix="bench_e2e_") if tiny else
                           os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    max_pos = max(args.contexts) + args.question + args.new_tokens

    if args.real:
        from sqz_compile.assets import essay_tokens, load_smollm2

        model, tok = load_smollm2(dtype, args.device)
        name, make_ids = "SmolLM2-135M", (lambda n: essay_tokens(tok, n, seed=args.seed).reshape(1, -1)[:, :n])
    else:
        shape = TINY if tiny else LLAMA3_8B
        layers = args.layers or (2 if tiny else 32)
        model = random_llama(shape, layers, max_pos, dtype, args.device)
        name = f"tiny-llama ({layers} layers)" if tiny else f"Llama-3-8B-shape ({layers} layers)"
        make_ids = (lambda n: torch.randint(3, shape["vocab_size"], (1, n)))
    vocab = model.config.vocab_size
    weights = nbytes(model.parameters())
    rows, compiled = [], False
    for L in args.contexts:
        ctx_ids = make_ids(L).to(args.device)
        stage(f"context {L}: squeeze")
        squeeze_s, ctx = timed(lambda: sqz_compile.squeeze(model, ctx_ids, SqueezeConfig(keep=args.keep),
                                                           progress=False), args.device)
        for b in args.batches:
            questions = torch.randint(3, vocab, (b, args.question)).to(args.device)
            row = {"model": name, "context": L, "batch": b, "squeeze_s": squeeze_s, "weights_bytes": weights,
                   "context_bytes": nbytes(ctx.tensors().values()),
                   "dense_kv_bytes": kv_bytes(model, L + args.question + args.new_tokens, b)}
            row["sqz"] = run_sqz(model, ctx, questions, args, compiled)
            compiled = True
            skipped = {"error": "skipped"}
            row["dense_prefix"] = skipped if args.sqz_only else run_dense_prefix(model, ctx_ids, questions, args)
            skip_dense = args.skip_dense or args.sqz_only or (args.dense_max_batch is not None and b > args.dense_max_batch)
            row["dense"] = skipped if skip_dense else run_dense(model, ctx_ids, questions, args)
            rows.append(row)
            write(rows, args, dtype, out_dir)  # after every row: a run cut short keeps what it measured
            print(json.dumps({k: row[k] for k in ("context", "batch")} | {"sqz": row["sqz"]}), flush=True)
        del ctx
    print(table(rows))
    bad = [r for r in rows if r["sqz"]["graphs_while_timing"]]
    if bad:
        print(f"sqz compiled while timing (recompiles) at {[(r['context'], r['batch']) for r in bad]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
