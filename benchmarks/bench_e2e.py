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
    PYTHONPATH=. torchrun --nproc_per_node 2 benchmarks/bench_e2e.py --tp 2 --contexts 32768  # TP rows

Tensor parallel (--tp N under torchrun --nproc_per_node N; NCCL on GPUs, gloo on CPU): the random
model is saved once (--model-dir) and loaded by every rank through transformers' own TP
(from_pretrained with DistributedConfig(tp_plan="auto")). Rank 0 first runs the TP=1 rows on its
GPU alone (the other ranks wait) and saves each context's squeezed file; then every rank runs the
TP=N rows: squeeze under TP (timed), then sqz and dense-prefix. The check: the TP=1 file loaded
under TP (each rank its KV heads), greedy generate of --check-tokens tokens against TP=1's over the
same file, tokens and per-step logits (compared up to the first step whose input differs), beside
the same comparison for the prefix-cached dense model (what TP's bf16 sums in another order cost
the model itself). The transformers default-generate peer is not run under --tp.

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


def sizes(model: torch.nn.Module, ctx, tokens: int, batch: int, tp: int = 1) -> dict[str, int]:
    """Bytes a row reports: this process's weights (its shard under TP), the squeezed context, and
    the dense KV cache of `tokens` positions (one rank's share of the heads)."""
    local = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())
    return {"weights_bytes": nbytes(local), "context_bytes": nbytes(ctx.tensors().values()),
            "dense_kv_bytes": kv_bytes(model, tokens, batch) // tp}


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


def compile_config(args) -> sqz_compile.CompileConfig:
    """sqz's CompileConfig from the command line (the timed rows and the TP check alike)."""
    return sqz_compile.CompileConfig(inductor=not args.eager, mode=args.mode, cache_dir=args.warm_cache,
                                     prefill_inductor=args.prefill_inductor, decode_inductor=args.decode_inductor)


def cache_kwargs(args) -> dict[str, str]:
    """generate's cache arguments for sqz (--cache)."""
    return {"cache_implementation": "static"} if args.cache == "static" else {}


def run_sqz(model, ctx, questions: torch.Tensor, args, compiled_before: bool,
            warm_compile: bool = True) -> dict[str, Any]:
    """Compile to first token (cold unless this model was compiled before; then warm, unless
    not `warm_compile`), then the timed generates; the graphs compiled at each stage."""
    dev = args.device
    sm = sqz_compile.compile(model, ctx, compile_config(args))
    mask = torch.ones_like(questions)
    cache = cache_kwargs(args)

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
    if warm_compile and not compiled_before and not args.warm_cache:  # --warm-cache: the second process is the warm run
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

    def gen(n: int, **kw):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=copy.deepcopy(cache),
                              max_new_tokens=n, do_sample=False, **kw)

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
        if "error" in s:
            lines.append(f"| {r['model']} | {r['context']} | {r['batch']} | {r['squeeze_s']:.2f} | sqz: {s['error']} |")
            continue
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


# --------------------------------------------------------------------------- tensor parallel

TP_LOGIT_RTOL = 2e-2  # max |logit difference| / max |logit|: a few bf16 steps at the logits' scale


def random_shape(args) -> tuple[dict[str, int], int, str]:
    """(shape, layers, name) of the random model (--tiny or 8B-shaped)."""
    shape = TINY if args.tiny else LLAMA3_8B
    layers = args.layers or (2 if args.tiny else 32)
    return shape, layers, f"tiny-llama ({layers} layers)" if args.tiny else f"Llama-3-8B-shape ({layers} layers)"


def seeded_ids(seed: int, vocab: int, shape: tuple[int, ...], device: str) -> torch.Tensor:
    """Token ids every rank draws alike (their own generator: rank 0's extra work draws nothing)."""
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _greedy_out(out, prompt_len: int) -> dict[str, torch.Tensor]:
    return {"tokens": out.sequences[:, prompt_len:].cpu(), "logits": torch.stack(out.logits, 1).float().cpu()}


def greedy(sm, questions: torch.Tensor, new_tokens: int, args) -> dict[str, torch.Tensor]:
    """sqz: greedy tokens and the logits of every step (on the CPU, float32)."""
    out = sm.generate(questions, attention_mask=torch.ones_like(questions), max_new_tokens=new_tokens,
                      do_sample=False, output_logits=True, return_dict_in_generate=True, **cache_kwargs(args))
    return _greedy_out(out, questions.shape[1])


