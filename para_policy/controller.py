"""The robot-loop object: observations in, actions out, one chunk at a time (``sync``, ``async``, ``rtc``).

:class:`Controller` runs a policy at a control rate (observation history, action queue, warm start
between chunks, deadline, asynchronous inference, real-time chunking, statistics);
:class:`ControllerConfig` holds its options and checks them once, for the Controller and for the
evaluator's ``controller`` group alike. Why it works the way it does, option by option:
docs/library.md, "The Controller"; a control loop to copy: docs/integrations.md.
"""

from __future__ import annotations

import difflib
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from para_policy.policy import LowdimPolicy, PolicyOutput
from para_policy.samplers import SamplerConfig, sampler_spec, shift_trajectory
from para_policy.samplers.registry import SPEC_FIELDS
from para_policy.session import PREFIX_MODES
from para_policy.stats import percentile_summary
from para_policy.window import tuned_spec

MODES = ("sync", "async", "rtc")
CLOCKS = ("wall", "steps")
LATENCY_CHUNKS = 20  # the measured delay covers the slowest of the last chunks (a rare slow one stays covered)
LATENCY_HEADROOM = 1.25  # ... times this: room for jitter, so a chunk a little slower than those still arrives in time
#: what :meth:`Controller.stats` reports of each distribution (:func:`~para_policy.stats.percentile_summary`'s)
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

    def ready(self, step: int) -> bool:
        """Whether it is ready at control step ``step`` (wall clock: sampled; steps clock: its delay passed)."""
        return self.future.done() if self.future is not None else step >= self.start + self.delay

    def output(self) -> tuple[PolicyOutput, float]:
        """``(output, latency_ms)``, waiting for the worker; its error as the cause of a ``RuntimeError``."""
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


def _chunk_record(out: PolicyOutput, latency_ms: float, deadline_ms: float | None) -> ChunkRecord:
    """The :class:`ChunkRecord` of one sampled chunk (its loop fields are set when it takes over)."""
    stats = out.stats
    return ChunkRecord(latency_ms=latency_ms, rounds=int(stats.rounds), model_evals=int(stats.model_evals),
                       converged=bool(stats.all_converged), deadline_hit=bool(stats.deadline_hit),
                       overrun=deadline_ms is not None and latency_ms > deadline_ms, warm=out.warm)


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


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    """:data:`SUMMARY_KEYS` of ``values`` (None when empty), by the one percentile definition of the reports."""
    full = percentile_summary(values)
    return {key: full[key] for key in SUMMARY_KEYS}


def _keyed(policy: LowdimPolicy, observation: Any) -> dict[str, torch.Tensor]:
    """``observation`` as ``{key: tensor}`` over the policy's keys (a bare array is the low-dim ``'obs'``)."""
    shapes = policy.observation_shapes()
    if not isinstance(observation, Mapping):
        if len(shapes) != 1:
            raise ValueError(f"observation must be a dict with keys {list(shapes)}, got {type(observation).__name__}")
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


def _observation_step(policy: LowdimPolicy, observation: Any) -> dict[str, torch.Tensor]:
    """One control step's observation, checked once, before it enters the history: ``{key: (*shape)}``."""
    obs = _keyed(policy, observation)
    for key, shape in policy.observation_shapes().items():
        if tuple(obs[key].shape) != shape:
            name = "observation" if key == "obs" else f"observation {key!r}"
            what = "(obs_dim,)" if key == "obs" else "the policy's"
            raise ValueError(f"{name} must have shape {what} = {shape}, got {tuple(obs[key].shape)}")
        if obs[key].is_floating_point() and not bool(torch.isfinite(obs[key]).all()):
            raise ValueError(f"observation {key!r} contains NaN or inf" if key != "obs"
                             else f"observation contains NaN or inf: {obs[key].tolist()}")
    To = policy.n_obs_steps  # the policy's own checks (dtypes), on this step repeated
    policy.observation_batch({k: v[None].expand(To, *v.shape) for k, v in obs.items()})
    return obs


