"""Closed-loop rollouts of a policy in several envs at once, with reproducible noise per policy call.

Why it is shaped this way:

* **Throughput.** ``num_envs`` envs run side by side and their observations go through
  one batched ``predict_action`` call. Picard sampling keeps one window per sample
  (``per_sample_windows``), so an env whose chunk converges early does not wait for the
  slowest one. When an episode ends its env takes the next seed from the queue.
* **Same noise for every sampler.** The initial noise ``x_T`` and the per-step noise of
  each call are drawn by :func:`call_noise` from a generator seeded by
  ``(noise seed, episode seed, chunk index)`` only, one sample at a time, so the noise
  an episode's k-th chunk gets does not depend on the sampler, on ``num_envs`` or on
  which other envs share the batch. Two samplers that produce the same actions therefore
  produce the same episode, bit for bit.
* **Robustness.** An exception in one episode (env reset/step, or its policy call) is
  recorded with the episode's seed and the other episodes go on; ``on_episode`` is called
  after every finished episode so the caller can save progress.
* **One loop for flat and dict observations.** Each env step's observation is held as a
  dict keyed like the policy's :meth:`~para_policy.policy.LowdimPolicy.observation_shapes`
  (``{'obs': (Do,)}`` for a low-dim policy, ``{'image': (3, 96, 96), 'agent_pos': (2,)}``
  for PushT's image policy), and a batched call stacks each key into (B, To, *shape): the
  same ``predict_action`` dict whichever the policy is.

DiffusionPolicy's conventions: the observation history holds the last ``n_obs_steps``
observations (the first one repeated after reset), each chunk executes
``n_action_steps`` actions, the episode score is the max reward over the episode, and
its success is the env's own ``info['is_success']`` (PushT: coverage above gym-pusht's
threshold; Lift: the cube lifted above the table), the one definition every caller uses.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium
import numpy as np
import torch

from para_policy.bench.noise import keyed_noise, seed_for
from para_policy.evaluation.config import (
    FLAT_KEY,
    PIXELS_OBS_TYPE,
    ROBOSUITE_PREFIX,
    TaskSettings,
    env_key,
    format_shapes,
)
from para_policy.policy import LowdimPolicy
from para_policy.samplers import SamplerConfig, shift_trajectory
from para_policy.schedule import Schedule

ENV_PREFIX_HINT = f"{ROBOSUITE_PREFIX}Lift"
ROLLOUT_STREAM = 0
LATENCY_STREAM = 1


def call_noise(
    schedule: Schedule,
    sample_shape: tuple[int, int],
    keys: Sequence[tuple[int, ...]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_T`` (B, T, D) and step noise (B, S, T, D) for a batch, one seeded generator per row.

    Args:
        schedule: the schedule the call samples on (it decides which steps draw noise).
        sample_shape: ``(T, D)`` of one trajectory.
        keys: one key tuple per row, e.g. ``(stream, noise_seed, episode_seed, chunk_index)``, hashed by
            :func:`~para_policy.bench.noise.seed_for` (the policy server draws a ``noise_key`` the same way).
    """
    return keyed_noise(schedule, sample_shape, [seed_for(*key) for key in keys], device, dtype)


