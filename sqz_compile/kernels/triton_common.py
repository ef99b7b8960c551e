"""Shared Triton plumbing for the kernel families: the optional triton import, the launch helper
(wrap_triton when traced, a direct call under TRITON_INTERPRET=1), device checks and the small
integer helpers the launchers' heuristics use."""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

try:
    import triton  # noqa: F401  (availability only)

    HAS_TRITON = True
except ImportError:  # CPU-only installs without triton still import sqz_compile
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    if interpreting():
        kernel[grid](*args, **kwargs)
    else:
        from torch.library import wrap_triton

        wrap_triton(kernel)[grid](*args, **kwargs)


@functools.lru_cache(maxsize=None)
def num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 4  # interpreter: a few splits so the split/merge code paths run in CI
    return num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def symbolic(x) -> bool:
    return isinstance(x, torch.SymInt)


def hint(x) -> int:
    """A concrete value for tuning heuristics. Under dynamic shapes (export, automatic dynamic)
    sizes are symbolic: comparing them would add guards that break the dynamic range, so the
    heuristics read the example value instead. Correctness never depends on it: the kernels mask
    rows and keys by the real sizes passed at launch."""
    if symbolic(x):
        hint = getattr(x.node, "hint", None)
        return int(hint) if hint is not None else 1
    return int(x)


def lastdim(t: torch.Tensor) -> torch.Tensor:
    """`t` with a unit last stride (the kernels address rows by their other strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_device(*ts: Optional[torch.Tensor]) -> None:
    dev = next(t.device for t in ts if t is not None)
    for t in ts:
        if t is not None and t.device != dev:
            raise ValueError(f"sqz: all tensors must be on one device, got {t.device} and {dev}: move "
                             f"the SqueezedContext to the model's device (ctx.to(device))")
    if dev.type != "cuda" and not interpreting():
        raise ValueError(f"sqz Triton kernels need CUDA tensors (got {dev}); on CPU use the op "
                         f"(torch.ops.sqz.*), whose CPU branch runs the reference")
