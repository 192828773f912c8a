"""Differentiable operations, with torch.nn.functional's semantics (NCHW images).

Each operation is a Function: ``forward`` computes the result on raw arrays (NumPy or
CuPy: ``xp`` is whichever the inputs are), ``backward`` maps dL/d(output) to
dL/d(inputs), the vector-Jacobian product. Operations that are compositions of others
(mean is sum divided by n, mse_loss is a mean of squares) are written as compositions,
so only the primitives carry backward formulas.

The three primitives that dominate Stable Diffusion's cost (conv2d, group_norm and
attention) hand their arithmetic to the active backend (``backend.ops``): the formulas
(minisd/backends/naive.py), the fast CPU code (fast_cpu.py) or the CUDA kernels in
kernels/*.cu; so do matmul, SiLU, GELU, GEGLU and layer norm, which the fast CPU path
computes block by block on all cores.

Sections: arithmetic, reductions, shapes and indexing, matrix products, activations,
normalisation, convolution and resampling, attention, embeddings, dropout, losses.
"""

from __future__ import annotations

import builtins
import math
from typing import NamedTuple, Sequence

import numpy as np

from minisd.backends import get_array_module, get_backend
from minisd.tensor import DEFAULT_DTYPE, Function, Tensor, _as_input, _promoted, result_type


def _xp(*arrays):
    return get_array_module(*arrays)


def _check_param_shapes(op: str, x, expected: tuple, **params) -> None:
    """Weights and biases must have the shape the input implies; say so in the op's own terms."""
    for name, p in params.items():
        if p is not None and tuple(p.shape) != tuple(expected):
            raise ValueError(f"{op}: {name} of shape {tuple(p.shape)} does not fit input {tuple(x.shape)} "
                             f"(expected {tuple(expected)})")


def _check_same_shape(op: str, *arrays) -> None:
    """The operands' shapes broadcast together; if not, say so with the op's name and the shapes."""
    try:
        np.broadcast_shapes(*(a.shape for a in arrays))
    except ValueError:
        shapes = " and ".join(str(tuple(a.shape)) for a in arrays)
        raise ValueError(f"{op}: shapes {shapes} do not broadcast") from None


# =====================================================================================
# Arithmetic (broadcasting is undone by the engine: see tensor._unbroadcast)
# =====================================================================================


class Add(Function):
    def forward(self, a, b):
        _check_same_shape("add", a, b)
        return a + b

    def backward(self, g):
        return g, g


class Sub(Function):
    def forward(self, a, b):
        _check_same_shape("sub", a, b)
        return a - b

    def backward(self, g):
        return g, (-g if self.needs_input_grad[1] else None)


class Mul(Function):
    def forward(self, a, b):
        _check_same_shape("mul", a, b)
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        return (g * self.b if self.needs_input_grad[0] else None,
                g * self.a if self.needs_input_grad[1] else None)


class Div(Function):
    def forward(self, a, b):
        _check_same_shape("div", a, b)
        self.a, self.b = a, b
        return a / b

    def backward(self, g):
        ga = g / self.b
        return ga, (-ga * self.a / self.b if self.needs_input_grad[1] else None)


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return -g


class Pow(Function):
    """a ** p for a constant exponent p:  d/da = p a^(p-1), taken as 0 for p = 0 (as torch)."""

    def forward(self, a, p):
        self.a, self.p = a, p
        return a ** p

    def backward(self, g):
        if self.p == 0:
            return _xp(g).zeros_like(g)
        return g * self.p * self.a ** (self.p - 1)


class PowTensor(Function):
    """a ** b for tensors a and b:  d/da = b a^(b-1),  d/db = a^b log a.

    At the corners as torch: d/da = 0 where b = 0, and d/db = 0 where a = 0 and b >= 0
    (0^b is flat there in b). A negative base with a fractional exponent gives NaN, in
    the value and in d/db, quietly, as in torch.
    """

    def forward(self, a, b):
        _check_same_shape("pow", a, b)
        self.a, self.b = a, b
        with np.errstate(divide="ignore", invalid="ignore"):
            self.out = a ** b
        return self.out

    def backward(self, g):
        xp, a, b = _xp(g), self.a, self.b
        ga = gb = None
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.needs_input_grad[0]:
                ga = xp.where(b == 0, 0, g * b * a ** (b - 1))
            if self.needs_input_grad[1]:
                gb = xp.where((a == 0) & (b >= 0), 0, g * self.out * xp.log(a))
        return ga, gb


class Exp(Function):
    def forward(self, a):
        self.out = _xp(a).exp(a)
        return self.out

    def backward(self, g):
        return g * self.out


class Log(Function):
    def forward(self, a):
        self.a = a
        return _xp(a).log(a)

    def backward(self, g):
        return g / self.a


class Sqrt(Function):
    def forward(self, a):
        self.out = _xp(a).sqrt(a)
        return self.out

    def backward(self, g):
        return g / (2 * self.out)


class Abs(Function):
    """|a|; the derivative at 0 is taken as 0 (sign(0))."""

    def forward(self, a):
        self.a = a
        return _xp(a).abs(a)  # not abs(a): this module's abs() (the op) shadows the builtin

    def backward(self, g):
        return g * _xp(self.a).sign(self.a)


class Sin(Function):
    def forward(self, a):
        self.a = a
        return _xp(a).sin(a)

    def backward(self, g):
        return g * _xp(self.a).cos(self.a)


class Cos(Function):
    def forward(self, a):
        self.a = a
        return _xp(a).cos(a)

    def backward(self, g):
        return -g * _xp(self.a).sin(self.a)


class Clamp(Function):
    """min(max(a, lo), hi), torch's clamp, with bounds that broadcast against a (numbers are
    0-d bounds). Each element's gradient goes to where its output came from: to a where
    lo <= a <= hi, to lo where a < lo < hi, to hi where a > hi or hi < lo (the output is hi)."""

    def forward(self, a, lo, hi):
        _check_same_shape("clamp", a, lo, hi)
        self.a, self.lo, self.hi = a, lo, hi
        xp = _xp(a)
        return xp.minimum(xp.maximum(a, lo), hi)

    def backward(self, g):
        a, lo, hi = self.a, self.lo, self.hi
        need = self.needs_input_grad
        return (g * ((a >= lo) & (a <= hi)) if need[0] else None,
                g * ((a < lo) & (lo < hi)) if need[1] else None,
                g * ((a > hi) | (hi < lo)) if need[2] else None)


class Cast(Function):
    def forward(self, a, dtype=None):
        self.dtype = a.dtype
        return a.astype(dtype)

    def backward(self, g):
        return g.astype(self.dtype)


# The binary ops promote their operands to one dtype by torch's rules first (tensor.result_type):
# int64 + float32 is float32 and float32 * 0.5 stays float32, where NumPy would make float64.
def add(a, b): return Add.apply(*_promoted(a, b))
def sub(a, b): return Sub.apply(*_promoted(a, b))
def mul(a, b): return Mul.apply(*_promoted(a, b))


def div(a, b):
    """a / b, true division: integers divided give the default float32, as in torch."""
    dtype = result_type(a, b)
    return Div.apply(*_promoted(a, b, dtype=dtype if dtype.kind == "f" else np.dtype(DEFAULT_DTYPE)))


