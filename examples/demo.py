"""sqz_compile demo: squeeze one essay for SmolLM2-135M-Instruct and ask it three questions.

Prints the dense answer (the model over the whole prompt) next to the squeezed one (exact
attention over the selected clusters of the fixed context), the fraction of context keys the
lookup attended, and timings. Runs on CPU in a few minutes; uses CUDA when present.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from sqz_compile import CompileConfig, SqueezeConfig, assets
from sqz_compile.attention_function import attended_fraction
from sqz_compile.squeezed_model import compile as sqz_compile_model
from sqz_compile.ops import DEFAULT_BLOCK_Q
from sqz_compile.squeeze import squeeze

QUESTIONS = [
    "How much did the author's startup pay its PR firm each month?",
    "In how many different publications did the PR firm get press hits in 18 months?",
    "What does the author compare the PR industry to?",
]


def essay_ids(tokenizer) -> torch.Tensor:
    with open(os.path.join(assets.essays_dir(), "submarine.txt"), encoding="utf-8") as f:
        text = f.read().strip()
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def question_ids(tokenizer, question: str) -> torch.Tensor:
    msgs = [{"role": "user", "content": f"Answer briefly from the essay above. {question}"}]
    text = "\n\n" + tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", type=float, default=1 / 8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--hierarchical", action="store_true")
    ap.add_argument("--inductor", action="store_true",
                    help="compile the decode step with Inductor (Dynamo traces the 30 layers first: about a "
                         "minute on a GPU, minutes on a small CPU). Default: nothing traced or compiled: the "
                         "model's own forward with the sqz attention, decode steps replayed from CUDA graphs "
                         "on a GPU")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    (model, tok), t_load = timed(lambda: assets.load_smollm2(device=device))
    ctx_ids = essay_ids(tok).to(device)
    print(f"model: SmolLM2-135M-Instruct on {device} (loaded in {t_load:.1f} s)")
    print(f"fixed context: 'The Submarine' by Paul Graham, {ctx_ids.shape[1]} tokens")

    config = SqueezeConfig(keep=args.keep, hierarchical=args.hierarchical)
    ctx, t_sq = timed(lambda: squeeze(model, ctx_ids, config))
    print(f"squeezed in {t_sq:.1f} s: {ctx.num_clusters} clusters per head, keep={args.keep:g}\n")

    if args.inductor:  # dynamic=True: one graph for every question length instead of a recompile per length
        sm = sqz_compile_model(model, ctx, CompileConfig(dynamic=True, decode_inductor=True))
        print("compiled with backend 'sqz' (Inductor, decode step)\n")
    else:
        sm = sqz_compile_model(model, ctx, CompileConfig(decode_inductor=False,
                                                         mode="reduce-overhead" if device == "cuda" else None))
        print("untraced: the model's forward with torch.ops.sqz.squeezed_attention"
              + (", decode steps replayed from CUDA graphs" if device == "cuda" else "") + "\n")
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    for question in QUESTIONS:
        q_ids = question_ids(tok, question).to(device)
        full = torch.cat([ctx_ids, q_ids], dim=1)
        dense, t_dense = timed(lambda: model.generate(full, **gen)[0, full.shape[1]:])
        sq, t_sqz = timed(lambda: sm.generate(q_ids, **gen)[0, q_ids.shape[1]:])
        prefill = attended_fraction(model, ctx, q_ids)
        per_token = attended_fraction(model, ctx, q_ids, decode=sq)
        print(f"Q: {question}")
        print(f"  dense    ({t_dense:5.2f} s): {tok.decode(dense, skip_special_tokens=True).strip()}")
        print(f"  squeezed ({t_sqz:5.2f} s): {tok.decode(sq, skip_special_tokens=True).strip()}")
        print(f"  context keys attended: {100 * per_token:.1f}% per token (decode), "
              f"{100 * prefill:.1f}% per {DEFAULT_BLOCK_Q}-token block of the question (prefill)\n")
    if args.inductor:
        print(f"{len(sm.report.layers)} of {ctx.num_layers} attention layers rewritten to torch.ops.sqz.")
        print("The first squeezed call includes torch.compile time; later ones reuse the compiled graph.")
    print("Keys attended include the always-attended window and dense tokens; decode and prefill each\n"
          "have their own threshold, so both keep about `keep` of the clustered keys.")


if __name__ == "__main__":
    main()
