"""SqueezedContext: the precomputed, cluster-sorted form of one fixed context for one model.

Layout (L = context length, W = observation window actually used, N = L - W clustered keys,
H = KV heads, Hq = query heads, D = head dim, C = fine clusters, Cc = coarse clusters; every
tensor is stacked over layers on dim 0):

  keys, values        [layers, H, N, D]  model dtype, post-RoPE, sorted by cluster per (layer, head)
  perm                [layers, H, N]     int32: context position of each sorted key (0..N-1)
  centroids           [layers, H, C, D]  float32: mean of the cluster's original (un-normalised) keys
  offsets             [layers, H, C+1]   int32: cluster c holds sorted keys offsets[c]:offsets[c+1]
  window_keys/values  [layers, H, W, D]  model dtype: the last W context tokens, always attended
  window_queries      [layers, Hq, W, D] float32: their queries, kept so keep can be recalibrated
  log_threshold       [layers]           float32: keep cluster c for a query when its log share
                                         exceeds this (+inf keeps nothing, -inf keeps all)
  coarse_centroids    [layers, H, Cc, D] float32 (hierarchical only)
  coarse_offsets      [layers, H, Cc+1]  int32 over *fine cluster indices*: fine clusters are
                                         stored grouped by coarse parent
  coarse_log_threshold [layers]          float32 (hierarchical only)

Positions: keys are rotated for positions p - L (relative to the end of the context), so the
user's tokens keep their natural positions 0, 1, ... RoPE depends only on relative position, so
this is the same as giving the user's tokens absolute positions L + i, and the model needs no
position offset anywhere (compile, export, generate and static caches work unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .config import SqueezeConfig

FORMAT_VERSION = 1


class LayerContext(NamedTuple):
    """Views of one layer's context tensors: what the sqz attention op consumes."""

    keys: torch.Tensor
    values: torch.Tensor
    centroids: torch.Tensor
    offsets: torch.Tensor
    window_keys: torch.Tensor
    window_values: torch.Tensor
    log_threshold: torch.Tensor  # 0-d
    coarse_centroids: torch.Tensor | None
    coarse_offsets: torch.Tensor | None
    coarse_log_threshold: torch.Tensor | None  # 0-d


@dataclass
class SqueezedContext:
    """The product of `sqz_compile.squeeze`: one fixed context, clustered, for one model."""

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
    window_queries: torch.Tensor
    log_threshold: torch.Tensor
    coarse_centroids: torch.Tensor | None = None
    coarse_offsets: torch.Tensor | None = None
    coarse_log_threshold: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]

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

    def layer(self, i: int) -> LayerContext:
        h = self.hierarchical
        return LayerContext(
            self.keys[i], self.values[i], self.centroids[i], self.offsets[i],
            self.window_keys[i], self.window_values[i], self.log_threshold[i],
            self.coarse_centroids[i] if h else None,
            self.coarse_offsets[i] if h else None,
            self.coarse_log_threshold[i] if h else None,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors by field name (None fields left out)."""
        names = ("keys", "values", "perm", "centroids", "offsets", "window_keys", "window_values",
                 "window_queries", "log_threshold", "coarse_centroids", "coarse_offsets",
                 "coarse_log_threshold")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def to(self, device: torch.device | str) -> "SqueezedContext":
        """A copy with every tensor on `device` (dtypes unchanged)."""
        moved = {n: t.to(device) for n, t in self.tensors().items()}
        return SqueezedContext(self.config, dict(self.fingerprint), self.context_length,
                               self.token_hash, **moved, extra=dict(self.extra))
