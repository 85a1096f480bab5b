"""Asynchronous inference in the Controller (issue 15): naive async, real-time chunking, both clocks.

The schedule under test: with ``d`` actions left the next chunk starts from that step's
observation; when the queue runs out it takes over from its action ``t - start`` (time-aligned);
``rtc`` freezes the queued actions as the new chunk's first ones.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from test_policy import ACT_DIM, OBS_DIM, TO, tiny_config

from para_policy import LowdimPolicy
from para_policy.controller import Controller
from para_policy.policy import PolicyOutput
from para_policy.samplers import SampleStats, draw_noise, sequential_sample, shift_trajectory
from para_policy.schedule import build_scheduler

H, HORIZON, STEPS = 8, 16, 10  # n_action_steps, horizon, denoising steps
WORKER = "para_policy-controller"


def rt_policy(global_cond: bool = True, seed: int = 0, cls: type = LowdimPolicy) -> LowdimPolicy:
    """A tiny UNet policy with room for delays: 8 executed actions of a 16-step trajectory."""
    torch.manual_seed(seed)
    policy = cls({**tiny_config(global_cond), "horizon": HORIZON, "n_action_steps": H,
                  "num_inference_steps": STEPS}).eval()
    rng = np.random.default_rng(seed)
    policy.normalizer.fit({"obs": rng.uniform(0, 500, (100, OBS_DIM)), "action": rng.uniform(0, 500, (100, ACT_DIM))})
    return policy


def observations(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 500, (1, OBS_DIM)) + np.cumsum(rng.normal(0, 5, (n, OBS_DIM)), 0)).astype(np.float32)


def record_calls(policy: LowdimPolicy) -> list[dict]:
    """Wrap ``policy.predict_action`` to keep each call's keywords and output, in call order."""
    calls: list[dict] = []
    inner = policy.predict_action

    def predict_action(obs_dict, **kw):
        out = inner(obs_dict, **kw)
        calls.append({**kw, "out": out})
        return out

    policy.predict_action = predict_action
    return calls


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(WORKER)]


class StepPolicy(LowdimPolicy):
    """A fake policy whose chunk planned at step s has action ``[s, j]`` at position j (for step s + j).

    Reads s from the observation (the test writes the step into it), sleeps ``latency()`` seconds,
    copies a frozen prefix into its first actions as a real policy's inpainting does, and
    raises at the steps in ``fail_at`` (once each).
    """

    def predict_action(self, obs_dict, *, prefix_actions=None, guess=None, generator=None, **kw):
        s = int(obs_dict["obs"][0, -1, 0])
        self.calls.append((s, None if prefix_actions is None else prefix_actions.clone()))
        time.sleep(self.latency())
        if s in self.fail_at:
            self.fail_at.discard(s)
            raise ValueError(f"boom at {s}")
        steps = torch.arange(HORIZON - self.action_start, dtype=torch.float32)
        plan = torch.stack([torch.full_like(steps, s), steps], dim=-1)  # (L, 2)
        if prefix_actions is not None:
            plan[: prefix_actions.shape[1]] = prefix_actions[0]
        pred = torch.cat([torch.zeros(self.action_start, 2), plan])[None]
        out = PolicyOutput(action=pred[:, self.action_start: self.action_start + H], action_pred=pred)
        out.stats = SampleStats(1, 1, torch.ones(1, dtype=torch.bool), torch.ones(1, dtype=torch.long))
        out.trajectory, out.spec, out.warm = torch.zeros(self.trajectory_shape(1)), self.sampler, False
        return out


def step_policy(latency=lambda: 0.0, fail_at=()) -> StepPolicy:
    policy = rt_policy(cls=StepPolicy)
    assert policy.action_dim == 2
    policy.calls, policy.latency, policy.fail_at = [], latency, set(fail_at)
    return policy


def step_obs(t: int) -> np.ndarray:
    return np.full(OBS_DIM, float(t), dtype=np.float32)


# ---- predict_action(prefix_actions=...) ---------------------------------------------------

