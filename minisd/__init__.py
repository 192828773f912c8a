"""minisd: Stable Diffusion from scratch on NumPy and hand-written CUDA kernels.

    import minisd
    from minisd import Tensor, functional as F, nn

The story, file by file: tensor.py (autograd) -> functional.py (ops) -> nn.py (layers)
-> models/ (VAE, CLIP text encoder, UNet) -> schedulers.py (the noise schedule) ->
train.py -> pipeline.py (text -> image).
"""

# minisd.backends first: it makes the process-wide CPU settings before NumPy loads
# (minisd/backends/cpu_settings.py; MINISD_CPU_TUNING=0 turns them off).
from minisd.backends import get_backend, set_backend
from minisd.tensor import Tensor, is_grad_enabled, no_grad, tensor
from minisd import functional, nn, optim
from minisd.nn import manual_seed

__version__ = "0.1.0"

__all__ = ["Tensor", "tensor", "no_grad", "is_grad_enabled", "functional", "nn", "optim",
           "set_backend", "get_backend", "manual_seed", "load_pipeline"]


def load_pipeline(path=None, **kwargs):
    """The text-to-image pipeline: the shipped shapes model by default, or a model folder."""
    from minisd.pipeline import load_pipeline as _load

    return _load(path, **kwargs)
