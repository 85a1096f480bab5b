"""Picard sampling against the sequential loop, and the sequential loop against DiffusionPolicy's."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CleanDenoiser, MLPDenoiser, dp_ddim, dp_ddpm, dp_dpm

from para_policy.samplers import draw_noise, picard_sample, sequential_sample
from para_policy.schedule import make_schedule

SHAPE_T, SHAPE_D = 8, 3


def diffusion_policy_loop(denoiser, scheduler, steps, shape, seed, condition=None, inpaint=None, impose=None):
    """DiffusionPolicy's ``conditional_sample`` written out with the diffusers scheduler.

    ``impose(trajectory, k)`` instead of ``inpaint``: the trajectory before step ``k`` (None: the end).
    Returns the sample and the states after every step (x_1 … x_S).
    """
    if inpaint is not None:
        def impose(trajectory, k):
            trajectory[inpaint[1]] = inpaint[0][inpaint[1]]
            return trajectory
    g = torch.Generator().manual_seed(seed)
    trajectory = torch.randn(shape, generator=g)
    scheduler.set_timesteps(steps)
    states = []
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            if impose is not None:
                trajectory = impose(trajectory, k)
            out = denoiser(trajectory, t.expand(shape[0]), condition)
            trajectory = scheduler.step(out, t, trajectory, generator=g).prev_sample
            states.append(trajectory.clone())
    if impose is not None:
        trajectory = impose(trajectory, None)
    return trajectory, torch.stack(states, dim=1)


def make_inpaint(batch: int):
    data = torch.randn(batch, SHAPE_T, SHAPE_D, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(batch, SHAPE_T, SHAPE_D, dtype=torch.bool)
    mask[:, :2, 1:] = True  # like DiffusionPolicy's first n_obs_steps observation entries
    return data, mask


CONFIGS = [("ddpm-100", dp_ddpm, 100), ("ddim-10", dp_ddim, 10)]


@pytest.mark.parametrize("name,make,steps", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_sequential_reproduces_diffusion_policy(denoiser, name, make, steps, batch, masked):
    shape = (batch, SHAPE_T, SHAPE_D)
    cond = torch.randn(batch, 4, generator=torch.Generator().manual_seed(3))
    inpaint = make_inpaint(batch) if masked else None
    ref, _ = diffusion_policy_loop(denoiser, make(), steps, shape, seed=11, condition=cond, inpaint=inpaint)
    schedule = make_schedule(make(), steps)
    x_T, noise = draw_noise(schedule, shape, torch.Generator().manual_seed(11))
    ours, stats = sequential_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=inpaint)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert stats.rounds == steps


@pytest.mark.parametrize("name,make,steps", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("window", [1, 4, 100])
@pytest.mark.parametrize("linear_solve", [False, True, "secant"])
def test_picard_tolerance_zero_equals_sequential(denoiser, name, make, steps, batch, masked, window, linear_solve):
    shape = (batch, SHAPE_T, SHAPE_D)
    cond = torch.randn(batch, 4, generator=torch.Generator().manual_seed(3))
    inpaint = make_inpaint(batch) if masked else None
    schedule = make_schedule(make(), steps)
    x_T, noise = draw_noise(schedule, shape, torch.Generator().manual_seed(5))
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=inpaint)
    ours, stats = picard_sample(denoiser, schedule, x_T, noise, window=window, tolerance=0.0,
                                condition=cond, inpaint=inpaint, linear_solve=bool(linear_solve),
                                secant=linear_solve == "secant")
    # float32 roundoff only: a batched model call rounds differently from a single-row one
    # (other kernels), and DDIM-10's deterministic steps amplify it (1.3e-5 measured on one
    # machine, 2e-7 on another); a wrong step shows up as 1e-2 or more.
    assert (ours - ref).abs().max() < 5e-5
    assert stats.all_converged
    assert stats.rounds <= steps
    if window == 1:
        assert stats.rounds == steps
        assert stats.model_evals == steps * batch


@pytest.mark.parametrize("tolerance", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("window", [4, 16, 100])
def test_picard_with_tolerance_is_close_and_takes_fewer_rounds(denoiser, tolerance, window):
    schedule = make_schedule(dp_ddpm(), 100)
    shape = (2, SHAPE_T, SHAPE_D)
    cond = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    x_T, noise = draw_noise(schedule, shape, torch.Generator().manual_seed(9))
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond)
    ours, stats = picard_sample(denoiser, schedule, x_T, noise, window=window, tolerance=tolerance,
                                condition=cond)
    assert stats.all_converged
    assert stats.rounds < 100
    # a converged point moved by at most tolerance·σ in its last round; errors stay of that order
    assert (ours - ref).abs().max() < 20 * tolerance * math.sqrt(float(schedule.variance.max()))


def test_batch_takes_no_more_rounds_than_its_slowest_member():
    denoiser = MLPDenoiser(seed=2)
    schedule = make_schedule(dp_ddpm(), 100)
    shape = (4, SHAPE_T, SHAPE_D)
    cond = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 3
    x_T, noise = draw_noise(schedule, shape, torch.Generator().manual_seed(2))
    batch, stats = picard_sample(denoiser, schedule, x_T, noise, window=16, tolerance=0.1, condition=cond)
    alone_rounds = []
    for b in range(4):
        alone, s = picard_sample(denoiser, schedule, x_T[b:b + 1], noise[b:b + 1], window=16, tolerance=0.1,
                                 condition=cond[b:b + 1])
        alone_rounds.append(s.rounds)
        assert torch.allclose(batch[b:b + 1], alone, atol=1e-5)
        assert int(stats.rounds_per_sample[b]) == s.rounds  # its own window, undisturbed by the others
    assert stats.rounds == max(alone_rounds)
    # waiting for the worst sample never helps
    _, shared = picard_sample(denoiser, schedule, x_T, noise, window=16, tolerance=0.1, condition=cond,
                              per_sample_windows=False)
    assert shared.rounds >= stats.rounds
    assert shared.model_evals >= stats.model_evals


def test_warm_start_from_the_solution_converges_at_once(denoiser):
    """Given the exact trajectory as init, each round confirms a whole window."""
    schedule = make_schedule(dp_ddpm(), 100)
    shape = (1, SHAPE_T, SHAPE_D)
    cond = torch.randn(1, 4)
    ref, states = diffusion_policy_loop(denoiser, dp_ddpm(), 100, shape, seed=4, condition=cond)
    x_T, noise = draw_noise(schedule, shape, torch.Generator().manual_seed(4))
    ours, stats = picard_sample(denoiser, schedule, x_T, noise, window=25, tolerance=0.05, condition=cond,
                                init=states)
    assert stats.rounds <= 100 // 25 + 1
    assert torch.allclose(ours, ref, atol=1e-5)


def test_max_iterations_returns_flagged_iterate(denoiser):
    schedule = make_schedule(dp_ddpm(), 100)
    x_T, noise = draw_noise(schedule, (2, SHAPE_T, SHAPE_D), torch.Generator().manual_seed(0))
    out, stats = picard_sample(denoiser, schedule, x_T, noise, window=8, tolerance=0.0, max_iterations=3)
    assert stats.rounds == 3
    assert not stats.converged.any()
    assert torch.isfinite(out).all()


def test_bad_arguments_raise(denoiser):
    schedule = make_schedule(dp_ddpm(), 10)
    x_T, noise = draw_noise(schedule, (2, SHAPE_T, SHAPE_D), torch.Generator().manual_seed(0))
    cond = torch.randn(2, 4)
    with pytest.raises(ValueError, match="tolerance"):
        picard_sample(denoiser, schedule, x_T, noise, tolerance=-1)
    with pytest.raises(ValueError, match="window"):
        picard_sample(denoiser, schedule, x_T, noise, window=0)
    with pytest.raises(ValueError, match="max_iterations"):
        picard_sample(denoiser, schedule, x_T, noise, max_iterations=0)
    with pytest.raises(ValueError, match="noise must have shape"):
        picard_sample(denoiser, schedule, x_T, noise[:, :5])
    with pytest.raises(ValueError, match="x_T must have shape"):
        picard_sample(denoiser, schedule, x_T[0], noise)
    with pytest.raises(ValueError, match="noise is required"):
        sequential_sample(denoiser, schedule, x_T, None)
    bad = cond.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="condition contains NaN"):
        picard_sample(denoiser, schedule, x_T, noise, condition=bad)
    with pytest.raises(ValueError, match="batch size"):
        sequential_sample(denoiser, schedule, x_T, noise, condition=cond[:1])
    with pytest.raises(ValueError, match="init must have shape"):
        picard_sample(denoiser, schedule, x_T, noise, init=torch.zeros(2, 3, SHAPE_T, SHAPE_D))


def test_warm_start_keeps_exactness_and_saves_rounds(denoiser):
    from para_policy.samplers import warm_start_init

    schedule = make_schedule(dp_ddpm(), 100)
    shape = (2, SHAPE_T, SHAPE_D)
    cond = torch.randn(2, 4, generator=torch.Generator().manual_seed(8))
    x_T, noise = draw_noise(schedule, shape, torch.Generator().manual_seed(8))
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond)
    # any guess: tolerance 0 still gives the sequential sample
    junk = warm_start_init(schedule, torch.randn(shape), x_T, noise)
    exact, _ = picard_sample(denoiser, schedule, x_T, noise, window=16, tolerance=0.0, condition=cond, init=junk)
    assert (exact - ref).abs().max() < 1e-5
    # a good guess of the clean trajectory converges in fewer rounds than a cold start
    init = warm_start_init(schedule, ref + 0.01 * torch.randn(shape, generator=torch.Generator()), x_T, noise)
    for tolerance in (0.1, 0.01):
        cold_out, cold = picard_sample(denoiser, schedule, x_T, noise, window=16, tolerance=tolerance, condition=cond)
        warm_out, warm = picard_sample(denoiser, schedule, x_T, noise, window=16, tolerance=tolerance,
                                       condition=cond, init=init)
        assert warm.rounds < cold.rounds
    # at a tight tolerance the warm result is as faithful as the cold one
    assert (warm_out - ref).abs().max() < 2 * max((cold_out - ref).abs().max(), 1e-3)


def test_deadline_returns_flagged_iterate(denoiser):
    import time

    schedule = make_schedule(dp_ddpm(), 100)
    x_T, noise = draw_noise(schedule, (1, SHAPE_T, SHAPE_D), torch.Generator().manual_seed(0))
    out, stats = picard_sample(denoiser, schedule, x_T, noise, window=8, deadline_at=time.perf_counter())
    assert stats.rounds == 1 and stats.deadline_hit and not stats.converged.any()  # one round always runs
    # what it returns is the clean sample predicted from x_T at the first step (closed form), not x_T or a noisy x_k
    with torch.inference_mode():
        k0 = torch.zeros(1, dtype=torch.long)
        x0 = schedule.predict_x0(x_T, k0, denoiser(x_T, schedule.timesteps[k0], None))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)
    assert out.abs().max() <= schedule.clip_sample_range + 1e-6
    # a deadline after some rounds: the estimate at the first unconverged step, from its final input
    capped, st = picard_sample(denoiser, schedule, x_T, noise, window=8, tolerance=0.0, max_iterations=5)
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise)
    assert not st.all_converged and (capped - x_T).abs().max() > 0.1 and torch.isfinite(capped).all()
    assert (capped - ref).abs().mean() < (x_T - ref).abs().mean()
    # a warm start spans the whole trajectory: a sample stopped after one round returns its iterate's end,
    # which from a guess at the answer is (nearly) the answer, where the first step's estimate is not
    from para_policy.samplers import warm_start_init

    init = warm_start_init(schedule, ref, x_T, noise)
    warm, st = picard_sample(denoiser, schedule, x_T, noise, window=8, init=init, deadline_at=time.perf_counter())
    assert st.rounds == 1 and not st.all_converged
    assert (warm - ref).abs().max() < 0.1 * (out - ref).abs().max()
    out, stats = picard_sample(denoiser, schedule, x_T, noise, window=8, deadline_at=time.perf_counter() + 60)
    assert stats.all_converged and not stats.deadline_hit


def test_init_rows_warm_starts_some_samples_and_leaves_the_others_cold(denoiser):
    """A batch mixing warm and cold rows: each row is exactly its solo run (warm or cold)."""
    from para_policy.samplers import taa_sample, warm_start_init

    schedule = make_schedule(dp_ddpm(), 100)
    shape = (3, SHAPE_T, SHAPE_D)
    cond = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    x_T, noise = draw_noise(schedule, shape, torch.Generator().manual_seed(3))
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond)
    init = warm_start_init(schedule, ref + 0.01 * torch.randn(shape, generator=torch.Generator()), x_T, noise)
    rows = torch.tensor([True, False, True])
    for fn in (picard_sample, taa_sample):
        batch, stats = fn(denoiser, schedule, x_T, noise, window=16, tolerance=0.1, condition=cond, init=init,
                          init_rows=rows)
        for b in range(3):
            solo_init = init[b:b + 1] if rows[b] else None
            alone, s = fn(denoiser, schedule, x_T[b:b + 1], noise[b:b + 1], window=16, tolerance=0.1,
                          condition=cond[b:b + 1], init=solo_init)
            assert torch.allclose(batch[b:b + 1], alone, atol=1e-5)
            assert int(stats.rounds_per_sample[b]) == s.rounds
        assert stats.rounds_per_sample[1] > max(stats.rounds_per_sample[0], stats.rounds_per_sample[2])
    with pytest.raises(ValueError, match="init_rows must be a bool tensor"):
        picard_sample(denoiser, schedule, x_T, noise, init=init, init_rows=torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="init_rows needs init"):
        picard_sample(denoiser, schedule, x_T, noise, init_rows=rows)


@pytest.mark.parametrize("make,steps,eta", [(dp_ddpm, 100, 0.0), (dp_ddpm, 10, 0.0), (dp_ddim, 16, 0.0),
                                            (dp_ddim, 10, 0.7)])
def test_linear_coeff_is_the_x_coefficient_of_a_step_with_x0_fixed(make, steps, eta):
    schedule = make_schedule(make(), steps, eta=eta)
    g = torch.Generator().manual_seed(0)
    S = schedule.num_steps
    x, delta = torch.randn(S, SHAPE_T, SHAPE_D, generator=g), torch.randn(S, SHAPE_T, SHAPE_D, generator=g)
    x0 = torch.rand(S, SHAPE_T, SHAPE_D, generator=g) - 0.5  # inside the clip range
    k = torch.arange(S)
    step = lambda y: schedule.step_mean(y, k, schedule.output_for_x0(y, k, x0))  # noqa: E731
    expected = schedule.linear_coeff().view(S, 1, 1) * delta
    assert torch.allclose(step(x + delta) - step(x), expected, atol=1e-4)


def test_linear_recurrence_matches_a_loop():
    from para_policy.samplers.solves import keep_factors, linear_recurrence

    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 6, generator=g)
    a[1, 3] = 0.0  # a step that forgets its input (DDIM into alpha = 1)
    x0, drive = torch.randn(2, 3, 2, generator=g), torch.randn(2, 6, 3, 2, generator=g)
    x, expected = x0, []
    for w in range(6):
        x = a[:, w].view(2, 1, 1) * x + drive[:, w]
        expected.append(x)
    assert torch.allclose(linear_recurrence(a, x0, drive), torch.stack(expected, dim=1), atol=1e-6)
    keep = torch.tensor([0.0, 0.3, 1.0])[torch.randint(0, 3, (2, 3, 2), generator=g)]  # per-entry factors
    x, expected = x0, []
    for w in range(6):
        x = a[:, w].view(2, 1, 1) * keep * x + drive[:, w]
        expected.append(x)
    assert torch.allclose(linear_recurrence(a, x0, drive, keep_factors(keep, keep.dtype)),
                          torch.stack(expected, dim=1), atol=1e-6)


def test_linear_solve_is_exact_in_one_round_when_x0_does_not_depend_on_x():
    """A denoiser whose clean-sample prediction ignores x: the whole window is exact after one
    round (the next only confirms it), while plain Picard needs many rounds."""
    schedule = make_schedule(dp_ddpm(), 100)
    target = torch.rand(1, SHAPE_T, SHAPE_D, generator=torch.Generator().manual_seed(2)) - 0.5
    step_of = {int(t): k for k, t in enumerate(schedule.timesteps)}

    def oracle(x, t, condition=None):
        k = torch.tensor([step_of[int(v)] for v in t])
        return schedule.output_for_x0(x, k, target.expand_as(x))

    x_T, noise = draw_noise(schedule, (1, SHAPE_T, SHAPE_D), torch.Generator().manual_seed(2))
    ref, _ = sequential_sample(oracle, schedule, x_T, noise)
    ours, lin = picard_sample(oracle, schedule, x_T, noise, window=100, tolerance=1e-3, linear_solve=True)
    assert lin.rounds == 2 and (ours - ref).abs().max() < 1e-5
    _, plain = picard_sample(oracle, schedule, x_T, noise, window=100, tolerance=1e-3)
    assert plain.rounds > 5


def test_secant_solves_a_linear_denoiser_in_three_rounds():
    """A clean-sample prediction linear in x (x0 = λ_k x + target, the closed form for Gaussian
    data): the secant slope is exact from the second round on, so that round solves the whole
    window and the third confirms it; the linear solve alone leaves λ_k x to iterate on."""
    schedule = make_schedule(dp_ddpm(clip_sample=False), 100)  # no clipping: x0 really linear
    target = 0.4 * torch.rand(1, SHAPE_T, SHAPE_D, generator=torch.Generator().manual_seed(2)) - 0.2
    step_of = {int(t): k for k, t in enumerate(schedule.timesteps)}
    slope = torch.linspace(0.05, 0.9, 100)  # x0 follows x more closely as the noise falls

    def linear(x, t, condition=None):
        k = torch.tensor([step_of[int(v)] for v in t])
        return schedule.output_for_x0(x, k, slope[k].view(-1, 1, 1) * x + target)

    x_T, noise = draw_noise(schedule, (1, SHAPE_T, SHAPE_D), torch.Generator().manual_seed(4))
    ref, _ = sequential_sample(linear, schedule, x_T, noise)
    ours, sec = picard_sample(linear, schedule, x_T, noise, window=100, tolerance=1e-3, linear_solve=True,
                              secant=True)
    assert sec.rounds == 3 and (ours - ref).abs().max() < 1e-4
    _, lin = picard_sample(linear, schedule, x_T, noise, window=100, tolerance=1e-3, linear_solve=True)
    assert lin.rounds > 6
    with pytest.raises(ValueError, match="secant=True needs linear_solve=True"):
        picard_sample(linear, schedule, x_T, noise, secant=True)


@pytest.mark.parametrize("name,make,steps,eta", [(*c, 0.0) for c in CONFIGS] + [("ddim-16-eta", dp_ddim, 16, 0.7)],
                         ids=[c[0] for c in CONFIGS] + ["ddim-16-eta0.7"])
def test_warm_start_init_is_the_step_recurrence_with_x0_fixed(name, make, steps, eta):
    """The batched construction against the recurrence written out step by step."""
    from para_policy.samplers import warm_start_init

    schedule = make_schedule(make(), steps, eta=eta)
    shape = (2, SHAPE_T, SHAPE_D)
    x_T, noise = draw_noise(schedule, shape, torch.Generator().manual_seed(6))
    guess = 1.5 * torch.rand(shape, generator=torch.Generator().manual_seed(7)) - 0.75
    x, expected = x_T, []
    for k in range(steps):
        rows = torch.full((2,), k)
        x = schedule.step_mean(x, rows, schedule.output_for_x0(x, rows, guess)) + schedule.noise_std[k] * noise[:, k]
        expected.append(x)
    ours = warm_start_init(schedule, guess, x_T, noise)
    assert ours.shape == (2, steps, SHAPE_T, SHAPE_D)
    assert torch.allclose(ours, torch.stack(expected, dim=1), atol=1e-5)


@pytest.mark.parametrize("linear_solve", [False, True])
def test_known_entries_do_not_hold_back_convergence(denoiser, linear_solve):
    """Known entries are re-imposed before every model call, so what a step writes there never matters:
    with a tolerance, an inpainted problem converges like the free problem (< 60 of 100 rounds), not in S,
    and stays within the tolerance's reach of the sequential sample (the reference)."""
    schedule = make_schedule(dp_ddpm(), 100)
    shape = (2, SHAPE_T, SHAPE_D)
    cond = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    data, mask = make_inpaint(2)
    data = data * 5  # far from what the steps write there: their change never settles
    x_T, noise = draw_noise(schedule, shape, torch.Generator().manual_seed(9))
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=(data, mask))
    ours, stats = picard_sample(denoiser, schedule, x_T, noise, window=100, tolerance=0.1, condition=cond,
                                inpaint=(data, mask), linear_solve=linear_solve, secant=linear_solve)
    _, free_only = picard_sample(denoiser, schedule, x_T, noise, window=100, tolerance=0.1, condition=cond,
                                 linear_solve=linear_solve, secant=linear_solve)
    assert stats.all_converged and stats.rounds < 60
    assert torch.equal(ours[mask], data[mask])
    assert (ours - ref)[~mask].abs().max() < 0.1
    assert free_only.rounds < 60


