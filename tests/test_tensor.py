"""The autograd engine: accumulation, graph freeing, deep graphs, no_grad, errors, mixing with NumPy."""

import gc
import os
import weakref

import numpy as np
import pytest
from helpers import randn

import minisd
from minisd import Tensor, functional as F, nn
from minisd.tensor import Function


def leaf(*shape, seed=0, dtype=np.float64):
    return Tensor(randn(*shape, seed=seed, dtype=dtype), requires_grad=True)


# ------------------------------------------------------------------------------------
# Construction and basic properties
# ------------------------------------------------------------------------------------


def test_construction_dtypes():
    assert Tensor([1, 2, 3]).dtype == np.float32  # Python lists become float32
    assert Tensor(2.5).dtype == np.float32 and Tensor(2.5).shape == ()
    assert Tensor(np.zeros(3)).dtype == np.float64  # arrays keep their dtype
    assert Tensor(np.arange(3)).dtype.kind == "i"  # integer ids stay integers
    assert Tensor([1, 2], dtype=np.float64).dtype == np.float64
    a = np.ones((2, 3), dtype=np.float32)
    assert Tensor(a).data is a  # no copy of an array already of the backend's kind
    with pytest.raises(TypeError, match="floating-point"):
        Tensor(np.arange(3), requires_grad=True)


def test_properties_and_conversions():
    t = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), requires_grad=True)
    assert t.shape == (2, 3) and t.ndim == 2 and t.size == 6 and len(t) == 2
    assert isinstance(t.numpy(), np.ndarray) and t.numpy().dtype == np.float32
    assert t.T.shape == (3, 2)
    assert Tensor(np.array([[4.0]])).item() == 4.0
    with pytest.raises(ValueError, match="one element"):
        t.item()
    d = t.detach()
    assert d.data is t.data and not d.requires_grad and d._ctx is None
    assert "requires_grad=True" in repr(t)


def test_comparisons_give_boolean_tensors_without_gradient():
    t = leaf(5)
    for r in (t > 0, t >= 0, t < 0, t <= 0, t == t, t != 0):
        assert isinstance(r, Tensor) and r.dtype == bool and not r.requires_grad
    np.testing.assert_array_equal((t > 0).numpy(), t.numpy() > 0)
    np.testing.assert_array_equal((t < Tensor(np.zeros(5))).numpy(), t.numpy() < 0)


# ------------------------------------------------------------------------------------
# Gradient accumulation
# ------------------------------------------------------------------------------------


def test_tensor_used_twice_accumulates():
    x = leaf(3, 4)
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.numpy())
    y = leaf(3, 4)
    (y + y).sum().backward()
    np.testing.assert_allclose(y.grad, 2.0)
    z = leaf(3)
    (z * z * z).sum().backward()  # z used three times
    np.testing.assert_allclose(z.grad, 3 * z.numpy() ** 2)


def test_diamond_graph():
    """x -> a, b -> c: dL/dx sums both paths (and the shared subexpression is visited once)."""
    x = leaf(4)
    a = x.exp()
    b = x * 3.0
    c = a * b + a  # a is used twice, and both a and b depend on x
    c.sum().backward()
    xv = x.numpy()
    np.testing.assert_allclose(x.grad, np.exp(xv) * 3 * xv + np.exp(xv) * 3 + np.exp(xv), rtol=1e-12)


def test_wide_diamond_gradient_matches_finite_differences():
    from minisd.gradcheck import gradcheck

    def f(x):
        h = x.tanh()
        branches = [h * float(k) + F.sin(h) for k in range(5)]
        return F.stack(branches).sum(0) * h

    assert gradcheck(f, [randn(2, 3)])


def test_leaves_accumulate_over_two_backward_calls():
    x = leaf(3)
    (x * 2.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 2.0 + 2 * x.numpy())
    x.zero_grad()
    assert x.grad is None


