"""Noise schedulers: how noise is added in training, and removed step by step in sampling.

A diffusion model is trained on images destroyed by Gaussian noise to a known level.
With a schedule of variances beta_1 ... beta_T (T = ``num_train_timesteps`` = 1000) and

    alpha_t = 1 - beta_t,        alpha_bar_t = prod_{s <= t} alpha_s,

the noisy sample at step t is drawn in one go (DDPM, Ho et al. 2020, eq. 4):

    x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * epsilon,   epsilon ~ N(0, I)

(``add_noise``). The UNet is trained to predict epsilon from (x_t, t). Sampling starts
from pure noise x_T and walks back through a few of the 1000 steps (``set_timesteps``),
each ``step`` turning the model's prediction into x_{t_prev}. The schedulers differ only
in that walk:

    DDPMScheduler           ancestral sampling: the posterior q(x_{t-1} | x_t, x_0), noise drawn each step
    DDIMScheduler           a deterministic (eta = 0) or partly random (eta > 0) jump to t_prev
    EulerDiscreteScheduler  Euler's method on the probability-flow ODE in sigma = sqrt((1 - alpha_bar) / alpha_bar)

The sampling loop is the same for all three (it is SD's pipeline without the guidance):

    scheduler.set_timesteps(50)
    x = rng.standard_normal((N, 4, 64, 64)) * scheduler.init_noise_sigma      # x_T
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t, text_embeddings)
        x = scheduler.step(eps, t, x, generator=rng).prev_sample             # x_{t_prev}
    # step() also returns pred_original_sample: the current guess of x_0

Each follows diffusers' scheduler of the same name: the same config keys, defaults and
formulas, so that ``scheduler/scheduler_config.json`` moves between minisd and diffusers
and the two produce the same timesteps and the same samples (tests/test_schedulers.py).
Where diffusers has a quirk (DDIM's previous timestep) minisd has it too, with a note.

Stable Diffusion v1.x: num_train_timesteps 1000, beta_schedule "scaled_linear",
beta_start 0.00085, beta_end 0.012, steps_offset 1, set_alpha_to_one False,
clip_sample False, prediction_type "epsilon" (v2.x 768 px: "v_prediction"). minisd's
shapes model uses the same schedule on (4, 8, 8) latents instead of SD's (4, 64, 64).

Arrays: NumPy or CuPy (``xp = get_array_module(x)``); a float32 sample stays float32.
The schedule itself (betas, alpha_bar) is kept in float64 NumPy and its values enter the
array math as Python floats, so they never change the sample's dtype.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from minisd.backend import get_array_module, to_numpy

CONFIG_NAME = "scheduler_config.json"

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ---------------------------------------------------------------------------------------
# The noise schedule beta_t
# ---------------------------------------------------------------------------------------


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float,
               beta_schedule: str, trained_betas=None) -> np.ndarray:
    """beta_t for t = 0 ... T-1 (float64).

    linear            beta_t evenly spaced from beta_start to beta_end (DDPM: 1e-4 ... 0.02)
    scaled_linear     sqrt(beta_t) evenly spaced, then squared (Stable Diffusion, from LDM)
    squaredcos_cap_v2 the cosine schedule of Nichol & Dhariwal 2021:
                      alpha_bar(s) = cos^2(((s + 0.008) / 1.008) * pi / 2), s = t / T,
                      beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), capped at 0.999
    """
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(f"trained_betas has {betas.size} values; num_train_timesteps is {num_train_timesteps}")
        return betas
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        s = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
        alpha_bar = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def spaced_timesteps(num_inference_steps: int, num_train_timesteps: int, timestep_spacing: str,
                     steps_offset: int = 0) -> np.ndarray:
    """Which of the T training steps sampling visits, in descending order (float64, unrounded).

    For T = 1000 and n = 10 (Lin et al. 2023, "Common diffusion noise schedules and
    sample steps are flawed", table 2):
        leading   0, 100, ..., 900 (+ steps_offset), reversed: 900 ... 0 (SD v1: 901 ... 1)
        trailing  999, 899, ..., 99: starts at the last step, so x_T really is pure noise
        linspace  999, 888, ..., 0: both ends (Euler's default; unrounded here)
    """
    n, T = num_inference_steps, num_train_timesteps
    if timestep_spacing == "leading":
        return (np.arange(n)[::-1] * (T // n) + steps_offset).astype(np.float64)
    if timestep_spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    if timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1]
    raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")


def draw_noise(shape, like, generator=None):
    """epsilon ~ N(0, I) of ``shape``, in ``like``'s array module and dtype.

    ``generator``: a numpy.random.Generator (``np.random.default_rng(seed)``, made once and
    passed to every step), or None for fresh entropy. Noise is always drawn on the host
    by NumPy, so a seed gives the same numbers on CPU and GPU.
    """
    if generator is None:
        generator = np.random.default_rng()
    if not isinstance(generator, np.random.Generator):
        # an int seed here would redraw the very same noise at every step
        raise ValueError("generator must be a numpy.random.Generator (np.random.default_rng(seed), "
                         f"made once for the whole sampling loop), not {type(generator).__name__}")
    xp = get_array_module(like)
    return xp.asarray(generator.standard_normal(shape), dtype=like.dtype)


@dataclass
class SchedulerOutput:
    """What one sampling step returns: x_{t_prev}, and the model's current guess of x_0."""

    prev_sample: Any
    pred_original_sample: Any

    def __iter__(self):  # so that ``prev, x0 = scheduler.step(...)`` also works
        return iter((self.prev_sample, self.pred_original_sample))


# ---------------------------------------------------------------------------------------
# What all three share: the config, alpha_bar, add_noise, the x_0 / epsilon algebra
# ---------------------------------------------------------------------------------------


class Scheduler:
    """Base class: config handling and the variance-preserving algebra shared by DDPM and DDIM.

    Subclasses list their config keys and defaults in ``_defaults`` (diffusers' names and
    diffusers' defaults, which are not SD's: see the module docstring).
    """

    _defaults: dict[str, Any] = {}
    # Options diffusers has and minisd does not implement: accepted only at these values,
    # so a config that needs them fails loudly instead of sampling something else.
    _unsupported = {"thresholding": False, "rescale_betas_zero_snr": False, "use_karras_sigmas": False,
                    "use_exponential_sigmas": False, "use_beta_sigmas": False, "timestep_type": "discrete",
                    "interpolation_type": "linear", "final_sigmas_type": "zero"}

    def __init__(self, **config):
        unknown = sorted(set(config) - set(self._defaults))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no config key {unknown[0]!r}; "
                             f"known keys: {', '.join(self._defaults)}")
        self.config = {**self._defaults, **config}
        c = self.config
        if c["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {c['prediction_type']!r}; "
                             f"choose one of {', '.join(PREDICTION_TYPES)}")
        if c["timestep_spacing"] not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep_spacing {c['timestep_spacing']!r}; "
                             f"choose one of {', '.join(TIMESTEP_SPACINGS)}")
        if int(c["num_train_timesteps"]) < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {c['num_train_timesteps']}")
        self.betas = make_betas(int(c["num_train_timesteps"]), c["beta_start"], c["beta_end"],
                                c["beta_schedule"], c.get("trained_betas"))
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(self.alphas)  # alpha_bar_t
        self.num_inference_steps = None
        self.timesteps = np.arange(self.num_train_timesteps)[::-1].copy()

    # -- config: plain constructor arguments, saved as JSON (diffusers' ConfigMixin) ---------

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config["num_train_timesteps"])

    @classmethod
    def from_config(cls, config: dict):
        """Build from a config dict (a scheduler_config.json's contents).

        Keys this class does not have are ignored (as diffusers does: SD v1.5 ships a
        PNDMScheduler config whose schedule keys every scheduler shares), except options
        that would change the result and that minisd lacks, which are an error.
        """
        for key, default in cls._unsupported.items():
            if key in config and config[key] != default and config[key] is not None:
                raise ValueError(f"{cls.__name__}: config {key}={config[key]!r} is not supported by minisd")
        return cls(**{k: v for k, v in config.items() if k in cls._defaults})

    @classmethod
    def from_pretrained(cls, path: str):
        """Load from a folder holding scheduler_config.json, or a model folder with scheduler/."""
        return cls.from_config(read_config(path))

    def to_dict(self) -> dict:
        """The config as saved: diffusers' "_class_name" first, then the constructor arguments."""
        d = {"_class_name": type(self).__name__}
        for k, v in self.config.items():
            d[k] = v.tolist() if isinstance(v, np.ndarray) else v
        return d

    def save_config(self, directory: str) -> str:
        """Write ``directory``/scheduler_config.json (diffusers' layout: the model's scheduler/ folder)."""
        from minisd.io import write_json  # atomic: a failed save leaves the old file whole

        path = os.path.join(directory, CONFIG_NAME)
        write_json(path, self.to_dict())
        return path

    save_pretrained = save_config

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if v != self._defaults[k])
        return f"{type(self).__name__}({args})"

    def __len__(self):
        return self.num_train_timesteps

    # -- the forward process and its algebra ------------------------------------------------

    def _alpha_bar(self, t) -> float:
        """alpha_bar_t as a Python float; 1 before the first step (t < 0: nothing added yet)."""
        t = int(t)
        return float(self.alphas_cumprod[t]) if t >= 0 else 1.0

    def _per_sample(self, values, sample):
        """(N,) values -> an array that broadcasts against sample (N, C, H, W), in sample's dtype."""
        xp = get_array_module(sample)
        values = xp.asarray(values, dtype=sample.dtype)
        return values.reshape(values.shape + (1,) * (sample.ndim - values.ndim))

    def _check_timesteps(self, timesteps):
        t = np.asarray(to_numpy(timesteps))
        if t.size and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t.min()} ... {t.max()}")
        return t.astype(np.int64)

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * epsilon, one t per sample."""
        t = self._check_timesteps(timesteps)
        a = self.alphas_cumprod[t]
        return (self._per_sample(np.sqrt(a), original_samples) * original_samples
                + self._per_sample(np.sqrt(1 - a), original_samples) * noise)

    def get_velocity(self, sample, noise, timesteps):
        """The v-prediction target (Salimans & Ho 2022): v = sqrt(alpha_bar_t) epsilon - sqrt(1 - alpha_bar_t) x_0."""
        t = self._check_timesteps(timesteps)
        a = self.alphas_cumprod[t]
        return self._per_sample(np.sqrt(a), sample) * noise - self._per_sample(np.sqrt(1 - a), sample) * sample

    def scale_model_input(self, sample, timestep=None):
        """The UNet sees x_t itself in the variance-preserving schedulers (Euler rescales it)."""
        return sample

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of x_T, the starting noise: 1 for a variance-preserving x_t."""
        return 1.0

    def _x0_and_eps(self, model_output, sample, alpha_bar_t: float):
        """Turn the model's output into (x_0, epsilon), whichever the model predicts.

        From x_t = sqrt(a) x_0 + sqrt(1-a) epsilon, with a = alpha_bar_t:
            epsilon       x_0 = (x_t - sqrt(1-a) epsilon) / sqrt(a)
            sample        epsilon = (x_t - sqrt(a) x_0) / sqrt(1-a)
            v_prediction  v = sqrt(a) epsilon - sqrt(1-a) x_0, so
                          x_0 = sqrt(a) x_t - sqrt(1-a) v,  epsilon = sqrt(a) v + sqrt(1-a) x_t
        """
        sa, sb = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return (sample - sb * model_output) / sa, model_output
        if kind == "sample":
            return model_output, (sample - sa * model_output) / sb
        return sa * sample - sb * model_output, sa * model_output + sb * sample

    def _clip(self, x0):
        """Clamp the x_0 guess to [-r, r] when clip_sample is on (pixel-space models; SD turns it off)."""
        if not self.config.get("clip_sample"):
            return x0
        r = float(self.config["clip_sample_range"])
        return get_array_module(x0).clip(x0, -r, r)

    def _check_steps(self, num_inference_steps):
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if num_inference_steps > self.num_train_timesteps:
            raise ValueError(f"num_inference_steps ({num_inference_steps}) cannot exceed "
                             f"num_train_timesteps ({self.num_train_timesteps})")

    def set_timesteps(self, num_inference_steps: int):
        """Choose the n timesteps that sampling visits (``self.timesteps``, int64, descending)."""
        self._check_steps(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        c = self.config
        timesteps = spaced_timesteps(self.num_inference_steps, self.num_train_timesteps,
                                     c["timestep_spacing"], int(c["steps_offset"])).round().astype(np.int64)
        if timesteps.max() >= self.num_train_timesteps:  # (diffusers fails here with an IndexError at the first step)
            raise ValueError(f"{type(self).__name__}: {num_inference_steps} steps with steps_offset="
                             f"{c['steps_offset']} and {c['timestep_spacing']!r} spacing would start at timestep "
                             f"{timesteps.max()}, past the last of {self.num_train_timesteps} training timesteps; "
                             f"take fewer steps or steps_offset=0")
        self.timesteps = timesteps


_SHARED = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
               trained_betas=None, prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)


