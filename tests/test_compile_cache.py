"""Warm start across processes (sqz_compile/compile_cache.py): a second process loading the saved
compile cache compiles nothing with Inductor and gives the same tokens; a cache made by another
setup is refused; a file that is not a cache is never overwritten."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import sqz_compile
from sqz_compile import compile_cache
from sqz_compile.compile_cache import CompileCacheMismatchError, load_compile_cache, save_compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one process of a user: compile with a cache_dir, answer, report Inductor's cache counters
ASK = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch, sqz_compile
    from torch._dynamo.utils import counters
    from fixtures import left_padded, tiny_context, tiny_model
    model = tiny_model("llama", "sdpa", 2, layers=1)
    _, ctx = tiny_context(model, keep=0.3)
    ids, am, _ = left_padded([5, 3])
    sm = sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(cache_dir=sys.argv[1]))
    out = sm.generate(ids, attention_mask=am, max_new_tokens=2, do_sample=False)
    print(json.dumps({{"tokens": out.tolist(), "inductor": dict(counters["inductor"]),
                       "aot": dict(counters["aot_autograd"])}}))
""").format(root=ROOT, tests=os.path.join(ROOT, "tests"))


def ask(cache_dir: str, inductor_dir: str) -> dict:
    """Run ASK in a new interpreter with its own (empty) Inductor cache directory."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_FORCE_DISABLE_CACHES"}
    env.update(TORCHINDUCTOR_CACHE_DIR=inductor_dir, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", ASK, cache_dir], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_cache_and_compiles_nothing(tmp_path):
    cache = str(tmp_path / "cache")
    cold = ask(cache, str(tmp_path / "inductor_a"))
    assert cold["inductor"].get("fxgraph_cache_miss", 0) >= 1 and not cold["inductor"].get("fxgraph_cache_hit")
    files = os.listdir(cache)
    assert files == [compile_cache.cache_file(cache).name]
    size = compile_cache.cache_file(cache).stat().st_size
    # another process with an empty Inductor cache directory: only the saved file can answer
    warm = ask(cache, str(tmp_path / "inductor_b"))
    assert warm["inductor"].get("fxgraph_cache_miss", 0) == 0, warm
    assert warm["inductor"]["fxgraph_cache_hit"] == cold["inductor"]["fxgraph_cache_miss"]
    assert warm["aot"].get("autograd_cache_miss", 0) == 0 and warm["aot"]["autograd_cache_hit"] >= 1
    assert warm["tokens"] == cold["tokens"]
    assert os.listdir(cache) == files
    # the warm process compiled nothing new: the file is not rewritten with a second copy
    assert compile_cache.cache_file(cache).stat().st_size == size
    ask(cache, str(tmp_path / "inductor_c"))
    assert compile_cache.cache_file(cache).stat().st_size == size


def fake_cache(path, **key_changes) -> None:
    """A cache file with this process's key changed by `key_changes` and no artifacts."""
    key = {**compile_cache.cache_key(), **key_changes}
    path.write_bytes(compile_cache.MAGIC + json.dumps({"key": key, "blobs": []}).encode() + b"\n")


def test_a_cache_of_another_setup_is_refused_naming_what_differs(tmp_path):
    path = tmp_path / "old.sqzcache"
    fake_cache(path, kernel_sources="0" * 64, sqz_compile="0.0.1")
    with pytest.raises(CompileCacheMismatchError, match=r"sqz_compile '0.0.1' \(file\).*kernel_sources"):
        load_compile_cache(path)
    with pytest.raises(CompileCacheMismatchError):
        save_compile_cache(path)  # nor replaced by this setup's code under the same name
    assert json.loads(path.read_bytes().splitlines()[1])["key"]["sqz_compile"] == "0.0.1"
    fake_cache(path)
    assert load_compile_cache(path).entries == {}


def test_cache_dir_skips_a_mismatched_file_with_a_warning(tmp_path):
    fake_cache(compile_cache.cache_file(tmp_path), torch="1.0")
    with pytest.warns(UserWarning, match=r"compile cache not used: .*torch '1.0' \(file\)"):
        assert compile_cache.load_once(tmp_path) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compile_cache.load_once(tmp_path) is None  # once per process


def test_the_key_covers_the_kernel_sources(tmp_path, monkeypatch):
    before = compile_cache.cache_tag()
    kernels = tmp_path / "pkg" / "kernels"
    kernels.mkdir(parents=True)
    (tmp_path / "pkg" / "ops.py").write_text("x = 1\n")
    (kernels / "k.py").write_text("y = 1\n")
    monkeypatch.setattr(compile_cache, "_PACKAGE", tmp_path / "pkg")
    compile_cache._sources_hash.cache_clear()
    try:
        first = compile_cache.cache_tag()
        (kernels / "k.py").write_text("y = 2\n")
        compile_cache._sources_hash.cache_clear()
        assert compile_cache.cache_tag() != first != before
    finally:
        compile_cache._sources_hash.cache_clear()


def test_user_files_are_never_overwritten(tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("my data")
    with pytest.raises(ValueError, match="not an sqz_compile compile cache"):
        save_compile_cache(mine)
    with pytest.raises(ValueError, match="not an sqz_compile compile cache"):
        load_compile_cache(mine)
    assert mine.read_text() == "my data"
    with pytest.raises(IsADirectoryError):
        save_compile_cache(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_compile_cache(tmp_path / "missing.sqzcache")


def test_cache_dir_is_validated(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ValueError, match="cache_dir.*not a directory"):
        sqz_compile.CompileConfig(cache_dir=str(f))
    with pytest.raises(ValueError, match="cache_dir"):
        sqz_compile.CompileConfig(cache_dir="")
    assert sqz_compile.CompileConfig(cache_dir="~/x").cache_dir == os.path.expanduser("~/x")
