"""Configuration: `SqueezeConfig` (the offline squeeze) and `CompileConfig` (compile, export,
package, export_onnx and the "sqz" backend), each one frozen dataclass holding every knob."""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

# query tokens of one prefill block that share a cluster selection (the sqz ops' default)
DEFAULT_BLOCK_Q = 64


# the low-bit context choices (squeeze/quantize.py): bits per stored K/V entry, 16 = model dtype
KV_BITS = (16, 4, 3, 2)
KV_DATATYPES = ("nuq", "int")


@dataclass(frozen=True)
class SqueezeConfig:
    """How a fixed context is squeezed.

    keep: target fraction of the clustered context keys attended (0..1), with the same meaning
        in decode (per token) and prefill (per block of query tokens): two thresholds are
        calibrated on the observation window, one per granularity, so that on average this
        fraction is kept in each.
    cluster_ratio: clusters per clustered context token (the paper uses 5%).
    hierarchical: also build a coarse level (K-means over each head's centroids) so that the
        lookup first prunes coarse clusters and scores only the children of the kept ones.
    coarse_ratio: coarse clusters per clustered context token (the paper uses 1%).
    observation_window: the last W context tokens: always attended densely, and their queries
        calibrate the threshold.
    sink_tokens: the first S context tokens are also always attended densely (they join the
        window and leave the clusters), whatever the data says.
    dense_tokens: per (layer, KV head), the T context tokens that the observation window's
        queries attend to most (attention sinks, and keys that matter whatever the query) leave
        their clusters and are attended densely with the window. Chosen from data, so they sit
        wherever the model puts its mass; a cluster's mean would hide them (deep layers of
        SmolLM2 put ~30% of their attention on such tokens; benchmarks/results/accuracy.md).
    budget: if set, a fixed number of context keys per (batch row, KV head, query block): the
        top-scoring clusters are taken while their total size fits the budget (fixed work,
        CUDA-graph friendly). Calibration is skipped. budget=0 keeps no cluster (only the
        always-attended keys and the new tokens), like keep=0.
    per_layer_threshold: calibrate one threshold per layer instead of one global threshold.
    kmeans_iters: iteration cap for K-means (it stops early once assignments settle).
    chunk_size: prefill chunk length in tokens (bounds activation memory for long contexts).
    seed: makes clustering deterministic.
    cluster_variance: score a cluster by the log-mean-exp of a Gaussian with the cluster's
        per-channel variance, s q.mu + s^2/2 sum_d q_d^2 var_d, instead of by its mean alone
        (s q.mu, a lower bound by Jensen that hides a cluster's best keys). The variances are
        stored beside the centroids ([mean, variance], 2D columns) and the lookup scores
        [q, s/2 q^2] against them: same kernels, twice the centroid bytes.
    max_dropped_mass: error-bounded selection (HSR-style certified reporting) instead of a
        threshold or budget: per query, clusters are kept best-first (by n_c exp of the bound
        below) until the certified upper bound on the softmax mass of the dropped context keys is
        <= this epsilon. The bound per cluster: q.k <= q.mu_c + |q| r_c with r_c the cluster's
        radius (max distance of its keys from the mean), and a cluster's partition >= n_c
        exp(s q.mu_c) (Jensen). Runs in plain torch ops on every device (no fused kernel yet).
    dense_layers: the first `dense_layers` layers attend to the whole context (no lookup):
        early layers spread their attention (SmolLM2's layer 0 loses ~40% of its mass at keep =
        1/8 even with an oracle). keep then applies to the other layers, so the keys attended
        per token over all layers are (dense_layers + keep * (layers - dense_layers)) / layers.
    self_check: prove the capture before clustering: the observation window's attention
        recomputed from the captured K/V must match the model's own attention output in every
        layer (squeeze/selfcheck.py), else squeeze refuses naming the layer. Costs one more
        prefill of the context; False skips it (only for models already proven, e.g. when
        re-squeezing many contexts for one model).
    kv_bits: storage of the clustered context K/V: 16 (the model's dtype) or 4, 3, 2 bits
        (KVQuant-style, squeeze/quantize.py: pre-RoPE per-channel keys, per-token values, packed
        int32 words read and dequantized by the attention kernel). The always-attended keys
        (window, sinks, dense tokens) stay in the model's dtype.
    kv_datatype: low-bit levels: "nuq" (a per-layer codebook fitted to the data, each key entry
        weighted by the attention the observation window gives its token and by the window
        queries' energy in its channel at its rotation) or "int" (uniform). Ignored at 16 bits.
    kv_outliers: fraction of entries per K/V row kept in float16 beside the low-bit codes
        (dense-and-sparse; 0 keeps none; for keys, the entries whose rounding would move the
        window queries' scores the most). Ignored at 16 bits.
    kv_qnorm: Q-Norm (KVQuant): after the codes are chosen, each layer's codebook is moved and
        scaled so that the dequantized entries have the mean and standard deviation of the
        entries they stand for (low bit widths shrink the spread). Offline only: the same file
        layout and kernels. Ignored at 16 bits.
    """

    keep: float = 0.125
    cluster_ratio: float = 0.05
    hierarchical: bool = False
    coarse_ratio: float = 0.01
    observation_window: int = 100
    sink_tokens: int = 0
    dense_tokens: int = 16
    budget: int | None = None
    per_layer_threshold: bool = False
    kmeans_iters: int = 25
    chunk_size: int = 4096
    seed: int = 0
    cluster_variance: bool = True
    dense_layers: int = 0
    max_dropped_mass: float | None = None
    self_check: bool = True
    kv_bits: int = 16
    kv_datatype: str = "nuq"
    kv_outliers: float = 0.01
    kv_qnorm: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"SqueezeConfig.{name}={getattr(self, name)!r}: {why}")

        if not 0.0 <= float(self.keep) <= 1.0:
            bad("keep", "must lie in [0, 1] (fraction of context keys to keep)")
        if not 0.0 < float(self.cluster_ratio) <= 1.0:
            bad("cluster_ratio", "must lie in (0, 1] (clusters per context token)")
        if not 0.0 < float(self.coarse_ratio) <= float(self.cluster_ratio):
            bad("coarse_ratio", "must lie in (0, cluster_ratio]: the coarse level is coarser")
        if int(self.observation_window) < 1:
            bad("observation_window", "must be >= 1 token")
        if int(self.sink_tokens) < 0:
            bad("sink_tokens", "must be >= 0 (first context tokens always attended)")
        if int(self.dense_tokens) < 0:
            bad("dense_tokens", "must be >= 0 (context tokens per KV head attended densely, chosen from data)")
        if self.budget is not None and int(self.budget) < 0:
            bad("budget", "must be None (threshold mode) or a key count >= 0")
        if int(self.kmeans_iters) < 1:
            bad("kmeans_iters", "must be >= 1")
        if int(self.chunk_size) < 1:
            bad("chunk_size", "must be >= 1")
        if self.max_dropped_mass is not None:
            if not 0.0 < float(self.max_dropped_mass) < 1.0:
                bad("max_dropped_mass", "must lie in (0, 1) (bound on the dropped softmax mass), or None")
            if self.budget is not None:
                bad("max_dropped_mass", "and budget are two selection modes: set one of them")
        if int(self.dense_layers) < 0:
            bad("dense_layers", "must be >= 0 (leading layers that attend to the whole context)")
        if isinstance(self.kv_bits, bool) or not isinstance(self.kv_bits, int) or self.kv_bits not in KV_BITS:
            bad("kv_bits", "must be 16 (model dtype), 4, 3 or 2 (low-bit context K/V)")
        if self.kv_datatype not in KV_DATATYPES:
            bad("kv_datatype", 'must be "nuq" (fitted codebook) or "int" (uniform levels)')
        if not 0.0 <= float(self.kv_outliers) < 0.5:
            bad("kv_outliers", "must lie in [0, 0.5) (fraction of K/V entries kept in float16)")
        if not isinstance(self.kv_qnorm, bool):
            bad("kv_qnorm", "must be True or False (Q-Norm of the low-bit codebooks)")
        if self.kv_bits != 16 and self.max_dropped_mass is not None:
            bad("max_dropped_mass", "needs kv_bits=16: its certificate bounds the stored keys, and low-bit "
                "keys differ from them by the quantization error")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SqueezeConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SqueezeConfig fields {sorted(unknown)}: file from a newer sqz_compile?")
        return cls(**d)


