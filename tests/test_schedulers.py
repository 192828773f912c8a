"""Schedulers against diffusers: timesteps, sigmas, add_noise and whole sampling runs.

Both sides get the same model outputs (a fixed toy "model" of the current sample) and,
where a step draws noise, the same noise: minisd through ``noise=``, diffusers through
DDIM's ``variance_noise`` or, for DDPM, a patched ``randn_tensor`` that hands it ours.
"""

import json
import os

import numpy as np
import pytest

from minisd import schedulers as S

try:  # the parity extra; the tests that need it are marked @parity and skip without it
    import diffusers
    import torch
except ImportError:
    diffusers = torch = None


def parity(test):
    return pytest.mark.parity(pytest.mark.skipif(diffusers is None, reason="needs diffusers and torch")(test))


# diffusers' Euler calls np.array on a torch tensor, which NumPy 2 flags: theirs, not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (2, 4, 8, 8)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # SD v1.x


def toy_model(x, t, i):
    """A fixed, smooth function of (x, t) that stands in for the UNet: same input, same output."""
    rng = np.random.default_rng(1000 + i)
    return (0.3 * np.tanh(x) + 0.5 * rng.standard_normal(x.shape) + 1e-4 * float(t)).astype(np.float32)


# the diffusers module whose randn_tensor each stochastic scheduler draws its noise with
NOISE_MODULES = {"ddpm": "scheduling_ddpm", "euler": "scheduling_euler_discrete",
                 "euler_a": "scheduling_euler_ancestral_discrete"}


def run_both(name, steps, config, step_kwargs=None, stochastic=False, monkeypatch=None, begin=None):
    """Sample with minisd and with diffusers side by side; return both trajectories.

    ``begin``: start at timesteps[begin] (img2img's set_begin_index) from add_noise's x_t.
    Where diffusers' step returns no pred_original_sample (PNDM, DPM-Solver, UniPC), the
    trajectory holds None for it.
    """
    ours = S.get_scheduler_class(name)(**config)
    theirs = getattr(diffusers, type(ours).__name__)(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    if ours.config.get("use_karras_sigmas") and ours.timesteps.dtype == np.float32:
        # fractional timesteps of Karras' sigmas: diffusers interpolates float32 log sigmas
        np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=0, atol=5e-3)
    else:
        np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert ours.timesteps.dtype == theirs.timesteps.numpy().dtype
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-5)
    if hasattr(ours, "sigmas"):  # float32 (diffusers) loses 1e-5 of the smallest sigma
        np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=5e-5)

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(SHAPE) * ours.init_noise_sigma).astype(np.float32)
    timesteps = list(ours.timesteps)
    if begin is not None:
        ours.set_begin_index(begin)
        theirs.set_begin_index(begin)
        x0, eps = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
        t = ours.timesteps[begin:begin + 1].repeat(SHAPE[0])
        x = ours.add_noise(x0, eps, t)
        assert_float32_close(x, theirs.add_noise(*map(torch.from_numpy, (x0, eps, t))).numpy())
        timesteps = timesteps[begin:]
    xa, xb = x, torch.from_numpy(x.copy())
    traj = []
    for i, t in enumerate(timesteps, start=begin or 0):
        t_d = theirs.timesteps[i]
        ina = ours.scale_model_input(xa, t)
        inb = theirs.scale_model_input(xb, t_d)
        assert_float32_close(ina, inb.numpy())
        ea, eb = toy_model(ina, t, i), torch.from_numpy(toy_model(inb.numpy(), t, i))
        kw = dict(step_kwargs or {})
        z = rng.standard_normal(SHAPE).astype(np.float32) if stochastic else None
        if z is not None and name == "ddim":
            oa = ours.step(ea, t, xa, noise=z, **kw)
            ob = theirs.step(eb, t_d, xb, variance_noise=torch.from_numpy(z), **kw)
        elif z is not None:  # DDPM, Euler and Euler a draw their own noise: hand diffusers ours
            monkeypatch.setattr(f"diffusers.schedulers.{NOISE_MODULES[name]}.randn_tensor",
                                lambda *a, _z=z, **k: torch.from_numpy(_z))
            oa = ours.step(ea, t, xa, noise=z, **kw)
            ob = theirs.step(eb, t_d, xb, **kw)
        else:
            oa = ours.step(ea, t, xa, **kw)
            ob = theirs.step(eb, t_d, xb, **kw)
        assert oa.prev_sample.dtype == np.float32
        x0b = getattr(ob, "pred_original_sample", None)
        traj.append((oa.prev_sample, ob.prev_sample.numpy(), oa.pred_original_sample,
                     None if x0b is None else x0b.numpy()))
        xa, xb = oa.prev_sample, ob.prev_sample
    return traj


def assert_float32_close(a, b):
    """Equal to float32 rounding, relative to the array's largest value (diffusers keeps
    alpha_bar in float32, minisd in float64: they differ by about 1e-6 relative)."""
    atol = 2e-5 * max(1.0, float(np.abs(b).max()))
    if not np.all(np.abs(a - b) <= atol + 1e-4 * np.abs(b)):  # (the quick check first: thousands of calls)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol)


