"""Sweep: does sqz_compile at keep=1.0 reproduce the dense model, per transformers decoder family?

    python sweep.py                 # all families, each in its own subprocess; writes sweep.md + sweep.json
    python sweep.py --one gemma     # one family (both impls), prints JSON lines

Per (family, impl): squeeze a 40-token random context (keep=1, W=8), compile (inductor=False), run
one row of 7 user tokens and compare with the dense model over [context + user tokens].
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
import warnings

L_CTX, N_USER, VOCAB = 40, 7, 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
MOE = dict(num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
           moe_intermediate_size=32, shared_expert_intermediate_size=32, n_shared_experts=1)

# name -> (model_type, overrides). Names with ":" are variants (a default refused / sliding knob).
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", dict(sliding_window=None)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {}),
    "phi3:partial_rotary": ("phi3", dict(partial_rotary_factor=0.5)),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),
    "gemma2:nosoftcap,nosw": ("gemma2", dict(attn_logit_softcapping=None, final_logit_softcapping=None,
                                             sliding_window=None)),
    "gemma3_text": ("gemma3_text", {}),
    "gemma3_text:nosw": ("gemma3_text", dict(sliding_window=None)),
    "cohere": ("cohere", {}),
    "cohere2": ("cohere2", {}),
    "cohere2:nosw": ("cohere2", dict(sliding_window=None)),
    "granite": ("granite", dict(attention_multiplier=0.5, embedding_multiplier=2.0,
                                residual_multiplier=0.5, logits_scaling=2.0)),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "olmo3": ("olmo3", {}),
    "olmo3:nosw": ("olmo3", dict(sliding_window=None)),
    "stablelm": ("stablelm", {}),
    "falcon": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "phi": ("phi", {}),
    "gpt_neox": ("gpt_neox", {}),
    "starcoder2": ("starcoder2", dict(sliding_window=None)),
    "mixtral": ("mixtral", dict(sliding_window=None, **MOE)),
    "smollm3": ("smollm3", {}),
    "glm": ("glm", {}),
    "glm4": ("glm4", {}),
    "helium": ("helium", {}),
    "arcee": ("arcee", {}),
    "ministral": ("ministral", dict(sliding_window=None)),
    "seed_oss": ("seed_oss", {}),
    "exaone4": ("exaone4", {}),
    "exaone4:nosw": ("exaone4", dict(sliding_window=None)),
    "hunyuan_v1_dense": ("hunyuan_v1_dense", {}),
    "ernie4_5": ("ernie4_5", {}),
    "nemotron": ("nemotron", {}),
    "persimmon": ("persimmon", {}),
    "apertus": ("apertus", {}),
    "jais2": ("jais2", {}),
    "qwen3_moe": ("qwen3_moe", MOE),
    "qwen2_moe": ("qwen2_moe", MOE),
    "olmoe": ("olmoe", MOE),
    "phimoe": ("phimoe", dict(sliding_window=None, **MOE)),
    "dots1": ("dots1", MOE),
    "gpt_oss": ("gpt_oss", dict(MOE, num_local_experts=4)),
    "gpt_oss:nosw": ("gpt_oss", dict(MOE, num_local_experts=4, sliding_window=None)),
    "deepseek_v3": ("deepseek_v3", dict(MOE, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                        qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
                                        n_group=1, topk_group=1)),
    "doge": ("doge", {}),
    "lfm2": ("lfm2", {}),
    "gptj": ("gptj", {}),
    "llama4_text": ("llama4_text", dict(MOE, intermediate_size_mlp=128, attention_chunk_size=256,
                                        no_rope_layers=[1, 1])),
    # second pass: fixed builds / variants
    "falcon:fixed": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, _drop=["head_dim"])),
    "falcon:alibi": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, alibi=True, _drop=["head_dim"])),
    "gemma2:nosoftcap,full": ("gemma2", dict(attn_logit_softcapping=None, final_logit_softcapping=None,
                                             layer_types=["full_attention"] * 2)),
    "gemma3_text:full": ("gemma3_text", dict(layer_types=["full_attention"] * 2)),
    "gemma3_text:sw16": ("gemma3_text", dict(sliding_window=16)),
    "cohere2:full": ("cohere2", dict(layer_types=["full_attention"] * 2)),
    "olmo3:full": ("olmo3", dict(layer_types=["full_attention"] * 2)),
    "exaone4:full": ("exaone4", dict(layer_types=["full_attention"] * 2)),
    "ministral:default": ("ministral", {}),
    "ministral:full": ("ministral", dict(layer_types=["full_attention"] * 2)),
    "gpt_oss:full": ("gpt_oss", dict(MOE, num_local_experts=4, layer_types=["full_attention"] * 2)),
    "hunyuan_v1_dense:unit_norm": ("hunyuan_v1_dense", dict(_no_perturb=True)),
    "deepseek_v3:fixed": ("deepseek_v3", dict(MOE, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                              qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
                                              n_group=1, topk_group=1, num_key_value_heads=4, _drop=["head_dim"])),
    "lfm2:conv+attn": ("lfm2", dict(layer_types=["conv", "full_attention"])),
    "llama4_text:nope_layer": ("llama4_text", dict(MOE, intermediate_size_mlp=128, attention_chunk_size=256,
                                                   no_rope_layers=[1, 0])),
    "llama4_text:nope_floor16": ("llama4_text", dict(MOE, intermediate_size_mlp=128, attention_chunk_size=256,
                                                     no_rope_layers=[1, 0], floor_scale=16)),
    "gptj:fixed": ("gptj", dict(rotary_dim=8, _drop=["head_dim"])),
    "qwen3_next": ("qwen3_next", dict(MOE, layer_types=["full_attention"] * 2, linear_num_value_heads=2,
                                      linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)),
}


def build(family: str, attn: str, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, over = FAMILIES[family]
    kw = {**BASE, **over}
    no_perturb = kw.pop("_no_perturb", False)
    for k in kw.pop("_drop", []):
        kw.pop(k, None)
    cfg = AutoConfig.for_model(model_type, **kw)
    # make sure the size knobs took even where the config class renames them
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if k in kw and getattr(cfg, k, None) != kw[k]:
            setattr(cfg, k, kw[k])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    with torch.no_grad():  # some families init to zeros/ones: give every weight some randomness
        for name, p in ([] if no_perturb else model.named_parameters()):
            if p.dim() == 1 and ("norm" in name or "ln" in name):
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() == 1 and "bias" in name:
                p.normal_(0, 0.1)
            elif p.dim() == 1:  # e.g. gpt-oss sinks, doge A, ...
                p.normal_(0, 0.5)
    model.generation_config.eos_token_id = None
    nparams = sum(p.numel() for p in model.parameters())
    assert nparams < 3_000_000, f"model not tiny: {nparams} params"
    return model


def run_one(family: str, attn: str) -> dict:
    import torch
    import sqz_compile
    from sqz_compile import SqueezeConfig

    torch.set_num_threads(1)
    rec = {"family": family, "impl": attn}
    t0 = time.perf_counter()
    try:
        model = build(family, attn)
    except Exception as e:  # noqa: BLE001
        rec.update(status="build-failed", detail=f"{type(e).__name__}: {str(e)[:200]}")
        return rec
    rec["model_type"] = model.config.model_type
    g = torch.Generator().manual_seed(1)
    ctx_ids = torch.randint(3, VOCAB, (1, L_CTX), generator=g)
    user = torch.randint(3, VOCAB, (1, N_USER), generator=g)
    with torch.no_grad():
        dense = model(torch.cat([ctx_ids, user], 1)).logits[0, L_CTX:].float()
    caught: list[str] = []
    stage = "squeeze"
    try:
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            ctx = sqz_compile.squeeze(model, ctx_ids, SqueezeConfig(keep=1.0, cluster_ratio=0.25,
                                                                    observation_window=8), progress=False)
            stage = "compile"
            torch._dynamo.reset()
            sm = sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(inductor=False))
            stage = "forward"
            got = sm(user, attention_mask=torch.ones_like(user)).logits[0].float()
        caught = [f"{w.category.__name__}: {str(w.message)[:160]}" for w in ws
                  if "sqz" in str(w.message) or w.category.__name__ == "SqueezeDenseWarning"]
        rep = sm.report
        rec["rewritten"] = rep.layers
        rec["dense_layers"] = [(l, r[:120]) for l, r in rep.dense]
        d = (got - dense).abs().max().item()
        rec["max_abs_diff"] = d
        rec["dense_logit_scale"] = dense.abs().max().item()
        rec["status"] = "exact" if d < 1e-4 else "DIFFERS"
    except Exception as e:  # noqa: BLE001
        from sqz_compile.models import UnsupportedModelError
        refused = isinstance(e, (UnsupportedModelError,)) or (stage == "squeeze" and isinstance(e, ValueError))
        rec["status"] = "refused" if refused else f"crashed({stage})"
        rec["detail"] = f"{type(e).__name__}: {str(e)[:300]}"
        if not refused:
            rec["tb"] = traceback.format_exc()[-1500:]
    rec["warnings"] = caught
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def main_one(family: str) -> None:
    for attn in ("sdpa", "eager"):
        print("RESULT " + json.dumps(run_one(family, attn)), flush=True)


def fmt_row(r: dict) -> str:
    st = r.get("status", "?")
    if st == "exact":
        res = f"exact ({r['max_abs_diff']:.1e})"
    elif st == "DIFFERS":
        res = f"**DIFFERS** {r['max_abs_diff']:.3g}"
    else:
        res = st
    det = r.get("detail", "")
    if r.get("dense_layers"):
        det = (det + " dense: " + "; ".join(f"L{l}: {why}" for l, why in r["dense_layers"][:2])).strip()
    ws = [w for w in r.get("warnings", []) if "not in the tested set" not in w]
    if ws and st in ("DIFFERS", "exact"):
        det = (det + " warn: " + ws[0][:100]).strip()
    det = det.replace("|", "/").replace("\n", " ")[:230]
    return f"| {r['family']} | {r['impl']} | {res} | {det} |"


def main(families: list[str]) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for fam in families:
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, __file__, "--one", fam], capture_output=True, text=True,
                               timeout=300, env=env, cwd=here)
            rows = [json.loads(l[7:]) for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if not rows:
                rows = [{"family": fam, "impl": "-", "status": "crashed(process)",
                         "detail": p.stderr.strip().splitlines()[-1][:300] if p.stderr.strip() else f"rc={p.returncode}"}]
        except subprocess.TimeoutExpired:
            rows = [{"family": fam, "impl": "-", "status": "crashed(timeout)"}]
        for r in rows:
            print(fmt_row(r), f"[{time.perf_counter() - t:.0f}s]", flush=True)
        results += rows
        with open(os.path.join(here, "sweep.json"), "w") as f:
            json.dump(results, f, indent=1)
    merge_path = os.path.join(here, "sweep_pass1.json")   # merge with an earlier pass, new rows win
    if os.path.exists(merge_path) and set(families) != set(FAMILIES):
        done = {r["family"] for r in results}
        old = [r for r in json.load(open(merge_path)) if r["family"] not in done]
        order = {f: i for i, f in enumerate(FAMILIES)}
        results = sorted(old + results, key=lambda r: order.get(r["family"], 999))
        with open(os.path.join(here, "sweep.json"), "w") as f:
            json.dump(results, f, indent=1)
    lines = ["| family | impl | result (max abs dlogit) | detail |", "|---|---|---|---|"]
    lines += [fmt_row(r) for r in results]
    with open(os.path.join(here, "sweep.md"), "w") as f:
        f.write(f"# sqz_compile keep=1.0 vs dense, tiny random models (ctx {L_CTX}, W=8, {N_USER} user tokens)\n\n")
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        main_one(sys.argv[2])
    else:
        main(sys.argv[1:] or list(FAMILIES))
