"""Transition shim, goes when functional.py is rewritten: minisd.reference is now
minisd/backends/fast_cpu.py (functional.py imports _added, _on_all_cores and matmul from here)."""

import sys

from minisd.backends import fast_cpu

sys.modules[__name__] = fast_cpu  # the same module, so that a setting changed here changes the fast path's
