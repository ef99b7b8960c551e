"""torch.export of squeezed models: sqz nodes and context buffers in the program, dynamic batch and
length, save/load round trip in a fresh interpreter, and what a load without sqz_compile does."""
from __future__ import annotations

import pytest
import torch

import sqz_compile
from sqz_compile import CompileConfig
from sqz_compile.context import SqueezedContextError
from sqz_compile.export.program import (count_sqz_nodes, export, export_module, load_exported, read_package_note,
                                   save_exported)
from sqz_compile.passes import SqueezeDenseError, SqueezeDenseWarning

from fixtures import (DirectSqz, assert_fresh_ok, context_ids, dense_logits, run_fresh, squeezed_eager,
                             export_context, tiny_llama, tiny_model, user_ids)

LENGTHS = [(1, 5), (3, 37)]  # two (batch, length) pairs served by one artifact


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def direct(model):
    return DirectSqz(export_context(model)).eval()


@pytest.fixture(scope="module")
def direct_saved(direct, tmp_path_factory):
    folder = tmp_path_factory.mktemp("direct")
    ep = export_module(direct, user_ids(2, 10))
    path = str(folder / "direct.pt2")
    save_exported(ep, path)
    inputs = [user_ids(b, m, seed=m) for b, m in LENGTHS]
    with torch.no_grad():
        torch.save({"inputs": inputs, "outputs": [direct(x) for x in inputs]}, folder / "io.pt")
    return ep, path, str(folder / "io.pt")


def test_program_holds_sqz_op_and_context_buffers(direct_saved):
    ep, _, _ = direct_saved
    assert count_sqz_nodes(ep) == 1
    buffers = set(ep.graph_signature.buffers)
    assert {"keys", "values", "centroids", "offsets", "window_keys", "window_values", "log_threshold"} <= buffers
    dims = {str(s) for s in ep.range_constraints}
    assert len(dims) == 2, ep.range_constraints  # batch and length, both symbolic


def test_program_matches_module_at_two_lengths(direct, direct_saved):
    ep, _, _ = direct_saved
    for b, m in LENGTHS:
        ids = user_ids(b, m, seed=m)
        torch.testing.assert_close(ep.module()(ids), direct(ids), rtol=1e-5, atol=1e-5)


def test_saved_program_loads_in_fresh_process(direct_saved):
    _, path, io = direct_saved
    out = assert_fresh_ok("""
        import sys, torch, sqz_compile
        from sqz_compile.export.program import load_exported
        ep = load_exported(sys.argv[1])
        io = torch.load(sys.argv[2])
        for x, want in zip(io["inputs"], io["outputs"]):
            torch.testing.assert_close(ep.module()(x), want, rtol=1e-5, atol=1e-5)
        print("ok", len(io["inputs"]))
    """, path, io)
    assert "ok 2" in out


def test_plain_load_without_sqz_compile_names_the_missing_op(direct_saved):
    _, path, _ = direct_saved
    proc = run_fresh("""
        import sys, torch
        try:
            torch.export.load(sys.argv[1])
        except RuntimeError as e:
            print("failed:", e)
        assert "sqz_compile" not in sys.modules
    """, path)
    assert proc.returncode == 0, proc.stderr
    assert "failed: We ran into an error when deserializing" in proc.stdout
    assert "torch.ops.sqz.squeezed_attention" in proc.stderr  # torch logs the unresolved op
    # ... and importing sqz_compile first is all it takes.
    assert_fresh_ok("import sys, torch, sqz_compile; torch.export.load(sys.argv[1])", path)


def test_saved_program_carries_a_load_note(direct_saved):
    _, path, _ = direct_saved
    note = read_package_note(path)
    assert note["ops"] == ["sqz.squeezed_attention.default"]
    assert "import sqz_compile" in note["load"]


def test_load_exported_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no exported program"):
        load_exported(tmp_path / "missing.pt2")
    bad = tmp_path / "bad.pt2"
    bad.write_text("not a zip")
    with pytest.raises(ValueError, match="not a torch.export archive"):
        load_exported(bad)


def test_example_inputs_validation(direct):
    with pytest.raises(TypeError, match="token ids"):
        export_module(direct, torch.randn(2, 5))
    with pytest.raises(TypeError, match="token ids"):
        export_module(direct, user_ids(2, 5)[0])


def test_batch_one_example_still_gives_dynamic_program(direct):
    ep = export_module(direct, user_ids(1, 1))
    ids = user_ids(4, 9)
    torch.testing.assert_close(ep.module()(ids), direct(ids), rtol=1e-5, atol=1e-5)


def test_ops_are_registered_by_import():
    assert sqz_compile.ops is not None
    assert hasattr(torch.ops.sqz, "squeezed_attention")


# --------------------------------------------------------------------------- the tiny GQA Llama

@pytest.fixture(scope="module")
def squeezed(model):
    ctx = export_context(model)
    return ctx, export(model, ctx, user_ids(2, 10))


def test_export_rewrites_every_layer(squeezed):
    ctx, ep = squeezed
    assert count_sqz_nodes(ep) == ctx.num_layers == 2
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("scaled_dot_product" in t for t in targets), targets
    buffers = set(ep.graph_signature.buffers)
    for layer in range(ctx.num_layers):
        assert {f"sqz_L{layer}_keys", f"sqz_L{layer}_centroids", f"sqz_L{layer}_log_threshold"} <= buffers
    torch.testing.assert_close(ep.state_dict["sqz_L1_keys"], ctx.keys[1])