def make_task_env(task: TaskSettings, render: bool = False, video_size: int = 256) -> gymnasium.Env:
    """The task's env with the policy's observation and a ``max_steps`` time limit.

    PushT: gym-pusht with the 20-d keypoint observation, its raw 5-d state (``obs_type:
    state``), or DiffusionPolicy's image observation (``obs_type: pixels_agent_pos``:
    ``{'image': (3, H, W) float32 in [0, 1], 'agent_pos': (2,)}``, H and W from
    ``task.obs_shapes``). Lift (``env_id`` ``robosuite/Lift``):
    :class:`para_policy.tasks.lift.env.LiftEnv`, 19-d, ending at the first success; raises
    ``MissingExtraError`` with the install hint without the ``[lift]`` extra.
    ``render`` makes the env render ``rgb_array`` frames of ``video_size`` pixels when asked
    (rendering costs nothing until ``env.render()`` is called).
    """
    if task.env_id.startswith(ROBOSUITE_PREFIX):
        from para_policy.tasks.lift.env import ENV_NAME, make_env

        name = task.env_id[len(ROBOSUITE_PREFIX):]
        if name != ENV_NAME:
            raise ValueError(f"robosuite task {name!r} is not supported; only {ENV_PREFIX_HINT}")
        return make_env(max_episode_steps=task.max_steps, render_mode="rgb_array" if render else None,
                        render_size=video_size)
    kw: dict[str, Any] = {"max_episode_steps": task.max_steps}
    if render:
        kw.update(render_mode="rgb_array", visualization_width=video_size, visualization_height=video_size)
    if task.env_id.startswith("gym_pusht/"):
        from para_policy.tasks.pusht.env import ENV_ID, make_env

        if task.env_id != ENV_ID:
            raise ValueError(f"PushT task {task.env_id!r} is not supported; only {ENV_ID}")
        if task.obs_type == PIXELS_OBS_TYPE:
            _, height, width = (task.obs_shapes or {}).get("image", (3, 96, 96))
            kw.update(obs_type=task.obs_type, observation_height=height, observation_width=width)
        return make_env(keypoints=task.obs_type == "keypoints", **kw)
    return gymnasium.make(task.env_id, **kw)


