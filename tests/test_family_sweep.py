"""The family sweep: every transformers decoder family buildable tiny on CPU, sdpa and eager, is
either exact at keep = 1 through squeeze -> compile or refused by squeeze with a reason; none
silently differs (cases and runner: tests/family_sweep.py; table: benchmarks/family_sweep/README.md).

Fast: every refusal, the compile run of the core families, and squeeze's verdict (accepted, its
capture proven by the self-check) for the rest; their compile runs are `slow`.
"""
import pytest
import torch

import family_sweep as fs
from sqz_compile import SqueezeConfig, squeeze
from sqz_compile import transformers_compat
from sqz_compile.squeeze.selfcheck import CaptureMismatchError

IMPLS = ("sdpa", "eager")
# one family per way of spelling attention: plain, qk-norm before RoPE, partial rotary, the sliding-window
# fix (layer_types), interleaved RoPE, fused QKV, an nn.Dropout attribute
CORE = {"llama", "qwen3", "phi3:partial_rotary", "gemma3_text:full", "cohere", "falcon", "persimmon"}
ACCEPTED = [c for c in fs.CASES if c not in fs.EXPECTED_REFUSAL]
# older transformers (5.17) still hard-code some families' attention (Falcon): refused, clearly
NO_INTERFACE = "attention not dispatched through transformers.AttentionInterface"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than contending for the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cases(names, slow=()):
    return [pytest.param(c, impl, id=f"{c}-{impl}", marks=[pytest.mark.slow] if c in slow else [])
            for c in names for impl in IMPLS]


@pytest.mark.parametrize("case,impl", _cases(fs.CASES, slow=set(ACCEPTED) - CORE))
def test_family_is_exact_or_refused(case, impl):
    row = fs.run_case(case, impl)
    if row["status"] == "n/a":
        pytest.skip(row["detail"])
    want = fs.EXPECTED_REFUSAL.get(case)
    if want is None:
        assert row["status"] == "exact" or (row["status"] == "refused" and NO_INTERFACE in row["detail"]), row
    else:
        assert row["status"] == "refused" and want in row["detail"], row


@pytest.mark.parametrize("case,impl", _cases([c for c in ACCEPTED if c not in CORE]))
def test_family_squeeze_accepts_with_proven_capture(case, impl):
    try:
        model = fs.build(case, impl)
    except fs.NotBuildable as e:
        pytest.skip(str(e))
    ids = torch.randint(3, fs.VOCAB, (1, fs.L_CTX), generator=torch.Generator().manual_seed(1))
    ctx = squeeze(model, ids, SqueezeConfig(keep=1.0, cluster_ratio=0.25, observation_window=fs.WINDOW), progress=False)
    assert len(ctx.extra["self_check_errors"]) == ctx.num_layers
    assert max(ctx.extra["self_check_errors"]) <= 1e-5


def test_known_good_is_what_the_sweep_proves():
    assert transformers_compat.KNOWN_GOOD == {fs.CASES[c][0] for c in ACCEPTED}


@pytest.mark.parametrize("case", ["hunyuan_v1_dense", "doge", "gpt_oss:full", "falcon:alibi"])
def test_self_check_refuses_what_the_up_front_rules_know(case, monkeypatch):
    """Without the up-front rules, the self-check alone refuses each silently wrong family."""
    monkeypatch.setattr(transformers_compat, "unsupported_reasons", lambda model: [])
    model = fs.build(case, "eager")
    if not model._can_set_attn_implementation():
        pytest.skip(f"this transformers version refuses it earlier: {NO_INTERFACE}")
    ids = torch.randint(3, fs.VOCAB, (1, fs.L_CTX), generator=torch.Generator().manual_seed(1))
    with pytest.raises(CaptureMismatchError, match=r"in layer 0 .* differs from the model's own attention by"):
        squeeze(model, ids, SqueezeConfig(keep=1.0, cluster_ratio=0.25, observation_window=fs.WINDOW), progress=False)
