"""The robot-loop object: observations in, actions out, one chunk at a time (``sync``, ``async``, ``rtc``).

:class:`Controller` runs a policy in this process at a control rate (observation history, action
queue, warm start between chunks, deadline, asynchronous inference, real-time chunking,
statistics); the schedule is :class:`~para_policy.chunk_loop.ChunkLoop`'s, shared with the
networked :class:`~para_policy.serving.client.RemoteController`, and :class:`ControllerConfig`
(defined there) holds the options of both. Why it works the way it does, option by option:
docs/library.md, "The Controller"; a control loop to copy: docs/integrations.md.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from para_policy.chunk_loop import (
    CLOCKS,
    CONTROLLER_OPTIONS,
    MODES,
    SUMMARY_KEYS,
    ChunkLoop,
    ChunkRecord,
    ChunkResult,
    ControllerConfig,
    ControllerConfigError,
    by_key,
    chunk_stats,
    loop_stats,
)
from para_policy.policy import LowdimPolicy, PolicyOutput
from para_policy.samplers import SamplerConfig, sampler_spec, shift_trajectory
from para_policy.samplers.registry import SPEC_FIELDS
from para_policy.window import tuned_spec

__all__ = ["CLOCKS", "CONTROLLER_OPTIONS", "MODES", "SUMMARY_KEYS", "ChunkRecord", "Controller", "ControllerConfig",
           "ControllerConfigError", "chunk_stats", "generator_on", "loop_stats", "shift_trajectory"]



def _as_numpy(x: torch.Tensor) -> np.ndarray:
    """A CPU float numpy view of an action tensor (bf16 / fp16 outputs as float32)."""
    x = x.detach().to("cpu")
    return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()


def _chunk_result(out: PolicyOutput, action_start: int, latency_ms: float, deadline_ms: float | None) -> ChunkResult:
    """The loop's :class:`~para_policy.chunk_loop.ChunkResult` of one ``predict_action`` output (batch 1)."""
    stats = out.stats
    record = ChunkRecord(latency_ms=latency_ms, rounds=int(stats.rounds), model_evals=int(stats.model_evals),
                         converged=bool(stats.all_converged), deadline_hit=bool(stats.deadline_hit),
                         overrun=deadline_ms is not None and latency_ms > deadline_ms, warm=out.warm)
    return ChunkResult(actions=_as_numpy(out["action"][0]), plan=_as_numpy(out["action_pred"][0, action_start:]),
                       source=out.trajectory, record=record)


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


def _keyed(policy: LowdimPolicy, observation: Any) -> dict[str, torch.Tensor]:
    """``observation`` as ``{key: tensor}`` over the policy's keys (a bare array is the low-dim ``'obs'``)."""
    shapes = policy.observation_shapes()
    observation = by_key(observation, list(shapes))
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





class Controller(ChunkLoop):
    """Run a policy (:class:`~para_policy.policy.LowdimPolicy` or an image policy) in a control loop.

    Args:
        policy: the policy (its normalizer and network; its own sampler setting is not changed).
        sampler: a preset name (default ``'paradigms'``, the fastest measured setting;
            ``'paradigms_published'``, ``'parataa'``, ``'sequential'``, ``'asyncdiff'``, ``'patches'``) or a
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
        config = ControllerConfig(**given) if config is None else config
        self.config = config
        self.policy = policy
        self.spec = self._sampler_spec(sampler, options)
        policy.schedule_for(self.spec)  # fail now, not in the loop
        config.check_sampler(self.spec)
        self._start_loop(config, policy.n_obs_steps, policy.n_action_steps)
        if config.devices is not None:
            from para_policy.devices import use_devices

            use_devices(policy, list(config.devices))
        self.window_tuning: dict[str, Any] | None = None
        self.generator = torch.Generator(device=policy.device)
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
        super().reset()
        self.policy.reset()

    def __enter__(self) -> Controller:
        return self

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
        action = self._next_action(observation)
        return action if not _all_tensors(observation) else torch.from_numpy(action)

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
        self._prepare(obs)
        result = self._sample(obs, None, None, None)
        self.records.append(result.record)
        return result.actions if as_numpy else torch.from_numpy(result.actions)

    def _step_observation(self, observation: Any) -> dict[str, torch.Tensor]:
        return _observation_step(self.policy, observation)

    def _prepare(self, obs: Mapping[str, torch.Tensor]) -> None:
        """Replace ``window='auto'`` by this machine's window, measured on ``obs`` the first time."""
        if self.spec.window_is_auto:
            auto = self.spec
            self.spec = self.policy.resolve(auto, obs)
            self.window_tuning = self.policy.window_tuning(auto)

    def _sample(self, obs: Mapping[str, torch.Tensor], warm: tuple[torch.Tensor, int] | bool | None,
                prefix: np.ndarray | None, guide: np.ndarray | None) -> ChunkResult:
        """One ``predict_action`` call on ``{key: (1, n_obs_steps, ...)}``.

        ``warm``: ``(trajectory (1, T, D), shift)`` (``guess=`` the trajectory shifted), False
        (cold) or None (the session's memory). Runs on the worker thread with ``clock='wall'``
        and an asynchronous mode; only one at a time, so the generator's draws keep their order.
        """
        start = time.perf_counter()
        deadline_at = None if self.deadline_ms is None else start + self.deadline_ms / 1000
        frozen = {}  # sync and async calls stay as they were
        if prefix is not None:
            frozen = {"prefix_actions": torch.from_numpy(prefix)[None], "prefix_mode": self.prefix_mode}
        if guide is not None:
            frozen["guide_actions"] = torch.from_numpy(guide)[None]
        start_from = {"guess": shift_trajectory(*warm)} if isinstance(warm, tuple) else {"warm_start": warm}
        self.generator = generator_on(self.generator, self.policy.device)  # the policy may have moved
        out = self.policy.predict_action(obs, generator=self.generator, deadline_at=deadline_at, sampler=self.spec,
                                         **start_from, **frozen)
        latency_ms = (time.perf_counter() - start) * 1000
        return _chunk_result(out, self.policy.action_start, latency_ms, self.deadline_ms)

    def _history(self) -> dict[str, torch.Tensor]:
        """The last ``n_obs_steps`` observations (checked by :meth:`act`): ``{key: (1, n_obs_steps, *shape)}``."""
        return {k: torch.stack([o[k] for o in self.observations])[None] for k in self.observations[-1]}

    def stats(self) -> dict[str, Any]:
        """Statistics over the chunks since :meth:`reset_stats` (the last ``max_records``), and the settings.

        ``sampler``, ``options``, ``warm_start``, ``deadline_ms``, ``mode``, ``clock``,
        ``delay_steps`` (as given), ``period_s``, ``extend_plan``; the chunks' latency, rounds and
        deadline figures (:func:`chunk_stats`) and the loop's schedule (:func:`loop_stats`:
        stalls, switches, the action jump at each switch, ...).
        """
        return {"sampler": self.spec.name, "options": dict(self.spec.options), "warm_start": self.warm_start,
                **self.loop_stats()}
