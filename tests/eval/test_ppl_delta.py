"""benchmarks/ppl_delta.py: pooled ΔPPL between two `sqz eval` runs with a paired bootstrap
interval, the dense-over-low-bit-K/V row, and refusals of runs that cannot be paired."""
import json
import math
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(path, nll: dict, bits: int, dense_kv: dict | None = None):
    recs = []
    for seed, (dense, sq) in nll.items():
        d = {"task": "ppl", "context": 64, "ppl_seed": seed, "method": "dense", "keep": 1.0, "lookup": None,
             "mode": None, "n": len(dense), "nll_sum": float(sum(dense)), "nll_tokens": list(dense)}
        if dense_kv:
            d["dense_kv_nll_tokens"] = list(dense_kv[seed])
        recs += [d, {"task": "ppl", "context": 64, "ppl_seed": seed, "method": "squeezed", "keep": 0.125,
                     "lookup": "flat", "mode": "threshold", "n": len(sq), "nll_sum": float(sum(sq)),
                     "nll_tokens": list(sq)}]
    path.write_text(json.dumps({"meta": {"settings": {"kv_bits": bits, "kv_datatype": "nuq", "kv_outliers": 0.01}},
                                "records": recs}))


def _delta(tmp_path, *runs):
    out = tmp_path / "d"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ppl_delta.py"), *map(str, runs),
                           "--out", str(out), "--draws", "500"], capture_output=True, text=True, timeout=120)
    return proc, (json.loads((tmp_path / "d.json").read_text())["rows"] if proc.returncode == 0 else None)


def test_pooled_delta_and_interval(tmp_path):
    rng = np.random.default_rng(0)
    base = {s: (rng.uniform(2, 4, 256), rng.uniform(2, 4, 256)) for s in (1, 2)}
    test = {s: (d, sq + 0.01) for s, (d, sq) in base.items()}  # every token 0.01 nats worse
    dense_kv = {s: d + 0.02 for s, (d, _) in base.items()}
    _run(tmp_path / "a.json", base, 16)
    _run(tmp_path / "b.json", test, 4, dense_kv)
    proc, rows = _delta(tmp_path, tmp_path / "a.json", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr
    sq = next(r for r in rows if r["variant"].startswith("squeezed"))
    a = np.concatenate([base[s][1] for s in (1, 2)])
    want = math.exp(a.mean() + 0.01) - math.exp(a.mean())
    assert sq["segments"] == 2 and sq["tokens"] == 512
    assert math.isclose(sq["delta_ppl"], want, rel_tol=1e-9)
    # a constant shift per token: every resample moves by about the same amount
    assert sq["ci95"][0] <= sq["delta_ppl"] <= sq["ci95"][1] and sq["ci95"][0] > 0
    dk = next(r for r in rows if r["variant"].startswith("dense over"))
    d = np.concatenate([base[s][0] for s in (1, 2)])
    assert math.isclose(dk["delta_ppl"], math.exp(d.mean() + 0.02) - math.exp(d.mean()), rel_tol=1e-9)
    assert (tmp_path / "d.md").exists() and (tmp_path / "d.png").stat().st_size > 0


def test_refuses_runs_scored_on_other_tokens(tmp_path):
    rng = np.random.default_rng(1)
    _run(tmp_path / "a.json", {1: (rng.uniform(2, 4, 256), rng.uniform(2, 4, 256))}, 16)
    _run(tmp_path / "b.json", {1: (rng.uniform(2, 4, 128), rng.uniform(2, 4, 128))}, 4)
    proc, _ = _delta(tmp_path, tmp_path / "a.json", tmp_path / "b.json")
    assert proc.returncode != 0 and "scored tokens" in proc.stderr
    _run(tmp_path / "c.json", {2: (rng.uniform(2, 4, 256), rng.uniform(2, 4, 256))}, 4)
    proc, _ = _delta(tmp_path, tmp_path / "a.json", tmp_path / "c.json")
    assert proc.returncode != 0 and "share no PPL segment" in proc.stderr


def _niah_run(path, hits: dict, bits: int, dense_hits: dict):
    recs = []
    for (needle, depth), hit in hits.items():
        base = {"task": "niah", "context": 64, "needle": needle, "depth": depth}
        recs += [{**base, "method": "dense", "keep": 1.0, "lookup": None, "mode": None, "hit": dense_hits[needle, depth]},
                 {**base, "method": "squeezed", "keep": 0.125, "lookup": "flat", "mode": "threshold", "hit": hit}]
    path.write_text(json.dumps({"meta": {"settings": {"kv_bits": bits, "kv_datatype": "nuq", "kv_outliers": 0.01}},
                                "records": recs}))


def test_paired_needles_and_mcnemar(tmp_path):
    """Runs with needle cases only: hits over the shared cases, the discordant ones, the exact
    McNemar p-value; a low-bit run's dense rows pair with the baseline's dense rows."""
    cases = [(n, d) for n in range(3) for d in (0.0, 0.5, 1.0)]
    base = {c: i < 7 for i, c in enumerate(cases)}                      # 7 of 9
    run = {c: (i < 7 and i not in (0, 1, 2)) or i == 8 for i, c in enumerate(cases)}  # loses 3, gains 1
    _niah_run(tmp_path / "a.json", base, 16, dict.fromkeys(cases, True))
    _niah_run(tmp_path / "b.json", run, 4, {c: c != cases[4] for c in cases})
    proc, _ = _delta(tmp_path, tmp_path / "a.json", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr
    needles = json.loads((tmp_path / "d.json").read_text())["needles"]
    sq = next(r for r in needles if r["variant"].startswith("squeezed"))
    assert (sq["cases"], sq["hits_base"], sq["hits"], sq["only_base"], sq["only_run"]) == (9, 7, 5, 3, 1)
    assert math.isclose(sq["mcnemar_p"], 2 * (1 + 4) / 16)  # P(X <= 1), X ~ Bin(4, 1/2), two-sided
    assert sq["only_run_cases"] == [[2, 1.0]]
    dk = next(r for r in needles if r["variant"].startswith("dense over"))
    assert (dk["hits_base"], dk["hits"], dk["only_base"], dk["only_run"], dk["mcnemar_p"]) == (9, 8, 1, 0, 1.0)
    assert "McNemar" in (tmp_path / "d.md").read_text() and (tmp_path / "d.png").stat().st_size > 0
