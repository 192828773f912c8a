"""Every op in minisd.functional, checked two independent ways.

1. Gradients in float64 against central finite differences (minisd.gradcheck), on
   contiguous and on non-contiguous (transposed) inputs: needs nothing but NumPy.
2. Forward and backward in float32 against PyTorch, on contiguous, transposed and
   strided inputs: shape, dtype, values and every input's gradient (tinygrad's test_ops
   tolerances: forward atol 1e-6 rtol 1e-3, a little looser for float32 sums of many
   terms; gradients atol 1e-4 rtol 1e-3). Skipped when torch is not installed.

Each op is one ``Case`` in a table; the tests run every case through both checks.
Inputs are kept away from kinks (|x| at 0 for abs and relu, the bounds of clip) so that
finite differences are meaningful.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
from helpers import randn

from minisd import Tensor, functional as F, get_backend
from minisd.gradcheck import gradcheck

try:
    import torch
    import torch.nn.functional as TF
except ImportError:  # the torch comparisons skip themselves; gradchecks still run
    torch = TF = None


@pytest.fixture(autouse=True, scope="module")
def _torch_on_one_thread():
    """The ops here are tiny: on a shared machine torch's threads only add contention.
    Restored afterwards, so that other tests (benchmarks) see torch's own setting."""
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

REDUCE_ATOL = 1e-5  # forward atol for float32 results that are sums of many terms


# ------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------


def away_from_zero(*shape, seed=0, margin=0.2):
    """Normal values pushed at least ``margin`` away from 0 (for kinks at 0)."""
    x = randn(*shape, seed=seed)
    return np.sign(x) * (np.abs(x) + margin)


def positive(*shape, seed=0):
    return np.random.default_rng(seed).uniform(0.5, 2.0, size=shape)


def distinct(*shape, seed=0):
    """A random permutation of well-separated values: no ties, so max is differentiable."""
    n = int(np.prod(shape))
    return np.random.default_rng(seed).permutation(np.linspace(-2, 2, n)).reshape(shape)


def layouts(arrays, names=("contiguous", "transposed", "strided")):
    """The same values in differently laid-out memory: (name, arrays) for each layout.

    Only floating-point arrays of 2+ (transposed) or 1+ (strided) dimensions are re-laid;
    integer ids and masks are constants and stay as they are.
    """
    for name in names:
        out = []
        for a in arrays:
            if a.dtype.kind == "f" and name == "transposed" and a.ndim >= 2:
                a = np.ascontiguousarray(a.swapaxes(-1, -2)).swapaxes(-1, -2)
                assert not a.flags.c_contiguous or a.shape[-1] == 1 or a.shape[-2] == 1
            elif a.dtype.kind == "f" and name == "strided" and a.ndim >= 1:
                wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
                wide[..., ::2] = a
                a = wide[..., ::2]
            out.append(a)
        yield name, out


# ------------------------------------------------------------------------------------
# The table of cases
# ------------------------------------------------------------------------------------


@dataclass
class Case:
    fn: Callable  # minisd: takes Tensors, returns a Tensor
    torch_fn: Callable  # the same op in PyTorch: takes torch tensors
    inputs: Callable[[], list]  # float64 arrays (differentiated) and integer/bool arrays (constants)
    atol: float = 1e-6  # forward, float32
    rtol: float = 1e-3
    grad_atol: float = 1e-4
    grad_rtol: float = 1e-3
    gradcheck_kw: dict = field(default_factory=dict)


CASES: dict[str, Case] = {}


def case(name, fn, torch_fn, inputs, **kw):
    assert name not in CASES, name
    CASES[name] = Case(fn, torch_fn, inputs, **kw)


# ---- elementwise arithmetic, with broadcasting and size-1 axes
case("add", lambda a, b: a + b, lambda a, b: a + b, lambda: [randn(3, 4), randn(3, 4, seed=1)])
case("add_broadcast", F.add, torch.add if torch else None, lambda: [randn(3, 1, 5), randn(4, 5, seed=1)])
case("add_size1_axes", lambda a, b: a + b, lambda a, b: a + b, lambda: [randn(1, 3, 1), randn(2, 1, 4, seed=1)])
case("add_vector", lambda a, b: a + b, lambda a, b: a + b, lambda: [randn(2, 3), randn(3, seed=1)])
case("sub_broadcast", lambda a, b: a - b, lambda a, b: a - b, lambda: [randn(2, 3, 4), randn(3, 1, seed=1)])
case("rsub_number", lambda a: 2.5 - a, lambda a: 2.5 - a, lambda: [randn(3, 4)])
case("mul_broadcast", lambda a, b: a * b, lambda a, b: a * b, lambda: [randn(3, 1, 5), randn(4, 5, seed=1)])
case("mul_self", lambda a: a * a, lambda a: a * a, lambda: [randn(3, 4)])
case("div_broadcast", lambda a, b: a / b, lambda a, b: a / b,
     lambda: [randn(2, 3), away_from_zero(3, seed=1, margin=0.5)])
case("rdiv_number", lambda a: 1.5 / a, lambda a: 1.5 / a, lambda: [away_from_zero(3, 4, margin=0.5)])
case("neg", lambda a: -a, lambda a: -a, lambda: [randn(3, 4)])
for p in (2, 3, 0.5, -1.5):
    case(f"pow_{p}", lambda a, p=p: a ** p, lambda a, p=p: a ** p, lambda: [positive(3, 5)])
case("pow_int_negative_base", lambda a: F.pow(a, 3), lambda a: a ** 3, lambda: [randn(3, 5)])
case("exp", F.exp, torch.exp if torch else None, lambda: [randn(3, 5)])
case("log", F.log, torch.log if torch else None, lambda: [positive(3, 5)])
case("sqrt", F.sqrt, torch.sqrt if torch else None, lambda: [positive(3, 5)])
case("abs", F.abs, torch.abs if torch else None, lambda: [away_from_zero(3, 5)])
case("sin", F.sin, torch.sin if torch else None, lambda: [randn(3, 5)])
case("cos", F.cos, torch.cos if torch else None, lambda: [randn(3, 5)])
# clip: values on a grid that never lands within 0.05 of a bound
_clip_in = lambda: [np.random.default_rng(0).permutation(np.linspace(-1.43, 1.43, 15)).reshape(3, 5)]  # noqa: E731
case("clip", lambda a: F.clip(a, -0.5, 0.5), lambda a: a.clamp(-0.5, 0.5), _clip_in)
case("clip_lo", lambda a: a.clip(lo=-0.5), lambda a: a.clamp(min=-0.5), _clip_in)
case("clip_hi", lambda a: F.clamp(a, max=0.5), lambda a: a.clamp(max=0.5), _clip_in)
# tensor bounds (broadcast), and a lower bound above the upper one in places (then the upper wins)
case("clamp_tensor_bounds", lambda a, lo, hi: F.clamp(a, lo, hi), lambda a, lo, hi: torch.clamp(a, lo, hi),
     lambda: [_clip_in()[0], np.array([-0.9, -0.3, 0.1, -2.0, 0.72]), np.array([[0.35], [1.1], [-0.5]])])
case("clamp_tensor_min_only", lambda a, lo: a.clamp(min=lo), lambda a, lo: a.clamp(min=lo),
     lambda: [_clip_in()[0], np.array([-0.9, -0.3, 0.1, -2.0, 0.72])])
case("where", lambda a, b: F.where(_mask, a, b), lambda a, b: torch.where(torch.tensor(_mask), a, b),
     lambda: [randn(3, 4), randn(4, seed=1)])