def test_diffuse_known_is_the_forward_process_at_each_steps_level():
    """Closed form: entry e at step k is sqrt(abar_{t_k}) d + sqrt(1 - abar_{t_k}) x_T, clean at the end."""
    from para_policy.samplers import diffuse_known

    sched = dp_ddim()
    schedule = make_schedule(sched, 10)
    data, mask = make_inpaint(2)
    x_T = torch.randn(2, SHAPE_T, SHAPE_D, generator=torch.Generator().manual_seed(5))
    per_step = diffuse_known(schedule, data, mask, x_T)
    assert per_step.shape == (2, 11, SHAPE_T, SHAPE_D)
    sched.set_timesteps(10)
    for k, t in enumerate(sched.timesteps):
        abar = sched.alphas_cumprod[t]
        expected = torch.where(mask, abar.sqrt() * data + (1 - abar).sqrt() * x_T, data)
        assert torch.allclose(per_step[:, k], expected, atol=1e-6), k
    assert torch.equal(per_step[:, 10], data)


def _per_step_inpaint(make, steps: int, batch: int, seed: int = 11):
    schedule = make_schedule(make(), steps)
    x_T, noise = draw_noise(schedule, (batch, SHAPE_T, SHAPE_D), torch.Generator().manual_seed(seed))
    data, mask = make_inpaint(batch)
    per_step = torch.randn(batch, steps + 1, SHAPE_T, SHAPE_D, generator=torch.Generator().manual_seed(9))
    return schedule, x_T, noise, (per_step, mask)


