"""Deprecated alias (kept for one release): the launchers live in kernels/lookup/launch.py and
kernels/attention/launch.py."""
from .attention.launch import AttnConfig, attention_config, sparse_attention, squeezed_attention  # noqa: F401
from .lookup.launch import (LookupConfig, Selection, expand_positions, lookup, lookup_config,  # noqa: F401
                            select_clusters)
from .triton_common import launch as _launch  # noqa: F401
