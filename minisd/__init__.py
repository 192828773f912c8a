"""minisd: Stable Diffusion from scratch on NumPy and hand-written CUDA kernels.

    import minisd
    from minisd import Tensor, functional as F, nn

The story, file by file: tensor.py (autograd) -> functional.py (ops) -> nn.py (layers)
-> models/ (VAE, CLIP text encoder, UNet) -> schedulers.py (the noise schedule) ->
train.py -> pipeline.py (text -> image).
"""

import os as _os

# OpenBLAS's worker threads spin for 2^28 cycles (~0.1 s) after each matrix product before
# they sleep. minisd runs some NumPy loops on a thread pool of its own (attention, GELU),
# often right after a product, and a spinning BLAS thread takes a core from that pool (a
# GELU after a GEMM: 1.8 ms instead of 1.1). 2^20 cycles (~0.4 ms) still keeps the threads
# awake between back-to-back products. Measured on 2 cores, 3 A/B runs of a small UNet: a
# training step 310-313 ms against 321-326, a forward 103-106 ms against 111-113 (2^16:
# no better than the default). OpenBLAS reads this when NumPy loads it, so it applies when
# minisd is imported before NumPy; a value already set is kept.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from minisd.backend import get_backend, set_backend  # noqa: E402
from minisd.tensor import Tensor, is_grad_enabled, no_grad, tensor  # noqa: E402
from minisd import functional, nn, optim  # noqa: E402
from minisd.nn import manual_seed  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Tensor", "tensor", "no_grad", "is_grad_enabled", "functional", "nn", "optim",
           "set_backend", "get_backend", "manual_seed", "load_pipeline"]


def load_pipeline(path=None, **kwargs):
    """The text-to-image pipeline: the shipped shapes model by default, or a model folder."""
    from minisd.pipeline import load_pipeline as _load

    return _load(path, **kwargs)
