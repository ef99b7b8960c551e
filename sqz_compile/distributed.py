"""Tensor parallelism: the squeezed context sharded by KV head, the way transformers shards attention.

    torchrun --nproc_per_node 2 script.py    # model = from_pretrained(path, tp_plan="auto")
    ctx = sqz_compile.squeeze(model, ids)      # each rank clusters only its own KV heads
    ctx.save("doc.sqz")                        # collective: rank 0 writes ONE file (all heads)
    ctx = SqueezedContext.load("doc.sqz", model)   # each rank reads only its heads' slice
    sm = sqz_compile.compile(model, ctx)       # the pass rewrites each rank's local attention

transformers' tensor parallelism (`tp_plan="auto"`, DTensor on a DeviceMesh) shards k_proj / v_proj
(and q_proj) column-wise in equal pieces, so rank r of a tp-sized mesh computes KV heads
[r*H/tp, (r+1)*H/tp) and their query heads; o_proj's all-reduce combines the ranks. The lookup and
the sparse attention are per KV head, so a rank needs only its heads' slice of the context: every
head-indexed context tensor (dim 1) is cut into tp equal pieces and rank r keeps piece r. Nothing
is communicated at run time beyond what transformers already does.

Collectives (over the TP mesh's process group, gloo or NCCL), all offline: calibration gathers the
small per-head tensors (centroids, offsets, window queries) so that every rank uses the same global
threshold as a single-process squeeze; `save` gathers the slices to rank 0, which writes the file.
K-means runs per rank on its own heads, so a context squeezed under TP is a valid squeeze of the
model but not bit-identical to a single-process one (the K-means random draws depend on the batch
of heads); a file squeezed in one process and loaded under TP gives the same logits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .transformers_compat import UnsupportedModelError

# context fields indexed by layer only: the same on every rank
# per layer, not per KV head: every rank holds them whole (low-bit context: RoPE table, codebooks)
REPLICATED = ("log_threshold", "coarse_log_threshold", "rope", "codebooks")


class ShardMismatchError(ValueError):
    """A context (or file) does not fit this rank's tensor-parallel shard of the model."""