def neg(a): return Neg.apply(a)
def exp(a): return Exp.apply(a)
def log(a): return Log.apply(a)
def sqrt(a): return Sqrt.apply(a)
def abs(a): return Abs.apply(a)  # noqa: A001  (torch's name)
def sin(a): return Sin.apply(a)
def cos(a): return Cos.apply(a)
def cast(a, dtype): return Cast.apply(a, dtype=np.dtype(dtype))


def clip(a, lo=None, hi=None):
    """Clamp a to [lo, hi] (torch.clamp's min and max): numbers, or tensors that broadcast."""
    if lo is None and hi is None:
        raise ValueError("clip: give lo or hi (torch's min or max), or both")
    a, *bounds = _promoted(a, *(_number(b) for b in (lo, hi) if b is not None))
    xp = _xp(a.data)
    # a missing bound is one that never binds
    unbounded = (np.inf, -np.inf) if a.dtype.kind == "f" else \
        (np.iinfo(a.dtype).max, np.iinfo(a.dtype).min) if a.dtype.kind in "iu" else (True, False)
    lo = bounds.pop(0) if lo is not None else Tensor._wrap(xp.asarray(unbounded[1], dtype=a.dtype))
    hi = bounds.pop(0) if hi is not None else Tensor._wrap(xp.asarray(unbounded[0], dtype=a.dtype))
    return Clamp.apply(a, lo, hi)


def clamp(a, min=None, max=None):  # noqa: A002  (torch's names)
    """torch.clamp(input, min, max): clip under torch's names."""
    return clip(a, min, max)


def pow(a, p):  # noqa: A001
    """a ** p: for a number p by its own formula (the common case: x ** 2, x ** 0.5), else
    with both as tensors (2 ** x, x ** y)."""
    if isinstance(p, (bool, int, float, np.integer, np.floating)) and isinstance(a, Tensor):
        (a,) = _promoted(a, dtype=result_type(a, p))  # an integer tensor ** 0.5 is float32
        return Pow.apply(a, p=_number(p))
    return PowTensor.apply(*_promoted(a, p))


def where(condition, a, b):
    """a where condition holds, else b (broadcast together), as torch.where; the gradient
    goes to a where condition holds and to b elsewhere."""
    condition = condition.data if isinstance(condition, Tensor) else get_backend().asarray(condition)
    if condition.dtype != bool:
        raise TypeError(f"where: condition must be a boolean tensor, got {condition.dtype}")
    return Where.apply(*_promoted(a, b), condition=condition)


class Where(Function):
    def forward(self, a, b, condition=None):
        _check_same_shape("where", condition, a, b)
        self.condition = condition
        return _xp(a).where(condition, a, b)

    def backward(self, g):
        xp, c = _xp(g), self.condition
        return (xp.where(c, g, 0) if self.needs_input_grad[0] else None,
                xp.where(c, 0, g) if self.needs_input_grad[1] else None)


def _number(value):
    """A NumPy scalar as a Python number, which NumPy lets take the array's dtype
    (float32 ** np.float64(0.5) would be float64; float32 ** 0.5 stays float32)."""
    return value.item() if isinstance(value, np.generic) else value


# =====================================================================================
# Reductions
# =====================================================================================


def _axis(axis, ndim: int, op: str = "") -> int:
    """One axis as a number in [0, ndim), or ValueError naming it. As in torch, a 0-d tensor
    takes axis 0 or -1 (there is nothing to reduce or move: callers treat it as no axis)."""
    bound = ndim if ndim else 1
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{op + ': ' if op else ''}an axis must be an integer, got {axis!r}")
    if not -bound <= axis < bound:
        raise ValueError(f"{op + ': ' if op else ''}axis {axis} is out of range for a tensor with {ndim} dimensions")
    return int(axis) % bound


def _norm_axes(axis, ndim: int, op: str = "") -> tuple:
    """The axes a reduction runs over, sorted. None, or an empty tuple as in torch, means all."""
    axes = (axis,) if isinstance(axis, (int, np.integer)) else () if axis is None else tuple(axis)
    if not axes:
        return tuple(range(ndim))
    normed = [_axis(ax, ndim, op) for ax in axes]
    if len(set(normed)) != len(normed):
        raise ValueError(f"{op + ': ' if op else ''}axis {axes} names an axis twice")
    return tuple(sorted(normed)) if ndim else ()


def _check_not_empty(op: str, a, axes) -> None:
    """A max or min over an empty axis has no value (torch and NumPy refuse it too)."""
    if any(a.shape[i] == 0 for i in axes) or (not axes and a.size == 0):
        raise ValueError(f"{op}: cannot reduce over an empty axis of a tensor of shape {tuple(a.shape)}")


class Sum(Function):
    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axes = a.shape, _norm_axes(axis, a.ndim, "sum")
        return a.sum(axis=self.axes, keepdims=keepdims)

    def backward(self, g):
        xp = _xp(g)
        g = xp.expand_dims(g, self.axes) if g.ndim != len(self.shape) else g
        return xp.broadcast_to(g, self.shape)


class AMax(Function):
    """Largest value along axes (torch.amax). Ties share the gradient equally (a subgradient choice)."""

    def forward(self, a, axis=None, keepdims=False):
        self.a, self.axes = a, _norm_axes(axis, a.ndim, "amax")
        _check_not_empty("amax", a, self.axes)
        self.out = a.max(axis=self.axes, keepdims=True)
        return self.out if keepdims else self.out.reshape([n for i, n in enumerate(a.shape) if i not in self.axes])

    def backward(self, g):
        hit = self.a == self.out
        g = g.reshape(self.out.shape)
        ties = hit.sum(axis=self.axes, keepdims=True).astype(g.dtype)  # int64 would make float32 g float64
        return hit * (g / ties)


class TakeAlongAxis(Function):
    """a[..., index, ...] along one axis, index holding one position per line (length 1 on
    that axis): the values max() and cross_entropy pick. The gradient goes to those picks."""

    def forward(self, a, index=None, axis=0):
        self.shape, self.index, self.axis = a.shape, index, axis
        return _xp(a).take_along_axis(a, index, axis=axis)

    def backward(self, g):
        xp = _xp(g)
        positions = xp.arange(self.shape[self.axis]).reshape([-1 if i == self.axis else 1 for i in range(g.ndim)])
        return (positions == self.index) * g


class ValuesIndices(NamedTuple):
    """What torch.max(x, dim) and torch.min(x, dim) return: the values and where they are."""

    values: Tensor
    indices: Tensor


def sum(a, axis=None, keepdims=False):  # noqa: A001
    return Sum.apply(a, axis=axis, keepdims=keepdims)


def amax(a, axis=None, keepdims=False):
    """The largest values over ``axis`` (one axis, several, or all for None), as torch.amax."""
    return AMax.apply(a, axis=axis, keepdims=keepdims)


def amin(a, axis=None, keepdims=False):
    """The smallest values over ``axis``, as torch.amin: -amax(-a)."""
    return neg(amax(neg(a), axis, keepdims))


