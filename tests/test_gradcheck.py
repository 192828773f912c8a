"""minisd.gradcheck must pass right backward passes and catch wrong ones."""

import re

import numpy as np
import pytest
from helpers import randn

from minisd import Tensor, functional as F
from minisd.gradcheck import gradcheck
from minisd.tensor import Function


class Cube(Function):
    """a^3, with the derivative 3 a^2 (or a deliberately wrong one)."""

    def forward(self, a, wrong=None):
        self.a, self.wrong = a, wrong
        return a ** 3

    def backward(self, g):
        d = 3 * self.a ** 2
        if self.wrong == "factor":
            d = 2 * self.a ** 2  # the classic slip: the wrong power-rule factor
        elif self.wrong == "slightly":
            d = d * 1.001
        elif self.wrong == "one_entry":  # right everywhere but at one coordinate
            d = d.copy()
            d.flat[17] = 0.0
        elif self.wrong == "transposed":
            d = d.T.reshape(d.shape)
        return g * d


class MulWrongSecond(Function):
    """a * b whose gradient for b is wrong (uses b instead of a)."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        return g * self.b, g * self.b


class Forgetful(Function):
    """a * b that forgets to return b's gradient."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        return g * self.b, None


@pytest.mark.parametrize("shape", [(3, 4), (10, 10)])  # every coordinate; random directions
def test_passes_on_a_right_backward(shape):
    assert gradcheck(lambda t: Cube.apply(t), [randn(*shape)]) is True


@pytest.mark.parametrize("wrong", ["factor", "slightly", "transposed"])
@pytest.mark.parametrize("shape", [(3, 4), (10, 10)])
def test_raises_on_a_wrong_backward(wrong, shape):
    with pytest.raises(AssertionError, match=re.escape(f"gradcheck: input 0 (shape {shape})")):
        gradcheck(lambda t: Cube.apply(t, wrong=wrong), [randn(*shape)])


def test_random_directions_catch_a_single_wrong_entry():
    """Above max_coords only a few random directions are probed; one wrong entry still shows."""
    for seed in range(3):
        with pytest.raises(AssertionError):
            gradcheck(lambda t: Cube.apply(t, wrong="one_entry"), [randn(12, 12, seed=seed)], seed=seed)


def test_names_the_input_with_the_wrong_gradient():
    with pytest.raises(AssertionError, match="input 1"):
        gradcheck(lambda a, b: MulWrongSecond.apply(a, b), [randn(2, 3), randn(2, 3, seed=1)])
    with pytest.raises(AssertionError, match="input 1"):
        gradcheck(lambda a, b: Forgetful.apply(a, b), [randn(2, 3), randn(2, 3, seed=1)])


def test_inputs_that_do_not_matter_have_zero_gradient():
    assert gradcheck(lambda a, b: a * 2.0, [randn(3), randn(3, seed=1)])


def test_integer_inputs_are_constants():
    ids = np.array([0, 2, 2, 1])
    assert gradcheck(lambda w, i: F.embedding(i, w), [randn(3, 2), ids])


def test_any_output_shape_and_float32_inputs_are_checked_in_float64():
    x32 = randn(2, 3).astype(np.float32)
    assert gradcheck(lambda t: F.softmax(t * 3.0), [x32])
    assert gradcheck(lambda t: t.sum(), [x32])  # scalar output


def test_an_op_that_drops_to_float32_is_reported():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda t: F.cast(t, np.float32), [randn(3)])


def test_the_inputs_are_not_modified():
    x = randn(4, 5)
    before = x.copy()
    gradcheck(lambda t: Cube.apply(t), [x])
    np.testing.assert_array_equal(x, before)


def test_a_non_differentiable_point_is_caught():
    """abs at exactly 0: backward says 0 (sign(0)), central differences say 0 too; at a kink
    between two points within h they disagree and gradcheck says so."""
    assert gradcheck(lambda t: F.abs(t), [np.array([0.0, 1.0, -2.0])])
    with pytest.raises(AssertionError):
        gradcheck(lambda t: F.relu(t - 1e-7), [np.array([0.0, 1.0, -2.0])])


def test_result_of_a_tensor_function_is_a_tensor():
    """fn may use Tensor methods and Python operators freely."""
    assert gradcheck(lambda a, b: ((a @ b).tanh() * a.sum()).mean(axis=0), [randn(2, 3), randn(3, 4, seed=1)])
    assert isinstance(Cube.apply(Tensor(randn(2))), Tensor)
