"""Deployment artifacts with the fixed context baked in: program.py (torch.export, save/load),
aoti.py (AOTInductor `.pt2` packages), onnx.py (ONNX translation of the sqz ops)."""
from .aoti import has_shared_libstdcxx, package, package_program
from .onnx import export_onnx  # onnx/onnxscript are imported only when it is called
from .program import (LogitsModule, count_sqz_nodes, default_dynamic_shapes, export, export_module,
                      load_exported, max_input_length, read_package_note, save_exported)

__all__ = ["LogitsModule", "count_sqz_nodes", "default_dynamic_shapes", "export", "export_module",
           "export_onnx", "has_shared_libstdcxx", "load_exported", "max_input_length", "package",
           "package_program", "read_package_note", "save_exported"]
