"""The ONNX translations of torch.ops.sqz against the ops themselves (onnxruntime, no custom ops),
and the ONNX export of a whole squeezed model at two lengths from one file."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from torch.export import Dim

import sqz_compile
from sqz_compile.export.onnx import export_program_onnx, translation_table
from sqz_compile.kernels.lookup.reference import select_clusters_reference

from fixtures import CONTEXT_ARGS, DirectSqz, export_context, tiny_llama, user_ids

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def contexts(model):
    return {
        "threshold": export_context(model),
        "budget": export_context(model, budget=40),
        "hierarchical": export_context(model, hierarchical=True, coarse_ratio=0.03),
        "hierarchical_budget": export_context(model, hierarchical=True, coarse_ratio=0.03, budget=60),
    }


class AttentionOnly(torch.nn.Module):
    """q, k, v -> torch.ops.sqz.squeezed_attention over one context layer (buffers)."""

    def __init__(self, ctx, mask: str, block_q: int) -> None:
        super().__init__()
        self.mask, self.block_q, self.budget, self.scale = mask, block_q, ctx.budget, ctx.scaling
        for name, t in zip(CONTEXT_ARGS, ctx.layer(1)):
            if t is not None:
                self.register_buffer(name, t.clone())

    def forward(self, q, k, v):
        m = q.shape[2]
        mask = None
        if self.mask == "bool":  # causal plus a padded-out first key in batch row 0
            allowed = torch.ones(m, m, dtype=torch.bool).tril()[None, None].repeat(q.shape[0], 1, 1, 1)
            allowed[0, :, 1:, 0] = False
            mask = allowed
        elif self.mask == "float":
            mask = torch.zeros(m, m).masked_fill(~torch.ones(m, m, dtype=torch.bool).tril(), float("-inf"))
        ctx = [getattr(self, n, None) for n in CONTEXT_ARGS]
        return torch.ops.sqz.squeezed_attention(q, k, v, mask, *ctx, self.scale, self.mask == "causal",
                                                self.budget, self.block_q)


class SelectOnly(torch.nn.Module):
    def __init__(self, ctx, block_q: int) -> None:
        super().__init__()
        self.block_q, self.budget, self.scale = block_q, ctx.budget, ctx.scaling
        for name, t in zip(CONTEXT_ARGS, ctx.layer(0)):
            if t is not None and name not in ("keys", "values", "window_keys", "window_values"):
                self.register_buffer(name, t.clone())

    def forward(self, q):
        g = lambda n: getattr(self, n, None)  # noqa: E731
        return torch.ops.sqz.select_clusters(q, g("centroids"), g("offsets"), g("log_threshold"),
                                             g("coarse_centroids"), g("coarse_offsets"),
                                             g("coarse_log_threshold"), self.scale, self.block_q, self.budget)


def _qkv(ctx, b: int, m: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hq, h, d = ctx.window_queries.shape[1], ctx.num_kv_heads, ctx.head_dim
    # Queries at the scale of real ones (the window's) so the lookup is selective.
    q = torch.randn(b, hq, m, d, generator=gen) * ctx.window_queries.std() * 2
    k = torch.randn(b, h, m, d, generator=gen) * ctx.keys.std()
    v = torch.randn(b, h, m, d, generator=gen)
    return q, k, v


def _to_onnx(module, example, dynamic, path):
    prog = torch.onnx.export(module, example, dynamo=True, opset_version=18, dynamic_shapes=dynamic,
                             custom_translation_table=translation_table(), optimize=True)
    prog.save(path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kind,mask", [("threshold", "causal"), ("threshold", "none"), ("budget", "bool"),
                                       ("hierarchical", "float"), ("hierarchical_budget", "causal")])
def test_attention_translation_matches_op(contexts, kind, mask, tmp_path):
    ctx = contexts[kind]
    mod = AttentionOnly(ctx, mask, block_q=8).eval()
    b, m = Dim("b", min=1), Dim("m", min=1, max=512)
    dyn = ({0: b, 2: m}, {0: b, 2: m}, {0: b, 2: m})
    sess = _to_onnx(mod, _qkv(ctx, 2, 12, 0), dyn, str(tmp_path / "attn.onnx"))
    fractions = []
    for i, (bb, mm) in enumerate([(2, 12), (3, 21), (1, 8), (1, 1), (2, 40)]):
        q, k, v = _qkv(ctx, bb, mm, i + 1)
        want = mod(q, k, v)
        got = sess.run(None, {n.name: t.numpy() for n, t in zip(sess.get_inputs(), (q, k, v))})[0]
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"{kind} {mask} {bb}x{mm}")
        _, count = select_clusters_reference(q, ctx.centroids[1], ctx.offsets[1], ctx.log_threshold[1],
                                             ctx.scaling, 8, ctx.budget, *_coarse(ctx, 1))
        fractions.append(count.float().mean().item() / ctx.num_clusters)
    # The comparison means something only if the lookup drops some clusters and keeps others.
    assert 0.0 < np.mean(fractions) < 1.0, fractions


def _coarse(ctx, i):
    if not ctx.hierarchical:
        return None, None, None
    return ctx.coarse_centroids[i], ctx.coarse_offsets[i], ctx.coarse_log_threshold[i]


@pytest.mark.parametrize("kind", ["threshold", "budget", "hierarchical"])
def test_select_clusters_translation_matches_op(contexts, kind, tmp_path):
    ctx = contexts[kind]
    mod = SelectOnly(ctx, block_q=4).eval()
    sess = _to_onnx(mod, (_qkv(ctx, 2, 9, 0)[0],), ({0: Dim("b", min=1), 2: Dim("m", min=1, max=512)},),
                    str(tmp_path / "sel.onnx"))
    for i, (bb, mm) in enumerate([(2, 9), (1, 3), (3, 17)]):
        q = _qkv(ctx, bb, mm, 10 + i)[0]
        idx, count = mod(q)
        got_idx, got_count = sess.run(None, {sess.get_inputs()[0].name: q.numpy()})
        np.testing.assert_array_equal(got_count, count.numpy())
        np.testing.assert_array_equal(got_idx, idx.numpy())


@pytest.mark.parametrize("mask", ["causal", "bool"])
def test_direct_module_onnx_two_lengths(model, mask, tmp_path):
    """A token model calling the op: ONNX file with dynamic batch and length."""
    from sqz_compile.export.program import export_module

    mod = DirectSqz(export_context(model), mask).eval()
    path = str(tmp_path / "direct.onnx")
    export_program_onnx(export_module(mod, user_ids(2, 10)), path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids"]
    for b, m in [(1, 7), (3, 33)]:
        ids = user_ids(b, m, seed=m)
        got = sess.run(None, {"input_ids": ids.numpy()})[0]
        np.testing.assert_allclose(got, mod(ids).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_translation_uses_standard_ops_only(model, tmp_path):
    from sqz_compile.export.program import export_module

    ctx = export_context(model, hierarchical=True, coarse_ratio=0.03, budget=50)
    path = str(tmp_path / "std.onnx")
    export_program_onnx(export_module(DirectSqz(ctx).eval(), user_ids(2, 10)), path)
    m = onnx.load(path)
    assert {o.domain for o in m.opset_import} <= {"", "ai.onnx"}
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}
    assert not m.functions  # everything inlined into plain ONNX nodes
    assert os.path.getsize(path) > 0


def test_tiny_llama_onnx_runs_in_onnxruntime_at_two_lengths(model, tmp_path):
    """sqz_compile.export_onnx on the tiny GQA Llama: one file, two (batch, length) shapes, loaded
    by onnxruntime in a fresh interpreter that never imports torch or sqz_compile."""
    from fixtures import assert_fresh_ok, squeezed_eager

    ctx = export_context(model)
    path = str(tmp_path / "tiny.onnx")
    sqz_compile.export_onnx(model, ctx, user_ids(2, 10), path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (proto.graph.input[0], proto.graph.output[0])]
    assert dims == [["batch", "seq"], ["batch", "seq", 128]], dims
    eager = squeezed_eager(model, ctx)
    cases = {}
    for b, m in [(1, 5), (3, 37)]:
        ids = user_ids(b, m, seed=m)
        with torch.no_grad():
            cases[f"{b}x{m}"] = (ids.numpy(), eager(ids).numpy())
    np.savez(tmp_path / "io.npz", **{f"{k}_in": v[0] for k, v in cases.items()},
             **{f"{k}_out": v[1] for k, v in cases.items()})
    out = assert_fresh_ok("""
        import sys
        import numpy as np, onnxruntime as ort
        sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
        io = np.load(sys.argv[2])
        for key in sorted(k[:-3] for k in io.files if k.endswith("_in")):
            got = sess.run(["logits"], {"input_ids": io[key + "_in"]})[0]
            np.testing.assert_allclose(got, io[key + "_out"], rtol=1e-4, atol=1e-4)
            print("ok", key)
        assert "torch" not in sys.modules and "sqz_compile" not in sys.modules
    """, path, str(tmp_path / "io.npz"))
    assert out.count("ok") == 2