# ---------------------------------------------------------------------------------------
# DDPM
# ---------------------------------------------------------------------------------------


class DDPMScheduler(Scheduler):
    """Denoising diffusion probabilistic models (Ho et al. 2020): ancestral sampling.

    Given x_t and the model's guess x_0, step to the previous visited timestep t' by sampling
    the Gaussian posterior q(x_t' | x_t, x_0) (eqs. 6-7), where with a_t = alpha_bar_t and
    the effective one-jump beta_t = 1 - a_t / a_t' (= beta_t itself when t' = t - 1):

        mean     = sqrt(a_t') beta_t / (1 - a_t) * x_0  +  sqrt(1 - beta_t) (1 - a_t') / (1 - a_t) * x_t
        variance = (1 - a_t') / (1 - a_t) * beta_t                            ("fixed_small")
        x_t'     = mean + sqrt(variance) * z,   z ~ N(0, I), and no noise at the last step (t = 0)

    variance_type "fixed_large" uses beta_t instead (the upper bound in the paper).
    """

    _defaults = {**_SHARED, "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0}

    def __init__(self, **config):
        super().__init__(**config)
        if self.config["variance_type"] not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance_type {self.config['variance_type']!r} is not supported by minisd; "
                             "choose fixed_small or fixed_large")

    def previous_timestep(self, timestep) -> int:
        """The next timestep sampling visits after ``timestep`` (-1 after the last)."""
        t = int(timestep)
        if self.num_inference_steps is None:
            return t - 1
        idx = np.flatnonzero(self.timesteps == t)
        if idx.size == 0:
            raise ValueError(f"timestep {t} is not one of this scheduler's timesteps")
        i = int(idx[0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def step(self, model_output, timestep, sample, generator=None, noise=None, return_dict=True):
        """One ancestral step x_t -> x_t'. ``noise`` (z) or ``generator`` / seed for the draw."""
        t = int(timestep)
        t_prev = self.previous_timestep(t)
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        beta_t = 1 - a_t / a_prev
        x0, _ = self._x0_and_eps(model_output, sample, a_t)
        x0 = self._clip(x0)
        coef_x0 = math.sqrt(a_prev) * beta_t / (1 - a_t)
        coef_xt = math.sqrt(1 - beta_t) * (1 - a_prev) / (1 - a_t)
        mean = coef_x0 * x0 + coef_xt * sample
        prev = mean
        if t > 0:
            if self.config["variance_type"] == "fixed_large":
                variance = beta_t
            else:  # clamped as in diffusers: t' = -1 would otherwise give exactly 0
                variance = max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
            if noise is None:
                noise = draw_noise(model_output.shape, model_output, generator)
            prev = mean + math.sqrt(variance) * noise
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


# ---------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------


class DDIMScheduler(Scheduler):
    """Denoising diffusion implicit models (Song et al. 2021), eq. 12.

    With a_t = alpha_bar_t, the guesses x_0 and epsilon from the model, and t' the previous
    visited timestep:

        sigma_t = eta * sqrt((1 - a_t') / (1 - a_t)) * sqrt(1 - a_t / a_t')
        x_t'    = sqrt(a_t') x_0  +  sqrt(1 - a_t' - sigma_t^2) epsilon  +  sigma_t z

    eta = 0: deterministic, the same noise always gives the same image (SD's default
    sampler in its original release); eta = 1: DDPM's variance.

    Past the first step (t' < 0), a_t' is 1 if set_alpha_to_one else alpha_bar_0.

    Quirk kept for parity with diffusers: t' = t - T // n whatever timestep_spacing is,
    which is exactly the next visited timestep for "leading" and "trailing" with n
    dividing T, and only close to it otherwise.
    """

    _defaults = {**_SHARED, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True}

    def _alpha_bar_prev(self, t_prev: int) -> float:
        if t_prev >= 0:
            return float(self.alphas_cumprod[t_prev])
        return 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def step(self, model_output, timestep, sample, eta: float = 0.0, generator=None, noise=None,
             use_clipped_model_output: bool = False, return_dict=True):
        """One DDIM step x_t -> x_t'. For eta > 0, ``noise`` (z) or ``generator`` / seed for the draw."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(n) before step()")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        t = int(timestep)
        t_prev = t - self.num_train_timesteps // self.num_inference_steps
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar_prev(t_prev)
        x0, eps = self._x0_and_eps(model_output, sample, a_t)
        x0 = self._clip(x0)
        if use_clipped_model_output:  # epsilon consistent with the clipped x_0
            eps = (sample - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
        if eta > 0:
            if noise is None:
                noise = draw_noise(model_output.shape, model_output, generator)
            prev = prev + sigma * noise
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


# ---------------------------------------------------------------------------------------
# Euler (Karras et al. 2022's view: x = x_0 + sigma * epsilon)
# ---------------------------------------------------------------------------------------


class EulerDiscreteScheduler(Scheduler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, algorithm 2), k-diffusion style.

    Divide x_t by sqrt(alpha_bar_t) and it becomes x = x_0 + sigma * epsilon with

        sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)      (SD: 0.029 at t = 0, 14.6 at t = 999)

    so the sampler works on x in sigma-space: it starts from x_T = sigma_max * z
    (``init_noise_sigma``), feeds the UNet x / sqrt(sigma^2 + 1) (= x_t, what it was
    trained on: ``scale_model_input``), and takes Euler steps along dx/dsigma = (x - x_0) / sigma:

        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * (x_i - x_0) / sigma_i,   last sigma = 0.

    sigma at non-integer timesteps ("linspace" spacing) is interpolated linearly in t.
    s_churn > 0 adds noise to climb to sigma_hat = sigma (1 + gamma) before the step
    (Karras' stochastic sampler); 0 (the default) keeps it deterministic.
    """

    _defaults = {**_SHARED, "timestep_spacing": "linspace"}

    def __init__(self, **config):
        super().__init__(**config)
        self.all_sigmas = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)  # sigma_t, t = 0 ... T-1
        self.timesteps = np.linspace(0, self.num_train_timesteps - 1, self.num_train_timesteps)[::-1].astype(np.float32)
        self.sigmas = np.append(self.all_sigmas[::-1], 0.0)
        self.step_index = None

    def set_timesteps(self, num_inference_steps: int):
        """Timesteps (float32, descending) and their sigmas, with a final sigma of 0 appended."""
        self._check_steps(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        c = self.config
        t = spaced_timesteps(self.num_inference_steps, self.num_train_timesteps, c["timestep_spacing"],
                             int(c["steps_offset"]))
        self.timesteps = t.astype(np.float32)
        sigmas = np.interp(self.timesteps.astype(np.float64), np.arange(self.num_train_timesteps), self.all_sigmas)
        self.sigmas = np.append(sigmas, 0.0)
        self.step_index = None

    @property
    def init_noise_sigma(self) -> float:
        """x_T = init_noise_sigma * z. For "leading" the first sigma is not the largest
        noise level, and diffusers uses sqrt(sigma_max^2 + 1) there; kept for parity."""
        sigma_max = float(self.sigmas.max())
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return sigma_max
        return math.sqrt(sigma_max ** 2 + 1)

    def index_for_timestep(self, timestep) -> int:
        idx = np.flatnonzero(self.timesteps == np.float32(to_numpy(timestep)))
        if idx.size == 0:
            raise ValueError(f"timestep {timestep} is not one of this scheduler's timesteps")
        return int(idx[1] if idx.size > 1 else idx[0])

    def _sigma_index(self, timestep) -> int:
        # The first call after set_timesteps locates the timestep; then it just counts steps.
        if self.step_index is None:
            self.step_index = self.index_for_timestep(timestep)
        return self.step_index

    def scale_model_input(self, sample, timestep=None):
        """x / sqrt(sigma^2 + 1): the variance-preserving x_t that the UNet was trained on."""
        sigma = float(self.sigmas[self._sigma_index(timestep)])
        return sample / math.sqrt(sigma ** 2 + 1)

    def add_noise(self, original_samples, noise, timesteps):
        """x = x_0 + sigma_t * epsilon (sigma-space; divide by sqrt(sigma^2 + 1) for x_t)."""
        idx = [self.index_for_timestep(t) for t in np.atleast_1d(to_numpy(timesteps))]
        return original_samples + self._per_sample(self.sigmas[idx], original_samples) * noise

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, noise=None, return_dict=True):
        """One Euler step from sigma_i to sigma_{i+1}; model_output is the UNet's output on
        scale_model_input(x). ``noise`` or ``generator`` / seed only matter when s_churn > 0."""
        i = self._sigma_index(timestep)
        if i + 1 >= len(self.sigmas):
            raise ValueError("step() called after the last timestep; call set_timesteps again")
        sigma = float(self.sigmas[i])
        gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            if noise is None:
                noise = draw_noise(model_output.shape, model_output, generator)
            sample = sample + (s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2)) * noise
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = sample - sigma_hat * model_output
        elif kind == "sample":
            x0 = model_output
        else:  # v on the unscaled x_t: x_0 = sqrt(a) x_t - sqrt(1-a) v, with x_t = x / sqrt(sigma^2 + 1)
            x0 = model_output * (-sigma / math.sqrt(sigma ** 2 + 1)) + sample / (sigma ** 2 + 1)
        derivative = (sample - x0) / sigma_hat
        prev = sample + (float(self.sigmas[i + 1]) - sigma_hat) * derivative
        self.step_index = i + 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