@pytest.mark.parametrize("global_cond", [True, False])
@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("prefix_mode", ["noised", "clean"])
def test_frozen_prefix_at_tolerance_zero_equals_sequential_with_the_same_inpainting(global_cond, d, prefix_mode):
    policy = rt_policy(global_cond)
    obs = torch.as_tensor(observations(TO, seed=4))[None]  # (1, To, Do)
    prefix = torch.as_tensor(np.random.default_rng(1).uniform(0, 500, (1, d, ACT_DIM)), dtype=torch.float32)
    # the reference, built by hand: normalized actions at positions To-1 .. To-1+d (oa_step_convention)
    n = {k: v.clone() for k, v in policy.normalizer.state_dict().items()}
    nobs = obs * n["params_dict.obs.scale"] + n["params_dict.obs.offset"]
    D = ACT_DIM if global_cond else ACT_DIM + OBS_DIM
    data, mask = torch.zeros(1, HORIZON, D), torch.zeros(1, HORIZON, D, dtype=torch.bool)
    data[:, TO - 1: TO - 1 + d, :ACT_DIM] = prefix * n["params_dict.action.scale"] + n["params_dict.action.offset"]
    mask[:, TO - 1: TO - 1 + d, :ACT_DIM] = True
    cond = nobs.reshape(1, -1) if global_cond else None
    if not global_cond:
        data[:, :TO, ACT_DIM:], mask[:, :TO, ACT_DIM:] = nobs, True
    schedule = policy.schedule_for(policy.sampler)
    x_T, noise = draw_noise(schedule, (1, HORIZON, D), torch.Generator().manual_seed(2))
    known = data
    if prefix_mode == "noised":  # RePaint: the frozen actions at each step's level of the scheduler, x_T as the noise
        scheduler = build_scheduler(policy.config["noise_scheduler"])
        scheduler.set_timesteps(STEPS)
        frozen = torch.zeros_like(mask)
        frozen[:, TO - 1: TO - 1 + d, :ACT_DIM] = True
        levels = [torch.where(frozen, scheduler.alphas_cumprod[t].sqrt() * data
                              + (1 - scheduler.alphas_cumprod[t]).sqrt() * x_T, data) for t in scheduler.timesteps]
        known = torch.stack([*levels, data], dim=1)  # (1, S + 1, T, D)
    ref, _ = sequential_sample(lambda x, t, c: policy.model(x, t, global_cond=c), schedule, x_T, noise,
                               condition=cond, inpaint=(known, mask))

    kw = dict(x_T=x_T, noise=noise, prefix_actions=prefix, prefix_mode=prefix_mode)
    seq = policy.predict_action({"obs": obs}, sampler="sequential", **kw)
    torch.testing.assert_close(seq.trajectory, ref, rtol=0, atol=1e-6)
    guess = torch.randn(1, HORIZON, D, generator=torch.Generator().manual_seed(3))
    for start in ({"warm_start": False}, {"guess": guess}):
        out = policy.predict_action({"obs": obs}, sampler="paradigms", window=4, tolerance=0.0, **start, **kw)
        torch.testing.assert_close(out.trajectory, ref, rtol=0, atol=1e-4)
        assert torch.equal(out.trajectory[mask], data[mask])  # known entries exactly
        assert out.warm == ("guess" in start)
    np.testing.assert_allclose(out["action"][0, :d], prefix[0], atol=1e-3)  # back in raw units
    assert out["action"].shape == (1, H, ACT_DIM)


