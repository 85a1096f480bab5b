"""picard_sample(jacobian=...) and mean_step_jacobians, against the sequential loop and closed forms."""

from __future__ import annotations

import pytest
import torch
from conftest import dp_ddim, dp_ddpm

from para_policy.samplers import draw_noise, mean_step_jacobians, picard_sample, sequential_sample
from para_policy.samplers.solves import linear_recurrence, matrix_recurrence
from para_policy.schedule import make_schedule

T, D = 8, 3
N = T * D
CONFIGS = [("ddpm-100", dp_ddpm, 100), ("ddim-10", dp_ddim, 10)]


def mixing_denoiser(schedule, seed: int = 2):
    """x0 = Λ_k x + target with a full (N, N) Λ_k per step (entries mixed): linear, so its Jacobians are known."""
    g = torch.Generator().manual_seed(seed)
    target = 0.4 * torch.rand(1, T, D, generator=g) - 0.2
    S = schedule.num_steps
    lam = 0.8 * torch.linspace(0.05, 0.9, S).view(S, 1, 1) * torch.eye(N) + 0.03 * torch.randn(S, N, N, generator=g)
    step_of = {int(t): k for k, t in enumerate(schedule.timesteps)}

    def denoiser(x, t, condition=None):
        k = torch.tensor([step_of[int(v)] for v in t])
        x0 = (lam[k] @ x.reshape(-1, N, 1)).view_as(x) + target
        return schedule.output_for_x0(x, k, x0)

    return denoiser, lam


def x0_coeff(schedule) -> torch.Tensor:
    """``c_k`` (S,): the coefficient of x0 in step k's mean, ``step_mean(0, k, output for x0 = 1)``."""
    S = schedule.num_steps
    k = torch.arange(S)
    zeros, ones = torch.zeros(S, 1, 1), torch.ones(S, 1, 1)
    return schedule.step_mean(zeros, k, schedule.output_for_x0(zeros, k, ones)).view(S)


@pytest.mark.parametrize("name,make,steps", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_mean_step_jacobians_of_a_linear_denoiser_are_the_closed_form(name, make, steps):
    schedule = make_schedule(make(clip_sample=False), steps)  # no clipping: x0 really linear
    denoiser, lam = mixing_denoiser(schedule)
    x_T, noise = draw_noise(schedule, (2, T, D), torch.Generator().manual_seed(4))
    jac = mean_step_jacobians(denoiser, schedule, x_T, noise)
    expected = x0_coeff(schedule).view(-1, 1, 1) * lam  # g_k(x) = c_k (Λ_k x + target)
    assert jac.shape == (steps, N, N) and not jac.requires_grad
    torch.testing.assert_close(jac, expected, atol=1e-5, rtol=1e-4)


def test_the_exact_jacobian_solves_a_mixing_linear_denoiser_in_two_rounds():
    """With each step's map linear and its Jacobian given, one round solves the whole window and the
    next confirms it; the secant's one number per step cannot follow the mixing."""
    schedule = make_schedule(dp_ddpm(clip_sample=False), 100)
    denoiser, lam = mixing_denoiser(schedule)
    x_T, noise = draw_noise(schedule, (1, T, D), torch.Generator().manual_seed(5))
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise)
    jac = x0_coeff(schedule).view(-1, 1, 1) * lam
    ours, stats = picard_sample(denoiser, schedule, x_T, noise, window=100, tolerance=1e-3, linear_solve=True,
                                secant=True, jacobian=jac)
    assert stats.rounds == 2 and (ours - ref).abs().max() < 1e-4
    _, sec = picard_sample(denoiser, schedule, x_T, noise, window=100, tolerance=1e-3, linear_solve=True,
                           secant=True)
    assert sec.rounds > 3


@pytest.mark.parametrize("name,make,steps", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("window", [4, 100])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("secant", [False, True])
def test_picard_tolerance_zero_with_any_jacobian_equals_sequential(denoiser, name, make, steps, window, masked,
                                                                    secant):
    batch = 3
    schedule = make_schedule(make(), steps)
    cond = torch.randn(batch, 4, generator=torch.Generator().manual_seed(3))
    inpaint = None
    if masked:
        mask = torch.zeros(batch, T, 3, dtype=torch.bool)
        mask[:, :2, 1:] = True
        inpaint = (torch.randn(batch, T, 3, generator=torch.Generator().manual_seed(7)), mask)
    x_T, noise = draw_noise(schedule, (batch, T, 3), torch.Generator().manual_seed(5))
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=inpaint)
    wrong = 0.2 * torch.randn(steps, N, N, generator=torch.Generator().manual_seed(9))  # any linearization
    ours, stats = picard_sample(denoiser, schedule, x_T, noise, window=window, tolerance=0.0, condition=cond,
                                inpaint=inpaint, linear_solve=True, secant=secant, jacobian=wrong)
    assert (ours - ref).abs().max() < 5e-5
    assert stats.all_converged and stats.rounds <= steps


def test_a_zero_jacobian_is_the_linear_solve(denoiser):
    schedule = make_schedule(dp_ddpm(), 100)
    x_T, noise = draw_noise(schedule, (2, T, 3), torch.Generator().manual_seed(6))
    plain, ps = picard_sample(denoiser, schedule, x_T, noise, window=32, tolerance=0.1, linear_solve=True)
    ours, os_ = picard_sample(denoiser, schedule, x_T, noise, window=32, tolerance=0.1, linear_solve=True,
                              jacobian=torch.zeros(100, N, N))
    assert os_.rounds == ps.rounds and os_.model_evals == ps.model_evals
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=0)


def test_matrix_recurrence_with_scaled_identities_is_the_linear_recurrence():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 5, generator=g)
    x0, drive = torch.randn(2, T, D, generator=g), torch.randn(2, 5, T, D, generator=g)
    mats = a.view(2, 5, 1, 1) * torch.eye(N)
    torch.testing.assert_close(matrix_recurrence(mats, x0, drive), linear_recurrence(a, x0, drive))


def test_bad_jacobians_are_refused(denoiser):
    schedule = make_schedule(dp_ddim(), 10)
    x_T, noise = draw_noise(schedule, (1, T, 3), torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="jacobian needs linear_solve=True"):
        picard_sample(denoiser, schedule, x_T, noise, jacobian=torch.zeros(10, N, N))
    with pytest.raises(ValueError, match=r"jacobian must have shape \(S, T\*D, T\*D\) = \(10, 24, 24\)"):
        picard_sample(denoiser, schedule, x_T, noise, linear_solve=True, jacobian=torch.zeros(10, 24))
    soft = torch.zeros(1, T, 3)
    soft[:, :3] = 0.5
    with pytest.raises(ValueError, match="soft inpaint weights"):
        picard_sample(denoiser, schedule, x_T, noise, linear_solve=True, jacobian=torch.zeros(10, N, N),
                      inpaint=(torch.zeros(1, T, 3), soft))
