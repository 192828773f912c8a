"""The samplers beyond DDPM / DDIM / Euler against diffusers, step by step: PNDM, DPM-Solver++,
Euler a, Heun, LMS, UniPC, Karras sigmas; then choosing a scheduler by name or by config.

Each run feeds both libraries the same model outputs (test_schedulers.toy_model) and, for
Euler a, the same noise, and compares every step's prev_sample (and pred_original_sample
where diffusers returns one) to float32 rounding; run_both also checks timesteps, sigmas
and init_noise_sigma.
"""

import json

import numpy as np
import pytest
from test_schedulers import SD, assert_same, diffusers, parity, run_both

from minisd import schedulers as S

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]  # diffusers' own (dpmsolver is "deprecated")

STEPS = [10, 25, 50]  # 10 < 15 <= 25: DPM-Solver's lower_order_final applies at 10 only
SD1 = dict(SD, steps_offset=1)  # SD v1.x's schedule with its leading-spacing offset


def cases(named, extra=()):
    """(steps, options) cases: the options the issue names at 10, 25 and 50 steps, the
    others (prediction types, spacings, ...) at 10 only, to keep the file fast."""
    pairs = [(n, o) for o in named for n in STEPS] + [(10, o) for o in extra]
    ids = [f"{n}-" + (",".join(f"{k}={v}" for k, v in o.items()) or "defaults") for n, o in pairs]
    return pytest.mark.parametrize("steps,options", pairs, ids=ids)


@parity
@cases([dict(timestep_spacing="leading"), dict(timestep_spacing="trailing"), dict(timestep_spacing="linspace")],
       [dict(prediction_type="v_prediction"), dict(prediction_type="v_prediction", timestep_spacing="trailing"),
        dict(set_alpha_to_one=True), dict(steps_offset=0)])
def test_pndm_plms_matches_diffusers(steps, options):
    """SD v1.5's configuration: skip_prk_steps, its improved Euler start, then PLMS."""
    assert_same(run_both("pndm", steps, {**SD1, "skip_prk_steps": True, "set_alpha_to_one": False, **options}))


@parity
@cases([dict(), dict(set_alpha_to_one=True), dict(steps_offset=0)],
       [dict(prediction_type="v_prediction"), dict(timestep_spacing="trailing"), dict(timestep_spacing="linspace")])
def test_pndm_prk_warmup_matches_diffusers(steps, options):
    """skip_prk_steps False: the paper's Runge-Kutta warm-up, then PLMS."""
    assert_same(run_both("pndm", steps, {**SD1, "skip_prk_steps": False, **options}))


def test_pndm_bad_input():
    for skip in (True, False):  # steps_offset pushes the first timestep to T (diffusers: an IndexError)
        with pytest.raises(ValueError, match="would visit timestep 40, past the last of 40 training timesteps"):
            S.PNDMScheduler(num_train_timesteps=40, steps_offset=4, skip_prk_steps=skip).set_timesteps(10)
    with pytest.raises(ValueError, match="at least 4 steps"):
        S.PNDMScheduler().set_timesteps(3)
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        S.PNDMScheduler(prediction_type="sample")
    s = S.PNDMScheduler(skip_prk_steps=True)
    s.set_timesteps(10)
    assert len(s.timesteps) == 11 and s.timesteps[1] == s.timesteps[2]  # n + 1 model calls


@parity
@cases([dict(), dict(solver_order=1), dict(solver_order=3), dict(solver_type="heun"),
        dict(use_karras_sigmas=True), dict(use_karras_sigmas=True, solver_order=3),
        dict(lower_order_final=False), dict(lower_order_final=False, solver_order=3),
        dict(final_sigmas_type="sigma_min"), dict(final_sigmas_type="sigma_min", use_karras_sigmas=True)],
       [dict(euler_at_final=True), dict(prediction_type="v_prediction"), dict(prediction_type="sample"),
        dict(timestep_spacing="leading"), dict(timestep_spacing="trailing"),
        dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)])
