"""Episodes through a :class:`~para_policy.controller.Controller`: asynchronous inference and real-time chunking.

The batched loop (:func:`~.rollout.run_rollouts`) waits for every chunk, as DiffusionPolicy's
evaluation does; a robot that keeps moving while the next chunk is computed sees something
else. Here each episode runs through the Controller a robot loop would run
(``controller.mode=async|rtc``), so the evaluator measures that schedule itself, not a copy:

* **Steps clock** (``controller.clock=steps``): the Controller computes a chunk at once and
  counts it ready ``delay_steps`` control steps later, so the episode is what a robot with
  exactly that latency would do, on any machine, deterministically.
* **Wall clock** (``controller.clock=wall``): the env is stepped every ``1 / control_hz``
  seconds on a fixed grid (sleep to the next tick, never drift; a late step runs at once and
  the grid stays), the Controller samples on its worker thread and measures its delay from
  this machine's latency; stalls (``act`` waiting for a chunk) are counted. Not deterministic.
* **Same noise as the batched loop.** Each chunk's ``x_T`` and step noise come from
  :func:`~.rollout.call_noise` keyed by ``(noise seed, episode seed, chunk index)``, as in the
  batched loop (:class:`KeyedNoisePolicy`), so the candidate and the baseline get the same
  noise stream, and ``rtc`` at delay 0 gives the batched loop's sync episodes.

One env and one Controller run the episodes one after another: every chunk is a batch-1
call either way (``num_envs`` does not apply). Records have the batched loop's fields plus
the Controller's statistics of the episode (:data:`CONTROLLER_FIELDS`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium
import numpy as np
import torch

from para_policy.controller import Controller
from para_policy.evaluation import rollout
from para_policy.evaluation.config import ControllerSettings, TaskSettings
from para_policy.evaluation.rollout import (
    ROLLOUT_STREAM,
    EpisodeSlot,
    call_noise,
    episode_record,
    render_frame,
    step_observation,
)
from para_policy.policy import LowdimPolicy, PolicyOutput
from para_policy.samplers import SamplerConfig

#: per-episode Controller statistics added to a record (``switch_discontinuity_*`` in the task's action unit);
#: ``idle_steps`` is None on the wall clock; the wall clock adds :data:`WALL_FIELDS`, and ``controller.extend_plan``
#: adds ``extended_steps``
CONTROLLER_FIELDS = ("stalls", "switches", "switch_discontinuity_mean", "switch_discontinuity_max", "steps_in_flight",
                     "idle_steps", "delay_used_mean", "delay_used_max")
WALL_FIELDS = ("late_steps", "stall_wait_ms_max", "chunk_latency_ms_p50", "chunk_latency_ms_max", "deadline_misses")


class KeyedNoisePolicy:
    """The policy as the Controller sees it, with each chunk's noise keyed as the batched loop keys it.

    The Controller draws its noise from one generator per run, so its k-th chunk would get
    noise that depends on what came before. This wrapper replaces it by
    ``call_noise(key=(ROLLOUT_STREAM, noise_seed, episode_seed, k))``, the batched loop's noise
    for the same chunk, and records each call's observation history and warm-start guess (the
    inputs of the latency pass). Everything else is the policy's (attribute lookups pass through).
    """

    def __init__(self, policy: LowdimPolicy, spec: SamplerConfig, noise_seed: int, record: bool = False) -> None:
        self._policy = policy
        self._schedule = policy.schedule_for(spec)
        self._sample_shape = tuple(policy.trajectory_shape(1)[1:])
        self._noise_seed, self._record = int(noise_seed), record
        self.begin(-1)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_policy":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._policy, name)

    def begin(self, episode_seed: int) -> None:
        """A new episode: chunk indices count from 0 again; the recorded inputs are cleared."""
        self._episode_seed, self.chunk = int(episode_seed), 0
        self.inputs: list[tuple[dict[str, np.ndarray], np.ndarray | None]] = []

    def predict_action(self, obs_dict: Mapping[str, torch.Tensor], *, generator: torch.Generator | None = None,
                       guess: torch.Tensor | None = None, **kwargs: Any) -> PolicyOutput:
        """``policy.predict_action`` on ``{key: (1, To, *shape)}`` with this chunk's keyed ``x_T`` and noise."""
        del generator  # replaced by the keyed noise
        key = (ROLLOUT_STREAM, self._noise_seed, self._episode_seed, self.chunk)
        x_T, noise = call_noise(self._schedule, self._sample_shape, [key], self._policy.device,
                                self._policy.sample_dtype)
        self.chunk += 1
        if self._record:
            history = {k: v[0].detach().cpu().numpy().astype(np.float32) for k, v in obs_dict.items()}
            self.inputs.append((history, None if guess is None else guess[0].detach().cpu().numpy()))
        return self._policy.predict_action(obs_dict, x_T=x_T, noise=noise, guess=guess, **kwargs)


