"""`sqz eval` (and benchmarks/accuracy.py): its own argparse entry. torch loads only when a run
starts, so that `sqz eval --help` is fast."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from typing import Any, Sequence

from .needles import NEEDLES
from ..config import KV_BITS, KV_DATATYPES
from .settings import LOOKUPS, MODES, EvalSettings


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    d = EvalSettings()
    p = argparse.ArgumentParser(prog="sqz eval", description=(
        "Accuracy vs keep on SmolLM2-135M-Instruct over Paul Graham essays: needles found, perplexity and "
        "next-token agreement, against dense attention and an oracle at the same sparsity. Writes JSON, a "
        "markdown table and a plot."))
    p.add_argument("--contexts", type=int, nargs="+", default=list(d.contexts),
                   help=f"context lengths in tokens (default: {_join(d.contexts)})")
    p.add_argument("--keeps", type=float, nargs="+", default=list(d.keeps),
                   help=f"target fractions of context keys attended (default: {_join(d.keeps)})")
    p.add_argument("--depths", type=float, nargs="+", default=list(d.depths),
                   help=f"needle depths in [0, 1], 0 = start of the essay (default: {_join(d.depths)})")
    p.add_argument("--needles", type=int, default=d.needles,
                   help=f"how many needles (1..{len(NEEDLES)}; default {d.needles})")
    p.add_argument("--lookups", nargs="+", choices=LOOKUPS, default=list(d.lookups),
                   help=f"cluster lookups: flat, or hier (coarse level first) (default: {_join(d.lookups)})")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(d.modes),
                   help=f"selection: threshold (calibrated for keep) or budget (keep x clustered keys per "
                        f"block) (default: {_join(d.modes)})")
    p.add_argument("--max-dropped-mass", type=float, default=d.max_dropped_mass,
                   help=f"eps of the bounded mode (default {d.max_dropped_mass})")
    p.add_argument("--oracle", nargs="+", default=list(d.oracle),
                   help=f"variants that also get an oracle run: LOOKUP-MODE names (e.g. flat-threshold), all, "
                        f"none (default: {_join(d.oracle)})")
    p.add_argument("--tasks", nargs="+", choices=("ppl", "niah"), default=list(d.tasks),
                   help=f"ppl: perplexity of essay continuations; niah: needle in a haystack "
                        f"(default: {_join(d.tasks)})")
    p.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens,
                   help=f"user tokens scored for PPL (default {d.ppl_tokens})")
    p.add_argument("--ppl-segments", type=int, default=d.ppl_segments,
                   help="essay segments (context + scored tokens each, from different essay orders) whose "
                        f"PPL is pooled (default {d.ppl_segments}); benchmarks/ppl_delta.py compares two runs")
    p.add_argument("--ppl-contexts", type=int, nargs="+", default=None,
                   help="context lengths for PPL (default: --contexts)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"greedy answer length for NIAH (default {d.max_new_tokens})")
    p.add_argument("--no-prime", action="store_true",
                   help="do not start the assistant's answer with the needle's lead (longer answers)")
    p.add_argument("--block-q", type=int, default=d.block_q,
                   help=f"prefill queries sharing one cluster selection (default {d.block_q})")
    p.add_argument("--cluster-ratio", type=float, default=d.cluster_ratio,
                   help=f"clusters per clustered context token (default {d.cluster_ratio})")
    p.add_argument("--observation-window", type=int, default=d.observation_window,
                   help=f"last context tokens always attended, whose queries calibrate the thresholds "
                        f"(default {d.observation_window})")
    p.add_argument("--sink-tokens", type=int, default=d.sink_tokens,
                   help=f"SqueezeConfig.sink_tokens: first context tokens always attended (default {d.sink_tokens})")
    p.add_argument("--dense-tokens", type=int, default=d.dense_tokens,
                   help=f"SqueezeConfig.dense_tokens: per KV head, the context tokens the observation window "
                        f"attends to most, attended densely (default {d.dense_tokens})")
    p.add_argument("--cluster-variance", choices=("on", "off"), default="on" if d.cluster_variance else "off",
                   help="SqueezeConfig.cluster_variance: score clusters with their per-channel variance")
    p.add_argument("--dense-layers", type=int, default=d.dense_layers,
                   help=f"SqueezeConfig.dense_layers: leading layers attending to the whole context "
                        f"(default {d.dense_layers})")
    p.add_argument("--kv-bits", type=int, choices=KV_BITS, default=d.kv_bits,
                   help=f"SqueezeConfig.kv_bits: bits per stored context K/V entry (default {d.kv_bits})")
    p.add_argument("--kv-datatype", choices=KV_DATATYPES, default=d.kv_datatype,
                   help=f"SqueezeConfig.kv_datatype for --kv-bits < 16 (default {d.kv_datatype})")
    p.add_argument("--kv-outliers", type=float, default=d.kv_outliers,
                   help=f"SqueezeConfig.kv_outliers for --kv-bits < 16: fraction of K/V entries kept in float16 "
                        f"(default {d.kv_outliers})")
    p.add_argument("--kv-qnorm", action="store_true",
                   help="SqueezeConfig.kv_qnorm for --kv-bits < 16: Q-Norm of the codebooks (mean and spread "
                        "of the dequantized entries matched to the data's)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="model dtype (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks/results/accuracy.json",
                   help="JSON results; the .md table and .png plot go beside it (default: %(default)s)")
    p.add_argument("--report-only", action="store_true", help="rewrite .md/.png from an existing --out JSON")
    p.add_argument("--notes", default=None, help="markdown file whose text is stored in the JSON and shown "
                                                 "under 'Findings' in the .md (e.g. with --report-only)")
    return p


def _join(values: Sequence[Any]) -> str:
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def settings_from_args(a: argparse.Namespace) -> EvalSettings:
    if not 1 <= a.needles <= len(NEEDLES):
        raise SystemExit(f"--needles must be 1..{len(NEEDLES)}")
    valid = {"all", "none"} | {f"{lu}-{mo}" for lu in LOOKUPS for mo in MODES}
    if set(a.oracle) - valid:
        raise SystemExit(f"--oracle {sorted(set(a.oracle) - valid)}: use names from {sorted(valid)}")
    if any(not 0.0 < k <= 1.0 for k in a.keeps):
        raise SystemExit("--keeps must lie in (0, 1]")
    if a.ppl_segments < 1:
        raise SystemExit("--ppl-segments must be >= 1")
    return EvalSettings(contexts=tuple(a.contexts), keeps=tuple(a.keeps), depths=tuple(a.depths),
                        needles=a.needles, lookups=tuple(a.lookups), modes=tuple(a.modes), oracle=tuple(a.oracle),
                        ppl_tokens=a.ppl_tokens, ppl_contexts=tuple(a.ppl_contexts) if a.ppl_contexts else None,
                        ppl_segments=a.ppl_segments,
                        tasks=tuple(a.tasks), max_new_tokens=a.max_new_tokens, prime=not a.no_prime, block_q=a.block_q,
                        cluster_ratio=a.cluster_ratio, observation_window=a.observation_window,
                        sink_tokens=a.sink_tokens, dense_tokens=a.dense_tokens,
                        cluster_variance=a.cluster_variance == "on", dense_layers=a.dense_layers, kv_bits=a.kv_bits, kv_datatype=a.kv_datatype,
                        kv_qnorm=a.kv_qnorm, kv_outliers=a.kv_outliers, max_dropped_mass=a.max_dropped_mass)


def main(argv: Sequence[str] | None = None) -> int:
    """`sqz eval`: run the accuracy benchmark on SmolLM2-135M-Instruct and the Paul Graham essays."""
    import sys

    a = build_parser().parse_args(argv)
    from .report import _key, _label, write_reports

    if a.report_only:
        with open(a.out, encoding="utf-8") as f:
            result = json.load(f)
        if a.notes:
            with open(a.notes, encoding="utf-8") as f:
                result["meta"]["notes"] = f.read()
        write_reports(result, a.out)
        return 0
    settings = settings_from_args(a)
    import torch

    from .runs import _device, run

    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers

    from ..assets import load_smollm2

    model, tok = load_smollm2(dtype=getattr(torch, a.dtype), device=a.device)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    result: dict[str, Any] = {
        "meta": {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)", "device": str(_device(model)),
                 "device_name": (torch.cuda.get_device_name() if _device(model).type == "cuda"
                                 else platform.processor() or platform.machine()),
                 "dtype": a.dtype, "torch": torch.__version__, "transformers": transformers.__version__,
                 "threads": torch.get_num_threads(), "command": "sqz eval " + " ".join(argv or sys.argv[1:]),
                 "settings": dataclasses.asdict(settings), "needles": [dataclasses.asdict(n) for n in NEEDLES],
                 "status": "running", "started": time.strftime("%Y-%m-%d %H:%M:%S")},
        "records": []}
    t0 = time.perf_counter()

    def emit(rec: dict) -> None:
        result["records"].append(rec)
        result["meta"]["elapsed_s"] = round(time.perf_counter() - t0, 1)
        write_reports(result, a.out, plot=False)
        print(f"  {_label(_key(rec))}: " + ", ".join(
            f"{k}={rec[k]}" for k in ("answer", "hit", "agree", "n", "seconds") if k in rec), flush=True)

    run(model, tok, settings, emit, log=lambda s: print(s, flush=True))
    result["meta"]["status"] = "complete"
    result["meta"]["elapsed_s"] = round(time.perf_counter() - t0, 1)
    write_reports(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
