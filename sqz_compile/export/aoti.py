"""AOTInductor `.pt2` packages of squeezed models (see program.py for the export they start from).

A CPU package holds plain aten code and needs no sqz_compile to run; a CUDA package holds the
compiled sqz Triton kernels.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping

import torch
from torch.export import ExportedProgram

from ..config import CompileConfig, resolve_compile_config
from ..context import SqueezedContext
from .program import export


def _pt2_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ValueError(f"AOTInductor packages must be named *.pt2, got {path!r}")
    return path


def _cpp_compiler(inductor_configs: Mapping[str, Any] | None) -> str | None:
    """The C++ compiler AOTInductor will use: `cpp.cxx` from the configs or Inductor's config
    (which reads $CXX), resolved on PATH; None when it names none that exists."""
    import shutil

    from torch._inductor import config as inductor_config

    cxx = (inductor_configs or {}).get("cpp.cxx", inductor_config.cpp.cxx)
    names = [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if isinstance(c, str)]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def has_shared_libstdcxx(cxx: str) -> bool:
    """Whether `cxx` links C++ code against a shared libstdc++ (it finds libstdc++.so). A g++
    that only finds the static archive embeds a second libstdc++ in the package's .so; loading it
    into a process that already has the shared one crashes (SIGSEGV in std::regex inside
    AOTInductor's device-string parsing, before any model code runs)."""
    import subprocess

    try:
        proc = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError):
        return True  # cannot ask it: nothing to say
    # gcc and clang print the bare name back when the library is not on their search path
    return proc.returncode != 0 or proc.stdout.strip() != "libstdc++.so"


def _check_cpp_compiler(inductor_configs: Mapping[str, Any] | None) -> None:
    cxx = _cpp_compiler(inductor_configs)
    if sys.platform.startswith("linux") and cxx is not None and not has_shared_libstdcxx(cxx):
        raise RuntimeError(
            f"the C++ compiler AOTInductor would use ({cxx}, from $CXX or Inductor's cpp.cxx) finds no "
            f"shared libstdc++.so, so the package would link libstdc++ statically and crash when "
            f"loaded: point $CXX at a g++ that has one (e.g. the system /usr/bin/g++) or pass "
            f"config=CompileConfig(inductor_options={{'cpp.cxx': (None, '/usr/bin/g++')}}) to package "
            f"(inductor_configs= to package_program)")


def package_program(program: ExportedProgram, path: str | os.PathLike,
                    inductor_configs: dict[str, Any] | None = None) -> str:
    """AOTInductor-compile an exported program into a `.pt2` package at `path`.

    Inductor's FX-graph cache does not key on the Python bodies of triton_ops, so it could hand
    back code compiled from another sqz_compile version; it is off for this one-shot build. The
    C++ compiler is checked first (see `has_shared_libstdcxx`).
    """
    from torch._inductor import aoti_compile_and_package
    from torch._inductor import config as inductor_config

    path = _pt2_path(path)
    _check_cpp_compiler(inductor_configs)
    with inductor_config.patch(fx_graph_cache=False):
        return aoti_compile_and_package(program, package_path=path, inductor_configs=inductor_configs)


def package(model: torch.nn.Module, ctx: SqueezedContext, example_inputs: Any, path: str | os.PathLike,
            dynamic_shapes: Any = None, *, config: CompileConfig | None = None, **deprecated: Any) -> str:
    """Write an AOTInductor package (`.pt2`) of `model` with `ctx` baked in; returns its path.

    `config` (CompileConfig): block_q and strict as in `export` (a layer that would stay dense is
    an error unless strict=False); inductor_options are AOTInductor's inductor_configs.
    Load it with `torch._inductor.aoti_load_package(path)` and call it on input_ids. On CPU the
    package runs without sqz_compile; on CUDA it holds the sqz Triton kernels, compiled.
    """
    config = resolve_compile_config(config, deprecated, "sqz_compile.package")
    path = _pt2_path(path)
    return package_program(export(model, ctx, example_inputs, dynamic_shapes, config=config), path,
                           dict(config.inductor_options) or None)


__all__ = ["has_shared_libstdcxx", "package", "package_program"]