@pytest.mark.parametrize("name,make,steps", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_sequential_imposes_each_steps_known_values(denoiser, name, make, steps):
    """Per-step data against DiffusionPolicy's loop written out, imposing data[:, k] before step k."""
    schedule, x_T, noise, (per_step, mask) = _per_step_inpaint(make, steps, batch=2)
    cond = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))

    def impose(trajectory, k):
        trajectory[mask] = per_step[:, steps if k is None else k][mask]
        return trajectory

    ref, _ = diffusion_policy_loop(denoiser, make(), steps, x_T.shape, seed=11, condition=cond, impose=impose)
    ours, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=(per_step, mask))
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("name,make,steps", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("window,linear_solve", [(4, False), (100, True), (100, "secant")])
def test_picard_tolerance_zero_with_per_step_known_values_equals_sequential(denoiser, name, make, steps,
                                                                            window, linear_solve):
    schedule, x_T, noise, inpaint = _per_step_inpaint(make, steps, batch=3)
    cond = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=inpaint)
    opts = {"linear_solve": bool(linear_solve), "secant": linear_solve == "secant"}
    ours, stats = picard_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=inpaint, window=window,
                                tolerance=0.0, **opts)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert stats.rounds <= steps


def test_per_step_known_values_of_the_wrong_shape_are_refused(denoiser):
    schedule, x_T, noise, (per_step, mask) = _per_step_inpaint(dp_ddim, 10, batch=2)
    with pytest.raises(ValueError, match=r"per step \(2, 11, 8, 3\)"):
        sequential_sample(denoiser, schedule, x_T, noise, inpaint=(per_step[:, :10], mask))


