"""The control loop's schedule, shared by the in-process and the networked controller; imports no torch.

:class:`ChunkLoop` is what :class:`~para_policy.controller.Controller` and
:class:`~para_policy.serving.client.RemoteController` have in common: the observation history,
the action queue, the chunk being sampled (``sync``, ``async``, ``rtc``; ``wall`` or ``steps``
clock), the measured delay, ``extend_plan``, the time-aligned switch and the statistics. A
subclass says how a chunk is sampled (:meth:`ChunkLoop._sample`) and how an observation is
checked; the queue holds numpy rows, so the robot-side client runs without torch.
:class:`ControllerConfig` holds the loop's options and checks them once, for both and for the
evaluator's ``controller`` group. Why it works the way it does: docs/library.md, "The Controller".
"""

from __future__ import annotations

import difflib
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from para_policy.stats import percentile_summary

if TYPE_CHECKING:
    import torch

    from para_policy.samplers import SamplerConfig

MODES = ("sync", "async", "rtc")
CLOCKS = ("wall", "steps")
PREFIX_MODES = ("clean", "noised")  # how real-time chunking's frozen actions are imposed (``predict_action``)
LATENCY_CHUNKS = 20  # the measured delay covers the slowest of the last chunks (a rare slow one stays covered)
LATENCY_HEADROOM = 1.25  # ... times this: room for jitter, so a chunk a little slower than those still arrives in time
#: what :meth:`ChunkLoop.stats` reports of each distribution (:func:`~para_policy.stats.percentile_summary`'s)
SUMMARY_KEYS = ("mean", "p50", "p95", "max")


class ControllerConfigError(ValueError):
    """A refused Controller option. The message starts with the option's name (``key``), so a config
    reader can put its own section in front (the evaluator says ``controller.delay_steps ...``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _choose(key: str, value: Any, allowed: Sequence[str]) -> None:
    """Refuse ``value`` unless it is one of ``allowed``, naming ``key``, the choices and the nearest one."""
    if isinstance(value, str) and value in allowed:
        return
    near = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    choices = ", ".join(map(repr, allowed[:-1])) + f" or {allowed[-1]!r}"
    raise ControllerConfigError(key, f"{key} must be {choices}, got {value!r}{hint}")


def _is_number(value: Any) -> bool:
    """Whether ``value`` is a finite real number (a bool is not)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
            and math.isfinite(value))


def _is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (a bool is not)."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


