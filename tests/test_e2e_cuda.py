"""End to end on CUDA: models compiled with sqz_compile.compile call the sqz ops from Inductor's
code (opaque: the context is a graph input, backend.py `_opaque_ops`; tests/test_reduce_overhead.py
covers the kernels inlined), under CUDA graphs too, and match dense attention at keep = 1."""
from __future__ import annotations

import pytest
import torch

from fixtures import tiny_context, tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_backend_on_cuda_runs_sqz_kernels(mode):
    from torch._inductor.utils import run_and_get_code

    import sqz_compile

    torch._dynamo.reset()
    cpu_model = tiny_model("llama", kv_heads=2, layers=2, max_position_embeddings=1024)
    model = cpu_model.to("cuda", torch.bfloat16)
    ctx_ids, ctx = tiny_context(model, length=300, keep=1.0, cluster_ratio=0.05)
    # prefill_inductor: this 37-token forward is compiled (by default prompts run untraced)
    sm = sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(mode=mode, prefill_inductor=True))
    ids = torch.randint(3, 128, (2, 37), device="cuda")
    out, codes = run_and_get_code(lambda: sm(ids).logits.clone())  # clone: CUDA-graph outputs are reused
    code = "\n".join(codes)
    assert "torch.ops.sqz.squeezed_attention.default" in code, "Inductor's code does not call the sqz op"
    with torch.no_grad():
        for r in range(ids.shape[0]):
            full = torch.cat([ctx_ids.cuda()[0], ids[r]])[None]
            dense = model(full).logits[0, ctx_ids.shape[1]:].float()
            err = (out[r].float() - dense).norm() / dense.norm()
            assert err < 2e-2, f"row {r}: rel err {err:.3g} vs dense at keep=1"
    again = sm(ids).logits  # a replay (CUDA graph under reduce-overhead) gives the same logits
    assert torch.allclose(again.float(), out.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.slow
def test_real_model_on_cuda_keep1_matches_dense_and_finds_needle():
    import sqz_compile
    from sqz_compile import SqueezeConfig, assets

    try:
        model, tok = assets.load_smollm2(dtype=torch.float32, device="cuda")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"real model not installed: {e}")
    essay = assets.essay_tokens(tok, 2000)[0]
    needle = torch.tensor(tok.encode(" The secret code of the blue door is 7294. ", add_special_tokens=False))
    chat = tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False,
                                   add_generation_prompt=True)
    head, tail = chat.split("\x00")
    half = essay.shape[0] // 2
    ctx_ids = torch.cat([torch.tensor(tok.encode(head, add_special_tokens=False)), essay[:half], needle,
                         essay[half:]])[None].cuda()
    q = torch.tensor(tok.encode("\n\nWhat is the secret code of the blue door?" + tail,
                                add_special_tokens=False))[None].cuda()
    full = torch.cat([ctx_ids, q], dim=1)
    gen = dict(max_new_tokens=16, do_sample=False)
    with torch.no_grad():
        dense = model.generate(full, attention_mask=torch.ones_like(full), **gen)[0, full.shape[1]:]
    assert "7294" in tok.decode(dense)
    # 25% clusters: with the default 5% SmolLM2 misses this needle at keep = 1/8 (see README, limits)
    ctx = sqz_compile.squeeze(model, ctx_ids, SqueezeConfig(keep=1.0, cluster_ratio=0.25), progress=False)
    torch._dynamo.reset()
    out = sqz_compile.compile(model, ctx).generate(q, attention_mask=torch.ones_like(q), **gen)
    assert torch.equal(out[0, q.shape[1]:], dense), (tok.decode(out[0, q.shape[1]:]), tok.decode(dense))
    lead = torch.tensor(tok.encode("The secret code of the blue door is", add_special_tokens=False))[None]
    primed = torch.cat([q, lead.cuda()], dim=1)
    torch._dynamo.reset()
    out = sqz_compile.compile(model, ctx.with_keep(1 / 8)).generate(
        primed, attention_mask=torch.ones_like(primed), **gen)[0, primed.shape[1]:]
    assert "7294" in tok.decode(out), f"keep=1/8: {tok.decode(out)!r}"
