"""Union-read decode attention for a batch sharing one context: reference.py (plain torch: the
union list the kernels build), triton.py (kernels), launch.py (CUDA glue; imports triton). The
package exports the reference."""
from .reference import (kept_from_compact, row_bits_reference, union_list_reference,  # noqa: F401
                        union_positions_reference)