def test_backward_with_explicit_gradient():
    x = leaf(2, 3)
    y = x * 3.0
    g = np.arange(6.0).reshape(2, 3)
    y.backward(g)
    np.testing.assert_allclose(x.grad, 3 * g)
    x2 = leaf(2, 3)
    (x2 * 3.0).backward(Tensor(g))
    np.testing.assert_allclose(x2.grad, 3 * g)
    x3 = leaf(2, 3, dtype=np.float32)
    (x3 * 3.0).backward(Tensor(g))  # a float64 gradient for a float32 tensor is taken in float32
    assert x3.grad.dtype == np.float32
    np.testing.assert_allclose(x3.grad, 3 * g, rtol=1e-6)


def test_leaf_gradients_are_owned_and_writable():
    """a + b hands the same array to both leaves, x.sum() a read-only broadcast view:
    each leaf must still get an array of its own that can be scaled in place (clipping)."""
    a, b = leaf(3), leaf(3, seed=1)
    (a + b).sum().backward()
    assert a.grad is not b.grad
    w = leaf(2, 3)
    w.sum().backward()
    assert w.grad.flags.writeable
    w.grad *= 0.5
    np.testing.assert_allclose(w.grad, 0.5)
    a.grad *= 2
    np.testing.assert_allclose(b.grad, 1.0)


def test_only_leaves_that_need_it_get_gradients():
    x, c = leaf(3), Tensor(np.ones(3))
    (x * c).sum().backward()
    assert x.grad is not None and c.grad is None
    y = x * 2.0
    y.sum().backward()
    assert y.grad is None  # intermediate results keep no gradient


# ------------------------------------------------------------------------------------
# no_grad, and freeing the graph
# ------------------------------------------------------------------------------------


def test_no_grad_records_nothing():
    x = leaf(3)
    with minisd.no_grad():
        assert not minisd.is_grad_enabled()
        y = (x * 2.0).exp().sum()
    assert minisd.is_grad_enabled()
    assert not y.requires_grad and y._ctx is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_no_grad_restores_the_flag_after_an_exception_and_nests():
    with pytest.raises(ZeroDivisionError):
        with minisd.no_grad():
            1 / 0
    assert minisd.is_grad_enabled()
    with minisd.no_grad():
        with minisd.no_grad():
            pass
        assert not minisd.is_grad_enabled()
    assert minisd.is_grad_enabled()


def test_ops_on_constants_record_nothing():
    y = Tensor(np.ones(3)) * 2.0 + 1.0
    assert y._ctx is None and not y.requires_grad


def test_graph_is_freed_after_backward():
    x = leaf(50, 50)
    y = F.silu(x)
    ctx = weakref.ref(y._ctx)
    saved = weakref.ref(y._ctx.s)  # sigmoid(x), which SiLU keeps for its backward and nothing else holds
    z = (y * 2.0).sum()
    z.backward()
    gc.collect()
    # y and z are alive, but their Functions and what they saved are gone
    assert y._ctx is None and z._ctx is None
    assert ctx() is None
    assert saved() is None
    assert y.requires_grad  # still a tensor that came from the graph


def _live_functions() -> int:
    gc.collect()
    # type(o), not isinstance: no __class__ look-ups on other libraries' lazy objects
    return sum(1 for o in gc.get_objects() if issubclass(type(o), Function))


def test_no_growth_in_live_functions_over_many_training_steps():
    minisd.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 1))
    x = randn(16, 4, dtype=np.float32)
    t = randn(16, 1, seed=1, dtype=np.float32)
    from minisd.optim import AdamW

    opt = AdamW(model.parameters(), lr=1e-2)

    def step():
        opt.zero_grad()
        loss = F.mse_loss(model(x), t)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        step()
    before = _live_functions()
    losses = [step() for _ in range(50)]  # keep every loss tensor alive: their graphs must still be gone
    after = _live_functions()
    assert after <= before
    assert all(loss._ctx is None for loss in losses)