case("pow_tensor_exponent", lambda a, b: a ** b, lambda a, b: a ** b, lambda: [positive(3, 4), randn(3, 4, seed=1)])
case("rpow_number_base", lambda b: 2.0 ** b, lambda b: 2.0 ** b, lambda: [randn(3, 4)])

# ---- matrix products
case("matmul", lambda a, b: a @ b, torch.matmul if torch else None, lambda: [randn(3, 4), randn(4, 5, seed=1)],
     atol=REDUCE_ATOL)
case("matmul_batched", F.matmul, torch.matmul if torch else None, lambda: [randn(2, 3, 4), randn(2, 4, 5, seed=1)],
     atol=REDUCE_ATOL)
case("matmul_broadcast", F.matmul, torch.matmul if torch else None,
     lambda: [randn(2, 1, 3, 4), randn(3, 4, 2, seed=1)], atol=REDUCE_ATOL)
case("matmul_broadcast_2d_right", F.matmul, torch.matmul if torch else None,
     lambda: [randn(2, 3, 4), randn(4, 1, seed=1)], atol=REDUCE_ATOL)
case("matmul_broadcast_2d_left", F.matmul, torch.matmul if torch else None,
     lambda: [randn(3, 4), randn(2, 4, 5, seed=1)], atol=REDUCE_ATOL)
case("matmul_vector_left", F.matmul, torch.matmul if torch else None,
     lambda: [randn(4), randn(2, 4, 5, seed=1)], atol=REDUCE_ATOL)
case("matmul_vector_right", F.matmul, torch.matmul if torch else None,
     lambda: [randn(2, 1, 3, 4), randn(4, seed=1)], atol=REDUCE_ATOL)
case("matmul_vector_dot", F.matmul, torch.matmul if torch else None, lambda: [randn(4), randn(4, seed=1)],
     atol=REDUCE_ATOL)

# ---- reductions
for axis, keep in [(None, False), (None, True), (1, False), (-1, True), ((0, 2), False), ((0, 2), True)]:
    dims = tuple(range(3)) if axis is None else axis
    tag = f"{axis}_{'keep' if keep else 'drop'}".replace(" ", "")
    case(f"sum_{tag}", lambda a, axis=axis, keep=keep: a.sum(axis, keep),
         lambda a, dims=dims, keep=keep: a.sum(dim=dims, keepdim=keep), lambda: [randn(2, 3, 5)], atol=REDUCE_ATOL)
    case(f"mean_{tag}", lambda a, axis=axis, keep=keep: F.mean(a, axis, keep),
         lambda a, dims=dims, keep=keep: a.mean(dim=dims, keepdim=keep), lambda: [randn(2, 3, 5)], atol=REDUCE_ATOL)
    case(f"var_{tag}", lambda a, axis=axis, keep=keep: a.var(axis, keep),  # torch's default: correction=1
         lambda a, dims=dims, keep=keep: a.var(dim=dims, keepdim=keep), lambda: [randn(2, 3, 5)],
         atol=REDUCE_ATOL)
    case(f"var_biased_{tag}", lambda a, axis=axis, keep=keep: F.var(a, axis, keep, correction=0),
         lambda a, dims=dims, keep=keep: a.var(dim=dims, keepdim=keep, correction=0), lambda: [randn(2, 3, 5)],
         atol=REDUCE_ATOL)
    case(f"amax_{tag}", lambda a, axis=axis, keep=keep: F.amax(a, axis, keep),
         lambda a, dims=dims, keep=keep: torch.amax(a, dim=dims, keepdim=keep), lambda: [distinct(2, 3, 5)])
    case(f"amin_{tag}", lambda a, axis=axis, keep=keep: a.amin(axis, keep),
         lambda a, dims=dims, keep=keep: torch.amin(a, dim=dims, keepdim=keep), lambda: [distinct(2, 3, 5)])
for axis, keep in [(0, False), (-1, True)]:
    case(f"max_values_{axis}_{keep}", lambda a, axis=axis, keep=keep: F.max(a, axis, keep).values,
         lambda a, axis=axis, keep=keep: torch.max(a, axis, keep).values, lambda: [distinct(2, 3, 5)])
    case(f"min_values_{axis}_{keep}", lambda a, axis=axis, keep=keep: a.min(axis, keep).values,
         lambda a, axis=axis, keep=keep: torch.min(a, axis, keep).values, lambda: [distinct(2, 3, 5)])
case("max_all", lambda a: a.max(), lambda a: a.max(), lambda: [distinct(2, 3, 5)])
case("var_correction_2", lambda a: F.var(a, 1, correction=2), lambda a: a.var(1, correction=2),
     lambda: [randn(2, 4, 3)], atol=REDUCE_ATOL)
case("var_unbiased_false", lambda a: a.var(0, unbiased=False), lambda a: a.var(0, unbiased=False),
     lambda: [randn(4, 3)], atol=REDUCE_ATOL)
case("sum_size1_axis", lambda a: a.sum(1), lambda a: a.sum(1), lambda: [randn(3, 1, 4)])

# ---- shapes
case("reshape", lambda a: a.reshape(6, 4), lambda a: a.reshape(6, 4), lambda: [randn(2, 3, 4)])
case("reshape_infer", lambda a: F.reshape(a, (-1,)), lambda a: a.reshape(-1), lambda: [randn(2, 3, 4)])
case("view_tuple", lambda a: a.view((4, -1)), lambda a: a.reshape(4, -1), lambda: [randn(2, 3, 4)])
case("permute", lambda a: a.permute(2, 0, 1), lambda a: a.permute(2, 0, 1), lambda: [randn(2, 3, 4)])
case("permute_negative", lambda a: F.permute(a, (-1, 0, 1)), lambda a: a.permute(-1, 0, 1), lambda: [randn(2, 3, 4)])
case("transpose", lambda a: a.transpose(0, 2), lambda a: a.transpose(0, 2), lambda: [randn(2, 3, 4)])
case("transpose_T", lambda a: a.T * 1.0, lambda a: a.transpose(-1, -2) * 1.0, lambda: [randn(2, 3, 4)])
case("flatten", lambda a: a.flatten(1), lambda a: a.flatten(1), lambda: [randn(2, 3, 4)])
case("flatten_range", lambda a: F.flatten(a, 0, 1), lambda a: a.flatten(0, 1), lambda: [randn(2, 3, 4)])
case("unsqueeze", lambda a: a.unsqueeze(1), lambda a: a.unsqueeze(1), lambda: [randn(2, 3)])
case("unsqueeze_last", lambda a: F.unsqueeze(a, -1), lambda a: a.unsqueeze(-1), lambda: [randn(2, 3)])
case("squeeze_all", lambda a: a.squeeze(), lambda a: a.squeeze(), lambda: [randn(2, 1, 3, 1)])
case("squeeze_one", lambda a: F.squeeze(a, 1), lambda a: a.squeeze(1), lambda: [randn(2, 1, 3, 1)])
case("squeeze_negative", lambda a: a.squeeze(-1), lambda a: a.squeeze(-1), lambda: [randn(2, 1, 3, 1)])
case("squeeze_not_size1_is_noop", lambda a: F.squeeze(a, 0), lambda a: a.squeeze(0), lambda: [randn(2, 1, 3)])
case("expand", lambda a: a.expand(2, 3, 4), lambda a: a.expand(2, 3, 4), lambda: [randn(3, 1)])
case("expand_minus1", lambda a: F.expand(a, (4, -1, 3)), lambda a: a.expand(4, -1, 3), lambda: [randn(2, 1)])