@dataclass(frozen=True)
class CompileConfig:
    """How a model is compiled with its squeezed context: one config for `sqz_compile.compile`,
    `export`, `export_onnx`, `package` and the "sqz" backend (options={"context": ctx,
    "config": CompileConfig(...)}). Each knob says which of them read it.

    block_q: query tokens sharing one cluster selection in prefill (all).
    strict: a layer the pass cannot rewrite (sliding window, soft-capping, attention weights used
        elsewhere, a model whose settings cannot be read, ...) is an error, SqueezeDenseError,
        naming the layer and the reason (all). False is the opt-out: such a layer stays dense, so
        it attends only to the user's tokens and ignores the context, and a SqueezeDenseWarning
        says so once per compiled model.
    inductor: compile the rewritten graph with Inductor; False runs it eagerly (compile, backend).
    prefill_inductor: with inductor, also compile the prompt's graph (several query tokens per
        row) with Inductor. False (the default) compiles only the decode graph (one token per
        row); a prompt then runs without tracing: the model's own forward with the sqz op as its
        attention function (attention_function.py), the computation of the rewritten graph, so
        the first token waits for neither Dynamo nor Inductor (compile). Prompts still go through
        the graph (run eagerly) where that path cannot stand in: layers the config keeps dense
        (strict=False), output_attentions, the bare "sqz" backend. Measured on the H200 (32-layer
        8B shape, NOTES "v12 outcomes"): compiling the prompt's graph cost ~70 s cold, tracing it
        ~16-35 s, for a prefill as fast either way.
    decode_inductor: with inductor, compile the decode graph (one token per row) with Inductor.
        False runs decode steps untraced too, like prompts, so no call waits for Dynamo or
        Inductor; with mode="reduce-overhead" on a GPU over a static cache, each step shape is
        captured once in a CUDA graph, checked once against the eager step and replayed
        (decode_graphs.py), and generate uses a static cache unless told otherwise; other steps
        run eagerly. None (the default): False with mode="reduce-overhead", True otherwise.
        Measured on the H200 (NOTES "v13"): untraced CUDA-graph decode gives the first 3-token
        answer after 9.3 s cold instead of ~79 s (8B shape, 32K), at 8.8 ms per token against
        9.4 through Inductor (11.0 vs 9.6 at 128K; 3.6 vs 3.8 on SmolLM2).
    mode: Inductor mode, e.g. "reduce-overhead" (compile, backend).
    dynamic, fullgraph: torch.compile's (compile).
    inductor_options: Inductor config options: torch.compile's `options` (compile, backend) or
        AOTInductor's `inductor_configs` (package), e.g. {"cpp.cxx": (None, "/usr/bin/g++")}.
    cache_dir: warm start across processes (compile, backend; with inductor): a directory holding
        the compiled code in one file per sqz_compile/torch/triton version
        (`compile-<tag>.sqzcache`, see compile_cache.py), loaded before the first graph is
        compiled and rewritten after each new one. Files of other versions are ignored, never
        deleted. None (the default): Inductor's own caches only.
    """

    block_q: int = DEFAULT_BLOCK_Q
    strict: bool = True
    inductor: bool = True
    prefill_inductor: bool = False
    decode_inductor: bool | None = None
    mode: str | None = None
    dynamic: bool | None = None
    fullgraph: bool = False
    inductor_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.decode_inductor not in (None, True, False):
            raise ValueError(f"CompileConfig.decode_inductor={self.decode_inductor!r}: must be True, False or None")
        if int(self.block_q) < 1:
            raise ValueError(f"CompileConfig.block_q={self.block_q!r}: must be >= 1 query token")
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)) or not str(self.cache_dir):
                raise ValueError(f"CompileConfig.cache_dir={self.cache_dir!r}: must be a directory path or None")
            path = os.path.expanduser(os.fspath(self.cache_dir))
            if os.path.exists(path) and not os.path.isdir(path):
                raise ValueError(f"CompileConfig.cache_dir={self.cache_dir!r}: exists and is not a directory")
            object.__setattr__(self, "cache_dir", path)
        # a private copy: changing the caller's dict later does not change a compiled model's config
        object.__setattr__(self, "inductor_options", dict(self.inductor_options))

    @property
    def decode_graph(self) -> bool:
        """Whether decode steps go through the Inductor-compiled graph (decode_inductor resolved)."""
        return self.decode_inductor if self.decode_inductor is not None else self.mode != "reduce-overhead"


