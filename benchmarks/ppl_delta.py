"""ΔPPL and needles between `sqz eval` runs, paired: is a change (a low-bit context, another
lookup) within a perplexity target, or only within the noise of 512 scored tokens? Does it find
the same needles, or differ by more than a few cases' noise?

Each run must score the same essay segments (`--ppl-segments`, same contexts and `--ppl-tokens`);
the first file is the baseline. Per (context, variant) the PPL is pooled over the segments' tokens
(exp of the mean NLL), and ΔPPL = PPL(run) - PPL(baseline); a low-bit run also gets the row
"dense over these K/V" (dense attention over its dequantized context) against the baseline's
dense PPL, the quantization's own share. The interval is a paired block
bootstrap: the tokens of each segment are cut into blocks of --block consecutive tokens (the
per-token NLLs are correlated along the text), blocks are resampled with replacement within each
segment, the same blocks for both runs, and the 2.5/97.5 percentiles of the resampled ΔPPL are
reported.

Needles too, when both runs have NIAH cases: per (context, variant) the hits of each run over the
cases both ran (same needle, same depth), the cases only one of them finds, and the exact McNemar
test on those (two-sided binomial on the discordant cases): whether "same needles" is the
reading, or one run finds more than the noise of a few cases allows. Writes <out>.json, <out>.md
and <out>.png.

    python benchmarks/ppl_delta.py kv16.json kv4.json kv3.json --out benchmarks/results/v16/ppl_delta
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np


DENSE_KV = "dense over these K/V"  # compared with the baseline's dense row


def _key(r: dict) -> tuple:
    return (r["context"], r["method"], r["keep"], r["lookup"], r["mode"])


def _load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def ppl_tokens(res: dict, path: str) -> tuple[dict, dict]:
    """(meta, {(context, method, keep, lookup, mode): {seed: per-token NLL array}}) of one run
    (`res`, read from `path`)."""
    out: dict = {}
    for r in res["records"]:
        if r["task"] != "ppl":
            continue
        if "nll_tokens" not in r:  # needles can still be compared
            print(f"{path}: PPL records without per-token NLLs (written before they were kept; re-run sqz eval "
                  "to compare PPL): PPL skipped", file=sys.stderr)
            return res["meta"], {}
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


def niah_hits(res: dict) -> dict:
    """{(context, method, keep, lookup, mode): {(needle, depth): hit}} of one run; a low-bit run's
    dense rows (dense attention over its dequantized K/V) under DENSE_KV."""
    low_bit = res["meta"].get("settings", {}).get("kv_bits", 16) < 16
    out: dict = {}
    for r in res["records"]:
        if r["task"] == "niah":
            k = _key(r)
            if low_bit and r["method"] == "dense":
                k = (k[0], DENSE_KV, *k[2:])
            out.setdefault(k, {})[(r["needle"], r["depth"])] = bool(r["hit"])
    return out


def mcnemar_p(only_base: int, only_run: int) -> float:
    """Exact two-sided McNemar p-value: the discordant cases as a fair coin's flips."""
    n = only_base + only_run
    tail = sum(math.comb(n, k) for k in range(min(only_base, only_run) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def paired_needles(base: dict, test: dict) -> dict:
    """Hits of both runs over the cases both ran, the discordant cases and McNemar's p."""
    cases = sorted(set(base) & set(test))
    only_base = sum(base[c] and not test[c] for c in cases)
    only_run = sum(test[c] and not base[c] for c in cases)
    return {"cases": len(cases), "hits_base": sum(base[c] for c in cases), "hits": sum(test[c] for c in cases),
            "only_base": only_base, "only_run": only_run, "mcnemar_p": mcnemar_p(only_base, only_run),
            "only_base_cases": [list(c) for c in cases if base[c] and not test[c]],
            "only_run_cases": [list(c) for c in cases if test[c] and not base[c]]}


def _pairs(base: dict, test: dict) -> list[tuple[tuple, tuple, str]]:
    """(baseline key, run key, variant label) of every run row with a baseline row to pair with."""
    out = []
    for key in sorted(test, key=str):
        bkey = (key[0], "dense", *key[2:]) if key[1] == DENSE_KV else key
        if key[1] == "dense" or bkey not in base:
            continue
        out.append((bkey, key, key[1] if key[1] == DENSE_KV else f"{key[1]} keep={key[2]:g} {key[3]} {key[4]}"))
    return out


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
    base_res = _load(a.runs[0])
    base_meta, base = ppl_tokens(base_res, a.runs[0])
    base_niah = niah_hits(base_res)
    rows, needles = [], []
    for path in a.runs[1:]:
        res = _load(path)
        meta, test = ppl_tokens(res, path)
        label = {"run": _label(meta, path), "baseline": _label(base_meta, a.runs[0])}
        for bkey, key, variant in _pairs(base, test):
            rows.append({**label, "context": key[0], "variant": variant,
                         **delta(base[bkey], test[key], a.block, a.draws, rng)})
        test_niah = niah_hits(res)
        for bkey, key, variant in _pairs(base_niah, test_niah):
            needles.append({**label, "context": key[0], "variant": variant,
                            **paired_needles(base_niah[bkey], test_niah[key])})
    if not rows and not needles:
        raise SystemExit("the runs share no PPL segment and no needle case (same contexts, --ppl-segments, needles?)")
    text = ""
    if rows:
        lines = ["| run | context | variant | segments x tokens | PPL baseline | PPL | ΔPPL | 95% CI |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['run']} | {r['context']} | {r['variant']} | {r['segments']} x "
                         f"{r['tokens'] // r['segments']} | {r['ppl_base']:.2f} | {r['ppl']:.2f} | "
                         f"{r['delta_ppl']:+.3f} | [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] |")
        text += (f"ΔPPL against `{a.runs[0]}` (paired block bootstrap, blocks of {a.block} tokens, "
                 f"{a.draws} draws)\n\n" + "\n".join(lines) + "\n")
    if needles:
        lines = ["| run | context | variant | cases | hits baseline | hits | only baseline | only run | McNemar p |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in needles:
            lines.append(f"| {r['run']} | {r['context']} | {r['variant']} | {r['cases']} | {r['hits_base']} | "
                         f"{r['hits']} | {r['only_base']} | {r['only_run']} | {r['mcnemar_p']:.3f} |")
        text += (("\n" if text else "") + f"Needles against `{a.runs[0]}` (the same cases in both runs; "
                 "exact McNemar test on the cases only one run finds)\n\n" + "\n".join(lines) + "\n")
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".json", "w", encoding="utf-8") as f:
        json.dump({"baseline": a.runs[0], "runs": a.runs[1:], "block": a.block, "draws": a.draws, "rows": rows,
                   "needles": needles}, f, indent=1)
    with open(a.out + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (rows, needles) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5, 1.2 * sum(map(len, panels))), 3.5), squeeze=False)
    axes = list(axes[0])
    if rows:
        ax = axes.pop(0)
        xs = np.arange(len(rows))
        d = np.array([r["delta_ppl"] for r in rows])
        lo = d - np.array([r["ci95"][0] for r in rows])
        hi = np.array([r["ci95"][1] for r in rows]) - d
        ax.errorbar(xs, d, yerr=[lo, hi], fmt="o", capsize=4)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(xs, [f"{r['run'].split(' (')[0]}\n{r['context']}" for r in rows], fontsize=7)
        ax.set_ylabel("ΔPPL vs baseline (95% CI)")
    if needles:
        ax = axes.pop(0)
        xs = np.arange(len(needles))
        ax.bar(xs - 0.2, [r["hits_base"] for r in needles], 0.4, label="baseline")
        ax.bar(xs + 0.2, [r["hits"] for r in needles], 0.4, label="run")
        ax.set_xticks(xs, [f"{r['run'].split(' (')[0]}\n{r['context']} {r['variant'].split(' keep')[0]}\n"
                           f"p={r['mcnemar_p']:.2f}" for r in needles], fontsize=7)
        ax.set_ylabel(f"needles found (of {needles[0]['cases']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=120)

if __name__ == "__main__":
    main()
