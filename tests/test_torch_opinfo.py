"""minisd on PyTorch's own test inputs: the OpInfo sample inputs of torch's op_db.

PyTorch describes each of its operators by an OpInfo, whose ``sample_inputs`` are the
inputs torch's own test suite runs: ordinary shapes and the edge cases (0-d tensors,
empty axes, size-1 axes, broadcasting, non-contiguous layouts, negative dims, ...). For
every op minisd has, each float64 sample goes through both libraries, and either

- minisd matches: the same output (shape, dtype, values) and, for a random upstream
  gradient, the same gradient for every input torch differentiates; or
- minisd refuses: it raises a one-line error that names the feature it lacks (one of the
  features listed for that op below), never a raw NumPy or Python error from inside.

Anything else (a wrong number, a crash) fails the test. The counts per op (samples tried,
matched, refused) are checked against the table of features minisd refuses, and
``python tests/test_torch_opinfo.py`` prints them.

Skipped when torch (or the ``expecttest`` module its test helpers need) is not installed.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from minisd import Tensor, functional as F

torch = pytest.importorskip("torch")
cmi = pytest.importorskip("torch.testing._internal.common_methods_invocations",
                          reason="torch's OpInfo database (needs the expecttest module)")

from test_edge_shapes import (  # noqa: E402, F401  (_torch_on_one_thread: the fixture, used here too)
    _torch_on_one_thread, assert_same_gradients, assert_same_results, why_not_a_clear_refusal)


# ------------------------------------------------------------------------------------
# How each torch op is called in minisd, and what minisd refuses of it
# ------------------------------------------------------------------------------------


def _reduction(name):
    """torch's (dim=, keepdim=) as minisd's (axis=, keepdims=)."""
    def call(x, *args, dim=None, keepdim=False, **kw):
        return getattr(F, name)(x, *args, axis=dim, keepdims=keepdim, **kw)
    return call


@dataclass
class Op:
    call: object  # minisd's op (a name in minisd.functional, or a function): takes what torch takes
    refuses: str = ""  # a regex: the features minisd says it lacks, which its refusals must name


def _var(x, *args, dim=None, keepdim=False, **kw):
    if args and isinstance(args[0], bool):  # torch.var(x, unbiased)
        return F.var(x, unbiased=args[0], keepdims=keepdim, **kw)
    return F.var(x, *args, axis=dim, keepdims=keepdim, **kw)


OPS = {
    "add": Op("add", "alpha"),
    "sub": Op("sub", "alpha"),
    "mul": Op("mul"),
    "div.no_rounding_mode": Op("div"),
    "true_divide": Op("div"),
    "pow": Op("pow"),
    "neg": Op("neg"),
    "abs": Op("abs"),
    "exp": Op("exp"),
    "log": Op("log"),
    "sqrt": Op("sqrt"),
    "sin": Op("sin"),
    "cos": Op("cos"),
    "tanh": Op("tanh"),
    "sigmoid": Op("sigmoid"),
    "clamp": Op("clamp"),
    "where": Op(lambda x, condition, other: F.where(condition, x, other)),
    "matmul": Op("matmul"),
    "sum": Op(_reduction("sum")),
    "mean": Op(_reduction("mean")),
    "amax": Op(_reduction("amax")),
    "amin": Op(_reduction("amin")),
    "max.reduction_with_dim": Op("max"),
    "max.reduction_no_dim": Op("max"),
    "min.reduction_with_dim": Op("min"),
    "min.reduction_no_dim": Op("min"),
    "var": Op(_var),
    "var.unbiased": Op(_var),
    "softmax": Op("softmax"),
    "log_softmax": Op("log_softmax"),
    "reshape": Op("reshape"),
    "view": Op("reshape"),
    "permute": Op("permute"),
    "transpose": Op("transpose"),
    "flatten": Op(lambda x, start_dim=0, end_dim=-1: F.flatten(x, start_dim, end_dim)),
    "squeeze": Op("squeeze"),
    "squeeze.multiple": Op("squeeze"),
    "unsqueeze": Op("unsqueeze"),
    "expand": Op("expand"),
    "cat": Op(lambda tensors, *args, dim=0: F.cat(tensors, *args) if args else F.cat(tensors, axis=dim),
              "cat: axis"),  # torch joins a (0,) tensor to any (legacy); minisd says the axis is out of range
    "stack": Op("stack"),
    "chunk": Op("chunk"),
    "__getitem__": Op("getitem"),
    "nn.functional.pad.constant": Op("pad"),
    "nn.functional.linear": Op("linear"),
    "nn.functional.relu": Op("relu"),
    "nn.functional.silu": Op("silu"),
    "nn.functional.gelu": Op("gelu"),
    "nn.functional.conv2d": Op("conv2d", "groups|dilation"),
    "nn.functional.group_norm": Op("group_norm"),
    "nn.functional.layer_norm": Op("layer_norm"),
    "nn.functional.interpolate.nearest": Op("interpolate"),
    "nn.functional.embedding": Op(lambda weight, ids: F.embedding(ids, weight)),
    "nn.functional.mse_loss": Op("mse_loss"),
    "nn.functional.cross_entropy": Op("cross_entropy"),
    "nn.functional.scaled_dot_product_attention": Op("scaled_dot_product_attention",
                                                     "dropout_p|q, k and v of different ranks"),
}


# ------------------------------------------------------------------------------------
# Running one sample through both
# ------------------------------------------------------------------------------------


def _to_minisd(obj, pairs: dict):
    """torch tensors as minisd Tensors (the same memory, strides and all); ``pairs`` maps each
    tensor torch differentiates (by id: a sample may pass one tensor twice) to
    (torch tensor, minisd Tensor)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in pairs:
            pairs[id(obj)] = (obj, Tensor(obj.detach().numpy(), requires_grad=obj.requires_grad))
        return pairs[id(obj)][1]
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to_minisd(o, pairs) for o in obj)
    return obj


