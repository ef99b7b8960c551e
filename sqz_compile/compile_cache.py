"""Warm start across processes: Inductor's compiled code saved to one file and loaded in the next
process, so that it skips Inductor (and on CUDA the Triton compiler) and only traces with Dynamo.

    sqz_compile.save_compile_cache("model.sqzcache")    # after compiling (first generate)
    sqz_compile.load_compile_cache("model.sqzcache")    # next process, before compiling
    sqz_compile.compile(model, ctx, CompileConfig(cache_dir="~/.cache/sqz_compile"))  # both, automatic

The file holds torch.compiler.save_cache_artifacts() (Inductor FX-graph and AOTAutograd entries,
Triton kernels bundled) under a header with `cache_key()`: sqz_compile's version, a hash of the op
and kernel sources, torch's and triton's versions. Inductor's own caches do not key on the Python
bodies of the sqz triton_ops, so a file made by another sqz_compile (or torch, triton) could serve
stale code: loading one is refused (CompileCacheMismatchError) naming what differs. Under
CompileConfig(cache_dir=D) the file is D/compile-<tag>.sqzcache, <tag> a hash of the key: files of
other versions are never read and never deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Union

import torch

PathLike = Union[str, "os.PathLike[str]"]
MAGIC = b"sqz-compile-cache 1\n"
SUFFIX = ".sqzcache"
_PACKAGE = Path(__file__).resolve().parent
_lock = threading.Lock()
# per file: artifact blobs written by earlier processes (kept when this process saves), and the
# files this process loaded through a cache_dir (loaded once)
_earlier: dict[str, list[bytes]] = {}
_loaded_dirs: set[str] = set()
_saved_at: dict[str, int] = {}  # per cache file: fresh compiles counted at its last save (or load)


class CompileCacheMismatchError(ValueError):
    """A compile cache file made by another sqz_compile, torch or triton: its code may be stale."""


@dataclass(frozen=True)
class CompileCacheInfo:
    """What a cache file holds: the path, its key, and the number of entries per kind
    ("inductor", "aot_autograd", ...) summed over its artifact blobs."""

    path: str
    key: dict
    entries: dict


@lru_cache(maxsize=None)
def _sources_hash() -> str:
    """sha256 over the relative paths and bytes of ops.py and kernels/**/*.py (the triton_op bodies
    and the Triton kernels they launch: what Inductor's cache key does not see)."""
    files = [_PACKAGE / "ops.py", *sorted((_PACKAGE / "kernels").rglob("*.py"))]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(_PACKAGE)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def cache_key() -> dict[str, str]:
    """What a compile cache file must match to be loaded in this process."""
    from importlib import metadata

    try:
        version = metadata.version("sqz_compile")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"sqz_compile": version, "kernel_sources": _sources_hash(), "torch": torch.__version__,
            "triton": triton_version}


def cache_tag() -> str:
    """A short hash of `cache_key()`: the file name under a cache_dir."""
    return hashlib.sha256(json.dumps(cache_key(), sort_keys=True).encode()).hexdigest()[:16]


def cache_file(cache_dir: PathLike) -> Path:
    """The file that CompileConfig(cache_dir=...) reads and writes in this process."""
    return Path(cache_dir).expanduser() / f"compile-{cache_tag()}{SUFFIX}"