# ---- indexing: basic and advanced
_mask = np.array([[True, False, True, True], [False, False, True, False], [True, True, False, False]])
case("getitem_int", lambda a: a[1], lambda a: a[1], lambda: [randn(3, 4)])
case("getitem_negative_int", lambda a: a[-1, 2], lambda a: a[-1, 2], lambda: [randn(3, 4)])
case("getitem_slices", lambda a: a[:, 1:3], lambda a: a[:, 1:3], lambda: [randn(3, 4)])
case("getitem_step", lambda a: a[::2, 1::2], lambda a: a[::2, 1::2], lambda: [randn(5, 4)])
case("getitem_negative_step", lambda a: a[::-1, ::-2],
     lambda a: torch.flip(a, (0, 1))[:, ::2], lambda: [randn(3, 4)])
case("getitem_none", lambda a: a[None, 1], lambda a: a[None, 1], lambda: [randn(3, 4)])
case("getitem_ellipsis", lambda a: a[..., 1:, None], lambda a: a[..., 1:, None], lambda: [randn(2, 3, 4)])
case("getitem_ellipsis_int", lambda a: a[1, ..., 0], lambda a: a[1, ..., 0], lambda: [randn(2, 3, 4)])
case("getitem_int_array_repeats", lambda a: a[np.array([0, 2, 0, 0])],
     lambda a: a[torch.tensor([0, 2, 0, 0])], lambda: [randn(3, 4)])
case("getitem_list_repeats", lambda a: a[:, [1, 1, 3]], lambda a: a[:, [1, 1, 3]], lambda: [randn(3, 4)])
case("getitem_tensor_index", lambda a: a[Tensor(np.array([2, 2, 1]))],
     lambda a: a[torch.tensor([2, 2, 1])], lambda: [randn(3, 4)])
case("getitem_two_arrays", lambda a: a[np.array([0, 2, 2]), np.array([3, 1, 1])],
     lambda a: a[torch.tensor([0, 2, 2]), torch.tensor([3, 1, 1])], lambda: [randn(3, 4)])
case("getitem_bool_mask", lambda a: a[_mask], lambda a: a[torch.tensor(_mask)], lambda: [randn(3, 4)])
case("getitem_bool_tensor_mask", lambda a: a[a > 0.3], lambda a: a[a > 0.3], lambda: [randn(3, 4)])
case("getitem_bool_rows", lambda a: a[np.array([True, False, True])],
     lambda a: a[torch.tensor([True, False, True])], lambda: [randn(3, 4)])
# a whole number and an array apart: torch picks with the number first ((4, 2) here, where
# NumPy would give (2, 4)); next to each other, and with Ellipsis
case("getitem_int_slice_array", lambda a: a[1, :, [0, 2, 2]], lambda a: a[1, :, [0, 2, 2]],
     lambda: [randn(2, 4, 3)])
case("getitem_int_array_adjacent", lambda a: a[:, 1, np.array([2, 0])], lambda a: a[:, 1, torch.tensor([2, 0])],
     lambda: [randn(2, 4, 3)])
case("getitem_int_ellipsis_array", lambda a: a[0, ..., [1, 1]], lambda a: a[0, ..., [1, 1]],
     lambda: [randn(2, 3, 4, 3)])

# ---- joining, splitting, padding
case("cat_axis0", lambda a, b: F.cat([a, b]), lambda a, b: torch.cat([a, b]),
     lambda: [randn(2, 3), randn(4, 3, seed=1)])
case("cat_axis_last", lambda a, b, c: F.cat([a, b, c], axis=-1), lambda a, b, c: torch.cat([a, b, c], -1),
     lambda: [randn(2, 3), randn(2, 1, seed=1), randn(2, 2, seed=2)])
case("stack_axis0", lambda a, b: F.stack([a, b]), lambda a, b: torch.stack([a, b]),
     lambda: [randn(2, 3), randn(2, 3, seed=1)])
case("stack_axis1", lambda a, b: F.stack([a, b], axis=1), lambda a, b: torch.stack([a, b], 1),
     lambda: [randn(2, 3), randn(2, 3, seed=1)])
case("chunk", lambda a: (lambda c: c[0] * c[1] + c[2])(F.chunk(a, 3, axis=1)),
     lambda a: (lambda c: c[0] * c[1] + c[2])(torch.chunk(a, 3, 1)), lambda: [randn(2, 6, 2)])
case("chunk_method_last_axis", lambda a: a.chunk(2, axis=-1)[1], lambda a: a.chunk(2, -1)[1], lambda: [randn(3, 4)])
case("chunk_uneven", lambda a: (lambda c: c[0].sum() * c[-1].sum() + len(c))(F.chunk(a, 4, axis=1)),
     lambda a: (lambda c: c[0].sum() * c[-1].sum() + len(c))(torch.chunk(a, 4, 1)), lambda: [randn(2, 6, 2)])
case("abs_operator", lambda a: abs(a) * 2, lambda a: abs(a) * 2, lambda: [away_from_zero(3, 4)])
case("pad_last", lambda a: F.pad(a, (1, 2)), lambda a: TF.pad(a, (1, 2)), lambda: [randn(2, 3)])
case("pad_2d_value", lambda a: F.pad(a, (1, 0, 2, 1), value=0.5), lambda a: TF.pad(a, (1, 0, 2, 1), value=0.5),
     lambda: [randn(1, 2, 3, 3)])

# ---- linear and embedding
case("linear_bias_2d", F.linear, TF.linear if TF else None,
     lambda: [randn(5, 4), randn(3, 4, seed=1), randn(3, seed=2)], atol=REDUCE_ATOL)
case("linear_no_bias_2d", F.linear, TF.linear if TF else None, lambda: [randn(5, 4), randn(3, 4, seed=1)],
     atol=REDUCE_ATOL)
case("linear_bias_3d", F.linear, TF.linear if TF else None,
     lambda: [randn(2, 3, 4), randn(5, 4, seed=1), randn(5, seed=2)], atol=REDUCE_ATOL)
case("linear_no_bias_3d", F.linear, TF.linear if TF else None, lambda: [randn(2, 3, 4), randn(5, 4, seed=1)],
     atol=REDUCE_ATOL)
case("embedding_repeated_ids", lambda ids, w: F.embedding(ids, w), lambda ids, w: TF.embedding(ids, w),
     lambda: [np.array([[0, 2, 2, 4], [1, 0, 2, 2]]), randn(5, 3)])

# ---- activations
case("relu", F.relu, torch.relu if torch else None, lambda: [away_from_zero(3, 5)])
case("sigmoid", F.sigmoid, torch.sigmoid if torch else None, lambda: [randn(3, 5) * 3])
case("sigmoid_method", lambda a: a.sigmoid(), lambda a: a.sigmoid(), lambda: [randn(3, 5)])
case("tanh", lambda a: a.tanh(), torch.tanh if torch else None, lambda: [randn(3, 5) * 2])
case("silu", F.silu, TF.silu if TF else None, lambda: [randn(3, 5) * 3])
case("quick_gelu", F.quick_gelu, lambda a: a * torch.sigmoid(1.702 * a), lambda: [randn(3, 5) * 3])
case("gelu_exact", F.gelu, TF.gelu if TF else None, lambda: [randn(3, 5) * 3])
case("gelu_tanh", lambda a: F.gelu(a, approximate="tanh"), lambda a: TF.gelu(a, approximate="tanh"),
     lambda: [randn(3, 5) * 3])
