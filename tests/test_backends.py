"""The backend registry (minisd/backends/__init__.py): four backends by name, chosen by
set_backend or MINISD_BACKEND, and a wrong name said in one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import minisd
from minisd import backends
from minisd.backends import fast_cpu, naive

CONTRACT = ("conv2d_forward", "conv2d_backward", "group_norm_forward", "group_norm_backward",
            "attention_forward", "attention_backward")


@pytest.fixture
def restore_backend():
    previous = backends.get_backend().name
    yield
    backends.set_backend(previous)


@pytest.mark.parametrize("name, ops", [("naive", naive), ("numpy", fast_cpu)])
def test_cpu_backends_by_name(restore_backend, name, ops):
    active = minisd.set_backend(name)
    assert active is minisd.get_backend() and active.name == name and active.xp is np and active.ops is ops
    assert all(callable(getattr(active.ops, f)) for f in CONTRACT)


def test_four_backends_and_a_wrong_name(restore_backend):
    assert backends.BACKENDS == ("naive", "numpy", "emulated", "cupy")
    with pytest.raises(ValueError, match="'gpu' is not a backend; choose one of naive, numpy, emulated, cupy"):
        minisd.set_backend("gpu")


@pytest.mark.parametrize("value, expected", [("naive", "naive"), ("nave", "MINISD_BACKEND 'nave' is not a backend")])
def test_minisd_backend_from_the_environment(value, expected):
    script = "import minisd\ntry:\n    print(minisd.get_backend().name)\nexcept ValueError as e:\n    print(e)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "MINISD_BACKEND": value})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith(expected)


def test_the_naive_backend_trains_through_the_engine(restore_backend):
    """A conv -> group norm -> attention stack on the naive backend: the same loss and
    gradients as on the numpy backend, in float64."""
    from minisd import Tensor, functional as F

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 4, 5, 5)), rng.standard_normal((8, 4, 3, 3))

    def run(name):
        minisd.set_backend(name)
        xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
        h = F.group_norm(F.conv2d(xt, wt, padding=1), 2)
        q = h.reshape(2, 2, 4, 25).transpose(2, 3)
        loss = (F.scaled_dot_product_attention(q, q, q, is_causal=True) ** 2).sum()
        loss.backward()
        assert loss.dtype == np.float64
        return [loss.numpy(), xt.grad, wt.grad]

    for got, want in zip(run("naive"), run("numpy")):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_float64_says_which_backends_compute_float64_throughout():
    """naive and numpy keep float64 in float64 (the float64 checks run on both); the kernels do not."""
    from minisd.backends import BackendUnavailable, _make

    assert _make("naive").float64 and _make("numpy").float64
    try:
        assert not _make("emulated").float64
    except BackendUnavailable:
        pass