# keyword arguments that compile / export / package / export_onnx / backend options took before
# CompileConfig, mapped to its fields (accepted, with a DeprecationWarning, for one release)
_LEGACY_NAMES = {"inductor_configs": "inductor_options"}


def resolve_compile_config(config: CompileConfig | None, legacy: Mapping[str, Any], who: str, *,
                           rest_to_inductor: bool = False, stacklevel: int = 3) -> CompileConfig:
    """`config` (default CompileConfig()), updated from the loose keyword arguments of the old API
    with a DeprecationWarning. `rest_to_inductor`: unknown names are Inductor options (compile and
    the backend took those loose); otherwise they are a TypeError."""
    if config is None:
        config = CompileConfig()
    elif not isinstance(config, CompileConfig):
        raise TypeError(f"{who}: config must be a sqz_compile.CompileConfig, got {type(config).__name__}")
    if not legacy:
        return config
    names = {f.name for f in dataclasses.fields(CompileConfig)}
    known = {_LEGACY_NAMES.get(k, k): v for k, v in legacy.items() if _LEGACY_NAMES.get(k, k) in names}
    rest = {k: v for k, v in legacy.items() if _LEGACY_NAMES.get(k, k) not in names}
    if rest and not rest_to_inductor:
        raise TypeError(f"{who}() got unexpected keyword arguments {sorted(rest)}")
    if rest or "inductor_options" in known:
        known["inductor_options"] = {**config.inductor_options, **known.get("inductor_options", {}), **rest}
    warnings.warn(f"{who}: keyword arguments {sorted(legacy)} are deprecated and go away in the next "
                  f"release: pass config=sqz_compile.CompileConfig(...) instead", DeprecationWarning,
                  stacklevel=stacklevel)
    return dataclasses.replace(config, **known)
