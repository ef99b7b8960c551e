"""sqz_compile: Squeezed Attention (arXiv 2411.09688) as a torch.compile pass.

One verb per job: `squeeze` (offline, per fixed context) -> `compile` (model + context ->
SqueezedModel, backend "sqz") -> `export` / `export_onnx` / `package` (artifacts with the context
baked in).
"""
from . import ops  # noqa: F401  (registers torch.ops.sqz.*)
from .config import SqueezeConfig
from .context import SqueezedContext
from .squeezed_model import SqueezedModel, compile
# `squeeze` and `export` are both subpackages and public verbs: the functions, bound last, shadow
# the subpackage attributes (`import sqz_compile.squeeze.capture` and `from sqz_compile.export.aoti
# import ...` still work through sys.modules).
from .export import export, export_onnx, load_exported, package, save_exported
from .squeeze import squeeze

__all__ = ["SqueezeConfig", "SqueezedContext", "SqueezedModel", "squeeze", "compile", "export",
           "export_onnx", "load_exported", "package", "save_exported", "ops"]
