"""Ops against PyTorch at random shapes: the cases nobody thought to write down.

The hand-written cases in test_functional.py pick shapes on purpose; these draw them,
seeded, from wide ranges (kernels wider than the image, strides past the kernel, one
value per group, Lq != Lk with masks, indices mixing numbers, slices and arrays). Each
op's forward and every input's gradient are held against torch in float64, relative to
the largest reference value (or 1e-2, so that gradients that are zero up to PyTorch's
rounding, such as layer norm over one feature, compare as zero).

Drawing such shapes found what these cases guard (each also a named case in
test_functional.py): a kernel wider than the image, a weight or a bias alone in the
norms, vectors in matmul, numbers mixed with arrays in an index, chunk sizes that do not
divide, and nearest resizing to any size.
"""

import numpy as np
import pytest

import minisd.functional as F
from minisd import Tensor, get_backend

torch = pytest.importorskip("torch")
TF = torch.nn.functional

pytestmark = pytest.mark.skipif(not get_backend().float64,
                                reason="float64 throughout; the kernels compute in float32")


def _matches_torch(fn, torch_fn, arrays, seed, tol=1e-9):
    """fn and torch_fn agree on the output and on every input's gradient (float64)."""
    ours = [Tensor(a, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    out, ref = fn(*ours), torch_fn(*theirs)
    assert out.shape == tuple(ref.shape)
    _close(out.numpy(), ref.detach().numpy(), tol)
    g = np.random.default_rng(seed).standard_normal(out.shape)
    out.backward(g)
    ref.backward(torch.tensor(g))
    for t, tt in zip(ours, theirs):
        if tt.grad is not None:
            _close(t.grad, tt.grad.numpy(), tol * 10)


def _close(got, want, tol):
    scale = max(float(np.abs(want).max()) if want.size else 0.0, 1e-2)
    assert np.abs(got - want).max(initial=0.0) <= tol * scale


@pytest.mark.parametrize("seed", range(40))
def test_conv2d(seed):
    rng = np.random.default_rng(seed)
    N, C, K = (int(n) for n in rng.integers(1, 9, size=3))
    R = int(rng.choice([1, 2, 3, 4, 5, 7]))
    stride, padding = int(rng.integers(1, 4)), int(rng.integers(0, 4))
    H, W = (int(rng.integers(max(1, R - 2 * padding), 24)) for _ in range(2))
    arrays = [rng.standard_normal((N, C, H, W)), rng.standard_normal((K, C, R, R)) / R, rng.standard_normal(K)]
    if rng.random() < 0.3:  # no bias
        arrays = arrays[:2]
    _matches_torch(lambda *t: F.conv2d(*t, stride=stride, padding=padding),
                   lambda *t: TF.conv2d(*t, stride=stride, padding=padding), arrays, seed)


@pytest.mark.parametrize("seed", range(30))
def test_group_norm_and_layer_norm(seed):
    rng = np.random.default_rng(seed)
    G = int(rng.choice([1, 2, 4]))
    C, H, W = G * int(rng.integers(1, 5)), int(rng.integers(1, 9)), int(rng.integers(1, 9))
    x = rng.standard_normal((int(rng.integers(1, 4)), C, H, W)) * 3 + rng.standard_normal() * 5
    names = [("weight", "bias"), ("weight",), ("bias",), ()][seed % 4]  # the affine parameters given

    def given(size):
        return [1 + 0.3 * rng.standard_normal(size) if name == "weight" else rng.standard_normal(size) for name in names]

    def split(p):
        return dict(zip(names, p))

    _matches_torch(lambda x, *p: F.group_norm(x, G, **split(p)),
                   lambda x, *p: TF.group_norm(x, G, **{"weight": torch.ones(C, dtype=torch.float64), **split(p)}),
                   [x] + given(C), seed)
    _matches_torch(lambda x, *p: F.layer_norm(x, W, **split(p)), lambda x, *p: TF.layer_norm(x, (W,), **split(p)),
                   [x] + given(W), seed)


@pytest.mark.parametrize("seed", range(30))
def test_attention(seed):
    rng = np.random.default_rng(seed)
    B, H = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    Lq, Lk, d, dv = (int(n) for n in rng.integers(1, 40, size=4))
    kind = seed % 5
    causal = kind == 4
    mask = [None, rng.standard_normal((Lq, Lk)), rng.random((B, 1, 1, Lk)) < 0.7,
            rng.standard_normal((B, 1, Lq, Lk)), None][kind]
    if kind == 2:
        mask[..., 0] = True  # every query sees a key
    scale = None if seed % 2 else float(rng.uniform(0.1, 1))
    arrays = [rng.standard_normal((B, H, Lq, d)), rng.standard_normal((B, H, Lk, d)), rng.standard_normal((B, H, Lk, dv))]
    _matches_torch(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale),
        lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else torch.tensor(mask),
                                                        is_causal=causal, scale=scale), arrays, seed)


