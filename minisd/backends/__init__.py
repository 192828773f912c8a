"""The backends: who computes conv2d, group norm and attention (see minisd/backend.py for now)."""

# First of all, before anything loads NumPy: the process-wide CPU settings (OpenBLAS reads
# its own when NumPy loads it). MINISD_CPU_TUNING=0 leaves the process as it is.
from minisd.backends import cpu_settings

cpu_settings.apply()
