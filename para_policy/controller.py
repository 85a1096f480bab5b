"""The robot-loop object: observation history, action queue, warm start, deadline, latency statistics.

Why a controller: a diffusion policy runs in a loop at a fixed control rate. Every
``n_action_steps`` steps it must produce a new chunk of actions from the last
``n_obs_steps`` observations, and the time that takes is the latency the robot sees.
This class does that bookkeeping as LeRobot's ``select_action`` does, and adds what
Picard sampling makes possible:

* **Warm start.** Consecutive chunks overlap: the previous chunk's clean trajectory,
  shifted by the ``n_action_steps`` actions executed since, is a good guess of the next
  one. It is passed to ``predict_action(warm_start=...)``, which rebuilds a Picard iterate
  from it with this chunk's fresh noise; where the guess is right the window slides
  through at once, so fewer rounds are needed. The converged result does not depend on
  the guess (up to ``tolerance``; with tolerance 0 it is the cold result).
* **Deadline.** With ``deadline_ms`` no new round starts when the time is up (the first
  always runs) and an unfinished chunk returns the clean sample predicted at its first
  unfinished step, never a noisy iterate; the chunk is flagged (``ChunkRecord.deadline_hit``)
  and counted as a miss. How far those actions are from converged ones depends on the
  deadline: ``eval/bench_deadline.py``.
* **Latency statistics.** ms per chunk and per ``act`` call (p50 / p95 / max), rounds and
  model evaluations per chunk, deadline misses: :meth:`Controller.stats`.

Running at a fixed control rate (e.g. 10 Hz) — sleep to the next tick, never drift::

    controller = Controller(load_policy(path), deadline_ms=80, seed=0)   # the paradigms preset
    period = 0.1
    obs, _ = env.reset(seed=0)
    controller.reset()
    next_tick = time.perf_counter()
    while True:
        action = controller.act(obs)           # (action_dim,); a new chunk every n_action_steps
        obs, reward, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            break
        next_tick += period
        time.sleep(max(0.0, next_tick - time.perf_counter()))
    print(controller.stats())

Pick ``deadline_ms`` below the control period minus the time the rest of the loop needs,
so a chunk is always ready by the step that needs it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from para_policy.policy import LowdimPolicy
from para_policy.samplers import SamplerConfig, sampler_spec, shift_trajectory


@dataclass
class ChunkRecord:
    """One predicted chunk: its wall time and sampling work.

    latency_ms: wall time of ``predict_action`` for this chunk.
    rounds, model_evals: sequential model rounds and rows evaluated (``SampleStats``).
    converged: whether the sampler met its tolerance (False after a deadline hit).
    deadline_hit: the sampler stopped at the deadline and returned its current iterate (a miss).
    overrun: the call took longer than ``deadline_ms`` (the last round ran past the deadline).
    warm: whether the chunk started from a warm-start guess.
    """

    latency_ms: float
    rounds: int
    model_evals: int
    converged: bool
    deadline_hit: bool
    overrun: bool
    warm: bool


def _all_tensors(observation: Any) -> bool:
    """Whether an observation (an array, or a dict of arrays) is made of torch tensors only."""
    if isinstance(observation, Mapping):
        return all(isinstance(v, torch.Tensor) for v in observation.values())
    return isinstance(observation, torch.Tensor)


def _distribution(values: Sequence[float]) -> dict[str, float | None]:
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "p50": None, "p95": None, "max": None}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
            "max": float(v.max())}


class Controller:
    """Run a :class:`~para_policy.policy.LowdimPolicy` in a control loop.

    Args:
        policy: the policy (its normalizer and UNet; its own sampler setting is not changed).
        sampler: a preset name (default ``'paradigms'``, the fastest measured setting;
            ``'paradigms_published'``, ``'parataa'``, ``'sequential'``) or a
            :class:`~para_policy.samplers.SamplerConfig`; None: the policy's own sampler.
            ``options`` override the preset's values (:func:`~para_policy.samplers.sampler_spec`).
        warm_start: start each chunk from the previous one shifted by the executed actions;
            None: the spec's setting (the ``paradigms`` preset has it on).
        deadline_ms: time budget per chunk in ms, or None (Picard samplers only).
        seed: seeds the controller's own noise generator (fresh noise for every chunk;
            the same seed and observations give the same actions). None: a random seed.
        devices: evaluate the UNet on several devices (:func:`para_policy.devices.use_devices`).
        max_records: how many chunk records and ``act`` latencies :meth:`stats` keeps (the
            most recent; older ones are dropped so a long-running loop stays bounded).
        options: sampler options (``window``, ``tolerance``, ``max_iterations``,
            ``per_sample_windows``, ``linear_solve``, ``secant``, ``scheduler``,
            ``num_inference_steps``). ``window='auto'`` (the preset's) is resolved by
            :meth:`LowdimPolicy.resolve` on the first chunk's observations, once per machine
            and policy (cached; the first measurement takes seconds), or by
            :meth:`calibrate` before the loop; ``window_tuning`` keeps what was measured.

    Shapes: ``act(observation (obs_dim,)) -> (action_dim,)``;
    ``predict_chunk(observations (n_obs_steps, obs_dim)) -> (n_action_steps, action_dim)``.
    Image policies (:class:`~para_policy.image_policy.ImagePolicy`) take dicts instead:
    ``act({'image': (3, H, W), 'agent_pos': (2,)})`` (float images in [0, 1]) and
    ``predict_chunk({'image': (n_obs_steps, 3, H, W), ...})``.
    Actions come back as numpy arrays when observations are numpy, as tensors otherwise.
    """

    def __init__(self, policy: LowdimPolicy, sampler: str | SamplerConfig | None = "paradigms",
                 warm_start: bool | None = None, deadline_ms: float | None = None, seed: int | None = None,
                 devices: Sequence[str | torch.device] | None = None, max_records: int = 100_000,
                 **options: Any) -> None:
        self.policy = policy
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
            raise ValueError(f"max_records must be an integer >= 1, got {max_records!r}")
        if warm_start is not None:
            options["warm_start"] = warm_start
        self.spec = sampler_spec(policy.sampler if sampler is None else sampler, **options)
        policy.schedule_for(self.spec)  # fail now, not in the loop
        if deadline_ms is not None:
            if not self.spec.iterative:
                raise ValueError(f"deadline_ms needs a Picard sampler, not {self.spec.name!r}")
            if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float)) or not deadline_ms >= 0:
                raise ValueError(f"deadline_ms must be a number >= 0, got {deadline_ms!r}")
        self.deadline_ms = None if deadline_ms is None else float(deadline_ms)
        if devices is not None:
            from para_policy.devices import use_devices

            use_devices(policy, devices)
        self.window_tuning: dict[str, Any] | None = None
        self.generator = torch.Generator(device=policy.device)
        self.seed(seed)
        # the last max_records chunks and act() calls: a robot loop runs for days
        self.records: deque[ChunkRecord] = deque(maxlen=int(max_records))
        self.act_latency_ms: deque[float] = deque(maxlen=int(max_records))
        self.reset()

    @property
    def warm_start(self) -> bool:
        """Whether each chunk starts from the previous one (the spec's ``warm_start``)."""
        return self.spec.warm_start

    def calibrate(self, observations: Sequence[np.ndarray | torch.Tensor], reps: int = 5) -> int:
        """Choose the window on this machine from a few ``(n_obs_steps, obs_dim)`` observations.

        Measures the denoiser's cost curve and each candidate window's rounds on the
        observations (cold calls, their own noise: the controller's generator is not used),
        sets the window that predicts the lowest latency, caches it for the policy
        (:meth:`LowdimPolicy.calibrate`) and returns it. Works for any Picard sampler,
        whatever its window was.
        """
        if not self.spec.iterative:
            raise ValueError(f"calibrate needs a Picard sampler, not {self.spec.name!r}")
        if len(observations) == 0:
            raise ValueError("calibrate needs at least one (n_obs_steps, obs_dim) observation")
        obs = [self._observation_window(o) for o in observations]
        window, info = self.policy.calibrate(obs, self.spec, reps=reps)
        self.spec = self.spec.with_options(window=window)
        self.window_tuning = info
        return window

    def seed(self, seed: int | None = None) -> None:
        """Reseed the noise generator (None: a nondeterministic seed)."""
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    def reset(self) -> None:
        """Start a new episode: clear the observation history, the action queue and the warm-start guess.

        Statistics are kept across episodes (see :meth:`reset_stats`).
        """
        self.observations: deque[dict[str, torch.Tensor]] = deque(maxlen=self.policy.n_obs_steps)
        self.actions: deque[torch.Tensor] = deque()
        self.guess: torch.Tensor | None = None  # normalized (1, T, D) clean trajectory for the next chunk

    def reset_stats(self) -> None:
        """Forget the latency and rounds records."""
        self.records.clear()
        self.act_latency_ms.clear()

    # ---- the loop ------------------------------------------------------------------
    def act(self, observation: np.ndarray | torch.Tensor | Mapping[str, Any]) -> np.ndarray | torch.Tensor:
        """One control step: record ``observation`` (obs_dim,), return the next action (action_dim,).

        After :meth:`reset` the history is filled by repeating the first observation. When
        the action queue is empty a new chunk is predicted from the last ``n_obs_steps``
        observations and its ``n_action_steps`` actions are queued.
        """
        start = time.perf_counter()
        as_numpy = not _all_tensors(observation)
        obs = self._step(observation)  # checked before it enters the history
        if not self.observations:
            self.observations.extend([obs] * self.policy.n_obs_steps)
        else:
            self.observations.append(obs)
        if not self.actions:
            chunk = self.predict_chunk({k: torch.stack([o[k] for o in self.observations]) for k in obs})
            self.actions.extend(chunk.unbind(0))
        action = self.actions.popleft()
        self.act_latency_ms.append((time.perf_counter() - start) * 1000)
        return action.numpy() if as_numpy else action

    def predict_chunk(self, observations: np.ndarray | torch.Tensor | Mapping[str, Any]
                      ) -> np.ndarray | torch.Tensor:
        """Predict ``(n_action_steps, action_dim)`` actions from ``(n_obs_steps, obs_dim)`` observations.

        Uses and then updates the warm-start guess: after this call the guess is this chunk's
        trajectory shifted by ``n_action_steps``, i.e. it assumes all the returned actions are
        executed before the next chunk. Call :meth:`reset` when that is not so.
        """
        as_numpy = not _all_tensors(observations)
        obs = {k: v[None] for k, v in self._observation_window(observations).items()}
        if self.spec.window_is_auto:
            auto = self.spec
            self.spec = self.policy.resolve(auto, obs)
            self.window_tuning = self.policy.window_tuning(auto)
        warm = self.guess if (self.warm_start and self.guess is not None) else False
        start = time.perf_counter()
        deadline = None if self.deadline_ms is None else start + self.deadline_ms / 1000
        out = self.policy.predict_action(obs, generator=self.generator, warm_start=warm, deadline=deadline,
                                         sampler=self.spec)
        latency_ms = (time.perf_counter() - start) * 1000
        stats = out.stats
        self.records.append(ChunkRecord(
            latency_ms=latency_ms,
            rounds=int(stats.rounds),
            model_evals=int(stats.model_evals),
            converged=bool(stats.all_converged),
            deadline_hit=bool(stats.extra.get("deadline_hit", False)),
            overrun=self.deadline_ms is not None and latency_ms > self.deadline_ms,
            warm=out.warm,
        ))
        if self.warm_start:
            self.guess = shift_trajectory(out.trajectory, self.policy.n_action_steps)
        actions = out["action"][0].detach().to("cpu")
        return actions.numpy() if as_numpy else actions

    def _keyed(self, observation: Any) -> dict[str, torch.Tensor]:
        """``observation`` as ``{key: tensor}`` over the policy's keys (a bare array is the low-dim ``'obs'``)."""
        shapes = self.policy.observation_shapes()
        if not isinstance(observation, Mapping):
            if len(shapes) != 1:
                raise ValueError(f"observation must be a dict with keys {list(shapes)}, got "
                                 f"{type(observation).__name__}")
            observation = {next(iter(shapes)): observation}
        missing = [k for k in shapes if k not in observation]
        if missing:
            raise ValueError(f"observation is missing {missing}; this policy takes {list(shapes)}")
        out = {}
        for key in shapes:
            x = observation[key]
            x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
            out[key] = x.to(torch.float32) if x.is_floating_point() else x  # integer images are refused below
        return out

    def _step(self, observation: Any) -> dict[str, torch.Tensor]:
        """One control step's observation, checked: ``{key: (*shape)}``."""
        obs = self._keyed(observation)
        for key, shape in self.policy.observation_shapes().items():
            if tuple(obs[key].shape) != shape:
                name = "observation" if key == "obs" else f"observation {key!r}"
                what = "(obs_dim,)" if key == "obs" else "the policy's"
                raise ValueError(f"{name} must have shape {what} = {shape}, got {tuple(obs[key].shape)}")
            if obs[key].is_floating_point() and not bool(torch.isfinite(obs[key]).all()):
                raise ValueError(f"observation {key!r} contains NaN or inf" if key != "obs"
                                 else f"observation contains NaN or inf: {obs[key].tolist()}")
        To = self.policy.n_obs_steps  # the policy's own checks (dtypes), on this step repeated
        self.policy.observation_batch({k: v[None].expand(To, *v.shape) for k, v in obs.items()})
        return obs

    def _observation_window(self, observations: Any) -> dict[str, torch.Tensor]:
        """``observations`` as ``{key: (n_obs_steps, *shape)}`` float tensors, checked."""
        obs = self._keyed(observations)
        for key, shape in self.policy.observation_shapes().items():
            expected = (self.policy.n_obs_steps, *shape)
            if tuple(obs[key].shape) != expected:
                what = "(n_obs_steps, obs_dim)" if key == "obs" else f"{key!r}: (n_obs_steps, *shape)"
                raise ValueError(f"observations must have shape {what} = {expected}, got {tuple(obs[key].shape)}")
        self.policy.observation_batch(obs)
        return obs

    @property
    def last_record(self) -> ChunkRecord | None:
        """The record of the last predicted chunk (None before the first)."""
        return self.records[-1] if self.records else None

    def stats(self) -> dict[str, Any]:
        """Latency, rounds and deadline statistics over the chunks since :meth:`reset_stats` (the last ``max_records``).

        Returns a dict: ``chunks``, ``actions``, ``chunk_latency_ms`` and ``action_latency_ms``
        (mean / p50 / p95 / max; an action's latency is the time of its ``act`` call, which
        includes the chunk prediction on the steps that make one), ``rounds`` and
        ``model_evals`` per chunk, ``deadline_misses`` (chunks stopped at the deadline),
        ``overruns`` (chunks slower than ``deadline_ms``), ``warm_chunks``, and the settings.
        """
        r = self.records
        return {
            "sampler": self.spec.name,
            "options": dict(self.spec.options),
            "warm_start": self.warm_start,
            "deadline_ms": self.deadline_ms,
            "chunks": len(r),
            "actions": len(self.act_latency_ms),
            "chunk_latency_ms": _distribution([x.latency_ms for x in r]),
            "action_latency_ms": _distribution(self.act_latency_ms),
            "rounds": _distribution([x.rounds for x in r]),
            "model_evals": _distribution([x.model_evals for x in r]),
            "deadline_misses": sum(x.deadline_hit for x in r),
            "overruns": sum(x.overrun for x in r),
            "unconverged": sum(not x.converged for x in r),
            "warm_chunks": sum(x.warm for x in r),
        }

    def records_as_dicts(self) -> list[dict[str, Any]]:
        """Every chunk's :class:`ChunkRecord` as a dict (for logging)."""
        return [asdict(x) for x in self.records]