def assert_same(traj):
    for pa, pb, x0a, x0b in traj:
        assert_float32_close(pa, pb)
        if x0b is not None:
            assert_float32_close(x0a, x0b)


@parity
@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddim_matches_diffusers(steps, spacing, prediction):
    cfg = dict(SD, timestep_spacing=spacing, prediction_type=prediction, clip_sample=False,
               set_alpha_to_one=False, steps_offset=1)
    assert_same(run_both("ddim", steps, cfg))


@parity
@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_eta_matches_diffusers(steps, spacing, prediction):
    cfg = dict(beta_schedule="linear", timestep_spacing=spacing, prediction_type=prediction, clip_sample=True,
               clip_sample_range=1.5)
    assert_same(run_both("ddim", steps, cfg, {"eta": 0.7}, stochastic=True))


@parity
@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddpm_matches_diffusers(steps, spacing, prediction, monkeypatch):
    cfg = dict(SD, timestep_spacing=spacing, prediction_type=prediction, clip_sample=(prediction == "sample"))
    assert_same(run_both("ddpm", steps, cfg, stochastic=True, monkeypatch=monkeypatch))


@parity
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_ddpm_fixed_large_matches_diffusers(schedule, monkeypatch):
    cfg = dict(beta_schedule=schedule, variance_type="fixed_large", clip_sample=True)
    assert_same(run_both("ddpm", 10, cfg, stochastic=True, monkeypatch=monkeypatch))


@parity
@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_euler_matches_diffusers(steps, spacing, prediction):
    cfg = dict(SD, timestep_spacing=spacing, prediction_type=prediction, steps_offset=1)
    assert_same(run_both("euler", steps, cfg))


@parity
@pytest.mark.parametrize("steps", [10, 25])
def test_euler_churn_matches_diffusers(steps, monkeypatch):
    """Karras' stochastic Euler: noise added to climb to sigma_hat before each step."""
    cfg = dict(SD, timestep_spacing="trailing")
    kw = {"s_churn": 3.0, "s_tmin": 0.5, "s_tmax": 8.0}  # churn only in the middle of the schedule
    assert_same(run_both("euler", steps, cfg, kw, stochastic=True, monkeypatch=monkeypatch))


@parity
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_and_add_noise_match_diffusers(schedule):
    ours, theirs = S.DDPMScheduler(beta_schedule=schedule), diffusers.DDPMScheduler(beta_schedule=schedule)
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=2e-5)
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((5, 4, 8, 8)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 1, 500, 998, 999])
    a = ours.add_noise(x0, eps, t)
    b = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
    assert a.dtype == np.float32
    assert_float32_close(a, b)
    v = ours.get_velocity(x0, eps, t)
    assert_float32_close(v, theirs.get_velocity(*map(torch.from_numpy, (x0, eps, t))).numpy())


@parity
def test_euler_add_noise_matches_diffusers():
    ours, theirs = S.EulerDiscreteScheduler(**SD), diffusers.EulerDiscreteScheduler(**SD)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    rng = np.random.default_rng(4)
    x0 = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    t = ours.timesteps[[0, 7, 19]]
    b = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
    assert_float32_close(ours.add_noise(x0, eps, t), b)


@parity
@pytest.mark.parametrize("name", ["ddpm", "euler"])
def test_saved_config_loads_in_diffusers(name, tmp_path):
    ours = S.get_scheduler_class(name)(**SD, steps_offset=1, prediction_type="v_prediction",
                                       timestep_spacing="trailing")
    ours.save_config(str(tmp_path))
    theirs = getattr(diffusers, type(ours).__name__).from_pretrained(str(tmp_path))
    assert {k: theirs.config[k] for k in ours.config} == ours.config
    assert S.load_scheduler(str(tmp_path)).config == ours.config


@parity
def test_config_round_trips_through_diffusers(tmp_path):
    ours = S.DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    path = ours.save_config(str(tmp_path / "scheduler"))
    assert os.path.basename(path) == "scheduler_config.json"
    assert json.load(open(path))["_class_name"] == "DDIMScheduler"
    theirs = diffusers.DDIMScheduler.from_pretrained(str(tmp_path / "scheduler"))
    assert {k: theirs.config[k] for k in ours.config} == ours.config
    back = S.load_scheduler(str(tmp_path))  # the model folder: finds scheduler/
    assert type(back) is S.DDIMScheduler and back.config == ours.config
    for s in (theirs, back):
        s.set_timesteps(20)
    np.testing.assert_array_equal(back.timesteps, theirs.timesteps.numpy())
    # and the other way: a config written by diffusers (PNDM, as SD v1.5 ships) loads as
    # PNDM, or as DDIM on the same schedule when asked
    diffusers.PNDMScheduler(**SD, steps_offset=1, skip_prk_steps=True).save_config(str(tmp_path / "pndm"))
    pndm = S.load_scheduler(str(tmp_path / "pndm"))
    assert type(pndm) is S.PNDMScheduler and pndm.config["skip_prk_steps"] is True
    ddim = S.load_scheduler(str(tmp_path / "pndm"), name="ddim")
    assert ddim.config["beta_schedule"] == "scaled_linear" and ddim.config["steps_offset"] == 1