def dense_greedy(model, ctx_ids: torch.Tensor, questions: torch.Tensor, new_tokens: int,
                 device: str) -> dict[str, torch.Tensor]:
    """The prefix-cached dense model's greedy tokens and logits: what TP changes in the dense
    model itself (bf16 sums in another order), the floor for sqz's check."""
    _, gen = prefix_cached(model, ctx_ids, questions, new_tokens, device)
    out = gen(new_tokens, output_logits=True, return_dict_in_generate=True)
    return _greedy_out(out, ctx_ids.shape[1] + questions.shape[1])


def compare_greedy(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, Any]:
    """TP=N against TP=1: same tokens, and the logits of every step up to the first step whose input
    differs (the step after the first differing token), relative to the largest |logit|."""
    same = (ref["tokens"] == got["tokens"]).all(0)
    first = int(same.logical_not().nonzero()[0]) if not bool(same.all()) else len(same)
    steps = min(first + 1, len(same))  # the differing step's own logits still had equal inputs
    diff = float((ref["logits"][:, :steps] - got["logits"][:, :steps]).abs().max())
    scale = float(ref["logits"][:, :steps].abs().max())
    top2 = ref["logits"][:, :steps].topk(2, dim=-1).values
    return {"tokens_equal": bool(same.all()), "first_token_diff": None if bool(same.all()) else first,
            "steps_compared": steps, "max_abs_logit_diff": diff, "max_abs_logit": scale,
            "rel_logit_diff": diff / max(scale, 1e-30), "min_top2_margin": float((top2[..., 0] - top2[..., 1]).min()),
            "logits_ok": diff <= TP_LOGIT_RTOL * scale}


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn()'s result, or its error recorded (OOM or an exception; every rank meets it alike, so
    the ranks stay in step) so that one failing peer does not lose the rows around it."""
    try:
        return oom_safe(fn)
    except Exception as e:  # noqa: BLE001 - a benchmark row records what went wrong and goes on
        stage(f"error: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def tp_table(rows: list[dict[str, Any]], n: int) -> str:
    """Per (context, batch): per-token decode at TP=1 and TP=N for sqz and dense-prefix (ratios are
    speed-ups: TP=1 time / TP=N time, dense-prefix time / sqz time), and the check."""
    def ms(r: dict[str, Any] | None) -> str:
        return "-" if r is None else r.get("error") or f"{1e3 * r['per_token_s']:.2f}"

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
        ok = a and b and "per_token_s" in a and "per_token_s" in b and b["per_token_s"]
        return f"{a['per_token_s'] / b['per_token_s']:.2f}" if ok else "-"

    by = {(r["context"], r["batch"], r["tp"]): r for r in rows}
    lines = [f"| context | batch | sqz ms/token TP=1 | TP={n} | TP=1 / TP={n} | dense-prefix ms/token TP=1 | "
             f"TP={n} | TP=1 / TP={n} | dense-prefix / sqz at TP={n} | squeeze s TP=1 / TP={n} | "
             f"check vs TP=1 (tokens, max rel logit diff; dense model's own) |", "|" + "---|" * 11]
    for (L, b) in sorted({(r["context"], r["batch"]) for r in rows}):
        one, many = by.get((L, b, 1)), by.get((L, b, n))
        if many is None:
            continue
        s1, sn = one and one["sqz"], many["sqz"]
        d1, dn = one and one["dense_prefix"], many["dense_prefix"]
        c = many.get("check")
        def said(c: dict[str, Any]) -> str:
            return c.get("error") or (f"{'same' if c['tokens_equal'] else 'differ at ' + str(c['first_token_diff'])} "
                                      f"of {c['steps_compared']}, {c['rel_logit_diff']:.1e}")

        check = "-" if not c else c.get("error") or (
            f"{said(c)} {'ok' if c['logits_ok'] else 'OVER'}" + (f"; dense: {said(c['dense'])}" if "dense" in c else ""))
        sq = f"{one['squeeze_s']:.1f} / {many['squeeze_s']:.1f}" if one else f"- / {many['squeeze_s']:.1f}"
        lines.append(f"| {L} | {b} | {ms(s1)} | {ms(sn)} | {ratio(s1, sn)} | {ms(d1)} | {ms(dn)} | {ratio(d1, dn)} | "
                     f"{ratio(dn, sn)} | {sq} | {check} |")
    return "\n".join(lines)


def main_tp(args, dtype: torch.dtype, out_dir: str, max_pos: int) -> int:
    """The TP rows (see the module docstring): rank 0 alone at TP=1, then every rank at TP=N."""
    import datetime
    import gc

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, DistributedConfig

    cuda = args.device.startswith("cuda")
    if cuda:  # this process's GPU, bound before the process group (as transformers does)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        args.device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2),  # ranks wait out TP=1
                            device_id=torch.device(args.device) if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != args.tp:
        raise SystemExit(f"--tp {args.tp} but torchrun started {world} processes: use --nproc_per_node {args.tp}")
    shape, layers, name = random_shape(args)
    vocab = shape["vocab_size"]
    model_dir = args.model_dir or os.path.join(tempfile.gettempdir(), f"sqz_bench_{'tiny' if args.tiny else '8b'}_"
                                               f"{layers}l_{str(dtype)[6:]}_seed{args.seed}_pos{max_pos}")
    config = SqueezeConfig(keep=args.keep)
    rows: list[dict[str, Any]] = []
    ref: dict[int, dict[str, torch.Tensor]] = {}
    dense_ref: dict[int, dict[str, Any]] = {}

    def ids(L: int) -> torch.Tensor:
        return seeded_ids(args.seed + L, vocab, (1, L), args.device)

    def questions(L: int, b: int) -> torch.Tensor:
        return seeded_ids(args.seed + 7919 * b + L, vocab, (b, args.question), args.device)

    def row(model, L: int, b: int, tp: int, squeeze_s: float, ctx, compiled: bool) -> dict[str, Any]:
        q = questions(L, b)
        r = {"model": f"{name}, TP={tp}", "tp": tp, "context": L, "batch": b, "squeeze_s": squeeze_s,
             **sizes(model, ctx, L + args.question + args.new_tokens, b, tp)}
        r["sqz"] = guarded(lambda: run_sqz(model, ctx, q, args, compiled, warm_compile=False))  # cold only: device time
        r["dense_prefix"] = {"error": "skipped"} if args.sqz_only else guarded(lambda: run_dense_prefix(model, ids(L), q, args))
        r["dense"] = {"error": "not run under --tp"}
        return r

    if rank == 0:  # TP=1: this GPU alone; the file each context is squeezed into is the check's input
        stage(f"TP=1 on rank 0; the model in {model_dir}")
        if os.path.isfile(os.path.join(model_dir, "config.json")):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=args.device).eval()
            model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
        else:
            torch.manual_seed(args.seed)
            model = random_llama(shape, layers, max_pos, dtype, args.device)
            stage("saving the random model for the TP ranks")
            model.save_pretrained(model_dir)
        compiled = False
        for L in args.contexts:
            stage(f"TP=1, context {L}: squeeze")
            squeeze_s, ctx = timed(lambda: sqz_compile.squeeze(model, ids(L), config, progress=False), args.device)
            ctx.save(os.path.join(model_dir, f"context-{L}.sqz"))
            for b in args.batches:
                rows.append(row(model, L, b, 1, squeeze_s, ctx, compiled))
                compiled = True
                write(rows, args, dtype, out_dir)
            ref[L] = greedy(sqz_compile.compile(model, ctx, compile_config(args)), questions(L, 1), args.check_tokens, args)
            dense_ref[L] = guarded(lambda: dense_greedy(model, ids(L), questions(L, 1), args.check_tokens, args.device))
            del ctx
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    dist.barrier()

    stage(f"TP={world}: every rank loads its shard")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 distributed_config=DistributedConfig(tp_plan="auto")).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    compiled = False
    for L in args.contexts:
        stage(f"TP={world}, context {L}: squeeze (each rank its KV heads)")
        squeeze_s, ctx = timed(lambda: sqz_compile.squeeze(model, ids(L), config, progress=False), args.device)
        for b in args.batches:
            r = row(model, L, b, world, squeeze_s, ctx, compiled)
            compiled = True
            rows.append(r)
        del ctx
        stage(f"TP={world}, context {L}: check against TP=1 over the TP=1 file")

        def check() -> dict[str, Any]:
            loaded = sqz_compile.SqueezedContext.load(os.path.join(model_dir, f"context-{L}.sqz"), model)
            got = greedy(sqz_compile.compile(model, loaded, compile_config(args)), questions(L, 1),
                         args.check_tokens, args)
            dense = guarded(lambda: dense_greedy(model, ids(L), questions(L, 1), args.check_tokens, args.device))
            if rank:
                return {}
            out = compare_greedy(ref[L], got)
            if "error" in dense or "error" in dense_ref[L]:
                out["dense"] = {"error": dense.get("error") or dense_ref[L]["error"]}
            else:
                out["dense"] = compare_greedy(dense_ref[L], dense)
            return out

        rows[-len(args.batches)]["check"] = guarded(check)
        if rank == 0:
            write(rows, args, dtype, out_dir)
            print(json.dumps({"context": L, "check": rows[-len(args.batches)]["check"]}), flush=True)
    if rank == 0:
        print(table(rows) + "\n\n" + tp_table(rows, world))
    dist.barrier()
    dist.destroy_process_group()
    if rank:
        return 0  # rank 0 reports
    bad = [r for r in rows if "error" in r["sqz"] or r["sqz"]["graphs_while_timing"]]
    failed = [r for r in rows if "check" in r and not (r["check"].get("tokens_equal") and r["check"].get("logits_ok"))]
    return 1 if (bad or failed) else 0


# --------------------------------------------------------------------------- main

def write(rows: list[dict[str, Any]], args: argparse.Namespace, dtype: torch.dtype, out_dir: str) -> None:
    """JSON, Markdown table and plot of the rows so far."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
           "dtype": str(dtype), "keep": args.keep, "question": args.question, "new_tokens": args.new_tokens,
           "reps": args.reps, "sqz_cache": args.cache, "sqz_inductor": not args.eager, "sqz_mode": args.mode,
           "sqz_prefill_inductor": args.prefill_inductor, "sqz_decode_inductor": args.decode_inductor,
           "warm_cache": args.warm_cache}
    stem = os.path.join(out_dir, "bench_e2e" + ("_real" if args.real else "") + (f"_tp{args.tp}" if args.tp > 1 else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"env": env | ({"tp": args.tp, "check_tokens": args.check_tokens} if args.tp > 1 else {}),
                   "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table(rows) + "\n" + (("\n" + tp_table(rows, args.tp) + "\n") if args.tp > 1 else ""))
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
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size: run under torchrun --nproc_per_node TP (see above)")
    p.add_argument("--model-dir", help="--tp: where the random model is saved for from_pretrained (default: a "
                                       "folder under the temp dir named after its shape; reused when present)")
    p.add_argument("--check-tokens", type=int, default=16,
                   help="--tp: greedy tokens compared between TP=1 and TP=N (default 16)")
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
    max_pos = max(args.contexts) + args.question + max(args.new_tokens, args.check_tokens if args.tp > 1 else 0)

    if args.tp > 1:
        if args.real or args.warm_cache:
            p.error("--tp runs the random 8B-shaped (or --tiny) model, without --real or --warm-cache")
        return main_tp(args, dtype, out_dir, max_pos)
    if args.real:
        from sqz_compile.assets import essay_tokens, load_smollm2

        model, tok = load_smollm2(dtype, args.device)
        name, make_ids = "SmolLM2-135M", (lambda n: essay_tokens(tok, n, seed=args.seed).reshape(1, -1)[:, :n])
    else:
        shape, layers, name = random_shape(args)
        model = random_llama(shape, layers, max_pos, dtype, args.device)
        make_ids = (lambda n: torch.randint(3, shape["vocab_size"], (1, n)))
    vocab = model.config.vocab_size
    rows, compiled = [], False
    for L in args.contexts:
        ctx_ids = make_ids(L).to(args.device)
        stage(f"context {L}: squeeze")
        squeeze_s, ctx = timed(lambda: sqz_compile.squeeze(model, ctx_ids, SqueezeConfig(keep=args.keep),
                                                           progress=False), args.device)
        for b in args.batches:
            questions = torch.randint(3, vocab, (b, args.question)).to(args.device)
            row = {"model": name, "context": L, "batch": b, "squeeze_s": squeeze_s,
                   **sizes(model, ctx, L + args.question + args.new_tokens, b)}
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
