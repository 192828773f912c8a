"""Layers with parameters, in the manner of torch.nn.

A Module owns Parameters (tensors that require gradients) and child Modules, found by
attribute assignment; their dotted names (``down_blocks.0.resnets.1.conv1.weight``) are
the keys of ``state_dict()``, the same keys diffusers and transformers use, so weights
move between minisd and PyTorch by name.

Initialisation follows PyTorch's defaults (Kaiming-uniform with a = sqrt(5) for Linear
and Conv2d weights, which amounts to U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and
biases alike), drawn from minisd's own seeded generator: ``minisd.manual_seed(0)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Iterator

import numpy as np

from minisd import functional as F
from minisd.backends import get_backend, to_numpy
from minisd.tensor import DEFAULT_DTYPE, Tensor

_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed the generator that initialises every new layer's weights."""
    global _rng
    _rng = np.random.default_rng(seed)


class Parameter(Tensor):
    """A Tensor that is a learnable weight of a Module (always requires grad)."""

    __slots__ = ()

    def __init__(self, data, dtype=DEFAULT_DTYPE):
        super().__init__(data, requires_grad=True, dtype=dtype)


def _uniform(shape, bound: float) -> Parameter:
    return Parameter(_rng.uniform(-bound, bound, size=shape))


class Module:
    """Base class: holds parameters and sub-modules, and calls ``forward`` when called."""

    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    # ---- what it holds ------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, value in vars(self).items():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(value, Parameter):
                yield full, value
            elif isinstance(value, Module):
                yield from value.named_parameters(full)

    def parameters(self) -> list[Parameter]:
        """Each parameter once, even when two modules share it (tied weights): an optimiser
        must step it once per step. (named_parameters and state_dict list every name.)"""
        unique = {id(p): p for _, p in self.named_parameters()}
        return list(unique.values())

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> Module:
        for _, m in self.named_modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def requires_grad_(self, flag: bool = True) -> Module:
        """Freeze (False) or unfreeze every parameter, as SD freezes its text encoder."""
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def to(self, dtype) -> Module:
        """Cast every parameter in place (float64 for gradient checks)."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    # ---- saving and loading ---------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Every parameter as a NumPy array, by dotted name."""
        return {name: to_numpy(p.data) for name, p in self.named_parameters()}

    def load_state_dict(self, state: Mapping, strict: bool = True) -> None:
        """Copy arrays into the parameters of the same names, keeping each parameter's dtype.

        ``state`` maps parameter names to arrays of the parameters' shapes: NumPy or CuPy
        arrays, a safetensors file's tensors (minisd.io.SafetensorsFile), or nested lists.
        Missing, unexpected and mis-shaped keys are named in one KeyError (when strict; a
        mis-shaped key is an error either way). A value that is not an array of numbers, or
        an integer or bool array for a floating-point parameter, is a TypeError naming the
        key (torch would cast integers silently; in a checkpoint they mean a corrupt or
        mislabelled file). Nothing is loaded when any of this fails.
        """
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{where}: expected a mapping of parameter name -> array, got {type(state).__name__}")
        own = dict(self.named_parameters())
        given = {k: _as_array(state[k]) for k in own if k in state}
        wrong = [_wrong_value(k, state[k], given[k], own[k]) for k in given]
        wrong = [w for w in wrong if w]
        if wrong:
            raise TypeError(f"{where}: {_listing(wrong, most=3, separator='; ')}")
        missing = sorted(set(own) - set(state))
        unexpected = sorted(map(str, set(state) - set(own)))
        misshaped = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                     for k, v in given.items() if tuple(v.shape) != tuple(own[k].shape)]
        problems = []
        if strict and missing:
            problems.append(f"missing keys: {_listing(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        if misshaped:
            problems.append(f"mis-shaped keys: {_listing(misshaped)}")
        if problems:
            raise KeyError(f"{where}: " + "; ".join(problems))
        backend = get_backend()
        for name, p in own.items():
            if name in state:
                # A copy, as torch's param.copy_(): otherwise the model would share memory with
                # the dict (and with the model it came from), and training one would change both.
                p.data = backend.asarray(given[name], dtype=p.dtype).copy()
                p.grad = None


def _as_array(value):
    """``value`` as something with a NumPy shape and dtype, not yet read if it is a stored
    tensor (which has both); anything else (lists, numbers, torch tensors) through np.asarray."""
    try:
        np.dtype(value.dtype)
        tuple(value.shape)
        return value
    except (AttributeError, TypeError):
        pass
    try:
        return np.asarray(value)
    except (ValueError, TypeError):  # ragged lists and the like
        return np.asarray(value, dtype=object)


def _wrong_value(name: str, value, array, param) -> str | None:
    """What is wrong with loading ``value`` (as ``array``) into ``param``, or None."""
    kind = np.dtype(array.dtype).kind
    if kind not in "biufc":
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return f"{name}: expected an array of shape {tuple(param.shape)}, got {type(value).__name__} {shown}"
    if kind != "f" and np.dtype(param.dtype).kind == "f":
        return (f"{name}: a {np.dtype(array.dtype)} array cannot be loaded into a {np.dtype(param.dtype)} parameter "
                "(expected floating-point weights; a corrupt or mislabelled checkpoint?)")
    return None


def _listing(names: list[str], most: int = 10, separator: str = ", ") -> str:
    shown = separator.join(names[:most])
    return shown + (f"{separator}... ({len(names) - most} more)" if len(names) > most else "")


class ModuleList(Module):
    """A list of modules whose parameters are named by position: ``resnets.0.conv1.weight``."""

    def __init__(self, modules=()):
        self._items: list[Module] = []
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> None:
        setattr(self, str(len(self._items)), module)
        self._items.append(module)

    def __getitem__(self, i):
        return self._items[i]

    def __len__(self):
        return len(self._items)

    def __iter__(self):
        return iter(self._items)


class Sequential(ModuleList):
    """Modules applied one after another."""

    def __init__(self, *modules):
        super().__init__(modules)

    def forward(self, x):
        for m in self:
            x = m(x)
        return x


class Identity(Module):
    def forward(self, x):
        return x


class Linear(Module):
    """y = x W^T + b, W (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        bound = 1 / math.sqrt(in_features)
        self.weight = _uniform((out_features, in_features), bound)
        self.bias = _uniform((out_features,), bound) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Conv2d(Module):
    """2-D convolution, weight (out_channels, in_channels, k, k), square kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        self.stride, self.padding = stride, padding
        bound = 1 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.weight = _uniform((out_channels, in_channels, kernel_size, kernel_size), bound)
        self.bias = _uniform((out_channels,), bound) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class GroupNorm(Module):
    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.weight = Parameter(np.ones(num_channels)) if affine else None
        self.bias = Parameter(np.zeros(num_channels)) if affine else None

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(Module):
    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True):
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.weight = Parameter(np.ones(self.normalized_shape)) if elementwise_affine else None
        self.bias = Parameter(np.zeros(self.normalized_shape)) if elementwise_affine and bias else None

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Embedding(Module):
    """A table of num_embeddings vectors; PyTorch initialises it N(0, 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        self.weight = Parameter(_rng.standard_normal((num_embeddings, embedding_dim)))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class Dropout(Module):
    def __init__(self, p: float = 0.5, seed: int | None = None):
        self.p = p
        self.rng = np.random.default_rng(seed)

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.rng)


class SiLU(Module):
    def forward(self, x):
        return F.silu(x)


class GELU(Module):
    def __init__(self, approximate: str = "none"):
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, self.approximate)
