"""sqz_compile: Squeezed Attention (arXiv 2411.09688) as a torch.compile pass."""
from . import ops  # noqa: F401  (registers torch.ops.sqz.*)
from .config import SqueezeConfig
from .context import SqueezedContext

__all__ = ["SqueezeConfig", "SqueezedContext", "ops"]
