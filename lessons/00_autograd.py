# %% [markdown]
# # Lesson 0: autograd, the engine under everything
#
# Stable Diffusion is trained by gradient descent: a loss L (how wrong the predicted
# noise is) is differentiated with respect to every one of the UNet's 860 million
# weights, and each weight moves a little against its gradient. PyTorch does the
# differentiating. minisd does it with its own engine, `minisd/tensor.py`, about 300
# lines: this lesson takes that engine apart.
#
# 1. **Build** a small expression. Every operation records a `Function` node that
#    remembers its inputs (`tensor._ctx.parents`): a graph.
# 2. **Draw** that graph, and **differentiate** it: walk it backwards applying the
#    chain rule at each node, by hand, then let `backward()` do it.
# 3. **Check** gradients against finite differences (`minisd.gradcheck`), and see a
#    wrong backward caught.
# 4. **Train** a tiny network with these gradients and watch its loss fall.
#
# Run: `python lessons/00_autograd.py [--out DIR] [--fast]`; figures go to
# `./figures/00_autograd/` by default.

# %%
import sys
import time
from pathlib import Path

try:
    import minisd
except ImportError:  # run from a checkout without installing: the package sits beside lessons/
    here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
    sys.path.insert(0, str(here.parent))
    import minisd

import numpy as np

from minisd import Tensor, functional as F, nn, viz
from minisd.gradcheck import gradcheck
from minisd.optim import AdamW
from minisd.tensor import Function

plt = viz.plt
args = viz.lesson_args("00_autograd")
results = {}
t_start = time.perf_counter()

# %% [markdown]
# ## 1. Build an expression: every operation leaves a node behind
#
# A one-weight linear model and its loss, with a weight-decay term, so that the weight
# `w` is used twice (its gradient must add up the two paths):
#
#     pred = w * x + b,    L = (pred - y)^2 + 0.1 * w^2
#
# `x`, `w`, `b` require gradients; `y` (the target) does not. Each operator call (`*`,
# `+`, `**`) runs a `Function`'s `forward` and returns a Tensor whose `_ctx` is that
# Function, holding `parents` (its input tensors) and whatever its backward will need.

# %%
viz.header("1. building the graph")
x = Tensor(1.5, requires_grad=True)
w = Tensor(-0.8, requires_grad=True)
b = Tensor(0.3, requires_grad=True)
y = Tensor(1.0)  # a constant: no gradient wanted

wx = w * x
pred = wx + b
err = pred - y
sq = err ** 2
w2 = w ** 2
reg = w2 * 0.1
L = sq + reg

names = {id(t): n for t, n in [(x, "x"), (w, "w"), (b, "b"), (y, "y"), (wx, "w*x"), (pred, "pred"),
                                 (err, "err"), (sq, "err^2"), (w2, "w^2"), (reg, "0.1*w^2"), (L, "L")]}
print(f"L = (w*x + b - y)^2 + 0.1*w^2 = {L.item():.4f}")
print(f"L was made by {type(L._ctx).__name__}; its parents: "
      f"{[names.get(id(p), 'const') for p in L._ctx.parents]}")


# %% [markdown]
# ## 2. Walk the graph from L back to the leaves
#
# Starting at `L` and following `_ctx.parents` reaches every tensor L depends on. We
# collect the tensors and Function nodes and the edges between them. Constants made on
# the fly (the `0.1`) appear as parents too, without gradients.

# %%
def collect_graph(root):
    """Tensors, Function nodes and edges reachable from ``root`` through ``_ctx.parents``."""
    tensors, functions, edges = {id(root): root}, {}, []
    stack = [root]
    while stack:
        t = stack.pop()
        if t._ctx is None:
            continue
        fid = id(t._ctx)
        functions[fid] = t._ctx
        edges.append((fid, id(t)))  # function -> the tensor it made
        for p in t._ctx.parents:
            edges.append((id(p), fid))  # input tensor -> function
            if id(p) not in tensors:
                tensors[id(p)] = p
                stack.append(p)
    return tensors, functions, edges


