"""AOTInductor package (.pt2) of the tiny squeezed Llama on CPU: one build, two lengths, and a fresh
interpreter that runs it without ever importing sqz_compile."""
from __future__ import annotations

import zipfile

import pytest
import torch

from sqz_compile.export.aoti import package

from fixtures import assert_fresh_ok, squeezed_eager, export_context, tiny_llama, user_ids

LENGTHS = [(1, 5), (3, 37)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aoti")
    model = tiny_llama()
    ctx = export_context(model)
    path = package(model, ctx, user_ids(2, 10), str(folder / "tiny.pt2"))
    eager = squeezed_eager(model, ctx)
    inputs = [user_ids(b, m, seed=m) for b, m in LENGTHS]
    with torch.no_grad():
        torch.save({"inputs": inputs, "outputs": [eager(x) for x in inputs]}, folder / "io.pt")
    return path, str(folder / "io.pt")


def test_package_runs_in_fresh_process_without_sqz_compile(built):
    path, io = built
    out = assert_fresh_ok("""
        import sys, torch
        runner = torch._inductor.aoti_load_package(sys.argv[1])
        io = torch.load(sys.argv[2])
        for x, want in zip(io["inputs"], io["outputs"]):
            got = runner(x)
            assert got.shape == want.shape, (got.shape, want.shape)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] == "sqz_compile")
        assert not leaked, leaked
        print("ok", len(io["inputs"]))
    """, path, io)
    assert "ok 2" in out


def test_package_is_a_cpu_aoti_archive(built):
    path, _ = built
    names = zipfile.ZipFile(path).namelist()
    assert any(n.endswith(".so") for n in names), names
    assert any(n.endswith("wrapper.cpp") for n in names), names


def test_package_path_must_end_in_pt2(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"\*\.pt2"):
        package(model, export_context(model), user_ids(2, 4), str(tmp_path / "x.zip"))


def test_package_refuses_a_compiler_without_shared_libstdcxx(tmp_path):
    """A g++ that only finds libstdc++.a would embed a second libstdc++ in the package, which
    crashes at load: refused before compiling, with the fix in the message."""
    fake = tmp_path / "static-only-g++"
    fake.write_text("#!/bin/sh\necho libstdc++.so\n")  # gcc's answer when libstdc++.so is missing
    fake.chmod(0o755)
    from sqz_compile.export.aoti import has_shared_libstdcxx, package_program

    assert not has_shared_libstdcxx(str(fake))
    program = torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(RuntimeError, match="shared libstdc\\+\\+.*cpp.cxx"):
        package_program(program, tmp_path / "m.pt2", inductor_configs={"cpp.cxx": (None, str(fake))})
    assert not (tmp_path / "m.pt2").exists()


def test_low_bit_context_packages_and_matches_the_eager_op(tmp_path):
    """A 4-bit context (packed codes, codebooks, outliers) goes into the .pt2 with the rest: the
    package's logits equal the squeezed model's run eagerly (CPU: the op's float64 dequantization)."""
    from fixtures import tiny_context

    model = tiny_llama()
    _, ctx = tiny_context(model, length=80, keep=0.5, kv_bits=4, kv_outliers=0.07)
    assert ctx.quantized
    runner = torch._inductor.aoti_load_package(package(model, ctx, user_ids(2, 10), str(tmp_path / "low.pt2")))
    x = user_ids(3, 37, seed=37)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), squeezed_eager(model, ctx)(x), rtol=1e-4, atol=1e-4)