case("geglu", F.geglu, lambda x: (lambda h, g: h * TF.gelu(g))(*x.chunk(2, -1)), lambda: [randn(2, 3, 8) * 3])
case("softmax_last", F.softmax, lambda a: torch.softmax(a, -1), lambda: [randn(3, 5) * 2])
case("softmax_axis0", lambda a: a.softmax(0), lambda a: torch.softmax(a, 0), lambda: [randn(3, 1, 5) * 2])
case("log_softmax_last", F.log_softmax, lambda a: torch.log_softmax(a, -1), lambda: [randn(3, 5) * 2])
case("log_softmax_axis1", lambda a: F.log_softmax(a, axis=1), lambda a: torch.log_softmax(a, 1),
     lambda: [randn(2, 4, 3) * 2])

# ---- normalisation
for groups in (1, 3, 6):
    case(f"group_norm_G{groups}_affine", lambda x, w, b, g=groups: F.group_norm(x, g, w, b),
         lambda x, w, b, g=groups: TF.group_norm(x, g, w, b),
         lambda: [randn(2, 6, 3, 3), 1 + 0.3 * randn(6, seed=1), randn(6, seed=2)], atol=REDUCE_ATOL)
    case(f"group_norm_G{groups}_plain", lambda x, g=groups: F.group_norm(x, g),
         lambda x, g=groups: TF.group_norm(x, g), lambda: [randn(2, 6, 3, 3)], atol=REDUCE_ATOL)
case("group_norm_odd_hw", lambda x, w, b: F.group_norm(x, 2, w, b, eps=1e-6),
     lambda x, w, b: TF.group_norm(x, 2, w, b, eps=1e-6),
     lambda: [randn(3, 4, 3, 5), 1 + 0.3 * randn(4, seed=1), randn(4, seed=2)], atol=REDUCE_ATOL)
case("group_norm_3d_input", lambda x: F.group_norm(x, 2), lambda x: TF.group_norm(x, 2), lambda: [randn(2, 4, 5)],
     atol=REDUCE_ATOL)
case("layer_norm_affine", lambda x, w, b: F.layer_norm(x, 5, w, b), lambda x, w, b: TF.layer_norm(x, (5,), w, b),
     lambda: [randn(2, 3, 5), 1 + 0.3 * randn(5, seed=1), randn(5, seed=2)], atol=REDUCE_ATOL)
case("layer_norm_plain", lambda x: F.layer_norm(x, (5,)), lambda x: TF.layer_norm(x, (5,)),
     lambda: [randn(4, 5)], atol=REDUCE_ATOL)
case("layer_norm_two_axes", lambda x, w, b: F.layer_norm(x, (3, 4), w, b, eps=1e-6),
     lambda x, w, b: TF.layer_norm(x, (3, 4), w, b, eps=1e-6),
     lambda: [randn(2, 3, 4), 1 + 0.3 * randn(3, 4, seed=1), randn(3, 4, seed=2)], atol=REDUCE_ATOL)

# weight or bias alone (torch allows either; its own group_norm backward fails on a bias alone,
# so that one is held against torch with a weight of ones)
case("group_norm_weight_only", lambda x, w: F.group_norm(x, 2, w), lambda x, w: TF.group_norm(x, 2, w),
     lambda: [randn(2, 4, 3, 3), 1 + 0.3 * randn(4, seed=1)], atol=REDUCE_ATOL)
case("group_norm_bias_only", lambda x, b: F.group_norm(x, 2, bias=b),
     lambda x, b: TF.group_norm(x, 2, torch.ones_like(b), b), lambda: [randn(2, 4, 3, 3), randn(4, seed=1)],
     atol=REDUCE_ATOL)
case("layer_norm_weight_only", lambda x, w: F.layer_norm(x, 5, w), lambda x, w: TF.layer_norm(x, (5,), w),
     lambda: [randn(2, 3, 5), 1 + 0.3 * randn(5, seed=1)], atol=REDUCE_ATOL)
case("layer_norm_bias_only", lambda x, b: F.layer_norm(x, 5, bias=b), lambda x, b: TF.layer_norm(x, (5,), bias=b),
     lambda: [randn(2, 3, 5), randn(5, seed=1)], atol=REDUCE_ATOL)

# ---- convolution: stride 1/2 x padding 0/1/2 x kernel 1/3, bias or not, odd sizes
for k in (1, 3):
    for stride in (1, 2):
        for padding in (0, 1, 2):
            for bias in (True, False):
                shapes = [(2, 2, 5, 6), (3, 2, k, k)] + ([(3,)] if bias else [])
                case(f"conv2d_k{k}_s{stride}_p{padding}_{'bias' if bias else 'nobias'}",
                     lambda *t, s=stride, p=padding: F.conv2d(*t, stride=s, padding=p),
                     lambda *t, s=stride, p=padding: TF.conv2d(*t, stride=s, padding=p),
                     lambda shapes=shapes: [randn(*sh, seed=i) for i, sh in enumerate(shapes)], atol=REDUCE_ATOL)
for k, stride, padding in [(2, 1, 0), (2, 1, 1), (2, 2, 0), (4, 2, 1), (5, 3, 2), (3, 3, 0), (3, 1, 3)]:
    case(f"conv2d_k{k}_s{stride}_p{padding}_more", lambda x, w, b, s=stride, p=padding: F.conv2d(x, w, b, s, p),
         lambda x, w, b, s=stride, p=padding: TF.conv2d(x, w, b, stride=s, padding=p),
         lambda k=k: [randn(2, 2, 7, 6), randn(3, 2, k, k, seed=1), randn(3, seed=2)], atol=REDUCE_ATOL)
# a kernel wider than the image (7 over 3 columns padded by 2) on tall outputs: shifted rows
# with some kernel columns that fall wholly in the padding
case("conv2d_kernel_wider_than_image", lambda x, w, b: F.conv2d(x, w, b, padding=2),
     lambda x, w, b: TF.conv2d(x, w, b, padding=2),
     lambda: [randn(1, 2, 13, 3), randn(2, 2, 7, 7, seed=1), randn(2, seed=2)], atol=REDUCE_ATOL)
case("conv2d_odd_square", lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
     lambda x, w, b: TF.conv2d(x, w, b, stride=2, padding=1),
     lambda: [randn(1, 3, 7, 7), randn(2, 3, 3, 3, seed=1), randn(2, seed=2)], atol=REDUCE_ATOL)
case("conv2d_tuple_args", lambda x, w: F.conv2d(x, w, stride=(1, 1), padding=(1, 1)),
     lambda x, w: TF.conv2d(x, w, stride=1, padding=1), lambda: [randn(1, 1, 4, 4), randn(2, 1, 3, 3, seed=1)],
     atol=REDUCE_ATOL)

# ---- size-1 axes through the heavier ops
case("matmul_size1", F.matmul, torch.matmul if torch else None, lambda: [randn(1, 3), randn(3, 1, seed=1)],
     atol=REDUCE_ATOL)
case("conv2d_height1", lambda x, w, b: F.conv2d(x, w, b), lambda x, w, b: TF.conv2d(x, w, b),
     lambda: [randn(2, 3, 1, 5), randn(2, 3, 1, 1, seed=1), randn(2, seed=2)], atol=REDUCE_ATOL)
case("conv2d_1x1_image_padded", lambda x, w: F.conv2d(x, w, padding=1), lambda x, w: TF.conv2d(x, w, padding=1),
     lambda: [randn(1, 2, 1, 1), randn(3, 2, 3, 3, seed=1)], atol=REDUCE_ATOL)
case("group_norm_1x1_spatial", lambda x: F.group_norm(x, 2), lambda x: TF.group_norm(x, 2),
     lambda: [randn(3, 4, 1, 1)], atol=REDUCE_ATOL)
