"""Choosing the Picard window from a measured cost curve (para_policy.window)."""

from __future__ import annotations

import pytest
import torch
from conftest import MLPDenoiser, dp_ddpm

from para_policy.samplers import draw_noise, picard_sample
from para_policy.schedule import make_schedule
from para_policy.window import batch_cost_curve, choose_window, predict_latency, round_cost


def test_round_cost_interpolates_and_extrapolates_linearly():
    cost = {1: 6.0, 16: 12.0, 32: 20.0}
    assert round_cost(cost, 1) == 6.0 and round_cost(cost, 32) == 20.0
    assert round_cost(cost, 24) == pytest.approx(16.0)  # halfway between 16 and 32
    assert round_cost(cost, 8.5) == pytest.approx(9.0)
    assert round_cost(cost, 48) == pytest.approx(28.0)  # slope 0.5 per row past the end
    assert round_cost({10: 5.0}, 20) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="empty"):
        round_cost({}, 3)


def test_choose_window_minimises_the_sum_of_round_costs():
    # a CPU-like curve: a fixed cost per call plus a cost per row
    cost = {n: 5.0 + 0.5 * n for n in (1, 8, 16, 32, 64, 100)}
    traces = {
        8: [[8] * 30],                  # 30 rounds of 8 rows: 30 * 9 = 270 ms
        16: [[16] * 18, [16] * 20],     # 19 rounds of 16: 19 * 13 = 247 ms
        100: [[100] * 9],               # 9 rounds of 100: 9 * 55 = 495 ms
    }
    best, predicted = choose_window(cost, traces)
    assert predicted == pytest.approx({8: 270.0, 16: 247.0, 100: 495.0})
    assert best == 16
    # on a GPU-like curve (flat) the widest window wins
    flat = {n: 10.0 for n in (1, 100)}
    assert choose_window(flat, traces)[0] == 100
    with pytest.raises(ValueError, match="no calibration runs"):
        choose_window(cost, {8: []})


def test_choose_window_counts_the_samplers_own_time_per_round():
    # cheap one-row calls: on model calls alone the sequential loop wins (100 ms against 112 ms) ...
    cost = {1: 1.0, 100: 14.0}
    traces = {1: [[1] * 100], 100: [[100] * 8]}
    assert choose_window(cost, traces)[0] == 1
    # ... but its hundred rounds each cost the sampler 1 ms of its own, the wide window's eight 2 ms
    best, predicted = choose_window(cost, traces, {1: 1.0, 100: 2.0})
    assert best == 100 and predicted == pytest.approx({1: 200.0, 100: 128.0})


def test_sampler_overhead_is_measured_for_every_window_without_model_calls():
    from para_policy.samplers import sampler_spec
    from para_policy.window import Problem, calibrate_window

    net = MLPDenoiser(dim=3, cond_dim=4, seed=2)
    rows = []

    def counting(x, t, c=None):
        rows.append(x.shape[0])
        return net(x, t, c)

    schedule = make_schedule(dp_ddpm(), 20)
    cond = torch.randn(1, 4)
    spec = sampler_spec("paradigms", tolerance=0.1)
    window, info = calibrate_window(counting, schedule, spec, [Problem((1, 5, 3), cond)], (1, 8, 20),
                                    cost={1: 1.0, 20: 20.0})
    overhead = info["overhead_ms_per_round"]
    assert set(overhead) == {1, 8, 20} and all(ms > 0 for ms in overhead.values())
    # the model ran for the calibration runs only (the same runs redone here), never while timing the overhead
    x_T, noise = draw_noise(schedule, (1, 5, 3), torch.Generator().manual_seed(0))
    evals = sum(picard_sample(net, schedule, x_T, noise, condition=cond, **{**spec.options, "window": w})[1].model_evals
                for w in (1, 8, 20))
    assert sum(rows) == evals
    assert info["predicted_ms"][window] == min(info["predicted_ms"].values())


