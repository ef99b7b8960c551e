"""AOTInductor package of the tiny squeezed Llama on CUDA: the sqz Triton kernels are compiled into
the .pt2, and a fresh interpreter (without sqz_compile) reproduces the eager squeezed model."""
from __future__ import annotations

import os
import shutil
import zipfile

import pytest
import torch

pytestmark = pytest.mark.gpu

LENGTHS = [(1, 5), (3, 37)]


def _launched_kernel_names(module) -> set[str]:
    """Names of the Triton kernels a kernels module launches (its @triton.jit *_kernel functions)."""
    names = set()
    for obj in vars(module).values():
        if not type(obj).__module__.startswith("triton"):
            continue
        fn = obj
        while hasattr(fn, "fn"):  # autotuner -> JITFunction -> the Python function
            fn = fn.fn
        name = getattr(fn, "__name__", "")
        if name.endswith("_kernel"):
            names.add(name)
    return names


def _compiler_with_shared_libstdcxx() -> str | None:
    """$CXX if it links libstdc++ dynamically, else g++ on PATH or the system one (the device
    image's $CXX is a relocated g++ that only finds libstdc++.a)."""
    from sqz_compile.export.aoti import has_shared_libstdcxx

    for name in (os.environ.get("CXX"), "g++", "/usr/bin/g++"):
        found = shutil.which(name) if name else None
        if found and has_shared_libstdcxx(found):
            return found
    return None


def test_cuda_package_holds_sqz_triton_kernels_and_matches_eager(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from fixtures import assert_fresh_ok, squeezed_eager, export_context, tiny_llama, user_ids

    from sqz_compile import CompileConfig
    from sqz_compile.export.aoti import package
    from sqz_compile.kernels.attention import triton as attention_triton
    from sqz_compile.kernels.lookup import triton as lookup_triton

    cxx = _compiler_with_shared_libstdcxx()
    if cxx is None:
        pytest.skip("no C++ compiler with a shared libstdc++ (see export.aoti.has_shared_libstdcxx)")
    model = tiny_llama().cuda()
    ctx = export_context(model)
    assert ctx.keys.is_cuda
    path = package(model, ctx, user_ids(2, 10).cuda(), str(tmp_path / "tiny_cuda.pt2"),
                   config=CompileConfig(inductor_options={"cpp.cxx": (None, cxx)}))

    # Kernel names survive in the generated wrapper and in the compiled binaries' symbol tables.
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        blobs = b"".join(z.read(n) for n in names)
    assert any(n.endswith((".cubin", ".fatbin", ".ptx")) for n in names), names
    attn, lk = _launched_kernel_names(attention_triton), _launched_kernel_names(lookup_triton)
    assert attn and lk, (attn, lk)
    found = {n for n in attn | lk if n.lstrip("_").encode() in blobs}
    assert found & attn, f"no sqz attention kernel ({sorted(attn)}) in {path}"
    assert found & lk, f"no sqz lookup kernel ({sorted(lk)}) in {path}"

    eager = squeezed_eager(model, ctx)
    eager_cpu = squeezed_eager(tiny_llama(), ctx.to("cpu"))  # the op's plain-torch reference
    inputs = [user_ids(b, m, seed=m) for b, m in LENGTHS]
    with torch.no_grad():
        outs = [eager(x.cuda()).cpu() for x in inputs]
        for x, o in zip(inputs, outs):
            torch.testing.assert_close(o, eager_cpu(x), rtol=2e-3, atol=2e-3)
    torch.save({"inputs": inputs, "outputs": outs}, tmp_path / "io.pt")
    out = assert_fresh_ok("""
        import sys, torch
        runner = torch._inductor.aoti_load_package(sys.argv[1])
        io = torch.load(sys.argv[2])
        for x, want in zip(io["inputs"], io["outputs"]):
            torch.testing.assert_close(runner(x.cuda()).cpu(), want, rtol=2e-3, atol=2e-3)
        assert not [m for m in sys.modules if m.split(".")[0] == "sqz_compile"]
        print("ok")
    """, path, str(tmp_path / "io.pt"))
    assert "ok" in out