def _soft_weights(batch: int) -> torch.Tensor:
    """Known (1) at positions 1-2, decaying weights after them, free elsewhere: real-time chunking's soft mask."""
    w = torch.zeros(batch, SHAPE_T, SHAPE_D)
    w[:, 1:3] = 1.0
    w[:, 3:7] = torch.tensor([0.8, 0.5, 0.25, 0.05]).view(1, 4, 1)
    return w


@pytest.mark.parametrize("name,make,steps", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_sequential_soft_weights_pull_each_step_and_impose_only_known_entries_on_the_result(denoiser, name, make,
                                                                                             steps):
    """DiffusionPolicy's loop written out: x <- x + w (data - x) before every step, the known entries at the end."""
    schedule = make_schedule(make(), steps)
    x_T, noise = draw_noise(schedule, (2, SHAPE_T, SHAPE_D), torch.Generator().manual_seed(11))
    data, w = make_inpaint(2)[0], _soft_weights(2)
    cond = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))

    def impose(trajectory, k):
        if k is None:
            return torch.where(w == 1, data, trajectory)
        return trajectory + w * (data - trajectory)

    ref, _ = diffusion_policy_loop(denoiser, make(), steps, x_T.shape, seed=11, condition=cond, impose=impose)
    ours, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=(data, w))
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.equal(ours[w == 1], data[w == 1])
    free = w < 1
    assert not torch.allclose(ours[free], data[free])  # the others are the sampler's


