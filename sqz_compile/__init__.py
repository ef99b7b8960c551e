"""sqz_compile: Squeezed Attention (arXiv 2411.09688) as a torch.compile pass.

One verb per job: `squeeze` (offline, per fixed context; SqueezeConfig) -> `compile` (model +
context -> SqueezedModel, backend "sqz") -> `export` / `export_onnx` / `package` (artifacts with the
context baked in); the last four take one CompileConfig.

The names below load on first use, so that `sqz --help` does not wait for torch. Importing
sqz_compile registers torch.ops.sqz when torch is already imported (as in `import torch,
sqz_compile`); otherwise the first use of any name here (or `import sqz_compile.ops`) does.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# public name -> the module defining it. `squeeze` and `export` are both subpackages and public
# verbs: the functions shadow the subpackage attributes (`import sqz_compile.squeeze.capture` and
# `from sqz_compile.export.aoti import ...` still work through sys.modules).
_EXPORTS = {
    "ops": ".ops",
    "SqueezeConfig": ".config",
    "CompileConfig": ".config",
    "SqueezedContext": ".context",
    "SqueezedModel": ".squeezed_model",
    "compile": ".squeezed_model",
    "export": ".export",
    "export_onnx": ".export",
    "load_exported": ".export",
    "package": ".export",
    "save_exported": ".export",
    "squeeze": ".squeeze",
    "save_compile_cache": ".compile_cache",
    "load_compile_cache": ".compile_cache",
    "CompileCacheMismatchError": ".compile_cache",
}

__all__ = ["SqueezeConfig", "CompileConfig", "SqueezedContext", "SqueezedModel", "squeeze", "compile", "export",
           "export_onnx", "load_exported", "package", "save_exported", "ops", "save_compile_cache", "load_compile_cache",
           "CompileCacheMismatchError"]

if TYPE_CHECKING:
    from . import ops
    from .compile_cache import CompileCacheMismatchError, load_compile_cache, save_compile_cache
    from .config import CompileConfig, SqueezeConfig
    from .context import SqueezedContext
    from .export import export, export_onnx, load_exported, package, save_exported
    from .squeeze import squeeze
    from .squeezed_model import SqueezedModel, compile


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(".ops", __name__)  # every public name needs the ops registered
    module = importlib.import_module(_EXPORTS[name], __name__)
    value = module if name == "ops" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps the verbs `squeeze` and `export` bound when their subpackages are imported (the
    import system binds a loaded subpackage on its parent)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in ("squeeze", "export") and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if "torch" in sys.modules:
    from . import ops  # noqa: E402,F401  (registers torch.ops.sqz)
