"""The batched step equals the diffusers scheduler's own ``step`` at every timestep."""

from __future__ import annotations

import pytest
import torch
from conftest import CleanDenoiser, dp_ddim, dp_ddpm, dp_dpm
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from para_policy.schedule import (
    MultistepSchedule,
    build_scheduler,
    ddim_from,
    dpm_from,
    make_schedule,
    require_single_step,
)

CASES = [
    ("ddpm-100", lambda: dp_ddpm(), 100, 0.0),
    ("ddpm-10", lambda: dp_ddpm(), 10, 0.0),
    ("ddpm-fixed_large-sample", lambda: dp_ddpm(variance_type="fixed_large", prediction_type="sample"), 100, 0.0),
    ("ddpm-log-v-offset", lambda: dp_ddpm(variance_type="fixed_small_log", prediction_type="v_prediction",
                                          steps_offset=1), 20, 0.0),
    ("ddpm-noclip", lambda: dp_ddpm(clip_sample=False), 100, 0.0),
    ("ddim-8", lambda: dp_ddim(), 8, 0.0),
    ("ddim-10", lambda: dp_ddim(), 10, 0.0),
    ("ddim-16", lambda: dp_ddim(), 16, 0.0),
    ("ddim-16-eta", lambda: dp_ddim(), 16, 0.7),
    ("ddim-trailing-v", lambda: dp_ddim(timestep_spacing="trailing", prediction_type="v_prediction"), 10, 0.0),
    ("ddim-no-alpha-one", lambda: dp_ddim(set_alpha_to_one=False), 10, 0.0),
]


@pytest.mark.parametrize("name,make,steps,eta", CASES, ids=[c[0] for c in CASES])
def test_step_mean_matches_scheduler_step(name, make, steps, eta):
    scheduler = make()
    schedule = make_schedule(scheduler, steps, eta=eta)
    assert schedule.num_steps == len(scheduler.timesteps)
    g = torch.Generator().manual_seed(0)
    shape = (3, 16, 2)
    for k, t in enumerate(scheduler.timesteps):
        x = torch.randn(shape, generator=g) * 2
        out = torch.randn(shape, generator=g)
        noise_seed = 1000 + k
        if schedule.kind == "ddpm":
            ref = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(noise_seed)).prev_sample
        else:
            ref = scheduler.step(out, t, x, eta=eta,
                                 generator=torch.Generator().manual_seed(noise_seed) if eta > 0 else None
                                 ).prev_sample
        z = torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed))
        if not bool(schedule.draws_noise[k]):
            z = torch.zeros(shape)
        rows = torch.full((3,), k, dtype=torch.long)
        ours = schedule.step_mean(x, rows, out) + schedule.noise_std[k] * z
        assert torch.allclose(ours, ref, atol=2e-6, rtol=1e-6), (name, k, int(t), (ours - ref).abs().max())


def per_row_step_mean(schedule, x, k, out):
    """The step's mean with its coefficients made from ``alpha_t``/``alpha_prev`` on each call (a closed form)."""
    a_t, a_prev = schedule.alpha_t[k].view(-1, 1, 1), schedule.alpha_prev[k].view(-1, 1, 1)
    beta_t = 1 - a_t
    if schedule.prediction_type == "epsilon":
        x0, eps = (x - beta_t**0.5 * out) / a_t**0.5, out
    elif schedule.prediction_type == "sample":
        x0, eps = out, (x - a_t**0.5 * out) / beta_t**0.5
    else:
        x0, eps = a_t**0.5 * x - beta_t**0.5 * out, a_t**0.5 * out + beta_t**0.5 * x
    if schedule.clip_sample:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    if schedule.kind == "ddpm":
        current_alpha = a_t / a_prev
        return (a_prev**0.5 * (1 - current_alpha)) / beta_t * x0 + current_alpha**0.5 * (1 - a_prev) / beta_t * x
    std = schedule.noise_std[k].view(-1, 1, 1)
    return a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps


