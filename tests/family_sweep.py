"""The family sweep's cases and runner (tests/test_family_sweep.py; benchmarks/family_sweep/sweep.py
writes its table).

Every transformers decoder family that builds tiny on CPU (2 layers, hidden 64, random weights,
1-D weights perturbed so that norms and biases matter), squeezed at keep = 1 over a 40-token
context and compiled (inductor=False), must either reproduce the dense model over [context + user
tokens] within float32 tolerance or be refused by `squeeze` (UnsupportedModelError) with a reason.
`EXPECTED` pins which: a family that flips is a regression either way.
"""
from __future__ import annotations

import time
import warnings

import torch

L_CTX, N_USER, VOCAB, WINDOW = 40, 7, 128, 8
ATOL = 1e-4   # max |squeezed - dense| logit; exact runs measure ~1e-7
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
MOE = dict(num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
           moe_intermediate_size=32, shared_expert_intermediate_size=32, n_shared_experts=1)
FULL = dict(layer_types=["full_attention"] * 2)
NO_HEAD_DIM = dict(_drop=["head_dim"])   # configs that derive head_dim (or refuse it as a kwarg)
MLA = dict(MOE, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
           first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4, **NO_HEAD_DIM)
LLAMA4 = dict(MOE, intermediate_size_mlp=128, attention_chunk_size=256)

