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


# --------------------------------------------------------------------------- issue 17: the CLI as a user meets it

def _fresh(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from the repository root."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env)


def test_help_does_not_import_torch():
    """`sqz --help` and every subcommand's help (eval's too) load neither torch nor transformers."""
    proc = _fresh("""
import sys
from sqz_compile.cli import main
for argv in (["--help"], ["squeeze", "--help"], ["ask", "--help"], ["export", "--help"], ["eval", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
print([m for m in ("torch", "transformers") if m in sys.modules])
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def _parsers():
    import argparse

    from sqz_compile.cli import build_parser
    from sqz_compile.eval.cli import build_parser as eval_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(name, p) for name, p in sub.choices.items() if name != "eval"] + [("eval", eval_parser())]


def _shown(default) -> str:
    if isinstance(default, (list, tuple)):
        return " ".join(_shown(v) for v in default)
    return f"{default:g}" if isinstance(default, float) else str(default)


def test_every_option_has_help_with_its_default():
    import argparse

    for name, parser in _parsers():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = f"sqz {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{what} has no help text"
            if action.option_strings and action.default not in (None, False, True):
                text = action.help % {"default": _shown(action.default)}
                assert _shown(action.default) in text, f"{what}: help does not show the default {action.default!r}"


def test_quiet_hides_every_progress_bar(model_dir, tmp_path):
    """-q in a fresh `sqz` process: no bar on stderr, and tqdm bars of other libraries (the GGUF
    loader's, created with no arguments) are disabled too."""
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    proc = _fresh(f"""
import sys
from sqz_compile.cli import main
code = main(["squeeze", {str(text)!r}, "--model", {model_dir!r}, "--window", "8", "--cluster-ratio", "0.2", "-q"])
from transformers import modeling_gguf_pytorch_utils as gguf
assert gguf.tqdm(range(3)).disable
sys.exit(code)
""", env={k: v for k, v in os.environ.items() if not k.startswith("TQDM_")})
    assert proc.returncode == 0, proc.stderr
    assert "it/s" not in proc.stderr and "%|" not in proc.stderr and "[00:" not in proc.stderr, proc.stderr
    assert "wrote" in proc.stdout


def test_squeeze_says_how_big_the_file_is_and_why(squeezed, capsys):
    text, _ = squeezed
    code, out, err = _run(capsys, "squeeze", text, "-o", text + ".2.sqz", "--model",
                          SqueezedContext.load(squeezed[1]).extra["sqz_cli"]["model"], "--window", "8",
                          "--cluster-ratio", "0.2", "-q")
    assert code == 0, err
    ctx = SqueezedContext.load(text + ".2.sqz")
    size = os.path.getsize(text + ".2.sqz") / 2**20
    assert out.startswith(f"wrote {text}.2.sqz: {size:.1f} MiB (float32 K/V, 2 layers x {ctx.context_length:,} "
                          f"tokens)"), out


def test_ask_prints_times_and_keys_attended(squeezed, capsys):
    _, ctx_path = squeezed
    code, out, err = _run(capsys, "ask", ctx_path, "Who kept the ledger?", "--dense", "--max-new-tokens", "3", "-q")
    assert code == 0, err
    assert {line.split(":", 1)[0] for line in out.strip().splitlines()} == {"squeezed", "dense"}
    report = err.strip().splitlines()[-3:]
    assert report[0].startswith("squeezed") and " s  " in report[0] and "new tokens" in report[0]
    assert report[1].startswith("dense") and "prefills the whole" in report[1]
    assert report[2].startswith("context keys attended: ") and "% per token (decode)" in report[2]


@pytest.fixture
def no_model_load(monkeypatch):
    """Errors that must come before the model loads: loading it fails the test."""
    import sqz_compile.cli as cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(cli, "load_model", refuse)


def _resave_with(src: str, dst, **meta_changes) -> None:
    """Copy a context file with some of its metadata changed."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as f:
        meta = json.loads(f.metadata()["sqz_meta"])
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    meta.update(meta_changes)
    save_file(tensors, str(dst), metadata={"sqz_meta": json.dumps(meta)})


def test_context_file_errors_name_the_command_before_the_model_loads(squeezed, tmp_path, capsys, no_model_load):
    text, ctx_path = squeezed
    junk = tmp_path / "junk.sqz"
    junk.write_bytes(b"\x00" * 64)
    err = _user_error(capsys, "ask", str(junk), "hi", "-q")
    assert f"re-create it with: sqz squeeze TEXT -o {junk}" in err and "sqz_compile.squeeze" not in err
    old = tmp_path / "old.sqz"
    _resave_with(ctx_path, old, format_version=1)
    err = _user_error(capsys, "export", str(old), "--format", "exported", "-q")
    assert "format version 1" in err and "sqz_compile.squeeze" not in err
    assert f"re-create it with: sqz squeeze TEXT -o {old}" in err
    corrupt = tmp_path / "corrupt.sqz"
    _resave_with(ctx_path, corrupt, sha256={})  # readable header, contents fail their check
    err = _user_error(capsys, "ask", str(corrupt), "hi", "-q")
    assert f"re-create it with: sqz squeeze {os.path.abspath(text)} -o {corrupt} --model " in err


def test_dtype_other_than_the_contexts_says_drop_dtype(squeezed, capsys, no_model_load):
    _, ctx_path = squeezed
    err = _user_error(capsys, "ask", ctx_path, "hi", "--dtype", "bfloat16", "-q")
    assert "squeezed with the model in float32" in err and "drop --dtype" in err and "another model" not in err


def test_ask_input_errors_come_first_and_speak_of_asking(squeezed, tmp_path, capsys, no_model_load):
    text, ctx_path = squeezed
    assert "question is empty" in _user_error(capsys, "ask", ctx_path, "  ", "-q")
    assert "add --dense" in _user_error(capsys, "ask", ctx_path, "hi", "--text", text, "-q")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    err = _user_error(capsys, "ask", ctx_path, "hi", "--dense", "--text", str(empty), "-q")
    assert f"--text {empty}: the file is empty; give the text {ctx_path} was squeezed from" in err
    assert "to squeeze" not in err
    err = _user_error(capsys, "ask", ctx_path, "hi", "--dense", "--text", str(tmp_path / "gone.txt"), "-q")
    assert "--text" in err and "no such file" in err and "to squeeze" not in err


def test_wrong_model_names_the_commands(squeezed, model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    _, ctx_path = squeezed
    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(model_dir)
    tiny_model("llama", None, 2, 2, seed=7, vocab_size=len(tok), max_position_embeddings=2048,
               pad_token_id=None).save_pretrained(other)
    tok.save_pretrained(other)
    err = _user_error(capsys, "ask", ctx_path, "hi", "--model", str(other), "-q")
    assert f"pass --model with the model it was squeezed for ({model_dir})" in err
    assert f"sqz squeeze TEXT --model {other} -o {ctx_path}" in err and "sqz_compile.squeeze" not in err


def test_export_shows_its_stages(squeezed, tmp_path, capsys, monkeypatch):
    """Without -q every stage is named on stderr; a .pt2 build shows its C++ compile stage (the
    compile itself is stubbed here: it takes minutes)."""
    from sqz_compile.export import aoti

    _, ctx_path = squeezed
    built = []
    monkeypatch.setattr(aoti, "package_program", lambda ep, path: built.append(path) or open(path, "wb").close())
    code, out, err = _run(capsys, "export", ctx_path, "--format", "pt2", "-o", str(tmp_path / "m.pt2"))
    assert code == 0, err
    for stage in ("check context", "read context", "load model", "torch.export", "AOTInductor: compile C++"):
        assert stage in err, (stage, err)
    assert built == [str(tmp_path / "m.pt2")] and out.startswith(f"wrote {tmp_path / 'm.pt2'}: ")


def test_ask_refuses_a_compile_cache_that_is_a_file_before_loading(squeezed, tmp_path, capsys, no_model_load):
    _, ctx_path = squeezed
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    err = _user_error(capsys, "ask", ctx_path, "hi", "--compile", "--compile-cache", str(mine), "-q")
    assert "not a directory" in err and mine.read_text() == "mine"


def test_default_compile_cache_location(monkeypatch, tmp_path):
    from sqz_compile.cli import default_compile_cache

    monkeypatch.setenv("SQZ_COMPILE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_compile_cache() == str(tmp_path / "a")
    monkeypatch.delenv("SQZ_COMPILE_CACHE")
    assert default_compile_cache() == str(tmp_path / "xdg" / "sqz_compile")