@pytest.mark.parametrize("name,make,steps,eta", CASES, ids=[c[0] for c in CASES])
def test_step_coefficient_table_is_bitwise_the_per_row_arithmetic(name, make, steps, eta):
    """The coefficients made once per schedule give the same bits as making them on each call, for rows
    at mixed steps and for one int step, in float32 and bfloat16 (what tolerance-0 equalities between
    samplers that step rows differently rely on)."""
    schedule = make_schedule(make(), steps, eta=eta)
    S = schedule.num_steps
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn(S, 16, 2, generator=g) * 2, torch.randn(S, 16, 2, generator=g)
    ks = torch.randperm(S, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        xd, od = x.to(dtype), out.to(dtype)
        ref = per_row_step_mean(schedule, xd, ks, od)
        assert torch.equal(schedule.step_mean(xd, ks, od), ref), (name, dtype)
        one = torch.cat([schedule.step_mean(xd[i:i + 1], int(k), od[i:i + 1]) for i, k in enumerate(ks)])
        assert one.dtype == ref.dtype and torch.equal(one, ref), (name, dtype)


def test_mixed_steps_in_one_batch():
    """Rows at different steps in one call equal row-by-row calls."""
    scheduler = dp_ddpm()
    schedule = make_schedule(scheduler, 100)
    g = torch.Generator().manual_seed(1)
    ks = torch.tensor([0, 17, 50, 98, 99])
    x = torch.randn(5, 16, 2, generator=g)
    out = torch.randn(5, 16, 2, generator=g)
    batched = schedule.step_mean(x, ks, out)
    for i, k in enumerate(ks.tolist()):
        t = scheduler.timesteps[k]
        ref = scheduler.step(out[i:i + 1], t, x[i:i + 1], generator=torch.Generator()).prev_sample
        if k < 99:  # the scheduler adds noise: compare the mean by removing it
            z = torch.randn(1, 16, 2, generator=torch.Generator())
            ref = ref - schedule.noise_std[k] * z
        assert torch.allclose(batched[i:i + 1], ref, atol=2e-6)


def test_variance_is_ddpm_posterior_variance():
    scheduler = dp_ddpm()
    schedule = make_schedule(scheduler, 100)
    for k, t in enumerate(scheduler.timesteps[:-1]):
        assert torch.isclose(schedule.variance[k], scheduler._get_variance(t), rtol=1e-5)
    assert schedule.variance[-1] == 0  # the last step lands on alpha = 1


def test_unsupported_configs_raise():
    with pytest.raises(ValueError, match="variance_type"):
        make_schedule(dp_ddpm(variance_type="learned_range"), 10)
    with pytest.raises(ValueError, match="thresholding"):
        make_schedule(DDPMScheduler(thresholding=True), 10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_schedule(dp_ddpm(), 0)
    with pytest.raises(ValueError, match="_target_"):
        build_scheduler({"_target_": "mylib.FancyScheduler"})


def test_build_scheduler_from_diffusion_policy_config():
    cfg = {"_target_": "diffusers.schedulers.scheduling_ddpm.DDPMScheduler", "num_train_timesteps": 100,
           "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2",
           "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon"}
    scheduler = build_scheduler(cfg)
    assert isinstance(scheduler, DDPMScheduler)
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"


def test_test_variance_floors_only_a_final_zero_variance_step():
    for schedule in (make_schedule(dp_ddpm(), 100), make_schedule(dp_ddim(), 10)):
        v, tv = schedule.variance, schedule.test_variance()
        assert float(v[-1]) == 0.0  # the last step lands on alpha = 1
        assert float(tv[-1]) == float(v[v > 0].min())
        assert torch.equal(tv[:-1], v[:-1])


# DPM-Solver++ (multistep): every step against DPMSolverMultistepScheduler.step along a trajectory
DPM_GRID = [(f"o{o}-{p}-{a}", dict(solver_order=o, prediction_type=p, algorithm_type=a), 10)
            for o in (1, 2, 3) for p in ("epsilon", "sample", "v_prediction")
            for a in ("dpmsolver++", "sde-dpmsolver++")]
DPM_TOGGLES = [
    ("no-lower-order-final", dict(solver_order=3, lower_order_final=False), 10),
    ("euler-at-final", dict(solver_order=3, lower_order_final=False, euler_at_final=True,
                            final_sigmas_type="sigma_min"), 20),
    ("sigma-min-20", dict(solver_order=3, final_sigmas_type="sigma_min"), 20),
    ("sigma-min-8-sde", dict(solver_order=3, final_sigmas_type="sigma_min", algorithm_type="sde-dpmsolver++"), 8),
    ("karras", dict(solver_order=3, use_karras_sigmas=True), 10),
    ("karras-sde-v", dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++",
                          prediction_type="v_prediction"), 16),
    ("leading-offset", dict(timestep_spacing="leading", steps_offset=1), 10),
    ("trailing", dict(solver_order=3, timestep_spacing="trailing"), 10),
    ("heun", dict(solver_type="heun"), 10),
    ("heun-sde", dict(solver_type="heun", algorithm_type="sde-dpmsolver++"), 10),
    ("zero-snr", dict(solver_order=3, rescale_betas_zero_snr=True), 10),
    ("1-step", dict(solver_order=3), 1),
    ("3-steps", dict(solver_order=3), 3),
    ("50-steps", dict(solver_order=3), 50),
    ("rdt-like", dict(num_train_timesteps=1000, prediction_type="sample"), 5),
]


@torch.no_grad()
def dpm_steps_against_diffusers(scheduler, schedule, denoiser, shape=(2, 8, 3)):
    """Max |schedule step − scheduler.step| over a trajectory (both fed the scheduler's states)."""
    g, g_ref, g_ours = (torch.Generator().manual_seed(s) for s in (0, 1, 1))
    x = torch.randn(shape, generator=g)
    cond = torch.randn(shape[0], 4, generator=g)
    x0s, worst = None, 0.0
    for k, t in enumerate(scheduler.timesteps):
        out = denoiser(x, t.expand(shape[0]), cond)
        ref = scheduler.step(out, t, x, generator=g_ref).prev_sample
        rows = torch.full((shape[0],), k, dtype=torch.long)
        x0 = schedule.predict_x0(x, rows, out)[:, None]
        x0s = x0 if x0s is None else torch.cat([x0, x0s], dim=1)[:, : schedule.order]
        z = torch.randn(shape, generator=g_ours) if bool(schedule.draws_noise[k]) else torch.zeros(shape)
        ours = schedule.step_from_x0(x, rows, x0s) + schedule.noise_std[k] * z
        assert torch.allclose(ours, ref, atol=2e-6, rtol=1e-6), (k, int(t), (ours - ref).abs().max())
        worst = max(worst, float((ours - ref).abs().max()))
        x = ref
    return worst


@pytest.mark.parametrize("name,overrides,steps", DPM_GRID + DPM_TOGGLES, ids=[c[0] for c in DPM_GRID + DPM_TOGGLES])
def test_dpm_step_matches_scheduler_step(name, overrides, steps):
    scheduler = dp_dpm(**overrides)
    schedule = make_schedule(scheduler, steps)
    assert isinstance(schedule, MultistepSchedule)
    assert schedule.num_steps == len(scheduler.timesteps) == steps
    assert schedule.order == int(schedule.orders.max()) <= overrides.get("solver_order", 2)
    sde = overrides.get("algorithm_type") == "sde-dpmsolver++"
    assert bool(schedule.draws_noise.all()) == sde
    if sde:  # the SDE solver's noise is the DDPM posterior's, the scale the convergence test uses
        assert torch.allclose(schedule.noise_std**2, schedule.variance, rtol=1e-3, atol=1e-7)
    dpm_steps_against_diffusers(scheduler, schedule, CleanDenoiser(scheduler))


def test_dpm_orders_follow_diffusers_warm_up_and_final_steps():
    assert make_schedule(dp_dpm(solver_order=3), 10).orders.tolist() == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert make_schedule(dp_dpm(solver_order=3, lower_order_final=False), 10).orders.tolist()[-2:] == [3, 1]
    assert make_schedule(dp_dpm(solver_order=3, final_sigmas_type="sigma_min"), 20).orders.tolist()[-1] == 3
    assert make_schedule(dp_dpm(solver_order=2), 2).order == 1  # warm-up and final step: one-step throughout


def test_dpm_x0_drive_is_every_step_at_once():
    """``x0_drive`` (all steps' predictions fixed) equals ``step_from_x0`` − ``a_k x_k`` step by step."""
    schedule = make_schedule(dp_dpm(solver_order=3), 10)
    g = torch.Generator().manual_seed(3)
    x0s = torch.randn(2, 10, 8, 3, generator=g)
    x = torch.randn(2, 8, 3, generator=g)
    drive = schedule.x0_drive(x0s)
    for k in range(10):
        rows = torch.full((2,), k, dtype=torch.long)
        history = x0s[:, max(0, k - 2): k + 1].flip(1)  # newest first
        expected = schedule.step_from_x0(x, rows, history) - schedule.linear_coeff()[k] * x
        assert torch.allclose(drive[:, k], expected, atol=1e-6)


def test_dpm_one_step_consumers_refuse_higher_orders():
    """Order 1 is a one-step schedule (step_mean works); order 2 refuses step_mean and the one-step consumers
    (the captured loop, the Jacobians)."""
    first = make_schedule(dp_dpm(solver_order=1), 10)
    x, out = torch.randn(2, 8, 3), torch.randn(2, 8, 3)
    rows = torch.full((2,), 4, dtype=torch.long)
    x0 = first.predict_x0(x, rows, out)[:, None]
    assert torch.equal(first.step_mean(x, rows, out), first.step_from_x0(x, rows, x0))
    assert torch.allclose(first.predict_x0(x, rows, first.output_for_x0(x, rows, out)), out, atol=1e-5)
    require_single_step(first, "picard_sample")
    require_single_step(make_schedule(dp_ddpm(), 10), "picard_sample")
    second = make_schedule(dp_dpm(solver_order=2), 10)
    with pytest.raises(ValueError, match="not yet: picard_sample on a multistep schedule"):
        require_single_step(second, "picard_sample")
    with pytest.raises(ValueError, match="not yet"):
        second.step_mean(x, rows, out)


@pytest.mark.filterwarnings("ignore:.*algorithm_type.*deprecated:FutureWarning")
@pytest.mark.parametrize("overrides,match", [
    (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type 'dpmsolver'"),
    (dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type 'sde-dpmsolver'"),
    (dict(thresholding=True), "thresholding"),
    (dict(use_lu_lambdas=True), "use_lu_lambdas"),
    (dict(use_exponential_sigmas=True), "use_exponential_sigmas"),
    (dict(variance_type="learned_range"), "variance_type"),
    (dict(prediction_type="flow_prediction"), "prediction_type"),
    (dict(solver_order=4), "solver_order"),
])
def test_dpm_unsupported_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(dp_dpm(**overrides), 10)


def test_dpm_degenerate_step_counts_raise():
    with pytest.raises(ValueError, match="repeats a noise level"):  # 100 of 100 training steps: diffusers gives NaN
        make_schedule(dp_dpm(), 100)
    with pytest.raises(ValueError, match="eta"):
        make_schedule(dp_dpm(), 10, eta=0.5)


def test_build_dpm_scheduler_from_diffusion_policy_config():
    cfg = {"_target_": "diffusers.DPMSolverMultistepScheduler", "num_train_timesteps": 100,
           "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2",
           "prediction_type": "epsilon", "solver_order": 3}
    scheduler = build_scheduler(cfg)
    assert isinstance(scheduler, DPMSolverMultistepScheduler) and scheduler.config.solver_order == 3
    long_name = {**cfg, "_target_": "diffusers.schedulers.scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler"}
    assert isinstance(build_scheduler(long_name), DPMSolverMultistepScheduler)
    with pytest.raises(ValueError, match="clip_sample"):
        build_scheduler({**cfg, "clip_sample": True})
    with pytest.raises(ValueError, match="thresholding"):
        build_scheduler({**cfg, "thresholding": True})


def test_dpm_from_a_ddpm_scheduler_keeps_betas_and_prediction_type():
    twin = dpm_from(dp_ddpm(prediction_type="v_prediction"), solver_order=3)
    assert isinstance(twin, DPMSolverMultistepScheduler)
    assert twin.config.solver_order == 3 and twin.config.prediction_type == "v_prediction"
    assert torch.equal(twin.alphas_cumprod, dp_ddpm().alphas_cumprod)
    ddim = ddim_from(dp_dpm(prediction_type="sample"))  # a DPM-configured policy asked for DDIM: no clipping
    assert not ddim.config.clip_sample and ddim.config.prediction_type == "sample"


def test_dpm_schedule_moves_every_tensor_once_per_device():
    schedule = make_schedule(dp_dpm(solver_order=3, algorithm_type="sde-dpmsolver++"), 10)
    assert schedule.to("cpu") is schedule
    moved = schedule.to("meta")
    assert isinstance(moved, MultistepSchedule) and moved is schedule.to("meta")
    assert all(getattr(moved, name).device.type == "meta" for name in MultistepSchedule._TENSORS)
    assert make_schedule(dp_ddpm(), 10).order == 1 and make_schedule(dp_ddim(), 10).order == 1


def test_dpm_twin_of_a_cosine_model_clips_lambda():
    # diffusers documents lambda_min_clipped as critical for cosine schedules (the shipped-policy test shows why)
    assert dpm_from(dp_ddpm()).config.lambda_min_clipped == -5.1  # DiffusionPolicy's squaredcos_cap_v2
    linear = dpm_from(dp_ddpm(beta_schedule="linear"))
    assert linear.config.lambda_min_clipped == float("-inf")  # diffusers' default where it is not needed
