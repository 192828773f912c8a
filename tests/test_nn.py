"""nn: parameter names, state dicts, train/eval, PyTorch's default inits, freezing, dtype casts,
and the layers against their PyTorch counterparts with the same weights (loaded by name)."""

import math

import numpy as np
import pytest

import minisd
from minisd import Tensor, functional as F, nn
from minisd.gradcheck import gradcheck


class Block(nn.Module):
    def __init__(self):
        self.norm = nn.GroupNorm(2, 4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5, seed=0)

    def forward(self, x):
        return self.drop(self.conv(F.silu(self.norm(x))))


class Net(nn.Module):
    def __init__(self):
        self.conv_in = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Sequential(nn.Linear(4, 5), nn.SiLU(), nn.Linear(5, 2))
        self.scale = nn.Parameter(np.ones(1))

    def forward(self, x):
        h = self.conv_in(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h.mean(axis=(2, 3))) * self.scale


EXPECTED_NAMES = [
    "conv_in.weight",
    "blocks.0.norm.weight", "blocks.0.norm.bias", "blocks.0.conv.weight", "blocks.0.conv.bias",
    "blocks.1.norm.weight", "blocks.1.norm.bias", "blocks.1.conv.weight", "blocks.1.conv.bias",
    "head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias",
    "scale",
]


def test_named_parameters_are_dotted_with_list_indices():
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    assert names == EXPECTED_NAMES  # in definition order; no entry for the missing conv_in.bias
    assert len(net.parameters()) == len(EXPECTED_NAMES)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in net.parameters())
    assert net.num_parameters() == sum(p.size for p in net.parameters())
    assert net.num_parameters() == 3 * 4 * 9 + 2 * (4 + 4 + 4 * 4 * 9 + 4) + (4 * 5 + 5) + (5 * 2 + 2) + 1
    modules = dict(net.named_modules())
    assert modules[""] is net and modules["blocks.1.conv"] is net.blocks[1].conv
    assert isinstance(modules["head.1"], nn.SiLU)
    assert len(net.blocks) == 2 and list(net.blocks)[0] is net.blocks[0]


def test_parameters_default_to_float32():
    net = Net()
    assert all(p.dtype == np.float32 for p in net.parameters())
    out = net(np.ones((1, 3, 5, 5), np.float32))
    assert out.dtype == np.float32 and out.shape == (1, 2)


def test_state_dict_round_trip():
    minisd.manual_seed(1)
    a = Net()
    minisd.manual_seed(2)
    b = Net()
    state = a.state_dict()
    assert list(state) == EXPECTED_NAMES
    assert all(isinstance(v, np.ndarray) for v in state.values())
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    a.eval(), b.eval()
    assert not np.allclose(a(x).numpy(), b(x).numpy())
    b.load_state_dict(state)
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())
    for (n, p), (m, q) in zip(a.named_parameters(), b.named_parameters()):
        assert n == m and np.array_equal(p.numpy(), q.numpy()) and q.dtype == p.dtype


def test_loaded_weights_are_copies():
    """Training the model that loaded a state dict must not change the dict or the model it came from."""
    a, b = Net(), Net()
    state = a.state_dict()
    b.load_state_dict(state)
    before = {k: v.copy() for k, v in state.items()}
    for p in b.parameters():
        p.data += 1.0
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    np.testing.assert_array_equal(state["scale"], before["scale"])


def test_load_state_dict_keeps_the_parameter_dtype():
    net = nn.Linear(3, 2)
    net.load_state_dict({"weight": np.ones((2, 3)), "bias": np.zeros(2)})  # float64 arrays
    assert net.weight.dtype == np.float32 and net.bias.dtype == np.float32


def test_load_state_dict_names_missing_unexpected_and_misshaped_keys():
    net = Net()
    state = net.state_dict()
    del state["head.0.bias"]
    state["head.5.weight"] = np.zeros(3)
    state["blocks.1.conv.weight"] = np.zeros((4, 4, 1, 1))
    with pytest.raises(KeyError) as info:
        net.load_state_dict(state)
    msg = str(info.value)
    assert "missing keys: head.0.bias" in msg
    assert "unexpected keys: head.5.weight" in msg
    assert "mis-shaped keys: blocks.1.conv.weight" in msg and "(4, 4, 1, 1)" in msg and "(4, 4, 3, 3)" in msg
    assert "Net.load_state_dict" in msg
    # nothing was loaded by the failed call
    before = net.blocks[0].conv.weight.numpy().copy()
    good = Net().state_dict()
    good["blocks.1.conv.weight"] = np.zeros((4, 4, 1, 1))
    with pytest.raises(KeyError):
        net.load_state_dict(good)
    np.testing.assert_array_equal(net.blocks[0].conv.weight.numpy(), before)


