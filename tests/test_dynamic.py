"""SqueezedModel with dynamic=True: the rewrite still sees a constant softmax scale (torch 2.13
traces floats symbolically under dynamic=True unless told otherwise) and rewrites every layer."""
from __future__ import annotations

import warnings

import torch

import sqz_compile
from fixtures import dense_full_rows, tiny_context, tiny_model
from sqz_compile.passes.rewrite import SqueezeDenseWarning


def test_dynamic_true_rewrites_every_layer_and_matches_dense():
    torch._dynamo.reset()
    model = tiny_model("llama", kv_heads=2, layers=2)
    ctx_ids, ctx = tiny_context(model, keep=1.0)
    sm = sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(inductor=False, dynamic=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SqueezeDenseWarning)
        for n in (5, 9):
            ids = torch.randint(3, 100, (1, n), generator=torch.Generator().manual_seed(n))
            got = sm(ids).logits[0]
            want = dense_full_rows(model, ctx_ids, ids, torch.ones_like(ids))[0]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert sm.report.layers == [0, 1] and not sm.report.dense
