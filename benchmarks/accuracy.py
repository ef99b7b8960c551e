"""Accuracy benchmark: needle retrieval, perplexity and agreement of squeezed vs dense attention
on SmolLM2-135M-Instruct over Paul Graham essays (a thin wrapper over `sqz_compile.eval`,
the same as `sqz eval`).

    python benchmarks/accuracy.py --contexts 2048 4096 --keeps 0.25 0.125   # CPU subset
    python benchmarks/accuracy.py --contexts 1024 2048 4096 6144 \\
        --keeps 0.5 0.25 0.125 0.0625 --device cuda --oracle all            # full grid

Writes benchmarks/results/accuracy.{json,md,png} (JSON rewritten after every record, so a partial
run leaves valid results). `--report-only` redraws the table and plot from the JSON.
"""
import os
import sys

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

from sqz_compile.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