def _observation_history(policy: LowdimPolicy, observations: Any) -> dict[str, torch.Tensor]:
    """An observation history given whole, checked: ``{key: (n_obs_steps, *shape)}`` float tensors.

    (The history a chunk is planned from; a Picard sampler's ``window`` is something else.)
    """
    obs = _keyed(policy, observations)
    for key, shape in policy.observation_shapes().items():
        expected = (policy.n_obs_steps, *shape)
        if tuple(obs[key].shape) != expected:
            what = "(n_obs_steps, obs_dim)" if key == "obs" else f"{key!r}: (n_obs_steps, *shape)"
            raise ValueError(f"observations must have shape {what} = {expected}, got {tuple(obs[key].shape)}")
    policy.observation_batch(obs)
    return obs


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


class Controller:
    """Run a policy (:class:`~para_policy.policy.LowdimPolicy` or an image policy) in a control loop.

    Args:
        policy: the policy (its normalizer and network; its own sampler setting is not changed).
        sampler: a preset name (default ``'paradigms'``, the fastest measured setting;
            ``'paradigms_published'``, ``'parataa'``, ``'sequential'``) or a
            :class:`~para_policy.samplers.SamplerConfig`. ``None`` is the policy's own sampler
            (``policy.sampler``, as ``policy.set_sampler`` chose it), not ``sampler_spec``'s default.
        config: the Controller's options as one :class:`ControllerConfig`, or None to build one
            from the keywords (``mode='rtc'``, ``period_s=0.1``, ...; not both).
        options: :class:`ControllerConfig` fields, and sampler options (``window``, ``tolerance``,
            ``scheduler``, ``num_inference_steps``, ...: :func:`~para_policy.samplers.sampler_spec`)
            that override the preset's. ``window='auto'`` (the preset's) is resolved on the first
            chunk's observations (:meth:`LowdimPolicy.resolve`, cached per machine and policy) or
            by :meth:`calibrate`; ``window_tuning`` keeps what was measured.

    Shapes: ``act(observation (obs_dim,)) -> (action_dim,)``;
    ``predict_chunk(observations (n_obs_steps, obs_dim)) -> (n_action_steps, action_dim)``.
    Image policies take dicts instead: ``act({'image': (3, H, W), 'agent_pos': (2,)})`` (float
    images in [0, 1]) and ``predict_chunk({'image': (n_obs_steps, 3, H, W), ...})``. Actions come
    back as numpy arrays when observations are numpy, as tensors otherwise.

    Warm start: :meth:`act` passes each chunk's guess explicitly, the current chunk's trajectory
    shifted by the steps run since its observation (only the Controller knows how many ran, and
    in the asynchronous modes it is not ``n_action_steps``); :meth:`predict_chunk` leaves it to the
    policy's :class:`~para_policy.session.SamplingSession`, whose memory is the previous call
    shifted by ``n_action_steps``. With ``clock='wall'`` and an asynchronous mode, call
    :meth:`close` (or use ``with Controller(...) as c:``) to stop the worker thread.
    """

    def __init__(self, policy: LowdimPolicy, sampler: str | SamplerConfig | None = "paradigms", *,
                 config: ControllerConfig | None = None, **options: Any) -> None:
        given = {k: options.pop(k) for k in list(options) if k in CONTROLLER_OPTIONS}
        if config is not None and given:
            raise ValueError(f"{sorted(given)} are ControllerConfig fields: pass them in config or as keywords, "
                             "not both")
        self.config = config = ControllerConfig(**given) if config is None else config
        self.policy = policy
        self.spec = self._sampler_spec(sampler, options)
        policy.schedule_for(self.spec)  # fail now, not in the loop
        config.check_sampler(self.spec)
        config.check_policy(policy.n_action_steps)
        c = config  # read-only copies, for the loop
        self.mode, self.clock, self.delay_steps, self.period_s = c.mode, c.clock, c.delay_steps, c.period_s
        self.prefix_mode, self.soft_masking, self.extend_plan, self.deadline_ms = \
            c.prefix_mode, c.soft_masking, c.extend_plan, c.deadline_ms
        if config.devices is not None:
            from para_policy.devices import use_devices

            use_devices(policy, list(config.devices))
        self.window_tuning: dict[str, Any] | None = None
        self.generator = torch.Generator(device=policy.device)
        self.records: deque[ChunkRecord] = deque(maxlen=config.max_records)
        self.act_latency_ms: deque[float] = deque(maxlen=config.max_records)
        self.steps_in_flight = 0  # act() calls that returned an action while a chunk was being sampled
        self.extended_steps = 0  # act() calls that ran the current chunk's plan past n_action_steps (extend_plan)
        self._latencies: deque[float] = deque(maxlen=LATENCY_CHUNKS)  # for the measured delay
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: _InFlight | None = None
        self.seed(config.seed)
        self.reset()

    def _sampler_spec(self, sampler: str | SamplerConfig | None, options: dict[str, Any]) -> SamplerConfig:
        """The spec to sample with: ``sampler`` (None: the policy's own) with the sampler ``options``.

        A keyword that is neither a Controller option nor one this sampler takes is reported as
        both, with the nearest name of either list, so a misspelled Controller option is not
        mistaken for a sampler option.
        """
        base = sampler_spec(self.policy.sampler if sampler is None else sampler)
        takes = (*base.family.option_names, *SPEC_FIELDS)
        unknown = sorted(set(options) - set(takes))
        if unknown:
            near = difflib.get_close_matches(unknown[0], (*CONTROLLER_OPTIONS, *takes), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            whose = f"sampler {base.name!r}" + (" (sampler=None: the policy's own)" if sampler is None else "")
            raise ValueError(f"Controller does not take {unknown}{hint}: not a Controller option "
                             f"({', '.join(CONTROLLER_OPTIONS)}) and not an option of {whose}, which takes "
                             f"{', '.join(takes)}")
        if self.config.warm_start is not None:
            options["warm_start"] = self.config.warm_start
        return sampler_spec(self.policy.sampler if sampler is None else sampler, **options)

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
        obs = [_observation_history(self.policy, o) for o in observations]
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
        """Start a new episode: clear the observation history, the action queue and the warm-start memory.

        The policy's session forgets its last trajectory too (:meth:`predict_chunk`'s guess). A chunk
        still being sampled is waited for and dropped. Statistics are kept (see :meth:`reset_stats`).
        """
        self._drop_in_flight()
        self.policy.reset()
        self.observations: deque[dict[str, torch.Tensor]] = deque(maxlen=self.policy.n_obs_steps)
        self.actions: deque[torch.Tensor] = deque()
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
        (running the current plan on meanwhile with ``extend_plan``, else waiting: a stall). An
        error raised while sampling in the worker is raised here, as the cause of a ``RuntimeError``.
        A call that raises (or is interrupted) leaves the history as it was: the step did not happen.
        """
        start = time.perf_counter()
        as_numpy = not _all_tensors(observation)
        obs = _observation_step(self.policy, observation)  # checked before it enters the history
        first = not self.observations
        self.observations.extend([obs] * (self.policy.n_obs_steps if first else 1))
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
        return action.numpy() if as_numpy else action

    def predict_chunk(self, observations: np.ndarray | torch.Tensor | Mapping[str, Any]
                      ) -> np.ndarray | torch.Tensor:
        """Predict ``(n_action_steps, action_dim)`` actions from ``(n_obs_steps, obs_dim)`` observations.

        Warm-starts from the policy session's memory, the previous call's trajectory shifted by
        ``n_action_steps``: it assumes all the returned actions are executed before the next chunk.
        Call :meth:`reset` when that is not so. The action queue and a chunk in flight are not
        touched (a chunk being sampled by the worker is waited for first: they share the noise generator).
        """
        as_numpy = not _all_tensors(observations)
        self._settle()
        obs = {k: v[None] for k, v in _observation_history(self.policy, observations).items()}
        actions = self._chunk_output(obs, None)["action"][0].detach().to("cpu")
        return actions.numpy() if as_numpy else actions

    def _chunk_output(self, obs: Mapping[str, torch.Tensor], warm: torch.Tensor | bool | None) -> PolicyOutput:
        """One chunk from ``{key: (1, n_obs_steps, ...)}``, waited for and recorded."""
        self._resolve_window(obs)
        out, latency_ms = self._sample(obs, warm, None)
        self.records.append(_chunk_record(out, latency_ms, self.deadline_ms))
        return out

    def _resolve_window(self, obs: Mapping[str, torch.Tensor]) -> None:
        """Replace ``window='auto'`` by this machine's window, measured on ``obs`` the first time."""
        if self.spec.window_is_auto:
            auto = self.spec
            self.spec = self.policy.resolve(auto, obs)
            self.window_tuning = self.policy.window_tuning(auto)

    def _sample(self, obs: Mapping[str, torch.Tensor], warm: torch.Tensor | bool | None,
                prefix: torch.Tensor | None, guide: torch.Tensor | None = None) -> tuple[PolicyOutput, float]:
        """One ``predict_action`` call on ``{key: (1, n_obs_steps, ...)}``: ``(output, latency_ms)``.

        ``warm``: a (1, T, D) guess (``guess=``), False (cold) or None (the session's memory).
        Runs on the worker thread with ``clock='wall'`` and an asynchronous mode; only one at a
        time, so the generator's draws keep their order.
        """
        start = time.perf_counter()
        deadline_at = None if self.deadline_ms is None else start + self.deadline_ms / 1000
        # sync and async calls stay as they were
        frozen = {} if prefix is None else {"prefix_actions": prefix, "prefix_mode": self.prefix_mode}
        if guide is not None:
            frozen["guide_actions"] = guide
        start_from = {"guess": warm} if isinstance(warm, torch.Tensor) else {"warm_start": warm}  # None: the session's
        self.generator = generator_on(self.generator, self.policy.device)  # the policy may have moved
        out = self.policy.predict_action(obs, generator=self.generator, deadline_at=deadline_at, sampler=self.spec,
                                         **start_from, **frozen)
        return out, (time.perf_counter() - start) * 1000

    def _history(self) -> dict[str, torch.Tensor]:
        """The last ``n_obs_steps`` observations (checked by :meth:`act`): ``{key: (1, n_obs_steps, *shape)}``."""
        return {k: torch.stack([o[k] for o in self.observations])[None] for k in self.observations[-1]}

    def _warm_guess(self) -> torch.Tensor | bool:
        """The next chunk's warm start: the current chunk's trajectory (1, T, D) shifted by the steps run
        since its observation, or False (cold) without one or without ``warm_start``. Every mode's path."""
        if not self.warm_start or self._chunk is None:
            return False
        return shift_trajectory(self._chunk.trajectory, self.step - self._chunk.start)

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
        out = self._chunk_output(self._history(), self._warm_guess())
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
        if self._in_flight is not None and self._in_flight.failed():
            job, self._in_flight = self._in_flight, None
            job.output()  # raises
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
        obs = self._history()
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
        warm = self._warm_guess()
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
        wait, ready = time.perf_counter(), job.ready(t)
        try:
            out, latency_ms = job.output()
        except Exception:  # an interrupted wait keeps the job for the retried step; a failed one is dropped
            self._in_flight = None
            raise
        self._in_flight = None
        record = _chunk_record(out, latency_ms, self.deadline_ms)
        record.start_step, record.delay_steps, record.frozen = job.start, job.delay, job.frozen
        record.stalled, record.wait_ms = not first and not ready, (time.perf_counter() - wait) * 1000
        self._take_over(out, record)
        # its actions before t were planned for steps that already ran: the queue starts at t
        self.actions = deque(out["action"][0].detach().to("cpu")[t - job.start:].unbind(0))
        self.records.append(record)
        self._latencies.append(latency_ms)

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

    def stats(self) -> dict[str, Any]:
        """Statistics over the chunks since :meth:`reset_stats` (the last ``max_records``), and the settings.

        ``sampler``, ``options``, ``warm_start``, ``deadline_ms``, ``mode``, ``clock``,
        ``delay_steps`` (as given), ``period_s``, ``extend_plan``; the chunks' latency, rounds and
        deadline figures (:func:`chunk_stats`) and the loop's schedule (:func:`loop_stats`:
        stalls, switches, the action jump at each switch, ...).
        """
        return {"sampler": self.spec.name, "options": dict(self.spec.options), "warm_start": self.warm_start,
                "deadline_ms": self.deadline_ms, **chunk_stats(self.records, self.act_latency_ms),
                "mode": self.mode, "clock": self.clock, "delay_steps": self.delay_steps, "period_s": self.period_s,
                "extend_plan": self.extend_plan,
                **loop_stats(self.records, simulated=self.mode != "sync" and self.clock == "steps"),
                "steps_in_flight": self.steps_in_flight, "extended_steps": self.extended_steps}
