"""The backends: who computes conv2d, group norm and attention (see minisd/backend.py for now)."""
