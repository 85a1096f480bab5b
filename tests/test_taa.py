"""ParaTAA (triangular Anderson acceleration) against the sequential loop and plain Picard iteration."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DP_BETAS, MLPDenoiser, dp_ddim, dp_ddpm

from para_policy.samplers import draw_noise, picard_sample, sequential_sample, taa_sample, warm_start_init
from para_policy.samplers.taa import anderson_correction, slot_weights
from para_policy.schedule import make_schedule

SHAPE_T, SHAPE_D = 8, 3
CONFIGS = [("ddpm-100", dp_ddpm, 100), ("ddim-10", dp_ddim, 10)]


def make_inpaint(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randn(batch, SHAPE_T, SHAPE_D, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(batch, SHAPE_T, SHAPE_D, dtype=torch.bool)
    mask[:, :2, 1:] = True  # like DiffusionPolicy's first n_obs_steps observation entries
    return data, mask


def problem(batch: int = 2, seed: int = 0, steps: int = 100, make=dp_ddpm):
    """(schedule, x_T, noise, condition) of a fixed sampling problem for the MLP denoiser."""
    schedule = make_schedule(make(), steps)
    x_T, noise = draw_noise(schedule, (batch, SHAPE_T, SHAPE_D), torch.Generator().manual_seed(seed))
    cond = torch.randn(batch, 4, generator=torch.Generator().manual_seed(seed + 10))
    return schedule, x_T, noise, cond


@pytest.mark.parametrize("name,make,steps", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("window", [4, 100])
@pytest.mark.parametrize("solve", ["picard", "linear", "secant"])
def test_tolerance_zero_equals_sequential(denoiser, name, make, steps, batch, masked, window, solve):
    schedule, x_T, noise, cond = problem(batch, seed=5, steps=steps, make=make)
    inpaint = make_inpaint(batch) if masked else None
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond, inpaint=inpaint)
    ours, stats = taa_sample(denoiser, schedule, x_T, noise, window=window, tolerance=0.0, condition=cond,
                             inpaint=inpaint, linear_solve=solve != "picard", secant=solve == "secant")
    assert (ours - ref).abs().max() < 5e-5  # float32 roundoff of batched calls (see test_samplers)
    assert stats.all_converged
    assert stats.rounds <= steps
    assert int(stats.rounds_per_sample.max()) == stats.rounds


def test_window_one_is_the_sequential_loop(denoiser):
    """No slot after the first: nothing to mix, one step per round."""
    schedule, x_T, noise, cond = problem(batch=2)
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond)
    ours, stats = taa_sample(denoiser, schedule, x_T, noise, window=1, tolerance=0.1, condition=cond)
    assert (ours - ref).abs().max() < 1e-5
    assert stats.rounds == 100 and stats.model_evals == 200


def test_junk_warm_start_keeps_exactness(denoiser):
    schedule, x_T, noise, cond = problem(batch=2, seed=8)
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond)
    junk = warm_start_init(schedule, 3 * torch.randn(x_T.shape, generator=torch.Generator().manual_seed(1)), x_T,
                           noise)
    ours, stats = taa_sample(denoiser, schedule, x_T, noise, window=16, tolerance=0.0, condition=cond, init=junk)
    assert (ours - ref).abs().max() < 1e-5
    assert stats.rounds <= 100


@pytest.mark.parametrize("window", [16, 100])
def test_converged_result_is_close_to_picard(denoiser, window):
    """At tolerance 0.1 both stop within the tolerance of the same fixed point.

    A converged step may still move by tolerance·σ_k; errors of that order, carried through
    the contracting denoising steps, stay below tolerance·σ_max (σ_max ≈ 1 at the noisiest step).
    """
    schedule, x_T, noise, cond = problem(batch=2, seed=1)
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond)
    bound = {}
    for tol in (0.1, 0.01):
        picard, ps = picard_sample(denoiser, schedule, x_T, noise, window=window, tolerance=tol, condition=cond)
        ours, ts = taa_sample(denoiser, schedule, x_T, noise, window=window, tolerance=tol, condition=cond)
        assert ts.all_converged and ps.all_converged
        budget = tol * math.sqrt(float(schedule.variance.max()))
        assert (ours - picard).abs().max() < budget
        assert (ours - ref).abs().max() < budget
        bound[tol] = float((ours - ref).abs().max())
    assert bound[0.01] < bound[0.1]  # a tighter tolerance is more faithful


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fewer_rounds_than_picard(seed):
    """The fixed problem of the prototype: window 100 cut ~40%, window 16 a few rounds (no history there)."""
    denoiser = MLPDenoiser(seed=seed)
    schedule, x_T, noise, cond = problem(batch=2, seed=seed)
    for window, ratio in ((100, 0.75), (16, 0.95)):
        _, picard = picard_sample(denoiser, schedule, x_T, noise, window=window, tolerance=0.1, condition=cond)
        _, taa = taa_sample(denoiser, schedule, x_T, noise, window=window, tolerance=0.1, condition=cond)
        assert taa.rounds <= ratio * picard.rounds, (window, taa.rounds, picard.rounds)
        assert taa.model_evals < picard.model_evals
        assert (taa.rounds_per_sample <= picard.rounds_per_sample).all()


def test_batch_members_do_not_mix_each_others_history():
    """Gram sums run over one sample's window: a batch member samples as it would alone."""
    denoiser = MLPDenoiser(seed=2)
    schedule, x_T, noise, cond = problem(batch=3, seed=2)
    cond = cond * 3
    batch, stats = taa_sample(denoiser, schedule, x_T, noise, window=16, tolerance=0.1, condition=cond)
    for b in range(3):
        alone, s = taa_sample(denoiser, schedule, x_T[b:b + 1], noise[b:b + 1], window=16, tolerance=0.1,
                              condition=cond[b:b + 1])
        assert torch.allclose(batch[b:b + 1], alone, atol=1e-5)
        assert int(stats.rounds_per_sample[b]) == s.rounds
    _, shared = taa_sample(denoiser, schedule, x_T, noise, window=16, tolerance=0.1, condition=cond,
                           per_sample_windows=False)
    assert shared.rounds >= stats.rounds and shared.all_converged