@pytest.mark.parametrize("name,make,steps", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("window,linear_solve", [(4, False), (100, True), (100, "secant")])
def test_picard_tolerance_zero_with_soft_weights_equals_sequential(denoiser, name, make, steps, window,
                                                                   linear_solve):
    schedule, x_T, noise, (per_step, _) = _per_step_inpaint(make, steps, batch=3)
    cond = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    for inpaint in ((per_step, _soft_weights(3)), (per_step[:, 0], _soft_weights(3))):
        ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=inpaint)
        ours, stats = picard_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=inpaint, window=window,
                                    tolerance=0.0, linear_solve=bool(linear_solve), secant=linear_solve == "secant")
        assert torch.allclose(ours, ref, atol=1e-5)
        assert stats.rounds <= steps


def test_weights_of_zero_and_one_are_the_bool_mask(denoiser):
    schedule = make_schedule(dp_ddim(), 10)
    x_T, noise = draw_noise(schedule, (2, SHAPE_T, SHAPE_D), torch.Generator().manual_seed(1))
    data, mask = make_inpaint(2)
    hard, _ = sequential_sample(denoiser, schedule, x_T, noise, inpaint=(data, mask))
    soft, _ = sequential_sample(denoiser, schedule, x_T, noise, inpaint=(data, mask.float()))
    assert torch.equal(hard, soft)


