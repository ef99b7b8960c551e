"""Write the family sweep's table (family x sdpa/eager -> exact / refused (why)) into README.md.

    python benchmarks/family_sweep/sweep.py            # every case of tests/family_sweep.py, ~4 min on 2 cores

The cases, the runner and the expected verdicts are the test's (tests/test_family_sweep.py); this
script only runs all of them, slow ones included, and rewrites the table between the markers.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
BEGIN, END = "<!-- sweep table: begin -->", "<!-- sweep table: end -->"


def main() -> None:
    import torch
    import transformers

    import family_sweep as fs

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    for case in fs.CASES:
        for impl in ("sdpa", "eager"):
            rows.append(fs.run_case(case, impl))
            r = rows[-1]
            print(f"{case:26s} {impl:5s} {r['status']:8s} {r['seconds']:5.1f}s {r['detail'][:100]}", flush=True)
    with open(os.path.join(HERE, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    head = (f"transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}, CPU float32; "
            f"{fs.L_CTX}-token context, window {fs.WINDOW}, {fs.N_USER} user tokens, keep = 1; "
            f"exact = max |squeezed - dense| logit <= {fs.ATOL:g}.\n\n")
    path = os.path.join(HERE, "README.md")
    text = open(path).read()
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    with open(path, "w") as f:
        f.write(text[:a] + "\n" + head + fs.markdown_table(rows) + "\n" + text[b:])


if __name__ == "__main__":
    main()
