"""SmolLM2-135M-Instruct squeezed on ~1K tokens of essays, exported to ONNX: onnxruntime's greedy
tokens match the torch squeezed model's on three questions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

QUESTIONS = ["\n\nQuestion: What is the main topic of the text above?\nAnswer:",
             "\n\nQuestion: What advice does the author give?\nAnswer:",
             "\n\nQuestion: Who is the author talking about?\nAnswer:"]
STEPS = 3


@pytest.mark.slow
def test_smollm2_onnx_greedy_tokens_match_torch(tmp_path):
    import sqz_compile
    from sqz_compile import SqueezeConfig
    from sqz_compile.assets import essay_tokens, load_smollm2
    from sqz_compile.squeeze import squeeze

    from fixtures import squeezed_eager

    model, tok = load_smollm2()
    ctx = squeeze(model, essay_tokens(tok, 1024), SqueezeConfig(keep=0.25))
    asks = [tok(q, return_tensors="pt").input_ids for q in QUESTIONS]
    path = str(tmp_path / "smollm2_sqz.onnx")
    sqz_compile.export_onnx(model, ctx, asks[0], path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    eager = squeezed_eager(model, ctx)

    for ids in asks:
        torch_ids, onnx_ids = ids, ids.numpy()
        for _ in range(STEPS):
            with torch.no_grad():
                t_logits = eager(torch_ids)[:, -1]
            o_logits = sess.run(["logits"], {"input_ids": onnx_ids})[0][:, -1]
            np.testing.assert_allclose(o_logits, t_logits.numpy(), rtol=1e-3, atol=1e-3)
            torch_ids = torch.cat([torch_ids, t_logits.argmax(-1, keepdim=True)], dim=1)
            onnx_ids = np.concatenate([onnx_ids, o_logits.argmax(-1)[:, None]], axis=1)
        assert onnx_ids.tolist() == torch_ids.tolist(), (tok.decode(onnx_ids[0]), tok.decode(torch_ids[0]))
