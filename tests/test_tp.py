"""Tensor parallelism on CPU: 2 gloo ranks (torchrun) running a tiny Llama with 4 KV heads
through transformers' own TP (DistributedConfig(tp_plan="auto")), the context sharded by KV head.

The ranks (tests/tp_worker.py) load a context squeezed in this process (each reading its heads),
squeeze one themselves (each clustering its heads), save it as one file and load it back. Here
the sharded logits and greedy tokens are compared with the single-process squeezed model's.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sqz_compile
from sqz_compile import SqueezeConfig, SqueezedContext
from sqz_compile.distributed import KVShard, ShardMismatchError, check_tp_size, local_context, shard_context
from sqz_compile.transformers_compat import UnsupportedModelError

from fixtures import VOCAB, tiny_context, tiny_model

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(keep=0.5, cluster_ratio=0.25, observation_window=8, dense_tokens=2)
TP_CONFIG = dict(CONFIG, hierarchical=True, coarse_ratio=0.1)  # the ranks' own squeeze: coarse level too
TIMEOUT_S = 240


def _model(kv_heads: int = 4):
    return tiny_model(kv_heads=kv_heads, num_attention_heads=8, head_dim=8)


def _compiled(model, ctx: SqueezedContext):
    return sqz_compile.compile(model, ctx, sqz_compile.CompileConfig(inductor=False, dynamic=True))  # as tests/tp_worker.py


def _torchrun(*script_args: str) -> str:
    """Run a 2-rank script (tests/tp_worker.py FOLDER unless given) in its own process group; kill
    the whole group on timeout."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path,
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *script_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun timed out after {TIMEOUT_S} s:\n{out[-6000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    """(single-process results, rank results, folder) of one torchrun of the worker."""
    folder = tmp_path_factory.mktemp("tp")
    model = _model()
    model.save_pretrained(folder / "model")
    ids, ctx = tiny_context(model, **CONFIG)
    ctx.save(folder / "single.sqz")
    tiny_context(_model(kv_heads=2), **CONFIG)[1].save(folder / "other.sqz")
    query = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    spec = dict(context=ids, query=query, new_tokens=3, tp_config=TP_CONFIG)
    torch.save(spec, folder / "spec.pt")
    gen = _compiled(model, ctx).generate(query, max_new_tokens=spec["new_tokens"], do_sample=False,
                                         output_logits=True, return_dict_in_generate=True)
    _torchrun(str(ROOT / "tests" / "tp_worker.py"), str(folder))
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(2)]
    single = dict(model=model, ctx=ctx, tokens=gen.sequences, logits=torch.stack(gen.logits, 1), spec=spec)
    return single, ranks, folder


def test_sharded_model_matches_single_process(tp):
    """One file squeezed here, each rank loading its heads: greedy generate's tokens and the logits
    of every step equal this process's."""
    single, ranks, _ = tp
    for out in ranks:
        assert out["loaded_heads"] == 2 and out["load_paths_agree"]
        assert out["single_rewritten"] == [0, 1]
        torch.testing.assert_close(out["single_logits"], single["logits"], rtol=1e-5, atol=1e-5)
        assert torch.equal(out["single_tokens"], single["tokens"])


def test_squeeze_save_load_under_tp(tp):
    """Squeezed under TP and saved: one file of all heads, the single process's K/V, one global
    threshold; the ranks' logits over it equal this process's over the same file."""
    single, ranks, folder = tp
    whole = SqueezedContext.load(folder / "tp.sqz", single["model"])   # one file, all 4 KV heads
    assert whole.num_kv_heads == 4 and whole.shard is None
    # the keys and values the single process captures, per (layer, head, context position) (up to
    # rounding: under TP o_proj sums partial products across ranks)
    assert whole.context_length == single["ctx"].context_length
    for name in ("keys", "values"):
        torch.testing.assert_close(_by_position(whole, name), _by_position(single["ctx"], name), rtol=1e-5, atol=1e-5)
    # one global threshold over every rank's heads (fine and coarse), as one process calibrates the file
    again = whole.with_keep(TP_CONFIG["keep"])
    assert whole.hierarchical
    torch.testing.assert_close(again.log_threshold, whole.log_threshold)
    torch.testing.assert_close(again.coarse_log_threshold, whole.coarse_log_threshold)
    logits = _compiled(single["model"], whole)(single["spec"]["query"]).logits
    for out in ranks:
        assert out["squeezed_heads"] == 2 and out["roundtrip"] and out["tp_rewritten"] == [0, 1]
        torch.testing.assert_close(out["tp_logits"], logits, rtol=1e-5, atol=1e-5)


def test_file_for_other_heads_refused(tp):
    for out in tp[1]:
        assert "do not hold the tensor-parallel model's 4 KV heads" in out["other_error"]


def _by_position(ctx: SqueezedContext, name: str) -> torch.Tensor:
    """Field `name` ('keys' or 'values') of every context token, back in context order."""
    x = torch.cat([getattr(ctx, name), getattr(ctx, "window_" + name)], dim=2)
    pos = torch.cat([ctx.perm, ctx.window_positions], dim=2).long()
    return torch.empty_like(x).scatter_(2, pos.unsqueeze(-1).expand_as(x), x)


# ------------------------------------------------------------------ in-process checks of the rules

@pytest.mark.parametrize("tp_size", [3, 8])
def test_tp_size_must_divide_kv_heads(tp_size):
    with pytest.raises(UnsupportedModelError, match=f"tensor parallel size {tp_size} does not divide"):
        check_tp_size(4, tp_size)
    check_tp_size(4, 2)


def test_shard_rules_in_process():
    model = _model()
    _, ctx = tiny_context(model, **CONFIG)
    pieces = [shard_context(ctx, KVShard(r, 2, 4)) for r in range(2)]
    for r, piece in enumerate(pieces):
        piece.validate()                                   # fingerprint counts every rank's heads
        assert piece.num_kv_heads == 2 and piece.window_queries.shape[1] == 4
        assert torch.equal(piece.keys, ctx.keys[:, 2 * r:2 * r + 2])
        assert piece.to("cpu").shard == piece.shard
    assert torch.equal(torch.cat([p.window_queries for p in pieces], 1), ctx.window_queries)
    with pytest.raises(ShardMismatchError, match="not tensor-parallel"):
        local_context(pieces[0], model)                    # a shard on an unsharded model
    assert local_context(ctx, model) is ctx
    with pytest.raises(ShardMismatchError, match="2 KV heads, the tensor-parallel model 4"):
        shard_context(tiny_context(_model(kv_heads=2), **CONFIG)[1], KVShard(0, 2, 4))


def test_low_bit_context_shards_per_head_fields_and_keeps_per_layer_ones_whole():
    model = _model()
    _, ctx = tiny_context(model, **CONFIG, kv_bits=4)
    pieces = [shard_context(ctx, KVShard(r, 2, 4)) for r in range(2)]
    for r, piece in enumerate(pieces):
        piece.validate()
        assert torch.equal(piece.rope, ctx.rope) and torch.equal(piece.codebooks, ctx.codebooks)
        for name in ("keys", "perm", "key_norm", "value_norm"):
            assert torch.equal(getattr(piece, name), getattr(ctx, name)[:, 2 * r:2 * r + 2]), name


def test_bench_e2e_tp_rows(tmp_path):
    """benchmarks/bench_e2e.py --tp 2 (the multi-GPU issue's rows) on 2 gloo ranks: TP=1 rows on
    rank 0, TP=2 rows on both, and the TP=1 file loaded under TP giving TP=1's tokens and logits."""
    import json

    out = tmp_path / "out"
    _torchrun(str(ROOT / "benchmarks" / "bench_e2e.py"), "--tiny", "--device", "cpu", "--tp", "2",
              "--contexts", "256", "--batches", "1", "--new-tokens", "3", "--check-tokens", "4", "--reps", "1",
              "--model-dir", str(tmp_path / "model"), "--out", str(out))
    rows = json.loads((out / "bench_e2e_tp2.json").read_text())["rows"]
    assert [(r["tp"], r["context"], r["batch"]) for r in rows] == [(1, 256, 1), (2, 256, 1)]
    for r in rows:
        assert r["sqz"]["per_token_s"] > 0 and r["sqz"]["graphs_while_timing"] == 0
        assert r["dense_prefix"]["per_token_s"] > 0
    check = rows[1]["check"]
    assert check["tokens_equal"] and check["logits_ok"] and check["steps_compared"] == 4
    assert check["rel_logit_diff"] < 1e-4  # float32 on gloo: rounding of o_proj's all-reduce only
    assert check["dense"]["tokens_equal"] and check["dense"]["rel_logit_diff"] < 1e-4  # the dense floor
    assert "| 256 | 1 |" in (out / "bench_e2e_tp2.md").read_text().split("dense-prefix / sqz")[1]