case("softmax_size1_axis", lambda a: F.softmax(a, axis=1), lambda a: torch.softmax(a, 1), lambda: [randn(3, 1, 2)])
case("layer_norm_batch1", lambda x, w, b: F.layer_norm(x, 4, w, b), lambda x, w, b: TF.layer_norm(x, (4,), w, b),
     lambda: [randn(1, 1, 4), 1 + 0.3 * randn(4, seed=1), randn(4, seed=2)], atol=REDUCE_ATOL)

# ---- resampling
case("interpolate_nearest_x2", lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
     lambda x: TF.interpolate(x, scale_factor=2, mode="nearest"), lambda: [randn(1, 2, 3, 4)])
case("interpolate_nearest_x3", lambda x: F.interpolate(x, scale_factor=3, mode="nearest"),
     lambda x: TF.interpolate(x, scale_factor=3, mode="nearest"), lambda: [randn(2, 2, 3, 2)])
case("interpolate_nearest_size", lambda x: F.interpolate(x, size=(5, 9)),
     lambda x: TF.interpolate(x, size=(5, 9), mode="nearest"), lambda: [randn(2, 2, 3, 5)])
case("interpolate_nearest_size_down", lambda x: F.interpolate(x, size=(2, 3)),
     lambda x: TF.interpolate(x, size=(2, 3), mode="nearest"), lambda: [randn(1, 2, 5, 7)])

# ---- attention: self, cross (Lq != Lk), causal, masks, 3-D and 4-D
_sdpa = F.scaled_dot_product_attention
_tsdpa = lambda *a, **k: TF.scaled_dot_product_attention(*a, **k)  # noqa: E731
_bool_mask = np.array([[True, False, True, True, False, True],
                       [False, True, True, False, False, False],
                       [True, True, True, True, True, True],
                       [False, False, False, False, False, True]])
_add_mask = randn(4, 6, seed=7)
_qkv = lambda Lq, Lk, lead=(2, 2), d=3, dv=3: lambda: [  # noqa: E731
    randn(*lead, Lq, d), randn(*lead, Lk, d, seed=1), randn(*lead, Lk, dv, seed=2)]
case("attention_self", _sdpa, _tsdpa, _qkv(4, 4), atol=REDUCE_ATOL)
case("attention_cross", _sdpa, _tsdpa, _qkv(4, 6), atol=REDUCE_ATOL)
case("attention_causal", lambda q, k, v: _sdpa(q, k, v, is_causal=True),
     lambda q, k, v: _tsdpa(q, k, v, is_causal=True), _qkv(5, 5), atol=REDUCE_ATOL)
case("attention_causal_cross", lambda q, k, v: _sdpa(q, k, v, is_causal=True),
     lambda q, k, v: _tsdpa(q, k, v, is_causal=True), _qkv(4, 6), atol=REDUCE_ATOL)
case("attention_values_wider", _sdpa, _tsdpa, _qkv(4, 6, dv=5), atol=REDUCE_ATOL)
case("attention_values_narrower_causal", lambda q, k, v: _sdpa(q, k, v, is_causal=True),
     lambda q, k, v: _tsdpa(q, k, v, is_causal=True), _qkv(5, 5, d=4, dv=2), atol=REDUCE_ATOL)
case("attention_3d", _sdpa, _tsdpa, _qkv(4, 6, lead=(3,)), atol=REDUCE_ATOL)
case("attention_3d_causal", lambda q, k, v: _sdpa(q, k, v, is_causal=True),
     lambda q, k, v: _tsdpa(q, k, v, is_causal=True), _qkv(4, 4, lead=(2,)), atol=REDUCE_ATOL)
case("attention_bool_mask", lambda q, k, v: _sdpa(q, k, v, attn_mask=_bool_mask),
     lambda q, k, v: _tsdpa(q, k, v, attn_mask=torch.tensor(_bool_mask)), _qkv(4, 6, dv=5), atol=REDUCE_ATOL)
case("attention_bool_mask_3d", lambda q, k, v: _sdpa(q, k, v, attn_mask=Tensor(_bool_mask)),
     lambda q, k, v: _tsdpa(q, k, v, attn_mask=torch.tensor(_bool_mask)), _qkv(4, 6, lead=(2,)), atol=REDUCE_ATOL)
case("attention_additive_mask", lambda q, k, v: _sdpa(q, k, v, attn_mask=_add_mask),
     lambda q, k, v: _tsdpa(q, k, v, attn_mask=torch.tensor(_add_mask, dtype=q.dtype)), _qkv(4, 6, dv=5),
     atol=REDUCE_ATOL)
case("attention_single_key", _sdpa, _tsdpa, lambda: [randn(1, 1, 3, 2), randn(1, 1, 1, 2, seed=1),
                                                      randn(1, 1, 1, 2, seed=2)], atol=REDUCE_ATOL)
case("attention_scale", lambda q, k, v: _sdpa(q, k, v, scale=0.3),
     lambda q, k, v: _tsdpa(q, k, v, scale=0.3), _qkv(3, 4), atol=REDUCE_ATOL)

# ---- losses
for reduction in ("mean", "sum", "none"):
    case(f"mse_loss_{reduction}", lambda a, b, r=reduction: F.mse_loss(a, b, reduction=r),
         lambda a, b, r=reduction: TF.mse_loss(a, b, reduction=r), lambda: [randn(2, 3, 4), randn(2, 3, 4, seed=1)],
         atol=REDUCE_ATOL)
case("cross_entropy", lambda logits, t: F.cross_entropy(logits, t), lambda logits, t: TF.cross_entropy(logits, t),
     lambda: [randn(5, 4) * 2, np.array([0, 3, 3, 1, 2])], atol=REDUCE_ATOL)
case("cross_entropy_tensor_target", lambda logits, t: F.cross_entropy(logits, Tensor(t.data)),
     lambda logits, t: TF.cross_entropy(logits, t), lambda: [randn(3, 7) * 2, np.array([6, 0, 6])], atol=REDUCE_ATOL)


# ------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------

NAMES = sorted(CASES)


def _skip_float64_on_kernels(name):
    """The kernels (MINISD_BACKEND=emulated or cupy) compute conv2d, group_norm and fused
    attention in float32 only; float64 checks of those ops are for the naive and numpy backends."""
    on_kernels = name.startswith(("conv2d", "group_norm")) or (name.startswith("attention") and "mask" not in name)
    if on_kernels and not get_backend().float64:
        pytest.skip(f"{get_backend().name} backend: {name} runs a float32 kernel")


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name):
    """backward() agrees with finite differences, on contiguous and transposed inputs."""
    _skip_float64_on_kernels(name)
    c = CASES[name]
    for _, arrays in layouts(c.inputs(), names=("contiguous", "transposed")):
        assert gradcheck(c.fn, arrays, **c.gradcheck_kw)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_kept(name, dtype):
    """float32 in, float32 out (values and gradients); the same for float64."""
    if dtype == np.float64:
        _skip_float64_on_kernels(name)
    c = CASES[name]
    tensors = [Tensor(a.astype(dtype), requires_grad=True) if a.dtype.kind == "f" else Tensor(a) for a in c.inputs()]
    out = c.fn(*tensors)
    assert out.dtype == dtype
    out.backward(np.ones(out.shape, dtype=dtype))
    for t in tensors:
        if t.requires_grad and t.grad is not None:
            assert t.grad.dtype == dtype and t.grad.shape == t.shape