tensors, functions, edges = collect_graph(L)
print(f"{len(tensors)} tensors, {len(functions)} Function nodes, {len(edges)} edges")
for fid, f in functions.items():
    ins = ", ".join(names.get(id(p), f"const {p.item():g}") for p in f.parents)
    outs = [names[t] for a, t in edges if a == fid]
    print(f"  {type(f).__name__:<4} ({ins}) -> {outs[0]}")


# %% [markdown]
# ## 3. Differentiate: the chain rule, node by node
#
# Reverse-mode differentiation visits the nodes so that each tensor comes after every
# tensor that uses it (reverse topological order), starting from dL/dL = 1. At a node
# `out = f(a, b)`, the Function's `backward(dL/dout)` returns `(dL/da, dL/db)`, the
# vector-Jacobian product; a tensor used twice (`w`) receives the **sum** of what its
# users send back.
#
# Below we do exactly that by hand, calling each node's own `backward`, and write the
# gradient of every tensor (intermediate ones included) on the drawing.

# %%
viz.header("2. the chain rule by hand")


def reverse_topological(root):
    """Each tensor after all the tensors computed from it (an iterative depth-first search)."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        t, done = stack.pop()
        if done:
            order.append(t)
        elif id(t) not in seen:
            seen.add(id(t))
            stack.append((t, True))
            if t._ctx is not None:
                stack.extend((p, False) for p in t._ctx.parents if p.requires_grad)
    return order[::-1]


grads = {id(L): np.ones_like(L.data)}
for t in reverse_topological(L):
    if t._ctx is None:
        continue
    sent = t._ctx.backward(grads[id(t)])
    sent = sent if isinstance(sent, tuple) else (sent,)
    for parent, g in zip(t._ctx.parents, sent):
        if g is not None and parent.requires_grad:
            grads[id(parent)] = grads.get(id(parent), 0) + g
    print(f"  at {names[id(t)]:<8} dL/d{names[id(t)]} = {float(grads[id(t)]):+.4f}  -> "
          + ", ".join(f"dL/d{names.get(id(p), 'const')}" for p in t._ctx.parents if p.requires_grad))
for leaf in (x, w, b):
    print(f"  leaf {names[id(leaf)]}: dL/d{names[id(leaf)]} = {float(grads[id(leaf)]):+.4f}")


# %% [markdown]
# Now draw the graph twice: the forward pass (each tensor's value) and the backward pass
# (each tensor's gradient). Tensors are boxes, Functions are circles; grey boxes are
# constants, which get no gradient.

# %%
def layout(root, tensors, functions, edges):
    """(x, y) of every node: the root on the right, each input one column further left."""
    makes = {t: f for f, t in edges if f in functions}  # tensor -> the function that made it
    inputs = {f: [a for a, g in edges if g == f] for f in functions}
    column = {id(root): 0}
    frontier = [id(root)]
    while frontier:  # longest distance from the root, so every edge points right
        nxt = []
        for t in frontier:
            f = makes.get(t)
            if f is None:
                continue
            column[f] = max(column.get(f, 0), column[t] + 1)
            for a in inputs[f]:
                if column.get(a, -1) < column[f] + 1:
                    column[a] = column[f] + 1
                    nxt.append(a)
        frontier = nxt
    pos = {id(root): (0.0, 0.0)}
    for c in range(1, max(column.values()) + 1):
        here = [n for n, cc in column.items() if cc == c]
        consumers = {n: [pos[g] for a, g in edges if a == n and g in pos] or [(0, 0)] for n in here}
        here.sort(key=lambda n: -np.mean([p[1] for p in consumers[n]]))
        for i, n in enumerate(here):
            pos[n] = (-c, (len(here) - 1) / 2 - i)
    return pos


def draw_graph(ax, values, title, fmt):
    pos = layout(L, tensors, functions, edges)
    for a, b_ in edges:
        (x0, y0), (x1, y1) = pos[a], pos[b_]
        bend = 0.25 if x1 - x0 > 2 else 0.0  # long edges arc around the boxes between
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", color="0.45", lw=1, shrinkA=16, shrinkB=16,
                                    connectionstyle=f"arc3,rad={bend}"))
    for fid, f in functions.items():
        px, py = pos[fid]
        label = type(f).__name__ + (f"\n**{f.p:g}" if hasattr(f, "p") else "")
        ax.scatter([px], [py], s=900, c="#ffe9a8", edgecolors="0.3", zorder=3)
        ax.text(px, py, label, ha="center", va="center", fontsize=7, zorder=4)
    for tid, t in tensors.items():
        px, py = pos[tid]
        name = names.get(tid, "const")
        value = values.get(tid)
        text = f"{name}\n{fmt(value)}" if value is not None else f"{name}\n{float(t.item()):g}"
        color = "#cfe3ff" if t.requires_grad else "#e0e0e0"
        ax.text(px, py, text, ha="center", va="center", fontsize=7, zorder=4,
                bbox=dict(boxstyle="round,pad=0.35", fc=color, ec="0.3"))
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


fig, axes = plt.subplots(2, 1, figsize=(8, 6.4))
draw_graph(axes[0], {tid: t.data for tid, t in tensors.items() if t.requires_grad},
           "forward: each tensor's value", lambda v: f"= {float(v):.3f}")
draw_graph(axes[1], {tid: g for tid, g in grads.items()},
           "backward: each tensor's gradient dL/d(tensor); w gets the sum of two paths",
           lambda v: f"grad {float(v):+.3f}")
fig.tight_layout()
viz.save(fig, args.out / "computation_graph.png")

# %% [markdown]
# `backward()` does the same walk (and frees each node's saved arrays as it goes, so a
# training step's memory does not pile up). Only leaves keep their `.grad`, as in
# PyTorch. Check it against our hand walk and against the formulas from calculus:
#
#     dL/dw = 2 (pred - y) x + 0.2 w,   dL/dx = 2 (pred - y) w,   dL/db = 2 (pred - y)

# %%
viz.header("3. backward() agrees")
L.backward()
e = float(err.data)
by_calculus = {"x": 2 * e * float(w.data), "w": 2 * e * float(x.data) + 0.2 * float(w.data), "b": 2 * e}
worst = 0.0
for leaf in (x, w, b):
    n = names[id(leaf)]
    worst = max(worst, abs(float(leaf.grad) - by_calculus[n]), abs(float(leaf.grad) - float(grads[id(leaf)])))
    print(f"  d L/d{n}: backward() {float(leaf.grad):+.5f}   by hand {float(grads[id(leaf)]):+.5f}   "
          f"calculus {by_calculus[n]:+.5f}")
print(f"  after backward(), L._ctx is {L._ctx} (the graph was freed)")
results["graph_tensors"] = len(tensors)
results["graph_functions"] = len(functions)
results["grad_w"] = float(w.grad)
results["grad_w_calculus"] = by_calculus["w"]
results["grad_max_disagreement"] = worst

# %% [markdown]
# ## 4. Checking gradients: finite differences
#
# Every op's backward in minisd is tested against the definition of the derivative,
#
#     dL/dx ~ (L(x + h) - L(x - h)) / 2h,
#
# whose error has two parts: truncation, shrinking like h^2, and rounding, growing like
# eps / h (eps = machine precision: 1.2e-7 in float32, 2.2e-16 in float64). The plot
# shows both for d tanh(x)/dx at x = 0.7: float64 gets to about 1e-12 near h ~ 1e-5,
# float32 stalls five or six orders of magnitude higher, and only for a lucky h. That is
# why gradient checks run in float64 while training runs in float32.

# %%
viz.header("4. finite differences")
x0 = 0.7
exact = 1 - np.tanh(x0) ** 2
hs = np.logspace(-12, -0.5, 60)
err_by_dtype = {}
for dtype in (np.float32, np.float64):
    f = lambda v: float(F.tanh(Tensor(np.asarray(v, dtype=dtype))).item())  # noqa: E731
    err_by_dtype[dtype.__name__] = np.array([abs((f(x0 + h) - f(x0 - h)) / (2 * h) - exact) for h in hs])
best64 = float(err_by_dtype["float64"].min())
best32 = float(err_by_dtype["float32"].min())
print(f"  smallest error: float64 {best64:.1e} (h = {hs[err_by_dtype['float64'].argmin()]:.0e}), "
      f"float32 {best32:.1e} (h = {hs[err_by_dtype['float32'].argmin()]:.0e})")

fig, ax = plt.subplots(figsize=(6, 3.6))
for name, e_ in err_by_dtype.items():
    ax.loglog(hs, np.maximum(e_, 1e-17), ".-", ms=3, label=name)
ax.loglog(hs, hs ** 2 / 3, "k--", lw=0.8, label="truncation ~ h^2")
ax.loglog(hs, 2.2e-16 / hs, "k:", lw=0.8, label="rounding ~ eps/h (float64)")
ax.set_xlabel("step h")
ax.set_ylabel("|finite difference - exact|")
ax.set_title("central differences of tanh at x = 0.7", fontsize=9)
ax.set_ylim(1e-14, 10)
ax.legend(fontsize=7)
fig.tight_layout()
viz.save(fig, args.out / "finite_differences.png")
results["fd_best_error_float64"] = best64
results["fd_best_error_float32"] = best32

# %% [markdown]
# `minisd.gradcheck.gradcheck(fn, inputs)` does this for whole tensors: it reduces the
# output to a number with fixed random weights and compares backward() with finite
# differences along every coordinate (small inputs) or a few random directions (large
# ones). Here it checks the three operations Stable Diffusion spends its time in
# (convolution, group norm, attention) and a few others.

# %%
rng = np.random.default_rng(0)
checks = {
    "silu": (F.silu, [rng.standard_normal((3, 4))]),
    "softmax": (lambda a: F.softmax(a, axis=-1), [rng.standard_normal((2, 5))]),
    "layer_norm": (lambda a: F.layer_norm(a, (6,)), [rng.standard_normal((2, 6))]),
    "conv2d 3x3, padding 1": (lambda a, k: F.conv2d(a, k, padding=1),
                              [rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3))]),
    "group_norm (2 groups)": (lambda a: F.group_norm(a, 2), [rng.standard_normal((2, 4, 3, 3))]),
    "attention": (F.scaled_dot_product_attention,
                  [rng.standard_normal((1, 2, 4, 3)), rng.standard_normal((1, 2, 5, 3)),
                   rng.standard_normal((1, 2, 5, 3))]),
}
passed = 0
for label, (fn, inputs) in checks.items():
    ok = gradcheck(fn, inputs)
    passed += ok
    print(f"  gradcheck {label:<24} {'passed' if ok else 'FAILED'}  (inputs {[a.shape for a in inputs]})")
results["gradchecks_passed"] = passed
results["gradchecks_total"] = len(checks)


# %% [markdown]
# And a wrong backward is caught. Here is a `Function` computing sin(a) whose backward
# forgot the derivative's sign (d sin/da = cos a, not -cos a):

# %%
class WrongSin(Function):
    def forward(self, a):
        self.a = a
        return np.sin(a)

    def backward(self, g):
        return -g * np.cos(self.a)  # the bug


try:
    gradcheck(WrongSin.apply, [rng.standard_normal(4)])
    caught = False
except AssertionError as error:
    caught = True
    print(f"  caught: {error}")
results["wrong_backward_caught"] = caught

# %% [markdown]
# ## 5. Train a tiny network
#
# The same engine trains every model in minisd. A two-layer network with SiLU (the
# activation in every ResNet block of SD's UNet) learns to separate two interleaved
# half-moons of points, with the optimiser SD was trained with (AdamW). Each step:
# forward, loss (cross-entropy), `zero_grad`, `backward`, `step`.

# %%
viz.header("5. training a tiny network")
n_points = 200
steps = 150 if args.fast else 400
data_rng = np.random.default_rng(1)
angle = data_rng.uniform(0, np.pi, n_points)
label = data_rng.integers(0, 2, n_points)
points = np.stack([np.cos(angle) + label * 1.0 - 0.5, np.sin(angle) * (1 - 2 * label) + label * 0.4 - 0.2], 1)
points = (points + 0.2 * data_rng.standard_normal(points.shape)).astype(np.float32)

minisd.manual_seed(0)
model = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 2))
opt = AdamW(model.parameters(), lr=0.02, weight_decay=1e-4)
print(f"  model: 2 -> 32 -> 32 -> 2, {model.num_parameters()} parameters "
      f"(SD v1.5's UNet: {viz.SD['unet_params']:,})")
losses = []
t0 = time.perf_counter()
for step in range(steps):
    loss = F.cross_entropy(model(Tensor(points)), label)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if step % 50 == 0 or step == steps - 1:
        print(f"  step {step:4d}  loss {losses[-1]:.4f}")
train_seconds = time.perf_counter() - t0
with minisd.no_grad():
    accuracy = float((model(Tensor(points)).numpy().argmax(1) == label).mean())
print(f"  {steps} steps in {train_seconds:.2f} s; accuracy on the training points {accuracy:.1%}")
results["train_first_loss"] = losses[0]
results["train_final_loss"] = losses[-1]
results["train_accuracy"] = accuracy

# %% [markdown]
# The loss curve, and what the network learned: the class it predicts over the plane.

# %%
grid = np.linspace(-2.2, 2.2, 120, dtype=np.float32)
gx, gy = np.meshgrid(grid, grid)
with minisd.no_grad():
    logits = model(Tensor(np.stack([gx.ravel(), gy.ravel()], 1))).numpy()
prob = np.exp(logits - logits.max(1, keepdims=True))
prob = (prob[:, 1] / prob.sum(1)).reshape(gx.shape)

fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
axes[0].plot(losses, lw=1.2)
axes[0].set_yscale("log")
axes[0].set_xlabel("step")
axes[0].set_ylabel("cross-entropy loss")
axes[0].set_title(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f}", fontsize=9)
axes[1].contourf(gx, gy, prob, levels=20, cmap="coolwarm", alpha=0.6)
axes[1].contour(gx, gy, prob, levels=[0.5], colors="k", linewidths=1)
axes[1].scatter(points[:, 0], points[:, 1], c=label, cmap="coolwarm", s=8, edgecolors="k", linewidths=0.3)
axes[1].set_title(f"decision boundary, accuracy {accuracy:.0%}", fontsize=9)
axes[1].set_aspect("equal")
fig.tight_layout()
viz.save(fig, args.out / "training.png")

# %% [markdown]
# ## What we saw
#
# - Each operation records a Function node; together they form the graph from the
#   inputs to the loss.
# - `backward()` walks that graph in reverse, each node applying its own local
#   derivative (the chain rule), summing where a tensor is used twice.
# - Finite differences in float64 confirm every op's backward; a wrong one is caught.
# - These gradients train a network. Stable Diffusion is the same loop at scale: the
#   UNet's 860 M weights instead of our 1,218, and the loss is the error of the
#   predicted noise (lesson 6).

# %%
results["seconds"] = round(time.perf_counter() - t_start, 2)
viz.write_results(args.out, results)
