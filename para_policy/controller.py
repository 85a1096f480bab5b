"""The robot-loop object: observation history, action queue, warm start, deadline, asynchronous inference, statistics.

Why a controller: a diffusion policy runs in a loop at a fixed control rate. Every
``n_action_steps`` steps it must produce a new chunk of actions from the last
``n_obs_steps`` observations, and the time that takes is the latency the robot sees.
This class does that bookkeeping as LeRobot's ``select_action`` does, and adds what
Picard sampling makes possible:

* **Warm start.** Consecutive chunks overlap: the previous chunk's clean trajectory,
  shifted by the actions executed between the two chunks' observations, is a good guess of
  the next one. It is passed to ``predict_action(warm_start=...)``, which rebuilds a Picard
  iterate from it with this chunk's fresh noise; where the guess is right the window slides
  through at once, so fewer rounds are needed. The converged result does not depend on
  the guess (up to ``tolerance``; with tolerance 0 it is the cold result).
* **Deadline.** With ``deadline_ms`` no new round starts when the time is up (the first
  always runs) and an unfinished chunk returns the clean sample predicted at its first
  unfinished step, never a noisy iterate; the chunk is flagged (``ChunkRecord.deadline_hit``)
  and counted as a miss. How far those actions are from converged ones depends on the
  deadline: ``eval/bench_deadline.py``.
* **Never waiting** (``mode='async'`` or ``'rtc'``). In ``mode='sync'`` (the default) the robot
  stops at the end of every chunk while the next one is sampled. The asynchronous modes
  start the next chunk ``d`` control steps before the queue runs out, from the observation
  of that step, and switch to it when the queue is empty: inference overlaps execution. The
  new chunk was planned from an observation ``d`` steps old, so its first ``d`` actions are
  for steps that have already run; the switch is time-aligned and continues from its action
  ``d``. ``mode='async'`` samples the chunk freely, so it may jump away from what the robot
  was doing (``stats()['switch_discontinuity']``). ``mode='rtc'`` is real-time chunking
  (Black et al. 2025): the ``d`` queued actions that run while the chunk is computed are
  frozen, imposed as known entries of its trajectory (``predict_action(prefix_actions=...)``),
  so the rest of the chunk is sampled to continue them and the frozen ones are exactly what
  was executed. Beyond them, RTC's soft masking (``soft_masking=True``, the default): the old
  chunk's remaining plan guides the next positions with weights decaying from about 1 to
  about 0, so the new chunk leaves the old plan gradually. RTC steers with a guidance
  gradient (a vector-Jacobian product through the denoiser at every step); here the entries
  are pulled toward the old plan before each step by those weights, which costs nothing. The
  frozen actions are imposed clean by default, or at each step's noise level
  (``prefix_mode='noised'``, RePaint's imposition).
* **Running on past a late chunk** (``extend_plan=True``). A chunk is planned for its whole
  horizon, but only its first ``n_action_steps`` actions are queued. When the queue runs out
  and the next chunk is not ready, the robot runs the current chunk's plan past them, one step
  at a time, instead of stopping (as LeRobot's asynchronous inference runs on through its whole
  chunk); the late chunk takes over, time-aligned, when it arrives, and a stall happens only when
  the plan runs out too. With ``mode='rtc'`` and soft masking those steps are the old plan the
  new chunk was guided toward. Counted in ``stats()['extended_steps']``.
* **Two clocks, one schedule.** ``clock='wall'``: a worker thread samples while ``act()``
  hands out queued actions, one inference at a time, ``d = ceil(1.25 · latency / period_s)``
  measured (or ``delay_steps`` fixed); when the queue runs dry ``act()`` waits and counts a
  stall. ``clock='steps'``: no thread, for evaluators: a chunk requested at step ``s`` is
  computed at once and counts as ready at step ``s + delay_steps``, so results do not depend
  on the machine. When to start, what is frozen and when to switch are the same code.
* **Statistics.** ms per chunk and per ``act`` call (p50 / p95 / max), rounds and
  model evaluations per chunk, deadline misses, and for the loop: steps run while a chunk was
  in flight, stalls, switches and the action jump at each switch: :meth:`Controller.stats`.

Running at a fixed control rate (e.g. 10 Hz) — sleep to the next tick, never drift::

    period = 0.1
    with Controller(load_policy(path), mode="rtc", period_s=period, seed=0) as controller:
        obs, _ = env.reset(seed=0)
        controller.reset()
        next_tick = time.perf_counter()
        while True:
            action = controller.act(obs)           # (action_dim,); never waits while actions are queued
            obs, reward, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                break
            next_tick += period
            time.sleep(max(0.0, next_tick - time.perf_counter()))
        print(controller.stats())

In ``mode='sync'`` pick ``deadline_ms`` below the control period minus the time the rest of
the loop needs, so a chunk is always ready by the step that needs it. An evaluator runs one
``Controller(policy, mode=..., delay_steps=d, clock='steps', seed=...)`` per env.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from para_policy.policy import PREFIX_MODES, LowdimPolicy, PolicyOutput
from para_policy.samplers import SamplerConfig, sampler_spec, shift_trajectory
from para_policy.window import tuned_spec

MODES = ("sync", "async", "rtc")
CLOCKS = ("wall", "steps")
LATENCY_WINDOW = 20  # the measured delay covers the slowest of the last chunks (a rare slow one stays covered)
LATENCY_HEADROOM = 1.25  # ... times this: room for jitter, so a chunk a little slower than those still arrives in time


@dataclass
class ChunkRecord:
    """One predicted chunk: its wall time, its sampling work and, in a loop, when it ran.

    latency_ms: wall time of ``predict_action`` for this chunk.
    rounds, model_evals: sequential model rounds and rows evaluated (``SampleStats``).
    converged: whether the sampler met its tolerance (False after a deadline hit).
    deadline_hit: the sampler stopped at the deadline and returned its current iterate (a miss).
    overrun: the call took longer than ``deadline_ms`` (the last round ran past the deadline).
    warm: whether the chunk started from a warm-start guess.
    start_step: the control step (``act`` calls since :meth:`Controller.reset`, from 0) whose
        observation it was planned from: its action ``j`` is for step ``start_step + j``.
        None for a direct :meth:`Controller.predict_chunk` call.
    delay_steps: the delay ``d`` the schedule assumed for it (0 in ``mode='sync'``).
    frozen: actions of the previous queue imposed as its first ones (``mode='rtc'``).
    switch_step: the step at which it took over the queue, from its action ``switch_step - start_step``.
    stalled: the queue ran empty before it was ready, so ``act`` waited for it (``clock='steps'``:
        it was due at a later step than the one the queue ran out at). In ``mode='sync'`` every
        chunk after an episode's first.
    wait_ms: how long ``act`` blocked for it.
    discontinuity: ``|a_new - a_old|`` (L2 over the action dims, raw units) at the switch step: its
        action there against the action the previous chunk planned for that step (the previous
        plan's last action where it ends earlier). None for an episode's first chunk.
    """

    latency_ms: float
    rounds: int
    model_evals: int
    converged: bool
    deadline_hit: bool
    overrun: bool
    warm: bool
    start_step: int | None = None
    delay_steps: int = 0
    frozen: int = 0
    switch_step: int | None = None
    stalled: bool = False
    wait_ms: float = 0.0
    discontinuity: float | None = None


@dataclass
class _Chunk:
    """The chunk the queue comes from.

    ``plan`` (L, Da): its raw actions from ``action_start`` on (the executed ones and what it
    planned after them; action ``j`` is for step ``start + j``); ``trajectory`` (1, T, D): its
    normalized clean sample, the next chunk's warm-start guess once shifted.
    """

    start: int
    plan: torch.Tensor
    trajectory: torch.Tensor


@dataclass
class _InFlight:
    """A chunk being sampled: planned at step ``start`` for a delay of ``delay`` steps, ``frozen``
    queued actions imposed; ``future`` (wall clock) or ``result`` (steps clock) gives ``(output, latency_ms)``."""

    start: int
    delay: int
    frozen: int
    future: Future | None = None
    result: tuple[PolicyOutput, float] | None = None


def _all_tensors(observation: Any) -> bool:
    """Whether an observation (an array, or a dict of arrays) is made of torch tensors only."""
    if isinstance(observation, Mapping):
        return all(isinstance(v, torch.Tensor) for v in observation.values())
    return isinstance(observation, torch.Tensor)


def generator_on(generator: torch.Generator, device: torch.device | str) -> torch.Generator:
    """``generator`` if it draws on ``device``, else a new generator there seeded from ``generator``'s next draw.

    Why: the policy draws its noise on its own device with the controller's generator, which
    must live there too, and a policy can be moved after the controller was made. Seeded from
    a draw of the old generator, the noise stays a function of the controller's seed and of
    the draws before the move, and does not restart the old stream.
    """
    device = torch.device(device)
    have = generator.device
    if have.type == device.type and (device.index is None or have.index in (None, device.index)):
        return generator
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=have)[0])
    moved = torch.Generator(device=device)
    moved.manual_seed(seed)
    return moved


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
        warm_start: start each chunk from the previous one shifted by the steps between their
            observations; None: the spec's setting (the ``paradigms`` preset has it on).
        deadline_ms: time budget per chunk in ms, or None (Picard samplers only; not in the
            asynchronous modes with ``clock='steps'``, whose results must not depend on the machine).
        seed: seeds the controller's own noise generator (fresh noise for every chunk;
            the same seed and observations give the same actions). None: a random seed.
            The generator lives on the policy's device and follows it when the policy is
            moved (:func:`generator_on`).
        devices: evaluate the UNet on several devices (:func:`para_policy.devices.use_devices`).
        max_records: how many chunk records and ``act`` latencies :meth:`stats` keeps (the
            most recent; older ones are dropped so a long-running loop stays bounded).
        mode: ``'sync'`` (default): predict a chunk when the queue is empty and wait for it.
            ``'async'``: sample the next chunk while the current one runs and switch to it,
            time-aligned, when the queue runs out. ``'rtc'``: the same, with the queued actions
            that run meanwhile frozen in the new chunk (real-time chunking).
        delay_steps: the inference delay ``d`` in control steps, ``0 <= d < n_action_steps``: the
            next chunk starts when ``d`` actions are left. None (``clock='wall'`` only):
            ``ceil(1.25 · latency / period_s)`` from the slowest of the last few chunks (a quarter
            more for jitter), within
            ``[1, n_action_steps - 1]``. Asynchronous modes only.
        clock: ``'wall'``: a worker thread samples while ``act`` hands out actions.
            ``'steps'``: no thread; a chunk requested at step ``s`` is computed at once and
            ready at step ``s + delay_steps`` (deterministic, for evaluators). ``mode='sync'``
            ignores it.
        period_s: the control period in seconds (``1 / control_hz``), to turn measured latency
            into steps.
        prefix_mode: ``mode='rtc'``: how the frozen actions are imposed, ``'clean'`` (default)
            or ``'noised'`` (``LowdimPolicy.predict_action``'s ``prefix_mode``).
        soft_masking: ``mode='rtc'``: the old chunk's plan after the frozen actions guides the new
            chunk's next positions (``predict_action``'s ``guide_actions``); False: only the
            frozen actions are imposed (hard masking).
        extend_plan: ``mode='async'`` / ``'rtc'``: when the queue runs out before the next chunk
            is ready, run the current chunk's plan past its ``n_action_steps`` (up to its horizon)
            instead of waiting. False (default): wait for the chunk (a stall).
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

    With ``clock='wall'`` and an asynchronous mode, call :meth:`close` (or use ``with
    Controller(...) as c:``) to stop the worker thread.
    """

    def __init__(self, policy: LowdimPolicy, sampler: str | SamplerConfig | None = "paradigms",
                 warm_start: bool | None = None, deadline_ms: float | None = None, seed: int | None = None,
                 devices: Sequence[str | torch.device] | None = None, max_records: int = 100_000,
                 mode: str = "sync", delay_steps: int | None = None, clock: str = "wall",
                 period_s: float | None = None, prefix_mode: str = "clean", soft_masking: bool = True,
                 extend_plan: bool = False, **options: Any) -> None:
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
        self.mode, self.clock = mode, clock
        if prefix_mode not in PREFIX_MODES:
            raise ValueError(f"prefix_mode must be one of {PREFIX_MODES}, got {prefix_mode!r}")
        if not isinstance(soft_masking, bool):
            raise ValueError(f"soft_masking must be True or False, got {soft_masking!r}")
        self.prefix_mode, self.soft_masking = prefix_mode, soft_masking
        if not isinstance(extend_plan, bool):
            raise ValueError(f"extend_plan must be True or False, got {extend_plan!r}")
        if extend_plan and mode == "sync":
            raise ValueError("extend_plan applies to mode='async' or 'rtc'; mode='sync' waits for every chunk")
        self.extend_plan = extend_plan
        self.delay_steps, self.period_s = self._check_timing(mode, delay_steps, clock, period_s)
        if devices is not None:
            from para_policy.devices import use_devices

            use_devices(policy, devices)
        self.window_tuning: dict[str, Any] | None = None
        self.generator = torch.Generator(device=policy.device)
        self.seed(seed)
        # the last max_records chunks and act() calls: a robot loop runs for days
        self.records: deque[ChunkRecord] = deque(maxlen=int(max_records))
        self.act_latency_ms: deque[float] = deque(maxlen=int(max_records))
        self.steps_in_flight = 0  # act() calls that returned an action while a chunk was being sampled
        self.extended_steps = 0  # act() calls that ran the current chunk's plan past n_action_steps (extend_plan)
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)  # for the measured delay
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: _InFlight | None = None
        self.reset()

    def _check_timing(self, mode: str, delay_steps: Any, clock: str, period_s: Any
                      ) -> tuple[int | None, float | None]:
        """``(delay_steps, period_s)`` checked against the mode, the clock and ``n_action_steps``."""
        if mode not in MODES:
            raise ValueError(f"mode must be 'sync', 'async' or 'rtc', got {mode!r}")
        if clock not in CLOCKS:
            raise ValueError(f"clock must be 'wall' or 'steps', got {clock!r}")
        H = self.policy.n_action_steps
        if period_s is not None:
            if isinstance(period_s, bool) or not isinstance(period_s, (int, float)) or not math.isfinite(period_s) \
                    or period_s <= 0:
                raise ValueError(f"period_s must be a number > 0 (the control period in seconds), got {period_s!r}")
            period_s = float(period_s)
        if delay_steps is not None:
            if mode == "sync":
                raise ValueError("delay_steps applies to mode='async' or 'rtc'; mode='sync' waits for every chunk")
            if isinstance(delay_steps, bool) or not isinstance(delay_steps, (int, np.integer)) \
                    or not 0 <= delay_steps < H:
                raise ValueError(f"delay_steps must be an integer in [0, n_action_steps - 1] = [0, {H - 1}] (the "
                                 f"actions frozen meanwhile must leave the chunk some of its own), got {delay_steps!r}")
            delay_steps = int(delay_steps)
        if mode == "sync":
            return None, period_s
        if clock == "steps":
            if delay_steps is None:
                raise ValueError("clock='steps' simulates the inference latency as delay_steps control steps: "
                                 "pass delay_steps")
            if self.deadline_ms is not None:
                raise ValueError("deadline_ms stops sampling by the wall clock, so clock='steps' results would "
                                 "depend on the machine; drop deadline_ms or use clock='wall'")
            return delay_steps, period_s
        if H < 2:
            raise ValueError(f"mode={mode!r} with clock='wall' needs n_action_steps >= 2 (one action to run while "
                             f"the next chunk is sampled), got {H}")
        if delay_steps == 0:
            raise ValueError("delay_steps=0 with clock='wall' waits for every chunk (that is mode='sync'); "
                             "pass delay_steps >= 1, or None to measure it")
        if delay_steps is None and period_s is None:
            raise ValueError("clock='wall' needs period_s (the control period, to turn the measured latency into "
                             "control steps) or a fixed delay_steps")
        return delay_steps, period_s

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
        self.spec = tuned_spec(self.spec, window, info)
        self.window_tuning = info
        return window

    def seed(self, seed: int | None = None) -> None:
        """Reseed the noise generator (None: a nondeterministic seed), after a chunk being sampled."""
        self._settle()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    def reset(self) -> None:
        """Start a new episode: clear the observation history, the action queue and the warm-start guess.

        A chunk still being sampled is waited for and dropped. Statistics are kept across
        episodes (see :meth:`reset_stats`).
        """
        self._drop_in_flight()
        self.observations: deque[dict[str, torch.Tensor]] = deque(maxlen=self.policy.n_obs_steps)
        self.actions: deque[torch.Tensor] = deque()
        self.guess: torch.Tensor | None = None  # normalized (1, T, D) clean trajectory for the next chunk
        self.step = 0  # act() calls since reset: the index of the next control step
        self._chunk: _Chunk | None = None

    def reset_stats(self) -> None:
        """Forget the latency, rounds and scheduling records."""
        self.records.clear()
        self.act_latency_ms.clear()
        self.steps_in_flight = 0
        self.extended_steps = 0

    def close(self) -> None:
        """Stop the worker thread (``clock='wall'``), waiting for a chunk in flight and dropping it.

        The queue is kept; a later :meth:`act` starts a new worker.
        """
        self._drop_in_flight()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the loop ------------------------------------------------------------------
    def act(self, observation: np.ndarray | torch.Tensor | Mapping[str, Any]) -> np.ndarray | torch.Tensor:
        """One control step: record ``observation`` (obs_dim,), return the next action (action_dim,).

        After :meth:`reset` the history is filled by repeating the first observation.
        ``mode='sync'``: when the action queue is empty a new chunk is predicted from the last
        ``n_obs_steps`` observations and its ``n_action_steps`` actions are queued.
        ``mode='async'`` / ``'rtc'``: when ``d`` actions are left the next chunk starts from
        this step's observations; when the queue runs out it takes over, from its action ``d``
        (waiting for it only if it is not ready: a stall). An error raised while sampling
        in the worker is raised here, as the cause of a ``RuntimeError``.
        """
        start = time.perf_counter()
        as_numpy = not _all_tensors(observation)
        obs = self._step(observation)  # checked before it enters the history
        if not self.observations:
            self.observations.extend([obs] * self.policy.n_obs_steps)
        else:
            self.observations.append(obs)
        if self.mode == "sync":
            if not self.actions:
                self._sync_chunk()
        else:
            try:
                self._schedule()
            except BaseException:
                self.observations.pop()  # this step did not happen: a retried act() records it again
                raise
        action = self.actions.popleft()
        self.step += 1
        self.act_latency_ms.append((time.perf_counter() - start) * 1000)
        return action.numpy() if as_numpy else action

    def predict_chunk(self, observations: np.ndarray | torch.Tensor | Mapping[str, Any]
                      ) -> np.ndarray | torch.Tensor:
        """Predict ``(n_action_steps, action_dim)`` actions from ``(n_obs_steps, obs_dim)`` observations.

        Uses and then updates the warm-start guess: after this call the guess is this chunk's
        trajectory shifted by ``n_action_steps``, i.e. it assumes all the returned actions are
        executed before the next chunk. Call :meth:`reset` when that is not so. The action
        queue and a chunk in flight are not touched (a chunk being sampled by the worker is
        waited for first: they share the noise generator).
        """
        as_numpy = not _all_tensors(observations)
        self._settle()
        actions = self._chunk_output(observations)["action"][0].detach().to("cpu")
        return actions.numpy() if as_numpy else actions

    def _chunk_output(self, observations: Any) -> PolicyOutput:
        """:meth:`predict_chunk`'s sampling, recorded; the guess then assumes ``n_action_steps`` executed."""
        obs = {k: v[None] for k, v in self._observation_window(observations).items()}
        self._resolve_window(obs)
        warm = self.guess if (self.warm_start and self.guess is not None) else False
        out, latency_ms = self._sample(obs, warm, None)
        self.records.append(self._record(out, latency_ms))
        if self.warm_start:
            self.guess = shift_trajectory(out.trajectory, self.policy.n_action_steps)
        return out

    def _resolve_window(self, obs: Mapping[str, torch.Tensor]) -> None:
        """Replace ``window='auto'`` by this machine's window, measured on ``obs`` the first time."""
        if self.spec.window_is_auto:
            auto = self.spec
            self.spec = self.policy.resolve(auto, obs)
            self.window_tuning = self.policy.window_tuning(auto)

    def _sample(self, obs: Mapping[str, torch.Tensor], warm: torch.Tensor | bool, prefix: torch.Tensor | None,
                guide: torch.Tensor | None = None) -> tuple[PolicyOutput, float]:
        """One ``predict_action`` call on ``{key: (1, n_obs_steps, ...)}``: ``(output, latency_ms)``.

        Runs on the worker thread with ``clock='wall'`` and an asynchronous mode; only one at a
        time, so the generator's draws keep their order.
        """
        start = time.perf_counter()
        deadline = None if self.deadline_ms is None else start + self.deadline_ms / 1000
        # sync and async calls stay as they were
        frozen = {} if prefix is None else {"prefix_actions": prefix, "prefix_mode": self.prefix_mode}
        if guide is not None:
            frozen["guide_actions"] = guide
        self.generator = generator_on(self.generator, self.policy.device)  # the policy may have moved
        out = self.policy.predict_action(obs, generator=self.generator, warm_start=warm, deadline=deadline,
                                         sampler=self.spec, **frozen)
        return out, (time.perf_counter() - start) * 1000

    def _record(self, out: PolicyOutput, latency_ms: float) -> ChunkRecord:
        stats = out.stats
        return ChunkRecord(
            latency_ms=latency_ms,
            rounds=int(stats.rounds),
            model_evals=int(stats.model_evals),
            converged=bool(stats.all_converged),
            deadline_hit=bool(stats.deadline_hit),
            overrun=self.deadline_ms is not None and latency_ms > self.deadline_ms,
            warm=out.warm,
        )

    def _history(self) -> dict[str, torch.Tensor]:
        """The last ``n_obs_steps`` observations as ``{key: (n_obs_steps, *shape)}``."""
        return {k: torch.stack([o[k] for o in self.observations]) for k in self.observations[-1]}

    def _take_over(self, out: PolicyOutput, record: ChunkRecord) -> None:
        """Make ``out`` (planned at ``record.start_step``) the queue's chunk at this step; measure the jump."""
        t, start = self.step, record.start_step
        plan = out["action_pred"][0, self.policy.action_start:].detach().to("cpu")  # (L, Da)
        if self._chunk is not None:
            old = self._chunk.plan
            a_old = old[min(t - self._chunk.start, old.shape[0] - 1)]  # what the old chunk planned for step t
            record.discontinuity = float(torch.linalg.vector_norm(plan[t - start] - a_old))
        record.switch_step = t
        self._chunk = _Chunk(start, plan, out.trajectory)

    # ---- mode='sync' -------------------------------------------------------------------
    def _sync_chunk(self) -> None:
        """The queue is empty: predict a chunk from this step's history and wait for it."""
        out = self._chunk_output(self._history())
        self.actions.extend(out["action"][0].detach().to("cpu").unbind(0))
        record = self.records[-1]
        record.start_step, record.stalled, record.wait_ms = self.step, self._chunk is not None, record.latency_ms
        self._take_over(out, record)

    # ---- mode='async' / 'rtc': one schedule for both clocks ------------------------------
    def _schedule(self) -> None:
        """Start the next chunk when ``d`` actions are left; switch to it when the queue runs out.

        With ``extend_plan`` a queue that runs out before the chunk is ready gets the current
        plan's action for this step instead (while the plan lasts), and so does a chunk that
        arrives so late that its own queued actions are past.
        """
        self._raise_if_failed()
        if self._in_flight is None and len(self.actions) <= self._delay():
            self._launch()
        if not self.actions and not (self.extend_plan and not self._ready() and self._extend()):
            self._switch()
            if not self.actions and self.extend_plan:
                self._extend()
            if len(self.actions) <= self._delay():  # d >= n_action_steps - d: the next one starts at once
                self._launch()
        if self._in_flight is not None:
            self.steps_in_flight += 1

    def _ready(self) -> bool:
        """Whether the chunk in flight is ready now (wall clock: sampled; steps clock: its ``d`` steps passed)."""
        job = self._in_flight
        if job is None or self._chunk is None:  # an episode's first chunk: there is no plan to run on
            return True
        return job.future.done() if job.future is not None else self.step >= job.start + job.delay

    def _extend(self) -> bool:
        """Queue the current plan's action for this step, if the plan reaches it (``extend_plan``)."""
        k = self.step - self._chunk.start
        if k >= self._chunk.plan.shape[0]:
            return False
        self.actions.append(self._chunk.plan[k])
        self.extended_steps += 1
        return True

    def _delay(self) -> int:
        """``d``: fixed, or ``ceil(LATENCY_HEADROOM · latency / period_s)`` over the last few chunks, in [1, H - 1]."""
        if self.delay_steps is not None:
            return self.delay_steps
        if not self._latencies:
            return 1
        d = math.ceil(LATENCY_HEADROOM * max(self._latencies) / 1000 / self.period_s)
        return min(max(d, 1), self.policy.n_action_steps - 1)

    def _launch(self) -> None:
        """Start sampling the chunk for this step's observations (``len(actions) <= d`` are left).

        ``rtc``: the queued actions, which all run before it is ready, are its frozen prefix, and
        with ``soft_masking`` the current chunk's plan after them its guide. With ``extend_plan``
        the plan's actions after the queue that will run before it is ready (``d`` actions in
        all) are frozen too. The warm-start guess is the current chunk shifted by the steps since
        its observation.
        """
        t = self.step
        obs = {k: v[None] for k, v in self._observation_window(self._history()).items()}
        self._resolve_window(obs)
        d = self._delay()
        queued = list(self.actions)
        if self.extend_plan and self._chunk is not None and len(queued) < d:  # what _extend will hand out
            k = t - self._chunk.start + len(queued)
            queued += list(self._chunk.plan[k: k + d - len(queued)].unbind(0))
        frozen = min(d, len(queued)) if self.mode == "rtc" else 0
        prefix = torch.stack(queued[:frozen])[None] if frozen else None  # (1, frozen, Da) raw
        guide = None
        if frozen and self.soft_masking and self._chunk is not None:
            rest = self._chunk.plan[t - self._chunk.start + frozen:]  # the old plan after the frozen actions
            guide = rest[None] if rest.shape[0] else None
        warm: torch.Tensor | bool = False
        if self.warm_start and self._chunk is not None:
            warm = shift_trajectory(self._chunk.trajectory, t - self._chunk.start)
        job = _InFlight(start=t, delay=d, frozen=frozen)
        if self.clock == "steps":
            job.result = self._sample(obs, warm, prefix, guide)  # computed now, ready at step t + d
        else:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="para_policy-controller")
            job.future = self._executor.submit(self._sample, obs, warm, prefix, guide)
        self._in_flight = job

    def _switch(self) -> None:
        """The queue ran out: the chunk in flight takes over, time-aligned (waits for it if not ready)."""
        job, t = self._in_flight, self.step
        first = self._chunk is None  # an episode's first chunk: nothing ran dry
        wait = time.perf_counter()
        if job.future is not None:
            ready = job.future.done()
            out, latency_ms = self._result(job)
        else:
            ready = t >= job.start + job.delay
            out, latency_ms = job.result
        self._in_flight = None
        record = self._record(out, latency_ms)
        record.start_step, record.delay_steps, record.frozen = job.start, job.delay, job.frozen
        record.stalled, record.wait_ms = not first and not ready, (time.perf_counter() - wait) * 1000
        self._take_over(out, record)
        # its actions before t were planned for steps that already ran: the queue starts at t
        self.actions = deque(out["action"][0].detach().to("cpu")[t - job.start:].unbind(0))
        self.records.append(record)
        self._latencies.append(latency_ms)

    def _result(self, job: _InFlight) -> tuple[PolicyOutput, float]:
        """The worker's ``(output, latency_ms)`` (waits); its error as the cause of a ``RuntimeError``."""
        try:
            return job.future.result()
        except Exception as e:
            self._in_flight = None
            raise RuntimeError(f"sampling the chunk planned at step {job.start} failed in the inference worker: "
                               f"{type(e).__name__}: {e}") from e

    def _raise_if_failed(self) -> None:
        job = self._in_flight
        if job is not None and job.future is not None and job.future.done() and job.future.exception() is not None:
            self._result(job)

    def _settle(self) -> None:
        """Wait until the worker is idle (its result stays for the switch)."""
        job = getattr(self, "_in_flight", None)
        if job is not None and job.future is not None:
            job.future.exception()

    def _drop_in_flight(self) -> None:
        """Forget the chunk in flight (a running one is waited for; its result or error is dropped)."""
        job, self._in_flight = getattr(self, "_in_flight", None), None
        if job is not None and job.future is not None and not job.future.cancel():
            job.future.exception()

    # ---- observations ------------------------------------------------------------------
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

        The loop's schedule (from :meth:`act`'s chunks): ``mode``, ``clock``, ``delay_steps`` (as
        given), ``period_s``; ``delay_used`` (the ``d`` each chunk was started with),
        ``steps_in_flight`` (actions handed out while a chunk was being sampled), ``extended_steps``
        (actions run from the current plan past its ``n_action_steps``, ``extend_plan``), ``stalls``
        (chunks the queue ran empty for; in ``mode='sync'`` every chunk after an episode's
        first), ``stall_wait_ms`` (how long ``act`` blocked on those), ``idle_steps`` (``clock='steps'``:
        control steps the robot would have stood still, ``start + d - switch`` summed over stalls;
        else None), ``switches`` (chunks that replaced a queue) and ``switch_discontinuity``
        (``|a_new - a_old|`` at those switches, :attr:`ChunkRecord.discontinuity`).
        """
        r = self.records
        looped = [x for x in r if x.start_step is not None]
        stalled = [x for x in looped if x.stalled]
        switched = [x.discontinuity for x in looped if x.discontinuity is not None]
        simulated = self.mode != "sync" and self.clock == "steps"
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
            "mode": self.mode,
            "clock": self.clock,
            "delay_steps": self.delay_steps,
            "period_s": self.period_s,
            "delay_used": _distribution([x.delay_steps for x in looped]),
            "steps_in_flight": self.steps_in_flight,
            "extend_plan": self.extend_plan,
            "extended_steps": self.extended_steps,
            "stalls": len(stalled),
            "stall_wait_ms": _distribution([x.wait_ms for x in stalled]),
            "idle_steps": sum(max(0, x.start_step + x.delay_steps - x.switch_step) for x in stalled)
            if simulated else None,
            "switches": len(switched),
            "switch_discontinuity": _distribution(switched),
        }

    def records_as_dicts(self) -> list[dict[str, Any]]:
        """Every chunk's :class:`ChunkRecord` as a dict (for logging)."""
        return [asdict(x) for x in self.records]
