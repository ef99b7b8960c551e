"""benchmarks/bench_attention.py --tiny on CPU (Triton interpreter): the batch rows (many users,
one context) run, their dense shared-prefix peer equals float64 attention, and the squeezed step
over the batch equals each row run alone (decode: by the union read, also timed on the per-row
read)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_batch_rows(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_attention.py"), "--tiny",
                           "--only", "batch", "--batches", "3", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "bench_attention.json") as f:
        rows = json.load(f)["results"]
    assert sorted(r["kind"] for r in rows) == ["batch_decode", "batch_prefill"]
    for r in rows:
        assert r["batch"] == 3
        # the LSE-merged peer: timed only after it matched float64 dense attention
        assert r["shared_prefix_rel_err_vs_f64"] < 1e-2 and r["shared_prefix_ms"] > 0, r
        assert r["sdpa_per_row_ms"] > 0 and r["best_dense_ms"] == min(r["sdpa_per_row_ms"], r["shared_prefix_ms"])
        # each row selects and attends as it would alone
        assert r["selection_match_fraction"] == 1.0, r
        assert r["sqz_batch_vs_per_row_rel_diff"] < 1e-3, r
        assert 0 < r["kept_fraction"] <= r["row_kept_fraction"] <= r["union_kept_fraction"] <= 1
        assert r["shared_prefix_bytes"] < r["sdpa_per_row_bytes"]
    decode = next(r for r in rows if r["kind"] == "batch_decode")
    assert decode["rel_err_vs_f64"] < 1e-2 and decode["sdpa_per_row_rel_err_vs_f64"] < 1e-2
    # decode takes the union read, timed beside the per-row read; the two agree
    assert decode["sqz_path"] == "union_read" and decode["sqz_per_row_read_ms"] > 0, decode
    assert decode["sqz_union_vs_per_row_read_rel_diff"] < 1e-3, decode
    assert decode["union_lookup_match_fraction"] == 1.0 and decode["sqz_union_lookup_ms"] > 0, decode
    prefill = next(r for r in rows if r["kind"] == "batch_prefill")
    assert prefill["sqz_path"] == "per_row_read" and "sqz_per_row_read_ms" not in prefill
    assert (tmp_path / "bench_attention_batch.png").stat().st_size > 0


def test_tiny_lowbit_sweep_rows(tmp_path):
    """--only lowbit_sweep: the low-bit decode kernel under every launch config of LOWBIT_SWEEP,
    each output equal to the launcher's default config's."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_attention.py"), "--tiny",
                           "--only", "lowbit_sweep", "--kv-bits", "4", "--contexts", "600", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "bench_attention.json") as f:
        rows = json.load(f)["results"]
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_attention import LOWBIT_SWEEP

    assert [(r["block_n"], r["warps"], r["stages"]) for r in rows] == [c[:3] for c in LOWBIT_SWEEP]
    assert [r["split"] for r in rows] == [max(1, round(rows[0]["split"] * c[3])) for c in LOWBIT_SWEEP]
    assert [r["maxnreg"] for r in rows] == [c[4] for c in LOWBIT_SWEEP]
    for r in rows:
        assert r["kind"] == "lowbit_sweep" and r["kv_bits"] == 4 and "error" not in r, r
        assert r["rel_diff_vs_default"] < 1e-2 and r["attn_ms"] > 0, r