def max(a, axis=None, keepdims=False):  # noqa: A001
    """torch.max: the largest value of all (axis None, a 0-d tensor), or along one axis a
    ``ValuesIndices(values, indices)``: the largest value of each line and the position of
    its first occurrence, whose element alone gets the gradient (torch's rule; amax shares
    it among ties)."""
    if axis is None:
        return amax(a)
    if isinstance(axis, Tensor) or hasattr(axis, "shape"):
        raise TypeError("max: the elementwise maximum of two tensors (torch.max(a, b)) is not supported; "
                        "use where(a > b, a, b)")
    if not isinstance(axis, (int, np.integer)):
        raise TypeError(f"max: axis must be one integer, got {axis!r} (for several axes use amax)")
    a = _as_input(a, ())
    axes = _norm_axes(axis, a.ndim, "max")
    _check_not_empty("max", a, axes)
    xp = _xp(a.data)
    if not axes:  # a 0-d tensor: its value, at position 0
        return ValuesIndices(reshape(a, ()), Tensor._wrap(xp.zeros((), dtype=np.int64)))
    index = xp.expand_dims(xp.argmax(a.data, axis=axes[0]), axes[0])
    values = TakeAlongAxis.apply(a, index=index, axis=axes[0])
    if not keepdims:
        values, index = squeeze(values, axes[0]), index.squeeze(axes[0])
    return ValuesIndices(values, Tensor._wrap(index.astype(np.int64, copy=False)))


def min(a, axis=None, keepdims=False):  # noqa: A001
    """torch.min: as max, of -a."""
    if axis is None:
        return amin(a)
    if isinstance(axis, Tensor) or hasattr(axis, "shape"):
        raise TypeError("min: the elementwise minimum of two tensors (torch.min(a, b)) is not supported; "
                        "use where(a < b, a, b)")
    values, indices = max(neg(a), axis, keepdims)
    return ValuesIndices(neg(values), indices)


def mean(a, axis=None, keepdims=False):
    """sum / n; over no elements NaN, as torch's."""
    a = _as_input(a, ())
    count = math.prod(a.shape[i] for i in _norm_axes(axis, a.ndim, "mean"))
    return sum(a, axis, keepdims) * (1.0 / count if count else math.nan)


def var(a, axis=None, keepdims=False, *, correction=None, unbiased=None):
    """sum (x - mean)^2 / max(0, n - correction), as torch.var: ``correction=1`` by default
    (Bessel's correction, the unbiased estimate), ``correction=0`` for the biased variance
    normalisation layers use; torch's older ``unbiased=True/False`` is correction 1/0.
    With n - correction <= 0 the result is inf or NaN, as in torch."""
    if unbiased is not None:
        if correction is not None:
            raise ValueError("var: give correction or unbiased, not both")
        correction = 1 if unbiased else 0
    correction = 1 if correction is None else correction
    a = _as_input(a, ())
    n = math.prod(a.shape[i] for i in _norm_axes(axis, a.ndim, "var"))
    centred = a - mean(a, axis, keepdims=True)
    dof = n - correction
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 is NaN here, on purpose
        return sum(centred * centred, axis, keepdims) * (1.0 / dof if dof > 0 else math.inf)


# =====================================================================================
# Shapes and indexing
# =====================================================================================


class Reshape(Function):
    def forward(self, a, shape=()):
        self.shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot view a tensor of shape {tuple(a.shape)} as {tuple(shape)}") from None

    def backward(self, g):
        return g.reshape(self.shape)


class Permute(Function):
    def forward(self, a, axes=()):
        if len(axes) != a.ndim or not all(-a.ndim <= ax < a.ndim for ax in axes) \
                or sorted(ax % a.ndim for ax in axes) != list(range(a.ndim)):
            raise ValueError(f"permute: {tuple(axes)} is not a permutation of the {a.ndim} axes of {tuple(a.shape)}")
        self.axes = tuple(ax % a.ndim for ax in axes)
        return a.transpose(self.axes)

    def backward(self, g):
        return g.transpose(np.argsort(self.axes))


class Expand(Function):
    def forward(self, a, shape=()):
        return _xp(a).broadcast_to(a, shape)

    def backward(self, g):
        return g  # the engine sums it back down to the input's shape


def _is_basic_index(index) -> bool:
    """Slices, ints, None and Ellipsis select without repeats: backward can assign, not add."""
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (slice, int, type(None))) or i is Ellipsis for i in items)


class GetItem(Function):
    def forward(self, a, index=None):
        self.shape, self.dtype, self.index = a.shape, a.dtype, index
        return a[index]

    def backward(self, g):
        xp = _xp(g)
        grad = xp.zeros(self.shape, dtype=g.dtype)
        if _is_basic_index(self.index):
            grad[self.index] = g
        else:  # fancy indexing may pick an element twice: accumulate, don't assign
            _scatter_add(grad, self.index, g)
        return grad


def _scatter_add(target, index, values) -> None:
    """target[index] += values, summing repeated indices (what plain += does not do)."""
    if type(target).__module__.startswith("cupy"):
        import cupyx

        cupyx.scatter_add(target, index, values)
    else:
        np.add.at(target, index, values)


class Concat(Function):
    def forward(self, *arrays, axis=0):
        self.axis = axis
        self.bounds = np.cumsum([a.shape[axis] for a in arrays])[:-1]
        try:
            return _xp(*arrays).concatenate(arrays, axis=axis)
        except ValueError:
            raise ValueError(f"cat: shapes {[tuple(a.shape) for a in arrays]} do not match outside axis {axis}") from None

    def backward(self, g):
        return tuple(_xp(g).split(g, self.bounds, axis=self.axis))


class Pad(Function):
    """Constant padding, torch order: pad = (left, right, top, bottom, ...) from the last axis.

    A negative width crops instead, as in torch: the input is first cut to ``keep``, then
    padded by the positive widths; backward takes the gradient of the kept part back to
    its place and leaves zeros where the crop cut.
    """

    def forward(self, a, pad=(), value=0.0):
        widths = [(0, 0)] * a.ndim
        for i in range(len(pad) // 2):
            widths[a.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
        self.shape, self.dtype = a.shape, a.dtype
        self.keep = tuple(slice(-lo if lo < 0 else 0, n + hi if hi < 0 else n) for (lo, hi), n in zip(widths, a.shape))
        kept = a[self.keep]
        grown = [(lo if lo > 0 else 0, hi if hi > 0 else 0) for lo, hi in widths]
        self.inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(grown, kept.shape))
        return _xp(a).pad(kept, grown, constant_values=value)

    def backward(self, g):
        inner = g[self.inner]
        if inner.shape == self.shape:
            return inner
        grad = _xp(g).zeros(self.shape, dtype=g.dtype)
        grad[self.keep] = inner
        return grad


def reshape(a, shape):
    return Reshape.apply(a, shape=tuple(shape))


def flatten(a, start_axis=0, end_axis=-1):
    """Axes start_axis..end_axis merged into one; a 0-d tensor becomes shape (1,), as in torch."""
    shape = a.shape
    start, end = _axis(start_axis, len(shape), "flatten"), _axis(end_axis, len(shape), "flatten")
    if start > end:
        raise ValueError(f"flatten: start_axis {start_axis} comes after end_axis {end_axis} for shape {tuple(shape)}")
    return reshape(a, shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:])


def permute(a, axes):
    return Permute.apply(a, axes=tuple(axes))


