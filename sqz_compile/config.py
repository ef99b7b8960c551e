"""Configuration for the offline squeeze (one frozen dataclass holding every knob)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SqueezeConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SqueezeConfig fields {sorted(unknown)}: file from a newer sqz_compile?")
        return cls(**d)


# query tokens of one prefill block that share a cluster selection (the sqz ops' default)
DEFAULT_BLOCK_Q = 64
