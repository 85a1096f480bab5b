"""The batched step equals the diffusers scheduler's own ``step`` at every timestep."""

from __future__ import annotations

import pytest
import torch
from conftest import dp_ddim, dp_ddpm
from diffusers import DDPMScheduler

from para_policy.schedule import build_scheduler, make_schedule

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