def test_rows_per_round_account_for_every_model_evaluation():
    denoiser = MLPDenoiser(seed=5)
    schedule = make_schedule(dp_ddpm(), 100)
    x_T, noise = draw_noise(schedule, (2, 8, 3), torch.Generator().manual_seed(5))
    cond = torch.randn(2, 4, generator=torch.Generator().manual_seed(5))
    _, stats = picard_sample(denoiser, schedule, x_T, noise, window=16, tolerance=0.1, condition=cond)
    rows = stats.rows_per_round
    assert len(rows) == stats.rounds and sum(rows) == stats.model_evals
    assert max(rows) <= 2 * 16
    assert predict_latency({1: 1.0, 32: 32.0}, rows) == pytest.approx(stats.model_evals)


def test_batch_cost_curve_times_each_batch_size():
    denoiser = MLPDenoiser(seed=1)
    cost = batch_cost_curve(denoiser, (8, 3), torch.randn(1, 4), (4, 1, 2), reps=2, warmup=1)
    assert list(cost) == [1, 2, 4] and all(ms > 0 for ms in cost.values())
    with pytest.raises(ValueError, match="batch_sizes"):
        batch_cost_curve(denoiser, (8, 3), None, (0, 4))


def test_tune_window_picks_the_cheapest_window_for_a_given_cost_curve():
    from test_policy import OBS_DIM, TO, tiny_policy

    from para_policy.policy import SamplerConfig
    from para_policy.window import tune_window

    policy = tiny_policy()
    spec = SamplerConfig("paradigms", None, None, {"window": "auto", "tolerance": 0.1})
    obs = [torch.rand(TO, OBS_DIM, generator=torch.Generator().manual_seed(i)).numpy() * 500 for i in range(2)]
    flat = {1: 10.0, 100: 10.0}  # a GPU: the round costs the same at any size → the widest window
    window, info = tune_window(policy, spec, obs, (4, 16, 100), cost=flat)
    assert window == 100 and set(info["rounds"]) == {4, 16, 100}
    assert info["rounds"][4] >= info["rounds"][16] >= info["rounds"][100]
    steep = {1: 1.0, 100: 100.0}  # cost ∝ rows: fewer model evaluations win
    window, info = tune_window(policy, spec, obs, (4, 16, 100), cost=steep)
    assert info["predicted_ms"][window] == min(info["predicted_ms"].values())
    with pytest.raises(ValueError, match="at least one observation"):
        tune_window(policy, spec, [])


def test_window_1_is_the_sequential_loop_and_auto_picks_it_when_batches_are_expensive():
    """Window 1 runs the sequential loop itself (bit for bit); with a cost curve where rows cost in proportion,
    the tuner picks it, so window='auto' never predicts slower than sequential sampling."""
    import torch
    from conftest import MLPDenoiser, dp_ddpm

    from para_policy.samplers import draw_noise, picard_sample, sampler_spec, sequential_sample
    from para_policy.schedule import make_schedule
    from para_policy.window import Problem, calibrate_window

    denoiser = MLPDenoiser(dim=3, cond_dim=4)
    schedule = make_schedule(dp_ddpm(), 20)
    x_T, noise = draw_noise(schedule, (2, 5, 3), torch.Generator().manual_seed(0))
    cond = torch.randn(2, 4)
    ref, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond)
    out, stats = picard_sample(denoiser, schedule, x_T, noise, condition=cond, window=1, tolerance=0.5)
    assert torch.equal(out, ref) and stats.rounds == 20 and stats.rows_per_round == [2] * 20
    spec = sampler_spec("paradigms", tolerance=0.1)
    # a cost curve with no batching gain and a fixed cost per round: sequential (1 row a round) wins
    steep = {1: 1.0, 2: 2.5, 8: 12.0, 16: 30.0, 20: 40.0, 40: 90.0}
    window, info = calibrate_window(denoiser, schedule, spec, [Problem((2, 5, 3), cond)], cost=steep)
    assert window == 1 and info["predicted_ms"][1] == min(info["predicted_ms"].values())
