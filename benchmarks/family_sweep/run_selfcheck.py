"""Run selfcheck.self_check on the sweep's families (capture as squeeze does it) + a broken capture.

    python run_selfcheck.py [families...]      # writes selfcheck.md / selfcheck.json
    python run_selfcheck.py --one FAMILY
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

from sweep import FAMILIES, L_CTX, VOCAB, build

W = 8


def run_one(family: str, attn: str) -> dict:
    import torch
    import sqz_compile
    from sqz_compile import SqueezeConfig
    from sqz_compile.models import capture_context, check_supported
    from selfcheck import CaptureMismatchError, self_check

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rec = {"family": family, "impl": attn}
    try:
        model = build(family, attn)
    except Exception as e:  # noqa: BLE001
        return {**rec, "status": "build-failed", "detail": str(e)[:200]}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (1, L_CTX), generator=g)
    cfg = SqueezeConfig(keep=1.0, cluster_ratio=0.25, observation_window=W)
    # squeeze time (the real thing), best of 3
    t_sq, t_pre = [], []
    try:
        for _ in range(3):
            t = time.perf_counter()
            ctx = sqz_compile.squeeze(model, ids, cfg, progress=False)
            t_sq.append(time.perf_counter() - t)
            t_pre.append(ctx.extra["seconds"]["prefill"])
    except Exception as e:  # noqa: BLE001
        rec["squeeze"] = f"refused: {type(e).__name__}: {str(e)[:150]}"
        t_sq, t_pre = [float("nan")], []
    # the capture itself (bypassing check_supported so that refused families are checked too)
    try:
        cap = capture_context(model, ids, W, 4096)
    except Exception as e:  # noqa: BLE001
        return {**rec, "status": "capture-failed", "detail": f"{type(e).__name__}: {str(e)[:200]}"}
    t_ck = []
    for _ in range(3):
        res = self_check(model, ids, cap, raise_on_fail=False)
        t_ck.append(res.seconds)
    rec.update(status="pass" if res.ok else "FAIL", failing=res.failing, errors=res.errors,
               t_squeeze=min(t_sq), t_check=min(t_ck), ratio=min(t_ck) / min(t_sq),
               t_prefill=min(t_pre) if t_pre else None)
    try:
        self_check(model, ids, cap)
    except CaptureMismatchError as e:
        rec["message"] = str(e)[:240]
    # deliberately broken capture: keys of the last layer scaled by 1.1 (only where the capture is ok)
    if res.ok:
        layers = cap.keys.shape[0]
        bad_layer = layers - 1
        k = cap.keys.clone()
        k[bad_layer] *= 1.1
        broken = type(cap)(k, cap.values, cap.queries, cap.scaling)
        r2 = self_check(model, ids, broken, raise_on_fail=False)
        rec["broken_k1.1_L%d" % bad_layer] = {"failing": r2.failing, "errors": r2.errors}
        v = cap.values.clone()
        v[0, :, : L_CTX // 2] *= 1.01   # 1% on half the values of layer 0
        r3 = self_check(model, ids, type(cap)(cap.keys, v, cap.queries, cap.scaling), raise_on_fail=False)
        rec["broken_v1.01_L0"] = {"failing": r3.failing, "errors": r3.errors}
    return rec


def main(families):
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = []
    for fam in families:
        p = subprocess.run([sys.executable, __file__, "--one", fam], capture_output=True, text=True, timeout=300,
                           env=env, cwd=here)
        rows = [json.loads(l[7:]) for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if not rows:
            rows = [{"family": fam, "impl": "-", "status": "crashed", "detail": p.stderr[-300:]}]
        for r in rows:
            print(json.dumps(r)[:400], flush=True)
        out += rows
        with open(os.path.join(here, "selfcheck.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        for attn in ("sdpa", "eager"):
            print("RESULT " + json.dumps(run_one(sys.argv[2], attn)), flush=True)
    else:
        main(sys.argv[1:] or list(FAMILIES))