def transpose(a, axis0, axis1):
    """Swap two axes (a 0-d tensor takes axis 0 or -1 and stays as it is, as in torch)."""
    i, j = _axis(axis0, a.ndim, "transpose"), _axis(axis1, a.ndim, "transpose")
    axes = list(range(a.ndim))
    if a.ndim:
        axes[i], axes[j] = axes[j], axes[i]
    return permute(a, axes)


def unsqueeze(a, axis):
    """A new axis of size 1 at ``axis``, which counts the new axis: -1 appends it."""
    shape = list(a.shape)
    shape.insert(_axis(axis, len(shape) + 1, "unsqueeze"), 1)
    return reshape(a, shape)


def squeeze(a, axis=None):
    """Drop size-1 axes: all of them, or those of ``axis`` (one or a tuple, as torch 2.0) that
    have size 1; an axis of another size stays, as in torch."""
    if axis is None:
        chosen = range(a.ndim)
    else:
        chosen = _norm_axes(axis, a.ndim, "squeeze") if not isinstance(axis, (tuple, list)) or axis else ()
    drop = {i for i in chosen if a.shape[i] == 1}
    return reshape(a, [n for i, n in enumerate(a.shape) if i not in drop])


def expand(a, shape):
    shape = tuple(a.shape[i - len(shape) + a.ndim] if n == -1 else n for i, n in enumerate(shape))
    return Expand.apply(a, shape=shape)


def getitem(a, index):
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
        whole_numbers = [isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) for i in index]
        if any(whole_numbers) and not _is_basic_index(index):
            # torch picks with whole numbers first and then indexes with the arrays, where
            # NumPy counts a whole number among the arrays (x[0, :, [1, 2]] is (2, n) there and
            # (n, 2) in torch); so pick first, with the arrays' axes kept whole, then index
            picked = GetItem.apply(a, index=tuple(i if w or _is_basic_index(i) else slice(None)
                                                  for i, w in zip(index, whole_numbers)))
            rest = tuple(i if not _is_basic_index(i) or i is Ellipsis else slice(None)
                         for i, w in zip(index, whole_numbers) if not w)
            return GetItem.apply(picked, index=rest)
    return GetItem.apply(a, index=index)


def cat(tensors: Sequence, axis=0):
    if not len(tensors):
        raise ValueError("cat: needs at least one tensor")
    ndim = tensors[0].ndim
    if ndim == 0:
        raise ValueError("cat: a 0-d tensor cannot be joined (unsqueeze it first, or use stack)")
    return Concat.apply(*tensors, axis=_axis(axis, ndim, "cat"))


def stack(tensors: Sequence, axis=0):
    return cat([unsqueeze(t, axis) for t in tensors], axis=axis)


def chunk(a, n: int, axis=0):
    """Split into pieces of ceil(size / n) along axis, the last one smaller where n does not
    divide the size (so there may be fewer than n pieces), as torch.chunk does."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"chunk: the number of pieces must be a positive integer, got {n!r}")
    if a.ndim == 0:
        raise ValueError("chunk: a 0-d tensor has no axis to split")
    axis = _axis(axis, a.ndim, "chunk")
    size = a.shape[axis]
    lead = (slice(None),) * axis
    if size == 0:  # torch: n empty pieces
        return [a[lead + (slice(0, 0),)] for _ in range(n)]
    step = -(-size // n)
    return [a[lead + (slice(i, i + step),)] for i in range(0, size, step)]


def pad(a, pad, mode="constant", value=None):
    """torch.nn.functional.pad with mode 'constant' (the only one here): ``pad`` holds
    (before, after) widths from the last axis backwards; negative widths crop."""
    if mode != "constant":
        raise ValueError(f"pad: only mode='constant' is supported, got mode={mode!r}")
    pad = tuple(int(p) for p in pad)
    if len(pad) % 2 or len(pad) // 2 > a.ndim:
        raise ValueError(f"pad: {len(pad)} widths do not give (before, after) pairs for the axes of {tuple(a.shape)}")
    for i in range(len(pad) // 2):
        before, after = pad[2 * i:2 * i + 2]
        if a.shape[a.ndim - 1 - i] + builtins.min(before, 0) + builtins.min(after, 0) < 0:
            raise ValueError(f"pad: widths {(before, after)} crop more than axis {a.ndim - 1 - i} "
                             f"of {tuple(a.shape)} holds")
    return Pad.apply(a, pad=pad, value=0.0 if value is None else _number(value))


# =====================================================================================
# Matrix products
# =====================================================================================


def _product(a, b):
    """a @ b, by the backend (the numpy backend shares the big products among the cores)."""
    return get_backend().ops.matmul(a, b)


class MatMul(Function):
    """C = A @ B (batched, broadcasting):  dA = dC B^T,  dB = A^T dC.

    As in torch, a vector A is a row (1, k) and a vector B a column (k, 1), and C, dA and dB
    lose that axis again; the engine sums dA and dB over broadcast batch axes.
    """

    def forward(self, a, b):
        try:
            if a.ndim == 0 or b.ndim == 0 or a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
                raise ValueError
            np.broadcast_shapes(a.shape[:-2], b.shape[:-2])  # the batch axes
        except ValueError:
            raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied") from None
        self.a_is_vector, self.b_is_vector = a.ndim == 1, b.ndim == 1
        self.a = a[None, :] if self.a_is_vector else a
        self.b = b[:, None] if self.b_is_vector else b
        c = _product(self.a, self.b)
        self.c_shape = c.shape  # (..., n or 1, m or 1), before the vectors' axes are dropped
        return c.reshape(c.shape[:-2] + c.shape[-2:-1] * (not self.a_is_vector) + c.shape[-1:] * (not self.b_is_vector))

    def backward(self, g):
        g = g.reshape(self.c_shape)  # the vectors' axes back
        da = _product(g, self.b.swapaxes(-1, -2)) if self.needs_input_grad[0] else None
        db = _product(self.a.swapaxes(-1, -2), g) if self.needs_input_grad[1] else None
        if da is not None and self.a_is_vector:
            da = da[..., 0, :]
        if db is not None and self.b_is_vector:
            db = db[..., 0]
        return da, db


class Linear(Function):
    """y = x W^T + b for x (..., in), W (out, in): one GEMM over all leading axes."""

    def forward(self, x, w, b=None):
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"linear: input of shape {tuple(x.shape)} has {x.shape[-1]} features, "
                             f"the weight {tuple(w.shape)} expects {w.shape[1]}")
        # rows counted, not -1: NumPy cannot infer -1 when a row holds no numbers (x of shape (2, 0))
        self.x2, self.w, self.x_shape = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), w, x.shape
        y = _product(self.x2, w.T)
        if b is not None:
            y += b
        return y.reshape(x.shape[:-1] + (w.shape[0],))

    def backward(self, g):
        g2 = g.reshape(len(self.x2), g.shape[-1])
        dx = _product(g2, self.w).reshape(self.x_shape) if self.needs_input_grad[0] else None
        dw = _product(g2.T, self.x2) if self.needs_input_grad[1] else None
        db = _column_sums(g2) if len(self.needs_input_grad) > 2 and self.needs_input_grad[2] else None
        return dx, dw, db


def _column_sums(a):
    """The sum over the rows of a 2-D array, as one BLAS product with a vector of ones: on NumPy
    3-6x faster than a.sum(axis=0) at the UNet's sizes (2,048 rows of 64 to 512 numbers)."""
    return _xp(a).ones(len(a), dtype=a.dtype) @ a