@pytest.mark.parametrize("global_cond", [True, False])
@pytest.mark.parametrize("prefix_mode", ["noised", "clean"])
def test_guide_actions_at_tolerance_zero_equal_sequential_with_rtcs_soft_mask(global_cond, prefix_mode):
    """Soft masking, built by hand: weights c (e^c - 1) / (e - 1), c = (m - i) / (m + 1), after d frozen actions."""
    policy = rt_policy(global_cond)
    obs = torch.as_tensor(observations(TO, seed=4))[None]
    d, m = 2, 20  # a guide longer than the trajectory: the positions it reaches get their weights
    rng = np.random.default_rng(1)
    prefix = torch.as_tensor(rng.uniform(0, 500, (1, d, ACT_DIM)), dtype=torch.float32)
    guide = torch.as_tensor(rng.uniform(0, 500, (1, m, ACT_DIM)), dtype=torch.float32)
    n = {k: v.clone() for k, v in policy.normalizer.state_dict().items()}
    nobs = obs * n["params_dict.obs.scale"] + n["params_dict.obs.offset"]
    D = ACT_DIM if global_cond else ACT_DIM + OBS_DIM
    data, w = torch.zeros(1, HORIZON, D), torch.zeros(1, HORIZON, D)
    start, reach = TO - 1, HORIZON - (TO - 1 + d)
    data[:, start: start + d, :ACT_DIM] = prefix * n["params_dict.action.scale"] + n["params_dict.action.offset"]
    w[:, start: start + d, :ACT_DIM] = 1.0
    data[:, start + d:, :ACT_DIM] = guide[:, :reach] * n["params_dict.action.scale"] + n["params_dict.action.offset"]
    for i in range(reach):
        c = (m - i) / (m + 1)
        w[:, start + d + i, :ACT_DIM] = c * (np.exp(c) - 1) / (np.e - 1)
    cond = nobs.reshape(1, -1) if global_cond else None
    if not global_cond:
        data[:, :TO, ACT_DIM:], w[:, :TO, ACT_DIM:] = nobs, 1.0
    schedule = policy.schedule_for(policy.sampler)
    x_T, noise = draw_noise(schedule, (1, HORIZON, D), torch.Generator().manual_seed(2))
    known = data
    if prefix_mode == "noised":
        scheduler = build_scheduler(policy.config["noise_scheduler"])
        scheduler.set_timesteps(STEPS)
        frozen = (w == 1) & (torch.arange(D) < ACT_DIM)  # the guide pulls toward the clean plan
        levels = [torch.where(frozen, scheduler.alphas_cumprod[t].sqrt() * data
                              + (1 - scheduler.alphas_cumprod[t]).sqrt() * x_T, data) for t in scheduler.timesteps]
        known = torch.stack([*levels, data], dim=1)
    ref, _ = sequential_sample(lambda x, t, c: policy.model(x, t, global_cond=c), schedule, x_T, noise,
                               condition=cond, inpaint=(known, w))
    kw = dict(x_T=x_T, noise=noise, prefix_actions=prefix, guide_actions=guide, prefix_mode=prefix_mode)
    seq = policy.predict_action({"obs": obs}, sampler="sequential", **kw)
    torch.testing.assert_close(seq.trajectory, ref, rtol=0, atol=1e-6)
    out = policy.predict_action({"obs": obs}, sampler="paradigms", window=4, tolerance=0.0, **kw)
    torch.testing.assert_close(out.trajectory, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["action"][0, :d], prefix[0], atol=1e-3)
    unguided = policy.predict_action({"obs": obs}, sampler="sequential", x_T=x_T, noise=noise, prefix_actions=prefix,
                                     prefix_mode=prefix_mode)
    assert not torch.allclose(unguided.trajectory, seq.trajectory, atol=1e-3)  # the guide does something


def test_bad_guide_actions_are_refused():
    policy = rt_policy()
    obs = {"obs": torch.as_tensor(observations(TO))[None]}
    with pytest.raises(ValueError, match=r"guide_actions continue frozen prefix_actions: pass both"):
        policy.predict_action(obs, guide_actions=torch.zeros(1, 3, ACT_DIM))
    with pytest.raises(ValueError, match=r"pass d >= 1 prefix actions"):
        policy.predict_action(obs, prefix_actions=torch.zeros(1, 0, ACT_DIM), guide_actions=torch.zeros(1, 3, ACT_DIM))
    with pytest.raises(ValueError, match=r"guide_actions must have shape \(B=1, m, action_dim=2\), got \(1, 3, 3\)"):
        policy.predict_action(obs, prefix_actions=torch.zeros(1, 2, ACT_DIM), guide_actions=torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match=r"guide_actions contains NaN"):
        policy.predict_action(obs, prefix_actions=torch.zeros(1, 2, ACT_DIM),
                              guide_actions=torch.full((1, 3, ACT_DIM), float("inf")))


