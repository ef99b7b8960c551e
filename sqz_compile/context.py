"""SqueezedContext: the precomputed, cluster-sorted form of one fixed context for one model.

Layout (L = context length, W = observation window actually used, S = sink tokens, T = dense
tokens chosen from data per KV head, A = S + T + W always-attended keys, N = L - A clustered keys,
H = KV heads, Hq = query heads, D = head dim, C = fine clusters, Cc = coarse clusters; every
tensor is stacked over layers on dim 0):

  keys, values        [layers, H, N, D]  model dtype, post-RoPE, sorted by cluster per (layer, head)
  perm                [layers, H, N]     int32: context position (0..L-1) of each sorted key
  centroids           [layers, H, C, D]  float32: mean of the cluster's original (un-normalised) keys;
                      [layers, H, C, 2D] with config.cluster_variance: [mean, per-channel variance]
                                         (the lookup scores [q, s/2 q^2] against them)
                                         (a compiled graph of a half-precision model holds one
                                         cast copy in the keys' dtype: `layer(i, centroid_dtype)`)
  offsets             [layers, H, C+1]   int32: cluster c holds sorted keys offsets[c]:offsets[c+1]
  window_keys/values  [layers, H, A, D] model dtype: always attended: the first S context tokens
                                         (config.sink_tokens), the T tokens of this KV head the
                                         window attends to most (config.dense_tokens), the last W
  window_positions    [layers, H, A]     int32: their context positions (perm and these together
                                         are a permutation of 0..L-1 per layer and head)
  window_queries      [layers, Hq, W, D] float32: the last W tokens' queries (recalibration)
  log_threshold       [layers, 2]        float32: keep cluster c when its log share exceeds this
                                         (+inf keeps nothing, -inf keeps all: the first
                                         config.dense_layers layers); [:, 0] for decode
                                         (one query), [:, 1] for prefill (the max over a block of
                                         block_q queries), each calibrated at its own granularity
  coarse_centroids    [layers, H, Cc, D or 2D] float32 (hierarchical only; as centroids)
  coarse_offsets      [layers, H, Cc+1]  int32 over *fine cluster indices*: fine clusters are
                                         stored grouped by coarse parent
  coarse_log_threshold [layers, 2]       float32 (hierarchical only; decode, prefill)
  radii               [layers, H, C]     float32: max distance of a cluster's keys from its mean
                                         (the certified logit bound of config.max_dropped_mass;
                                         absent in format-2 files)

Low-bit contexts (config.kv_bits < 16, since format 4; squeeze/quantize.py), G = 2**kv_bits,
P = packed_words(D, kv_bits) (3 bits: two bit planes per row since format 5; format-4 3-bit files
are refused), E = outliers per row:
  keys, values        [layers, H, N, P]  int32: packed codes, same sorted layout (keys pre-RoPE)
  rope                [layers, D + 2]    float32: inv_freq per channel, attention scaling, L
                                         (a key at context position p is rotated by (p - L))
  codebooks           [layers, 2, G]     float32 levels in [-1, 1] (keys, values; with
                                         config.kv_qnorm within [-4, 4])
  key_norm            [layers, H, 2, D]  float32 per-channel (scale, offset): k = level*scale+offset
  value_norm          [layers, H, N, 2]  float16 per-token (scale, offset)
  outlier_idx/_val    [layers, H, N, 2, E] int16 channel / float16 value (keys, values): entries
                                         kept in float16 (absent when E = 0)

Positions: keys are rotated for positions p - L (relative to the end of the context), so the
user's tokens keep their natural positions 0, 1, ... RoPE depends only on relative position, so
this is the same as giving the user's tokens absolute positions L + i, and the model needs no
position offset anywhere (compile, export, generate and static caches work unchanged).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .config import SqueezeConfig

if TYPE_CHECKING:
    from .distributed import KVShard

FORMAT_VERSION = 5
# what each older format lacks, for the message that refuses it
_OLDER_FORMATS = {1: "format 1 has no data-chosen dense tokens and one threshold for decode and prefill"}
# older formats read by filling in config fields they predate (format 2: no cluster variances, no
# dense layers; its tensors are those of format 3 with those off)
_UPGRADES = {2: {"cluster_variance": False, "dense_layers": 0}, 3: {"kv_bits": 16}, 4: {}}
# (format, kv_bits) whose packed codes this version lays out differently: refused, since the
# tensor shapes alone may not tell (3 bits at head dim 80 took 8 words per row in both)
_OLD_PACKING = {(4, 3): "its 3-bit codes are packed 10 to a word, which this sqz_compile no longer reads "
                        "(3-bit codes are now stored as two bit planes)"}
FORMAT_NAME = "sqz_compile.SqueezedContext"
# bound on Q-Norm codebook levels (config.kv_qnorm): a corrupted file, not a rescaled codebook, beyond it
_QNORM_LEVEL_LIMIT = 4.0
_REMAKE = "re-create it with sqz_compile.squeeze(model, context_ids).save(path)"


class SqueezedContextError(ValueError):
    """A SqueezedContext (or its file) is inconsistent, corrupted, or made for another model.
    `fix`: the remedy the message ends with ("" when none), which a caller may replace."""

    def __init__(self, message: str, *, fix: str = "") -> None:
        super().__init__(message)
        self.fix = fix

    def with_fix(self, fix: str) -> str:
        """The message with its remedy replaced by `fix` (e.g. a command instead of a Python call)."""
        msg = str(self)
        return msg[:len(msg) - len(self.fix)] + fix if self.fix and msg.endswith(self.fix) else msg


class LayerContext(NamedTuple):
    """Views of one layer's context tensors: what the sqz attention op consumes."""

    keys: torch.Tensor
    values: torch.Tensor
    centroids: torch.Tensor
    offsets: torch.Tensor
    window_keys: torch.Tensor
    window_values: torch.Tensor
    # thresholds are [decode, prefill], not 0-d: Inductor turns 0-d constant buffers into scalar
    # constants, which AOTInductor cannot pass to a user Triton kernel
    log_threshold: torch.Tensor  # [2]
    coarse_centroids: torch.Tensor | None
    coarse_offsets: torch.Tensor | None
    coarse_log_threshold: torch.Tensor | None  # [2]
    radii: torch.Tensor | None  # [H, C]
    # low-bit contexts only (None at 16 bits): keys/values are then packed int32 codes
    perm: torch.Tensor | None  # [H, N] context position of each sorted key (its RoPE angle)
    rope: torch.Tensor | None  # [D + 2]
    codebooks: torch.Tensor | None  # [2, 2**bits]
    key_norm: torch.Tensor | None  # [H, 2, D]
    value_norm: torch.Tensor | None  # [H, N, 2]
    outlier_idx: torch.Tensor | None  # [H, N, 2, E]
    outlier_val: torch.Tensor | None  # [H, N, 2, E]


