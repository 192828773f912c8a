"""Shared test set-up: run against the checkout, on the backend MINISD_BACKEND names (numpy by default)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