# ---------------------------------------------------------------------------------------
# Choosing and loading a scheduler
# ---------------------------------------------------------------------------------------

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}


def read_config(path: str) -> dict:
    """The dict in a scheduler_config.json: ``path`` is the file, its folder, or a model folder."""
    candidates = [path, os.path.join(path, CONFIG_NAME), os.path.join(path, "scheduler", CONFIG_NAME)]
    for p in candidates:
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    config = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read scheduler config {p}: {e}") from None
            if not isinstance(config, dict):
                raise ValueError(f"scheduler config {p} is not a JSON object")
            return config
    raise ValueError(f"no {CONFIG_NAME} at {path} (looked in {', '.join(candidates[1:])})")


def get_scheduler_class(name: str):
    """"ddim" / "ddpm" / "euler" or a class name ("DDIMScheduler") -> the minisd class."""
    by_class = {cls.__name__: cls for cls in SCHEDULERS.values()}
    cls = SCHEDULERS.get(str(name).lower()) or by_class.get(name)
    if cls is None:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return cls


def load_scheduler(path_or_config, name: str | None = None) -> Scheduler:
    """A scheduler from a config (dict or path), as the class it names, or as ``name`` if given.

    A config naming a scheduler minisd lacks (SD v1.5 ships PNDMScheduler) needs ``name``:
    the schedule keys carry over, as with diffusers' ``DDIMScheduler.from_config(...)``.
    """
    config = path_or_config if isinstance(path_or_config, dict) else read_config(path_or_config)
    return get_scheduler_class(name or config.get("_class_name", "?")).from_config(config)
