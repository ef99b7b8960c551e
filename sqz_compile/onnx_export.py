"""Deprecated alias of `sqz_compile.export.onnx` (kept for one release)."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("sqz_compile.export.onnx")