def test_deep_graph_does_not_hit_the_recursion_limit():
    x = leaf(3)
    y = x
    for _ in range(5000):
        y = y * 1.0001 + 0.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 1.0001 ** 5000, rtol=1e-9)


# ------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------


def test_backward_on_non_scalar_without_gradient_says_so():
    y = leaf(2, 3) * 2.0
    with pytest.raises(RuntimeError, match=r"shape \(2, 3\) needs a gradient"):
        y.backward()
    with pytest.raises(ValueError, match=r"gradient of shape \(3,\) for a tensor of shape \(2, 3\)"):
        y.backward(np.ones(3))


def _raises_naming(op, shapes, fn):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert op in msg, msg
    for s in shapes:
        assert str(tuple(s)) in msg, (s, msg)


def _t(*shape):
    return Tensor(np.ones(shape, dtype=np.float32))


@pytest.mark.parametrize("op, shapes, fn", [
    ("add", [(2, 3), (4,)], lambda: _t(2, 3) + _t(4)),
    ("add", [(2, 3), (4,)], lambda: _t(2, 3) + np.ones(4, np.float32)),
    ("sub", [(2, 3), (3, 2)], lambda: _t(2, 3) - _t(3, 2)),
    ("mul", [(2, 3), (2,)], lambda: _t(2, 3) * _t(2)),
    ("div", [(5,), (2,)], lambda: _t(5) / _t(2)),
    ("matmul", [(2, 3), (4, 2)], lambda: _t(2, 3) @ _t(4, 2)),
    ("matmul", [(2, 3, 4), (2, 5, 1)], lambda: F.matmul(_t(2, 3, 4), _t(2, 5, 1))),
    ("matmul", [(3, 2, 4), (2, 4, 1)], lambda: F.matmul(_t(3, 2, 4), _t(2, 4, 1))),  # batch axes 3 and 2
    ("matmul", [(3,), (4,)], lambda: F.matmul(_t(3), _t(4))),
    ("linear", [(2, 5), (3, 4)], lambda: F.linear(_t(2, 5), _t(3, 4))),
    ("linear", [(2, 5), (4,)], lambda: F.linear(_t(2, 5), _t(3, 5), _t(4))),
    ("conv2d", [(2, 6, 5, 5), (4, 5, 3, 3)], lambda: F.conv2d(_t(2, 6, 5, 5), _t(4, 5, 3, 3))),
    ("conv2d", [(2, 6, 5, 5), (3,)], lambda: F.conv2d(_t(2, 6, 5, 5), _t(4, 6, 3, 3), _t(3))),
    ("group_norm", [(2, 5, 3, 3)], lambda: F.group_norm(_t(2, 5, 3, 3), 2)),
    ("group_norm", [(2, 6, 3, 3), (4,)], lambda: F.group_norm(_t(2, 6, 3, 3), 2, _t(4), _t(4))),
    ("layer_norm", [(2, 5), (4,)], lambda: F.layer_norm(_t(2, 5), 5, _t(4), _t(4))),
    ("layer_norm", [(2, 5), (4,)], lambda: F.layer_norm(_t(2, 5), 4)),
    ("scaled_dot_product_attention", [(1, 2, 3, 4), (1, 2, 5, 3)],
     lambda: F.scaled_dot_product_attention(_t(1, 2, 3, 4), _t(1, 2, 5, 3), _t(1, 2, 5, 3))),
    ("scaled_dot_product_attention", [(1, 2, 5, 4), (1, 2, 4, 3)],
     lambda: F.scaled_dot_product_attention(_t(1, 2, 3, 4), _t(1, 2, 5, 4), _t(1, 2, 4, 3))),
    ("mse_loss", [(2, 3), (3, 2)], lambda: F.mse_loss(_t(2, 3), _t(3, 2))),
    ("cat", [(2, 3), (2, 4)], lambda: F.cat([_t(2, 3), _t(2, 4)])),
    ("reshape", [(2, 3), (4, 2)], lambda: _t(2, 3).reshape(4, 2)),
    ("cross_entropy", [(3, 2), (2,)], lambda: F.cross_entropy(_t(3, 2), np.array([0, 1]))),
])
def test_mismatched_shapes_name_the_op_and_both_shapes(op, shapes, fn):
    _raises_naming(op, shapes, fn)