# THE schema of the op's per-layer context arguments: their order in
# torch.ops.sqz.squeezed_attention / select_clusters, the rewrite's buffers, the CUDA glue and the
# ONNX translation all read it from here. A new per-layer field is added to LayerContext only.
CONTEXT_ARGS: tuple[str, ...] = LayerContext._fields
# the low-bit fields (None in a 16-bit context)
QUANT_ARGS: tuple[str, ...] = ("perm", "rope", "codebooks", "key_norm", "value_norm", "outlier_idx", "outlier_val")
# the fields that hold centroids (cast to the keys' half dtype for the lookup)
CENTROID_ARGS: tuple[str, ...] = ("centroids", "coarse_centroids")
# what threshold calibration reads (gathered over ranks for a tensor-parallel context)
_CALIBRATION_ARGS: tuple[str, ...] = ("window_queries", "centroids", "offsets", "coarse_centroids", "coarse_offsets")
# float32 centroids -> {dtype: cast copy}, kept as long as the context's tensor lives
_CASTS = WeakIdKeyDictionary()


def _cast_once(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, cast on the first request and shared by every later one."""
    casts = _CASTS.setdefault(t, {})
    if dtype not in casts:
        casts[dtype] = t.to(dtype)
    return casts[dtype]


@dataclass(eq=False)
class SqueezedContext:
    """The product of `sqz_compile.squeeze`: one fixed context, clustered, for one model.
    Compared by identity: field-wise == over tensors is ambiguous (Dynamo compares backend
    options, this context among them, when it looks for a cached graph)."""

    config: SqueezeConfig
    fingerprint: dict[str, Any]
    context_length: int
    token_hash: str
    keys: torch.Tensor
    values: torch.Tensor
    perm: torch.Tensor
    centroids: torch.Tensor
    offsets: torch.Tensor
    window_keys: torch.Tensor
    window_values: torch.Tensor
    window_positions: torch.Tensor
    window_queries: torch.Tensor
    log_threshold: torch.Tensor
    coarse_centroids: torch.Tensor | None = None
    coarse_offsets: torch.Tensor | None = None
    coarse_log_threshold: torch.Tensor | None = None
    radii: torch.Tensor | None = None
    rope: torch.Tensor | None = None
    codebooks: torch.Tensor | None = None
    key_norm: torch.Tensor | None = None
    value_norm: torch.Tensor | None = None
    outlier_idx: torch.Tensor | None = None
    outlier_val: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # tensor parallelism: this rank's piece of the KV heads (distributed.py); None = all heads
    shard: KVShard | None = None

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self.window_keys.shape[3]

    @property
    def kv_dtype(self) -> torch.dtype:
        """The model's dtype the context was made in (packed low-bit keys are int32)."""
        return self.window_keys.dtype

    @property
    def lookup_centroid_dtype(self) -> torch.dtype | None:
        """The dtype compiled graphs hold the centroids in: the model's when it is half precision
        (the lookup reads every centroid at each step: half the bytes, and the products stay exact
        on tensor cores), None to keep them float32."""
        return self.kv_dtype if self.kv_dtype in (torch.float16, torch.bfloat16) else None

    @property
    def kv_bits(self) -> int:
        """Bits per stored context K/V entry: 16 (model dtype) or 4, 3, 2 (packed)."""
        return int(self.config.kv_bits)

    @property
    def quantized(self) -> bool:
        return self.kv_bits < 16

    def op_tensors(self) -> list[torch.Tensor | None]:
        """The stacked tensors the op's context arguments come from, in CONTEXT_ARGS order (the
        low-bit fields None in a 16-bit context, perm among them)."""
        return [None if n in QUANT_ARGS and not self.quantized else getattr(self, n) for n in CONTEXT_ARGS]

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[2]

    @property
    def window(self) -> int:
        return self.window_keys.shape[2]

    @property
    def hierarchical(self) -> bool:
        return self.coarse_centroids is not None

    @property
    def budget(self) -> int:
        """Fixed key budget, or 0 for threshold mode (the op's convention)."""
        return int(self.config.budget or 0)

    @property
    def dense_layers(self) -> int:
        """Leading layers that attend to the whole context (their thresholds keep every cluster)."""
        return min(int(self.config.dense_layers), self.num_layers)

    def layer_max_dropped_mass(self, i: int) -> float:
        """The op's max_dropped_mass for layer i: 0 (off) in a dense layer or without the mode."""
        eps = self.config.max_dropped_mass
        return 0.0 if eps is None or i < self.dense_layers else float(eps)

    def layer_budget(self, i: int) -> int:
        """The op's budget argument for layer i: threshold mode (0) in a dense layer, whose -inf
        thresholds keep every cluster, else `budget`."""
        return 0 if i < self.dense_layers else self.budget

    def dense_kv(self, i: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clustered keys/values (layer i, or all layers) in the model's dtype, post-RoPE: the stored
        tensors at 16 bits, a dequantized copy of a low-bit context (for evaluation, not the op)."""
        if not self.quantized:
            return (self.keys, self.values) if i is None else (self.keys[i], self.values[i])
        from .kernels.quant.reference import dequantize_context

        sl = slice(None) if i is None else i
        opt = lambda t: None if t is None else t[sl]  # noqa: E731
        k, v = dequantize_context(self.keys[sl], self.values[sl], self.perm[sl], self.rope[sl], self.codebooks[sl],
                                  self.key_norm[sl], self.value_norm[sl], opt(self.outlier_idx),
                                  opt(self.outlier_val), self.head_dim)
        return k.to(self.kv_dtype), v.to(self.kv_dtype)

    def layer(self, i: int, *, centroid_dtype: torch.dtype | None = None) -> LayerContext:
        """Layer i's views, in CONTEXT_ARGS order: every per-layer tensor indexed (thresholds are
        [layers, 2] -> the [decode, prefill] pair); absent (None) fields stay None.

        centroid_dtype: the centroid fields (CENTROID_ARGS) in that dtype instead of float32. That
        is a copy, not a view: made once per context tensor and dtype (all layers at once) and
        shared by every later call, so the graphs of one model (prefill, decode, recompiles) hold
        one copy between them. The rewrite asks for the keys' dtype when it is half precision:
        the lookup reads every centroid at each step, and half the bytes is its speed."""
        def pick(name: str) -> torch.Tensor | None:
            t = getattr(self, name)
            if t is None or (name in QUANT_ARGS and not self.quantized):
                return None
            if centroid_dtype is not None and name in CENTROID_ARGS and t.dtype != centroid_dtype:
                t = _cast_once(t, centroid_dtype)
            return t[i]

        return LayerContext(**{n: pick(n) for n in CONTEXT_ARGS})

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors by field name (None fields left out)."""
        names = ("keys", "values", "perm", "centroids", "offsets", "window_keys", "window_values",
                 "window_positions", "window_queries", "log_threshold", "coarse_centroids", "coarse_offsets",
                 "coarse_log_threshold", "radii") + QUANT_ARGS[1:]
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def to(self, device: torch.device | str) -> "SqueezedContext":
        """A copy with every tensor on `device` (dtypes unchanged). sqz_compile never moves a
        context implicitly: compile, export and the rewrite refuse a context on another device
        than the model, naming both and this fix."""
        moved = {n: t.to(device) for n, t in self.tensors().items()}
        return type(self)(self.config, dict(self.fingerprint), self.context_length,
                               self.token_hash, **moved, extra=dict(self.extra), shard=self.shard)

    # ------------------------------------------------------------------ recalibration

    @property
    def scaling(self) -> float:
        """The model's softmax scale the thresholds were calibrated with."""
        return float(self.extra.get("scaling", self.head_dim ** -0.5))

    def with_keep(self, keep: float, *, per_layer_threshold: bool | None = None) -> "SqueezedContext":
        """A threshold-mode copy (budget cleared) recalibrated for `keep` on the stored window
        queries, without re-clustering. Shares every tensor except the thresholds."""
        from .squeeze.calibrate import calibrate

        per_layer = self.config.per_layer_threshold if per_layer_threshold is None else per_layer_threshold
        cfg = dataclasses.replace(self.config, keep=float(keep), budget=None, max_dropped_mass=None,
                                  per_layer_threshold=bool(per_layer))
        src = {n: getattr(self, n) for n in _CALIBRATION_ARGS}
        if self.shard is not None:  # one global threshold over every rank's heads (a collective)
            from .distributed import gather_fields

            src = gather_fields(self, _CALIBRATION_ARGS)
        fine, coarse = calibrate(src["window_queries"], src["centroids"], src["offsets"], cfg.keep, self.scaling,
                                 cfg.per_layer_threshold, src["coarse_centroids"], src["coarse_offsets"],
                                 dense_layers=self.dense_layers)
        return dataclasses.replace(self, config=cfg, fingerprint=dict(self.fingerprint), log_threshold=fine,
                                   coarse_log_threshold=coarse, extra=dict(self.extra))

    # ------------------------------------------------------------------ validation

    def validate(self, model: torch.nn.Module | None = None) -> None:
        """Check shapes, dtypes and the cluster layout (and, given `model`, that the context was
        made for it). Raises SqueezedContextError naming the first problem."""
        def bad(msg: str) -> None:
            raise SqueezedContextError(f"invalid SqueezedContext: {msg}")

        def want(name: str, shape: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                bad(f"{name} is missing")
            if tuple(t.shape) != tuple(shape):
                bad(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
            if dtype is not None and t.dtype != dtype:
                bad(f"{name} has dtype {t.dtype}, expected {dtype}")
            return t

        if self.keys.dim() != 4:
            bad(f"keys must be [layers, H, N, D], got shape {tuple(self.keys.shape)}")
        layers, H, N, P = self.keys.shape
        D = self.window_keys.shape[3] if self.window_keys.dim() == 4 else P
        C, W = self.centroids.shape[2], self.window_keys.shape[2]
        hq, wq = self.window_queries.shape[1], self.window_queries.shape[2]
        kd = self.window_keys.dtype
        if self.quantized:
            self._validate_low_bit(layers, H, N, D, bad, want)
        else:
            want("keys", (layers, H, N, D), kd)
            for n in QUANT_ARGS[1:]:
                if getattr(self, n) is not None:
                    bad(f"{n} is set but config.kv_bits is 16 (a low-bit field in a 16-bit context)")
        want("values", tuple(self.keys.shape), self.keys.dtype)
        want("perm", (layers, H, N), torch.int32)
        cw = 2 * D if self.config.cluster_variance else D
        want("centroids", (layers, H, C, cw), torch.float32)
        want("offsets", (layers, H, C + 1), torch.int32)
        want("window_keys", (layers, H, W, D), kd)
        want("window_values", (layers, H, W, D), kd)
        want("window_positions", (layers, H, W), torch.int32)
        want("window_queries", (layers, hq, wq, D), torch.float32)
        if wq > W:
            bad(f"{wq} window queries but only {W} always-attended keys")
        want("log_threshold", (layers, 2), torch.float32)
        if hq % H:
            bad(f"{hq} query heads is not a multiple of {H} KV heads")
        if N < 1 or N + W != self.context_length:
            bad(f"{N} clustered + {W} window/sink tokens != context_length {self.context_length}")
        if not 1 <= C <= N:
            bad(f"{C} clusters for {N} keys")
        _check_offsets("offsets", self.offsets, N, bad)
        every = torch.cat([self.perm, self.window_positions], dim=-1).sort(dim=-1).values
        ar = torch.arange(N + W, device=every.device, dtype=torch.int32)
        if not torch.equal(every, ar.expand_as(every)):
            bad("perm and window_positions together are not a permutation of the context positions "
                "0..L-1 in every (layer, head)")
        parts = (self.coarse_centroids, self.coarse_offsets, self.coarse_log_threshold)
        if any(p is not None for p in parts) != all(p is not None for p in parts):
            bad("coarse_centroids, coarse_offsets and coarse_log_threshold must be all set or all None")
        if bool(self.config.hierarchical) != self.hierarchical:
            bad(f"config.hierarchical={self.config.hierarchical} but coarse level "
                f"{'present' if self.hierarchical else 'absent'}")
        if self.hierarchical:
            cc = self.coarse_centroids.shape[2]
            want("coarse_centroids", (layers, H, cc, cw), torch.float32)
            want("coarse_offsets", (layers, H, cc + 1), torch.int32)
            want("coarse_log_threshold", (layers, 2), torch.float32)
            _check_offsets("coarse_offsets", self.coarse_offsets, C, bad)
        if self.radii is not None:
            want("radii", (layers, H, C), torch.float32)
        elif self.config.max_dropped_mass is not None:
            bad("config.max_dropped_mass needs the clusters' radii, which this context lacks (a format-2 file?)")
        fp = self.fingerprint
        pieces = 1 if self.shard is None else self.shard.world_size  # a shard holds 1/pieces of the heads
        for key, n in (("num_hidden_layers", layers), ("num_key_value_heads", H * pieces),
                       ("num_attention_heads", hq * pieces), ("head_dim", D)):
            if key in fp and int(fp[key]) != n:
                bad(f"fingerprint says {key}={fp[key]} but the tensors have {n}")
        if model is not None:
            self.check_model(model)

    def _validate_low_bit(self, layers: int, H: int, N: int, D: int, bad, want) -> None:
        from .squeeze.quantize import fp16_range_problem, outliers_per_row, packed_words

        bits = self.kv_bits
        want("keys", (layers, H, N, packed_words(D, bits)), torch.int32)
        want("rope", (layers, D + 2), torch.float32)
        want("codebooks", (layers, 2, 1 << bits), torch.float32)
        want("key_norm", (layers, H, 2, D), torch.float32)
        want("value_norm", (layers, H, N, 2), torch.float16)
        cb = self.codebooks
        # Q-Norm rescales a codebook around the data's mean: its levels may pass +-1 a little
        lim = _QNORM_LEVEL_LIMIT if self.config.kv_qnorm else 1.0
        if not bool(torch.isfinite(cb).all()) or bool((cb.abs() > lim).any()) or bool((cb[..., 1:] < cb[..., :-1]).any()):
            bad(f"codebooks must hold ascending finite levels in [-{lim:g}, {lim:g}]")
        if not bool(torch.isfinite(self.key_norm).all()) or not bool(torch.isfinite(self.value_norm).all()):
            bad("key_norm/value_norm hold non-finite scales")
        problem = fp16_range_problem(cb, self.key_norm, self.value_norm)
        if problem:
            bad(problem)
        if int(self.rope[0, -1]) != self.context_length:
            bad(f"rope row says context length {int(self.rope[0, -1])}, the context has {self.context_length}")
        e = outliers_per_row(D, float(self.config.kv_outliers))
        if (self.outlier_idx is None) != (e == 0) or (self.outlier_val is None) != (e == 0):
            bad(f"config.kv_outliers={self.config.kv_outliers} means {e} outliers per row, but the outlier "
                f"tables are {'absent' if self.outlier_idx is None else 'present'}")
        if e:
            idx = want("outlier_idx", (layers, H, N, 2, e), torch.int16)
            want("outlier_val", (layers, H, N, 2, e), torch.float16)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= D):
                bad(f"outlier_idx holds channels outside 0..{D - 1}")

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise SqueezedContextError unless this context was squeezed for `model`."""
        from .transformers_compat import fingerprint_mismatches, model_fingerprint

        diff = fingerprint_mismatches(self.fingerprint, model_fingerprint(model))
        if diff:
            fix = ("Re-run sqz_compile.squeeze(model, context_ids) with this model (or load the model the "
                   "context was made for, in the same dtype).")
            raise SqueezedContextError(
                f"this SqueezedContext was made for another model ({self.fingerprint.get('architecture')}): "
                + "; ".join(diff) + ". " + fix, fix=fix)

    def check_model_or_warn(self, model: torch.nn.Module, who: str, stacklevel: int = 2) -> None:
        """`check_model` when the context carries a fingerprint; otherwise (made with squeeze_kv)
        warn that it cannot be checked. `who` names the caller in the warning."""
        if self.fingerprint:
            self.check_model(model)
        else:
            import warnings

            warnings.warn(f"{who}: the context carries no model fingerprint (made with squeeze_kv?), so it "
                          f"cannot be checked against the model", stacklevel=stacklevel + 1)

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        """Write one .safetensors file (tensors + JSON metadata with format version, model
        fingerprint, context hash, config and per-tensor sha256). Atomic: a crash never leaves a
        half-written file at `path`. Under tensor parallelism (a sharded context) every rank must
        call it: the slices are gathered and rank 0 writes one file of the whole context."""
        from safetensors.torch import save_file

        if self.shard is not None:
            from .distributed import save_sharded

            return save_sharded(self, path)

        tensors = {n: t.detach().to("cpu").contiguous() for n, t in self.tensors().items()}
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "context_length": int(self.context_length),
            "token_hash": self.token_hash,
            "extra": self.extra,
            "sha256": {n: _digest(t) for n, t in tensors.items()},
        }
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path), dir=folder)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"sqz_meta": json.dumps(meta, default=str)})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
        """The metadata of a file written by `save` (format and version checked), without reading
        its tensors: a cheap check before anything expensive (such as loading the model)."""
        from safetensors import safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                header = f.metadata() or {}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad headers/sizes
            raise _unreadable(path, e) from e
        try:
            meta = json.loads(header["sqz_meta"])
        except (KeyError, ValueError) as e:
            raise SqueezedContextError(f"{path}: no sqz_compile metadata (not a SqueezedContext file, or "
                                       f"a corrupted header): {_REMAKE}", fix=_REMAKE) from e
        if meta.get("format") != FORMAT_NAME:
            raise SqueezedContextError(f"{path}: format {meta.get('format')!r} is not {FORMAT_NAME!r}")
        if meta.get("format_version") in _UPGRADES and isinstance(meta.get("config"), dict):
            meta["config"] = {**_UPGRADES[meta["format_version"]], **meta["config"]}
            why = _OLD_PACKING.get((meta["format_version"], meta["config"].get("kv_bits")))
            if why:
                fix = f"{_REMAKE} (or use the sqz_compile version that wrote it)"
                raise SqueezedContextError(f"{path}: format version {meta['format_version']}: {why}; re-squeeze "
                                           f"the context: {fix}", fix=fix)
        elif meta.get("format_version") != FORMAT_VERSION:
            why = _OLDER_FORMATS.get(meta.get("format_version"), "")
            fix = f"{_REMAKE} (or use the sqz_compile version that wrote it)"
            raise SqueezedContextError(
                f"{path}: format version {meta.get('format_version')} but this sqz_compile reads version "
                f"{FORMAT_VERSION}{' (' + why + ')' if why else ''}: {fix}", fix=fix)
        return meta

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None,
             device: torch.device | str | None = None) -> "SqueezedContext":
        """Read a file written by `save`, check it (every tensor's sha256, whatever its size; the
        layout; the model fingerprint when `model` is given) and place it on `device` (default:
        the model's device, else CPU). With a tensor-parallel `model`, each rank keeps only its KV
        heads (distributed.py): it checksums each whole tensor streamed from the file a few rows at
        a time (`_digest_in_file`) and holds only its own heads' bytes."""
        from safetensors import safe_open

        from .distributed import kv_shard

        path = os.fspath(path)
        fix = _REMAKE
        meta = cls.read_metadata(path)
        shard = None if model is None else kv_shard(model)
        sums = meta.get("sha256", {})
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                names = list(f.keys())
                if set(sums) != set(names):
                    raise SqueezedContextError(f"{path}: tensors {sorted(names)} do not match the recorded "
                                               f"{sorted(sums)}: {fix}", fix=fix)
                if shard is not None:
                    _check_file_heads(path, f.get_slice("keys").get_shape(), shard)
                tensors = {}
                for n in names:
                    t = f.get_tensor(n) if shard is None else shard.read(f, n)
                    if (_digest(t) if shard is None else _digest_in_file(f, n)) != sums[n]:
                        raise SqueezedContextError(f"{path}: tensor {n!r} fails its sha256 check (corrupted "
                                                   f"file): {fix}", fix=fix)
                    tensors[n] = t
        except SqueezedContextError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad sizes
            raise _unreadable(path, e) from e
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            ctx = cls(config=SqueezeConfig.from_dict(meta["config"]), fingerprint=dict(meta["fingerprint"]),
                      context_length=int(meta["context_length"]), token_hash=str(meta["token_hash"]),
                      extra=dict(meta.get("extra", {})), shard=shard,
                      **{n: t for n, t in tensors.items() if n in fields})
        except (KeyError, TypeError, ValueError) as e:
            raise SqueezedContextError(f"{path}: incomplete or inconsistent metadata/tensors ({e}): {fix}",
                                       fix=fix) from e
        try:
            ctx.validate(model)
        except SqueezedContextError as e:
            raise SqueezedContextError(f"{path}: {e}") from None
        if device is None and model is not None:
            device = next(model.parameters()).device
        return ctx.to(device) if device is not None else ctx


def check_fits(ctx: SqueezedContext, who: str, *, error: type[Exception] = SqueezedContextError,
               layers: int | None = None, layer: int | None = None, head_dim: int | None = None,
               kv_heads: int | None = None, q_heads: int | None = None, dtype: torch.dtype | None = None,
               device: torch.device | None = None) -> None:
    """The one check that `ctx` fits what it is used with (a whole model in `compile`, one attention
    node in the rewrite): raise `error`, naming `who`, on the first mismatch. Unknown (None)
    properties are not checked. sqz_compile never casts or moves contexts implicitly."""
    fix = ("this SqueezedContext was made for another model: re-run sqz_compile.squeeze(model, "
           "context_ids) with the model you compile")
    if layers is not None and layers != ctx.num_layers:
        raise error(f"{who} has {layers} layers, the context {ctx.num_layers}; {fix}")
    if layer is not None and layer >= ctx.num_layers:
        raise error(f"{who} but the context has only {ctx.num_layers} layers; {fix}")
    if head_dim is not None and head_dim != ctx.head_dim:
        raise error(f"{who} has head dim {head_dim}, the context {ctx.head_dim}; {fix}")
    if kv_heads is not None and kv_heads != ctx.num_kv_heads:
        raise error(f"{who} attends over {kv_heads} key heads (after undoing repeat_kv), the context has "
                    f"{ctx.num_kv_heads} KV heads; {fix}")
    if q_heads is not None and q_heads % ctx.num_kv_heads:
        raise error(f"{who} has {q_heads} query heads, not a multiple of the context's {ctx.num_kv_heads} "
                    f"KV heads; {fix}")
    if dtype is not None and dtype != ctx.kv_dtype:
        raise error(f"{who} runs in {dtype} but the context keys are {ctx.kv_dtype}: squeeze the context "
                    f"with the model in {dtype} (sqz_compile does not cast contexts implicitly)")
    here = ctx.keys.device
    if device is not None and (device.type != here.type or (
            device.index is not None and here.index is not None and device.index != here.index)):
        raise error(f"{who} runs on {device} but the context is on {here}: move the context once with "
                    f"ctx = ctx.to({str(device)!r}) (sqz_compile does not copy contexts implicitly)")


def _check_file_heads(path: str, keys_shape: Any, shard: KVShard) -> None:
    """A saved context must hold all the KV heads that the tensor-parallel model splits."""
    if len(keys_shape) != 4 or keys_shape[1] != shard.num_kv_heads:
        raise SqueezedContextError(
            f"{path}: keys of shape {tuple(keys_shape)} do not hold the tensor-parallel model's "
            f"{shard.num_kv_heads} KV heads (split over {shard.world_size} ranks): it was made for another model")


def _unreadable(path: str, e: Exception) -> SqueezedContextError:
    return SqueezedContextError(f"{path}: not a readable safetensors file ({e}); it is truncated or corrupted: "
                                f"{_REMAKE}", fix=_REMAKE)


def check_for_model(ctx: SqueezedContext, model: torch.nn.Module, who: str) -> None:
    """The check `compile` and `export` make before using `ctx` with `model`: a SqueezedContext
    made for it (fingerprint; a warning when it carries none) with the model's layer count, dtype
    and device. Nothing is moved or cast: a context on another device than the model is refused
    with both devices and the fix (`ctx.to(device)`) in the message."""
    from .transformers_compat import model_config, num_layers

    if not isinstance(ctx, SqueezedContext):
        raise TypeError(f"{who}: ctx must be a sqz_compile.SqueezedContext, got {type(ctx).__name__}")
    ctx.check_model_or_warn(model, who, stacklevel=4)
    p = next(iter(model.parameters()), None)
    check_fits(ctx, f"{who}: the model", layers=num_layers(model_config(model)),
               dtype=None if p is None else p.dtype, device=None if p is None else p.device)


def _check_offsets(name: str, off: torch.Tensor, total: int, bad) -> None:
    if off.numel() and (bool((off[..., 0] != 0).any()) or bool((off[..., -1] != total).any())):
        bad(f"{name} must start at 0 and end at {total} in every (layer, head)")
    if bool((off[..., 1:] < off[..., :-1]).any()):
        bad(f"{name} must be non-decreasing")


# bytes hashed per step: a tensor of any size is checksummed without a second full copy in memory
_HASH_CHUNK = 64 << 20


def _hash_into(h: Any, t: torch.Tensor) -> None:
    """Feed `t`'s bytes (C order) to hash `h`, `_HASH_CHUNK` bytes at a time."""
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), _HASH_CHUNK):
        h.update(memoryview(flat[start:start + _HASH_CHUNK].numpy()))


def _digest(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes (C order), fed in chunks: the same digest as hashing them in
    one piece, without a second full copy in memory."""
    h = hashlib.sha256()
    _hash_into(h, t)
    return h.hexdigest()


def _digest_in_file(f: Any, name: str) -> str:
    """`_digest` of tensor `name` of an open safetensors file, read a few rows (dim 0) at a time:
    a tensor-parallel rank checks a whole tensor without holding it."""
    sl = f.get_slice(name)
    rows = sl.get_shape()[0] if sl.get_shape() else 0
    if rows == 0:
        return _digest(f.get_tensor(name))
    h = hashlib.sha256()
    first = sl[0:1]
    _hash_into(h, first)
    step = max(1, _HASH_CHUNK // max(1, first.numel() * first.element_size()))
    for start in range(1, rows, step):
        _hash_into(h, sl[start:start + step])
    return h.hexdigest()
