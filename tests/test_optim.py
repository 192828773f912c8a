"""Optimisers against torch.optim on the same parameters and gradients; clipping, EMA,
the learning-rate schedule, resuming from a state dict; and two small models that
must overfit one batch."""

import math
import time

import numpy as np
import pytest

import minisd
from minisd import functional as F, nn
from minisd.optim import EMA, SGD, AdamW, clip_grad_norm, warmup_cosine

SHAPES = [(3, 4), (5,), (2, 1, 3)]


def make_params(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [nn.Parameter(rng.standard_normal(s), dtype=dtype) for s in SHAPES]


def gradients(step, dtype=np.float32):
    """A fixed, different gradient for each parameter at each step."""
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def run_ours(opt_cls, steps, **kw):
    params = make_params()
    opt = opt_cls(params, **kw)
    for i in range(steps):
        opt.zero_grad()
        for p, g in zip(params, gradients(i)):
            p.grad = g.copy()
        opt.step()
    return params


def run_torch(torch, opt_cls, steps, **kw):
    params = [torch.tensor(p.numpy(), requires_grad=True) for p in make_params()]
    opt = opt_cls(params, **kw)
    for i in range(steps):
        opt.zero_grad()
        for p, g in zip(params, gradients(i)):
            p.grad = torch.tensor(g)
        opt.step()
    return params


@pytest.mark.parametrize("kw", [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, weight_decay=0.1),
    dict(lr=0.02, momentum=0.8, weight_decay=0.01),
])
def test_sgd_equals_torch(kw):
    torch = pytest.importorskip("torch")
    ours = run_ours(SGD, 6, **kw)
    theirs = run_torch(torch, torch.optim.SGD, 6, **kw)
    for o, t in zip(ours, theirs):
        assert o.dtype == np.float32
        np.testing.assert_allclose(o.numpy(), t.detach().numpy(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(lr=1e-2),
    dict(lr=1e-3, weight_decay=0.0),
    dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.5),
])
def test_adamw_equals_torch(kw):
    torch = pytest.importorskip("torch")
    ours = run_ours(AdamW, 8, **kw)
    theirs = run_torch(torch, torch.optim.AdamW, 8, **kw)
    for o, t in zip(ours, theirs):
        assert o.dtype == np.float32
        np.testing.assert_allclose(o.numpy(), t.detach().numpy(), atol=1e-6, rtol=1e-5)


def test_sgd_momentum_survives_gradients_zeroed_in_place():
    """Zeroing the gradient arrays in place (instead of setting them to None) between steps
    must not reach into the momentum buffer."""
    torch = pytest.importorskip("torch")
    ours = make_params()
    theirs = [torch.tensor(p.numpy(), requires_grad=True) for p in ours]
    opt, topt = SGD(ours, lr=0.1, momentum=0.9), torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    for p, t, g in zip(ours, theirs, gradients(0)):
        p.grad, t.grad = g.copy(), torch.tensor(g)
    opt.step(), topt.step()
    for p, t, g in zip(ours, theirs, gradients(1)):
        p.grad *= 0  # in place, as zero_grad(set_to_none=False) does
        p.grad += g
        t.grad.zero_()
        t.grad += torch.tensor(g)
    opt.step(), topt.step()
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.numpy(), t.detach().numpy(), atol=1e-6, rtol=1e-5)


def test_adamw_first_step_by_hand():
    """At t = 1 the bias corrections make the step lr * g / (|g| + eps): each weight moves by about lr."""
    p = nn.Parameter(np.array([1.0, -2.0, 3.0]), dtype=np.float64)
    opt = AdamW([p], lr=0.1, weight_decay=0.5, eps=1e-8)
    g = np.array([0.5, -4.0, 1e-3])
    p.grad = g.copy()
    opt.step()
    decayed = np.array([1.0, -2.0, 3.0]) * (1 - 0.1 * 0.5)
    np.testing.assert_allclose(p.numpy(), decayed - 0.1 * g / (np.abs(g) + 1e-8), rtol=1e-12)


