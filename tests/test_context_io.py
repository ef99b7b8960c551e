"""SqueezedContext.save / load / validate."""
import json
import os

import pytest
import torch

from sqz_compile.config import SqueezeConfig
from sqz_compile.context import SqueezedContext, SqueezedContextError
from sqz_compile.squeeze import squeeze, squeeze_kv

from test_squeeze import synthetic_kv, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", 2)


@pytest.fixture(scope="module")
def ctx(model):
    ids = torch.randint(0, 96, (1, 260), generator=torch.Generator().manual_seed(0))
    return squeeze(model, ids, SqueezeConfig(hierarchical=True, keep=0.2))


def same(a: SqueezedContext, b: SqueezedContext) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return (ta.keys() == tb.keys() and all(ta[n].dtype == tb[n].dtype and torch.equal(ta[n], tb[n]) for n in ta)
            and a.config == b.config and a.fingerprint == b.fingerprint and a.token_hash == b.token_hash
            and a.context_length == b.context_length)


@pytest.mark.parametrize("dtype,hier", [(torch.float32, True), (torch.bfloat16, False), (torch.float16, True)])
def test_round_trip_bit_exact(tmp_path, dtype, hier):
    keys, values, q, s = synthetic_kv(dtype=dtype)
    c = squeeze_kv(keys, values, q, s, SqueezeConfig(hierarchical=hier, per_layer_threshold=True))
    p = tmp_path / "c.sqz.safetensors"
    c.save(p)
    back = SqueezedContext.load(p)
    assert same(c, back) and back.extra["scaling"] == s
    assert [f for f in os.listdir(tmp_path)] == ["c.sqz.safetensors"]  # no temp files left


def test_round_trip_with_model(tmp_path, model, ctx):
    p = tmp_path / "ctx.safetensors"
    ctx.save(p)
    back = SqueezedContext.load(p, model=model)
    assert same(ctx, back) and back.keys.device == next(model.parameters()).device
    assert torch.equal(back.with_keep(0.2).log_threshold, ctx.log_threshold)


def test_rejects_other_model(tmp_path, ctx):
    p = tmp_path / "ctx.safetensors"
    ctx.save(p)
    with pytest.raises(SqueezedContextError, match=r"num_hidden_layers: file has 2, model has 3.*Re-run"):
        SqueezedContext.load(p, model=tiny_model("llama", 2, layers=3))
    other = tiny_model("llama", 2)
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(1.5)  # same architecture, different weights
    with pytest.raises(SqueezedContextError, match="weights_digest"):
        SqueezedContext.load(p, model=other)
    with pytest.raises(SqueezedContextError, match="dtype"):
        SqueezedContext.load(p, model=tiny_model("llama", 2).to(torch.bfloat16))


def test_rejects_truncated_and_garbage(tmp_path, ctx):
    p = tmp_path / "ctx.safetensors"
    ctx.save(p)
    data = p.read_bytes()
    (tmp_path / "trunc").write_bytes(data[: len(data) // 2])
    with pytest.raises(SqueezedContextError, match="truncated or corrupted"):
        SqueezedContext.load(tmp_path / "trunc")
    (tmp_path / "junk").write_bytes(b"\x00" * 64)
    with pytest.raises(SqueezedContextError, match="corrupted"):
        SqueezedContext.load(tmp_path / "junk")


def test_rejects_flipped_tensor_bytes(tmp_path, ctx):
    p = tmp_path / "ctx.safetensors"
    ctx.save(p)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF  # last tensor's payload
    p.write_bytes(bytes(data))
    with pytest.raises(SqueezedContextError, match="sha256"):
        SqueezedContext.load(p)


def test_checksums_are_chunked_and_always_verified(tmp_path, ctx, monkeypatch):
    """Every tensor is checksummed whatever its size (no more skipping above 2 GiB): a tiny chunk
    size runs the many-chunk path of a large tensor; the digest is the one-piece sha256, and a
    flipped byte in a late chunk of the largest tensor is still caught at load."""
    import hashlib

    from sqz_compile import context as context_module

    monkeypatch.setattr(context_module, "_HASH_CHUNK", 7)  # bytes: thousands of chunks per tensor
    t = torch.arange(1000, dtype=torch.float32).reshape(10, 100)[:, ::3]  # non-contiguous too
    whole = hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    assert context_module._digest(t) == whole
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"t": t.contiguous()}, tmp_path / "t.safetensors")
    with safe_open(tmp_path / "t.safetensors", "pt") as f:  # what a tensor-parallel rank streams
        assert context_module._digest_in_file(f, "t") == whole
    p = tmp_path / "ctx.safetensors"
    ctx.save(p)
    assert same(ctx, SqueezedContext.load(p))
    big = max(ctx.tensors(), key=lambda n: ctx.tensors()[n].numel())

    def flip(tensors):  # the sha256 recorded is the old one: corruption after saving
        flat = tensors[big].view(-1).view(torch.uint8)
        flat[-5] ^= 0xFF

    _rewrite(p, edit_tensors=flip, keep_sums=True)
    with pytest.raises(SqueezedContextError, match=f"tensor '{big}' fails its sha256 check"):
        SqueezedContext.load(p)


