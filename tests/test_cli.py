"""The `sqz` command line on a tiny random Llama saved as a local model folder (with SmolLM2's
tokenizer): squeeze -> ask (--dense) -> export, and user errors as one line with status 1."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fixtures import tiny_model
from sqz_compile.cli import main
from sqz_compile.context import SqueezedContext

TEXT = ("The lighthouse keeper kept a ledger of every ship that passed. " * 6 +
        "In the spring, the ledger recorded a ship named Aurora carrying salt. " * 4).strip()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (2 layers, 4 query / 2 KV heads) with a real tokenizer."""
    from transformers import AutoTokenizer

    from sqz_compile.assets import GGUF_FILE, smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=GGUF_FILE)
    model = tiny_model("llama", None, 2, 2, vocab_size=len(tok), max_position_embeddings=1024, pad_token_id=None,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.generation_config.eos_token_id = tok.eos_token_id  # a saved model stops at its eos
    folder = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def squeezed(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    text = folder / "doc.txt"
    text.write_text(TEXT)
    out = folder / "doc.sqz"
    assert main(["squeeze", str(text), "-o", str(out), "--model", model_dir, "--keep", "0.5",
                 "--window", "8", "--cluster-ratio", "0.2", "-q"]) == 0
    return str(text), str(out)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_squeeze_writes_a_loadable_context(squeezed, model_dir):
    text, out = squeezed
    ctx = SqueezedContext.load(out)
    assert ctx.config.keep == 0.5 and ctx.window == 8 + ctx.extra["dense_tokens"] and ctx.extra["dense_tokens"] > 0
    assert ctx.num_layers == 2 and ctx.num_kv_heads == 2
    assert ctx.extra["sqz_cli"] == {"model": model_dir, "source": os.path.abspath(text)}


def test_squeeze_options_reach_the_config(model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    code, out, _ = _run(capsys, "squeeze", str(text), "--model", model_dir, "--hierarchical", "--budget", "24",
                        "--window", "4", "--cluster-ratio", "0.2", "--coarse-ratio", "0.05", "-q")
    assert code == 0 and "budget 24 keys" in out
    ctx = SqueezedContext.load(tmp_path / "t.sqz")  # default output name
    assert ctx.hierarchical and ctx.budget == 24


def test_ask_answers_and_dense_matches_at_keep_one(model_dir, tmp_path, capsys):
    """keep = 1 attends to the whole context, so the squeezed and dense greedy answers agree."""
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["squeeze", str(text), "--model", model_dir, "--keep", "1", "--window", "8",
                 "--cluster-ratio", "0.2", "-q"]) == 0
    capsys.readouterr()
    code, out, err = _run(capsys, "ask", str(tmp_path / "t.sqz"), "What did the ship carry?", "--dense",
                          "--max-new-tokens", "6", "-q")
    assert code == 0, err
    lines = dict(line.split(":", 1) for line in out.strip().splitlines())
    assert set(lines) == {"squeezed", "dense"}
    assert lines["squeezed"].strip() == lines["dense"].strip() != ""


def test_ask_prints_only_the_answer_without_dense(squeezed, capsys):
    _, ctx_path = squeezed
    code, out, err = _run(capsys, "ask", ctx_path, "Who kept the ledger?", "--max-new-tokens", "4", "-q")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt,suffix", [("exported", ".exported.pt2"), ("onnx", ".onnx")])
def test_export_formats(squeezed, fmt, suffix, tmp_path, capsys):
    _, ctx_path = squeezed
    out = tmp_path / f"m{suffix}"
    code, stdout, err = _run(capsys, "export", ctx_path, "--format", fmt, "-o", str(out), "-q")
    assert code == 0, err
    assert out.is_file() and str(out) in stdout
    if fmt == "exported":
        from sqz_compile import load_exported

        ep = load_exported(out)
        assert ep.module()(torch.tensor([[1, 2, 3]])).shape[:2] == (1, 3)
    else:
        ort = pytest.importorskip("onnxruntime")
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]).numpy()})[0]
        assert logits.shape[:2] == (2, 3)


# --------------------------------------------------------------------------- user errors

def _user_error(capsys, *argv: str) -> str:
    code, out, err = _run(capsys, *argv)
    assert code == 1, (code, out, err)
    last = err.strip().splitlines()[-1]  # progress bars (if shown) come before it
    assert "Traceback" not in err and last.startswith(f"sqz {argv[0]}: error: "), err
    return last


def test_missing_files_are_user_errors(squeezed, tmp_path, capsys):
    assert "no such file" in _user_error(capsys, "squeeze", str(tmp_path / "nope.txt"), "-q")
    assert "no such context file" in _user_error(capsys, "ask", str(tmp_path / "nope.sqz"), "hi", "-q")
    assert "no such context file" in _user_error(capsys, "export", str(tmp_path / "x.sqz"), "--format", "onnx")
    text, _ = squeezed
    err = _user_error(capsys, "squeeze", text, "--model", str(tmp_path / "no_model"), "-q")
    assert "no such model folder" in err


def test_wrong_model_for_the_context(squeezed, tmp_path, capsys):
    from transformers import AutoTokenizer

    _, ctx_path = squeezed
    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(SqueezedContext.load(ctx_path).extra["sqz_cli"]["model"])
    tiny_model("llama", None, 2, 2, seed=7, vocab_size=len(tok), max_position_embeddings=2048,
               pad_token_id=None).save_pretrained(other)
    tok.save_pretrained(other)
    err = _user_error(capsys, "ask", ctx_path, "hi", "--model", str(other), "-q")
    assert "made for another model" in err


def test_bad_inputs_are_user_errors(squeezed, tmp_path, capsys):
    text, ctx_path = squeezed
    assert "keep" in _user_error(capsys, "squeeze", text, "--keep", "1.5", "-q")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "empty" in _user_error(capsys, "squeeze", str(empty), "-q")
    junk = tmp_path / "junk.sqz"
    junk.write_bytes(b"\x00" * 64)
    assert "junk.sqz" in _user_error(capsys, "ask", str(junk), "hi", "-q")
    changed = tmp_path / "changed.txt"
    changed.write_text(TEXT + " More.")
    assert "not the text" in _user_error(capsys, "ask", ctx_path, "hi", "--dense", "--text", str(changed), "-q")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "x.sqz", "--format", "zip"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_installed_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sqz_compile.cli", "ask", str(tmp_path / "none.sqz"), "q"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no such context file" in proc.stderr and "Traceback" not in proc.stderr
