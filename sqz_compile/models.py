"""Deprecated alias (kept for one release): model checks live in `sqz_compile.transformers_compat`,
capture in `sqz_compile.squeeze.capture`."""
from .squeeze.capture import CAPTURE_IMPL, Captured, capture_context, show_progress  # noqa: F401
from .transformers_compat import (ABSOLUTE_ROPE_TYPES, KNOWN_GOOD, UnsupportedModelError,  # noqa: F401
                                  check_supported, fingerprint_mismatches, model_fingerprint)
