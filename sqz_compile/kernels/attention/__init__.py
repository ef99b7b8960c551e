"""Sparse exact attention: reference.py (plain torch), triton.py (kernels), launch.py (CUDA glue;
imports triton). The package exports the reference."""
from .reference import (key_cluster_ids, new_token_bias, selected_key_mask,  # noqa: F401
                        selection_from_compact, squeezed_attention_reference)