def make_controller(policy: LowdimPolicy | KeyedNoisePolicy, spec: SamplerConfig, settings: ControllerSettings,
                    seed: int = 0) -> Controller:
    """The Controller ``settings`` describe (:meth:`ControllerSettings.controller_config`), sampling with
    ``spec`` (whose window is already resolved).

    ``settings.deadline_ms`` applies to Picard samplers only: the sequential baseline runs every step.
    """
    return Controller(policy, sampler=spec, config=settings.controller_config(seed=seed, with_deadline=spec.iterative))


def controller_fields(stats: Mapping[str, Any], late_steps: int | None = None) -> dict[str, Any]:
    """An episode's :data:`CONTROLLER_FIELDS` (wall clock: and :data:`WALL_FIELDS`) from ``Controller.stats()``."""
    jump, delay = stats["switch_discontinuity"], stats["delay_used"]
    out: dict[str, Any] = {
        "stalls": int(stats["stalls"]),
        "switches": int(stats["switches"]),
        "switch_discontinuity_mean": jump["mean"],
        "switch_discontinuity_max": jump["max"],
        "steps_in_flight": int(stats["steps_in_flight"]),
        "idle_steps": None if stats["idle_steps"] is None else int(stats["idle_steps"]),
        "delay_used_mean": delay["mean"],
        "delay_used_max": None if delay["max"] is None else int(delay["max"]),
    }
    if stats.get("extend_plan"):
        out["extended_steps"] = int(stats["extended_steps"])
    if stats["clock"] == "wall":
        out.update(late_steps=late_steps, stall_wait_ms_max=stats["stall_wait_ms"]["max"],
                   chunk_latency_ms_p50=stats["chunk_latency_ms"]["p50"],
                   chunk_latency_ms_max=stats["chunk_latency_ms"]["max"],
                   deadline_misses=int(stats["deadline_misses"]))
    return out


def wait_for_tick(next_tick: float, period_s: float) -> tuple[float, bool]:
    """Sleep until ``next_tick`` (a ``perf_counter`` instant on the ``t0 + k * period_s`` grid).

    Returns ``(the tick after it, whether this one was missed)``. A missed tick is not made
    up by running steps back to back: the step runs at once and the grid resumes at the next
    tick after now, so the loop never drifts and never bursts.
    """
    now = time.perf_counter()
    if now < next_tick:
        time.sleep(next_tick - now)
        return next_tick + period_s, False
    missed = math.floor((now - next_tick) / period_s)
    return next_tick + (missed + 1) * period_s, True


def _run_episode(env: gymnasium.Env, controller: Controller, slot: EpisodeSlot, shapes: Mapping[str, tuple[int, ...]],
                 max_steps: int, period: float | None) -> tuple[BaseException | None, int]:
    """Step ``slot``'s episode through ``controller`` to its end; ``(the exception it raised or None, late steps)``.

    On the wall clock (``period`` in seconds) each step waits for its tick (:func:`wait_for_tick`).
    The Controller is reset at the end either way: a chunk still in flight is waited for and dropped.
    """
    late = 0
    try:
        obs, _ = env.reset(seed=int(slot.seed))
        render_frame(slot)
        next_tick = time.perf_counter() + (period or 0.0)
        while True:
            action = controller.act(step_observation(obs, shapes))
            obs, reward, terminated, truncated, info = env.step(action)
            slot.steps += 1
            slot.rewards.append(float(reward))
            slot.success |= bool(info.get("is_success", False))
            render_frame(slot)
            if terminated or truncated or slot.steps >= max_steps:
                break
            if period is not None:
                next_tick, missed = wait_for_tick(next_tick, period)
                late += missed
    except Exception as e:  # recorded, the evaluation goes on
        return e, late
    finally:
        controller.reset()
    return None, late