@pytest.mark.parametrize("name", NAMES)
def test_against_torch_float32(name):
    """Forward values and every input gradient equal PyTorch's, for three memory layouts
    of the inputs and of the gradient coming from above."""
    pytest.importorskip("torch")
    c = CASES[name]
    inputs32 = [a.astype(np.float32) if a.dtype.kind == "f" else a for a in c.inputs()]
    upstream = None
    for layout, arrays in layouts(inputs32):
        ours = [Tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
        theirs = [torch.tensor(np.ascontiguousarray(a), requires_grad=a.dtype.kind == "f") for a in arrays]
        out, ref = c.fn(*ours), c.torch_fn(*theirs)
        assert out.shape == tuple(ref.shape), layout
        assert out.dtype == np.float32, layout
        np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), atol=c.atol, rtol=c.rtol, err_msg=layout)

        if upstream is None:
            upstream = randn(*out.shape, seed=123, dtype=np.float32)
        # the upstream gradient in the same layout: backward passes must not assume contiguous input
        (_, (g,)), = layouts([upstream], names=(layout,))
        out.backward(g)
        ref.backward(torch.tensor(upstream))
        for i, (t, tt) in enumerate(zip(ours, theirs)):
            if not t.requires_grad:
                continue
            got = t.grad if t.grad is not None else np.zeros(t.shape, np.float32)
            want = tt.grad.numpy() if tt.grad is not None else np.zeros(t.shape, np.float32)
            assert got.dtype == np.float32 and got.shape == t.shape
            np.testing.assert_allclose(got, want, atol=c.grad_atol, rtol=c.grad_rtol,
                                       err_msg=f"gradient of input {i}, {layout}")


# ------------------------------------------------------------------------------------
# Ops that need more than the table: ties, stability, casts, dropout
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 1, (0, 1)])
def test_amax_ties_share_the_gradient_as_torch_amax(axis):
    torch = pytest.importorskip("torch")
    x = np.array([[1.0, 3.0, 3.0, -1.0], [2.0, 2.0, 2.0, 0.5], [3.0, 0.0, 1.0, 3.0]], dtype=np.float32)
    t = Tensor(x, requires_grad=True)
    out = F.amax(t, axis)
    out.backward(np.arange(1, out.size + 1, dtype=np.float32).reshape(out.shape))
    tt = torch.tensor(x, requires_grad=True)
    dims = () if axis is None else axis
    ref = torch.amax(tt, dim=dims)
    ref.backward(torch.arange(1, ref.numel() + 1, dtype=torch.float32).reshape(ref.shape))
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy())
    np.testing.assert_allclose(t.grad, tt.grad.numpy(), rtol=1e-6)
    # Whatever the ties, the gradient of a max sums to the upstream gradient.
    assert t.grad.sum() == pytest.approx(float(np.arange(1, out.size + 1).sum()))


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax])
def test_softmax_is_stable_for_large_inputs(fn):
    torch = pytest.importorskip("torch")
    x = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1002.0, -1001.0], [3e4, -3e4, 0.0]], dtype=np.float32)
    t = Tensor(x, requires_grad=True)
    out = fn(t)
    out.backward(np.ones_like(x))
    tt = torch.tensor(x, requires_grad=True)
    ref = (torch.softmax if fn is F.softmax else torch.log_softmax)(tt, -1)
    ref.backward(torch.ones_like(tt))
    assert np.isfinite(out.numpy()).all() and np.isfinite(t.grad).all()
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(t.grad, tt.grad.numpy(), atol=1e-5, rtol=1e-4)


def test_sigmoid_and_silu_do_not_overflow():
    x = Tensor(np.array([-1e4, -100.0, 0.0, 100.0, 1e4], dtype=np.float32), requires_grad=True)
    with np.errstate(all="raise"):
        s = F.sigmoid(x)
        y = F.silu(x)
        (s + y).sum().backward()
    np.testing.assert_allclose(s.numpy(), [0, 0, 0.5, 1, 1], atol=1e-30)
    np.testing.assert_allclose(y.numpy(), [0, 0, 0, 100, 1e4], atol=1e-30)


def test_numpy_scalar_arguments_keep_float32():
    """NumPy scalars are float64 and 'strong' in NumPy's promotion; as arguments they must not promote."""
    x = Tensor(positive(2, 4, 3, 3).astype(np.float32), requires_grad=True)
    outs = [x ** np.float64(0.5), F.pow(x, np.float64(2)), F.clip(x, np.float64(0.6), np.float64(1.5)),
            F.group_norm(x, 2, eps=np.float64(1e-5)), F.layer_norm(x, 3, eps=np.float64(1e-5)),
            F.dropout(x, np.float64(0.5)), F.interpolate(x, scale_factor=np.float64(2.0)),
            F.scaled_dot_product_attention(x, x, x, scale=np.float64(0.5)), x * np.sqrt(2.0), np.float64(2) - x]
    for out in outs:
        assert out.dtype == np.float32
        out.backward(np.ones(out.shape, np.float32))
        assert x.grad.dtype == np.float32


def test_cast_between_float32_and_float64():
    x = Tensor(randn(2, 3).astype(np.float32), requires_grad=True)
    y = F.cast(x, np.float64)
    assert y.dtype == np.float64 and np.array_equal(y.numpy(), x.numpy().astype(np.float64))
    (y * y).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad, 2 * x.numpy(), rtol=1e-6)
    back = x.astype(np.float64).astype(np.float32)
    assert back.dtype == np.float32 and np.array_equal(back.numpy(), x.numpy())
    # gradient through a round trip float64 -> float32 -> float64 composition
    assert gradcheck(lambda a: F.cast(F.cast(a, np.float32), np.float64) * 2, [np.linspace(-1, 1, 5)],
                     atol=1e-4, rtol=1e-4, h=1e-3)


def test_dropout_statistics_scaling_and_gradient():
    p = 0.3
    x = Tensor(np.ones((200, 250), dtype=np.float32), requires_grad=True)
    y = F.dropout(x, p, training=True, rng=np.random.default_rng(0))
    out = y.numpy()
    assert y.dtype == np.float32
    kept = out != 0
    # every kept element is scaled by 1/(1-p), every dropped one is 0
    np.testing.assert_allclose(out[kept], 1 / (1 - p), rtol=1e-6)
    # the fraction dropped is p within 5 standard errors of a binomial proportion
    n = out.size
    assert abs((1 - kept.mean()) - p) < 5 * np.sqrt(p * (1 - p) / n)
    # the expected value is preserved
    assert abs(out.mean() - 1) < 5 * np.sqrt(p / (1 - p) / n)
    # gradient = mask / (1 - p)
    g = randn(*out.shape, seed=1, dtype=np.float32)
    y.backward(g)
    np.testing.assert_allclose(x.grad, g * kept / (1 - p), rtol=1e-6)


def test_dropout_eval_is_identity_and_p0_is_identity():
    x = Tensor(randn(3, 4).astype(np.float32), requires_grad=True)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0, training=True) is x
    with pytest.raises(ValueError, match="dropout"):
        F.dropout(x, 1.0)


def test_dropout_same_seed_same_mask_float64():
    x = Tensor(np.ones((4, 5)))
    a = F.dropout(x, 0.5, rng=np.random.default_rng(3))
    b = F.dropout(x, 0.5, rng=np.random.default_rng(3))
    assert a.dtype == np.float64 and np.array_equal(a.numpy(), b.numpy())
    # with a fixed mask, dropout is linear: its gradient check passes
    mask_rng = lambda: np.random.default_rng(5)  # noqa: E731
    assert gradcheck(lambda t: F.dropout(t, 0.4, rng=mask_rng()), [randn(4, 5)])