def test_bad_prefix_actions_are_refused():
    policy = rt_policy()
    obs = {"obs": torch.as_tensor(observations(TO))[None]}
    for bad in (torch.zeros(1, H, ACT_DIM), torch.zeros(1, 2, ACT_DIM + 1), torch.zeros(2, 2, ACT_DIM),
                torch.zeros(2, ACT_DIM)):
        with pytest.raises(ValueError, match=r"prefix_actions must have shape \(B=1, d, action_dim=2\) with d < "):
            policy.predict_action(obs, prefix_actions=bad)
    with pytest.raises(ValueError, match="NaN"):
        policy.predict_action(obs, prefix_actions=torch.full((1, 2, ACT_DIM), float("nan")))
    with pytest.raises(ValueError, match=r"prefix_mode must be one of \('clean', 'noised'\), got 'soft'"):
        policy.predict_action(obs, prefix_actions=torch.zeros(1, 2, ACT_DIM), prefix_mode="soft")
    empty = policy.predict_action(obs, prefix_actions=torch.zeros(1, 0, ACT_DIM),
                                  generator=torch.Generator().manual_seed(0))["action"]
    plain = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    assert torch.equal(empty, plain)


# ---- the schedule on the steps clock ------------------------------------------------------

def test_sync_mode_is_the_controller_of_before():
    """mode='sync' (the default) is a chunk from predict_chunk whenever the queue is empty."""
    policy = rt_policy()
    obs = observations(3 * H, seed=2)
    ctl = Controller(policy, window=4, tolerance=0.1, seed=7)
    assert ctl.mode == "sync"
    actions = np.stack([ctl.act(o) for o in obs])
    ref = Controller(policy, window=4, tolerance=0.1, seed=7)
    chunks = [ref.predict_chunk(np.stack([obs[0]] * TO))] + [ref.predict_chunk(obs[k * H - TO + 1: k * H + 1])
                                                              for k in (1, 2)]
    np.testing.assert_array_equal(actions, np.concatenate(chunks))
    s = ctl.stats()
    assert s["chunks"] == 3 and s["switches"] == 2 and s["stalls"] == 2 and s["steps_in_flight"] == 0
    assert [(r.start_step, r.switch_step) for r in ctl.records] == [(0, 0), (H, H), (2 * H, 2 * H)]
    assert s["switch_discontinuity"]["max"] > 0 and s["idle_steps"] is None
    # a delay of 0 on the steps clock is sync: same chunks, same noise, same actions
    for mode in ("async", "rtc"):
        zero = Controller(policy, window=4, tolerance=0.1, seed=7, mode=mode, delay_steps=0, clock="steps")
        np.testing.assert_array_equal(np.stack([zero.act(o) for o in obs]), actions)


def expected_index(t: int, d: int) -> tuple[int, int]:
    """(chunk, action index) run at step t by the async schedule when 2 d <= H, computed directly.

    Chunk 0 starts at step 0 and runs all H actions; chunk k >= 1 starts at k (H - d) with d
    actions left, takes over at k (H - d) + d and runs from its action d.
    """
    if t < H:
        return 0, t
    k = (t - d) // (H - d)
    return k, t - k * (H - d)


@pytest.mark.parametrize("d", [1, 3, 4])
def test_async_switches_time_aligned(d):
    policy = rt_policy()
    calls = record_calls(policy)
    obs = observations(40, seed=3)
    ctl = Controller(policy, mode="async", delay_steps=d, clock="steps", window=4, tolerance=0.1, seed=0)
    actions = [ctl.act(o) for o in obs]
    for t, a in enumerate(actions):
        k, j = expected_index(t, d)
        assert "prefix_actions" not in calls[k]
        np.testing.assert_array_equal(a, calls[k]["out"]["action"][0, j].numpy())
    starts = [r.start_step for r in ctl.records]
    assert starts == [0] + [k * (H - d) for k in range(1, len(starts))]
    assert all(r.switch_step == r.start_step + (d if r.start_step else 0) for r in ctl.records)
    # each chunk's warm start: the previous trajectory shifted by the steps between their observations
    for prev, call, gap in zip(calls, calls[1:], np.diff(starts), strict=False):
        assert torch.equal(call["guess"], shift_trajectory(prev["out"].trajectory, int(gap)))
    s = ctl.stats()
    assert s["stalls"] == 0 and s["switches"] == len(ctl.records) - 1 and s["delay_used"]["max"] == d
    assert s["steps_in_flight"] >= d * s["switches"]  # each chunk was sampled while d actions ran
    # the jump at each switch: the new chunk's action against the old chunk's plan for that step
    for a, b in zip(ctl.records, list(ctl.records)[1:], strict=False):
        old = calls[starts.index(a.start_step)]["out"]["action_pred"][0, TO - 1 + b.switch_step - a.start_step]
        new = calls[starts.index(b.start_step)]["out"]["action_pred"][0, TO - 1 + d]
        assert b.discontinuity == pytest.approx(float(torch.linalg.vector_norm(new - old)), rel=1e-6)


