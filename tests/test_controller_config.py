"""One ControllerConfig (issue 27) and the Controller's defaults and recovery (issue 31).

* keywords, a config object and the evaluator's ``controller`` group build the same checked config;
* a failed synchronous ``act()`` leaves the observation history as it was;
* ``mode='async'`` / ``'rtc'`` with their defaults run the current plan on instead of stalling;
* a misspelled Controller option is reported as a Controller option, not as a sampler's.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from test_controller import observations, small_policy
from test_policy import NA, TO
from test_realtime import H, rt_policy, step_obs, step_policy, worker_threads

from para_policy.controller import Controller, ControllerConfig, ControllerConfigError

# ---- one config --------------------------------------------------------------------------


def test_keywords_and_a_config_object_build_the_same_controller():
    policy = rt_policy()
    config = ControllerConfig(mode="rtc", delay_steps=2, clock="steps", seed=3)
    assert (config.prefix_mode, config.soft_masking, config.extend_plan) == ("clean", True, True)  # resolved
    by_config = Controller(policy, sampler="sequential", config=config)
    by_keywords = Controller(policy, sampler="sequential", mode="rtc", delay_steps=2, clock="steps", seed=3)
    assert by_config.config == by_keywords.config == config
    obs = observations(20, seed=1)
    np.testing.assert_array_equal(np.stack([by_config.act(o) for o in obs]),
                                  np.stack([by_keywords.act(o) for o in obs]))
    with pytest.raises(ValueError, match=r"\['mode'\] are ControllerConfig fields: pass them in config or as "
                                         r"keywords, not both"):
        Controller(policy, config=config, mode="sync")


def test_the_config_is_checked_once_without_a_policy():
    with pytest.raises(ControllerConfigError, match=r"^mode must be 'sync', 'async' or 'rtc', got 'rct' "
                                                    r"\(did you mean 'rtc'\?\)") as info:
        ControllerConfig(mode="rct")
    assert info.value.key == "mode"
    with pytest.raises(ControllerConfigError, match=r"^prefix_mode='noised' applies to mode='rtc' only"):
        ControllerConfig(mode="async", period_s=0.1, prefix_mode="noised")
    with pytest.raises(ControllerConfigError, match=r"^deadline_ms=50 applies to clock='wall' only"):
        ControllerConfig(clock="steps", deadline_ms=50)
    with pytest.raises(ControllerConfigError, match=r"^warm_start must be true or false, got 1"):
        ControllerConfig(warm_start=1)
    assert ControllerConfig(delay_steps=0).delay_steps is None  # sync is delay 0
    with pytest.raises(ControllerConfigError, match=r"^delay_steps must be an integer in \[0, n_action_steps - 1\] "
                                                    r"= \[0, 3\]"):
        ControllerConfig(mode="rtc", delay_steps=4, clock="steps").check_policy(4)


def test_the_evaluators_controller_group_builds_a_controller_config():
    pytest.importorskip("omegaconf")
    from para_policy.evaluation.config import ControllerSettings, EvalConfigError

    settings = ControllerSettings("rtc", 2, "steps", None, "clean", True)
    assert settings.controller_config(seed=3) == ControllerConfig(mode="rtc", delay_steps=2, clock="steps", seed=3,
                                                                  extend_plan=False)
    with pytest.raises(EvalConfigError, match=r"^controller\.delay_steps must be an integer in "
                                              r"\[0, n_action_steps - 1\] = \[0, 1\].*got 2"):
        settings.check_policy(2)
    with pytest.raises(EvalConfigError, match=r"^controller\.extend_plan=True applies to mode='async' or 'rtc'"):
        ControllerSettings(extend_plan=True)


def test_the_controller_does_not_import_the_evaluator():
    code = ("import sys, para_policy.controller; "
            "sys.exit(any(m.startswith('para_policy.evaluation') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# ---- issue 31: a failed act() ------------------------------------------------------------

@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_failed_sync_chunk_leaves_the_history_as_it_was(error):
    """The chunk at step NA raises once: the retried step is planned from [obs_{NA-1}, obs_NA], not
    [obs_NA, obs_NA], and the run goes on as one that never failed."""
    policy = small_policy()
    seen: list[torch.Tensor] = []  # the observation history of every chunk asked for
    inner = policy.predict_action
    fail = [True]

    def predict_action(obs_dict, **kw):
        seen.append(obs_dict["obs"][0].clone())
        if len(seen) == 2 and fail:
            fail.clear()
            raise error("the sampler failed")
        return inner(obs_dict, **kw)

    policy.predict_action = predict_action
    obs = observations(2 * NA + 1)
    ctl = Controller(policy, sampler="sequential", seed=0)
    actions = [ctl.act(o) for o in obs[:NA]]
    with pytest.raises(error):
        ctl.act(obs[NA])
    assert ctl.step == NA and torch.equal(ctl.observations[-1]["obs"], torch.as_tensor(obs[NA - 1]))  # not recorded
    actions += [ctl.act(o) for o in obs[NA:]]
    assert len(seen) == 4 and torch.equal(seen[1], seen[2])  # the retry saw what the failed call saw:
    assert torch.equal(seen[2], torch.as_tensor(obs[NA - TO + 1: NA + 1]))  # the last TO observations
    del policy.predict_action
    reference = Controller(policy, sampler="sequential", seed=0)
    np.testing.assert_array_equal(np.stack(actions), np.stack([reference.act(o) for o in obs]))


# ---- issue 31: asynchronous defaults never stall -----------------------------------------

@pytest.mark.parametrize("mode", ["async", "rtc"])
def test_async_defaults_run_the_plan_on_while_a_chunk_is_late(mode):
    """A chunk that takes longer than its queue covers: the default never blocks ``act``. Every chunk after
    the first waits for a gate that the test opens only after 15 steps (the first chunk's whole plan); an
    ``act`` that waited for that chunk would wait for the gate's timeout instead, and count a stall."""
    gate = threading.Event()
    policy = step_policy()

    def latency() -> float:
        if len(policy.calls) > 1:  # not the first chunk: wait for the gate
            gate.wait(timeout=3.0)
        return 0.0

    policy.latency = latency
    with Controller(policy, mode=mode, period_s=0.1, sampler="sequential") as ctl:  # d measured
        assert ctl.extend_plan
        plan = 16 - policy.action_start  # the first chunk's actions from step 0: its whole horizon
        acts = [tuple(ctl.act(step_obs(t))) for t in range(plan)]
        assert not gate.is_set() and ctl.stats()["stalls"] == 0  # no act() waited for the gated chunk
        gate.set()
        ctl._in_flight.future.result(timeout=10)  # ready now: the next step switches to it
        for t in range(plan, plan + 10):  # the ungated chunks are fast: give each its time, as a control period
            if ctl._in_flight is not None:  # would (tight loop, no period) race the worker thread for the GIL
                ctl._in_flight.future.result(timeout=10)
            acts.append(tuple(ctl.act(step_obs(t))))
        s = ctl.stats()
    assert all(s_ + j == t for t, (s_, j) in enumerate(acts))  # every action is the one planned for its step
    assert s["stalls"] == 0 and s["switches"] >= 1 and s["extended_steps"] >= plan - H
    assert not worker_threads()


def test_async_defaults_never_stall_on_the_steps_clock():
    """Delay 6 of 8: the next chunk is due 6 steps after it starts, when 2 actions are queued. The waiting
    schedule stalls at every switch after the first; the default runs the old plan on."""
    ctl = Controller(step_policy(), mode="async", delay_steps=6, clock="steps", sampler="sequential")
    acts = [tuple(ctl.act(step_obs(t))) for t in range(60)]
    s = ctl.stats()
    assert all(s_ + j == t for t, (s_, j) in enumerate(acts))
    assert s["stalls"] == 0 and s["idle_steps"] == 0 and s["extended_steps"] > 0 and s["extend_plan"]
    waiting = Controller(step_policy(), mode="async", delay_steps=6, clock="steps", sampler="sequential",
                         extend_plan=False)
    for t in range(60):
        waiting.act(step_obs(t))
    assert waiting.stats()["stalls"] > 0 and not Controller(step_policy(), sampler="sequential").extend_plan


# ---- issue 31: options reported as whose they are ----------------------------------------

def test_a_misspelled_controller_option_is_reported_as_a_controller_option():
    policy = rt_policy()
    with pytest.raises(ValueError, match=r"^Controller does not take \['asynchronous'\]: not a Controller option "
                                         r"\(mode, delay_steps, .*\) and not an option of sampler 'paradigms'"):
        Controller(policy, asynchronous=True)
    with pytest.raises(ValueError, match=r"^Controller does not take \['extend_plans'\] \(did you mean "
                                         r"'extend_plan'\?\)"):
        Controller(policy, mode="async", period_s=0.1, extend_plans=True)
    with pytest.raises(ValueError, match=r"\['windw'\] \(did you mean 'window'\?\).*sampler 'paradigms'"):
        Controller(policy, windw=4)
    with pytest.raises(ValueError, match=r"sampler 'sequential' \(sampler=None: the policy's own\)"):
        Controller(policy, sampler=None, tolerance=0.1)  # the policy's own sampler is sequential
    with pytest.raises(ValueError, match=r"^sampler 'paradigms': tolerance must be"):  # a value: the sampler's check
        Controller(policy, tolerance=-1)