def test_optimisers_skip_parameters_without_gradient_and_reject_bad_arguments():
    params = make_params()
    before = [p.numpy().copy() for p in params]
    opt = AdamW(params, lr=0.1)
    params[0].grad = np.ones(SHAPES[0], np.float32)
    opt.step()
    assert not np.array_equal(params[0].numpy(), before[0])
    np.testing.assert_array_equal(params[1].numpy(), before[1])  # no grad: not even decayed
    with pytest.raises(ValueError, match="no parameters"):
        SGD([], lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        AdamW(make_params(), lr=-1.0)


@pytest.mark.parametrize("opt_cls, kw", [(SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
                                         (AdamW, dict(lr=1e-2, weight_decay=0.1))])
def test_optimiser_state_dict_resumes_identically(opt_cls, kw):
    # A: 6 uninterrupted steps
    a = run_ours(opt_cls, 6, **kw)
    # B: 3 steps, then a copy of everything; C resumes from the copy while B also carries on
    b = make_params()
    opt_b = opt_cls(b, **kw)

    def step(params, opt, i):
        opt.zero_grad()
        for p, g in zip(params, gradients(i)):
            p.grad = g.copy()
        opt.step()

    for i in range(3):
        step(b, opt_b, i)
    state = opt_b.state_dict()
    c = [nn.Parameter(p.numpy().copy()) for p in b]
    opt_c = opt_cls(make_params(seed=9), lr=123.0)  # wrong hyper-parameters, fixed by loading
    opt_c.params = c
    opt_c.load_state_dict(state)
    for i in range(3, 6):
        step(b, opt_b, i)  # B and C must not share buffers
        step(c, opt_c, i)
    for pa, pb, pc in zip(a, b, c):
        np.testing.assert_array_equal(pb.numpy(), pa.numpy())
        np.testing.assert_array_equal(pc.numpy(), pa.numpy())


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
def test_clip_grad_norm_equals_torch(max_norm):
    torch = pytest.importorskip("torch")
    ours = make_params()
    theirs = [torch.tensor(p.numpy(), requires_grad=True) for p in ours]
    for o, t, g in zip(ours, theirs, gradients(0)):
        o.grad = g.copy()
        t.grad = torch.tensor(g)
    ours.append(nn.Parameter(np.ones(2)))  # no gradient: ignored
    total = clip_grad_norm(ours, max_norm)
    ref = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert isinstance(total, float)
    assert total == pytest.approx(float(ref), rel=1e-6)
    for o, t in zip(ours, theirs):
        assert o.grad.dtype == np.float32
        np.testing.assert_allclose(o.grad, t.grad.numpy(), atol=1e-7, rtol=1e-6)
    assert clip_grad_norm([nn.Parameter(np.ones(2))], 1.0) == 0.0


def test_clip_grad_norm_after_backward_scales_shared_gradients_once():
    """a + b and x.sum() hand the engine's gradient arrays straight to the leaves; clipping in place must work."""
    a, b = nn.Parameter(np.ones(4)), nn.Parameter(np.ones(4))
    (a + b).sum().backward()
    w = nn.Parameter(np.ones((2, 2)))
    w.sum().backward()
    total = clip_grad_norm([a, b, w], 1.0)
    assert total == pytest.approx(math.sqrt(12), rel=1e-6)
    for p in (a, b, w):
        np.testing.assert_allclose(p.grad, 1 / math.sqrt(12), rtol=1e-5)


def test_ema_math_copy_and_state():
    p = nn.Parameter(np.array([1.0, 2.0]), dtype=np.float64)
    ema = EMA([p], decay=0.9)
    expected = p.numpy().copy()
    for value in (3.0, -1.0, 5.0):
        p.data[...] = value
        ema.update()
        expected = 0.9 * expected + 0.1 * value
    np.testing.assert_allclose(ema.shadow[0], expected, rtol=1e-12)
    np.testing.assert_array_equal(p.numpy(), [5.0, 5.0])  # the model itself is untouched
    q = nn.Parameter(np.zeros(2), dtype=np.float64)
    ema.copy_to([q])
    np.testing.assert_allclose(q.numpy(), expected, rtol=1e-12)
    # state round trip, with a copy: updating one does not change the other
    other = EMA([p], decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9
    ema.update()
    np.testing.assert_allclose(other.shadow[0], expected, rtol=1e-12)
    with pytest.raises(ValueError, match="decay"):
        EMA([p], decay=1.0)


def test_ema_keeps_float32():
    p = nn.Parameter(np.ones(3))
    ema = EMA([p], decay=0.99)
    p.data += 1
    ema.update()
    assert ema.shadow[0].dtype == np.float32
    np.testing.assert_allclose(ema.shadow[0], 1.01, rtol=1e-6)


def test_warmup_cosine_values():
    base, lo = 1e-3, 1e-5
    # warmup: linear, base * (s + 1) / warmup, so that step 0 already learns
    assert warmup_cosine(0, 100, 10, base) == pytest.approx(base / 10)
    assert warmup_cosine(4, 100, 10, base) == pytest.approx(base / 2)
    assert warmup_cosine(9, 100, 10, base) == pytest.approx(base)  # last warmup step: the peak
    assert warmup_cosine(10, 100, 10, base) == pytest.approx(base)  # the cosine starts at the peak
    assert warmup_cosine(0, 100, 1, base) == pytest.approx(base)  # a one-step warmup wastes no step
    # middle of the cosine: halfway between base and min
    assert warmup_cosine(55, 100, 10, base, lo) == pytest.approx((base + lo) / 2)
    assert warmup_cosine(32.5, 100, 10, base) == pytest.approx(base * (1 + math.cos(math.pi / 4)) / 2)
    # end, and beyond it: min_lr
    assert warmup_cosine(100, 100, 10, base, lo) == pytest.approx(lo)
    assert warmup_cosine(150, 100, 10, base, lo) == pytest.approx(lo)
    assert warmup_cosine(0, 100, 0, base) == pytest.approx(base)  # no warmup
    lrs = [warmup_cosine(s, 100, 10, base) for s in range(101)]
    assert all(x <= y for x, y in zip(lrs[:11], lrs[1:11]))  # rises during warmup
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))  # then falls


def test_warmup_cosine_equals_diffusers_schedule_one_step_ahead():
    torch = pytest.importorskip("torch")
    optimization = pytest.importorskip("diffusers.optimization")
    base, total, warmup = 2e-3, 40, 7
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = optimization.get_cosine_schedule_with_warmup(opt, warmup, total)
    theirs = []
    for _ in range(total + 1):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for step in range(total + 1):
        want = theirs[step + 1] if step < warmup else theirs[step]  # their warmup is one step behind
        assert warmup_cosine(step, total, warmup, base) == pytest.approx(want, abs=1e-12), step


# ------------------------------------------------------------------------------------
# Overfitting one batch: the whole engine works end to end
# ------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self, classes=4):
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.norm2 = nn.GroupNorm(4, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        h = F.silu(self.norm1(self.conv1(x)))
        h = F.silu(self.norm2(self.conv2(h)))
        return self.head(h.mean(axis=(2, 3)))


def test_small_conv_net_overfits_a_batch():
    minisd.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    y = np.arange(8) % 4
    net = ConvNet()
    opt = AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
    start = time.perf_counter()
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert loss.dtype == np.float32
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    assert time.perf_counter() - start < 30


class TinyTransformer(nn.Module):
    """One pre-norm block: causal self-attention and a GELU MLP, next-token prediction."""

    def __init__(self, vocab=11, dim=16, heads=2, length=8):
        self.heads = heads
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(length, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.ln_f = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids):
        B, L = ids.shape
        h = self.tok(ids) + self.pos(np.arange(L))
        q, k, v = self.qkv(self.ln1(h)).chunk(3, axis=-1)
        split = lambda t: t.reshape(B, L, self.heads, -1).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(B, L, -1))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.out(self.ln_f(h))


def test_small_transformer_overfits_next_token_prediction():
    minisd.manual_seed(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, size=(4, 9))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    net = TinyTransformer()
    opt = AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
    start = time.perf_counter()
    losses = []
    for _ in range(200):
        opt.zero_grad()
        logits = net(inputs)
        loss = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert logits.dtype == np.float32
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    assert time.perf_counter() - start < 30
    # causality: changing the last input token changes no earlier prediction
    changed = inputs.copy()
    changed[:, -1] = (changed[:, -1] + 1) % 11
    with minisd.no_grad():
        a, b = net(inputs).numpy(), net(changed).numpy()
    np.testing.assert_allclose(a[:, :-1], b[:, :-1], atol=1e-6)
    assert not np.allclose(a[:, -1], b[:, -1])