def test_dpm_solver_pp_matches_diffusers(steps, options):
    """DPM++ 2M (the defaults), its orders, solver types, Karras sigmas and final step."""
    assert_same(run_both("dpm++2m", steps, {**SD1, **options}))


@parity
def test_dpm_solver_cosine_karras_timesteps_match_diffusers():
    """The cosine schedule's Karras timesteps are truncated, not rounded (as diffusers'
    int64 cast does). Truncation magnifies float32 rounding: where diffusers' float32 log
    sigmas put a timestep just below an integer and minisd's just above (999 -> 998.99...,
    the top one), or the other way (936.9975 at 25 steps), the two differ by one."""
    for n in STEPS:
        cfg = dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
        ours, theirs = S.DPMSolverMultistepScheduler(**cfg), diffusers.DPMSolverMultistepScheduler(**cfg)
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        diff = ours.timesteps - theirs.timesteps.numpy()
        assert np.abs(diff).max() <= 1 and np.count_nonzero(diff) <= 2
        rounded = np.round(S.sigma_to_t(ours.sigmas[:-1], ours.all_sigmas))
        assert (ours.timesteps != rounded).any()  # truncation does matter here


@parity
@cases([dict(), dict(solver_type="heun"), dict(solver_order=3), dict(solver_order=1), dict(use_karras_sigmas=True)],
       [dict(prediction_type="v_prediction")])
def test_dpm_solver_noise_prediction_matches_diffusers(steps, options):
    """algorithm_type "dpmsolver" (DPM-Solver, epsilon): it needs the final sigma_min."""
    cfg = {**SD1, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", **options}
    assert_same(run_both("dpm++2m", steps, cfg))


@parity
@cases([dict(timestep_spacing="linspace"), dict(timestep_spacing="leading")],
       [dict(timestep_spacing="trailing"), dict(prediction_type="v_prediction")])
def test_euler_ancestral_matches_diffusers(steps, options, monkeypatch):
    """The same noise z handed to both at every step."""
    assert_same(run_both("euler_a", steps, {**SD1, **options}, stochastic=True, monkeypatch=monkeypatch))


@parity
@cases([dict(), dict(use_karras_sigmas=True)],
       [dict(prediction_type="v_prediction"), dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.8),
        dict(timestep_spacing="leading"), dict(timestep_spacing="trailing")])
def test_heun_matches_diffusers(steps, options):
    """Two calls a step through the doubled timesteps; the last step is Euler's."""
    assert_same(run_both("heun", steps, {**SD1, **options}))


@parity
@cases([dict(), dict(use_karras_sigmas=True)],
       [dict(prediction_type="v_prediction"), dict(prediction_type="sample"), dict(timestep_spacing="leading"),
        dict(timestep_spacing="trailing")])
def test_lms_matches_diffusers(steps, options):
    """Order 4 (the default); the coefficients integrated exactly, diffusers' with scipy's quad."""
    assert_same(run_both("lms", steps, {**SD1, **options}))


@parity
@pytest.mark.parametrize("order", [1, 2, 3])
def test_lms_other_orders_match_diffusers(order):
    assert_same(run_both("lms", 10, SD1, {"order": order}))


@parity
@cases([dict(), dict(solver_type="bh1", final_sigmas_type="sigma_min"), dict(solver_order=1), dict(solver_order=3),
        dict(predict_x0=False, final_sigmas_type="sigma_min"), dict(disable_corrector=[0, 1, 5]),
        dict(lower_order_final=False, final_sigmas_type="sigma_min"), dict(use_karras_sigmas=True)],
       [dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"), dict(final_sigmas_type="sigma_min"),
        dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", sigma_min=0.1),
        dict(prediction_type="v_prediction"), dict(prediction_type="sample"),
        dict(timestep_spacing="leading"), dict(timestep_spacing="trailing")])
def test_unipc_matches_diffusers(steps, options):
    """UniPC-bh2 of order 2 with the corrector (the defaults), and each option around it."""
    assert_same(run_both("unipc", steps, {**SD1, **options}))


