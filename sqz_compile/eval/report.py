"""Summaries and reports of eval records: per-setting table, target checks, markdown, plot, JSON."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence


from .oracle import LayerStats
from .runs import LOOKUPS, MODES


# --------------------------------------------------------------------------- summary and reports

def _key(r: dict) -> tuple:
    return (r["method"], r["keep"], r["lookup"], r["mode"])


def _label(key: tuple) -> str:
    method, keep, lookup, mode = key
    return "dense" if method == "dense" else f"{method} keep={keep:g} {lookup} {mode}"


def summarize(records: Sequence[dict]) -> list[dict]:
    """One row per (method, keep, lookup, mode) and context length with NIAH hits, PPL, ΔPPL,
    agreement, KL and layer-averaged recall."""
    dense_nll: dict[int, list] = {}
    for r in records:
        if r["task"] == "ppl" and r["method"] == "dense":
            acc = dense_nll.setdefault(r["context"], [0.0, 0])
            acc[0] += r["nll_sum"]
            acc[1] += r["n"]
    dense_ppl = {n: math.exp(s / c) for n, (s, c) in dense_nll.items()}
    groups: dict[tuple, dict] = {}
    for r in records:
        g = groups.setdefault((*_key(r), r["context"]), {"niah": [], "ppl": []})
        g[r["task"]].append(r)
    rows = []
    for (method, keep, lookup, mode, n), g in sorted(groups.items(), key=lambda kv: (
            kv[0][0] != "dense", -kv[0][1], str(kv[0][2]), str(kv[0][3]), kv[0][0], kv[0][4])):
        row: dict[str, Any] = {"method": method, "keep": keep, "lookup": lookup, "mode": mode, "context": n}
        if g["niah"]:
            row["niah_hits"] = sum(bool(r["hit"]) for r in g["niah"])
            row["niah_cases"] = len(g["niah"])
            row["answer_agree"] = sum(r["agree"] for r in g["niah"]) / max(1, sum(r["n"] for r in g["niah"]))
            row["answer_kl"] = sum(r["kl_sum"] for r in g["niah"]) / max(1, sum(r["n"] for r in g["niah"]))
        if g["ppl"]:  # pooled over the essay segments
            tokens = sum(r["n"] for r in g["ppl"])
            row["ppl"] = math.exp(sum(r["nll_sum"] for r in g["ppl"]) / tokens)
            row["ppl_segments"] = len(g["ppl"])
            if n in dense_ppl:
                row["delta_ppl"] = row["ppl"] / dense_ppl[n] - 1.0
            row["ppl_agree"] = sum(r["agree"] for r in g["ppl"]) / tokens
            row["ppl_kl"] = sum(r["kl_sum"] for r in g["ppl"]) / tokens
            diffs = [r["cache_vs_full_max_abs_logit_diff"] for r in g["ppl"] if "cache_vs_full_max_abs_logit_diff" in r]
            if diffs:
                row["cache_vs_full_max_abs_logit_diff"] = max(diffs)
        layered = [r["layers"] for r in g["niah"] + g["ppl"] if "layers" in r]
        if layered:
            sums = {f: [sum(x) for x in zip(*(l.get(f) or [0.0] * len(l["rows"]) for l in layered))]
                    for f in LayerStats.FIELDS}  # older result files lack the decode fields
            per_layer = LayerStats.metrics(sums)
            row["per_layer"] = per_layer
            tot = {f: [sum(sums[f])] for f in LayerStats.FIELDS}
            row.update({k: v[0] for k, v in LayerStats.metrics(tot).items()})
        rows.append(row)
    return rows


def _fmt(x: Any, pct: bool = False, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if pct:
        return f"{100 * x:+.2f}%" if signed else f"{100 * x:.1f}%"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def targets_check(rows: Sequence[dict], keep: float = 0.125) -> list[str]:
    """The issue's targets at `keep` (hits equal to dense, ΔPPL <= +1%, top-1 agreement >= 98%)."""
    dense = {r["context"]: r for r in rows if r["method"] == "dense"}
    out = []
    for r in rows:
        if r["method"] != "squeezed" or abs(r["keep"] - keep) > 1e-9:
            continue
        name = f"{r['lookup']} {r['mode']} @ {r['context']}"
        d = dense.get(r["context"], {})
        parts = []
        if "niah_hits" in r and "niah_hits" in d:
            ok = r["niah_hits"] >= d["niah_hits"]
            parts.append(f"hits {r['niah_hits']}/{r['niah_cases']} vs dense {d['niah_hits']} "
                         f"{'✅' if ok else '❌'}")
        if "delta_ppl" in r:
            parts.append(f"ΔPPL {_fmt(r['delta_ppl'], True, True)} {'✅' if r['delta_ppl'] <= 0.01 else '❌'}")
        agrees = [(k, r[k]) for k in ("ppl_agree", "answer_agree") if k in r]
        for k, a in agrees:
            parts.append(f"{'PPL' if k == 'ppl_agree' else 'answer'} agreement {_fmt(a, True)} "
                         f"{'✅' if a >= 0.98 else '❌'}")
        out.append(f"- {name}: " + "; ".join(parts))
    return out