def _random_index(rng, shape):
    """Numbers, slices (negative bounds, steps), None, arrays with repeats, now and then an Ellipsis."""
    index = []
    for n in shape:
        kind = rng.random()
        if kind < 0.3:
            index.append(slice(None))
        elif kind < 0.5:
            index.append(int(rng.integers(-n, n)))
        elif kind < 0.7:
            index.append(slice(int(rng.integers(-n, n)), int(rng.integers(-n, n + 1)), int(rng.integers(1, 4))))
        elif kind < 0.8:
            index += [None, slice(None)]
        else:
            index.append(rng.integers(-n, n, size=int(rng.integers(1, 4))))
    if rng.random() < 0.2:
        index = [Ellipsis] + index[len(index) // 2:]
    return tuple(index)


@pytest.mark.parametrize("seed", range(100))
def test_getitem(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(1, 6, size=int(rng.integers(1, 5))))
    index = _random_index(rng, shape)
    torch_index = tuple(torch.tensor(i) if isinstance(i, np.ndarray) else i for i in index)
    _matches_torch(lambda a: a[index], lambda a: a[torch_index], [rng.standard_normal(shape)], seed)


@pytest.mark.parametrize("seed", range(40))
def test_shape_ops_and_reductions(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(1, 5, size=int(rng.integers(1, 5))))
    nd, x = len(shape), rng.standard_normal(shape)
    axis, pieces = int(rng.integers(-nd, nd)), int(rng.integers(1, 5))
    perm = [int(p) - nd for p in rng.permutation(nd)]
    cases = [
        (lambda a: a.permute(*perm), lambda a: a.permute(*perm)),
        (lambda a: a.transpose(axis, -1), lambda a: a.transpose(axis, -1)),
        (lambda a: a.unsqueeze(axis).squeeze(), lambda a: a.unsqueeze(axis).squeeze()),
        (lambda a: F.flatten(a, 0, axis), lambda a: a.flatten(0, axis)),
        (lambda a: F.chunk(a, pieces, axis=axis)[-1] * 2, lambda a: a.chunk(pieces, axis)[-1] * 2),
        (lambda a: F.expand(a[None], (3,) + shape), lambda a: a[None].expand((3,) + shape)),
        (lambda a: a.sum(axis=(axis,)), lambda a: a.sum(dim=(axis,))),
        (lambda a: a.mean(axis=axis, keepdims=True), lambda a: a.mean(dim=axis, keepdim=True)),
        (lambda a: F.var(a, axis=axis, correction=0), lambda a: a.var(dim=axis, unbiased=False)),
        (lambda a: a.amax(axis=axis), lambda a: a.amax(dim=axis)),
        (lambda a: F.softmax(a, axis=axis), lambda a: torch.softmax(a, axis)),
        (lambda a: F.log_softmax(a, axis=axis), lambda a: torch.log_softmax(a, axis)),
        (lambda a: 2.0 / (a * a + 1) - abs(a), lambda a: 2.0 / (a * a + 1) - abs(a)),
    ]
    for ours, theirs in cases:
        _matches_torch(ours, theirs, [x], seed)


@pytest.mark.parametrize("seed", range(40))
def test_matmul_broadcasting_and_vectors(seed):
    rng = np.random.default_rng(seed)
    n, k, m = (int(s) for s in rng.integers(1, 5, size=3))
    lead_a = tuple(int(s) for s in rng.integers(1, 4, size=int(rng.integers(0, 3))))
    lead_b = tuple(1 if rng.random() < 0.5 else s for s in lead_a[len(lead_a) - int(rng.integers(0, len(lead_a) + 1)):])
    a_shape = (k,) if seed % 5 == 0 else lead_a + (n, k)
    b_shape = (k,) if seed % 7 == 0 else lead_b + (k, m)
    _matches_torch(F.matmul, torch.matmul, [rng.standard_normal(a_shape), rng.standard_normal(b_shape)], seed)


@pytest.mark.parametrize("seed", range(20))
def test_interpolate_to_any_size(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 2) + tuple(int(n) for n in rng.integers(1, 9, size=2)))
    size = tuple(int(n) for n in rng.integers(1, 20, size=2))
    _matches_torch(lambda a: F.interpolate(a, size=size), lambda a: TF.interpolate(a, size=size, mode="nearest"),
                   [x], seed)
