"""Shared test set-up: run against the checkout, on the backend MINISD_BACKEND names (numpy by default).

The helpers several test files share live in helpers.py beside this file (``from helpers import ...``).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):  # the checkout's minisd; tests/ for ``import helpers`` under any --import-mode
    if path not in sys.path:
        sys.path.insert(0, path)