def test_other_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="embedding"):
        F.embedding(np.array([5]), _t(3, 2))
    with pytest.raises(TypeError, match="embedding"):
        F.embedding(np.array([0.5]), _t(3, 2))
    with pytest.raises(ValueError, match="chunk: the number of pieces must be a positive integer"):
        F.chunk(_t(5), 0)
    with pytest.raises(ValueError, match="permute"):
        _t(2, 3).permute(0, 0)
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        _t(2, 3).sum(3)
    with pytest.raises(ValueError, match="interpolate: only mode='nearest'"):
        F.interpolate(_t(1, 1, 2, 2), scale_factor=2, mode="bilinear")
    with pytest.raises(ValueError, match=r"interpolate: the input must be \(N, C, L\)"):
        F.interpolate(_t(2, 2), scale_factor=2)
    with pytest.raises(ValueError, match="interpolate: give size or scale_factor"):
        F.interpolate(_t(1, 1, 2, 2))
    with pytest.raises(ValueError, match="interpolate: give size or scale_factor"):
        F.interpolate(_t(1, 1, 2, 2), scale_factor=2, size=(4, 4))
    with pytest.raises(ValueError, match="interpolate: size"):
        F.interpolate(_t(1, 1, 2, 2), size=(0, 4))
    with pytest.raises(ValueError, match="gelu"):
        F.gelu(_t(2), approximate="fast")


# ------------------------------------------------------------------------------------
# Mixing Tensors with NumPy arrays and numbers
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("op, d_left, d_right", [
    (lambda a, b: a + b, lambda a, b: np.ones_like(a), lambda a, b: np.ones_like(b)),
    (lambda a, b: a - b, lambda a, b: np.ones_like(a), lambda a, b: -np.ones_like(b)),
    (lambda a, b: a * b, lambda a, b: b, lambda a, b: a),
    (lambda a, b: a / b, lambda a, b: 1 / b, lambda a, b: -a / b ** 2),
])
def test_ndarray_op_tensor_and_tensor_op_ndarray(op, d_left, d_right):
    rng = np.random.default_rng(0)
    a, b = rng.uniform(1, 2, (2, 3)), rng.uniform(1, 2, (2, 3))
    t = Tensor(a, requires_grad=True)
    r = op(t, b)  # Tensor op ndarray
    assert isinstance(r, Tensor)
    np.testing.assert_allclose(r.numpy(), op(a, b))
    r.sum().backward()
    np.testing.assert_allclose(t.grad, d_left(a, b))
    u = Tensor(b, requires_grad=True)
    r = op(a, u)  # ndarray op Tensor: NumPy must defer to Tensor's reflected operator
    assert isinstance(r, Tensor)
    np.testing.assert_allclose(r.numpy(), op(a, b))
    r.sum().backward()
    np.testing.assert_allclose(u.grad, d_right(a, b))


def test_ndarray_matmul_tensor_both_ways():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((3, 4))
    t = Tensor(b, requires_grad=True)
    r = a @ t
    assert isinstance(r, Tensor)
    np.testing.assert_allclose(r.numpy(), a @ b)
    r.sum().backward()
    np.testing.assert_allclose(t.grad, a.T @ np.ones((2, 4)))
    s = Tensor(a, requires_grad=True)
    r = s @ b
    r.sum().backward()
    np.testing.assert_allclose(s.grad, np.ones((2, 4)) @ b.T)