def matmul(a, b):
    return MatMul.apply(a, b)


def linear(x, weight, bias=None):
    x, weight = _as_input(x, ()), _as_input(weight, ())
    _check_param_shapes("linear", x, weight.shape[:1], bias=bias)
    _check_dtypes("linear", x, weight=weight, bias=bias)
    return Linear.apply(x, weight) if bias is None else Linear.apply(x, weight, bias)


# =====================================================================================
# Activations
# =====================================================================================


class ReLU(Function):
    def forward(self, a):
        self.positive = a > 0
        return a * self.positive

    def backward(self, g):
        return g * self.positive


class Sigmoid(Function):
    def forward(self, a):
        self.out = _sigmoid(a)
        return self.out

    def backward(self, g):
        return g * self.out * (1 - self.out)


class Tanh(Function):
    def forward(self, a):
        self.out = _xp(a).tanh(a)
        return self.out

    def backward(self, g):
        return g * (1 - self.out * self.out)


def _sigmoid(a):
    """1 / (1 + e^-a), written via tanh so that it never overflows: s(a) = (1 + tanh(a/2)) / 2."""
    xp = _xp(a)
    half = a.dtype.type(0.5)
    return half + half * xp.tanh(half * a)


# SiLU, GELU, GEGLU and layer norm hand their arithmetic to the backend (backend.ops), like
# the three primitives: the numpy backend runs these formulas block by block in place on all
# cores (minisd/backends/fast_cpu.py), the others as the whole-array expressions of
# minisd/backends/naive.py. The math is in each class's docstring.


class ScaledSiLU(Function):
    """y = a * s, s = sigmoid(beta * a): SiLU/swish for beta = 1 (UNet, VAE), quick_gelu for beta = 1.702 (CLIP).

    d/da = s + beta * a * s * (1 - s) = s + beta * y * (1 - s).
    """

    def forward(self, a, beta=1.0):
        self.ops, self.beta = get_backend().ops, beta
        self.y, self.s = self.ops.silu_forward(a, beta)
        return self.y

    def backward(self, g):
        return self.ops.silu_backward(g, self.y, self.s, self.beta)


class GELU(Function):
    """Gaussian error linear unit, x * Phi(x): exact (erf) or the tanh approximation.

    Exact: Phi(x) = (1 + erf(x / sqrt 2)) / 2, d/dx = Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi).
    The forward pass computes that slope while it has exp(-x^2 / 2) in hand, when a
    backward pass can follow, so the backward pass is one product.
    Tanh: 0.5 x (1 + t), t = tanh(c (x + 0.044715 x^3)), c = sqrt(2 / pi).
    """

    def forward(self, a, approximate="none"):
        self.approximate = approximate
        if approximate == "tanh":
            c = a.dtype.type(math.sqrt(2 / math.pi))
            self.a, self.t = a, _xp(a).tanh(c * (a + a.dtype.type(0.044715) * a ** 3))
            return 0.5 * a * (1 + self.t)
        y, self.slope = get_backend().ops.gelu_forward(a, keep_slope=self.recording)
        return y

    def backward(self, g):
        if self.approximate == "tanh":
            a, c = self.a, self.a.dtype.type(math.sqrt(2 / math.pi))
            dinner = c * (1 + 3 * a.dtype.type(0.044715) * a * a)
            return g * (0.5 * (1 + self.t) + 0.5 * a * (1 - self.t * self.t) * dinner)
        return g * self.slope


class GEGLU(Function):
    """GEGLU(x) = h * GELU(g), where [h, g] = x splits the last axis in two halves (Shazeer 2020).

    The UNet's feed-forward gate. One op rather than chunk, GELU and a product: its
    gradient is written straight into the two halves of one array,
        dh = grad * GELU(g),   dg = grad * h * GELU'(g),   GELU'(g) = Phi(g) + g * pdf(g),
    where the three-op chain would fill two zero arrays of x's size and add them. As in
    GELU, the forward pass keeps the slope GELU'(g) when a backward pass can follow.
    """

    def forward(self, x):
        if x.shape[-1] % 2:
            raise ValueError(f"geglu: the last axis of {tuple(x.shape)} does not split into two halves")
        self.ops, self.h = get_backend().ops, x[..., :x.shape[-1] // 2]
        y, self.gelu_g, self.slope = self.ops.geglu_forward(x, keep_slope=self.recording)
        return y

    def backward(self, grad):
        return self.ops.geglu_backward(grad, self.h, self.gelu_g, self.slope)


class Softmax(Function):
    """p = exp(a - max a) / sum exp(a - max a) (stable);  da = p * (g - sum(g * p))."""

    def forward(self, a, axis=-1):
        self.axis = axis
        e = _xp(a).exp(a - a.max(axis=axis, keepdims=True) if a.size else a)  # (an empty axis has no max)
        self.p = e / e.sum(axis=axis, keepdims=True)
        return self.p

    def backward(self, g):
        return self.p * (g - (g * self.p).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    """log p = a - logsumexp(a) (stable);  da = g - p * sum(g)."""

    def forward(self, a, axis=-1):
        xp, self.axis = _xp(a), axis
        shifted = a - a.max(axis=axis, keepdims=True) if a.size else a
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.p = xp.exp(out)
        return out

    def backward(self, g):
        return g - self.p * g.sum(axis=self.axis, keepdims=True)


def relu(a): return ReLU.apply(a)
def sigmoid(a): return Sigmoid.apply(a)
def tanh(a): return Tanh.apply(a)
def silu(a): return ScaledSiLU.apply(a, beta=1.0)
def quick_gelu(a): return ScaledSiLU.apply(a, beta=1.702)  # CLIP's x * sigmoid(1.702 x)
def gelu(a, approximate="none"):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return GELU.apply(a, approximate=approximate)
def geglu(x): return GEGLU.apply(x)
def softmax(a, axis=-1): return _over_axis(Softmax, a, axis, "softmax")
def log_softmax(a, axis=-1): return _over_axis(LogSoftmax, a, axis, "log_softmax")


def _over_axis(op, a, axis, name):
    """op along one axis; a 0-d tensor as the one element of shape (1,) (softmax 1, log 0)."""
    a = _as_input(a, ())
    axis = _axis(axis, a.ndim, name)
    if a.ndim == 0:
        return reshape(op.apply(reshape(a, (1,)), axis=0), ())
    return op.apply(a, axis=axis)


# =====================================================================================
# Normalisation
# =====================================================================================


class LayerNorm(Function):
    """Over the last D axes:  xhat = (x - mu) / sqrt(var + eps),  y = xhat * gamma + beta.

    Backward (n values per row):  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
    with g = dy * gamma, the same formula as group norm's; dgamma = sum dy * xhat and
    dbeta = sum dy over the rows.
    """

    def forward(self, x, weight=None, bias=None, normalized_ndim=1, eps=1e-5):
        self.ops, self.weight = get_backend().ops, weight
        y, self.xhat, self.rstd = self.ops.layer_norm_forward(x, normalized_ndim, weight, bias, eps)
        return y

    def backward(self, dy):
        need = tuple(self.needs_input_grad) + (False, False)
        return self.ops.layer_norm_backward(dy, self.xhat, self.rstd, self.weight, *need[:3])


def _scale_and_shift(x, weight, bias, shape) -> tuple:
    """(weight, bias) as the norms take them: both or neither. torch lets either be left out
    (LayerNorm(bias=False)); the missing one is then its identity, ones or zeros, a constant."""
    if weight is None and bias is None:
        return ()
    x = _as_input(x, ())
    xp = _xp(x.data)
    if weight is None:
        weight = Tensor._wrap(xp.ones(shape, dtype=x.dtype))
    if bias is None:
        bias = Tensor._wrap(xp.zeros(shape, dtype=x.dtype))
    return weight, bias


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[-len(shape):]) != shape:
        raise ValueError(f"layer_norm: normalized_shape {shape} does not match the trailing axes of {tuple(x.shape)}")
    _check_param_shapes("layer_norm", x, shape, weight=weight, bias=bias)
    _check_dtypes("layer_norm", x, weight=weight, bias=bias)
    if x.size == 0:  # no rows, or rows of no numbers: nothing to normalise
        return Empty.apply(*(t for t in (x, weight, bias) if t is not None), shape=x.shape)
    return LayerNorm.apply(x, *_scale_and_shift(x, weight, bias, shape), normalized_ndim=len(shape), eps=eps)


class GroupNorm(Function):
    """Normalise each group of C/G channels of each sample; the arithmetic is backend.ops'."""

    def forward(self, x, weight=None, bias=None, num_groups=1, eps=1e-5):
        self.ops = get_backend().ops
        self.x, self.weight, self.num_groups = x, weight, num_groups
        y, self.mean, self.rstd = self.ops.group_norm_forward(x, num_groups, weight, bias, eps)
        return y

    def backward(self, dy):
        dx, dw, db = self.ops.group_norm_backward(dy, self.x, self.num_groups, self.weight, self.mean, self.rstd)
        return dx, dw, db


def group_norm(x, num_groups: int, weight=None, bias=None, eps=1e-5):
    x = _as_input(x, ())
    if not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"group_norm: num_groups must be a positive integer, got {num_groups!r}")
    if x.ndim < 2 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm: {x.shape[1] if x.ndim > 1 else '?'} channels of input {tuple(x.shape)} "
                         f"do not split into {num_groups} groups")
    _check_param_shapes("group_norm", x, x.shape[1:2], weight=weight, bias=bias)
    _check_dtypes("group_norm", x, weight=weight, bias=bias)
    if x.size == 0:  # an empty batch (or image): nothing to normalise
        return Empty.apply(*(t for t in (x, weight, bias) if t is not None), shape=x.shape)
    return GroupNorm.apply(x, *_scale_and_shift(x, weight, bias, x.shape[1:2]), num_groups=num_groups,
                           eps=float(eps))  # an np.float64 eps would promote


