"""Deprecated alias (kept for one release): see `sqz_compile.export.program` and `.aoti`."""
from .export.aoti import *  # noqa: F401,F403
from .export.aoti import _check_cpp_compiler, _cpp_compiler  # noqa: F401
from .export.program import *  # noqa: F401,F403
from .export.program import LOAD_HINT, META_FILE, SQZ_NAMESPACE  # noqa: F401
