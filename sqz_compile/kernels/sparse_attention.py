"""Deprecated alias of `sqz_compile.kernels.attention.triton` (kept for one release)."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("sqz_compile.kernels.attention.triton")