@pytest.mark.parametrize("weights,message", [(1.5, r"from 0 to 1.5"), (-0.1, r"from -0.1 to 0"),
                                             (float("nan"), r"float weights in \[0, 1\]")])
def test_soft_weights_outside_zero_one_are_refused(denoiser, weights, message):
    schedule = make_schedule(dp_ddim(), 10)
    x_T, noise = draw_noise(schedule, (1, SHAPE_T, SHAPE_D), torch.Generator().manual_seed(1))
    w = torch.zeros(1, SHAPE_T, SHAPE_D)
    w[0, 0, 0] = weights
    with pytest.raises(ValueError, match=message):
        sequential_sample(denoiser, schedule, x_T, noise, inpaint=(torch.zeros_like(w), w))


DPM_CONFIGS = [
    ("dpm++2-10", dict(solver_order=2), 10),
    ("dpm++3-16", dict(solver_order=3), 16),
    ("sde-dpm++2-10", dict(solver_order=2, algorithm_type="sde-dpmsolver++"), 10),
    ("sde-dpm++3-10-v", dict(solver_order=3, algorithm_type="sde-dpmsolver++", prediction_type="v_prediction"), 10),
    ("dpm++3-8-sample", dict(solver_order=3, prediction_type="sample"), 8),
]
# Spacings (karras, leading, trailing) change the schedule, not the loop: tests/test_schedule.py checks them step by
# step. Over a whole trajectory the random MLP amplifies last-bit differences (karras: up to 9e-6 on some seeds).


