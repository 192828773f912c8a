"""Optimisers and learning-rate schedules: SGD, AdamW, gradient clipping, EMA, warmup + cosine.

Stable Diffusion was trained with AdamW (lr 1e-4, weight decay 1e-2), a warmup of the
learning rate, gradient clipping, and an exponential moving average of the weights
that is what gets shipped. All updates happen in place on the parameters' arrays.
"""

from __future__ import annotations

import math
from typing import Iterable

from minisd.backends import get_array_module
from minisd.nn import Parameter


class Optimizer:
    def __init__(self, params: Iterable[Parameter], lr: float):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got no parameters to optimise")
        if lr < 0:
            raise ValueError(f"{type(self).__name__}: learning rate must be >= 0, got {lr}")
        self.lr = lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: hyper-parameters and per-parameter buffers."""
        return {"lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        self.lr = state["lr"]


class SGD(Optimizer):
    """theta <- theta - lr * (g + wd * theta), with optional momentum: v <- mu v + g."""

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.momentum, self.weight_decay = momentum, weight_decay
        self.velocity = [None] * len(self.params)

    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
            if self.momentum:
                # a copy at first (as torch clones): the buffer must not be p.grad itself
                self.velocity[i] = g.copy() if self.velocity[i] is None else self.momentum * self.velocity[i] + g
                g = self.velocity[i]
            p.data -= p.data.dtype.type(self.lr) * g

    def state_dict(self):
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "velocity": list(self.velocity)}

    def load_state_dict(self, state):
        self.lr, self.momentum, self.weight_decay = state["lr"], state["momentum"], state["weight_decay"]
        self.velocity = _copies(state["velocity"])


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    t counts this optimiser's steps. torch counts steps per parameter instead; the two
    agree whenever every parameter gets a gradient at every step (a parameter without
    one is skipped: not moved, not decayed).

        m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
        theta <- theta - lr * wd * theta                        (decay, not through g)
        theta <- theta - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr)
        self.b1, self.b2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.t = 0
        self.m = [None] * len(self.params)
        self.v = [None] * len(self.params)

    def step(self) -> None:
        self.t += 1
        c1 = 1 - self.b1 ** self.t
        c2 = 1 - self.b2 ** self.t
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            xp, g, one = get_array_module(p.data), p.grad, p.data.dtype.type(1)
            if self.m[i] is None:
                self.m[i], self.v[i] = xp.zeros_like(p.data), xp.zeros_like(p.data)
            m, v = self.m[i], self.v[i]
            m *= self.b1
            m += (one - self.b1) * g
            v *= self.b2
            v += (one - self.b2) * (g * g)
            if self.weight_decay:
                p.data *= one - p.data.dtype.type(self.lr * self.weight_decay)
            denom = xp.sqrt(v * p.data.dtype.type(1 / c2))
            denom += p.data.dtype.type(self.eps)
            p.data -= p.data.dtype.type(self.lr / c1) * m / denom

    def state_dict(self):
        return {"lr": self.lr, "betas": (self.b1, self.b2), "eps": self.eps, "weight_decay": self.weight_decay,
                "t": self.t, "m": list(self.m), "v": list(self.v)}

    def load_state_dict(self, state):
        self.lr, (self.b1, self.b2), self.eps = state["lr"], state["betas"], state["eps"]
        self.weight_decay, self.t = state["weight_decay"], state["t"]
        self.m, self.v = _copies(state["m"]), _copies(state["v"])


def _copies(buffers: list) -> list:
    """Copies of loaded buffers (as torch's load_state_dict deep-copies): AdamW updates them in place,
    and must not change the dict, or another optimiser that loaded the same one."""
    return [None if b is None else b.copy() for b in buffers]


def clip_grad_norm(params: Iterable[Parameter], max_norm: float) -> float:
    """Scale all gradients together so that their global L2 norm is at most max_norm; return the norm before."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = math.sqrt(sum(float((g.astype("float64") ** 2).sum()) for g in grads))
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads:
            g *= g.dtype.type(scale)
    return total


class EMA:
    """Exponential moving average of weights: theta_ema <- d * theta_ema + (1 - d) * theta.

    The averaged weights are smoother than the last step's, and are what a diffusion
    model ships. ``copy_to(model)`` writes them into a model (for sampling or saving).
    """

    def __init__(self, params: Iterable[Parameter], decay: float = 0.999):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.data.copy() for p in self.params]

    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s *= s.dtype.type(self.decay)
            s += s.dtype.type(1 - self.decay) * p.data

    def copy_to(self, params: Iterable[Parameter]) -> None:
        for s, p in zip(self.shadow, params):
            p.data[...] = s

    def state_dict(self):
        return {"decay": self.decay, "shadow": list(self.shadow)}

    def load_state_dict(self, state):
        self.decay, self.shadow = state["decay"], [s.copy() for s in state["shadow"]]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """The learning rate at ``step``: linear up to base_lr over the warmup, then a cosine down to min_lr.

        lr(s) = base * (s + 1) / warmup                                 for s < warmup
        lr(s) = min + (base - min) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2

    The warmup is diffusers' get_cosine_schedule_with_warmup one step ahead (theirs is
    base * s / warmup), so that step 0 already learns; from the warmup on they agree.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