@parity
@cases([dict(timestep_spacing="linspace"), dict(timestep_spacing="leading")],
       [dict(timestep_spacing="trailing"), dict(sigma_min=0.1, sigma_max=10.0), dict(final_sigmas_type="sigma_min"),
        dict(final_sigmas_type="sigma_min", prediction_type="v_prediction")])
def test_euler_karras_matches_diffusers(steps, options):
    """EulerDiscreteScheduler's use_karras_sigmas (and its sigma_min / sigma_max / final sigma)."""
    assert_same(run_both("euler", steps, {**SD1, "use_karras_sigmas": True, **options}))


@parity
@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpm++2m", "unipc"])
def test_img2img_begin_index_matches_diffusers(name):
    """Starting part way down (set_begin_index, as diffusers' img2img does) from add_noise's x_t."""
    assert_same(run_both(name, 20, dict(SD1, use_karras_sigmas=name != "lms"), begin=8))


def test_lms_coefficients_are_the_integrals():
    """Independent of diffusers: each coefficient against a midpoint-rule integral of the
    Lagrange basis polynomial, and together they integrate any cubic exactly."""
    s = S.LMSDiscreteScheduler(**SD)
    s.set_timesteps(10)
    i, order, sig = 5, 4, s.sigmas
    nodes = sig[i - np.arange(order)]
    grid = np.linspace(sig[i], sig[i + 1], 200_001)
    mid = (grid[1:] + grid[:-1]) / 2
    for j in range(order):
        basis = np.prod([(mid - nodes[k]) / (nodes[j] - nodes[k]) for k in range(order) if k != j], axis=0)
        assert s.lms_coefficient(order, i, j) == pytest.approx(np.sum(basis * np.diff(grid)), rel=1e-8)
    cubic = np.polynomial.Polynomial([0.3, -1.0, 0.2, 0.05])
    exact = cubic.integ()(sig[i + 1]) - cubic.integ()(sig[i])
    assert sum(s.lms_coefficient(order, i, j) * cubic(nodes[j]) for j in range(order)) == pytest.approx(exact)


def test_karras_sigmas_follow_the_formula():
    sigmas = S.karras_sigmas(0.03, 14.6, 5)
    expected = [(14.6 ** (1 / 7) + k / 4 * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7 for k in range(5)]
    np.testing.assert_allclose(sigmas, expected, rtol=1e-12)
    s = S.EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    s.set_timesteps(5)
    # the timesteps are those whose sigma is each level: sigma_t at fractional t, interpolated in log sigma
    log_at_t = np.interp(s.timesteps.astype(np.float64), np.arange(1000), np.log(s.all_sigmas))
    np.testing.assert_allclose(np.exp(log_at_t), s.sigmas[:-1], rtol=1e-5)


def test_unipc_and_dpm_refuse_what_diffusers_turns_into_nan():
    with pytest.raises(ValueError, match="predict_x0=False cannot end on sigma = 0"):
        S.UniPCMultistepScheduler(predict_x0=False)
    with pytest.raises(ValueError, match="lower_order_final=False cannot end on sigma = 0"):
        S.UniPCMultistepScheduler(lower_order_final=False)
    with pytest.raises(ValueError, match="'dpmsolver' cannot end on sigma = 0"):
        S.DPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    # bh1 with the final sigma = 0: diffusers multiplies an empty sum by -inf; minisd stays finite
    s = S.UniPCMultistepScheduler(**SD, solver_type="bh1")
    s.set_timesteps(10)
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    for t in s.timesteps:
        x = s.step(0.3 * np.tanh(x), t, x).prev_sample
    assert np.isfinite(x).all()


@parity
def test_configs_of_one_solver_read_as_another_as_in_diffusers():
    """A UniPC config read as DPM-Solver (and back) maps solver_type as diffusers does."""
    unipc = diffusers.UniPCMultistepScheduler(**SD).config
    dpm = diffusers.DPMSolverMultistepScheduler(**SD, solver_type="heun").config
    assert S.DPMSolverMultistepScheduler.from_config(dict(unipc)).config["solver_type"] == \
        diffusers.DPMSolverMultistepScheduler.from_config(unipc).config.solver_type == "midpoint"
    assert S.UniPCMultistepScheduler.from_config(dict(dpm)).config["solver_type"] == \
        diffusers.UniPCMultistepScheduler.from_config(dpm).config.solver_type == "bh2"


def test_unsupported_options_are_named():
    for cls, key, value in ((S.DPMSolverMultistepScheduler, "thresholding", True),
                            (S.DPMSolverMultistepScheduler, "use_lu_lambdas", True),
                            (S.UniPCMultistepScheduler, "use_flow_sigmas", True),
                            (S.EulerDiscreteScheduler, "interpolation_type", "log_linear"),
                            (S.HeunDiscreteScheduler, "use_exponential_sigmas", True)):
        with pytest.raises(ValueError, match=f"{cls.__name__}: config {key}={value!r} is not supported"):
            cls.from_config({key: value})
    with pytest.raises(ValueError, match="algorithm_type 'sde-dpmsolver\\+\\+' is not supported"):
        S.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="solver_order must be 1, 2 or 3"):
        S.DPMSolverMultistepScheduler(solver_order=4)
    # options a class does not have in diffusers are ignored, as diffusers ignores them:
    # DDIM from a "DPM++ 2M Karras" config is plain DDIM on the same schedule
    ddim = S.DDIMScheduler.from_config({**SD, "use_karras_sigmas": True, "solver_order": 2})
    assert ddim.config["beta_schedule"] == "scaled_linear"