def _assert_matches_torch(fn, torch_fn, arrays, grad_seed, atol, grad_atol, rtol=1e-3):
    """fn's output and its gradients for every input equal torch_fn's (float32 arrays)."""
    ours = [Tensor(a, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    out, ref = fn(*ours), torch_fn(*theirs)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), atol=atol, rtol=rtol)
    g = randn(*out.shape, seed=grad_seed).astype(np.float32)
    out.backward(g)
    ref.backward(torch.tensor(g))
    for t, tt in zip(ours, theirs):
        np.testing.assert_allclose(t.grad, tt.grad.numpy(), atol=grad_atol, rtol=rtol)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_over_several_chunks_of_images_against_torch(monkeypatch, stride):
    """The fast CPU convolution works through a batch a few images at a time (its copies of
    the input, 0.2-0.4 MB an image here, in chunks of CONV_CHUNK_BYTES, made 1 MB here)."""
    pytest.importorskip("torch")
    from minisd.backends import fast_cpu

    monkeypatch.setattr(fast_cpu, "CONV_CHUNK_BYTES", 1 << 20)
    x, w, b = randn(7, 16, 32, 32), randn(16, 16, 3, 3, seed=1) * 0.1, randn(16, seed=2)
    _assert_matches_torch(lambda x, w, b: F.conv2d(x, w, b, stride=stride, padding=1),
                          lambda x, w, b: TF.conv2d(x, w, b, stride=stride, padding=1),
                          [a.astype(np.float32) for a in (x, w, b)], grad_seed=3, atol=1e-4, grad_atol=1e-3)


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_in_slices_of_the_batch_against_torch(monkeypatch, is_causal):
    """The fast CPU path computes attention a few (batch) rows at a time to bound the memory of the
    scores; shrink that bound so that a small batch is cut into several slices."""
    pytest.importorskip("torch")
    from minisd.backends import fast_cpu

    if get_backend().name != "numpy":
        pytest.skip("slicing is the fast CPU path's")
    B, H, Lq, Lk, d = 5, 2, 4, 6, 3
    monkeypatch.setattr(fast_cpu, "MAX_SCORES_IN_MEMORY", 2 * H * Lq * Lk)  # two batch rows a slice
    q, k, v = (randn(B, H, L, d, seed=i).astype(np.float32) for i, L in enumerate((Lq, Lk, Lk)))
    _assert_matches_torch(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal),
                          lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=is_causal),
                          [q, k, v], grad_seed=9, atol=1e-5, grad_atol=1e-4)


def test_attention_probabilities_match_the_op():
    _skip_float64_on_kernels("attention")
    q, k, v = _qkv(4, 6)()
    p = F.attention_probabilities(q, k, attn_mask=_bool_mask)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    assert (p[..., ~_bool_mask] == 0).all()
    out = F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), attn_mask=_bool_mask)
    np.testing.assert_allclose(out.numpy(), p @ v, rtol=1e-10, atol=1e-12)
    pc = F.attention_probabilities(q, k, is_causal=True)
    out = F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), is_causal=True)
    np.testing.assert_allclose(out.numpy(), pc @ v, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------
# Big activations and layer norms: fast_cpu._blockwise's blocks, shared by the cores
# ------------------------------------------------------------------------------------


def _erf64(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _phi64(x):
    """The standard normal CDF, in float64 from math.erf."""
    return 0.5 * (1 + _erf64(x / math.sqrt(2)))


def _big_cases():
    """(name, fn, inputs, float64 forward, float64 d/dx (elementwise ops) or None) at sizes above
    fast_cpu._THREADED; GELU's input is GEGLU's gate, the strided second half of a projection, and
    GEGLU's the whole projection."""
    gate = (randn(32, 64, 512, seed=11) * 2)[..., 256:]
    silu_x = randn(32, 64, 8, 16, seed=12) * 3
    ln_x, w, b = randn(64, 64, 64, seed=13) * 2 + 1, randn(64, seed=14), randn(64, seed=15)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    mu, var = ln_x.mean(-1, keepdims=True), ln_x.var(-1, keepdims=True)
    proj = randn(32, 64, 512, seed=16) * 2
    h, g = proj[..., :256], proj[..., 256:]
    return [
        ("geglu", F.geglu, [proj], h * g * _phi64(g), None),
        ("gelu", F.gelu, [gate], gate * _phi64(gate),
         _phi64(gate) + gate * np.exp(-gate * gate / 2) / math.sqrt(2 * math.pi)),
        ("silu", F.silu, [silu_x], silu_x * sig(silu_x), sig(silu_x) * (1 + silu_x * (1 - sig(silu_x)))),
        ("quick_gelu", F.quick_gelu, [silu_x], silu_x * sig(1.702 * silu_x),
         sig(1.702 * silu_x) * (1 + 1.702 * silu_x * (1 - sig(1.702 * silu_x)))),
        ("layer_norm", lambda x, w, b: F.layer_norm(x, 64, w, b), [ln_x, w, b], (ln_x - mu) / np.sqrt(var + 1e-5) * w + b,
         None),
    ]


def _layer_norm_grads64(x, w, g):
    """dx, dw, db of layer norm over the last axis, in float64 from the formulas."""
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    gw = g * w
    dx = (gw - gw.mean(-1, keepdims=True) - xhat * (gw * xhat).mean(-1, keepdims=True)) \
        / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    return dx, (g * xhat).sum((0, 1)), g.sum((0, 1))


def _run(fn, arrays, dtype, g):
    tensors = [Tensor(a.astype(dtype), requires_grad=True) for a in arrays]
    out = fn(*tensors)
    out.backward(g.astype(dtype))
    return out.numpy(), [t.grad for t in tensors]


@pytest.mark.parametrize("case", range(5), ids=["geglu", "gelu", "silu", "quick_gelu", "layer_norm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_big_activations_and_layer_norm_in_blocks_on_all_cores(monkeypatch, case, dtype):
    """Above fast_cpu._THREADED values the NumPy path works on blocks of rows spread over the cores:
    forward and gradients against float64 formulas (math.erf for GELU), and equal to the
    same op run as one block on one thread, with blocks small enough for several a core."""
    if get_backend().name != "numpy":
        pytest.skip("blocks are the numpy backend's")
    from minisd.backends import fast_cpu

    name, fn, arrays, want, dwant = _big_cases()[case]
    assert arrays[0].size >= fast_cpu._THREADED
    g = randn(*want.shape, seed=21)
    monkeypatch.setattr(fast_cpu, "_BLOCK", 4096)
    out, grads = _run(fn, arrays, dtype, g)
    assert out.dtype == dtype
    if name == "layer_norm":
        dwants = _layer_norm_grads64(arrays[0], arrays[1], g)
    elif name == "geglu":
        h, gate = np.split(arrays[0], 2, axis=-1)
        pdf = np.exp(-gate * gate / 2) / math.sqrt(2 * math.pi)
        dwants = [np.concatenate([g * gate * _phi64(gate), g * h * (_phi64(gate) + gate * pdf)], axis=-1)]
    else:
        dwants = [g * dwant]
    # float32: rounding, and Phi's fit (float64 computes Phi exactly); layer norm: sums of 64 terms
    tol = dict(atol=2e-6, rtol=2e-5) if dtype == np.float32 else dict(atol=1e-10, rtol=1e-10)
    np.testing.assert_allclose(out, want, **tol)
    for got, ref in zip(grads, dwants):
        np.testing.assert_allclose(got, ref, atol=tol["atol"] * (100 if got.ndim == 1 else 1), rtol=tol["rtol"])

    monkeypatch.setattr(fast_cpu, "_BLOCK", 1 << 40)
    monkeypatch.setattr(fast_cpu, "_THREADED", 1 << 40)  # one block, one thread
    out1, grads1 = _run(fn, arrays, dtype, g)
    np.testing.assert_allclose(out, out1, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=0)
    for got, one in zip(grads, grads1):
        np.testing.assert_allclose(got, one, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-7)


# ------------------------------------------------------------------------------------
# Property tests: random broadcastable shapes, random axes, random permutations
# ------------------------------------------------------------------------------------

try:  # hypothesis comes with the test extra; without it only these tests are skipped
    from hypothesis import given, settings, strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError:
    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_property_tests_need_hypothesis():
        pass
else:
    _small = settings(max_examples=25, deadline=None, derandomize=True)

    @_small
    @given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3),
           op=st.sampled_from(["add", "sub", "mul", "div"]), seed=st.integers(0, 2 ** 16))
    def test_property_broadcast_arithmetic_gradcheck(shapes, op, seed):
        a = randn(*shapes.input_shapes[0], seed=seed)
        b = away_from_zero(*shapes.input_shapes[1], seed=seed + 1, margin=0.5)
        fn = getattr(F, op)
        out = fn(Tensor(a), Tensor(b))
        assert out.shape == shapes.result_shape
        assert gradcheck(fn, [a, b])


    @_small
    @given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=3), data=st.data(),
           reduce=st.sampled_from(["sum", "mean", "var", "amax", "amin"]), keepdims=st.booleans())
    def test_property_reductions_over_random_axes(shape, data, reduce, keepdims):
        axes = data.draw(st.lists(st.integers(-len(shape), len(shape) - 1), min_size=1, max_size=len(shape),
                                  unique_by=lambda ax: ax % len(shape)))
        axis = tuple(axes) if len(axes) > 1 else axes[0]
        x = distinct(*shape, seed=len(axes))
        ours = (lambda t: F.var(t, axis, keepdims, correction=0)) if reduce == "var" else \
            (lambda t: getattr(F, reduce)(t, axis, keepdims))  # np.var is the biased variance
        want = getattr(np, {"amax": "max", "amin": "min"}.get(reduce, reduce))(x, axis=axis, keepdims=keepdims)
        np.testing.assert_allclose(ours(Tensor(x)).numpy(), want, rtol=1e-12, atol=1e-12)
        assert gradcheck(ours, [x])


    @_small
    @given(shape=hnp.array_shapes(min_dims=2, max_dims=4, max_side=4), data=st.data())
    def test_property_permute_then_reshape_round_trip(shape, data):
        perm = data.draw(st.permutations(range(len(shape))))
        x = randn(*shape)
        y = Tensor(x).permute(*perm)
        np.testing.assert_array_equal(y.numpy(), x.transpose(perm))
        assert gradcheck(lambda t: t.permute(*perm).reshape(-1)[::2] * 1.5, [x])