class Empty(Function):
    """What an op gives for an empty input (a batch of 0 images, say): a result of ``shape``
    with no numbers in it that depend on the inputs, and zero gradients for every input (a
    weight used on no image, as in torch). So the backends never see an empty array."""

    def forward(self, *arrays, shape=()):
        self.inputs = [(a.shape, a.dtype) for a in arrays]
        return _xp(*arrays).zeros(shape, dtype=arrays[0].dtype)

    def backward(self, g):
        xp = _xp(g)
        return tuple(xp.zeros(shape, dtype=dtype) for shape, dtype in self.inputs)


def _check_dtypes(op: str, x, **params) -> None:
    """torch's rule for layers: a floating-point input, and every parameter of its dtype.
    (No promotion: the kernels run one dtype, and a float64 or float16 image meeting float32
    weights is more often a slip than a wish; cast with .astype.)"""
    if x.dtype.kind != "f":
        raise TypeError(f"{op}: the input is {x.dtype}; it must be a floating-point tensor "
                        f"of the weights' dtype (cast it with .astype)")
    for name, p in params.items():
        if p is not None and p.dtype != x.dtype:
            raise TypeError(f"{op}: the input is {x.dtype} but the {name} is {p.dtype}; "
                            "they must have the same dtype (cast with .astype)")


# =====================================================================================
# Convolution and resampling
# =====================================================================================


def _square(name: str, value) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"conv2d: only square {name} is supported, got {tuple(value)}")
        value = value[0]
    return int(value)


