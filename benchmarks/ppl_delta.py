"""ΔPPL between `sqz eval` runs, with a paired confidence interval: is a change (a low-bit context,
another lookup) within a perplexity target, or only within the noise of 512 scored tokens?

Each run must score the same essay segments (`--ppl-segments`, same contexts and `--ppl-tokens`);
the first file is the baseline. Per (context, variant) the PPL is pooled over the segments' tokens
(exp of the mean NLL), and ΔPPL = PPL(run) - PPL(baseline); a low-bit run also gets the row
"dense over these K/V" (dense attention over its dequantized context) against the baseline's
dense PPL, the quantization's own share. The interval is a paired block
bootstrap: the tokens of each segment are cut into blocks of --block consecutive tokens (the
per-token NLLs are correlated along the text), blocks are resampled with replacement within each
segment, the same blocks for both runs, and the 2.5/97.5 percentiles of the resampled ΔPPL are
reported. Writes <out>.json, <out>.md and <out>.png.

    python benchmarks/ppl_delta.py kv16.json kv4.json kv3.json --out benchmarks/results/v16/ppl_delta
"""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np


DENSE_KV = "dense over these K/V"  # compared with the baseline's dense row


def _key(r: dict) -> tuple:
    return (r["context"], r["method"], r["keep"], r["lookup"], r["mode"])


def ppl_tokens(path: str) -> tuple[dict, dict]:
    """(meta, {(context, method, keep, lookup, mode): {seed: per-token NLL array}}) of one run."""
    with open(path, encoding="utf-8") as f:
        res = json.load(f)
    out: dict = {}
    for r in res["records"]:
        if r["task"] != "ppl":
            continue
        if "nll_tokens" not in r:
            raise SystemExit(f"{path}: PPL records without per-token NLLs (written before they were kept): re-run "
                             "sqz eval")
        seed = r.get("ppl_seed", 1)
        out.setdefault(_key(r), {})[seed] = np.asarray(r["nll_tokens"], dtype=np.float64)
        if "dense_kv_nll_tokens" in r:  # dense attention over the run's low-bit K/V
            k = (r["context"], DENSE_KV, r["keep"], r["lookup"], r["mode"])
            out.setdefault(k, {})[seed] = np.asarray(r["dense_kv_nll_tokens"], dtype=np.float64)
    return res["meta"], out


def delta(base: dict, test: dict, block: int, draws: int, rng: np.random.Generator) -> dict:
    """Pooled PPLs, ΔPPL and its bootstrap interval over the segments both runs scored."""
    seeds = sorted(set(base) & set(test))
    if not seeds:
        raise SystemExit("the runs share no PPL segment (same --ppl-segments and contexts?)")
    for s in seeds:
        if base[s].shape != test[s].shape:
            raise SystemExit(f"segment {s}: {base[s].size} vs {test[s].size} scored tokens (same --ppl-tokens?)")
    a = np.concatenate([base[s] for s in seeds])
    b = np.concatenate([test[s] for s in seeds])
    # block sums per segment: [blocks] for both runs, resampled jointly
    sums_a, sums_b, counts, seg = [], [], [], []
    for i, s in enumerate(seeds):
        n = base[s].size
        for lo in range(0, n, block):
            sums_a.append(base[s][lo:lo + block].sum())
            sums_b.append(test[s][lo:lo + block].sum())
            counts.append(min(block, n - lo))
            seg.append(i)
    sums_a, sums_b, counts, seg = map(np.asarray, (sums_a, sums_b, counts, seg))
    picks = []
    for i in range(len(seeds)):
        idx = np.flatnonzero(seg == i)
        picks.append(idx[rng.integers(0, idx.size, size=(draws, idx.size))])
    pick = np.concatenate(picks, axis=1)  # [draws, blocks]
    tok = counts[pick].sum(1)
    boot = np.exp(sums_b[pick].sum(1) / tok) - np.exp(sums_a[pick].sum(1) / tok)
    ppl_a, ppl_b = math.exp(a.mean()), math.exp(b.mean())
    return {"segments": len(seeds), "tokens": int(a.size), "ppl_base": ppl_a, "ppl": ppl_b,
            "delta_ppl": ppl_b - ppl_a, "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "per_segment_delta": [math.exp(test[s].mean()) - math.exp(base[s].mean()) for s in seeds]}


def _label(meta: dict, path: str) -> str:
    st = meta.get("settings", {})
    bits = st.get("kv_bits", 16)
    return f"kv_bits={bits}" + ("" if bits == 16 else f" {st.get('kv_datatype')} {st.get('kv_outliers')}") + \
        f" ({os.path.basename(path)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="sqz eval JSON files; the first is the baseline")
    ap.add_argument("--block", type=int, default=64, help="tokens per bootstrap block (default 64)")
    ap.add_argument("--draws", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/ppl_delta")
    a = ap.parse_args()
    if len(a.runs) < 2:
        raise SystemExit("give a baseline run and at least one run to compare")
    rng = np.random.default_rng(a.seed)
    base_meta, base = ppl_tokens(a.runs[0])
    rows = []
    for path in a.runs[1:]:
        meta, test = ppl_tokens(path)
        for key in sorted(test, key=str):
            bkey = (key[0], "dense", *key[2:]) if key[1] == DENSE_KV else key
            if key[1] == "dense" or bkey not in base:
                continue
            variant = key[1] if key[1] == DENSE_KV else f"{key[1]} keep={key[2]:g} {key[3]} {key[4]}"
            rows.append({"run": _label(meta, path), "baseline": _label(base_meta, a.runs[0]), "context": key[0],
                         "variant": variant, **delta(base[bkey], test[key], a.block, a.draws, rng)})
    lines = ["| run | context | variant | segments x tokens | PPL baseline | PPL | ΔPPL | 95% CI |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['context']} | {r['variant']} | {r['segments']} x {r['tokens'] // r['segments']} | "
                     f"{r['ppl_base']:.2f} | {r['ppl']:.2f} | {r['delta_ppl']:+.3f} | "
                     f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".json", "w", encoding="utf-8") as f:
        json.dump({"baseline": a.runs[0], "runs": a.runs[1:], "block": a.block, "draws": a.draws, "rows": rows}, f,
                  indent=1)
    with open(a.out + ".md", "w", encoding="utf-8") as f:
        f.write(f"ΔPPL against `{a.runs[0]}` (paired block bootstrap, blocks of {a.block} tokens, "
                f"{a.draws} draws)\n\n{table}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 3.5))
    xs = np.arange(len(rows))
    d = np.array([r["delta_ppl"] for r in rows])
    lo = d - np.array([r["ci95"][0] for r in rows])
    hi = np.array([r["ci95"][1] for r in rows]) - d
    ax.errorbar(xs, d, yerr=[lo, hi], fmt="o", capsize=4)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(xs, [f"{r['run'].split(' (')[0]}\n{r['context']}" for r in rows], fontsize=7)
    ax.set_ylabel("ΔPPL vs baseline (95% CI)")
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=120)


if __name__ == "__main__":
    main()