def step_observation(obs: Any, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """One env step's observation as the policy's keys → float32 arrays of their shapes.

    Args:
        obs: what the env returned: a flat array (low-dim tasks) or a dict (image tasks).
        shapes: the policy's :meth:`~para_policy.policy.LowdimPolicy.observation_shapes`.
    Returns:
        ``{key: (*shape,) float32}``: ``{'obs': (Do,)}`` for a flat observation.
    Raises:
        ValueError: naming the key and the shapes when the env's observation does not fit.
    """
    if not isinstance(obs, Mapping):
        arr = np.asarray(obs, dtype=np.float32)
        if set(shapes) != {FLAT_KEY}:
            raise ValueError(f"env observation is a flat array of shape {arr.shape}, the policy takes a dict with "
                             f"{format_shapes(shapes)}")
        if arr.shape != tuple(shapes[FLAT_KEY]):
            raise ValueError(f"env observation has shape {arr.shape}, the policy expects {tuple(shapes[FLAT_KEY])}")
        return {FLAT_KEY: arr}
    out = {}
    for key, shape in shapes.items():
        name = env_key(key, obs)  # a LeRobot policy's 'observation.image' is the env's 'image'
        if name not in obs:
            raise ValueError(f"env observation has no {key!r} (it has {sorted(obs)}); the policy takes "
                             f"{format_shapes(shapes)}")
        arr = np.asarray(obs[name], dtype=np.float32)
        if arr.shape != tuple(shape):
            raise ValueError(f"env observation {key!r} has shape {arr.shape}, the policy expects {tuple(shape)}")
        out[key] = arr
    return out


def stack_history(history: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The last ``n_obs_steps`` step observations, stacked per key: ``{key: (To, *shape)}``."""
    return {key: np.stack([h[key] for h in history]) for key in history[0]}


@dataclass
class EpisodeSlot:
    """One env of the batch and the episode it is running (the Controller loop of :mod:`.realtime` uses one too)."""

    env: gymnasium.Env
    seed: int = -1
    history: deque = field(default_factory=deque)
    chunk: int = 0
    steps: int = 0
    rewards: list[float] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    success: bool = False  # the env's info['is_success'] at any step: the task's one definition
    chunk_obs: list[dict[str, np.ndarray]] = field(default_factory=list)  # per chunk {key: (To, *shape)}
    guess: torch.Tensor | None = None  # warm start of the next chunk, normalized (1, T, D)
    chunk_guess: list[np.ndarray | None] = field(default_factory=list)
    frames: list[np.ndarray] | None = None
    started: float = 0.0
    active: bool = False


def _error_record(exc: BaseException) -> tuple[str, str]:
    return f"{type(exc).__name__}: {exc}", "".join(traceback.format_exception(exc))[-4000:]


def episode_record(slot: EpisodeSlot, error: BaseException | None = None, record_obs: bool = False) -> dict[str, Any]:
    """The record of a finished (or failed) episode: JSON, except a dict observation's ``chunk_obs``.

    ``chunk_obs`` is a list of (To, Do) lists for flat observations (small: it goes into
    progress.json as it is) and ``{key: (n_chunks, To, *shape) float32 array}`` for dict
    observations (images: the caller stores it elsewhere, see :func:`run_rollouts`).
    """
    rec: dict[str, Any] = {
        "seed": slot.seed,
        "max_reward": float(max(slot.rewards)) if slot.rewards else 0.0,
        "success": bool(slot.success),
        "length": int(slot.steps),
        "n_chunks": int(slot.chunk),
        "rounds_per_chunk": [int(r) for r in slot.rounds],
        "wall_time_s": round(time.perf_counter() - slot.started, 3),
        "error": None,
    }
    if record_obs:
        flat = all(set(o) == {FLAT_KEY} for o in slot.chunk_obs)
        if flat:
            rec["chunk_obs"] = [o[FLAT_KEY].tolist() for o in slot.chunk_obs]
        else:
            rec["chunk_obs"] = {key: np.stack([o[key] for o in slot.chunk_obs]) for key in slot.chunk_obs[0]}
        if any(g is not None for g in slot.chunk_guess):
            rec["chunk_guess"] = [None if g is None else g.tolist() for g in slot.chunk_guess]
    if error is not None:
        rec["error"], rec["traceback"] = _error_record(error)
    return rec


def render_frame(slot: EpisodeSlot) -> None:
    """Append the env's current ``rgb_array`` frame to ``slot.frames`` (a slot without frames records none).

    A broken renderer loses the video, not the episode: it is reported and recording stops.
    """
    if slot.frames is None:
        return
    try:
        slot.frames.append(np.asarray(slot.env.render()))
    except Exception as e:
        print(f"warning: rendering seed {slot.seed} failed ({type(e).__name__}: {e}); no video")
        slot.frames = None


@dataclass
class _BatchedLoop:
    """What :func:`run_rollouts`'s steps share: the call settings, the slots and the finished records."""

    policy: LowdimPolicy
    spec: SamplerConfig
    task: TaskSettings
    schedule: Schedule
    sample_shape: tuple[int, int]  # (T, D) of one trajectory
    shapes: dict[str, tuple[int, ...]]
    noise_seed: int
    record_obs: bool
    on_episode: Callable[[dict[str, Any]], None] | None
    video_seed: int | None
    bar: Any
    slots: list[EpisodeSlot] = field(default_factory=list)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    video: list[np.ndarray] | None = None


def _finish(loop: _BatchedLoop, slot: EpisodeSlot, error: BaseException | None = None) -> None:
    """Record ``slot``'s episode (failed when ``error``), free the slot and tell ``on_episode``."""
    rec = episode_record(slot, error, loop.record_obs)
    loop.records[slot.seed] = rec
    if slot.frames is not None and error is None:
        loop.video = slot.frames
    slot.active = False
    loop.bar.update(1)
    loop.bar.set_postfix(score=f"{np.mean([r['max_reward'] for r in loop.records.values()]):.3f}")
    if loop.on_episode is not None:
        loop.on_episode(rec)


def _start(loop: _BatchedLoop, slot: EpisodeSlot, seed: int) -> None:
    """Begin ``seed``'s episode in ``slot``: reset its env and fill the history with the first observation."""
    To = loop.policy.n_obs_steps
    slot.seed, slot.chunk, slot.steps = seed, 0, 0
    slot.rewards, slot.rounds, slot.chunk_obs, slot.chunk_guess = [], [], [], []
    slot.success = False
    slot.guess = None
    slot.started = time.perf_counter()
    slot.active = True
    # the video episode runs in slot 0, the only env made with rendering
    slot.frames = [] if (seed == loop.video_seed and slot is loop.slots[0]) else None
    try:
        obs, _ = slot.env.reset(seed=int(seed))
        slot.history = deque([step_observation(obs, loop.shapes)] * To, maxlen=To)
        render_frame(slot)
    except Exception as e:  # recorded, the evaluation goes on
        _finish(loop, slot, e)


def _predict(loop: _BatchedLoop, batch: list[EpisodeSlot]) -> list[tuple[np.ndarray, int] | BaseException]:
    """Actions (Na, Da) and rounds for each slot, or the exception its call raised.

    With ``spec.warm_start`` each slot's chunk starts from its previous chunk's
    trajectory shifted by the ``Na`` executed actions (the first chunk starts cold). The
    guesses go in explicitly (``predict_action(guess=(B, T, D), guess_rows=(B,))``, the path
    the Controller's :meth:`~para_policy.controller.Controller.act` takes too), not through the
    policy session's memory: that holds one batch's trajectory, and the envs of a batch start
    and end their episodes at different chunks.
    """
    policy, spec, Na = loop.policy, loop.spec, loop.policy.n_action_steps
    histories = [stack_history(s.history) for s in batch]
    obs = {key: torch.from_numpy(np.stack([h[key] for h in histories])) for key in loop.shapes}  # (B, To, *shape)
    keys = [(ROLLOUT_STREAM, loop.noise_seed, s.seed, s.chunk) for s in batch]
    x_T, noise = call_noise(loop.schedule, loop.sample_shape, keys, policy.device, policy.sample_dtype)
    warm: dict[str, Any] = {"warm_start": False}  # this loop keeps each env's guess itself
    if spec.warm_start and any(s.guess is not None for s in batch):
        rows = torch.tensor([s.guess is not None for s in batch])
        guess = torch.stack([x_T[i] if s.guess is None else s.guess[0] for i, s in enumerate(batch)])
        warm = {"guess": guess, "guess_rows": rows}
    try:
        out = policy.predict_action(obs, x_T=x_T, noise=noise, sampler=spec, **warm)
    except Exception as e:
        if len(batch) == 1:
            return [e]
        # find the episode that broke the batch; the others keep their (identical) noise
        return [r for s in batch for r in _predict(loop, [s])]
    actions = out["action"].detach().cpu().numpy()
    rounds = out.stats.rounds_per_sample.cpu().tolist()
    if spec.warm_start:
        trajectory = out.trajectory
        for i, s in enumerate(batch):
            s.chunk_guess.append(None if s.guess is None else s.guess[0].cpu().numpy())
            s.guess = shift_trajectory(trajectory[i: i + 1], Na)
    return [(actions[i], int(rounds[i])) for i in range(len(batch))]


def _execute(loop: _BatchedLoop, slot: EpisodeSlot, actions: np.ndarray, rounds: int) -> None:
    """Step ``slot``'s env through the chunk's first ``n_action_steps`` actions; finish the episode if it ended."""
    if loop.record_obs:
        slot.chunk_obs.append(stack_history(slot.history))
    slot.rounds.append(rounds)
    slot.chunk += 1
    try:
        done = False
        for a in actions[: loop.policy.n_action_steps]:
            obs, reward, terminated, truncated, info = slot.env.step(a)
            slot.steps += 1
            slot.rewards.append(float(reward))
            slot.success |= bool(info.get("is_success", False))
            slot.history.append(step_observation(obs, loop.shapes))
            render_frame(slot)
            if terminated or truncated or slot.steps >= loop.task.max_steps:
                done = True
                break
    except Exception as e:
        _finish(loop, slot, e)
        return
    if done:
        _finish(loop, slot)


def _run_queue(loop: _BatchedLoop, queue: list[int]) -> None:
    """Chunk after chunk until every seed of ``queue`` ran: free slots take the next seed, then one batched call."""
    while True:
        for slot in loop.slots:
            while not slot.active and queue:
                _start(loop, slot, queue.pop(0))
        batch = [s for s in loop.slots if s.active]
        if not batch:
            return
        for slot, result in zip(batch, _predict(loop, batch), strict=True):
            if isinstance(result, BaseException):
                _finish(loop, slot, result)
            else:
                _execute(loop, slot, *result)


def run_rollouts(
    policy: LowdimPolicy,
    spec: SamplerConfig,
    task: TaskSettings,
    seeds: Sequence[int],
    *,
    noise_seed: int = 0,
    num_envs: int = 8,
    video_seed: int | None = None,
    video_size: int = 256,
    record_obs: bool = False,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
    env_factory: Callable[..., gymnasium.Env] | None = None,
    progress: bool = True,
    desc: str = "rollouts",
) -> tuple[list[dict[str, Any]], list[np.ndarray] | None]:
    """Run one episode per seed with ``spec``, ``num_envs`` at a time.

    Args:
        policy: the policy (its :meth:`~para_policy.policy.LowdimPolicy.observation_shapes` must
            match the env's observation: a flat array for ``{'obs': (Do,)}``, else a dict
            holding every key with its shape).
        spec: the sampler every call uses.
        seeds: env reset seeds; each gives one episode.
        noise_seed: the ``noise seed`` in the per-call noise keys.
        video_seed: record ``rgb_array`` frames of this seed's episode.
        record_obs: keep each chunk's observation in the records (``chunk_obs``), e.g. as
            the inputs of latency timing: a list of (n_obs_steps, obs_dim) lists for flat
            observations; for dict observations (images) ``{key: (n_chunks, n_obs_steps,
            *shape)}`` float32 arrays, too big for JSON: ``on_episode`` may take them out of
            the record (the evaluator writes them to a side file).
        on_episode: called with each finished episode's record, as soon as it finishes.
        env_factory: ``env_factory(task, render=..., video_size=...)``, default :func:`make_task_env`
            (looked up at call time, so tests can swap in faulty envs).
    Returns:
        ``(records in seed order, frames of the video episode or None)``. A record has
        seed, max_reward, success, length, n_chunks, rounds_per_chunk (each chunk's
        Picard rounds for this sample), wall_time_s and error (None, or the exception
        text, with ``traceback``).
    """
    from tqdm.auto import tqdm

    env_factory = env_factory or make_task_env
    queue = list(seeds)
    order = {s: i for i, s in enumerate(seeds)}
    schedule, sample_shape = policy.schedule_for(spec), policy.trajectory_shape(1)[1:]
    n_slots = max(1, min(int(num_envs), len(queue)))
    slots = [EpisodeSlot(env_factory(task, render=(video_seed is not None and i == 0), video_size=video_size))
             for i in range(n_slots)]
    bar = tqdm(total=len(queue), desc=desc, unit="ep", disable=not progress, leave=False)
    loop = _BatchedLoop(policy, spec, task, schedule, sample_shape, policy.observation_shapes(), noise_seed,
                        record_obs, on_episode, video_seed, bar, slots)
    # the video episode goes first, into slot 0
    if video_seed in queue:
        queue.remove(video_seed)
        queue.insert(0, video_seed)
    try:
        _run_queue(loop, queue)
    finally:
        loop.bar.close()
        for slot in loop.slots:
            try:
                slot.env.close()
            except Exception:
                pass
    return [loop.records[s] for s in sorted(loop.records, key=order.__getitem__)], loop.video