class Conv2d(Function):
    """2-D cross-correlation (torch's conv2d); the arithmetic is backend.ops'."""

    def forward(self, x, w, b=None, stride=1, padding=0):
        self.ops = get_backend().ops
        self.x, self.w, self.stride, self.padding = x, w, stride, padding
        return self.ops.conv2d_forward(x, w, b, stride, padding)

    def backward(self, dy):
        need = self.needs_input_grad
        return self.ops.conv2d_backward(dy, self.x, self.w, self.stride, self.padding,
                                        need[0], need[1], len(need) > 2 and need[2])


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv2d for x (N, C, H, W) or one image (C, H, W), with square
    stride and padding ('valid' is 0; 'same' keeps H x W, for stride 1 and an odd square
    kernel), dilation 1 and groups 1 (others are refused by name)."""
    x, weight = _as_input(x, ()), _as_input(weight, ())
    if groups != 1:
        raise ValueError(f"conv2d: groups={groups} is not supported (only groups=1)")
    if _square("dilation", dilation) != 1:
        raise ValueError(f"conv2d: dilation={dilation} is not supported (only dilation=1)")
    stride = _square("stride", stride)
    if isinstance(padding, str):
        padding = _named_padding(padding, weight.shape, stride)
    padding = _square("padding", padding)
    if stride < 1 or padding < 0:
        raise ValueError(f"conv2d: stride must be >= 1 and padding >= 0 (negative padding is not supported), "
                         f"got stride={stride}, padding={padding}")
    if x.ndim == 3 and weight.ndim == 4:  # one image, as torch takes it
        return squeeze(conv2d(unsqueeze(x, 0), weight, bias, stride, padding), 0)
    if x.ndim != 4 or weight.ndim != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv2d: input {tuple(x.shape)} and weight {tuple(weight.shape)} do not match "
                         "(expected (N, C, H, W) and (K, C, R, S))")
    H, W = x.shape[2] + 2 * padding, x.shape[3] + 2 * padding
    if H < weight.shape[2] or W < weight.shape[3]:
        raise ValueError(f"conv2d: kernel {tuple(weight.shape[2:])} is larger than the padded input ({H}, {W})")
    _check_param_shapes("conv2d", x, weight.shape[:1], bias=bias)
    _check_dtypes("conv2d", x, weight=weight, bias=bias)
    args = (x, weight) if bias is None else (x, weight, bias)
    out_shape = (x.shape[0], weight.shape[0], (H - weight.shape[2]) // stride + 1, (W - weight.shape[3]) // stride + 1)
    if 0 in weight.shape[:2]:  # (torch refuses these too)
        raise ValueError(f"conv2d: a weight {tuple(weight.shape)} with no filters or no channels is not supported")
    if x.shape[0] == 0:  # an empty batch
        return Empty.apply(*args, shape=out_shape)
    return Conv2d.apply(*args, stride=stride, padding=padding)


def _named_padding(padding: str, weight_shape, stride: int) -> int:
    if padding == "valid":
        return 0
    if padding != "same":
        raise ValueError(f"conv2d: padding must be a number, a pair, 'valid' or 'same', got {padding!r}")
    kernel = tuple(weight_shape[2:])
    if stride != 1:
        raise ValueError("conv2d: padding='same' needs stride 1 (as in torch)")
    if len(set(kernel)) != 1 or kernel[0] % 2 == 0:
        raise ValueError(f"conv2d: padding='same' with kernel {kernel} pads unevenly, which is not supported "
                         "(only odd square kernels)")
    return (kernel[0] - 1) // 2


class UpsampleNearest(Function):
    """Nearest-neighbour upsampling by an integer factor; backward sums each factor x factor block."""

    def forward(self, x, factor=2):
        N, C, H, W = x.shape
        self.factor = factor
        out = _xp(x).empty((N, C, H, factor, W, factor), dtype=x.dtype)
        out[...] = x[:, :, :, None, :, None]
        return out.reshape(N, C, H * factor, W * factor)

    def backward(self, g):
        N, C, H, W = g.shape
        f = self.factor
        # The sum of each f x f block: f neighbours along W, then f along H, as adds of strided
        # slices (a .sum over the two short axes runs element by element: 7-10x slower).
        columns = g.reshape(N, C, H, W // f, f)
        across = _added([columns[..., j] for j in range(f)])
        rows = across.reshape(N, C, H // f, f, W // f)
        return _added([rows[:, :, :, i] for i in range(f)])


def _added(parts):
    """parts[0] + parts[1] + ..., in that order, into a new array."""
    total = parts[0] + parts[1] if len(parts) > 1 else parts[0].copy()
    for part in parts[2:]:
        total += part
    return total


class ResizeNearest(Function):
    """Nearest-neighbour resizing of the spatial axes (all after N and C: L, H x W or
    D x H x W) to ``size``, by PyTorch's rule for each axis:
        y[..., i, ...] = x[..., src[i], ...],   src[i] = min(floor(i * scale), n_in - 1)
    with scale = n_in / n_out, or 1 / scale_factor when torch is given one (and does not
    recompute it), rounded to float32 and the product taken in float32, as ATen computes
    it (in float64 for a float64 tensor), so that the same pixels are picked where
    i * scale falls on a whole number (and a factor of 1.1 on 2 pixels picks pixel 0
    twice). The backward adds each gradient onto the element it was copied from: for each
    axis, a product with the 0/1 matrix S (n_out, n_in), S[i, src[i]] = 1, which runs on NumPy and
    CuPy alike.
    """

    def forward(self, x, size=(1, 1), scales=(None, None)):
        xp = _xp(x)
        self.shape = x.shape
        self.picks = [self.nearest(n_in, n_out, xp, scale, x.dtype)
                      for n_in, n_out, scale in zip(x.shape[2:], size, scales)]
        for axis, src in enumerate(self.picks, start=2):
            x = x.take(src, axis=axis)
        return x

    @staticmethod
    def nearest(n_in: int, n_out: int, xp, scale_factor=None, dtype=np.float32):
        f = np.float64 if dtype == np.float64 else np.float32  # ATen's arithmetic type for the tensor's dtype
        scale = f(1.0 / scale_factor) if scale_factor else f(n_in) / f(n_out)
        index = np.floor(np.arange(n_out, dtype=f) * scale).astype(np.int64)
        return xp.asarray(np.minimum(index, n_in - 1))

    def backward(self, g):
        xp = _xp(g)
        for axis, (src, n_in) in enumerate(zip(self.picks, self.shape[2:]), start=2):
            picks = (src[:, None] == xp.arange(n_in)).astype(g.dtype)  # S (n_out, n_in)
            g = xp.moveaxis(xp.moveaxis(g, axis, -1) @ picks, -1, axis)
        return g


def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,  # noqa: A002
                recompute_scale_factor=None, antialias=False):
    """torch.nn.functional.interpolate with mode='nearest', for (N, C, L), (N, C, H, W) and
    (N, C, D, H, W) inputs: to ``size`` (one number or one per spatial axis), or by
    ``scale_factor`` (likewise), with torch's output sizes floor(n * scale_factor) and
    torch's choice of source pixels (ResizeNearest). A whole factor on an image takes the
    fast path (UpsampleNearest)."""
    if mode != "nearest":
        raise ValueError(f"interpolate: only mode='nearest' is supported, got mode={mode!r}")
    if align_corners is not None or antialias:
        raise ValueError("interpolate: align_corners and antialias do not apply to mode='nearest' (as in torch)")
    x = _as_input(input, ())
    if x.ndim not in (3, 4, 5):
        raise ValueError(f"interpolate: the input must be (N, C, L), (N, C, H, W) or (N, C, D, H, W), "
                         f"got shape {tuple(x.shape)}")
    spatial = x.shape[2:]
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate: give size or scale_factor (one of them)")

    def per_axis(value, name, kind):
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(spatial)
        if len(values) != len(spatial) or not all(isinstance(v, kind) and v > 0 for v in values):
            raise ValueError(f"interpolate: {name} must be one positive number or {len(spatial)} of them "
                             f"for an input {tuple(x.shape)}, got {name}={value!r}")
        return values

    if size is not None:
        size, scales = per_axis(size, "size", (int, np.integer)), (None,) * len(spatial)
    else:
        factors = tuple(float(f) for f in per_axis(scale_factor, "scale_factor", (int, float, np.number)))
        size = tuple(math.floor(n * f) for n, f in zip(spatial, factors))
        scales = (None,) * len(spatial) if recompute_scale_factor else factors
        if builtins.min(size) < 1:
            raise ValueError(f"interpolate: scale_factor={scale_factor} makes an empty output {size} "
                             f"from {tuple(spatial)}")
    size = tuple(int(n) for n in size)
    factor = size[0] // spatial[0] if spatial[0] else 0
    if x.ndim == 4 and factor >= 1 and all(n == m * factor for n, m in zip(size, spatial)) \
            and all(s is None or s == factor for s in scales):
        return UpsampleNearest.apply(x, factor=factor)  # floor(i / factor), the common case
    return ResizeNearest.apply(x, size=size, scales=scales)


# =====================================================================================
# Attention
# =====================================================================================


class Attention(Function):
    """softmax(scale * Q K^T) V over (B, heads, L, d) arrays; the arithmetic is backend.ops'."""

    def forward(self, q, k, v, scale=1.0, is_causal=False):
        self.ops = get_backend().ops
        self.scale, self.is_causal = scale, is_causal
        o, lse = self.ops.attention_forward(q, k, v, scale, is_causal)
        self.saved = (q, k, v, o, lse)
        return o

    def backward(self, do):
        return self.ops.attention_backward(do, *self.saved, self.scale, self.is_causal)


def scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """softmax(Q K^T / sqrt(d) + mask) V, as torch's, for q (..., Lq, d), k and v (..., Lk, d).

    Without ``attn_mask`` the fused primitive runs (a kernel on a GPU). A mask (boolean:
    True = keep; or additive floats, which get a gradient when they are a Tensor that
    requires one) is applied by composing the ops above. Attention dropout is not here.
    """
    if dropout_p:
        raise ValueError(f"scaled_dot_product_attention: dropout_p={dropout_p} is not supported (only 0)")
    if not q.ndim == k.ndim == v.ndim:
        raise ValueError(f"scaled_dot_product_attention: q, k and v of different ranks are not supported "
                         f"(no broadcasting of batch axes), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1] or q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"scaled_dot_product_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} do not fit (..., Lq, d), (..., Lk, d), (..., Lk, dv)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if attn_mask is None:
        lead = q.shape[:-2]
        as4d = lambda t: reshape(t, (-1, 1) + t.shape[-2:]) if t.ndim != 4 else t  # noqa: E731
        out = Attention.apply(as4d(q), as4d(k), as4d(v), scale=scale, is_causal=bool(is_causal))
        return reshape(out, lead + out.shape[-2:]) if q.ndim != 4 else out
    scores = matmul(q, transpose(k, -1, -2)) * scale
    mask = attn_mask if isinstance(attn_mask, Tensor) else Tensor._wrap(get_backend().asarray(attn_mask))
    if mask.dtype == bool:
        mask = Tensor._wrap(_xp(mask.data).where(mask.data, 0.0, -np.inf))
    if mask.dtype != scores.dtype:  # a float64 mask must not turn float32 scores float64
        mask = cast(mask, scores.dtype)
    if is_causal:
        Lq, Lk = q.shape[-2], k.shape[-2]
        mask = mask + _xp(mask.data).triu(_xp(mask.data).full((Lq, Lk), -np.inf, dtype=scores.dtype), k=1)
    return matmul(softmax(scores + mask, axis=-1), v)


def attention_probabilities(q, k, attn_mask=None, is_causal=False, scale=None):
    """The attention weights P = softmax(Q K^T * scale) as a plain array, for looking at (no graph)."""
    q, k = (t.data if isinstance(t, Tensor) else t for t in (q, k))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.swapaxes(-1, -2)) * q.dtype.type(scale)
    if attn_mask is not None:
        mask = attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask
        s = _xp(s).where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    if is_causal:
        s = s + _xp(s).triu(_xp(s).full(s.shape[-2:], -np.inf, dtype=s.dtype), k=1)
    e = _xp(s).exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# =====================================================================================
# Embeddings and dropout
# =====================================================================================


class Embedding(Function):
    """Row lookup weight[ids]; backward adds each gradient row into its id (repeats summed)."""

    def forward(self, weight, ids=None):
        if ids.dtype.kind not in "iu":
            raise TypeError(f"embedding: ids must be integers, got {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= weight.shape[0]):
            raise ValueError(f"embedding: ids must lie in [0, {weight.shape[0]}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        self.ids, self.shape = ids, weight.shape
        return weight[ids]

    def backward(self, g):
        grad = _xp(g).zeros(self.shape, dtype=g.dtype)
        _scatter_add(grad, self.ids.reshape(-1), g.reshape(-1, self.shape[1]))
        return grad


def embedding(ids, weight):
    ids = ids.data if isinstance(ids, Tensor) else get_backend().asarray(ids)
    return Embedding.apply(weight, ids=ids)


def dropout(x, p=0.5, training=True, rng: np.random.Generator | None = None):
    """Zero each element with probability p and scale the rest by 1/(1-p) (inverted dropout)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    rng = rng or np.random.default_rng()
    keep = get_backend().asarray(rng.random(x.shape) >= p)
    return x * (keep * x.dtype.type(1 / (1 - p)))


# =====================================================================================
# Losses
# =====================================================================================


def mse_loss(input, target, reduction="mean"):  # noqa: A002  (torch's name)
    if tuple(input.shape) != tuple(target.shape):
        raise ValueError(f"mse_loss: input {tuple(input.shape)} and target {tuple(target.shape)} differ in shape")
    diff = input - target
    sq = diff * diff
    if reduction == "mean":
        return mean(sq)
    if reduction == "sum":
        return sum(sq)
    if reduction == "none":
        return sq
    raise ValueError(f"mse_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def cross_entropy(input, target, weight=None, *, ignore_index=-100, reduction="mean",  # noqa: A002
                  label_smoothing=0.0):
    """torch.nn.functional.cross_entropy: -log softmax(input)[target] over the class axis.

    ``input`` is (N, C), (N, C, d1, ...) or one sample (C,). ``target`` is either class
    indices (N,) / (N, d1, ...) / (), or class probabilities of input's shape. Each
    index must name a class in [0, C), or equal ``ignore_index``: that element adds
    nothing and is left out of the mean, which divides by the (weighted) count of the
    others. ``weight`` (C,) scales each class's loss. ``reduction``: 'mean', 'sum', 'none'.
    """
    if label_smoothing:
        raise ValueError(f"cross_entropy: label_smoothing={label_smoothing} is not supported (only 0)")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    logits = _as_input(input, ())
    if logits.ndim == 0:
        raise ValueError("cross_entropy: input must have a class axis, got a 0-d tensor")
    axis = 1 if logits.ndim > 1 else 0  # the class axis
    classes = logits.shape[axis]
    if weight is not None:
        _check_param_shapes("cross_entropy", logits, (classes,), weight=weight)
        weight = _as_input(weight, ())
    log_p = log_softmax(logits, axis=axis)
    if np.dtype(getattr(target, "dtype", None) or np.asarray(target).dtype).kind == "f":  # probabilities
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(f"cross_entropy: class probabilities {tuple(target.shape)} must have the shape of "
                             f"input {tuple(logits.shape)}")
        if weight is not None:  # along the class axis
            log_p = log_p * reshape(weight, (classes,) + (1,) * (logits.ndim - axis - 1))
        losses = -sum(target * log_p, axis)
        return losses if reduction == "none" else sum(losses) if reduction == "sum" else mean(losses)

    target = target.data if isinstance(target, Tensor) else get_backend().asarray(target)
    expected = logits.shape[:axis] + logits.shape[axis + 1:]
    if target.dtype.kind not in "iu" or tuple(target.shape) != expected:
        raise ValueError(f"cross_entropy: input {tuple(logits.shape)} and target {tuple(target.shape)} "
                         f"({target.dtype}) should be (N, classes, ...) and class indices (N, ...)")
    xp = _xp(target)
    counted = target != ignore_index
    bad = counted & ((target < 0) | (target >= classes))
    if bad.any():
        raise ValueError(f"cross_entropy: target {int(target[bad].reshape(-1)[0])} is out of range for {classes} "
                         f"classes (expected a class in [0, {classes}) or ignore_index={ignore_index})")
    safe = xp.where(counted, target, 0)  # any class will do where ignored: its loss is scaled by 0
    picked = reshape(TakeAlongAxis.apply(log_p, index=xp.expand_dims(safe, axis), axis=axis), expected)
    scale = counted.astype(logits.dtype)  # each element's weight in the loss
    if weight is not None:
        scale = weight.data[safe] * scale
    losses = -picked * scale
    if reduction == "none":
        return losses
    total = sum(losses)
    if reduction == "sum":
        return total
    count = float(scale.sum())
    if count == 0:  # every element ignored: NaN as in torch (0 / 0), with zero gradients
        return total * 0.0 + math.nan
    return total * (1.0 / count)