def test_load_state_dict_not_strict():
    net = Net()
    state = Net().state_dict()
    del state["scale"]
    state["extra"] = np.zeros(1)
    net.load_state_dict(state, strict=False)  # missing and unexpected keys are tolerated
    np.testing.assert_array_equal(net.head[0].weight.numpy(), state["head.0.weight"])
    state["head.0.weight"] = np.zeros((1, 1))
    with pytest.raises(KeyError, match="mis-shaped"):  # a wrong shape is an error either way
        net.load_state_dict(state, strict=False)


def test_train_and_eval_propagate_to_every_module():
    net = Net()
    assert all(m.training for _, m in net.named_modules())
    assert net.eval() is net
    assert not any(m.training for _, m in net.named_modules())
    x = np.ones((1, 4, 3, 3), np.float32)
    blk = net.blocks[0]
    # Dropout in eval mode is the identity: the block gives the same output twice
    np.testing.assert_array_equal(blk(x).numpy(), blk(x).numpy())
    net.train()
    assert all(m.training for _, m in net.named_modules())
    assert not np.array_equal(blk(x).numpy(), blk(x).numpy())


def test_dropout_module():
    d = nn.Dropout(0.25, seed=0)
    x = Tensor(np.ones((50, 40), np.float32))
    y = d(x).numpy()
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.05
    d.eval()
    assert d(x) is x


# ---- PyTorch's default initialisation


def _check_uniform(values, bound):
    """Within [-bound, bound], and spread as U(-bound, bound): mean 0, variance bound^2/3."""
    v = np.asarray(values, np.float64).ravel()
    assert np.abs(v).max() <= bound * (1 + 1e-6)
    assert np.abs(v).max() > 0.9 * bound  # fills the interval (n is large enough for this)
    n = v.size
    sd = bound / math.sqrt(3)
    assert abs(v.mean()) < 5 * sd / math.sqrt(n)
    assert abs(v.var() / sd ** 2 - 1) < 5 * math.sqrt(0.8 / n)  # var of U^2 relative: 4/5 / n


def test_linear_init_is_uniform_with_bound_1_over_sqrt_fan_in():
    minisd.manual_seed(0)
    layer = nn.Linear(64, 200)
    bound = 1 / math.sqrt(64)
    _check_uniform(layer.weight.numpy(), bound)
    assert np.abs(layer.bias.numpy()).max() <= bound
    _check_uniform(np.concatenate([nn.Linear(64, 200).bias.numpy() for _ in range(20)]), bound)
    assert nn.Linear(3, 4, bias=False).bias is None


def test_conv2d_init_is_uniform_with_bound_1_over_sqrt_fan_in():
    minisd.manual_seed(0)
    layer = nn.Conv2d(8, 64, 3)
    bound = 1 / math.sqrt(8 * 3 * 3)
    assert layer.weight.shape == (64, 8, 3, 3)
    _check_uniform(layer.weight.numpy(), bound)
    _check_uniform(np.concatenate([nn.Conv2d(8, 64, 3).bias.numpy() for _ in range(20)]), bound)
    assert nn.Conv2d(2, 3, 1, bias=False).bias is None


