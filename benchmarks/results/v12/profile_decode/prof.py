"""Where a decode step's time goes under sqz_compile.compile (reduce-overhead, static cache): per-token
latency from generate(1) and generate(65), then a torch.profiler table and trace of generate(17).
Run from the repository root: python benchmarks/results/v12/profile_decode/prof.py LAYERS CONTEXT
(8B shape on CUDA; a tiny model, eager, on a CPU). Writes prof_LAYERS.txt and trace_LAYERS.json to $OUT."""
import os, sys, time, json
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch
from bench_e2e import random_llama, LLAMA3_8B, TINY
import sqz_compile
from sqz_compile import SqueezeConfig, CompileConfig
dev = "cuda" if torch.cuda.is_available() else "cpu"
tiny = dev == "cpu"
layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
n = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
out = os.environ.get("OUT", "/tmp")
shape = TINY if tiny else LLAMA3_8B
dtype = torch.float32 if tiny else torch.bfloat16
model = random_llama(shape, layers, n + 512, dtype, dev)
ids = torch.randint(3, shape["vocab_size"], (1, n), device=dev)
ctx = sqz_compile.squeeze(model, ids, SqueezeConfig(keep=0.125), progress=False)
mode = None if tiny else "reduce-overhead"
sm = sqz_compile.compile(model, ctx, CompileConfig(inductor=not tiny, mode=mode, prefill_inductor=False))
q = torch.randint(3, shape["vocab_size"], (1, 64), device=dev)
m = torch.ones_like(q)
def gen(k): return sm.generate(q, attention_mask=m, max_new_tokens=k, do_sample=False, cache_implementation="static")
def sync():
    if dev == "cuda": torch.cuda.synchronize()
t = time.perf_counter(); gen(3); sync(); print("compile", time.perf_counter() - t, flush=True)
def timed(k):
    best = 1e9
    for _ in range(3):
        sync(); t = time.perf_counter(); gen(k); sync(); best = min(best, time.perf_counter() - t)
    return best
t1, t65 = timed(1), timed(65)
print(f"TTFT {t1*1e3:.2f} ms  per token {(t65 - t1) / 64 * 1e3:.3f} ms", flush=True)
from torch.profiler import profile, ProfilerActivity
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
with profile(activities=acts) as p:
    gen(17); sync()
sort = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
tab = p.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
print(tab)
with open(os.path.join(out, f"prof_{layers}.txt"), "w") as f:
    f.write(tab)
    f.write("\n\nby CPU total\n")
    f.write(p.key_averages().table(sort_by="cpu_time_total", row_limit=60, max_name_column_width=90))
p.export_chrome_trace(os.path.join(out, f"trace_{layers}.json"))
from torch._dynamo.utils import counters
print({k: dict(v) for k, v in counters.items() if k in ("inductor", "stats")})