@pytest.mark.parametrize("global_cond", [True, False])
@pytest.mark.parametrize("d", [1, 2, 4, 6])
def test_rtc_frozen_actions_are_exactly_the_executed_ones(global_cond, d):
    policy = rt_policy(global_cond)
    calls = record_calls(policy)
    obs = observations(36, seed=5)
    ctl = Controller(policy, mode="rtc", delay_steps=d, clock="steps", window=4, tolerance=0.1, seed=1,
                     extend_plan=False)  # the waiting schedule: a late chunk stalls
    actions = torch.stack([torch.as_tensor(ctl.act(o)) for o in obs])
    records = list(ctl.records)
    assert len(calls) >= len(records) >= 4
    previous_plans = {rec.start_step: call["out"]["action_pred"][0, TO - 1:] for rec, call in
                      zip(records, calls, strict=False)}
    for rec, call in zip(records, calls, strict=False):
        s, f, out = rec.start_step, rec.frozen, call["out"]
        prefix = call.get("prefix_actions")
        if s == 0:
            assert prefix is None and f == 0
            continue
        assert f == d if 2 * d <= H else 1 <= f <= d  # all the queued actions: d of them when they cover d
        assert prefix.shape == (1, f, ACT_DIM) and torch.equal(prefix[0], actions[s: s + f])  # what ran
        assert rec.switch_step == s + f
        if rec.switch_step < len(actions):  # the switch continues with the new chunk's action f
            assert torch.equal(actions[rec.switch_step], out["action"][0, f])
        # imposed: the normalized frozen actions are the trajectory's entries, bit for bit
        known = policy.normalizer.normalize("action", prefix)[0]
        assert torch.equal(out.trajectory[0, TO - 1: TO - 1 + f, :ACT_DIM], known)
        np.testing.assert_allclose(out["action"][0, :f], prefix[0], atol=1e-3)
        # soft masking: the guide is the old chunk's plan after the frozen actions, to its end
        previous = records[records.index(rec) - 1]
        old_plan = previous_plans[previous.start_step]
        assert torch.equal(call["guide_actions"][0], old_plan[s - previous.start_step + f:])
    s = ctl.stats()
    assert s["switches"] == len(records) - 1
    if 2 * d <= H:
        assert s["stalls"] == 0 and s["idle_steps"] == 0
    else:  # after a switch fewer than d actions are left: the queue runs dry and the robot idles
        assert s["stalls"] > 0 and s["idle_steps"] > 0


def test_rtc_without_soft_masking_imposes_only_the_frozen_actions():
    policy = rt_policy()
    calls = record_calls(policy)
    ctl = Controller(policy, mode="rtc", delay_steps=2, clock="steps", window=4, tolerance=0.1, seed=1,
                     soft_masking=False, prefix_mode="clean")
    for o in observations(20, seed=5):
        ctl.act(o)
    frozen = [c for c in calls if c.get("prefix_actions") is not None]
    assert frozen and all("guide_actions" not in c and c["prefix_mode"] == "clean" for c in frozen)
    with pytest.raises(ValueError, match=r"soft_masking must be true or false, got 'yes'"):
        Controller(policy, mode="rtc", delay_steps=2, clock="steps", soft_masking="yes")
    with pytest.raises(ValueError, match=r"prefix_mode must be 'clean' or 'noised', got 'hard'"):
        Controller(policy, mode="rtc", delay_steps=2, clock="steps", prefix_mode="hard")


