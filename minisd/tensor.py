"""The autograd engine: a Tensor that remembers how it was made, and backward() that walks back.

Every Tensor holds an array (``data``: NumPy or CuPy) and, when it was computed from
other tensors that need gradients, the Function that made it (``_ctx``). The Functions
form a directed acyclic graph from the inputs to, say, a scalar loss L. backward() visits
that graph in reverse topological order and applies the chain rule at each node:

    dL/dx_i = sum over the ops f that used x_i of  (df/dx_i)^T  dL/df

Each Function supplies the vector-Jacobian product ``backward(grad_out) -> grad_inputs``;
the engine does the bookkeeping: the order of the walk, summing the gradients of a
tensor used more than once, undoing broadcasting (its adjoint is a sum), and freeing
each node's saved arrays as soon as its gradient has been passed on.

This file holds only the engine. The operations themselves live in functional.py;
the operator methods below (``a + b``, ``x.sum()``) are thin calls into it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np

from minisd.backends import get_array_module, get_backend, to_numpy

DEFAULT_DTYPE = np.float32

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Within this block no graph is recorded: results have no _ctx, inputs keep nothing alive."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


class Tensor:
    """An n-dimensional array with an optional gradient, in the manner of torch.Tensor.

    ``Tensor(data)`` copies nothing when ``data`` is already an array of the backend's
    kind; Python numbers and lists become float32 (``DEFAULT_DTYPE``); arrays keep their
    dtype: integer ids stay integers, float64 stays float64 (for gradient checks).
    """

    # _freed: this tensor was made by an op whose graph a backward() has already freed
    __slots__ = ("data", "grad", "requires_grad", "_ctx", "_freed", "__weakref__")
    # Make ``ndarray + Tensor`` call Tensor.__radd__ instead of NumPy's own loop.
    __array_ufunc__ = None

    def __init__(self, data: Any, requires_grad: bool = False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        if dtype is None and not hasattr(data, "dtype"):
            dtype = DEFAULT_DTYPE  # Python numbers and lists
        self.data = get_backend().asarray(data, dtype=dtype)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx: Function | None = None
        self._freed = False
        if self.requires_grad and self.data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got {self.data.dtype}")

    @classmethod
    def _wrap(cls, array, ctx: Function | None = None) -> Tensor:
        """A Tensor around an array an op just computed: no conversion, no checks."""
        t = cls.__new__(cls)
        t.data, t.grad, t._ctx, t._freed = array, None, ctx, False
        t.requires_grad = ctx is not None
        return t

    # ---- what the array looks like -------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    T = property(lambda self: self.transpose(-1, -2))

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({to_numpy(self.data)!r}{grad})"

    def numpy(self) -> np.ndarray:
        """The values as a NumPy array on the host (a copy only when they live on a GPU)."""
        return to_numpy(self.data)

    def __bool__(self) -> bool:
        """NumPy's rule (and torch's): one element gives its truth, more is an error. Without
        this, Python would use len(), and ``if (x > 1):`` or ``b in [a]`` would be True for any x."""
        return bool(self.data)

    def __float__(self) -> float:
        return float(self.item())

    def __array__(self, dtype=None, copy=None):
        """np.asarray(tensor) gives the values (not an object array of 0-d Tensors); no graph."""
        array = self.numpy()
        return array if dtype is None else array.astype(dtype, copy=False)

    def item(self) -> float:
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.reshape(()).item()

    def detach(self) -> Tensor:
        """The same array, cut from the graph."""
        return Tensor._wrap(self.data)

    def astype(self, dtype) -> Tensor:
        from minisd import functional as F

        return F.cast(self, dtype)

    def zero_grad(self) -> None:
        self.grad = None

    # ---- the backward pass -----------------------------------------------------------
    def backward(self, grad=None) -> None:
        """Accumulate dself/dleaf into ``leaf.grad`` for every leaf that requires grad.

        ``grad`` is dL/dself; it may be omitted only when self holds a single number
        (then it is 1, as for a loss).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() called on a tensor that does not require grad "
                               "(no input required grad, or it was computed under no_grad())")
        xp = get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() on a tensor of shape {self.shape} needs a gradient "
                                   "argument; only a single-element tensor (a loss) gets 1 implicitly")
            grad = xp.ones_like(self.data)
        else:
            grad = xp.asarray(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype)  # keep float32
            if grad.shape != self.shape:
                raise ValueError(f"backward(): gradient of shape {grad.shape} for a tensor of shape {self.shape}")

        order = _topological_order(self)
        if any(node._freed for node in order):  # checked first, so that no leaf gets half a gradient
            raise RuntimeError("backward() through a graph that an earlier backward() already freed; "
                               "minisd frees the graph as it goes (torch's retain_graph=False): "
                               "run the forward pass again, or sum the losses and call backward() once")
        grads = {id(self): grad}  # dL/dnode for the nodes reached so far
        for i, node in enumerate(order):
            order[i] = None  # let go of the node: its arrays die as soon as its users are done
            g = grads.pop(id(node), None)
            ctx = node._ctx
            if g is None:
                continue
            if ctx is None:  # a leaf: keep its gradient, summed over backward() calls
                # A copy of its own: g may be a read-only broadcast view (x.sum()) or the very
                # array another leaf got (a + b), and optimisers and clipping write grads in place.
                node.grad = g.copy() if node.grad is None else node.grad + g
                continue
            input_grads = ctx.backward(g)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            for parent, pg in zip(ctx.parents, input_grads):
                if pg is None or not parent.requires_grad:
                    continue
                pg = _unbroadcast(pg, parent.shape)
                if pg.dtype != parent.dtype:  # as torch: a gradient has its tensor's dtype (x32 * y64)
                    pg = pg.astype(parent.dtype)
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg
            node._ctx, node._freed = None, True  # free the graph as we go: the saved arrays die here
            del ctx

    # ---- operators: all defined in functional.py -----------------------------------
    def __add__(self, o): return F.add(self, o)
    def __radd__(self, o): return F.add(o, self)
    def __sub__(self, o): return F.sub(self, o)
    def __rsub__(self, o): return F.sub(o, self)
    def __mul__(self, o): return F.mul(self, o)
    def __rmul__(self, o): return F.mul(o, self)
    def __truediv__(self, o): return F.div(self, o)
    def __rtruediv__(self, o): return F.div(o, self)
    def __pow__(self, p): return F.pow(self, p)
    def __rpow__(self, base): return F.pow(base, self)
    def __neg__(self): return F.neg(self)
    def __abs__(self): return F.abs(self)
    def __matmul__(self, o): return F.matmul(self, o)
    def __rmatmul__(self, o): return F.matmul(o, self)
    def __getitem__(self, index): return F.getitem(self, index)

    # Comparisons give boolean tensors that carry no gradient.
    def _compare(self, other, op):
        other = other.data if isinstance(other, Tensor) else other
        return Tensor._wrap(op(self.data, other))

    def __lt__(self, o): return self._compare(o, lambda a, b: a < b)
    def __le__(self, o): return self._compare(o, lambda a, b: a <= b)
    def __gt__(self, o): return self._compare(o, lambda a, b: a > b)
    def __ge__(self, o): return self._compare(o, lambda a, b: a >= b)
    def __eq__(self, o): return self._compare(o, lambda a, b: a == b)
    def __ne__(self, o): return self._compare(o, lambda a, b: a != b)
    __hash__ = object.__hash__

    # ---- methods, as in torch (with NumPy's axis/keepdims names) -------------------
    def sum(self, axis=None, keepdims=False): return F.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return F.mean(self, axis, keepdims)
    def var(self, axis=None, keepdims=False, *, correction=None, unbiased=None):
        return F.var(self, axis, keepdims, correction=correction, unbiased=unbiased)  # torch's: correction=1
    def max(self, axis=None, keepdims=False): return F.max(self, axis, keepdims)  # (values, indices) on an axis
    def min(self, axis=None, keepdims=False): return F.min(self, axis, keepdims)
    def amax(self, axis=None, keepdims=False): return F.amax(self, axis, keepdims)
    def amin(self, axis=None, keepdims=False): return F.amin(self, axis, keepdims)
    def exp(self): return F.exp(self)
    def log(self): return F.log(self)
    def sqrt(self): return F.sqrt(self)
    def tanh(self): return F.tanh(self)
    def sigmoid(self): return F.sigmoid(self)
    def abs(self): return F.abs(self)
    def clip(self, lo=None, hi=None): return F.clip(self, lo, hi)
    def clamp(self, min=None, max=None): return F.clamp(self, min, max)  # noqa: A002
    def where(self, condition, other): return F.where(condition, self, other)
    def reshape(self, *shape): return F.reshape(self, _shape_arg(shape))
    view = reshape
    def flatten(self, start_axis=0, end_axis=-1): return F.flatten(self, start_axis, end_axis)
    def permute(self, *axes): return F.permute(self, _shape_arg(axes))
    def transpose(self, a, b): return F.transpose(self, a, b)
    def unsqueeze(self, axis): return F.unsqueeze(self, axis)
    def squeeze(self, axis=None): return F.squeeze(self, axis)
    def expand(self, *shape): return F.expand(self, _shape_arg(shape))
    def chunk(self, n, axis=0): return F.chunk(self, n, axis)
    def softmax(self, axis=-1): return F.softmax(self, axis)