def write_markdown(result: dict, path: str) -> None:
    """Tables (summary, per-layer recall at the smallest keep, targets) as markdown."""
    rows = result["summary"]
    meta = result["meta"]
    lines = [f"# Accuracy: {meta.get('model', '?')}",
             "",
             f"Status: **{meta.get('status')}** · device `{meta.get('device')}` · dtype `{meta.get('dtype')}` · "
             f"torch {meta.get('torch')} · transformers {meta.get('transformers')} · "
             f"command `{meta.get('command')}`",
             "",
             "Squeezed = `torch.ops.sqz.squeezed_attention` run through a transformers attention function "
             "(`sqz_compile.eval`); oracle = same number of clustered keys per (layer, KV head, query block) "
             "as the lookup, chosen by true attention probability. NIAH hits: answers containing the needle's key "
             "word; agreement/KL on the dense answer tokens (teacher-forced) and on the PPL continuation. "
             "ΔPPL = PPL/PPL_dense − 1. kept = clustered context keys actually kept per prefill block of "
             "64 query tokens / per decoded token (the always-attended window, sinks and dense tokens "
             "come on top); "
             "mass recall = Σp(lookup keys)/Σp(oracle keys); key recall = |lookup ∩ oracle|/|oracle|.",
             *([f"The context K/V are stored in {bits} bits here: the dense NIAH row (and the answer "
                "agreement/KL measured against it) is dense attention over the dequantized context K/V, "
                "the reference point for the quantization alone; dense PPL is the model's own forward "
                "over the full text. Compare with a kv_bits=16 run for dense attention itself."]
               if (bits := int(meta.get("settings", {}).get("kv_bits", 16))) < 16 else []),
             "",
             *(["## Findings", "", meta["notes"].strip(), "", "## Results", ""] if meta.get("notes") else []),
             "| context | method | keep | lookup | mode | NIAH hits | answer agree | answer KL | PPL | ΔPPL | "
             "PPL agree | PPL KL | kept (prefill / decode) | mass recall | key recall | lost mass (lookup / oracle) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["context"]):
        hits = f"{r['niah_hits']}/{r['niah_cases']}" if "niah_hits" in r else "–"
        lost = (f"{_fmt(r.get('lost_mass_lookup'))} / {_fmt(r.get('lost_mass_oracle'))}"
                if "lost_mass_lookup" in r else "–")
        lines.append(
            f"| {r['context']} | {r['method']} | {r['keep']:g} | {r['lookup'] or '–'} | {r['mode'] or '–'} | "
            f"{hits} | "
            f"{_fmt(r.get('answer_agree'), True)} | {_fmt(r.get('answer_kl'))} | {_fmt(r.get('ppl'))} | "
            f"{_fmt(r.get('delta_ppl'), True, True)} | {_fmt(r.get('ppl_agree'), True)} | {_fmt(r.get('ppl_kl'))} | "
            f"{_fmt(r.get('kept_fraction'), True)} / {_fmt(r.get('kept_decode'), True)} | "
            f"{_fmt(r.get('mass_recall'), True)} | "
            f"{_fmt(r.get('key_recall'), True)} | {lost} |")
    keeps = sorted({r["keep"] for r in rows if r["method"] == "squeezed"})
    if keeps:
        k = 0.125 if 0.125 in keeps else keeps[0]
        lines += ["", f"## Targets at keep = {k:g}", ""] + targets_check(rows, k)
        lines += ["", f"## Per-layer recall vs the oracle, keep = {k:g} (all contexts pooled per row)", ""]
        sel = [r for r in rows if r["method"] == "squeezed" and r["keep"] == k and "per_layer" in r]
        if sel:
            head = "| layer | " + " | ".join(f"{r['lookup']} {r['mode']} @{r['context']} mass / key / lost"
                                            for r in sel) + " |"
            lines += [head, "|---" * (len(sel) + 1) + "|"]
            for li in range(len(sel[0]["per_layer"]["mass_recall"])):
                cells = [f"{_fmt(r['per_layer']['mass_recall'][li], True)} / "
                         f"{_fmt(r['per_layer']['key_recall'][li], True)} / "
                         f"{_fmt(r['per_layer']['lost_mass_lookup'][li])}" for r in sel]
                lines.append(f"| {li} | " + " | ".join(cells) + " |")
    dense_rows = [r for r in rows if "cache_vs_full_max_abs_logit_diff" in r]
    if dense_rows:
        lines += ["", "Dense baseline check (KV cache from the SqueezedContext, user tokens at positions 0.. vs "
                  "the model over the full prompt at natural positions), max |Δlogit|: "
                  + ", ".join(f"{r['context']}: {r['cache_vs_full_max_abs_logit_diff']:.2e}" for r in dense_rows)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(result: dict, path: str) -> None:
    """Hit rate, ΔPPL and per-layer mass recall vs keep. Colour: lookup + mode; line: squeezed
    (solid) / oracle (dashed); marker: context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    colours = {(lu, mo): f"C{i}" for i, (lu, mo) in enumerate((lu, mo) for lu in LOOKUPS for mo in MODES)}
    contexts = sorted({r["context"] for r in rows})
    markers = dict(zip(contexts, "osD^v<>p*"))
    lines = dict(zip(contexts, ("-", "-.", ":", (0, (5, 1)), (0, (1, 1)))))
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["method"] != "dense":
            series.setdefault((r["method"], r["lookup"], r["mode"], r["context"]), []).append(r)
    for (method, lookup, mode, n), rs in sorted(series.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=lambda r: r["keep"])
        kw = dict(color=colours[(lookup, mode)], marker=markers[n], ls="--" if method == "oracle" else "-",
                  alpha=0.6 if method == "oracle" else 1.0, label=f"{method} {lookup} {mode} @{n}")
        pts = [(r["keep"], r["niah_hits"] / r["niah_cases"]) for r in rs if "niah_hits" in r]
        if pts:
            axes[0].plot(*zip(*pts), **kw)
        pts = [(r["keep"], 100 * r["delta_ppl"]) for r in rs if "delta_ppl" in r]
        if pts:
            axes[1].plot(*zip(*pts), **kw)
    for r in rows:
        if r["method"] == "dense" and "niah_hits" in r:
            axes[0].axhline(r["niah_hits"] / r["niah_cases"], color="k", lw=0.8, ls=":")
    axes[1].axhline(1.0, color="r", lw=0.8, ls=":")
    for ax, title, yl in ((axes[0], "NIAH hit rate (dotted: dense)", "hit rate"),
                          (axes[1], "ΔPPL vs dense (red dotted: +1% target)", "ΔPPL %")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("keep")
        ax.set_ylabel(yl)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    keeps = sorted({r["keep"] for r in rows if r["method"] == "squeezed"})
    k = 0.125 if 0.125 in keeps else (keeps[0] if keeps else None)
    for r in rows:
        if r["method"] == "squeezed" and r["keep"] == k and "per_layer" in r:
            axes[2].plot(r["per_layer"]["mass_recall"], color=colours[(r["lookup"], r["mode"])],
                         ls=lines[r["context"]], marker=markers[r["context"]], ms=3,
                         label=f"{r['lookup']} {r['mode']} @{r['context']}")
    axes[2].set_title(f"per-layer mass recall vs oracle, keep={k:g}" if k else "per-layer recall")
    axes[2].set_xlabel("layer")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=6)
    sub = result.get("meta", {}).get("command", "")
    if sub:
        fig.suptitle(f"{result['meta'].get('model', '')} · {sub}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _atomic_json(obj: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)


def write_reports(result: dict, json_path: str, plot: bool = True) -> None:
    """accuracy.json plus the .md table (and the .png plot, unless plot=False) beside it."""
    result["summary"] = summarize(result["records"])
    _atomic_json(result, json_path)
    stem = os.path.splitext(json_path)[0]
    write_markdown(result, stem + ".md")
    if plot:
        write_plot(result, stem + ".png")
