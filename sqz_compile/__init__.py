"""sqz_compile: Squeezed Attention (arXiv 2411.09688) as a torch.compile pass.

One verb per job: `squeeze` (offline, per fixed context) -> `compile` (model + context ->
SqueezedModel, backend "sqz") -> `export` / `export_onnx` / `package` (artifacts with the context
baked in).
"""
from . import ops  # noqa: F401  (registers torch.ops.sqz.*)
from .config import SqueezeConfig
from .context import SqueezedContext
from .exporting import export, load_exported, package, save_exported
from .squeezed_model import SqueezedModel, compile
from .onnx_export import export_onnx  # onnx/onnxscript are imported only when it is called
from .squeeze import squeeze

__all__ = ["SqueezeConfig", "SqueezedContext", "SqueezedModel", "squeeze", "compile", "export",
           "export_onnx", "load_exported", "package", "save_exported", "ops"]