# case -> (model_type, config overrides). "family:variant" names a non-default configuration.
CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral:sliding_window=16": ("mistral", dict(sliding_window=16)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {}),
    "phi3:partial_rotary": ("phi3", dict(partial_rotary_factor=0.5)),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),
    "gemma2:no_softcap,full": ("gemma2", dict(FULL, attn_logit_softcapping=None, final_logit_softcapping=None)),
    "gemma3_text": ("gemma3_text", {}),
    "gemma3_text:full": ("gemma3_text", FULL),
    "cohere": ("cohere", {}),
    "cohere2": ("cohere2", {}),
    "cohere2:full": ("cohere2", FULL),
    "granite": ("granite", dict(attention_multiplier=0.5, embedding_multiplier=2.0, residual_multiplier=0.5,
                                logits_scaling=2.0)),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "olmo3": ("olmo3", {}),
    "olmo3:full": ("olmo3", FULL),
    "stablelm": ("stablelm", {}),
    "falcon": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, **NO_HEAD_DIM)),
    "falcon:alibi": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, alibi=True, **NO_HEAD_DIM)),
    "persimmon": ("persimmon", {}),
    "phi": ("phi", {}),
    "gpt_neox": ("gpt_neox", {}),
    "starcoder2": ("starcoder2", dict(sliding_window=None)),
    "smollm3": ("smollm3", {}),
    "glm": ("glm", {}),
    "glm4": ("glm4", {}),
    "helium": ("helium", {}),
    "arcee": ("arcee", {}),
    "ministral": ("ministral", {}),
    "ministral:full": ("ministral", FULL),
    "seed_oss": ("seed_oss", {}),
    "exaone4": ("exaone4", {}),
    "exaone4:full": ("exaone4", FULL),
    "hunyuan_v1_dense": ("hunyuan_v1_dense", {}),
    "ernie4_5": ("ernie4_5", {}),
    "nemotron": ("nemotron", {}),
    "apertus": ("apertus", {}),
    "jais2": ("jais2", {}),
    "doge": ("doge", {}),
    "gptj": ("gptj", dict(rotary_dim=8, **NO_HEAD_DIM)),
    "lfm2": ("lfm2", {}),
    "lfm2:conv+attn": ("lfm2", dict(layer_types=["conv", "full_attention"])),
    "mixtral": ("mixtral", dict(MOE, sliding_window=None)),
    "qwen2_moe": ("qwen2_moe", MOE),
    "qwen3_moe": ("qwen3_moe", MOE),
    "olmoe": ("olmoe", MOE),
    "phimoe": ("phimoe", dict(MOE, sliding_window=None)),
    "dots1": ("dots1", MOE),
    "gpt_oss": ("gpt_oss", MOE),
    "gpt_oss:full": ("gpt_oss", dict(MOE, **FULL)),
    "deepseek_v3": ("deepseek_v3", MLA),
    "llama4_text": ("llama4_text", dict(LLAMA4, no_rope_layers=[1, 1])),
    "llama4_text:nope": ("llama4_text", dict(LLAMA4, no_rope_layers=[1, 0], floor_scale=16)),
    "qwen3_next": ("qwen3_next", dict(MOE, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
                                      linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"])),
    "qwen3_next:full": ("qwen3_next", dict(MOE, **FULL, linear_num_value_heads=2, linear_num_key_heads=2,
                                           linear_key_head_dim=8, linear_value_head_dim=8)),
}

# case -> a phrase the refusal must contain (both attention implementations); absent: exact.
EXPECTED_REFUSAL = {
    "mistral:sliding_window=16": "model.config.sliding_window = None",
    "gemma2": "soft-capping",
    "gemma3_text": 'layer_types = ["full_attention"] * 2',
    "cohere2": 'layer_types = ["full_attention"] * 2',
    "olmo3": 'layer_types = ["full_attention"] * 2',
    "ministral": 'layer_types = ["full_attention"] * 2',
    "exaone4": 'layer_types = ["full_attention"] * 2',
    "falcon:alibi": "ALiBi",
    "hunyuan_v1_dense": "after RoPE",
    "doge": "dynamic attention mask",
    "gptj": "no rotary position embedding",
    "lfm2:conv+attn": "keep state over the context",
    "qwen3_next": "keep state over the context",
    "gpt_oss": "attention sinks",
    "gpt_oss:full": "attention sinks",
    "deepseek_v3": "head dim",
    "llama4_text:nope": "attn_temperature_tuning",
}

class NotBuildable(Exception):
    """transformers itself cannot build this case (e.g. no SDPA path for the family)."""


def build(case: str, attn: str, seed: int = 0) -> torch.nn.Module:
    """The case's tiny random-weight causal LM in eval mode (float32, CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, over = CASES[case]
    kw = {**BASE, **over}
    for k in kw.pop("_drop", []):
        kw.pop(k, None)
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    except ValueError as e:   # "does not support an attention implementation through ... sdpa"
        raise NotBuildable(str(e).split(". ")[0]) from e
    with torch.no_grad():     # families that init norms to ones, biases/sinks to zeros: make them matter
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln" in name):
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0, 0.3)
    model.generation_config.eos_token_id = None
    return model


def run_case(case: str, attn: str) -> dict:
    """{"case", "impl", "status": exact | refused | DIFFERS | n/a, "detail", "max_abs_diff", "seconds"}.
    Errors other than a refusal propagate (a crash is a failure, not a row)."""
    import sqz_compile
    from sqz_compile import SqueezeConfig
    from sqz_compile.transformers_compat import UnsupportedModelError

    row = {"case": case, "impl": attn, "detail": "", "max_abs_diff": None}
    t0 = time.perf_counter()
    try:
        model = build(case, attn)
    except NotBuildable as e:
        return dict(row, status="n/a", detail=f"transformers: {e}", seconds=0.0)
    g = torch.Generator().manual_seed(1)
    ctx_ids = torch.randint(3, VOCAB, (1, L_CTX), generator=g)
    user = torch.randint(3, VOCAB, (1, N_USER), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the not-in-the-sweep note for families outside KNOWN_GOOD
        try:
            ctx = sqz_compile.squeeze(model, ctx_ids, SqueezeConfig(keep=1.0, cluster_ratio=0.25, dense_tokens=2,
                                                                    observation_window=WINDOW), progress=False)
        except UnsupportedModelError as e:
            return dict(row, status="refused", detail=str(e), seconds=time.perf_counter() - t0)
        with torch.no_grad():
            dense = model(torch.cat([ctx_ids, user], 1)).logits[0, L_CTX:].float()
        torch._dynamo.reset()
        sm = sqz_compile.compile(model, ctx, inductor=False)
        got = sm(user, attention_mask=torch.ones_like(user)).logits[0].float()
        torch._dynamo.reset()
    diff = (got - dense).abs().max().item()
    dense_layers = [f"layer {layer}: {why}" for layer, why in sm.report.dense]
    status = "exact" if diff <= ATOL and not dense_layers else "DIFFERS"
    return dict(row, status=status, detail="; ".join(dense_layers), max_abs_diff=diff,
                seconds=time.perf_counter() - t0)


def markdown_table(rows: list[dict]) -> str:
    """family x implementation -> exact (max |dlogit|) / refused (why) / n/a."""
    def cell(r: dict) -> str:
        if r["status"] == "exact":
            return f"exact ({r['max_abs_diff']:.1e})"
        if r["status"] == "DIFFERS":
            return f"**DIFFERS** ({r['max_abs_diff']:.3g}) {r['detail']}"
        if r["status"] == "refused":
            why = r["detail"].split("cannot be squeezed: ", 1)[-1]
            return f"refused: {why}".replace("|", "/")
        return r["status"] + f" ({r['detail']})"

    by_case: dict[str, dict[str, str]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["impl"]] = cell(r)
    lines = ["| case | sdpa | eager |", "|---|---|---|"]
    for case, cells in by_case.items():
        sdpa, eager = cells.get("sdpa", "-"), cells.get("eager", "-")
        if sdpa == eager and sdpa.startswith("refused"):
            eager = "same"
        lines.append(f"| {case} | {sdpa} | {eager} |")
    return "\n".join(lines)