def _run_sample(op: Op, opinfo, sample, rng) -> str:
    """'matched' or 'refused'; anything else raises AssertionError with what differed."""
    want = opinfo(sample.input, *sample.args, **sample.kwargs)
    pairs: dict = {}
    x = _to_minisd(sample.input, pairs)
    args = _to_minisd(sample.args, pairs)
    kwargs = {k: _to_minisd(v, pairs) for k, v in sample.kwargs.items()}
    try:
        call = getattr(F, op.call) if isinstance(op.call, str) else op.call
        got = call(x, *args, **kwargs)
    except Exception as exc:  # noqa: BLE001  (what it raised is what is checked)
        why = why_not_a_clear_refusal(exc)
        assert why is None, f"{why}: {type(exc).__name__}: {exc}"
        assert op.refuses and re.search(op.refuses, str(exc)), \
            f"refused with a feature not in this op's list ({op.refuses!r}): {exc}"
        return "refused"
    differentiated = assert_same_results(got, want, rng)
    assert_same_gradients(differentiated, [(tt, t) for tt, t in pairs.values() if tt.requires_grad])
    return "matched"


def _describe(sample) -> str:
    def d(o):
        if isinstance(o, torch.Tensor):
            return f"T{tuple(o.shape)}" + ("" if o.dtype == torch.float64 else f"[{o.dtype}]")
        if isinstance(o, (list, tuple)):
            return "(" + ", ".join(d(i) for i in o) + ")"
        return repr(o)
    return f"input {d(sample.input)}, args {d(sample.args)}, kwargs {({k: d(v) for k, v in sample.kwargs.items()})}"


def _op_db():
    return {op.name + (f".{op.variant_test_name}" if op.variant_test_name else ""): op for op in cmi.op_db}


def run_op(name: str) -> dict:
    """Every float64 sample of torch's op ``name`` through minisd: the counts, and the failures."""
    opinfo = _op_db()[name]
    rng = np.random.default_rng(0)
    counts = {"tried": 0, "matched": 0, "refused": 0, "failures": []}
    for sample in opinfo.sample_inputs("cpu", torch.float64, requires_grad=opinfo.supports_autograd):
        counts["tried"] += 1
        try:
            counts[_run_sample(OPS[name], opinfo, sample, rng)] += 1
        except Exception as exc:  # noqa: BLE001  (a wrong number, or a crash in minisd's backward)
            what = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            kind = "" if isinstance(exc, AssertionError) else f"{type(exc).__name__}: "
            counts["failures"].append(f"{_describe(sample)}: {kind}{what}")
    return counts


def test_every_mapped_op_is_in_torchs_database():
    assert not set(OPS) - set(_op_db())


@pytest.mark.parametrize("name", sorted(OPS))
def test_minisd_matches_or_clearly_refuses_torchs_samples(name):
    counts = run_op(name)
    assert counts["tried"] > 0
    assert not counts["failures"], "\n".join(counts["failures"])
    assert counts["matched"] + counts["refused"] == counts["tried"]
    # an op minisd has matches torch on at least one of torch's samples; one that lists no
    # refused feature matches on all of them
    assert counts["matched"] >= 1
    if not OPS[name].refuses:
        assert counts["refused"] == 0


if __name__ == "__main__":  # the figures: samples tried / matched / refused per op
    total = dict.fromkeys(("tried", "matched", "refused", "failed"), 0)
    for name in sorted(OPS if len(sys.argv) < 2 else sys.argv[1:]):
        c = run_op(name)
        c["failed"] = len(c.pop("failures"))
        print(f"{name:45s} tried {c['tried']:3d}  matched {c['matched']:3d}  refused {c['refused']:3d}"
              + (f"  FAILED {c['failed']}" if c["failed"] else ""))
        for k in total:
            total[k] += c[k]
    print(f"{'all':45s} tried {total['tried']:3d}  matched {total['matched']:3d}  refused {total['refused']:3d}"
          f"  failed {total['failed']}")
