"""sqz_compile: Squeezed Attention (arXiv 2411.09688) as a torch.compile pass."""
from . import ops  # noqa: F401  (registers torch.ops.sqz.*)
from .config import SqueezeConfig
from .context import SqueezedContext
from .exporting import export, load_exported, package, save_exported
from .onnx_export import export_onnx  # onnx/onnxscript are imported only when it is called

__all__ = ["SqueezeConfig", "SqueezedContext", "ops", "export", "export_onnx", "load_exported", "package",
           "save_exported"]