@pytest.mark.parametrize("name,overrides,steps", DPM_CONFIGS, ids=[c[0] for c in DPM_CONFIGS])
@pytest.mark.parametrize("masked", [False, True])
def test_sequential_reproduces_diffusion_policy_on_dpm_solver(name, overrides, steps, masked):
    """DiffusionPolicy's loop over DPMSolverMultistepScheduler.step, same seed: the same actions."""
    shape = (3, SHAPE_T, SHAPE_D)
    denoiser = CleanDenoiser(dp_dpm(**overrides))
    cond = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    inpaint = make_inpaint(3) if masked else None
    ref, _ = diffusion_policy_loop(denoiser, dp_dpm(**overrides), steps, shape, seed=11, condition=cond,
                                   inpaint=inpaint)
    schedule = make_schedule(dp_dpm(**overrides), steps)
    x_T, noise = draw_noise(schedule, shape, torch.Generator().manual_seed(11))
    ours, stats = sequential_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=inpaint)
    assert (ours - ref).abs().max() < 1e-5
    assert stats.rounds == steps


MULTISTEP = [("dpm2", dict(solver_order=2)), ("dpm3", dict(solver_order=3)),
             ("sde2", dict(solver_order=2, algorithm_type="sde-dpmsolver++")),
             ("dpm3-sample", dict(solver_order=3, prediction_type="sample"))]