def test_correction_is_triangular():
    """Slot k's correction uses slots 0..k only: changing later slots leaves it as it was."""
    g = torch.Generator().manual_seed(0)
    B, W, M = 2, 6, 3
    dX, dR = torch.randn(B, W, M, 4, 2, generator=g), torch.randn(B, W, M, 4, 2, generator=g)
    residual = torch.randn(B, W, 4, 2, generator=g)
    m = torch.tensor([[3, 3, 2, 2, 1, 0], [3, 3, 3, 3, 3, 3]])
    weight = torch.rand(B, W, generator=g) + 0.5
    base = anderson_correction(dX, dR, m, residual, weight, 1e-3)
    assert base[0, 5].abs().max() == 0  # no history: plain Picard value
    assert base[0, 4].abs().max() > 0
    k = 3
    dR2, dX2, res2 = dR.clone(), dX.clone(), residual.clone()
    dR2[:, k + 1:] += 5
    dX2[:, k + 1:] -= 2
    res2[:, k + 1:] *= -3
    changed = anderson_correction(dX2, dR2, m, res2, weight, 1e-3)
    assert torch.allclose(changed[:, : k + 1], base[:, : k + 1])
    assert not torch.allclose(changed[:, k + 1:], base[:, k + 1:])
    # columns beyond a slot's history are ignored
    dR3 = dR.clone()
    dR3[0, :, 2] = 100.0
    assert torch.allclose(anderson_correction(dX, dR3, m, residual, weight, 1e-3)[0, 2:], base[0, 2:])


def test_weights_are_the_convergence_test_units():
    """w_k = 1/(numel·σ_k²): Σ w r² ≤ tolerance² exactly when mean(r²) ≤ tolerance²·σ_k²."""
    for make, steps in ((dp_ddpm, 100), (dp_ddim, 10)):
        schedule = make_schedule(make(), steps)
        w = slot_weights(schedule, 24)
        var = schedule.variance.double()
        assert torch.isfinite(w).all() and (w > 0).all()
        positive = var > 0
        assert torch.allclose(w[positive], 1 / (24 * var[positive]))
        assert not positive[-1]  # the final step into alpha = 1: floored at the smallest positive σ²
        assert torch.isclose(w[-1], 1 / (24 * var[positive].min()))


