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