def test_export_matches_eager_squeezed_model_at_two_lengths(model, squeezed):
    ctx, ep = squeezed
    eager = squeezed_eager(model, ctx)
    for b, m in LENGTHS:
        ids = user_ids(b, m, seed=m)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(ids), eager(ids), rtol=1e-5, atol=1e-5)


def test_export_keep_all_equals_dense_model_over_the_full_prompt(model):
    """keep = 1 attends to every context key: the logits are those of the dense model run on
    context + user tokens (positions handled by the stored RoPE convention)."""
    ep = export(model, export_context(model, keep=1.0), user_ids(2, 10))
    for b, m in LENGTHS:
        ids = user_ids(b, m, seed=m)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(ids), dense_logits(model, context_ids(), ids),
                                       rtol=1e-4, atol=1e-4)


def test_export_sparse_selection_changes_the_answer(model, squeezed):
    _, ep = squeezed
    ids = user_ids(2, 16)
    with torch.no_grad():
        diff = (ep.module()(ids) - dense_logits(model, context_ids(), ids)).abs().max()
    assert 1e-4 < diff < 1.0, diff  # clusters were dropped, yet the model is close to dense


def test_exported_model_round_trip_in_fresh_process(squeezed, tmp_path):
    _, ep = squeezed
    path = save_exported(ep, tmp_path / "tiny.pt2")
    inputs = [user_ids(b, m, seed=m) for b, m in LENGTHS]
    with torch.no_grad():
        torch.save({"inputs": inputs, "outputs": [ep.module()(x) for x in inputs]}, tmp_path / "io.pt")
    out = assert_fresh_ok("""
        import sys, torch, sqz_compile
        ep = sqz_compile.load_exported(sys.argv[1])
        io = torch.load(sys.argv[2])
        for x, want in zip(io["inputs"], io["outputs"]):
            torch.testing.assert_close(ep.module()(x), want, rtol=1e-5, atol=1e-5)
        print("ok")
    """, path, str(tmp_path / "io.pt"))
    assert "ok" in out


def test_export_rejects_a_context_made_for_another_model(model):
    other = tiny_llama(seed=5)
    with pytest.raises(SqueezedContextError, match="made for another model"):
        export(other, export_context(model), user_ids(2, 4))


def test_program_refuses_inputs_past_the_models_positions(model, squeezed):
    ctx, ep = squeezed
    limit = model.config.max_position_embeddings - ctx.context_length
    assert {str(r.upper) for r in ep.range_constraints.values()} >= {str(limit)}
    with pytest.raises(Exception, match="(?i)range|bound|constraint|<= " + str(limit)):
        ep.module()(user_ids(1, limit + 1))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        export(model, ctx, user_ids(1, limit + 5))


# --------------------------------------------------------------------------- strict by default

def sliding_window_llama():
    """The export tests' model with a sliding window set after squeezing (squeeze refuses one)."""
    model = tiny_model("mistral", "sdpa", 2, max_position_embeddings=1024, pad_token_id=None)
    ctx = export_context(model)
    model.config.sliding_window = 16
    return model, ctx


def _export_onnx(model, ctx, ids, tmp_path, **kw):
    pytest.importorskip("onnxscript")
    return sqz_compile.export_onnx(model, ctx, ids, str(tmp_path / "m.onnx"), **kw)


VERBS = {
    "export": lambda model, ctx, ids, tmp_path, **kw: export(model, ctx, ids, **kw),
    "package": lambda model, ctx, ids, tmp_path, **kw: sqz_compile.package(model, ctx, ids,
                                                                           str(tmp_path / "m.pt2"), **kw),
    "export_onnx": _export_onnx,
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_sliding_window_model_is_refused_by_default_naming_the_layers(verb, tmp_path):
    """Left dense, those layers would ship the model without the context: an error up front
    (before any tracing or compiling), with the layers, the reason and the opt-out."""
    model, ctx = sliding_window_llama()
    with pytest.raises(SqueezeDenseError, match=r"layers 0-1: sliding window of 16 tokens.*"
                                                r"CompileConfig\(strict=False\)"):
        VERBS[verb](model, ctx, user_ids(2, 10), tmp_path)
    assert not list(tmp_path.iterdir()), "nothing may be written"


def test_export_opt_out_ships_the_dense_layers_with_one_warning():
    sw, ctx = sliding_window_llama()
    with pytest.warns(SqueezeDenseWarning, match="layers 0-1: sliding window of 16 tokens") as rec:
        ep = export(sw, ctx, user_ids(2, 10), config=CompileConfig(strict=False))
    assert len([w for w in rec if issubclass(w.category, SqueezeDenseWarning)]) == 1
    assert count_sqz_nodes(ep) == 0
    ids = user_ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids), sw(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_a_context_on_another_device_is_refused_not_moved(model, verb, tmp_path):
    """'meta' stands in for another device on a CPU-only machine: the message names both
    devices and the explicit fix."""
    ctx = export_context(model).to("meta")
    with pytest.raises(SqueezedContextError, match=r"runs on cpu but the context is on meta.*ctx = ctx.to\('cpu'\)"):
        VERBS[verb](model, ctx, user_ids(2, 10), tmp_path)
    assert not list(tmp_path.iterdir())


def test_loose_keyword_arguments_of_the_old_api_warn_and_still_work(model):
    ctx = export_context(model, keep=1.0)
    with pytest.warns(DeprecationWarning, match=r"\['block_q'\].*CompileConfig"):
        ep = export(model, ctx, user_ids(2, 10), block_q=8)
    assert count_sqz_nodes(ep) == ctx.num_layers
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['blockq'\\]"):
        export(model, ctx, user_ids(2, 10), blockq=8)
