"""The squeeze-time self-check (squeeze/selfcheck.py) and the transformers cache-name compat."""
import logging

import pytest
import torch
from transformers import AttentionInterface
from transformers.models.llama import modeling_llama

import fixtures
from sqz_compile import SqueezeConfig, squeeze
from sqz_compile.squeeze import capture
from sqz_compile.squeeze.selfcheck import CaptureMismatchError
from sqz_compile.transformers_compat import cache_kwargs, output_cache

CFG = dict(keep=1.0, cluster_ratio=0.25, observation_window=8, dense_tokens=2)


def _ids(n=40):
    return torch.randint(3, fixtures.VOCAB, (1, n), generator=torch.Generator().manual_seed(1))


def _broken_capture(monkeypatch, corrupt):
    """Make squeeze's capture_context return what `corrupt(cap)` makes of it."""
    real = capture.capture_context

    def broken(*args, **kwargs):
        return corrupt(real(*args, **kwargs))
    monkeypatch.setattr(capture, "capture_context", broken)


@pytest.mark.parametrize("attn,dtype,tol", [("sdpa", torch.float32, 1e-5), ("eager", torch.float32, 1e-5),
                                            ("sdpa", torch.bfloat16, 0.25)])
def test_clean_capture_passes_and_is_recorded(attn, dtype, tol):
    model = fixtures.tiny_model("llama", attn).to(dtype)
    sdpa_before, eager_before = AttentionInterface._global_mapping["sdpa"], modeling_llama.eager_attention_forward
    ctx = squeeze(model, _ids(), SqueezeConfig(**CFG), progress=False)
    errors = ctx.extra["self_check_errors"]
    assert len(errors) == 2 and max(errors) <= tol + 40 * 2 ** -24 and ctx.extra["seconds"]["self_check"] >= 0
    # the model's own attention functions are back in place
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_before
    assert modeling_llama.eager_attention_forward is eager_before


def test_capture_that_skips_rope_on_keys_is_refused(monkeypatch):
    """A deliberately broken capture: keys read without RoPE (queries still rotated)."""
    model = fixtures.tiny_model("llama", "sdpa")
    rope = modeling_llama.apply_rotary_pos_emb
    real = capture.capture_context

    def capture_without_key_rope(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(modeling_llama, "apply_rotary_pos_emb", lambda q, k, cos, sin, *a, **kw: (rope(q, k, cos, sin)[0], k))
            return real(*args, **kwargs)
    monkeypatch.setattr(capture, "capture_context", capture_without_key_rope)
    with pytest.raises(CaptureMismatchError, match=r"LlamaForCausalLM cannot be squeezed: in layer 0 .* by \d\.\d+ "
                                                   r"\(median relative error over output rows, tolerance 1.2e-05 for float32 at 40 positions.*failing layers \[0, 1\]"):
        squeeze(model, _ids(), SqueezeConfig(**CFG), progress=False)


def test_the_failing_layer_is_named(monkeypatch):
    def scale_last_layer_keys(cap):
        cap.keys[1] *= 1.1
        return cap
    _broken_capture(monkeypatch, scale_last_layer_keys)
    with pytest.raises(CaptureMismatchError, match=r"in layer 1 .*failing layers \[1\]\)"):
        squeeze(fixtures.tiny_model("llama", "eager"), _ids(), SqueezeConfig(**CFG), progress=False)


def test_half_precision_refuses_gross_errors(monkeypatch):
    """In bfloat16 the tolerance (0.25) sits above the rounding of keys rotated at p vs p - L (0.1 on
    SmolLM2): a gross error (values of layer 0 off by half) is still refused."""
    def corrupt(cap):
        cap.values[0] *= 1.5
        return cap
    _broken_capture(monkeypatch, corrupt)
    with pytest.raises(CaptureMismatchError, match=r"in layer 0 .*tolerance 0.25 for bfloat16.*failing layers \[0\]"):
        squeeze(fixtures.tiny_model("llama", "sdpa").to(torch.bfloat16), _ids(), SqueezeConfig(**CFG), progress=False)


def _sharpened(factor: float):
    """A tiny bfloat16 model whose query and key projections are scaled up: logits x factor^2."""
    model = fixtures.tiny_model("llama", "sdpa", max_position_embeddings=1024).to(torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= factor
            layer.self_attn.k_proj.weight *= factor
    return model


@pytest.mark.parametrize("factor", [16, 32, 64])
def test_half_precision_sharp_attention_passes_and_wrong_values_still_fail(monkeypatch, factor):
    """Rounding flips near-tied rows of sharp bfloat16 attention (max error 0.77 on a clean capture
    here): the half-precision error is the median over rows, which a clean capture keeps small and
    a wrong one (a layer's values off by 1.5x) does not."""
    ids = _ids(600)
    ctx = squeeze(_sharpened(factor), ids, SqueezeConfig(**CFG), progress=False)
    assert max(ctx.extra["self_check_errors"]) < 0.1

    def corrupt(cap):
        cap.values[1] *= 1.5
        return cap
    _broken_capture(monkeypatch, corrupt)
    with pytest.raises(CaptureMismatchError, match=r"failing layers \[1\]"):
        squeeze(_sharpened(factor), ids, SqueezeConfig(**CFG), progress=False)


def test_self_check_false_skips_it(monkeypatch):
    """The opt-out is explicit: SqueezeConfig(self_check=False) squeezes even a broken capture."""
    def corrupt(cap):
        cap.values[0] *= 1.5
        return cap
    _broken_capture(monkeypatch, corrupt)
    ctx = squeeze(fixtures.tiny_model("llama", "sdpa"), _ids(), SqueezeConfig(**CFG, self_check=False), progress=False)
    assert "self_check" not in ctx.extra["seconds"] and "self_check_errors" not in ctx.extra
    assert SqueezeConfig().self_check and SqueezeConfig.from_dict(SqueezeConfig().to_dict()) == SqueezeConfig()


def test_chunked_prefill_is_checked_too():
    ctx = squeeze(fixtures.tiny_model("qwen2", "sdpa"), _ids(50), SqueezeConfig(**CFG, chunk_size=16), progress=False)
    assert max(ctx.extra["self_check_errors"]) <= 1e-5


def test_cache_is_passed_and_read_under_the_installed_name():
    """transformers >= 5.24 takes `cache` (past_key_values deprecated: a FutureWarning for the
    argument, a logged warning for the output attribute), 5.17 only past_key_values."""
    import inspect
    import warnings

    model = fixtures.tiny_model("llama", "sdpa")
    (name, cache), = cache_kwargs(model.model, None).items()
    assert cache is None and name in inspect.signature(type(model.model).forward).parameters
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    logging.Logger.warning_once.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model.model(input_ids=_ids(5), use_cache=True, **cache_kwargs(model.model, None))
            assert output_cache(out).get_seq_length() == 5
            squeeze(model, _ids(), SqueezeConfig(**CFG), progress=False)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [m for m in logged + [str(w.message) for w in caught] if "past_key_values" in m]