def test_rtc_at_tolerance_zero_is_warm_start_independent():
    """The frozen prefix enters the warm start; at tolerance 0 the chunks are the cold ones."""
    policy = rt_policy()
    obs = observations(30, seed=6)
    kw = dict(mode="rtc", delay_steps=3, clock="steps", window=4, tolerance=0.0, seed=2)
    warm = Controller(policy, warm_start=True, **kw)
    cold = Controller(policy, warm_start=False, **kw)
    a_warm = np.stack([warm.act(o) for o in obs])
    a_cold = np.stack([cold.act(o) for o in obs])
    assert sum(r.warm for r in warm.records) == len(warm.records) - 1
    np.testing.assert_allclose(a_warm, a_cold, atol=1e-2)


def test_fake_policy_schedule_and_reset_on_the_steps_clock():
    policy = step_policy()
    ctl = Controller(policy, mode="rtc", delay_steps=2, clock="steps", sampler="sequential", max_records=3)
    for t in range(40):
        s, j = ctl.act(step_obs(t))
        assert s + j == t
    assert len(ctl.records) == 3  # bounded
    ctl.reset()
    assert not ctl.actions and ctl.step == 0 and ctl._in_flight is None
    assert tuple(ctl.act(step_obs(0))) == (0, 0)


def test_extend_plan_runs_the_old_plan_until_a_late_chunk_is_ready():
    """Delay 6 of 8: after a switch 2 actions are queued and the next chunk needs 6 steps. Waiting, every
    chunk after the second stalls; with extend_plan the old chunk's plan past its 8 actions runs instead,
    step for step, and the late chunk takes over, time-aligned, when it is ready."""
    runs = {}
    for extend in (False, True):
        ctl = Controller(step_policy(), mode="async", delay_steps=6, clock="steps", sampler="sequential",
                         extend_plan=extend)
        runs[extend] = ([tuple(ctl.act(step_obs(t))) for t in range(60)], ctl.stats(), list(ctl.records))
    for acts, _, _ in runs.values():
        assert all(s + j == t for t, (s, j) in enumerate(acts))  # every action is for the step it runs at
    acts, waited, _ = runs[False]
    assert waited["stalls"] > 0 and waited["idle_steps"] > 0 and waited["extended_steps"] == 0
    assert max(j for _, j in acts) < H
    acts, extended, records = runs[True]
    assert extended["stalls"] == 0 and extended["idle_steps"] == 0 and extended["extend_plan"]
    assert extended["extended_steps"] == sum(j >= H for _, j in acts) > 0
    assert all(r.switch_step == r.start_step + 6 for r in records[1:])  # each took over when it was ready
    current = {r.switch_step: r.start_step for r in records}
    for t, (s, j) in enumerate(acts):  # an extended action is the plan of the chunk that was in the queue
        if j >= H:
            assert s == current[max(k for k in current if k <= t)]


def test_extend_plan_freezes_the_plan_actions_that_run_before_the_chunk_is_ready():
    """rtc, delay 6, extend_plan: a chunk started with 2 actions queued freezes those and the 4 plan actions
    after them, the 6 that run before it takes over; every frozen action is the one executed at its step."""
    policy = step_policy()
    ctl = Controller(policy, mode="rtc", delay_steps=6, clock="steps", sampler="sequential", extend_plan=True)
    acts = [tuple(ctl.act(step_obs(t))) for t in range(60)]
    later = [(s, prefix) for s, prefix in policy.calls if s > 2]
    assert later and all(prefix is not None and prefix.shape[1] == 6 for _, prefix in later)
    for s, prefix in policy.calls[1:]:
        for j in range(prefix.shape[1]):
            if s + j < len(acts):
                assert tuple(prefix[0, j].tolist()) == acts[s + j], (s, j)
    assert ctl.stats()["extended_steps"] > 0 and ctl.stats()["stalls"] == 0