@dataclass(frozen=True)
class KVShard:
    """This rank's piece of the KV heads: piece `rank` of `world_size` equal pieces of
    `num_kv_heads`, over the TP mesh's process group."""

    rank: int
    world_size: int
    num_kv_heads: int
    group: Any = field(default=None, compare=False, repr=False)

    def span(self, size: int) -> slice:
        """This rank's piece of a head dimension of `size` (KV heads, or their query heads)."""
        step = size // self.world_size
        return slice(self.rank * step, (self.rank + 1) * step)

    def take(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of context field `name` (a view; replicated fields whole)."""
        return t if name in REPLICATED else t[:, self.span(t.shape[1])]

    def read(self, f: Any, name: str) -> torch.Tensor:
        """This rank's slice of field `name` read from an open safetensors file (only those bytes)."""
        sl = f.get_slice(name)
        if name in REPLICATED:
            return sl[:]
        return sl[:, self.span(sl.get_shape()[1])]


def check_tp_size(num_kv_heads: int, tp_size: int) -> None:
    """Refuse a tensor-parallel size that does not split the KV heads into whole, equal pieces."""
    if tp_size > num_kv_heads or num_kv_heads % tp_size:
        ok = [d for d in range(1, num_kv_heads + 1) if num_kv_heads % d == 0]
        raise UnsupportedModelError(
            f"tensor parallel size {tp_size} does not divide the model's {num_kv_heads} KV heads: sqz_compile "
            f"shards the squeezed context by KV head, so every rank must hold whole KV heads, the same number "
            f"each (replicating KV heads is not supported); run with a tp size in {ok}")


def _key_weight(model: torch.nn.Module) -> torch.Tensor | None:
    for name, mod in model.named_modules():
        if name.endswith("k_proj") and isinstance(getattr(mod, "weight", None), torch.Tensor):
            return mod.weight
    return None


def kv_shard(model: torch.nn.Module) -> KVShard | None:
    """This rank's KVShard of a transformers tensor-parallel model (its k_proj weights are DTensors
    sharded on the output dim), or None for a model whose KV heads are not sharded. Raises
    UnsupportedModelError for a tp size that does not divide the KV heads or a mesh other than 1-D."""
    from .transformers_compat import model_config, num_kv_heads

    w = _key_weight(model)
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without distributed
        return None
    if not isinstance(w, DTensor):
        return None
    mesh, placements = w.device_mesh, w.placements
    if not any(isinstance(p, Shard) and p.dim == 0 for p in placements):
        return None  # KV heads replicated: every rank holds all of them
    if mesh.mesh_dim_names is not None and "tp" not in mesh.mesh_dim_names:
        return None  # sharded for storage only (FSDP): gathered whole before the attention runs
    if mesh.ndim != 1:
        raise UnsupportedModelError(
            f"k_proj is sharded over a {mesh.ndim}-D device mesh {placements}: sqz_compile supports tensor "
            f"parallelism over a 1-D mesh (tp_plan='auto' without FSDP or pipeline parallelism)")
    heads = num_kv_heads(model_config(model))
    check_tp_size(heads, mesh.size())
    return KVShard(mesh.get_local_rank(), mesh.size(), heads, mesh.get_group())


def weight_for_digest(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly DTensor) parameter, so a sharded model fingerprints like
    the unsharded one (a collective for sharded DTensors: every rank must call it)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


# --------------------------------------------------------------------------- contexts

def local_context(ctx: Any, model: torch.nn.Module) -> Any:
    """The context `model` (on this rank) attends with: `ctx` itself for an unsharded model or a
    matching shard; this rank's slice (views, no copy) of a whole context on a tensor-parallel
    model. ShardMismatchError otherwise."""
    shard = kv_shard(model)
    if shard is None:
        if ctx.shard is not None:
            raise ShardMismatchError(
                f"this context holds KV heads {_heads(ctx.shard)} of {ctx.shard.num_kv_heads} (rank {ctx.shard.rank} "
                f"of a tensor-parallel run) but the model is not tensor-parallel: load the saved file "
                f"(SqueezedContext.load) for the whole model")
        return ctx
    if ctx.shard is None:
        return shard_context(ctx, shard)
    if ctx.shard != shard:
        raise ShardMismatchError(
            f"this context holds KV heads {_heads(ctx.shard)} of {ctx.shard.num_kv_heads} (rank {ctx.shard.rank} of "
            f"{ctx.shard.world_size}) but this rank of the model holds {_heads(shard)} of {shard.num_kv_heads} "
            f"(rank {shard.rank} of {shard.world_size}): squeeze or load the context with this model")
    return ctx


def _heads(shard: KVShard) -> str:
    s = shard.span(shard.num_kv_heads)
    return f"{s.start}..{s.stop - 1}"


def shard_context(ctx: Any, shard: KVShard) -> Any:
    """This rank's slice of a whole context (views)."""
    import dataclasses

    if ctx.num_kv_heads != shard.num_kv_heads:
        raise ShardMismatchError(
            f"the context has {ctx.num_kv_heads} KV heads, the tensor-parallel model {shard.num_kv_heads}: "
            f"it was made for another model")
    cut = {n: shard.take(n, t) for n, t in ctx.tensors().items()}
    return dataclasses.replace(ctx, **cut, shard=shard, fingerprint=dict(ctx.fingerprint), extra=dict(ctx.extra))


def _gather(t: torch.Tensor, shard: KVShard, everywhere: bool) -> torch.Tensor | None:
    """The pieces of a head-sharded tensor [layers, h, ...] joined on dim 1, on every rank
    (`everywhere`) or on rank 0 only (None elsewhere)."""
    import torch.distributed as dist

    t = t.contiguous()
    if everywhere:
        parts = [torch.empty_like(t) for _ in range(shard.world_size)]
        dist.all_gather(parts, t, group=shard.group)
    else:
        parts = [torch.empty_like(t) for _ in range(shard.world_size)] if shard.rank == 0 else None
        dist.gather(t, parts, dst=dist.get_global_rank(shard.group, 0), group=shard.group)
    return None if parts is None else torch.cat(parts, dim=1)


def gather_fields(ctx: Any, names: tuple[str, ...]) -> dict[str, torch.Tensor | None]:
    """The named fields of a sharded context with every rank's heads, on every rank (collective)."""
    return {n: None if getattr(ctx, n) is None else _gather(getattr(ctx, n), ctx.shard, True) for n in names}


def save_sharded(ctx: Any, path: str | os.PathLike) -> None:
    """Write a sharded context as ONE file of the whole context (collective): the slices are
    gathered to rank 0 one layer at a time and moved to CPU, rank 0 writes, every rank waits."""
    import dataclasses

    import torch.distributed as dist

    shard = ctx.shard
    whole = {}
    for n, t in ctx.tensors().items():
        if n in REPLICATED:
            whole[n] = t.detach().cpu()
            continue
        layers = []
        for i in range(t.shape[0]):  # one layer at a time: rank 0 never holds all heads on the device
            layer = _gather(t[i:i + 1], shard, everywhere=False)
            if layer is not None:
                layers.append(layer.cpu())
        whole[n] = torch.cat(layers) if layers else None
    if shard.rank == 0:
        full = dataclasses.replace(ctx, **whole, shard=None, fingerprint=dict(ctx.fingerprint), extra=dict(ctx.extra))
        full.validate()
        if dist.get_rank() == 0:  # one writer even when several TP groups (data parallel) exist
            full.save(path)
    dist.barrier()


__all__ = ["KVShard", "ShardMismatchError", "check_tp_size", "kv_shard", "local_context", "shard_context",
           "gather_fields", "save_sharded"]
