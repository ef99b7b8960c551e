"""Low-bit contexts (squeeze/quantize.py): packing, per-datatype error bounds, outliers, RoPE
inversion checked against the model, squeeze of a tiny model, file round-trip and refusals."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sqz_compile.config import SqueezeConfig
from sqz_compile.context import SqueezedContext, SqueezedContextError
from sqz_compile.kernels.quant.reference import dequantize_rows, packed_words, planes, unpack
from sqz_compile.squeeze.quantize import (RopeTable, apply_rope, context_bytes, invert_rope, key_sensitivity, pack,
                                          query_moments, quantize_rows, rope_from_model, size_table)


def _heavy(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x * torch.rand(*shape, generator=g).pow(4) * 3 + x  # heavier tails than a Gaussian


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("d", [7, 33, 64, 80, 96, 128])
def test_pack_roundtrip(bits, d):
    codes = torch.randint(0, 1 << bits, (3, 5, d))
    words = pack(codes, bits)
    # 3 bits: a plane of the low two bits (16 codes per word), then one of the high bit (32)
    want = -(-d // 16) + -(-d // 32) if bits == 3 else -(-d // (32 // bits))
    assert words.dtype == torch.int32 and words.shape[-1] == want == packed_words(d, bits)
    assert torch.equal(unpack(words, bits, d), codes)
    if d % 32 == 0:  # no padding: exactly `bits` bits per value
        assert words.shape[-1] * 32 == d * bits


def test_pack_3_bit_planes():
    """The 3-bit layout bit by bit: code c's low two bits at bits 2 (c % 16) of word c // 16,
    its high bit at bit c % 32 of word ceil(D / 16) + c // 32; each rotate_half half of a 64- or
    128-channel row is whole words of each plane (the kernels' HALVES path)."""
    d = 80
    codes = torch.zeros(d, dtype=torch.int64)
    codes[17], codes[40], codes[79] = 0b101, 0b010, 0b111
    w = pack(codes, 3).to(torch.int64) & 0xFFFFFFFF
    lo, hi = [0] * 5, [0] * 3
    lo[1] |= 0b01 << 2
    hi[0] |= 1 << 17
    lo[2] |= 0b10 << 16
    lo[4] |= 0b11 << 30
    hi[2] |= 1 << 15
    assert w.tolist() == lo + hi
    assert planes(128, 3) == [(2, 0, 8), (1, 2, 4)] and planes(64, 3) == [(2, 0, 4), (1, 2, 2)]


def _bound(codebook):
    """Largest distance from a point of [-1, 1] to its nearest level."""
    cb = codebook.double()
    gaps = (cb[1:] - cb[:-1]) / 2
    return max(float(cb[0] + 1), float(1 - cb[-1]), float(gaps.max()))


@pytest.mark.parametrize("datatype", ["nuq", "int"])
@pytest.mark.parametrize("bits,d", [(4, 64), (3, 64), (3, 80), (2, 64)])
@pytest.mark.parametrize("per_channel", [True, False], ids=["keys", "values"])
def test_quantize_dequantize_within_bound(datatype, bits, d, per_channel):
    """Every entry is within scale * (half the widest gap of the codebook) of its value (plus
    float16 rounding of the per-token scales); outliers come back to float16 precision."""
    x = _heavy((2, 3, 41, d))
    w = torch.rand(2, 3, 41)
    q = quantize_rows(x, w, bits, datatype, 0.03, per_channel)
    y = dequantize_rows((q.packed, q.codebook, q.norm, q.outlier_idx, q.outlier_val), bits, d, per_channel)
    err = (y - x.double()).abs()
    for i in range(2):
        scale = q.norm[i].double()[..., 0:1, :] if per_channel else q.norm[i].double()[..., 0:1]
        limit = scale * _bound(q.codebook[i]) * (1 + 1e-3) + 1e-3 * x[i].abs().double() + 1e-6
        is_out = torch.zeros_like(x[i], dtype=torch.bool).scatter_(-1, q.outlier_idx[i].long(), True)
        assert bool((err[i] <= limit)[~is_out].all())
        assert bool((err[i][is_out] <= 1e-3 * x[i][is_out].abs().double() + 1e-6).all())
    assert q.outlier_idx.shape[-1] == 2  # round(0.03 * 64), round(0.03 * 80)
    if datatype == "int":
        assert torch.allclose(q.codebook[0], torch.linspace(-1, 1, 1 << bits))


@pytest.mark.parametrize("per_channel", [True, False], ids=["keys", "values"])
def test_constant_rows_and_channels_dequantize_to_themselves(per_channel):
    """A constant value row (or key channel) has zero range: it must come back as its value, and
    not turn the layer's fitted codebook into NaN (a scale rounded to 0 in float16)."""
    x = _heavy((1, 2, 33, 16))
    if per_channel:
        x[..., 5] = 0.37
    else:
        x[:, :, 7] = -1.25
    q = quantize_rows(x, torch.rand(1, 2, 33), 4, "nuq", 0.0, per_channel)
    assert bool(torch.isfinite(q.codebook).all())
    y = dequantize_rows((q.packed, q.codebook, q.norm, q.outlier_idx, q.outlier_val), 4, 16, per_channel)
    assert bool(torch.isfinite(y).all())
    const = y[..., 5] if per_channel else y[:, :, 7]
    torch.testing.assert_close(const, x[..., 5].double() if per_channel else x[:, :, 7].double(),
                               rtol=1e-3, atol=1e-3)


def test_config_refuses_fractional_bits_and_bounded_low_bit():
    with pytest.raises(ValueError, match="kv_bits"):
        SqueezeConfig(kv_bits=4.7)
    with pytest.raises(ValueError, match="max_dropped_mass.*kv_bits=16"):
        SqueezeConfig(kv_bits=4, max_dropped_mass=0.05)


@pytest.mark.parametrize("bits", [3, 2])
def test_nuq_lowers_weighted_error_against_int(bits):
    """The nuq codebook is Lloyd's iteration from the uniform grid on the same weighted entries:
    its weighted squared error cannot exceed the uniform grid's."""
    x = _heavy((1, 2, 300, 32), seed=3)
    w = torch.rand(1, 2, 300) ** 3
    errs = {}
    for dt in ("nuq", "int"):
        q = quantize_rows(x, w, bits, dt, 0.0, True)
        y = dequantize_rows((q.packed, q.codebook, q.norm, None, None), bits, 32, True)
        errs[dt] = float(((y - x.double()) ** 2 * w[..., None].double()).sum())
    assert errs["nuq"] < errs["int"]


@pytest.mark.parametrize("datatype", ["nuq", "int"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["keys", "values"])
def test_qnorm_matches_mean_and_spread_and_keeps_the_codes(datatype, per_channel):
    """Q-Norm: per layer, the dequantized (normalised) entries get the data's mean and standard
    deviation; the codes are those without it, and the codebook stays ascending."""
    x = _heavy((2, 3, 57, 32), seed=5)
    w = torch.rand(2, 3, 57)
    plain = quantize_rows(x, w, 2, datatype, 0.0, per_channel)
    q = quantize_rows(x, w, 2, datatype, 0.0, per_channel, qnorm=True)
    assert torch.equal(q.packed, plain.packed) and torch.equal(q.norm, plain.norm)
    assert bool((q.codebook[:, 1:] > q.codebook[:, :-1]).all())
    y = dequantize_rows((q.packed, q.codebook, q.norm, None, None), 2, 32, per_channel)
    y0 = dequantize_rows((plain.packed, plain.codebook, plain.norm, None, None), 2, 32, per_channel)
    for i in range(2):
        scale = q.norm[i].double()[..., 0:1, :] if per_channel else q.norm[i].double()[..., 0:1]
        offset = q.norm[i].double()[..., 1:2, :] if per_channel else q.norm[i].double()[..., 1:2]
        z, zq, z0 = ((t[i].double() - offset) / scale for t in (x.clamp(-1e9, 1e9), y, y0))
        z = z.clamp(-1, 1)  # quantize_rows normalises into [-1, 1]
        assert abs(float(zq.mean() - z.mean())) < 1e-6 and abs(float(zq.std() - z.std())) < 1e-6  # float32 levels
        assert abs(float(z0.std() - z.std())) > 1e-4  # without it the spread differs


def test_qnorm_context_roundtrip_and_levels_past_one(tmp_path):
    """A Q-Norm context saves and loads; its codebooks may pass +-1 (Q-Norm can widen them), which
    the file check allows only with config.kv_qnorm."""
    from fixtures import tiny_context, tiny_model
    from test_context_io import _rewrite

    model = tiny_model()
    _, ctx = tiny_context(model, length=80, keep=0.5, kv_bits=2, kv_qnorm=True)
    p = tmp_path / "qnorm.safetensors"
    ctx.save(p)
    back = SqueezedContext.load(p, model)
    assert back.config.kv_qnorm and torch.equal(back.codebooks, ctx.codebooks)
    _rewrite(p, lambda t: t["codebooks"].__setitem__((0, 0, -1), 1.5), None)
    assert float(SqueezedContext.load(p, model).codebooks.max()) == 1.5
    _rewrite(p, None, lambda m: m["config"].update(kv_qnorm=False))
    with pytest.raises(SqueezedContextError, match="codebooks must hold"):
        SqueezedContext.load(p)


def test_key_sensitivity_is_the_rotated_query_energy():
    """key_sensitivity = E[(q . R_p e_d)^2] over the queries: the score change per unit of error in
    pre-RoPE channel d of a key rotated to position p, brute-forced through apply_rope."""
    g = torch.Generator().manual_seed(0)
    layers, H, group, W, D, N = 1, 2, 3, 7, 16, 11
    q = torch.randn(layers, H * group, W, D, generator=g) * torch.linspace(0.2, 3, D)
    table = RopeTable(1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)), 1.3)
    pos = torch.randint(-5000, 0, (H, N), generator=g)
    cos, sin = table.cos_sin(pos)
    got = key_sensitivity(query_moments(q, H)[0], cos, sin)                          # [H, N, D]
    basis = torch.eye(D, dtype=torch.float64)
    rotated = apply_rope(basis[None, None], cos[:, :, None], sin[:, :, None])        # [H, N, D(e_d), D]
    qs = q[0].double().reshape(H, group * W, D)
    want = torch.einsum("hnde,hqe->hnqd", rotated, qs).square().mean(2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bits", [3, 2])
def test_sensitivity_weighs_the_fit_and_picks_the_outliers(bits):
    """Channels that carry the queries' energy get the codebook and the outliers: the
    sensitivity-weighted squared error drops against the channel-blind quantization, and every
    entry stays within its bound (outliers exact to float16)."""
    x = _heavy((1, 2, 200, 32), seed=7)
    w = torch.rand(1, 2, 200)
    s = torch.ones(2, 200, 32)
    s[..., [3, 20]] = 50.0
    errs = {}
    for name, sens in (("blind", None), ("weighted", lambda i: s)):
        q = quantize_rows(x, w, bits, "nuq", 0.03, True, sensitivity=sens)
        y = dequantize_rows((q.packed, q.codebook, q.norm, q.outlier_idx, q.outlier_val), bits, 32, True)
        err = (y - x.double())[0]
        errs[name] = float((err.square() * s.double() * w[0, ..., None].double()).sum())
        is_out = torch.zeros_like(x[0], dtype=torch.bool).scatter_(-1, q.outlier_idx[0].long(), True)
        assert bool((err[is_out].abs() <= 1e-3 * x[0][is_out].abs().double() + 1e-6).all())
        limit = q.norm[0].double()[..., 0:1, :] * _bound(q.codebook[0]) * (1 + 1e-3) + 1e-6
        assert bool((err.abs() <= limit)[~is_out].all())
    assert errs["weighted"] < 0.8 * errs["blind"]


def test_outliers_shrink_the_range():
    """A single huge entry per row would stretch a channel's range; kept aside it does not."""
    x = _heavy((1, 1, 50, 16))
    x[0, 0, 7, 3] = 100.0
    w = torch.ones(1, 1, 50)
    errs = []
    for frac in (0.0, 0.07):
        q = quantize_rows(x, w, 4, "int", frac, True)
        y = dequantize_rows((q.packed, q.codebook, q.norm, q.outlier_idx if frac else None,
                             q.outlier_val if frac else None), 4, 16, True)
        errs.append(float((y - x.double())[..., 3].abs().max()))
    assert errs[1] < errs[0] / 10


def test_rope_inversion_and_model_table():
    from fixtures import tiny_model

    model = tiny_model()
    table = rope_from_model(model, 300, 16)
    pos = torch.arange(-300, 0)
    cos, sin = table.cos_sin(pos)
    x = torch.randn(2, 300, 16, dtype=torch.float64)
    assert torch.allclose(invert_rope(apply_rope(x, cos, sin), cos, sin), x, atol=1e-10)
    from sqz_compile.transformers_compat import UnsupportedModelError

    mod = next(m for n, m in model.named_modules() if n.endswith("rotary_emb"))
    mod.inv_freq = mod.inv_freq[:4].clone()
    with pytest.raises(UnsupportedModelError, match="kv_bits=16"):
        rope_from_model(model, 300, 16)


def test_squeeze_kv_low_bit_needs_rope():
    k = torch.randn(1, 1, 40, 8)
    with pytest.raises(ValueError, match="rope="):
        from sqz_compile.squeeze.capture import squeeze_kv

        squeeze_kv(k, k.clone(), torch.randn(1, 1, 5, 8), 0.3, SqueezeConfig(kv_bits=4))


@pytest.fixture(scope="module")
def tiny():
    from fixtures import tiny_context, tiny_model

    model = tiny_model()
    _, dense = tiny_context(model, length=80, keep=0.5)
    _, low = tiny_context(model, length=80, keep=0.5, kv_bits=4, kv_outliers=0.07)
    return model, dense, low


def test_squeeze_low_bit_close_to_16_bit(tiny):
    model, dense, low = tiny
    low.validate(model)
    assert low.keys.dtype == torch.int32 and low.quantized and low.head_dim == dense.head_dim
    assert torch.equal(low.perm, dense.perm) and torch.equal(low.window_keys, dense.window_keys)
    k, v = low.dense_kv()
    for a, b in ((k, dense.keys), (v, dense.values)):
        assert float((a - b).norm() / b.norm()) < 0.12
    lc = low.layer(1)
    assert lc.keys.dtype == torch.int32 and lc.codebooks.shape == (2, 16) and lc.perm is not None
    assert dense.layer(1).perm is None and dense.layer(1).codebooks is None


def test_low_bit_file_roundtrip_and_refusals(tmp_path, tiny):
    from test_context_io import _rewrite

    model, dense, low = tiny
    p = tmp_path / "low.safetensors"
    low.save(p)
    back = SqueezedContext.load(p, model)
    for n, t in low.tensors().items():
        assert torch.equal(getattr(back, n), t), n
    assert back.config.kv_bits == 4 and back.config.kv_datatype == "nuq"

    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0xFF
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(SqueezedContextError, match="sha256|corrupted"):
        SqueezedContext.load(bad)

    cases = {
        "bits": (None, lambda m: m["config"].update(kv_bits=2), "keys has shape"),
        "outlier_range": (lambda t: t["outlier_idx"].__setitem__((0, 0, 0, 0, 0), 99), None, "outlier_idx holds"),
        "codebook": (lambda t: t["codebooks"].__setitem__((0, 0, 0), 3.0), None, "codebooks must hold"),
        "no_outliers": (lambda t: (t.pop("outlier_idx"), t.pop("outlier_val")), None, "outlier tables"),
        "rope_length": (lambda t: t["rope"].__setitem__((0, -1), 5.0), None, "context length"),
        "fp16_range": (lambda t: t["key_norm"].__setitem__((0, 0, 1, 0), 7e4), None, "past float16"),
    }
    for name, (et, em, match) in cases.items():
        q = tmp_path / f"{name}.safetensors"
        low.save(q)
        _rewrite(q, et, em)
        with pytest.raises(SqueezedContextError, match=match):
            SqueezedContext.load(q)


def test_format_3_file_loads_as_16_bit(tmp_path, tiny):
    from test_context_io import _rewrite

    _, dense, _ = tiny
    p = tmp_path / "old.safetensors"
    dense.save(p)

    def old(m):
        m["format_version"] = 3
        for k in ("kv_bits", "kv_datatype", "kv_outliers"):
            m["config"].pop(k)

    _rewrite(p, None, old)
    assert json.loads(__import__("safetensors").safe_open(str(p), "pt").metadata()["sqz_meta"])["format_version"] == 3
    back = SqueezedContext.load(p)
    assert back.kv_bits == 16 and not back.quantized and torch.equal(back.keys, dense.keys)


def test_3_bit_file_roundtrip_and_old_layout_refused(tmp_path):
    """A 3-bit context saves and loads bit for bit and dequantizes close to its 16-bit keys. A
    format-4 file of 3 bits (10 codes per word) is refused with the fix (re-squeeze), before any
    shape check: at the tiny model's head dim 16 both layouts take 2 words per row, so the shapes
    alone would let the old codes through as garbage. Format-4 files of other widths still load."""
    from fixtures import tiny_context, tiny_model
    from test_context_io import _rewrite

    model = tiny_model()
    _, dense = tiny_context(model, length=80, keep=0.5)
    _, low3 = tiny_context(model, length=80, keep=0.5, kv_bits=3, kv_outliers=0.07)
    low3.validate(model)
    assert low3.keys.shape[-1] == 2 == -(-16 // 10)  # same width as the old layout
    k, v = low3.dense_kv()
    for a, b in ((k, dense.keys), (v, dense.values)):
        assert float((a - b).norm() / b.norm()) < 0.25
    p = tmp_path / "low3.safetensors"
    low3.save(p)
    back = SqueezedContext.load(p, model)
    for n, t in low3.tensors().items():
        assert torch.equal(getattr(back, n), t), n

    _rewrite(p, None, lambda m: m.update(format_version=4))
    with pytest.raises(SqueezedContextError, match="format version 4.*3-bit.*10 to a word.*re-squeeze") as e:
        SqueezedContext.load(p, model)
    assert "squeeze(model, context_ids).save(path)" in e.value.fix
    with pytest.raises(SqueezedContextError, match="re-squeeze"):
        SqueezedContext.read_metadata(p)


def test_format_4_low_bit_file_of_4_bits_still_loads(tmp_path, tiny):
    from test_context_io import _rewrite

    model, _, low = tiny
    p = tmp_path / "v4.safetensors"
    low.save(p)
    _rewrite(p, None, lambda m: m.update(format_version=4))
    back = SqueezedContext.load(p, model)
    assert back.kv_bits == 4 and torch.equal(back.keys, low.keys)


def test_size_table():
    rows = {r["kv_bits"]: r for r in size_table()}
    assert rows[16]["MB"] > rows[4]["MB"] > rows[3]["MB"] > rows[2]["MB"]
    kv16 = context_bytes(131072, 32, 8, 128, 32)["kv"]
    assert abs(kv16 - 2 * 32 * 8 * (131072 - 116) * 128 * 2) == 0
    assert context_bytes(131072, 32, 8, 128, 32, kv_bits=4)["kv"] * 4 == kv16
    assert context_bytes(131072, 32, 8, 128, 32, kv_bits=3)["kv"] * 16 == kv16 * 3  # two planes, no padding
    out = subprocess.run([sys.executable, "-m", "sqz_compile.squeeze.quantize"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "kv_bits" in out and f"{rows[4]['MB']:,}" in out


def test_low_bit_context_through_compile_export_and_onnx_refusal(tiny):
    """The low-bit tensors travel as graph inputs of the compiled forward (a structure of their
    own) and as buffers of torch.export; both give the same logits, close to the 16-bit
    context's; ONNX export refuses with the fix."""
    import sqz_compile
    from sqz_compile import CompileConfig
    from sqz_compile.compiled_forward import structure_key
    from sqz_compile.export.program import export

    from fixtures import user_ids

    model, dense, low = tiny
    assert structure_key(low) != structure_key(dense)
    ids = user_ids(2, 5)
    with torch.no_grad():
        exported = export(model, low, (ids,)).module()(ids)
        compiled = sqz_compile.compile(model, low, config=CompileConfig(inductor=False))(input_ids=ids).logits
        full = sqz_compile.compile(model, dense, config=CompileConfig(inductor=False))(input_ids=ids).logits
    exported = exported.logits if hasattr(exported, "logits") else exported
    torch.testing.assert_close(compiled, exported, atol=1e-4, rtol=1e-4)
    assert float((compiled - full).norm() / full.norm()) < 0.1
    assert not torch.allclose(compiled, full, atol=1e-6)
    with pytest.raises(NotImplementedError, match="kv_bits=16"):
        sqz_compile.export_onnx(model, low, (ids,), "unused.onnx")