@dataclass(frozen=True)
class ControllerConfig:
    """Everything a :class:`Controller` takes besides the policy and the sampler, checked once, here.

    ``Controller(policy, mode=..., ...)`` builds one from its keywords, ``Controller(policy,
    config=...)`` takes one whole, and the evaluator's ``controller`` group builds one
    (:class:`~para_policy.evaluation.config.ControllerSettings`): one set of checks for all three.
    What needs the policy or the sampler is checked by :meth:`check_policy` and :meth:`check_sampler`
    once they are known. A field left None is resolved here to the value that runs (so a
    :func:`dataclasses.replace` into another mode sets ``extend_plan``, ``prefix_mode`` and
    ``soft_masking`` back to None).

    Attributes:
        mode: ``'sync'`` (default): predict a chunk when the action queue is empty and wait for it.
            ``'async'``: sample the next chunk while the current one runs and switch to it,
            time-aligned, when the queue runs out. ``'rtc'``: the same, with the queued actions that
            run meanwhile frozen into the new chunk (real-time chunking).
        delay_steps: the inference delay ``d`` in control steps, ``0 <= d < n_action_steps``: the next
            chunk starts when ``d`` actions are left (``'async'`` / ``'rtc'``; ``'sync'`` is delay 0 and
            stores None). None on the wall clock: measured, ``ceil(1.25 · latency / period_s)`` over
            the slowest of the last chunks, within ``[1, n_action_steps - 1]``; required on the steps clock.
        clock: ``'wall'`` (default): a worker thread samples while ``act`` hands out actions.
            ``'steps'``: no thread; a chunk requested at step ``s`` is computed at once and counts as
            ready at step ``s + delay_steps``, so results do not depend on the machine (evaluators).
            ``'sync'`` runs the same either way.
        period_s: the control period in seconds (``1 / control_hz``), to turn measured latency into steps.
        extend_plan: when the queue runs out before the next chunk is ready, run the current chunk's
            plan past its ``n_action_steps`` (up to its horizon) instead of waiting; the late chunk
            takes over, time-aligned, when it arrives. None: on in ``'async'`` and ``'rtc'`` (they never
            stall while the plan lasts, as LeRobot's asynchronous client runs through its chunk),
            off in ``'sync'`` (which waits for every chunk). False: wait, a stall.
        prefix_mode: ``'rtc'`` only: how the frozen actions are imposed, ``'clean'`` (None's value) or
            ``'noised'`` (``LowdimPolicy.predict_action``'s ``prefix_mode``).
        soft_masking: ``'rtc'`` only: the old chunk's plan after the frozen actions guides the new
            chunk's next positions (``predict_action``'s ``guide_actions``); None: True. False: hard masking.
        warm_start: start each chunk from the previous one shifted by the steps run between their
            observations; None: the sampler spec's setting (the ``paradigms`` preset has it on).
        deadline_ms: time budget per chunk in ms (Picard samplers, wall clock): no new round starts
            after it and the chunk is flagged as a miss. None: no deadline.
        seed: the Controller's noise generator (fresh noise every chunk; the same seed and
            observations give the same actions). None: a random seed.
        devices: evaluate the network on several devices (:func:`para_policy.devices.use_devices`).
        max_records: how many chunk records and ``act`` latencies :meth:`Controller.stats` keeps
            (the most recent, so a loop that runs for days stays bounded).
    """

    mode: str = "sync"
    delay_steps: int | None = None
    clock: str = "wall"
    period_s: float | None = None
    extend_plan: bool | None = None
    prefix_mode: str | None = None
    soft_masking: bool | None = None
    warm_start: bool | None = None
    deadline_ms: float | None = None
    seed: int | None = None
    devices: tuple[str | torch.device, ...] | None = None
    max_records: int = 100_000

    def __post_init__(self) -> None:
        _choose("mode", self.mode, MODES)
        _choose("clock", self.clock, CLOCKS)
        self._check_values()
        self._check_applies()
        self._check_timing()
        rtc = self.mode == "rtc"
        self._set(extend_plan=self.mode != "sync" if self.extend_plan is None else self.extend_plan,
                  prefix_mode=(self.prefix_mode or "clean") if rtc else None,
                  soft_masking=(self.soft_masking is not False) if rtc else None,
                  delay_steps=None if self.mode == "sync" else self.delay_steps)

    def _set(self, **values: Any) -> None:
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def _check_values(self) -> None:
        """Each option on its own: type and range (normalized to int / float / tuple)."""
        for key in ("extend_plan", "soft_masking", "warm_start"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), bool):
                raise ControllerConfigError(key, f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.prefix_mode is not None:
            _choose("prefix_mode", self.prefix_mode, PREFIX_MODES)
        d = self.delay_steps
        if d is not None and not (_is_int(d) and d >= 0):
            raise ControllerConfigError("delay_steps", f"delay_steps must be an integer >= 0 (the inference delay "
                                                       f"in control steps), got {d!r}")
        if self.period_s is not None and not (_is_number(self.period_s) and self.period_s > 0):
            raise ControllerConfigError("period_s", f"period_s must be a number > 0 (the control period in seconds), "
                                                    f"got {self.period_s!r}")
        if self.deadline_ms is not None and not (_is_number(self.deadline_ms) and self.deadline_ms >= 0):
            raise ControllerConfigError("deadline_ms", f"deadline_ms must be a number >= 0 (ms per chunk), got "
                                                       f"{self.deadline_ms!r}")
        if not (_is_int(self.max_records) and self.max_records >= 1):
            raise ControllerConfigError("max_records", f"max_records must be an integer >= 1, got {self.max_records!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ControllerConfigError("seed", f"seed must be an integer or None, got {self.seed!r}")
        self._set(delay_steps=None if d is None else int(d), max_records=int(self.max_records),
                  period_s=None if self.period_s is None else float(self.period_s),
                  deadline_ms=None if self.deadline_ms is None else float(self.deadline_ms),
                  seed=None if self.seed is None else int(self.seed),
                  devices=None if self.devices is None else tuple(self.devices))

    def _check_applies(self) -> None:
        """Options given for a mode or a clock they do not apply to."""
        if self.mode != "rtc":
            for key, what in (("prefix_mode", "how the frozen actions of real-time chunking are imposed"),
                              ("soft_masking", "guidance by the old chunk's plan after the frozen actions")):
                if getattr(self, key) is not None:
                    raise ControllerConfigError(key, f"{key}={getattr(self, key)!r} applies to mode='rtc' only "
                                                     f"({what}); mode={self.mode!r} freezes none")
        if self.mode == "sync" and self.delay_steps not in (None, 0):
            raise ControllerConfigError("delay_steps", f"delay_steps={self.delay_steps} applies to mode='async' or "
                                                       "'rtc'; mode='sync' waits for every chunk (delay 0)")
        if self.mode == "sync" and self.extend_plan:
            raise ControllerConfigError("extend_plan", "extend_plan=True applies to mode='async' or 'rtc' (running "
                                                       "the plan on while the next chunk is sampled); mode='sync' "
                                                       "waits for every chunk")
        if self.deadline_ms is not None and self.clock == "steps":
            raise ControllerConfigError("deadline_ms", f"deadline_ms={self.deadline_ms:g} applies to clock='wall' "
                                                       "only: a deadline stops sampling by the wall clock, so "
                                                       "clock='steps' results would depend on the machine")

    def _check_timing(self) -> None:
        """What the asynchronous modes need of the clock: a delay on the steps clock, a way to get one on the wall."""
        if self.mode == "sync":
            return
        if self.clock == "steps":
            if self.delay_steps is None:
                raise ControllerConfigError("delay_steps", "delay_steps: clock='steps' simulates the inference latency "
                                                           "as delay_steps control steps: pass delay_steps")
            return
        if self.delay_steps == 0:
            raise ControllerConfigError("delay_steps", "delay_steps=0 with clock='wall' waits for every chunk (that "
                                                       "is mode='sync'): pass delay_steps >= 1, or None (null in a "
                                                       "config) to measure it from this machine's latency")
        if self.delay_steps is None and self.period_s is None:
            raise ControllerConfigError("period_s", "period_s: clock='wall' needs period_s (the control period, to "
                                                    "turn the measured latency into control steps) or a fixed "
                                                    "delay_steps")

    def check_policy(self, n_action_steps: int) -> None:
        """Refuse a delay the policy's chunks of ``n_action_steps`` actions cannot absorb."""
        H, d = int(n_action_steps), self.delay_steps
        if self.mode == "sync":
            return
        if d is not None and d >= H:
            raise ControllerConfigError("delay_steps", f"delay_steps must be an integer in [0, n_action_steps - 1] = "
                                                       f"[0, {H - 1}] (the actions that run while a chunk is "
                                                       f"computed must leave it some of its own), got {d}")
        if self.clock == "wall" and H < 2:
            raise ControllerConfigError("mode", f"mode={self.mode!r} with clock='wall' needs n_action_steps >= 2 (one "
                                                f"action to run while the next chunk is sampled); this policy has {H}")

    def check_sampler(self, spec: SamplerConfig) -> None:
        """Refuse a deadline for a sampler that cannot stop early."""
        if self.deadline_ms is not None and not spec.iterative:
            raise ControllerConfigError("deadline_ms", f"deadline_ms={self.deadline_ms:g} needs a Picard sampler "
                                                       "(paradigms, paradigms_published, parataa, ...), whose rounds "
                                                       f"can stop at a deadline; sampler={spec.name} runs every "
                                                       "step: drop deadline_ms")


#: the keywords of ``Controller(...)`` that are :class:`ControllerConfig` fields (the others are sampler options)
CONTROLLER_OPTIONS = tuple(f.name for f in fields(ControllerConfig))
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
class ChunkResult:
    """One sampled chunk, as the loop uses it.

    ``actions`` (n_action_steps, Da) and ``plan`` (L, Da): raw float actions, the executed ones and
    the chunk's whole plan from ``action_start`` on (action ``j`` is for step ``start + j``);
    ``source``: what the next chunk's warm start is made from (the in-process Controller: the
    normalized (1, T, D) trajectory; the RemoteController: the server's chunk number);
    ``record``: its :class:`ChunkRecord` (latency and sampling work; the loop fills in the rest).
    """

    actions: np.ndarray
    plan: np.ndarray
    source: Any
    record: ChunkRecord


@dataclass
class _Chunk:
    """The chunk the queue comes from: planned at step ``start``; ``plan`` (L, Da) and ``source`` as in
    :class:`ChunkResult`."""

    start: int
    plan: np.ndarray
    source: Any


@dataclass
class _InFlight:
    """A chunk being sampled: planned at step ``start`` for a delay of ``delay`` steps, ``frozen``
    queued actions imposed; ``future`` (wall clock) or ``result`` (steps clock) gives its :class:`ChunkResult`."""

    start: int
    delay: int
    frozen: int
    future: Future | None = None
    result: ChunkResult | None = None

    def ready(self, step: int) -> bool:
        """Whether it is ready at control step ``step`` (wall clock: sampled; steps clock: its delay passed)."""
        return self.future.done() if self.future is not None else step >= self.start + self.delay

    def output(self) -> ChunkResult:
        """The result, waiting for the worker; its error as the cause of a ``RuntimeError``."""
        if self.future is None:
            return self.result
        try:
            return self.future.result()
        except Exception as e:
            raise RuntimeError(f"sampling the chunk planned at step {self.start} failed in the inference worker: "
                               f"{type(e).__name__}: {e}") from e

    def failed(self) -> bool:
        """Whether the worker has finished with an error."""
        return self.future is not None and self.future.done() and self.future.exception() is not None

    def settle(self) -> None:
        """Wait until the worker is done with it (its result or error stays)."""
        if self.future is not None:
            self.future.exception()

    def drop(self) -> None:
        """Cancel it, or wait for it when it is running (its result or error is dropped)."""
        if self.future is not None and not self.future.cancel():
            self.future.exception()


def by_key(observation: Any, keys: Sequence[str]) -> Mapping[str, Any]:
    """``observation`` as a mapping over the policy's observation ``keys`` (a bare array is the one key's value);
    a ``ValueError`` naming the keys when it is not a dict of a multi-key policy or misses one. Both
    controllers' observation checks start here."""
    if not isinstance(observation, Mapping):
        if len(keys) != 1:
            raise ValueError(f"observation must be a dict with keys {list(keys)}, got {type(observation).__name__}")
        observation = {keys[0]: observation}
    missing = [k for k in keys if k not in observation]
    if missing:
        raise ValueError(f"observation is missing {missing}; this policy takes {list(keys)}")
    return observation


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    """:data:`SUMMARY_KEYS` of ``values`` (None when empty), by the one percentile definition of the reports."""
    full = percentile_summary(values)
    return {key: full[key] for key in SUMMARY_KEYS}


def chunk_stats(records: Sequence[ChunkRecord], act_latency_ms: Sequence[float]) -> dict[str, Any]:
    """What the chunks cost: ``chunks``, ``actions`` (``act`` calls), ``chunk_latency_ms`` and
    ``action_latency_ms`` (mean / p50 / p95 / max; an action's latency is the time of its ``act``
    call, which includes the chunk prediction on the steps that make one), ``rounds`` and
    ``model_evals`` per chunk, ``deadline_misses`` (chunks stopped at the deadline), ``overruns``
    (chunks slower than ``deadline_ms``), ``unconverged`` and ``warm_chunks``."""
    r = records
    return {
        "chunks": len(r),
        "actions": len(act_latency_ms),
        "chunk_latency_ms": _summary([x.latency_ms for x in r]),
        "action_latency_ms": _summary(act_latency_ms),
        "rounds": _summary([x.rounds for x in r]),
        "model_evals": _summary([x.model_evals for x in r]),
        "deadline_misses": sum(x.deadline_hit for x in r),
        "overruns": sum(x.overrun for x in r),
        "unconverged": sum(not x.converged for x in r),
        "warm_chunks": sum(x.warm for x in r),
    }


def loop_stats(records: Sequence[ChunkRecord], simulated: bool) -> dict[str, Any]:
    """The loop's schedule over the chunks :meth:`Controller.act` made (``start_step`` set).

    ``delay_used`` (the ``d`` each chunk was started with), ``stalls`` (chunks the queue ran
    empty for; in ``mode='sync'`` every chunk after an episode's first), ``stall_wait_ms`` (how
    long ``act`` blocked on those), ``idle_steps`` (``simulated``, the steps clock: control steps
    the robot would have stood still, ``start + d - switch`` summed over stalls; else None),
    ``switches`` (chunks that replaced a queue) and ``switch_discontinuity`` (``|a_new - a_old|``
    at those switches, :attr:`ChunkRecord.discontinuity`). The Controller adds ``steps_in_flight``
    (actions handed out while a chunk was being sampled) and ``extended_steps`` (actions run
    from the current plan past its ``n_action_steps``, ``extend_plan``).
    """
    looped = [x for x in records if x.start_step is not None]
    stalled = [x for x in looped if x.stalled]
    switched = [x.discontinuity for x in looped if x.discontinuity is not None]
    return {
        "delay_used": _summary([x.delay_steps for x in looped]),
        "stalls": len(stalled),
        "stall_wait_ms": _summary([x.wait_ms for x in stalled]),
        "idle_steps": sum(max(0, x.start_step + x.delay_steps - x.switch_step) for x in stalled)
        if simulated else None,
        "switches": len(switched),
        "switch_discontinuity": _summary(switched),
    }

class ChunkLoop:
    """The schedule of a control loop that runs a policy one chunk at a time (see the module docstring).

    A subclass calls :meth:`_start_loop` in its constructor and provides :meth:`_step_observation`
    (check one control step's observation), :meth:`_history` (the last ``n_obs_steps`` of them as the
    sampler takes them) and :meth:`_sample` (one chunk); it may override :meth:`_prepare` (before a
    chunk is sampled), :meth:`_may_launch` (hold a launch back), :meth:`_hold` (an action instead
    of waiting for a late chunk) and :meth:`_failed` (a chunk whose sampling failed).
    """

    config: ControllerConfig
    n_obs_steps: int
    n_action_steps: int

    def _start_loop(self, config: ControllerConfig, n_obs_steps: int, n_action_steps: int) -> None:
        """Set the loop's state from ``config`` (checked against ``n_action_steps``), before :meth:`reset`."""
        config.check_policy(n_action_steps)
        self.config, self.n_obs_steps, self.n_action_steps = config, int(n_obs_steps), int(n_action_steps)
        c = config  # read-only copies, for the loop
        self.mode, self.clock, self.delay_steps, self.period_s = c.mode, c.clock, c.delay_steps, c.period_s
        self.prefix_mode, self.soft_masking, self.extend_plan, self.deadline_ms = \
            c.prefix_mode, c.soft_masking, c.extend_plan, c.deadline_ms
        self.records: deque[ChunkRecord] = deque(maxlen=config.max_records)
        self.act_latency_ms: deque[float] = deque(maxlen=config.max_records)
        self.steps_in_flight = 0  # act() calls that returned an action while a chunk was being sampled
        self.extended_steps = 0  # act() calls that ran the current chunk's plan past n_action_steps (extend_plan)
        self._latencies: deque[float] = deque(maxlen=LATENCY_CHUNKS)  # for the measured delay
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: _InFlight | None = None
        self.observations: deque[Any] = deque(maxlen=self.n_obs_steps)
        self.actions: deque[np.ndarray] = deque()
        self.step = 0
        self._chunk: _Chunk | None = None

    # ---- what a subclass provides ------------------------------------------------------
    def _step_observation(self, observation: Any) -> Any:
        """One control step's observation, checked, as the history keeps it."""
        raise NotImplementedError

    def _history(self) -> Any:
        """The last ``n_obs_steps`` observations, as :meth:`_sample` takes them."""
        raise NotImplementedError

    def _sample(self, history: Any, warm: tuple[Any, int] | bool | None, prefix: np.ndarray | None,
                guide: np.ndarray | None) -> ChunkResult:
        """One chunk from ``history``. ``warm``: ``(source, shift)`` (start from that chunk's trajectory
        shifted by ``shift`` steps), False (cold) or None (the sampler's own memory); ``prefix``
        (F, Da): the frozen actions (``rtc``); ``guide`` (G, Da): the old plan after them (soft masking)."""
        raise NotImplementedError

    def _prepare(self, history: Any) -> None:
        """Called before a chunk is sampled from ``history`` (the Controller resolves ``window='auto'``)."""

    def _may_launch(self) -> bool:
        """Whether a chunk may be started now (the RemoteController waits out its reconnection backoff)."""
        return True

    def _hold(self) -> bool:
        """The queue ran out and the next chunk is late: queue an action and return True instead of waiting."""
        return False

    def _failed(self, job: _InFlight) -> None:
        """The chunk in flight failed: raise its error (the RemoteController counts it and retries)."""
        job.output()

    # ---- the loop ------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new episode: clear the observation history, the action queue and the current chunk.

        A chunk still being sampled is waited for and dropped. Statistics are kept (see :meth:`reset_stats`).
        """
        self._drop_in_flight()
        self.observations = deque(maxlen=self.n_obs_steps)
        self.actions = deque()
        self.step = 0  # act() calls since reset: the index of the next control step
        self._chunk = None

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

    def __enter__(self) -> ChunkLoop:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _next_action(self, observation: Any) -> np.ndarray:
        """One control step (see ``act``): record the checked observation, schedule, pop the next action (Da,)."""
        start = time.perf_counter()
        obs = self._step_observation(observation)  # checked before it enters the history
        first = not self.observations
        self.observations.extend([obs] * (self.n_obs_steps if first else 1))
        try:
            if self.mode != "sync":
                self._schedule()
            elif not self.actions:
                self._sync_chunk()
        except BaseException:  # a retried act() records this step again, after the one before it
            if first:
                self.observations.clear()
            else:
                self.observations.pop()
            raise
        action = self.actions.popleft()
        self.step += 1
        self.act_latency_ms.append((time.perf_counter() - start) * 1000)
        return action

    def _warm_guess(self) -> tuple[Any, int] | bool:
        """The next chunk's warm start: ``(source, shift)``, the current chunk shifted by the steps run
        since its observation, or False (cold) without one or without warm start. Every mode's path."""
        if not self.warm_start or self._chunk is None:
            return False
        return self._chunk.source, self.step - self._chunk.start

    def _take_over(self, result: ChunkResult, record: ChunkRecord) -> None:
        """Make ``result`` (planned at ``record.start_step``) the queue's chunk at this step; measure the jump."""
        t, start, plan = self.step, record.start_step, result.plan
        if self._chunk is not None:
            old = self._chunk.plan
            a_old = old[min(t - self._chunk.start, old.shape[0] - 1)]  # what the old chunk planned for step t
            a_new = plan[min(t - start, plan.shape[0] - 1)]  # (a chunk later than its whole plan: its last action)
            record.discontinuity = float(np.linalg.norm(a_new - a_old))
        record.switch_step = t
        self._chunk = _Chunk(start, plan, result.source)

    # ---- mode='sync' -------------------------------------------------------------------
    def _sync_chunk(self) -> None:
        """The queue is empty: predict a chunk from this step's history and wait for it."""
        history = self._history()
        self._prepare(history)
        result = self._sample(history, self._warm_guess(), None, None)
        record = result.record
        self.records.append(record)
        self.actions.extend(list(result.actions))
        record.start_step, record.stalled, record.wait_ms = self.step, self._chunk is not None, record.latency_ms
        self._take_over(result, record)

    # ---- mode='async' / 'rtc': one schedule for both clocks ------------------------------
    def _schedule(self) -> None:
        """Start the next chunk when ``d`` actions are left; switch to it when the queue runs out.

        With ``extend_plan`` a queue that runs out before the chunk is ready gets the current
        plan's action for this step instead (while the plan lasts), and so does a chunk that
        arrives so late that its own queued actions are past.
        """
        if self._in_flight is not None and self._in_flight.failed():
            job, self._in_flight = self._in_flight, None
            self._failed(job)
        if self._in_flight is None and len(self.actions) <= self._delay() and self._may_launch():
            self._launch()
        if not self.actions and not (self.extend_plan and not self._ready() and self._extend()):
            job = self._in_flight
            if (job is None or not job.ready(self.step)) and self._chunk is not None and self._hold():
                pass  # the next chunk is late: the queue got the action to hold meanwhile
            elif job is None:
                raise RuntimeError("no action to run: no chunk is being sampled (it failed) and there is no "
                                   "plan to run on")
            else:
                self._switch()
                if not self.actions and self.extend_plan:
                    self._extend()
                if not self.actions:  # it arrived after its whole plan (a held loop): hold on, ask again
                    self._hold()
                if len(self.actions) <= self._delay() and self._may_launch():  # d >= H - d: the next one at once
                    self._launch()
        if self._in_flight is not None:
            self.steps_in_flight += 1

    def _ready(self) -> bool:
        """Whether the chunk in flight is ready now (wall clock: sampled; steps clock: its ``d`` steps passed)."""
        if self._in_flight is None or self._chunk is None:  # an episode's first chunk: there is no plan to run on
            return True
        return self._in_flight.ready(self.step)

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
        return min(max(d, 1), self.n_action_steps - 1)

    def _launch(self) -> None:
        """Start sampling the chunk for this step's observations (``len(actions) <= d`` are left).

        ``rtc``: the queued actions, which all run before it is ready, are its frozen prefix, and
        with ``soft_masking`` the current chunk's plan after them its guide. With ``extend_plan``
        the plan's actions after the queue that will run before it is ready (``d`` actions in
        all) are frozen too. The warm-start guess is the current chunk shifted by the steps since
        its observation.
        """
        t = self.step
        history = self._history()
        self._prepare(history)
        d = self._delay()
        queued = list(self.actions)
        if self.extend_plan and self._chunk is not None and len(queued) < d:  # what _extend will hand out
            k = t - self._chunk.start + len(queued)
            queued += list(self._chunk.plan[k: k + d - len(queued)])
        frozen = min(d, len(queued)) if self.mode == "rtc" else 0
        prefix = np.stack(queued[:frozen]) if frozen else None  # (frozen, Da) raw
        guide = None
        if frozen and self.soft_masking and self._chunk is not None:
            rest = self._chunk.plan[t - self._chunk.start + frozen:]  # the old plan after the frozen actions
            guide = rest if rest.shape[0] else None
        warm = self._warm_guess()
        job = _InFlight(start=t, delay=d, frozen=frozen)
        if self.clock == "steps":
            job.result = self._sample(history, warm, prefix, guide)  # computed now, ready at step t + d
        else:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="para_policy-controller")
            job.future = self._executor.submit(self._sample, history, warm, prefix, guide)
        self._in_flight = job

    def _switch(self) -> None:
        """The queue ran out: the chunk in flight takes over, time-aligned (waits for it if not ready)."""
        job, t = self._in_flight, self.step
        first = self._chunk is None  # an episode's first chunk: nothing ran dry
        wait, ready = time.perf_counter(), job.ready(t)
        try:
            result = job.output()
        except Exception:  # an interrupted wait keeps the job for the retried step; a failed one is dropped
            self._in_flight = None
            raise
        self._in_flight = None
        record = result.record
        record.start_step, record.delay_steps, record.frozen = job.start, job.delay, job.frozen
        record.stalled, record.wait_ms = not first and not ready, (time.perf_counter() - wait) * 1000
        self._take_over(result, record)
        # its actions before t were planned for steps that already ran: the queue starts at t
        self.actions = deque(list(result.actions[t - job.start:]))
        self.records.append(record)
        self._latencies.append(record.latency_ms)

    def _settle(self) -> None:
        """Wait until the worker is idle (its result stays for the switch)."""
        if getattr(self, "_in_flight", None) is not None:
            self._in_flight.settle()

    def _drop_in_flight(self) -> None:
        """Forget the chunk in flight (a running one is waited for; its result or error is dropped)."""
        job, self._in_flight = getattr(self, "_in_flight", None), None
        if job is not None:
            job.drop()

    # ---- statistics --------------------------------------------------------------------
    @property
    def last_record(self) -> ChunkRecord | None:
        """The record of the last predicted chunk (None before the first)."""
        return self.records[-1] if self.records else None

    def loop_stats(self) -> dict[str, Any]:
        """The loop's figures: ``deadline_ms`` and the chunks' costs (:func:`chunk_stats`), the settings
        (``mode``, ``clock``, ``delay_steps`` as given, ``period_s``, ``extend_plan``) and the schedule
        (:func:`loop_stats`, ``steps_in_flight``, ``extended_steps``)."""
        return {"deadline_ms": self.deadline_ms, **chunk_stats(self.records, self.act_latency_ms),
                "mode": self.mode, "clock": self.clock, "delay_steps": self.delay_steps, "period_s": self.period_s,
                "extend_plan": self.extend_plan,
                **loop_stats(self.records, simulated=self.mode != "sync" and self.clock == "steps"),
                "steps_in_flight": self.steps_in_flight, "extended_steps": self.extended_steps}
