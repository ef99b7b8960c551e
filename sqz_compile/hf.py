"""Deprecated alias of `sqz_compile.squeezed_model` (kept for one release)."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("sqz_compile.squeezed_model")
