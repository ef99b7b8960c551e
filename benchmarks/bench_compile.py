"""Where compile time goes for a many-layer model (issue 17), on any device, CPU by default.

A random-weight Llama (hidden 256, 4 query / 2 KV heads, head dim 64; the layer count is what
tracing cost grows with), a squeezed context (sqz_compile.squeeze), sqz_compile.compile(model,
ctx, CompileConfig(inductor=False)) and one generate(max_new_tokens=3): the prefill and decode
graphs. Each layer count runs in a fresh process (nothing warm from the previous one); --repeat N
runs it N times and keeps the fastest (a shared machine's noise only adds time). Reported:

  total       wall and CPU seconds of the first generate
  dynamo      seconds per Dynamo stage (torch._dynamo.utils.compilation_time_metrics; wall
              seconds, nested: compile_inner > compile_attempt_0 > bytecode_tracing >
              get_fake_value, ...; OutputGraph.call_user_compiler = our backend [+ Inductor]),
              bytecode tracing per graph (prefill/decode), guard, input and node counts per
              graph, and the fake-tensor dispatch cache's hits and misses (counts: unlike the
              seconds, not moved by a noisy machine)
  backend     seconds inside sqz_backend split into its parts (exclusive: graph copy, layer
              views of the context inputs, matching, checks, fake propagation of the new ops,
              dead-node removal, lint, recompile, Inductor), by wrapping those functions

    PYTHONPATH=. nice python benchmarks/bench_compile.py --layers 16,32 --out /tmp/bc.json
    PYTHONPATH=. nice python benchmarks/bench_compile.py --layers 4 --inductor
    PYTHONPATH=. nice python benchmarks/bench_compile.py --layers 32 --profile /tmp/bc32.prof

--profile writes a cProfile of the first generate (one layer count) for `python -m pstats`.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_e2e import random_llama  # noqa: E402  (this script's folder is on sys.path)

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             vocab_size=512)


class PartTimer:
    """Exclusive seconds per label of wrapped functions, counted only inside the backend (the
    outermost label): a nested call's time is its own label's, not its caller's. A function
    wrapped with `not_under` labels is not counted inside those (Inductor's own recompiles)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[tuple[str, list[float]]] = []  # open calls: (label, [start, seconds in children])

    def wrap(self, label: str, fn: Callable, not_under: tuple[str, ...] = ()) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if (label != self.root and not self._stack) or any(open_ in not_under for open_, _ in self._stack):
                return fn(*args, **kwargs)
            frame = [time.perf_counter(), 0.0]
            self._stack.append((label, frame))
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                total = time.perf_counter() - frame[0]
                self.seconds[label] = self.seconds.get(label, 0.0) + total - frame[1]
                self.calls[label] = self.calls.get(label, 0) + 1
                if self._stack:
                    self._stack[-1][1][1] += total

        return timed

    def patch(self, owner: Any, name: str, label: str, not_under: tuple[str, ...] = ()) -> None:
        if hasattr(owner, name):
            setattr(owner, name, self.wrap(label, getattr(owner, name), not_under))


def instrument() -> PartTimer:
    """Wrap the backend and its parts (module attributes, so callers pick up the wrappers)."""
    import torch._inductor.compile_fx as compile_fx
    from torch.fx import Graph, GraphModule

    import sqz_compile.backend as backend
    import sqz_compile.passes.bound as bound
    import sqz_compile.passes.rewrite as rewrite
    import sqz_compile.squeezed_model as squeezed_model

    t = PartTimer("backend (other)")
    squeezed_model.sqz_backend = t.wrap("backend (other)", backend.sqz_backend)
    t.patch(backend, "copy_graph_module", "copy graph")
    t.patch(backend, "local_context", "local_context")
    t.patch(backend, "rewrite_attention", "rewrite (other)")
    t.patch(rewrite, "bound_context", "bound_context")
    t.patch(bound.BoundContext, "layer", "layer views")
    t.patch(rewrite, "find_attention", "find_attention")
    t.patch(rewrite, "_check", "checks")
    t.patch(rewrite, "_settings_reason", "checks")
    t.patch(rewrite, "_fake_output", "fake propagation")
    t.patch(rewrite, "_erase_dead", "erase dead")
    t.patch(Graph, "lint", "lint", not_under=("inductor",))
    t.patch(GraphModule, "recompile", "recompile", not_under=("inductor",))
    t.patch(compile_fx, "compile_fx", "inductor")
    return t


def measure(layers: int, args: argparse.Namespace) -> dict[str, Any]:
    """One cold first generate in this process."""
    import sqz_compile
    from sqz_compile import CompileConfig, SqueezeConfig
    from torch._dynamo.utils import compilation_time_metrics, counters, get_compilation_metrics
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    model = random_llama(SHAPE, layers, 1024, torch.float32, "cpu", args.attn)
    g = torch.Generator().manual_seed(1)
    ctx_ids = torch.randint(3, SHAPE["vocab_size"], (1, args.context), generator=g)
    t = time.perf_counter()
    ctx = sqz_compile.squeeze(model, ctx_ids, SqueezeConfig(keep=0.3, cluster_ratio=0.25, observation_window=8,
                                                            dense_tokens=2), progress=False)
    squeeze_s = time.perf_counter() - t
    question = torch.randint(3, SHAPE["vocab_size"], (1, args.question), generator=g)

    timer = instrument()
    sm = sqz_compile.compile(model, ctx, CompileConfig(inductor=args.inductor))
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    fake0 = FakeTensorMode.cache_info()
    t, cpu = time.perf_counter(), time.process_time()
    with profiler if profiler is not None else contextlib.nullcontext():
        sm.generate(question, attention_mask=torch.ones_like(question), max_new_tokens=3, do_sample=False)
    first, first_cpu = time.perf_counter() - t, time.process_time() - cpu
    fake_cache = FakeTensorMode.cache_info()
    if profiler is not None:
        profiler.dump_stats(args.profile)
    graphs = [{k: getattr(m, k, None) for k in ("guard_count", "shape_env_guard_count", "graph_input_count",
                                                 "graph_node_count", "graph_op_count", "num_graph_breaks", "gc_time_us")}
              for m in get_compilation_metrics()]
    return {"layers": layers, "inductor": args.inductor, "squeeze_s": squeeze_s, "first_generate_s": first,
            "first_generate_cpu_s": first_cpu,
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "dynamo": {k: sum(v) for k, v in compilation_time_metrics.items()},
            "dynamo_per_graph": {k: list(v) for k, v in compilation_time_metrics.items()},
            "backend": dict(sorted(timer.seconds.items(), key=lambda kv: -kv[1])),
            "backend_calls": timer.calls, "graphs": graphs,
            "fake_dispatch": {"cache_hits": fake_cache.hits - fake0.hits,
                              "cache_misses": fake_cache.misses - fake0.misses,
                              "cache_bypasses": sum(fake_cache.bypasses.values()) - sum(fake0.bypasses.values())}}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one column per run, rows = totals, Dynamo stages, backend parts, graph counts."""
    head = [f"{r['layers']} layers{' inductor' if r['inductor'] else ''}" for r in rows]
    lines = ["| seconds | " + " | ".join(head) + " |", "|---|" + "---|" * len(rows)]

    def add(name: str, values: list[Any]) -> None:
        lines.append(f"| {name} | " + " | ".join("" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
                                                 for v in values) + " |")

    add("first generate", [r["first_generate_s"] for r in rows])
    add("first generate, CPU time", [r["first_generate_cpu_s"] for r in rows])
    stages = sorted({k for r in rows for k, v in r["dynamo"].items() if v >= 0.01},
                    key=lambda k: -max(r["dynamo"].get(k, 0.0) for r in rows))
    for k in stages:
        add(f"dynamo: {k}", [r["dynamo"].get(k) for r in rows])
    add("bytecode_tracing per graph", ["/".join(f"{t:.1f}" for t in r["dynamo_per_graph"].get("bytecode_tracing", []))
                                       for r in rows])
    parts = sorted({k for r in rows for k in r["backend"]}, key=lambda k: -max(r["backend"].get(k, 0.0) for r in rows))
    add("backend total", [sum(r["backend"].values()) for r in rows])
    for k in parts:
        add(f"backend: {k}", [r["backend"].get(k) for r in rows])
    add("graphs", [r["unique_graphs"] for r in rows])
    for k in ("cache_hits", "cache_misses", "cache_bypasses"):
        add(f"fake tensor {k}", [r["fake_dispatch"][k] for r in rows])
    for k in ("guard_count", "shape_env_guard_count", "graph_input_count", "graph_node_count"):
        add(f"{k} per graph", ["/".join(str(g[k]) for g in r["graphs"]) for r in rows])
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="16,32", help="comma-separated layer counts, each in a fresh process")
    p.add_argument("--inductor", action="store_true",
                   help="Inductor after the rewrite, cold (an empty TORCHINDUCTOR_CACHE_DIR per run; default: eager)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--context", type=int, default=64, help="context tokens squeezed")
    p.add_argument("--question", type=int, default=8, help="prompt tokens")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per layer count (fresh processes); the table shows the fastest")
    p.add_argument("--profile", help="cProfile output file of the first generate (one layer count)")
    p.add_argument("--out", help="JSON file for the rows")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args)))
        return
    counts = [int(x) for x in args.layers.split(",")]
    if args.profile and len(counts) != 1:
        p.error("--profile takes one layer count")
    rows = []
    for n in counts:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--attn", args.attn,
               "--context", str(args.context), "--question", str(args.question)]
        cmd += ["--inductor"] if args.inductor else []
        cmd += ["--profile", args.profile] if args.profile else []
        runs = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="bench_compile_inductor_") as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}  # Inductor cold in every run
                out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{n} layers: first generate {runs[-1]['first_generate_s']:.1f} s", file=sys.stderr, flush=True)
        best = min(runs, key=lambda r: r["first_generate_s"])  # the least disturbed run on a shared machine
        best["first_generate_s_all"] = [r["first_generate_s"] for r in runs]
        rows.append(best)
    print(table(rows))
    if args.out:
        meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "cpus": os.cpu_count(), "argv": sys.argv[1:]}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