def test_seeded_noise_and_bad_input():
    s = S.DDPMScheduler(**SD)
    s.set_timesteps(10)
    x = np.ones(SHAPE, np.float32)
    a, b, c = (s.step(x * 0.1, s.timesteps[0], x, generator=np.random.default_rng(seed)).prev_sample
               for seed in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="generator"):
        s.step(x * 0.1, s.timesteps[0], x, generator=7)
    # a scalar timestep broadcasts over the batch
    np.testing.assert_array_equal(s.add_noise(x, x, 500), s.add_noise(x, x, np.array([500, 500])))
    with pytest.raises(ValueError, match="timestep_spacing"):
        S.DDIMScheduler(timestep_spacing="middle")
    with pytest.raises(ValueError, match="beta_schedule"):
        S.DDIMScheduler(beta_schedule="cubic")
    with pytest.raises(ValueError, match="prediction_type"):
        S.EulerDiscreteScheduler(prediction_type="x0")
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="cannot exceed"):
        s.set_timesteps(1001)
    with pytest.raises(ValueError, match="thresholding"):
        S.DDPMScheduler.from_config({"thresholding": True})
    with pytest.raises(ValueError, match="timesteps must lie"):
        s.add_noise(x, x, np.array([1000, 0]))
    for cls in (S.DDPMScheduler, S.DDIMScheduler):  # leading spacing, offset 1, every step: timestep T
        with pytest.raises(ValueError, match="would start at timestep 37, past the last of 37"):
            cls(num_train_timesteps=37, steps_offset=1).set_timesteps(37)


@pytest.mark.gpu
def test_cupy_arrays_stay_on_the_gpu_and_agree_with_numpy():
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CuPy installed, no GPU
        pytest.skip(f"no GPU: {e}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    for name in S.SCHEDULERS:
        kw = {"ddim": {"eta": 0.5}, "euler": {"s_churn": 1.0}}.get(name, {})
        outs = []
        for xp in (np, cupy):
            kw["generator"] = np.random.default_rng(3)
            s = S.get_scheduler_class(name)(**SD)
            s.set_timesteps(10)
            xt = xp.asarray(x)
            for i, t in enumerate(s.timesteps[:5]):  # past the multistep schedulers' warm-up
                eps = xp.asarray(toy_model(np.asarray(x), t, i))
                out = s.step(eps, t, s.scale_model_input(xt, t), **kw)
                xt = out.prev_sample
            assert type(xt) is type(xp.asarray(x)) and xt.dtype == np.float32
            outs.append(cupy.asnumpy(xt) if xp is cupy else xt)
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(S.SCHEDULERS))
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_a_perfect_model_lands_on_x0(name, prediction):
    """Independent of diffusers: feed each sampler the exact answer for a known x_0 and the
    walk must end on x_0 (the last step removes all noise: alpha_bar = 1, sigma = 0). The
    loop is the pipeline's: scale_model_input(x, t), then step(..., int(t), ..., generator=rng)."""
    cls = S.get_scheduler_class(name)
    if prediction == "sample" and cls in (S.PNDMScheduler, S.EulerAncestralDiscreteScheduler):
        pytest.skip("diffusers' PNDM and Euler a have no 'sample' prediction")
    if prediction == "v_prediction" and cls is S.PNDMScheduler:
        pytest.skip("PNDM combines v's of different timesteps (as diffusers): exact for epsilon only")
    extra = {"clip_sample": False} if "clip_sample" in cls._defaults else {}
    if "set_alpha_to_one" in cls._defaults:
        extra["set_alpha_to_one"] = True  # so that the last step lands on alpha_bar = 1
    s = cls(**SD, prediction_type=prediction, **extra)
    s.set_timesteps(20)
    rng = np.random.default_rng(5)
    x0 = rng.uniform(-1, 1, SHAPE)
    x = rng.standard_normal(SHAPE) * s.init_noise_sigma
    for t in s.timesteps:
        x_t = s.scale_model_input(x, t)  # the variance-preserving x_t the model sees
        if isinstance(s, S.KDiffusionScheduler):
            a = 1 / (1 + s.sigmas[s.step_index] ** 2)
        else:
            a = s.alphas_cumprod[int(round(float(t)))]
        eps = (x_t - np.sqrt(a) * x0) / np.sqrt(1 - a)
        target = {"epsilon": eps, "sample": x0, "v_prediction": np.sqrt(a) * eps - np.sqrt(1 - a) * x0}[prediction]
        out = s.step(target, int(t), x, generator=rng)
        np.testing.assert_allclose(out.pred_original_sample, x0, atol=1e-6)
        x = out.prev_sample
    np.testing.assert_allclose(x, x0, atol=1e-6)
