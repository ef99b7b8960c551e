"""Stage 1, offline: model + fixed-context ids -> SqueezedContext.

capture.py (prefill, K/V and window-query capture, clustering layout: `squeeze`, `squeeze_kv`),
kmeans.py (batched spherical K-means), calibrate.py (log-space threshold calibration).
"""
from .capture import cluster_counts_for, squeeze, squeeze_kv, token_hash

__all__ = ["squeeze", "squeeze_kv", "token_hash", "cluster_counts_for"]