def test_init_matches_torch_bounds():
    """The bound is PyTorch's own: torch's layers of the same size stay inside it too, and reach it."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    for ours, theirs in [(nn.Linear(48, 300), torch.nn.Linear(48, 300)),
                         (nn.Conv2d(6, 50, 3), torch.nn.Conv2d(6, 50, 3))]:
        for name in ("weight", "bias"):
            t = getattr(theirs, name).detach().numpy()
            o = getattr(ours, name).numpy()
            assert o.shape == t.shape
            bound = max(np.abs(t).max(), np.abs(o).max())
            assert np.abs(o).max() > 0.9 * bound and np.abs(t).max() > 0.9 * bound
            assert abs(o.std() - t.std()) < 0.15 * t.std()


def test_embedding_init_is_standard_normal():
    minisd.manual_seed(0)
    e = nn.Embedding(500, 40)
    w = e.weight.numpy().astype(np.float64)
    n = w.size
    assert abs(w.mean()) < 5 / math.sqrt(n)
    assert abs(w.std() - 1) < 5 * math.sqrt(0.5 / n)
    assert w.dtype == np.float64 and e.weight.dtype == np.float32


def test_norm_layers_start_as_ones_and_zeros():
    g, ln = nn.GroupNorm(2, 6), nn.LayerNorm((3, 4))
    np.testing.assert_array_equal(g.weight.numpy(), np.ones(6))
    np.testing.assert_array_equal(g.bias.numpy(), np.zeros(6))
    np.testing.assert_array_equal(ln.weight.numpy(), np.ones((3, 4)))
    np.testing.assert_array_equal(ln.bias.numpy(), np.zeros((3, 4)))
    assert nn.GroupNorm(2, 6, affine=False).parameters() == []
    assert nn.LayerNorm(4, elementwise_affine=False).parameters() == []
    with pytest.raises(ValueError, match="GroupNorm"):
        nn.GroupNorm(4, 6)


def test_manual_seed_makes_init_reproducible():
    minisd.manual_seed(5)
    a = Net().state_dict()
    minisd.manual_seed(5)
    b = Net().state_dict()
    minisd.manual_seed(6)
    c = Net().state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["head.0.weight"], c["head.0.weight"])


# ---- freezing and casting


def test_requires_grad_false_freezes_parameters():
    net = Net()
    assert net.head.requires_grad_(False) is net.head
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    net(x).sum().backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith("head."))
    assert all(grads[n] is not None for n in grads if not n.startswith("head."))
    # a fully frozen model records no graph at all
    net.requires_grad_(False)
    out = net(x)
    assert not out.requires_grad and out._ctx is None
    net.requires_grad_(True)
    assert all(p.requires_grad for p in net.parameters())


def test_to_float64_casts_parameters_and_allows_gradcheck():
    if not minisd.get_backend().float64:
        pytest.skip("the kernel backends run conv2d and group_norm in float32 only")
    minisd.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(3, 3), nn.SiLU())
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4))
    ref32 = net(x.astype(np.float32)).numpy()
    net[0].weight.grad = np.zeros((3, 2, 3, 3), np.float32)
    assert net.to(np.float64) is net
    assert all(p.dtype == np.float64 and p.grad is None for p in net.parameters())
    out = net(x)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.numpy(), ref32, atol=1e-5, rtol=1e-4)
    w = net[0].weight

    def f(xt, wt):
        saved, w.data = w.data, wt.data  # the weight as an input of the check
        try:
            return net[2](net[1](F.conv2d(xt, wt, net[0].bias, padding=1)))
        finally:
            w.data = saved

    assert gradcheck(f, [x, w.numpy()])
    net.to(np.float32)
    assert all(p.dtype == np.float32 for p in net.parameters())


# ---- the layers against PyTorch's with the same weights, loaded by name


def test_layers_match_torch_after_loading_its_state_dict():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, stride=2, padding=1), torch.nn.GroupNorm(3, 6), torch.nn.SiLU(),
        torch.nn.Conv2d(6, 4, 1), torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 5), torch.nn.LayerNorm(5),
        torch.nn.GELU())
    with torch.no_grad():  # move the norms away from their trivial init
        for m in (theirs[1], theirs[6]):
            m.weight.normal_(1, 0.3)
            m.bias.normal_(0, 0.3)

    class Flatten(nn.Module):
        def forward(self, x):
            return x.flatten(1)

    ours = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.GroupNorm(3, 6), nn.SiLU(),
        nn.Conv2d(6, 4, 1), Flatten(), nn.Linear(4 * 3 * 3, 5), nn.LayerNorm(5), nn.GELU())
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    ref = theirs(xt)
    xo = Tensor(x, requires_grad=True)
    out = ours(xo)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), atol=1e-5, rtol=1e-3)
    g = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    out.backward(g)
    ref.backward(torch.tensor(g))
    np.testing.assert_allclose(xo.grad, xt.grad.numpy(), atol=1e-4, rtol=1e-3)
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad, theirs.get_parameter(name).grad.numpy(), atol=1e-4, rtol=1e-3,
                                   err_msg=name)


def test_embedding_module_matches_torch():
    torch = pytest.importorskip("torch")
    ours = nn.Embedding(6, 3)
    theirs = torch.nn.Embedding(6, 3)
    theirs.load_state_dict({"weight": torch.tensor(ours.weight.numpy())})
    ids = np.array([[1, 1, 5], [0, 5, 5]])
    out, ref = ours(ids), theirs(torch.tensor(ids))
    np.testing.assert_array_equal(out.numpy(), ref.detach().numpy())
    g = np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)
    out.backward(g)
    ref.backward(torch.tensor(g))
    np.testing.assert_allclose(ours.weight.grad, theirs.weight.grad.numpy(), atol=1e-6, rtol=1e-5)


def test_identity_and_module_without_forward():
    x = Tensor(np.ones(2))
    assert nn.Identity()(x) is x
    with pytest.raises(NotImplementedError, match="no forward"):
        nn.Module()(x)


def test_tied_weights_are_one_parameter_to_the_optimiser():
    """An output layer that shares the embedding's table (weight tying) is stepped once per step."""
    from minisd.optim import SGD

    class Tied(nn.Module):
        def __init__(self):
            self.emb = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(self.emb(ids))

    m = Tied()
    assert [n for n, _ in m.named_parameters()] == ["emb.weight", "out.weight"]
    assert list(m.state_dict()) == ["emb.weight", "out.weight"]
    assert len(m.parameters()) == 1 and m.num_parameters() == 15
    w0 = m.emb.weight.numpy().copy()
    m(np.array([0, 3])).sum().backward()
    g = m.emb.weight.grad.copy()
    SGD(m.parameters(), lr=0.1).step()
    np.testing.assert_allclose(m.emb.weight.numpy(), w0 - 0.1 * g, rtol=1e-6)