def test_extend_plan_on_the_wall_clock_never_stalls_where_waiting_does():
    """A chunk takes 6 control periods, the queue covers 2: waiting stalls at every switch; running on
    through the plan (15 steps of it) covers the rest."""
    for extend in (False, True):
        policy = step_policy(latency=lambda: 0.06)
        with Controller(policy, mode="rtc", delay_steps=2, period_s=0.01, sampler="sequential",
                        extend_plan=extend) as ctl:
            run_at_rate(ctl, 40, 0.01)
            s = ctl.stats()
        assert s["switches"] >= 2
        if extend:
            assert s["stalls"] == 0 and s["extended_steps"] >= 3 * s["switches"]
        else:
            assert s["stalls"] == s["switches"] and s["extended_steps"] == 0
    assert not worker_threads()


# ---- the wall clock ---------------------------------------------------------------------

def test_wall_clock_with_a_fixed_delay_gives_the_steps_clock_actions():
    policy = rt_policy()
    obs = observations(30, seed=7)
    for mode in ("async", "rtc"):
        kw = dict(mode=mode, delay_steps=3, window=4, tolerance=0.1, seed=4, extend_plan=False)  # wall: waits
        steps = Controller(policy, clock="steps", **kw)
        a_steps = np.stack([steps.act(o) for o in obs])
        with Controller(policy, clock="wall", **kw) as wall:
            a_wall = np.stack([wall.act(o) for o in obs])
        np.testing.assert_array_equal(a_wall, a_steps)
        assert [r.start_step for r in wall.records] == [r.start_step for r in steps.records]
    assert not worker_threads()


@pytest.mark.parametrize("mode", ["async", "rtc"])
def test_no_race_between_the_worker_and_act(mode):
    """Thousands of steps against a jittery worker: every step gets the action planned for it, chunks
    only move forward, and rtc's frozen actions are the ones handed out."""
    rng = np.random.default_rng(0)
    policy = step_policy(latency=lambda: float(rng.choice([0.0, 0.0002, 0.001])))
    executed = []
    with Controller(policy, mode=mode, delay_steps=2, sampler="sequential", extend_plan=False) as ctl:
        for t in range(3000):
            s, j = (int(v) for v in ctl.act(step_obs(t)))
            assert s + j == t and 0 <= j < H  # the action planned for this step, none lost or repeated
            assert not executed or s >= executed[-1][0]  # never back to a superseded chunk
            executed.append((s, j))
            if t % 7 == 0:
                time.sleep(0.0005)
        stats, in_flight = ctl.stats(), ctl._in_flight is not None
    assert not worker_threads()
    starts = [s for s, _ in policy.calls]
    assert starts == sorted(set(starts)) and len(starts) == stats["chunks"] + in_flight
    assert stats["switches"] == stats["chunks"] - 1 and stats["steps_in_flight"] > 0
    if mode == "rtc":
        for s, prefix in policy.calls[1:]:
            ran = torch.tensor(executed[s: s + prefix.shape[1]], dtype=torch.float32)
            assert prefix.shape[1] >= 1 and torch.equal(prefix[0, : len(ran)], ran)


def test_an_error_in_the_worker_surfaces_in_the_next_act():
    policy = step_policy(fail_at={6})  # the second chunk starts at step 6 (H - d)
    with Controller(policy, mode="async", delay_steps=2, sampler="sequential") as ctl:
        for t in range(7):
            ctl.act(step_obs(t))
        time.sleep(0.05)  # the worker has failed by now
        with pytest.raises(RuntimeError, match="planned at step 6") as info:
            ctl.act(step_obs(7))
        assert isinstance(info.value.__cause__, ValueError) and "boom at 6" in str(info.value.__cause__)
        assert ctl.step == 7 and float(ctl.observations[-1]["obs"][0]) == 6  # the failed step is not recorded
        for t in range(7, 30):  # the step is retried; the schedule goes on
            s, j = ctl.act(step_obs(t))
            assert s + j == t
    assert not worker_threads()