def test_correction_is_the_least_squares_step():
    """One slot, ridge 0: γ solves the normal equations of min ‖r − ΔR γ‖ (weights cancel)."""
    g = torch.Generator().manual_seed(3)
    dX, dR = torch.randn(1, 1, 2, 5, 2, generator=g), torch.randn(1, 1, 2, 5, 2, generator=g)
    r = torch.randn(1, 1, 5, 2, generator=g)
    out = anderson_correction(dX, dR, torch.tensor([[2]]), r, torch.tensor([[7.0]]), 0.0)
    A = dR[0, 0].reshape(2, -1).T.double()
    gamma = torch.linalg.lstsq(A, r[0, 0].reshape(-1, 1).double()).solution.flatten()
    expected = torch.einsum("i,itd->td", gamma.float(), (dX + dR)[0, 0])
    assert torch.allclose(out[0, 0], expected, atol=1e-5)


def test_max_iterations_and_deadline_return_flagged_estimates(denoiser):
    import time

    schedule, x_T, noise, cond = problem(batch=2)
    out, stats = taa_sample(denoiser, schedule, x_T, noise, window=8, tolerance=0.0, max_iterations=3,
                            condition=cond)
    assert stats.rounds == 3 and not stats.converged.any() and torch.isfinite(out).all()
    out, stats = taa_sample(denoiser, schedule, x_T, noise, window=8, deadline_at=time.perf_counter(), condition=cond)
    assert stats.rounds == 1 and stats.deadline_hit and not stats.converged.any()


def test_bad_options_raise(denoiser):
    schedule, x_T, noise, cond = problem(batch=2, steps=10)
    for memory in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="memory"):
            taa_sample(denoiser, schedule, x_T, noise, memory=memory)
    for ridge in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ridge"):
            taa_sample(denoiser, schedule, x_T, noise, ridge=ridge)
    with pytest.raises(ValueError, match="tolerance"):
        taa_sample(denoiser, schedule, x_T, noise, tolerance=-1)
    with pytest.raises(ValueError, match="window"):
        taa_sample(denoiser, schedule, x_T, noise, window=0)
    with pytest.raises(ValueError, match="init must have shape"):
        taa_sample(denoiser, schedule, x_T, noise, init=torch.zeros(2, 3, SHAPE_T, SHAPE_D))
    # ridge 0 and memory 1 are allowed
    out, stats = taa_sample(denoiser, schedule, x_T, noise, memory=1, ridge=0.0, condition=cond)
    assert stats.all_converged and torch.isfinite(out).all()


def test_policy_runs_parataa():
    from para_policy import LowdimPolicy

    config = {
        "horizon": 8, "n_obs_steps": 2, "n_action_steps": 4, "obs_dim": 5, "action_dim": 2,
        "num_inference_steps": 100, "obs_as_global_cond": True,
        "model": {"input_dim": 2, "global_cond_dim": 10, "diffusion_step_embed_dim": 16, "down_dims": [16, 32],
                  "kernel_size": 3, "n_groups": 4, "cond_predict_scale": True},
        "noise_scheduler": {"_target_": "diffusers.DDPMScheduler", **DP_BETAS, "variance_type": "fixed_small",
                            "clip_sample": True, "prediction_type": "epsilon"},
    }
    torch.manual_seed(0)
    policy = LowdimPolicy(config).eval()
    obs = {"obs": torch.randn(2, 2, 5)}
    seq = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action_pred"]
    policy.set_sampler("parataa", window=16, tolerance=0.0, memory=2, ridge=1e-2)
    taa = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action_pred"]
    assert (taa - seq).abs().max() < 1e-4
    assert policy.last_stats.rounds <= 100
    with pytest.raises(ValueError, match="does not take"):
        policy.set_sampler("paradigms", memory=3)
