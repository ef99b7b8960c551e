"""Test-wide setup.

- Inductor's on-disk caches do not key on the Python bodies of triton_ops, so a stale cache can
  serve code compiled from an older op body: every test session gets a fresh cache directory.
- Without CUDA, Triton kernels run under the interpreter (must be set before triton is imported).
- The shared test helpers (tests/kernels/cases.py, tests/squeeze/test_squeeze.py) import by bare
  name from any test file, whichever files are collected (`kernels` alone would find the PyPI
  package of that name).
"""
import os
import sys
import tempfile

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_here, "kernels"), os.path.join(_here, "squeeze")]

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="sqz_inductor_"))
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
