"""Controller: observation history, action queue, warm start, deadline, stats; several devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_policy import ACT_DIM, HORIZON, NA, OBS_DIM, TO, tiny_config, tiny_policy

from para_policy import LowdimPolicy
from para_policy.controller import Controller, shift_trajectory
from para_policy.devices import ReplicatedDenoiser, use_devices

STEPS = 20


def small_policy(global_cond: bool = True) -> LowdimPolicy:
    policy = tiny_policy(global_cond)
    policy.num_inference_steps = STEPS
    return policy


def observations(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 500, (1, OBS_DIM)) + np.cumsum(rng.normal(0, 5, (n, OBS_DIM)), 0)).astype(np.float32)


def test_act_keeps_history_and_refills_queue_like_select_action():
    policy = small_policy()
    obs = observations(2 * NA + 1)
    ctl = Controller(policy, sampler="paradigms", tolerance=0.0, window=8, warm_start=False, seed=3)
    ref = Controller(policy, sampler="paradigms", tolerance=0.0, window=8, warm_start=False, seed=3)
    actions = [ctl.act(o) for o in obs]
    assert all(a.shape == (ACT_DIM,) and isinstance(a, np.ndarray) for a in actions)
    assert len(ctl.records) == 3  # chunks at steps 0, NA, 2 NA
    first = ref.predict_chunk(np.stack([obs[0], obs[0]]))  # history padded with the first observation
    second = ref.predict_chunk(obs[NA - 1: NA + 1])  # the last n_obs_steps observations
    assert first.shape == (NA, ACT_DIM)
    np.testing.assert_allclose(np.stack(actions[:NA]), first, atol=1e-4)
    np.testing.assert_allclose(np.stack(actions[NA: 2 * NA]), second, atol=1e-4)
    ctl.reset()
    assert not ctl.actions and not ctl.observations and ctl.step == 0
    with pytest.raises(ValueError, match="obs_dim"):
        ctl.act(np.zeros(OBS_DIM + 1))
    with pytest.raises(ValueError, match="n_obs_steps"):
        ctl.predict_chunk(np.zeros((TO + 1, OBS_DIM)))


@pytest.mark.parametrize("global_cond", [True, False])
def test_warm_start_at_tolerance_zero_equals_cold(global_cond):
    policy = small_policy(global_cond)
    obs = observations(3 * NA, seed=1)
    warm = Controller(policy, window=8, tolerance=0.0, warm_start=True, seed=0)
    cold = Controller(policy, window=8, tolerance=0.0, warm_start=False, seed=0)
    seq = Controller(policy, sampler="sequential", seed=0)
    a_warm = np.stack([warm.act(o) for o in obs])
    a_cold = np.stack([cold.act(o) for o in obs])
    a_seq = np.stack([seq.act(o) for o in obs])
    assert [r.warm for r in warm.records] == [False, True, True]
    assert not any(r.warm for r in cold.records)
    np.testing.assert_allclose(a_warm, a_cold, atol=1e-3)  # pixels; float32 unnormalization
    np.testing.assert_allclose(a_cold, a_seq, atol=1e-3)


def test_warm_start_guess_is_the_shifted_previous_trajectory():
    """predict_chunk warm-starts from the policy session's memory, the previous trajectory shifted by
    n_action_steps (act() passes its own shift explicitly); reset() forgets it."""
    policy = small_policy()
    ctl = Controller(policy, window=8, tolerance=0.1, seed=0)
    ctl.predict_chunk(observations(TO))
    traj = policy.last_trajectory
    guess = shift_trajectory(traj, NA)
    assert torch.equal(guess[:, : HORIZON - NA], traj[:, NA:])
    assert torch.equal(guess[:, HORIZON - NA:], traj[:, -1:].expand(-1, NA, -1))
    obs = observations(TO, seed=1)
    state = ctl.generator.get_state()
    chunk = ctl.predict_chunk(obs)
    assert ctl.last_record.warm
    ref = policy.predict_action({"obs": torch.as_tensor(obs)[None]}, generator=torch.Generator().set_state(state),
                                guess=guess, sampler=ctl.spec)
    np.testing.assert_array_equal(chunk, ref["action"][0].numpy())
    ctl.reset()
    ctl.predict_chunk(obs)
    assert not ctl.last_record.warm
    x = torch.arange(6.0).view(1, 6, 1)
    assert shift_trajectory(x, 4).flatten().tolist() == [4, 5, 5, 5, 5, 5]
    assert shift_trajectory(x, 9).flatten().tolist() == [5] * 6


def test_zero_deadline_returns_a_flagged_iterate_and_counts_a_miss():
    policy = small_policy()
    ctl = Controller(policy, window=8, tolerance=0.0, deadline_ms=0.0, seed=0)
    chunk = ctl.predict_chunk(observations(TO))
    assert chunk.shape == (NA, ACT_DIM) and np.isfinite(chunk).all()
    rec = ctl.last_record
    assert rec.deadline_hit and not rec.converged and rec.rounds == 1  # one round always runs
    ctl.predict_chunk(observations(TO))  # a warm chunk returns its (flagged) first estimate
    stats = ctl.stats()
    assert stats["deadline_misses"] == 2 and stats["unconverged"] == 2 and stats["chunks"] == 2
    relaxed = Controller(policy, window=8, tolerance=0.0, deadline_ms=60_000, seed=0)
    relaxed.predict_chunk(observations(TO))
    assert relaxed.stats()["deadline_misses"] == 0 and relaxed.last_record.converged
    with pytest.raises(ValueError, match="Picard"):
        Controller(policy, sampler="sequential", deadline_ms=10)
    with pytest.raises(ValueError, match=">= 0"):
        Controller(policy, deadline_ms=-1)


def test_stats_and_seeding():
    policy = small_policy()
    obs = observations(2 * NA, seed=2)
    a = Controller(policy, window=4, tolerance=0.1, seed=7)
    b = Controller(policy, window=4, tolerance=0.1, seed=7)
    out_a = np.stack([a.act(o) for o in obs])
    out_b = np.stack([b.act(o) for o in obs])
    np.testing.assert_array_equal(out_a, out_b)
    s = a.stats()
    assert s["chunks"] == 2 and s["actions"] == 2 * NA and s["warm_chunks"] == 1
    for key in ("chunk_latency_ms", "action_latency_ms", "rounds"):
        assert set(s[key]) == {"mean", "p50", "p95", "max"} and s[key]["max"] >= s[key]["p50"] > 0
    assert s["rounds"]["max"] <= STEPS and s["deadline_misses"] == 0
    a.reset_stats()
    assert a.stats()["chunks"] == 0 and a.stats()["rounds"]["p50"] is None
    t = Controller(policy, window=4, tolerance=0.1, seed=7).act(torch.as_tensor(obs[0]))
    assert isinstance(t, torch.Tensor) and torch.allclose(t, torch.as_tensor(out_a[0]))


def test_two_cpu_devices_give_the_same_sample_as_one():
    policy = small_policy()
    obs = torch.as_tensor(observations(TO))[None].repeat(3, 1, 1)
    kw = dict(sampler="paradigms", window=8, tolerance=0.0)
    one = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(1), **kw)["action"]
    keys = set(policy.state_dict())
    use_devices(policy, ["cpu", "cpu"])
    rd = policy.runtime.denoiser
    assert isinstance(rd, ReplicatedDenoiser) and rd.replicas[1] is not policy.model
    calls = []
    handle = rd.replicas[1].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    two = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(1), **kw)["action"]
    handle.remove()
    assert calls and all(n >= 1 for n in calls)  # the second replica did part of every round's rows
    assert torch.allclose(two, one, atol=1e-4)
    assert set(policy.state_dict()) == keys  # the wrapper adds no weights
    x, t, c = torch.randn(5, HORIZON, ACT_DIM), torch.randint(0, 100, (5,)), torch.randn(5, OBS_DIM * TO)
    with torch.inference_mode():
        assert torch.allclose(rd(x, t, c), policy.model(x, t, global_cond=c), atol=1e-5)
    rd.close()
    use_devices(policy, None)
    assert policy.runtime.denoiser is None and policy.inference == {}
    ctl = Controller(policy, window=8, tolerance=0.0, seed=0, devices=["cpu", "cpu"])
    assert ctl.predict_chunk(observations(TO)).shape == (NA, ACT_DIM)
    use_devices(policy, None)


def test_controller_needs_valid_sampler():
    policy = LowdimPolicy(tiny_config())
    with pytest.raises(ValueError, match="unknown sampler"):
        Controller(policy, sampler="fastest")
    with pytest.raises(ValueError, match="does not take"):
        Controller(policy, sampler="sequential", window=4)


def test_default_controller_runs_the_paradigms_preset():
    from para_policy.samplers import PRESETS, sampler_spec

    policy = tiny_policy()
    ctl = Controller(policy, seed=0)
    assert ctl.spec == sampler_spec("paradigms") and ctl.warm_start
    preset = PRESETS["paradigms"]["options"]
    assert {k: ctl.spec.options[k] for k in preset} == preset
    assert Controller(policy, tolerance=0.0).spec.options["tolerance"] == 0.0  # options override it
    assert not Controller(policy, warm_start=False).warm_start


def test_window_auto_calibrates_on_the_first_chunk_without_touching_the_noise():
    """window='auto' is resolved to a candidate window on the first observations; the controller's
    noise stream is untouched, so at tolerance 0 the actions are still the sequential ones."""
    policy = small_policy()
    obs = observations(2 * NA, seed=2)
    auto = Controller(policy, window="auto", tolerance=0.0, seed=5)
    seq = Controller(policy, sampler="sequential", seed=5)
    a_auto = np.stack([auto.act(o) for o in obs])
    a_seq = np.stack([seq.act(o) for o in obs])
    np.testing.assert_allclose(a_auto, a_seq, rtol=1e-5, atol=1e-4)  # other noise would move them by pixels
    window = auto.spec.options["window"]
    assert window in (1, 8, 16, STEPS) and auto.window_tuning["window"] == window
    assert set(auto.window_tuning["rounds"]) == {1, 8, 16, STEPS}
    assert auto.records[0].rounds <= STEPS


def test_calibrate_checks_its_inputs():
    policy = small_policy()
    ctl = Controller(policy, window=4, tolerance=0.1, seed=0)
    window = ctl.calibrate(list(observations(2 * TO, seed=3).reshape(2, TO, OBS_DIM)), reps=1)
    assert ctl.spec.options["window"] == window and ctl.spec.options["tolerance"] == 0.1
    with pytest.raises(ValueError, match=r"shape \(n_obs_steps, obs_dim\)"):
        ctl.calibrate([np.zeros(OBS_DIM)])
    with pytest.raises(ValueError, match="at least one"):
        ctl.calibrate([])
    with pytest.raises(ValueError, match="Picard sampler"):
        Controller(policy, sampler="sequential").calibrate([np.zeros((TO, OBS_DIM))])