def _read(path: Path) -> tuple[dict, list[bytes]]:
    """(header, artifact blobs) of a cache file; ValueError if it is not one."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{path} is not an sqz_compile compile cache (written by save_compile_cache)")
        try:
            header = json.loads(f.readline())
            blobs = [f.read(int(n)) for n in header["blobs"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: damaged sqz_compile compile cache header ({e})") from None
    if any(len(b) != int(n) for b, n in zip(blobs, header["blobs"])):
        raise ValueError(f"{path}: truncated sqz_compile compile cache")
    return header, blobs


def _check_key(path: Path, key: dict) -> None:
    want = cache_key()
    diff = {k: (key.get(k), v) for k, v in want.items() if key.get(k) != v}
    if diff:
        said = ", ".join(f"{k} {old!r} (file) vs {new!r} (here)" for k, (old, new) in diff.items())
        raise CompileCacheMismatchError(
            f"{path} was compiled by another setup ({said}): its code may be stale, so it is not loaded. "
            f"Compile again and save to a new file (CompileConfig(cache_dir=...) names files by this key)")


def _entries(infos: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for info in infos:
        for kind, keys in (info.artifacts.items() if info is not None else ()):
            out[kind] = out.get(kind, 0) + len(keys)
    return out


def load_compile_cache(path: PathLike) -> CompileCacheInfo:
    """Load the compiled code saved by `save_compile_cache` into this process's Inductor caches:
    later compiles of the same graphs hit them. Call it before compiling. Raises FileNotFoundError,
    ValueError (not a cache file) or CompileCacheMismatchError (made by another sqz_compile, torch
    or triton: see `cache_key`)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"no compile cache at {p}")
    header, blobs = _read(p)
    _check_key(p, header.get("key", {}))
    with _lock:
        infos = [torch.compiler.load_cache_artifacts(b) for b in blobs]
        _earlier[str(p.resolve())] = blobs
    return CompileCacheInfo(str(p), header["key"], _entries(infos))


def save_compile_cache(path: PathLike) -> CompileCacheInfo | None:
    """Write the code Inductor compiled in this process (plus what was loaded from `path` before) to
    `path`, atomically; None when there is nothing to save. Refuses to replace a file that is not a
    compile cache, and a cache of another key (CompileCacheMismatchError)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise IsADirectoryError(f"{p} is a directory: give a file name, e.g. {p / ('model' + SUFFIX)}")
    with _lock:
        earlier = _earlier.get(str(p.resolve()))
        if earlier is None and p.exists():
            header, earlier = _read(p)  # not ours: ValueError, nothing is overwritten
            _check_key(p, header.get("key", {}))
            _earlier[str(p.resolve())] = earlier
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return None
        blobs = [*(earlier or []), saved[0]]
        header = {"key": cache_key(), "blobs": [len(b) for b in blobs]}
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + json.dumps(header).encode() + b"\n" + b"".join(blobs))
            os.replace(tmp, p)
        except BaseException:
            os.unlink(tmp)
            raise
    return CompileCacheInfo(str(p), header["key"], _entries([saved[1]]))


def load_once(cache_dir: PathLike) -> CompileCacheInfo | None:
    """CompileConfig(cache_dir=...) before compiling: load this key's file once per process. A file
    that cannot be loaded is skipped with a warning (the model compiles from scratch)."""
    p = cache_file(cache_dir)
    with _lock:
        if str(p) in _loaded_dirs:
            return None
        _loaded_dirs.add(str(p))
        _saved_at[str(p)] = _misses()  # nothing to save until this process compiles a graph itself
    if not p.is_file():
        return None
    try:
        return load_compile_cache(p)
    except (ValueError, OSError) as e:
        warnings.warn(f"sqz: compile cache not used: {e}", stacklevel=3)
        return None


def _misses() -> int:
    """Graphs this process compiled fresh so far (Inductor FX-graph and AOTAutograd cache misses)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"]) + int(counters["aot_autograd"]["autograd_cache_miss"])


def save_to(cache_dir: PathLike) -> None:
    """CompileConfig(cache_dir=...) after compiling a graph: save this key's file when the process
    compiled something fresh since the last save (torch records again what a compile took from the
    cache: saving after a hit would append a second copy of it). A failure to write is a warning,
    not an error (the compiled model works)."""
    p = cache_file(cache_dir)
    with _lock:
        misses = _misses()
        if _saved_at.get(str(p)) == misses:
            return
        _saved_at[str(p)] = misses
    try:
        save_compile_cache(p)
    except (ValueError, OSError) as e:
        warnings.warn(f"sqz: compile cache not saved: {e}", stacklevel=3)


__all__ = ["CompileCacheInfo", "CompileCacheMismatchError", "cache_file", "cache_key", "cache_tag",
           "load_compile_cache", "save_compile_cache"]