@pytest.mark.parametrize("name,overrides", MULTISTEP, ids=[m[0] for m in MULTISTEP])
@pytest.mark.parametrize("solve", [{}, {"linear_solve": True, "secant": True}], ids=["prefix_sum", "linear_secant"])
@pytest.mark.parametrize("shape_name", ["compact", "fixed"])
def test_picard_tolerance_zero_on_multistep_dpm_solver_equals_sequential(name, overrides, solve, shape_name):
    """ParaDPMSolver: steps that read earlier steps' predictions; tolerance 0 is the sequential sample."""
    from para_policy.samplers import taa_sample, warm_start_init

    schedule = make_schedule(dp_dpm(**overrides), 10)
    denoiser = CleanDenoiser(dp_dpm(**overrides))
    shape = (2, SHAPE_T, SHAPE_D)
    cond = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    inpaint = make_inpaint(2)
    x_T, noise = draw_noise(schedule, shape, torch.Generator().manual_seed(5))
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=inpaint)
    init = warm_start_init(schedule, torch.zeros(shape), x_T, noise)
    for window, extra in ((4, {}), (10, {"init": init, "init_rows": torch.tensor([True, False])})):
        out, stats = picard_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=inpaint, window=window,
                                   tolerance=0.0, round_shape=shape_name, **solve, **extra)
        assert (out - ref).abs().max() < 1e-5 and stats.rounds <= 10
    fast, stats = picard_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=inpaint, window=10,
                                tolerance=0.1, round_shape=shape_name, **solve)
    assert stats.rounds <= 10 and (fast - ref).abs().max() < 0.1
    if not solve and shape_name == "compact":
        out, _ = taa_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=inpaint, window=10, tolerance=0.0)
        assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_picard_tolerance_zero_on_first_order_dpm_solver_equals_sequential(algorithm):
    """solver_order=1 is a one-step schedule: Picard's solves run on it unchanged."""
    schedule = make_schedule(dp_dpm(solver_order=1, algorithm_type=algorithm), 10)
    denoiser = CleanDenoiser(dp_dpm())
    shape = (2, SHAPE_T, SHAPE_D)
    cond = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    x_T, noise = draw_noise(schedule, shape, torch.Generator().manual_seed(5))
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond)
    for linear_solve in (False, True):
        ours, stats = picard_sample(denoiser, schedule, x_T, noise, window=4, tolerance=0.0, condition=cond,
                                    linear_solve=linear_solve)
        assert (ours - ref).abs().max() < 5e-5 and stats.all_converged