def test_close_and_context_manager_leave_no_thread():
    before = set(threading.enumerate())
    policy = step_policy(latency=lambda: 0.2)
    ctl = Controller(policy, mode="rtc", delay_steps=2, sampler="sequential")
    for t in range(H - 2 + 1):  # the second chunk is in flight
        ctl.act(step_obs(t))
    assert ctl._in_flight is not None and len(worker_threads()) == 1
    ctl.close()
    assert ctl._in_flight is None and not worker_threads() and set(threading.enumerate()) <= before
    with Controller(step_policy(latency=lambda: 0.2), mode="async", delay_steps=2, sampler="sequential") as c:
        for t in range(H):
            c.act(step_obs(t))
        c.reset()  # drops the chunk in flight
        assert c._in_flight is None and tuple(c.act(step_obs(0))) == (0, 0)
    assert not worker_threads()


def run_at_rate(ctl: Controller, steps: int, period: float) -> None:
    next_tick = time.perf_counter()
    for t in range(steps):
        ctl.act(step_obs(t))
        next_tick += period
        time.sleep(max(0.0, next_tick - time.perf_counter()))


def test_wall_clock_stalls_only_when_the_policy_is_slower_than_the_delay():
    fast = step_policy(latency=lambda: 0.002)
    with Controller(fast, mode="rtc", period_s=0.03, sampler="sequential") as ctl:  # delay measured
        run_at_rate(ctl, 40, 0.03)
        s = ctl.stats()
    assert s["stalls"] == 0 and s["switches"] >= 5 and s["delay_used"]["max"] == 1 and s["delay_steps"] is None
    assert s["steps_in_flight"] >= s["switches"]
    slow = step_policy(latency=lambda: 0.06)
    with Controller(slow, mode="async", delay_steps=2, period_s=0.01, sampler="sequential",
                    extend_plan=False) as ctl:
        run_at_rate(ctl, 30, 0.01)  # a chunk takes 6 periods, the queue covers 2
        s = ctl.stats()
    assert s["switches"] >= 2 and s["stalls"] == s["switches"] and s["stall_wait_ms"]["mean"] > 20
    assert s["idle_steps"] is None
    measured = step_policy(latency=lambda: 0.025)
    with Controller(measured, mode="async", period_s=0.01, sampler="sequential") as ctl:
        run_at_rate(ctl, 40, 0.01)  # d = ceil(1.25 · 25 ms / 10 ms) = 4 once measured (a quarter for jitter)
        s = ctl.stats()
    assert 4 <= ctl._delay() <= H - 1 and s["delay_used"]["max"] >= 4
    assert not worker_threads()


# ---- settings ---------------------------------------------------------------------------

def test_bad_settings_are_refused():
    policy = rt_policy()
    cases = [
        (dict(mode="asap"), "mode must be 'sync', 'async' or 'rtc'"),
        (dict(mode="rtc", clock="cpu", delay_steps=1), "clock must be 'wall' or 'steps'"),
        (dict(mode="rtc", delay_steps=H, clock="steps"), r"delay_steps must be an integer in \[0, n_action_steps"),
        (dict(mode="rtc", delay_steps=-1, clock="steps"), "delay_steps must be an integer"),
        (dict(mode="rtc", delay_steps=True, clock="steps"), "delay_steps must be an integer"),
        (dict(delay_steps=2), "delay_steps=2 applies to mode='async' or 'rtc'"),
        (dict(mode="async", clock="steps"), "pass delay_steps"),
        (dict(mode="async", clock="steps", delay_steps=2, deadline_ms=50), "deadline_ms"),
        (dict(mode="async"), "needs period_s"),
        (dict(mode="async", delay_steps=0), "delay_steps=0 with clock='wall'"),
        (dict(mode="rtc", period_s=0), "period_s must be a number > 0"),
        (dict(extend_plan=True), "extend_plan=True applies to mode='async' or 'rtc'"),
        (dict(mode="rtc", delay_steps=2, extend_plan="yes"), "extend_plan must be true or false"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            Controller(policy, **kw)
    Controller(policy, mode="rtc", delay_steps=2, deadline_ms=50).close()  # a deadline is fine on the wall clock
    one = LowdimPolicy({**tiny_config(), "n_action_steps": 1})
    with pytest.raises(ValueError, match="n_action_steps >= 2"):
        Controller(one, mode="async", period_s=0.1)
