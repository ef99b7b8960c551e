"""Centroid lookup: reference.py (plain torch, the rule), triton.py (kernels), launch.py (CUDA
glue; imports triton). The package exports the reference."""
from ..triton_common import HAS_TRITON  # noqa: F401
from .reference import (block_max, cluster_of, cluster_sizes, log_share, select_clusters_reference,  # noqa: F401
                        selection_mask_reference)

# old private names (kept for one release)
_block_max, _log_share = block_max, log_share