# ---- choosing a scheduler ---------------------------------------------------------------

DIFFUSERS_NAMES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
                   "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                   "heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler",
                   "dpm++2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}


def test_short_names():
    assert {name: cls.__name__ for name, cls in S.SCHEDULERS.items()} == DIFFUSERS_NAMES
    for name, class_name in DIFFUSERS_NAMES.items():
        assert S.get_scheduler_class(name) is S.get_scheduler_class(class_name) is S.get_scheduler_class(name.upper())
    with pytest.raises(ValueError, match=r"unknown scheduler 'dpm\+\+3m'; choose one of ddpm, ddim, pndm, .*unipc"):
        S.get_scheduler_class("dpm++3m")


@parity
@pytest.mark.parametrize("name", list(DIFFUSERS_NAMES))
def test_a_diffusers_config_loads_as_the_class_it_names(name, tmp_path):
    """scheduler_config.json written by diffusers -> the minisd class of the same name, same
    config; and minisd's own back through diffusers."""
    theirs = getattr(diffusers, DIFFUSERS_NAMES[name])(**SD1, prediction_type="v_prediction")
    theirs.save_config(str(tmp_path / "scheduler"))
    ours = S.load_scheduler(str(tmp_path))
    assert type(ours) is S.get_scheduler_class(name)
    assert ours.config == {k: theirs.config[k] for k in ours.config}
    ours.save_config(str(tmp_path / "ours"))
    again = getattr(diffusers, DIFFUSERS_NAMES[name]).from_pretrained(str(tmp_path / "ours"))
    assert {k: again.config[k] for k in ours.config} == ours.config


def test_an_unknown_class_is_an_error_that_names_it(tmp_path):
    config = {**SD, "_class_name": "DEISMultistepScheduler"}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names 'DEISMultistepScheduler', which minisd does not have; minisd has "
                                         "DDPMScheduler, DDIMScheduler, PNDMScheduler, .*UniPCMultistepScheduler"):
        S.load_scheduler(str(tmp_path))
    with pytest.raises(ValueError, match="has no _class_name"):
        S.load_scheduler(SD)
    # asked for by name, the schedule carries over
    s = S.load_scheduler(str(tmp_path), name="unipc")
    assert type(s) is S.UniPCMultistepScheduler and s.config["beta_schedule"] == "scaled_linear"