@pytest.mark.parametrize("scalar", [0.5, 2, np.float64(0.5), np.float32(0.5), np.sqrt(2.0)])
def test_numbers_and_numpy_scalars_keep_float32(scalar):
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    for r in (x * scalar, scalar * x, x + scalar, x - scalar, scalar - x, x / scalar, scalar / x):
        assert r.dtype == np.float32
    (x * scalar).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad, float(scalar), rtol=1e-6)


def test_broadcast_gradient_is_summed_back_to_the_input_shape():
    a = leaf(3, 1, 5)
    b = leaf(4, 5, seed=1)
    (a * b).sum().backward()
    assert a.grad.shape == (3, 1, 5) and b.grad.shape == (4, 5)
    np.testing.assert_allclose(a.grad, np.broadcast_to(b.numpy().sum(0), (3, 1, 5)))
    np.testing.assert_allclose(b.grad, np.broadcast_to(a.numpy().sum((0, 1)), (4, 5)))


# ------------------------------------------------------------------------------------
# A Function written by a user plugs into the engine
# ------------------------------------------------------------------------------------


class Cube(Function):
    def forward(self, a):
        self.a = a
        return a ** 3

    def backward(self, g):
        return 3 * self.a ** 2 * g


def test_custom_function_and_needs_input_grad():
    x = leaf(4)
    y = Cube.apply(x)
    assert y._ctx.needs_input_grad == (True,)
    (y + x).sum().backward()
    np.testing.assert_allclose(x.grad, 3 * x.numpy() ** 2 + 1)

    seen = {}

    class Spy(Function):
        def forward(self, a, b):
            return a * b

        def backward(self, g):
            seen["needs"] = self.needs_input_grad
            return None, g

    c = Tensor(np.ones(4))
    Spy.apply(c, x).sum().backward()
    assert seen["needs"] == (False, True)


def test_second_backward_through_a_freed_graph_is_an_error_not_a_silent_zero():
    """The graph is freed as backward() walks it (torch's retain_graph=False): going through
    it again would leave the leaves without their gradients, so it raises instead."""
    x = leaf(3)
    h = x * 2.0
    loss = h.sum()
    loss.backward()
    np.testing.assert_allclose(x.grad, 2.0)
    with pytest.raises(RuntimeError, match="already freed"):
        loss.backward()
    with pytest.raises(RuntimeError, match="already freed"):
        (h * 3.0 + x).sum().backward()  # a new loss on a freed intermediate
    np.testing.assert_allclose(x.grad, 2.0)  # nothing half-accumulated
    assert h.grad is None
    (h.detach() * 3.0 + x).sum().backward()  # detached, it is a constant: fine
    np.testing.assert_allclose(x.grad, 3.0)


def test_truth_value_float_and_numpy_conversion():
    """bool() follows NumPy and torch: one element gives its truth, more is an error (not len())."""
    assert not Tensor(np.array([0.0]))
    assert not (Tensor(np.array([0.5])) > 1)
    assert Tensor(np.float32(2.0))
    a, b = Tensor(np.ones(3)), Tensor(np.zeros(3))
    with pytest.raises(ValueError, match="ambiguous"):
        bool(a == b)
    assert a in [a]  # identity is checked before ==
    assert float(Tensor(np.array([[2.5]]))) == 2.5
    arr = np.asarray(leaf(2, 3) * 2.0)
    assert type(arr) is np.ndarray and arr.dtype == np.float64 and arr.shape == (2, 3)
    assert np.asarray(a, dtype=np.float32).dtype == np.float32


def test_backward_releases_intermediate_arrays_as_it_goes():
    """By the time backward() reaches the first op of a chain, the arrays of the later ops,
    which nothing needs any more, are gone: memory falls during the backward pass."""
    seen = {}

    class Probe(Function):  # the identity, which looks at what is still alive when its backward runs
        def forward(self, a):
            return a.copy()

        def backward(self, g):
            gc.collect()
            seen["alive"] = [r() is not None for r in refs]
            return g

    def build(x):
        a = Probe.apply(x)
        b = a * 2.0  # Mul keeps a and the constant, not b
        c = b.exp()  # Exp keeps its output c
        return c.sum(), [weakref.ref(b.data), weakref.ref(c.data)]

    x = leaf(100, 100)
    loss, refs = build(x)
    loss.backward()
    assert seen["alive"] == [False, False]
    np.testing.assert_allclose(x.grad, 2 * np.exp(2 * x.numpy()))