def _controller_record(slot: EpisodeSlot, controller: Controller, keyed: KeyedNoisePolicy,
                       error: BaseException | None, late: int | None, record_obs: bool) -> dict[str, Any]:
    """The episode's record: the batched loop's fields over the chunks that took over the queue, plus
    :data:`CONTROLLER_FIELDS` (``late``: the wall clock's late steps, None on the steps clock)."""
    looped = [r for r in controller.records if r.start_step is not None]
    slot.chunk, slot.rounds = len(looped), [int(r.rounds) for r in looped]
    inputs = keyed.inputs[: len(looped)]
    slot.chunk_obs = [o for o, _ in inputs]
    slot.chunk_guess = [g for _, g in inputs]
    rec = episode_record(slot, error, record_obs and bool(inputs))
    rec.update(controller_fields(controller.stats(), late))
    return rec


def run_controller_rollouts(
    policy: LowdimPolicy,
    spec: SamplerConfig,
    task: TaskSettings,
    seeds: Sequence[int],
    settings: ControllerSettings,
    *,
    noise_seed: int = 0,
    video_seed: int | None = None,
    video_size: int = 256,
    record_obs: bool = False,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
    env_factory: Callable[..., gymnasium.Env] | None = None,
    progress: bool = True,
    desc: str = "controller",
) -> tuple[list[dict[str, Any]], list[np.ndarray] | None]:
    """Run one episode per seed through one Controller with ``settings``, one episode at a time.

    Args are :func:`~.rollout.run_rollouts`'s (``num_envs`` aside), plus ``settings``: the mode,
    delay and clock. ``record_obs`` keeps the observation history and warm-start guess of each
    chunk that took over the queue (``chunk_obs``, ``chunk_guess``), as the batched loop does.
    Returns:
        ``(records in seed order, frames of the video episode or None)``. A record has the
        batched loop's fields (``n_chunks`` and ``rounds_per_chunk`` count the chunks that
        took over the queue; a chunk still in flight when the episode ends is dropped) and
        :data:`CONTROLLER_FIELDS`; an episode that raised has ``error`` and ``traceback``.
    """
    from tqdm.auto import tqdm

    env_factory = env_factory or rollout.make_task_env  # looked up now: tests swap it
    shapes = policy.observation_shapes()
    keyed = KeyedNoisePolicy(policy, spec, noise_seed, record=record_obs)
    controller = make_controller(keyed, spec, settings, seed=noise_seed)
    period = settings.period_s
    records: dict[int, dict[str, Any]] = {}
    video: list[np.ndarray] | None = None
    env = env_factory(task, render=video_seed is not None, video_size=video_size)
    bar = tqdm(total=len(seeds), desc=desc, unit="ep", disable=not progress, leave=False)
    try:
        for seed in seeds:
            slot = EpisodeSlot(env, seed=int(seed), started=time.perf_counter(), active=True)
            slot.frames = [] if seed == video_seed else None
            controller.reset()
            controller.reset_stats()
            keyed.begin(seed)
            error, late = _run_episode(env, controller, slot, shapes, task.max_steps, period)
            rec = _controller_record(slot, controller, keyed, error, late if period is not None else None, record_obs)
            records[int(seed)] = rec
            if slot.frames is not None and error is None:
                video = slot.frames
            bar.update(1)
            ok = [r for r in records.values() if r["error"] is None]
            bar.set_postfix(score=f"{np.mean([r['max_reward'] for r in ok]):.3f}" if ok else "-",
                            stalls=sum(r["stalls"] for r in records.values()))
            if on_episode is not None:
                on_episode(rec)
    finally:
        bar.close()
        controller.close()
        try:
            env.close()
        except Exception:
            pass
    order = {int(s): i for i, s in enumerate(seeds)}
    return [records[s] for s in sorted(records, key=order.__getitem__)], video