@pytest.mark.parametrize("op", ["silu", "quick_gelu", "gelu", "geglu", "layer_norm", "layer_norm_plain"])
def test_whole_array_activations_match_the_blocks(op):
    """The whole-array formulas (naive.py's, which the emulated and cupy backends run too) and
    the fast CPU path's blocks, forward and every gradient, in float64 (where both compute Phi
    exactly) and in float32 (the fit, to its 1.5e-7, and rounding), above the threading size."""
    from minisd.backends import fast_cpu, naive

    x = randn(32, 64, 256, seed=3) * 2
    w, b = randn(256, seed=4), randn(256, seed=5)
    g = randn(32, 64, 128 if op == "geglu" else 256, seed=6)
    for dtype, tol in ((np.float64, dict(rtol=1e-12, atol=1e-13)), (np.float32, dict(rtol=2e-5, atol=2e-6))):
        got = []
        for ops in (naive, fast_cpu):
            a, gg = x.astype(dtype), g.astype(dtype)
            if op in ("silu", "quick_gelu"):
                beta = 1.0 if op == "silu" else 1.702
                y, s = ops.silu_forward(a, beta)
                got.append([y, ops.silu_backward(gg, y, s, beta)])
            elif op == "gelu":
                y, slope = ops.gelu_forward(a, keep_slope=True)
                got.append([y, gg * slope, ops.gelu_forward(a, keep_slope=False)[0]])
            elif op == "geglu":
                y, gelu_g, slope = ops.geglu_forward(a, keep_slope=True)
                got.append([y, ops.geglu_backward(gg, a[..., :128], gelu_g, slope)])
            else:
                wb = (w.astype(dtype), b.astype(dtype)) if op == "layer_norm" else (None, None)
                y, xhat, rstd = ops.layer_norm_forward(a, 1, *wb, 1e-5)
                assert rstd.shape == (32, 64)
                got.append([y, *(t for t in ops.layer_norm_backward(gg, xhat, rstd, wb[0], True, True, True)
                                 if t is not None)])
        for whole, blocks in zip(*got):
            assert whole.dtype == blocks.dtype == dtype and whole.shape == blocks.shape
            np.testing.assert_allclose(blocks, whole, **dict(tol, atol=tol["atol"] * (1e3 if whole.ndim == 1 else 1)))


def test_normal_cdf_fit_accuracy_tails_and_signs():
    """Phi as GELU and GEGLU compute it on NumPy arrays, by the fast CPU path's blocks and by
    naive.normal_cdf, against math.erfc: float32 by the A&S 7.1.26 fit, within its bound of
    7.5e-8 plus rounding and the left tail to 5% relative (naive: exact to float32's rounding);
    float64 exact (to rounding), the tail too; all with Phi(-0.0) = Phi(0.0) and the infinities."""
    from minisd.backends import fast_cpu, naive

    def blocks(a):
        cdf = np.empty_like(a)
        fast_cpu._phi_block(a, cdf, np.empty_like(a))
        return cdf

    x64 = np.concatenate([np.linspace(-13, 8, 4201), [0.0, -0.0, 1e-30, -1e-30, np.inf, -np.inf]])
    for phi, f32_atol, f32_tail in ((blocks, 4e-7, 0.05), (naive.normal_cdf, 6e-8, 1e-6)):
        for dtype, atol, tail_rtol in ((np.float64, 1e-15, 1e-13), (np.float32, f32_atol, f32_tail)):
            x = x64.astype(dtype)
            want = np.array([0.5 * math.erfc(-float(v) / math.sqrt(2)) for v in x])
            got = phi(x)
            assert got.dtype == dtype
            np.testing.assert_allclose(got, want, atol=atol, rtol=0)
            tail = x < -3  # Phi below 1.4e-3: computed directly, not as 1 minus something
            np.testing.assert_allclose(got[tail], want[tail], rtol=tail_rtol, atol=0)
            assert got[-6] == got[-5] and abs(got[-6] - 0.5) < atol  # Phi(-0.0) = Phi(0.0)
            assert (got[-2], got[-1]) == (1, 0)


def test_resize_nearest_picks_the_pixels_torch_picks():
    """Every input size 1..40 to every output size 1..90, one axis at a time: ATen rounds
    H / Ho to float32, so an exact floor(i * H / Ho) would differ where that is a whole number."""
    if torch is None:
        pytest.skip("needs torch")
    for n_in in range(1, 41):
        for n_out in range(1, 91):
            ref = TF.interpolate(torch.arange(n_in, dtype=torch.float32).reshape(1, 1, n_in), size=n_out)
            np.testing.assert_array_equal(F.ResizeNearest.nearest(n_in, n_out, np), ref.numpy().ravel())