def test_gradient_has_the_dtype_of_its_tensor():
    """Mixing a float32 tensor with float64 data promotes the result (NumPy's and torch's rule),
    but the float32 tensor's gradient stays float32, as in torch."""
    x = leaf(2, 3, dtype=np.float32)
    y = x * np.linspace(0, 1, 3)  # a float64 array
    assert y.dtype == np.float64
    z = Tensor(np.ones(3), requires_grad=True)  # float64
    (y * z).sum().backward()
    assert x.grad.dtype == np.float32 and z.grad.dtype == np.float64
    np.testing.assert_allclose(x.grad, np.broadcast_to(np.linspace(0, 1, 3), (2, 3)), rtol=1e-6)


@pytest.mark.parametrize("method, function", [
    (lambda t: t.mean(1, True), lambda t: F.mean(t, 1, True)),
    (lambda t: t.max(0).values, lambda t: F.max(t, 0).values),
    (lambda t: t.amin(1), lambda t: F.amin(t, 1)),
    (lambda t: t.clamp(max=0.3), lambda t: F.clip(t, None, 0.3)),
    (lambda t: t.where(t.numpy() > 0, 0.5), lambda t: F.where(t.numpy() > 0, t, 0.5)),
    (lambda t: t.var(), lambda t: F.var(t)),
    (lambda t: t.exp(), F.exp),
    (lambda t: t.abs().log(), lambda t: F.log(F.abs(t))),
    (lambda t: t.abs().sqrt(), lambda t: F.sqrt(F.abs(t))),
    (lambda t: t.tanh(), F.tanh),
    (lambda t: t.clip(-0.5, 0.5), lambda t: F.clip(t, -0.5, 0.5)),
    (lambda t: t.view(4, 3), lambda t: F.reshape(t, (4, 3))),
    (lambda t: t.flatten(), lambda t: F.reshape(t, (12,))),
    (lambda t: t.unsqueeze(0).squeeze(0), lambda t: t),
    (lambda t: t.expand(2, 3, 4), lambda t: F.stack([t, t])),
    (lambda t: t.chunk(2, 1)[1], lambda t: t[:, 2:]),
    (lambda t: t.softmax(0), lambda t: F.softmax(t, 0)),
    (lambda t: t.T, lambda t: F.permute(t, (1, 0))),
    (lambda t: t.permute((1, 0)), lambda t: F.transpose(t, 0, 1)),
    (lambda t: t ** 2, lambda t: t * t),
])
def test_methods_are_the_functional_ops(method, function):
    x = randn(3, 4)
    a, b = Tensor(x, requires_grad=True), Tensor(x, requires_grad=True)
    ya, yb = method(a), function(b)
    np.testing.assert_allclose(ya.numpy(), yb.numpy(), rtol=1e-12, atol=1e-15)
    g = randn(*ya.shape, seed=1)
    ya.backward(g)
    yb.backward(g)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-12, atol=1e-15)



def test_importing_minisd_first_shortens_openblas_spinning():
    """import minisd sets OPENBLAS_THREAD_TIMEOUT=20 (BLAS threads that spin ~0.1 s after each
    product take a core from minisd's thread pool) unless it is set already."""
    import subprocess
    import sys

    code = "import minisd, os; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    run = lambda: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,  # noqa: E731
                                 text=True, check=True).stdout.strip()
    assert run() == "20"
    env["OPENBLAS_THREAD_TIMEOUT"] = "12"
    assert run() == "12"