def _shape_arg(shape: Sequence) -> tuple:
    """Accept both x.reshape(2, 3) and x.reshape((2, 3))."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(shape)


def _topological_order(root: Tensor) -> list[Tensor]:
    """Nodes reachable from ``root`` through tensors that require grad, each after all its users.

    An iterative depth-first search (a recursive one overflows Python's stack on deep
    graphs): a node is emitted after its inputs, and the list is returned reversed.
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, inputs_done = stack.pop()
        if inputs_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        if node._ctx is not None:
            for parent in node._ctx.parents:
                if parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    order.reverse()
    return order


def _unbroadcast(grad, shape: tuple):
    """The adjoint of broadcasting ``shape`` up to ``grad.shape``: sum over the copied axes."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(i + extra for i, n in enumerate(shape) if n == 1 and grad.shape[i + extra] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


class Function:
    """One differentiable operation, and the context that remembers what its backward needs.

    Subclasses write ``forward(self, *arrays, **params) -> array`` on raw arrays and
    ``backward(self, grad_out) -> grad or tuple of grads`` (one per tensor input, None
    where not needed). ``self.needs_input_grad`` tells backward which gradients anybody
    wants, so it can skip the rest; ``self.recording`` tells forward whether a backward can
    follow at all (not under no_grad), so it can skip saving what only backward would use.
    """

    parents: tuple[Tensor, ...]
    needs_input_grad: tuple[bool, ...]
    recording: bool

    def forward(self, *arrays, **params):
        raise NotImplementedError

    def backward(self, grad_out):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **params) -> Tensor:
        tensors = tuple(_as_input(x, inputs) for x in inputs)
        ctx = cls()
        ctx.needs_input_grad = tuple(t.requires_grad for t in tensors)
        ctx.recording = _grad_enabled and any(ctx.needs_input_grad)
        out = ctx.forward(*(t.data for t in tensors), **params)
        if not ctx.recording:
            return Tensor._wrap(out)
        ctx.parents = tensors
        return Tensor._wrap(out, ctx)


def _as_input(x, siblings) -> Tensor:
    """Tensors pass through; arrays and numbers become constants.

    A Python number or NumPy scalar takes the dtype that torch's promotion gives it among
    its siblings (result_type): ``x * 0.5`` and ``x * np.sqrt(0.5)`` keep a float32 x in
    float32, and an integer tensor times 0.5 is float32, the default.
    """
    if isinstance(x, Tensor):
        return x
    if hasattr(x, "dtype") and not isinstance(x, np.generic):
        return Tensor._wrap(get_backend().asarray(x))
    # Python numbers and NumPy scalars (x * np.sqrt(2) is an np.float64) alike
    return Tensor._wrap(get_backend().xp.asarray(x, dtype=result_type(*siblings)))


_CATEGORY = {"b": 0, "u": 1, "i": 1, "f": 2}  # bool < integers < floats
_DEFAULT_OF_CATEGORY = (np.dtype(bool), np.dtype(np.int64), np.dtype(DEFAULT_DTYPE))


def result_type(*operands) -> np.dtype:
    """The dtype of ``a op b`` by torch's type promotion (not NumPy's), for Tensors, arrays and numbers.

    The highest category wins (bool < integer < floating point); within it, tensors with
    dimensions outrank 0-d tensors, which outrank Python numbers (and NumPy scalars), and
    only the highest-ranked operands of that category set the dtype, promoted among
    themselves. So float32 + float64 gives float64 but float32 + a 0-d float64 tensor or a
    Python float stays float32; int64 + float32 gives float32 (NumPy: float64); an integer
    tensor with a Python float gives the default float32.
    """
    best = None  # (category, rank) of the operands that decide, and their dtypes
    dtypes: list = []
    for x in operands:
        if isinstance(x, Tensor) or (hasattr(x, "dtype") and not isinstance(x, np.generic)):
            dtype, rank = np.dtype(x.dtype), 2 if x.ndim else 1
        else:  # a number (Python's bool, int, float or a NumPy scalar), or a list of them: "weak"
            dtype, rank = None, 0
            if not isinstance(x, (bool, int, float, np.bool_, np.integer, np.floating, list, tuple)):
                raise TypeError(f"expected a Tensor, an array or a real number, got {type(x).__name__}")
        kind = dtype.kind if dtype is not None else np.asarray(x).dtype.kind
        if kind not in _CATEGORY:
            raise TypeError(f"unsupported dtype {dtype if dtype is not None else type(x).__name__}")
        key = (_CATEGORY[kind], rank)
        if best is None or key > best:
            best, dtypes = key, []
        if key == best and dtype is not None:
            dtypes.append(dtype)
    if not dtypes:  # only numbers in the top category
        return _DEFAULT_OF_CATEGORY[best[0]]
    out = dtypes[0]
    for d in dtypes[1:]:
        out = np.promote_types(out, d)
    return out


def _promoted(*operands, dtype=None) -> list:
    """The operands as Tensors of one dtype (``result_type``'s, or ``dtype``): a tensor of
    another dtype goes through a cast, whose gradient is cast back."""
    if dtype is None:
        first = operands[0]
        if all(isinstance(x, Tensor) and x.dtype == first.dtype for x in operands):
            return list(operands)  # the common case: nothing to do
        dtype = result_type(*operands)
    out = []
    for x in operands:
        t = x if isinstance(x, Tensor) else Tensor._wrap(get_backend().xp.asarray(
            x.data if isinstance(x, Tensor) else x, dtype=dtype))
        out.append(t if t.dtype == dtype else F.cast(t, dtype))
    return out


def tensor(data, requires_grad=False, dtype=None) -> Tensor:
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


from minisd import functional as F  # noqa: E402  (functional needs Tensor defined first)
