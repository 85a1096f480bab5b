"""SamplingSession on its own: a tiny denoiser, checked against the sequential loop; warm start, reset, window."""

from __future__ import annotations

import pytest
import torch
from conftest import MLPDenoiser, dp_ddpm

from para_policy import SamplingSession, draw_noise, sampler_spec, sequential_sample
from para_policy.session import WindowIdentity

B, T, D, STEPS = 2, 6, 3, 20


def problem(seed: int, batch: int = B) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, 4, generator=g)
    return cond, *draw_noise(session_schedule(), (batch, T, D), g)


_SCHEDULER = dp_ddpm()


def session_schedule(session: SamplingSession | None = None):
    session = session or SamplingSession("sequential")
    return session.schedule_for(session.spec, _SCHEDULER, STEPS)


def test_run_gives_the_sequential_sample_at_tolerance_0():
    denoiser = MLPDenoiser()
    session = SamplingSession(sampler_spec("paradigms", window=4, tolerance=0.0))
    schedule = session_schedule(session)
    cond, x_T, noise = problem(0)
    trajectory, actions, stats, warm = session.run(denoiser, session.spec, schedule, x_T, noise, condition=cond)
    reference, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond)
    assert torch.allclose(trajectory, reference, atol=1e-4) and actions is trajectory and not warm
    assert stats.model_evals > stats.rounds * B  # Picard rounds over windows ran, not the loop
    assert session.last_trajectory is trajectory and session.last_stats is stats


def test_warm_start_memory_is_used_for_the_same_call_shape_and_cleared_by_reset():
    denoiser = MLPDenoiser()
    session = SamplingSession(sampler_spec("paradigms", window=4, tolerance=0.0), n_action_steps=2)
    schedule = session_schedule(session)
    warm = []
    for seed in range(3):
        cond, x_T, noise = problem(seed)
        out = session.run(denoiser, session.spec, schedule, x_T, noise, condition=cond)
        reference, _ = sequential_sample(denoiser, schedule, x_T, noise, condition=cond)
        assert torch.allclose(out.trajectory, reference, atol=1e-4)  # tolerance 0: the guess changes nothing
        warm.append((out.warm, out.stats.warm))
    assert warm == [(False, False), (True, True), (True, True)]
    session.reset()
    cond, x_T, noise = problem(3)
    assert not session.run(denoiser, session.spec, schedule, x_T, noise, condition=cond).warm
    cond, x_T, noise = problem(4, batch=3)  # another batch shape: cold
    assert not session.run(denoiser, session.spec, schedule, x_T, noise, condition=cond).warm
    window_1 = session.spec.with_options(window=1)  # the sequential loop never reads a guess
    cond, x_T, noise = problem(5, batch=3)
    assert not session.run(denoiser, window_1, schedule, x_T, noise, condition=cond).warm


def test_window_auto_is_tuned_once_cold_and_identity_is_read_only_when_needed(monkeypatch):
    monkeypatch.setenv("PARA_POLICY_CACHE_DIR", "off")
    session = SamplingSession("paradigms")
    schedule = session_schedule(session)
    asked, tuned = [], []

    def identity() -> WindowIdentity:
        asked.append(1)
        return WindowIdentity(f"test-session-{id(session)}", torch.device("cpu"))

    def tune(spec):
        tuned.append(spec)
        return 8, {"predicted_ms": {8: 1.0}}

    for _ in range(2):
        resolved = session.resolve(session.spec, schedule, B, identity, tune)
        assert resolved.options["window"] == 8 and resolved.warm_start
    assert len(tuned) == 1 and tuned[0].window_is_auto and not tuned[0].warm_start
    assert session.window_tuning(session.spec, schedule, B, identity())["window"] == 8
    asked.clear()
    fixed = sampler_spec("paradigms", window=4)
    assert session.resolve(fixed, schedule, B, identity, tune) is fixed and not asked
    cond, x_T, noise = problem(0)
    with pytest.raises(ValueError, match="resolve window='auto' first"):
        session.run(MLPDenoiser(), session.spec, schedule, x_T, noise, condition=cond)


def test_schedules_are_cached_per_choice_and_scheduler_object():
    session = SamplingSession("paradigms")
    spec = session.spec
    first = session.schedule_for(spec, _SCHEDULER, STEPS)
    assert session.schedule_for(spec, _SCHEDULER, STEPS) is first
    assert session.schedule_for(spec.with_options(num_inference_steps=10), _SCHEDULER, STEPS).num_steps == 10
    assert session.schedule_for(spec, dp_ddpm(), STEPS) is not first  # a replaced scheduler: its own schedule
