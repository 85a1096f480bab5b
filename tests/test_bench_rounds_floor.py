"""eval/bench_rounds_floor.py (issue 13): its Newton iteration and warm starts against the sequential loop.

The benchmark's rounds only mean something if every variant solves the same problem: any
linearization of the steps keeps the sequential sample as the fixed point, and a warm start
built from the sequential run's own predictions is that run's trajectory. Checked here on the
shipped PushT policy, DDIM-8 (short, so the exact Jacobians take seconds), against
``sequential_sample`` of the library.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from para_policy.loading import load_policy
from para_policy.samplers import draw_noise, sampler_spec, sequential_sample, step_jacobians

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"


@pytest.fixture(scope="module")
def floor():
    import sys

    sys.path.insert(0, str(ROOT / "eval"))
    try:
        yield importlib.import_module("bench_rounds_floor")
    finally:
        sys.path.remove(str(ROOT / "eval"))


@pytest.fixture(scope="module")
def setup():
    policy = load_policy(CHECKPOINT)
    sched = policy.schedule_for(sampler_spec("sequential", scheduler="ddim", num_inference_steps=8))
    gen = torch.Generator().manual_seed(3)
    obs = torch.randn((1, policy.n_obs_steps, policy.obs_dim), generator=gen) * 0.3
    cond, _ = policy.conditioning(obs)
    x_T, noise = draw_noise(sched, policy.trajectory_shape(1), gen)
    ref, _ = sequential_sample(policy.denoise, sched, x_T, noise, condition=cond)
    return policy, sched, cond, x_T, noise, ref


def test_sequential_states_are_the_sequential_sample_and_a_per_step_warm_start_from_them_is_its_trajectory(
        floor, setup):
    policy, sched, cond, x_T, noise, ref = setup
    sample, inputs, x0s = floor.sequential_states(policy, sched, x_T, noise, cond)
    torch.testing.assert_close(sample, ref, atol=1e-5, rtol=0)
    assert inputs.shape == (sched.num_steps, *x_T.shape[1:]) == x0s.shape
    torch.testing.assert_close(inputs[0], x_T[0])
    # each step's own clean-sample prediction implies its model output, so the affine recurrence
    # rebuilds the sequential states x_1 ... x_S without a model call
    init = floor.per_step_init(sched, x0s, x_T, noise)
    torch.testing.assert_close(init[0, :-1], inputs[1:], atol=1e-4, rtol=0)
    torch.testing.assert_close(init[:, -1], ref, atol=1e-4, rtol=0)


def test_newton_iteration_keeps_the_sequential_fixed_point_for_exact_and_for_wrong_jacobians(floor, setup):
    policy, sched, cond, x_T, noise, ref = setup
    S = sched.num_steps
    _, inputs, _ = floor.sequential_states(policy, sched, x_T, noise, cond)
    exact = step_jacobians(policy.denoise, sched, inputs, cond)
    assert exact.shape == (S, ref[0].numel(), ref[0].numel()) and bool(exact.abs().sum() > 0)
    assert not exact.requires_grad  # no graph kept back to the weights
    wrong = 0.5 * exact.flip(0)  # another step's Jacobian, scaled: a poor linearization
    for jac in (exact, wrong, torch.zeros_like(exact)):
        out, rounds = floor.newton_sample(policy, sched, x_T, noise, cond, jac, None, 0.0)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
        assert 1 <= rounds <= S
    # the exact Jacobian at the answer converges in fewer rounds than the linear solve alone (J = 0)
    loose = {name: floor.newton_sample(policy, sched, x_T, noise, cond, jac, None, 0.02)[1]
             for name, jac in (("exact", exact), ("none", torch.zeros_like(exact)))}
    assert loose["exact"] < loose["none"] <= S


def test_weight_shares_match_closed_forms(floor):
    T, D = 16, 2
    N = T * D
    ones = torch.ones((3, N, N))  # every entry on every entry: shares are the fractions of pairs
    shares = floor.weight_shares(ones, D)
    assert shares == pytest.approx({"diagonal": 1 / N, "channel": 1 / D, "time step": D / N})
    assert floor.weight_shares(torch.eye(N).expand(3, N, N), D) == pytest.approx(
        {"diagonal": 1.0, "channel": 1.0, "time step": 1.0})
    # entry t*D + d reads entry t*D + (1 - d): the other channel at the same time
    swap = torch.zeros((1, N, N))
    idx = torch.arange(N)
    swap[0, idx, idx ^ 1] = 2.0
    assert floor.weight_shares(swap, D) == pytest.approx({"diagonal": 0.0, "channel": 0.0, "time step": 1.0})


def test_floor_benchmark_reports_every_lead(floor, tmp_path):
    out = tmp_path / "floor.md"
    floor.main(["--episodes", "1", "--max-chunks", "2", "--calibration-episodes", "1", "--schedules", "ddim8",
                "--report-rounds", "2", "--threads", str(torch.get_num_threads()), "--out", str(out)])
    md = out.read_text()
    assert "## Leads a sampler could use" in md
    row = next(line for line in md.splitlines() if line.startswith("| ddim8 |") and "not run" not in line
               and line.count("|") == 15)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(cells[1:]), row  # every lead measured
    shares = next(line for line in md.splitlines() if line.startswith("| ddim8 |") and line.count("|") == 5)
    diagonal, channel, time_step = (float(c) for c in shares.strip("|").split("|")[1:])
    assert 0 < diagonal <= min(channel, time_step) <= 1  # the diagonal lies within both
    with pytest.raises(SystemExit, match="calibration"):
        floor.main(["--episodes", "1", "--calibration-seed-start", "100000", "--schedules", "ddim8",
                    "--out", str(tmp_path / "x.md")])


def test_bench_jacobian_reports_each_variant(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "eval"))
    try:
        bench = importlib.import_module("bench_jacobian")
    finally:
        sys.path.remove(str(ROOT / "eval"))
    md = bench.main(["--episodes", "1", "--replay-chunks", "2", "--calibration-episodes", "1", "--max-chunks", "1",
                     "--threads", str(torch.get_num_threads()), "--out", str(tmp_path / "bj.md")])
    assert (tmp_path / "bj.md").read_text() == md and "Mean Jacobian from 1 chunks" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "×" in line}
    assert set(rows) == {"default", "zero Jacobian", "mean Jacobian"}
    with pytest.raises(SystemExit, match="calibration"):
        bench.main(["--calibration-seed-start", "100000", "--out", str(tmp_path / "x.md")])