def _rewrite(path, edit_tensors=None, edit_meta=None, keep_sums=False):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["sqz_meta"])
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    from sqz_compile.context import _digest
    if not keep_sums:
        meta["sha256"] = {n: _digest(t) for n, t in tensors.items()}
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, path, metadata={"sqz_meta": json.dumps(meta)})


@pytest.mark.parametrize("what,match", [
    ("offsets", "offsets must be non-decreasing"),
    ("perm", "perm and window_positions together are not a permutation"),
    ("centroids_dtype", "centroids has dtype"),
    ("values_shape", "values has shape"),
    ("version", "format version 99"),
    ("no_meta", "no sqz_compile metadata"),
])
def test_rejects_inconsistent_files(tmp_path, ctx, what, match):
    p = tmp_path / "ctx.safetensors"
    ctx.save(p)

    def tensors(t):
        if what == "offsets":
            t["offsets"][0, 0, 1] = t["offsets"][0, 0, 2].item() + 1
        elif what == "perm":
            t["perm"][0, 0, 0] = t["perm"][0, 0, 1]
        elif what == "centroids_dtype":
            t["centroids"] = t["centroids"].half()
        elif what == "values_shape":
            t["values"] = t["values"][:, :, 1:].contiguous()

    def meta(m):
        if what == "version":
            m["format_version"] = 99

    if what == "no_meta":
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(2)}, p)
    else:
        _rewrite(p, tensors, meta)
    with pytest.raises(SqueezedContextError, match=match):
        SqueezedContext.load(p)


def test_save_is_atomic(tmp_path, ctx, monkeypatch):
    p = tmp_path / "ctx.safetensors"
    ctx.save(p)
    before = p.read_bytes()
    import safetensors.torch

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ctx.with_keep(0.5).save(p)
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["ctx.safetensors"]


def test_validate_catches_in_memory_mistakes(ctx):
    import dataclasses

    with pytest.raises(SqueezedContextError, match="coarse"):
        dataclasses.replace(ctx, coarse_offsets=None).validate()
    with pytest.raises(SqueezedContextError, match="context_length"):
        dataclasses.replace(ctx, context_length=ctx.context_length + 1).validate()


def test_compile_again_with_an_equal_context(tmp_path, model, ctx):
    """A context and the same one loaded back compile one after the other on one model: torch.compile
    compares backend options, and SqueezedContext compares by identity, not tensor by tensor."""
    import sqz_compile

    ctx.save(tmp_path / "c.sqz")
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    logits = [sqz_compile.compile(model, c, sqz_compile.CompileConfig(inductor=False))(ids).logits
              for c in (ctx, SqueezedContext.load(tmp_path / "c.sqz"))]
    torch.testing.assert_close(logits[0], logits[1])
