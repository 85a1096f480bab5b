"""What one sampling front end keeps between calls, written once for all of them.

A policy (:class:`~para_policy.policy.LowdimPolicy`, :class:`~para_policy.image_policy.ImagePolicy`),
a patched DiffusionPolicy object and a patched LeRobot object all sample the same way: take
the chosen sampler spec, build (once) the schedule it runs on, replace ``window='auto'`` by this
machine's window, start from the previous chunk when the spec warm-starts, run the sampler (or
its captured CUDA-graph form) and remember the result for the next call. :class:`SamplingSession`
is that sequence; each owner adds only what is its own: how observations become conditioning,
how noise is drawn from its arguments, how trajectories become actions.

The owner hands the session, per call, what only it knows:

* for ``window='auto'`` a :class:`WindowIdentity` (weights digest, device, inference
  settings: what a measured window is specific to) and a ``tune(spec)`` callback that
  measures the window on the owner's observations (:func:`para_policy.window.calibrate_window`
  underneath); both are called only when a window has to be resolved;
* for CUDA-graph sampling the captured sampler (:meth:`SamplingSession.captured`, built from a
  plain-network factory the owner gives).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

# how frozen prefix actions are imposed before each step: clean, or at each step's noise level (defined with
# the control loop, which imports no torch)
from para_policy.chunk_loop import PREFIX_MODES as PREFIX_MODES
from para_policy.samplers.captured import captured_sampler, run_captured
from para_policy.samplers.common import Denoiser, Inpaint, SampleStats, diffuse_known, known_mask, refuse_renamed
from para_policy.samplers.picard import picard_sample
from para_policy.samplers.registry import SamplerConfig, build_schedule, sampler_spec, schedule_key
from para_policy.samplers.warm_start import shift_trajectory, warm_start_init
from para_policy.schedule import Schedule
from para_policy.window import cached_window, resolve_window, tuned_spec, window_key

#: ``tune(spec) -> (window, info)``: measure the window of ``spec`` (cold, window 'auto') on the owner's problems
Tune = Callable[[SamplerConfig], tuple[int, dict[str, Any]]]


class WindowIdentity(NamedTuple):
    """What a window measured for ``window='auto'`` is specific to, beyond spec, schedule and batch size.

    ``model_id``: digest of the network's weights (:func:`para_policy.window.model_fingerprint`);
    ``device``: where it runs; ``denoiser_id``: how it runs (the inference settings as JSON,
    ``'{}'`` for the plain network).
    """

    model_id: str
    device: torch.device
    denoiser_id: str = "{}"


class Sampled(NamedTuple):
    """One :meth:`SamplingSession.run`: ``trajectory`` (B, T, D), the clean normalized sample;
    ``actions``, what the owner returns from it (checked finite); ``stats``; ``warm``: whether it
    started from a warm-start guess."""

    trajectory: torch.Tensor
    actions: torch.Tensor
    stats: SampleStats
    warm: bool


def check_prefix_mode(prefix_mode: str) -> None:
    """A ``ValueError`` unless ``prefix_mode`` is one of :data:`PREFIX_MODES`."""
    if prefix_mode not in PREFIX_MODES:
        raise ValueError(f"prefix_mode must be one of {PREFIX_MODES}, got {prefix_mode!r}")


def runs_sequentially(spec: SamplerConfig, schedule: Schedule, deadline_at: float | None) -> bool:
    """Whether ``spec`` runs as the sequential loop: Picard with a window of one step, no round cap, no deadline.

    :func:`~para_policy.samplers.picard_sample` then runs :func:`~para_policy.samplers.sequential_sample`
    itself (each round computes the next step from a final point), so no initial iterate is ever
    read and a warm-start guess would be built for nothing. The same test as ``picard_sample``'s:
    the window clipped to the schedule's steps.
    """
    cap = spec.options.get("max_iterations")
    window = spec.options.get("window")
    return (spec.family.sample is picard_sample and isinstance(window, int) and min(window, schedule.num_steps) == 1
            and deadline_at is None and (cap is None or cap >= schedule.num_steps))


def require_finite_actions(actions: torch.Tensor, hint: str | Callable[[], str] = "") -> torch.Tensor:
    """``actions`` unchanged, or a ``ValueError`` when any entry is NaN or inf; ``hint`` says what to check.

    Run on what a front end returns (unnormalized actions, or a patched loop's sample), so a
    sample that overflowed and a normalizer that maps a finite sample to inf are both caught.
    ``hint`` may be a callable, evaluated only on failure (a hint that reads tensors syncs a GPU).
    """
    if not bool(torch.isfinite(actions).all()):
        text = hint() if callable(hint) else hint
        raise ValueError("sampling produced non-finite actions (NaN or inf)" + (f"; {text}" if text else ""))
    return actions


def with_prefix(inpaint: Inpaint | None, prefix: Inpaint, prefix_mode: str, schedule: Schedule,
                x_T: torch.Tensor) -> Inpaint:
    """The known entries of a call with frozen ``prefix`` actions, merged with an inpainting owner's ``inpaint``.

    ``prefix``, ``inpaint``: ``(data (B, T, D), mask (B, T, D))``. The inpainting entries are
    imposed clean, as DiffusionPolicy imposes observations; the frozen actions clean or
    (``prefix_mode='noised'``) at each step's noise level (:func:`~para_policy.samplers.diffuse_known`,
    ``x_T`` (B, T, D) as the noise); soft guide weights pull toward the clean plan.
    """
    check_prefix_mode(prefix_mode)
    imposed = prefix[1] if prefix[1].dtype == torch.bool else prefix[1] > 0
    known = prefix
    if inpaint is not None:
        mask = prefix[1] | inpaint[1] if prefix[1].dtype == torch.bool else \
            torch.maximum(prefix[1], inpaint[1].to(prefix[1]))
        known = (torch.where(imposed, prefix[0], inpaint[0]), mask)
    if prefix_mode == "noised":
        known = (diffuse_known(schedule, known[0], known_mask(prefix[1]), x_T.to(known[0])), known[1])
    return known


def check_actions(actions: Any, name: str, batch_size: int, action_dim: int, length: str, *,
                  device: torch.device, dtype: torch.dtype, below: int | None = None) -> torch.Tensor:
    """``actions`` (raw, e.g. frozen ``prefix_actions``) as a (B, length, Da) tensor on ``device`` in ``dtype``.

    A ``ValueError`` naming ``name`` unless it is a real-valued, finite array of that shape;
    ``below``: its length must also be smaller (``n_action_steps``, so a chunk keeps actions of its own).
    """
    a = actions if isinstance(actions, torch.Tensor) else torch.as_tensor(np.asarray(actions))
    limit = "" if below is None else f" with {length} < n_action_steps={below}"
    if a.dim() != 3 or a.shape[0] != batch_size or a.shape[2] != action_dim \
            or (below is not None and a.shape[1] >= below):
        raise ValueError(f"{name} must have shape (B={batch_size}, {length}, action_dim={action_dim}){limit}, "
                         f"got {tuple(a.shape)}")
    if not (a.is_floating_point() or a.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{name} must hold real numbers, got {a.dtype}")
    a = a.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def frozen_actions(shape: tuple[int, int, int], start: int, prefix: torch.Tensor,
                   guide: torch.Tensor | None = None) -> Inpaint:
    """Known entries ``(data, mask)``, both ``shape`` (B, T, D), of frozen normalized actions (real-time chunking).

    ``prefix`` (B, d, Da), ``d >= 1``, goes to the action dims at positions ``start .. start + d``,
    in ``prefix``'s dtype and device. ``guide`` (B, m, Da) continues it at the next positions (as
    far as the trajectory reaches) with real-time chunking's soft mask: weights
    ``c (e^c - 1) / (e - 1)``, ``c = (m - i) / (m + 1)`` at the i-th, decaying from about 1 to
    about 0 (Black et al. 2025); ``mask`` then holds float weights (1 on the frozen actions)
    instead of a bool mask.
    """
    d, Da = prefix.shape[1], prefix.shape[2]
    data = torch.zeros(shape, device=prefix.device, dtype=prefix.dtype)
    mask = torch.zeros(shape, device=prefix.device, dtype=torch.bool)
    data[:, start: start + d, :Da] = prefix
    mask[:, start: start + d, :Da] = True
    if guide is None:
        return data, mask
    first, m = start + d, guide.shape[1]
    n = max(0, min(m, shape[1] - first))
    weights = mask.to(prefix.dtype)
    if n:
        c = (m - torch.arange(n, device=prefix.device, dtype=prefix.dtype)) / (m + 1)
        data[:, first: first + n, :Da] = guide[:, :n]
        weights[:, first: first + n, :Da] = (c * torch.expm1(c) / math.expm1(1.0)).view(1, n, 1)
    return data, weights


class SamplingSession:
    """The sampler spec, schedule cache, window resolution, warm-start memory and dispatch of one sampling front end.

    Args:
        spec: the sampler (a preset name or a :class:`~para_policy.samplers.SamplerConfig`).
        n_action_steps: actions the caller executes between two calls: the warm-start guess
            of the next call is this call's trajectory shifted by that many steps.

    Attributes:
        spec: the sampler in use (:meth:`set_spec` changes it and forgets the warm start).
        last_stats, last_trajectory: the :class:`SampleStats` and clean normalized trajectory
            (B, T, D) of the last successful :meth:`run`.
    """

    def __init__(self, spec: str | SamplerConfig = "sequential", n_action_steps: int = 0) -> None:
        self.spec = sampler_spec(spec)
        self.n_action_steps = int(n_action_steps)
        self.last_stats: SampleStats | None = None
        self.last_trajectory: torch.Tensor | None = None
        self._schedules: dict[tuple, tuple[Any, Schedule]] = {}  # key -> (noise_scheduler, schedule)
        self._resolved: dict[tuple, tuple[SamplerConfig, Schedule, SamplerConfig]] = {}  # resolve()'s memo
        self._captured: dict[str, Any] = {}  # captured samplers, per spec and schedule
        self._warm: tuple[tuple, torch.Tensor] | None = None  # (call key, next guess (B, T, D))

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles keep all but the captured samplers (CUDA graphs do not copy; captured again)."""
        return {**vars(self), "_captured": {}}

    # ---- spec and schedules --------------------------------------------------------
    def set_spec(self, spec: SamplerConfig) -> None:
        """Use ``spec`` from the next call on; the warm-start memory is cleared."""
        self.spec = spec
        self.reset()

    def reset(self) -> None:
        """Forget the previous call's trajectory: the next call starts cold."""
        self._warm = None

    def schedule_for(self, spec: SamplerConfig, noise_scheduler: Any, default_steps: int, eta: float = 0.0,
                     own: Callable[[], Any] | None = None) -> Schedule:
        """The schedule ``spec`` runs on for the owner's diffusers ``noise_scheduler`` object, built once and cached.

        ``default_steps``: the owner's number of inference steps (when the spec sets none);
        ``eta``: DDIM's noise level; ``own``: a fresh copy of ``noise_scheduler`` to build from
        (:func:`~para_policy.samplers.registry.build_schedule`). Cached per schedule choice and
        ``noise_scheduler`` object, so an owner whose scheduler is replaced gets the new one's schedule.
        """
        key = (*schedule_key(spec, noise_scheduler, default_steps), float(eta))
        entry = self._schedules.get(key)
        if entry is None or entry[0] is not noise_scheduler:
            entry = (noise_scheduler, build_schedule(spec, noise_scheduler, default_steps, eta, own=own))
            self._schedules[key] = entry
        return entry[1]

    # ---- window='auto' -------------------------------------------------------------
    def window_key(self, spec: SamplerConfig, schedule: Schedule, batch_size: int, identity: WindowIdentity) -> str:
        """The window cache key (:func:`para_policy.window.window_key`) of ``spec`` on this owner."""
        return window_key(identity.model_id, spec, schedule, batch_size, identity.device, identity.denoiser_id)

    def resolve(self, spec: SamplerConfig, schedule: Schedule, batch_size: int,
                identity: Callable[[], WindowIdentity], tune: Tune, *, remember: bool = True) -> SamplerConfig:
        """``spec`` with ``window='auto'`` replaced by this machine's window; other specs come back unchanged.

        The window comes from :func:`para_policy.window.resolve_window` (this process, then the
        cache file, else ``tune(spec)`` measures it, cold). ``identity()`` is read only for an
        ``'auto'`` spec. ``remember``: memoize the answer per (spec object, schedule, batch size,
        identity), so a control loop does not rebuild the cache key every call.
        """
        if not spec.window_is_auto:
            return spec
        who = identity()
        memo_key = (id(spec), id(schedule), int(batch_size), who)
        memo = self._resolved.get(memo_key)
        if memo is not None and memo[0] is spec and memo[1] is schedule:
            return memo[2]
        window, info = resolve_window(self.window_key(spec, schedule, batch_size, who),
                                      lambda: tune(spec.with_options(warm_start=False)))
        resolved = tuned_spec(spec, window, info)
        if remember:
            if len(self._resolved) > 64:
                self._resolved.clear()
            self._resolved[memo_key] = (spec, schedule, resolved)
        return resolved

    def window_tuning(self, spec: SamplerConfig, schedule: Schedule, batch_size: int,
                      identity: WindowIdentity) -> dict[str, Any] | None:
        """What resolving ``spec``'s ``window='auto'`` measured (window, cost curve, rounds), or None if not yet."""
        return cached_window(self.window_key(spec.with_options(window="auto"), schedule, batch_size, identity))

    def calibrate(self, spec: SamplerConfig, schedule: Schedule, batch_size: int, identity: WindowIdentity,
                  tune: Tune) -> tuple[int, dict[str, Any]]:
        """Measure ``spec``'s window now with ``tune`` (cold, window 'auto') and replace the cached one.

        Returns ``(window, info)`` (:func:`para_policy.window.resolve_window`).
        """
        if not spec.iterative:
            raise ValueError(f"calibrate needs a Picard sampler, not {spec.name!r}")
        auto = spec.with_options(window="auto")
        self._resolved.clear()
        return resolve_window(self.window_key(auto, schedule, batch_size, identity),
                              lambda: tune(auto.with_options(warm_start=False)), recalibrate=True)

    # ---- CUDA graphs ------------------------------------------------------------------
    def captured(self, spec: SamplerConfig, schedule: Schedule,
                 network: Callable[[], tuple[Denoiser, Callable[[], bool]]]) -> Any:
        """The captured form of ``spec`` on ``schedule`` (:func:`~para_policy.samplers.captured.captured_sampler`).

        ``network()`` gives the plain network call to capture and its weights-changed test; it
        is called once per spec and schedule (None comes back for a spec without a captured form).
        """
        key = json.dumps([spec.as_dict(), schedule.kind, schedule.num_steps], sort_keys=True, default=str)
        if key not in self._captured:
            denoiser, weights_changed = network()
            self._captured[key] = captured_sampler(spec, schedule, denoiser, weights_changed=weights_changed)
        return self._captured[key]

    def forget_captured(self) -> None:
        """Drop the captured samplers (the owner's network or its settings changed)."""
        self._captured = {}

    # ---- sampling -------------------------------------------------------------------
    @refuse_renamed("deadline", "warm_rows", "warm_start")
    def run(self, denoise: Denoiser, spec: SamplerConfig, schedule: Schedule, x_T: torch.Tensor,
            noise: torch.Tensor | None = None, *, condition: torch.Tensor | None = None,
            inpaint: Inpaint | None = None, prefix: Inpaint | None = None, prefix_mode: str = "clean",
            init: torch.Tensor | None = None, warm_start: bool | None = None, guess: torch.Tensor | None = None,
            guess_rows: torch.Tensor | None = None, deadline_at: float | None = None, captured: Any = None,
            to_actions: Callable[[torch.Tensor], torch.Tensor] | None = None,
            hint: str | Callable[[], str] = "") -> Sampled:
        """Sample once with ``spec`` (window resolved) on ``schedule``, warm-started when it can be.

        Args:
            denoise: ``(x (N, T, D), t (N,), condition (N, ...) | None) -> (N, T, D)``.
            x_T: (B, T, D) initial noise; ``noise``: (B, S, T, D) per-step noise (or None
                for a deterministic schedule).
            condition: (B, ...) the denoiser's conditioning; ``inpaint``: ``(data, mask)``
                (B, T, D), entries imposed as known (an inpainting policy's observations).
            prefix: ``(data, mask)`` (B, T, D) of frozen actions (real-time chunking), merged
                with ``inpaint`` (:func:`with_prefix`, ``prefix_mode``); they also overwrite
                those entries of a warm-start guess.
            init: (B, S, T, D) initial Picard iterate.
            warm_start: a flag. None: the previous call's trajectory shifted by ``n_action_steps``
                when the spec warm-starts and the previous call had this call's shape, schedule and
                device; True: the same, and the spec must warm-start; False: cold.
            guess: (B, T, D) a guess of the clean normalized trajectory to start from instead (not
                with ``warm_start=False`` or ``init``), rebuilt with this call's noise
                (:func:`~para_policy.samplers.warm_start_init`); ``guess_rows``: (B,) bool, the rows
                of ``guess`` that hold one (the others start cold; default all).
            deadline_at: a ``time.perf_counter()`` instant after which a Picard sampler starts no
                new round and returns its current estimate.
            captured: the captured form of ``spec`` (:meth:`captured`), run instead of the eager sampler.
            to_actions: what the owner returns, from the trajectory (e.g. unnormalized actions);
                default: the trajectory itself.
            hint: what to check when those actions are not finite (:func:`require_finite_actions`).
        Returns:
            :class:`Sampled` ``(trajectory (B, T, D), actions, stats, warm)``; ``stats.warm`` is set.
            Only a call whose actions are finite is remembered (warm start, :attr:`last_stats`,
            :attr:`last_trajectory`); otherwise a ``ValueError`` says so and nothing changes.
        """
        if spec.window_is_auto:
            raise ValueError("run needs a resolved window; resolve window='auto' first (SamplingSession.resolve)")
        if prefix is not None:
            inpaint = with_prefix(inpaint, prefix, prefix_mode, schedule, x_T)
        call_key = (tuple(x_T.shape), schedule.kind, schedule.num_steps, str(x_T.device))
        kwargs, warm = self._iterate_options(spec, schedule, x_T, noise, prefix, call_key, init=init,
                                             warm_start=warm_start, guess=guess, guess_rows=guess_rows,
                                             deadline_at=deadline_at)
        if captured is not None:
            sample, stats = run_captured(captured, x_T, noise, condition, inpaint, kwargs)
        else:
            sample, stats = spec.family.sample(denoise, schedule, x_T, noise, condition=condition, inpaint=inpaint,
                                               **kwargs)
        stats.warm = warm
        actions = require_finite_actions(sample if to_actions is None else to_actions(sample), hint)
        if spec.warm_start:
            self._warm = (call_key, shift_trajectory(sample, self.n_action_steps))
        self.last_stats, self.last_trajectory = stats, sample
        return Sampled(sample, actions, stats, warm)

    def _iterate_options(self, spec: SamplerConfig, schedule: Schedule, x_T: torch.Tensor,
                         noise: torch.Tensor | None, prefix: Inpaint | None, call_key: tuple, *,
                         init: torch.Tensor | None, warm_start: bool | None, guess: torch.Tensor | None,
                         guess_rows: torch.Tensor | None, deadline_at: float | None) -> tuple[dict[str, Any], bool]:
        """The sampler's keyword arguments and whether it starts warm (:meth:`run`'s arguments).

        A Picard spec gets ``init`` (from ``guess``, or the remembered trajectory when
        ``warm_start`` is not False, the spec warm-starts and the call matches ``call_key``),
        ``init_rows`` and ``deadline_at``; the sequential loop refuses them.
        """
        kwargs = dict(spec.options)
        if warm_start and guess is None and not spec.warm_start:
            raise ValueError(f"warm_start=True needs a sampler spec that warm-starts ({spec.name!r} has warm_start "
                             "off: set_sampler(..., warm_start=True)), or a guess= to start from")
        if not spec.iterative:
            if init is not None or guess is not None or deadline_at is not None or guess_rows is not None:
                raise ValueError(f"init, guess, guess_rows and deadline_at need a Picard sampler, not {spec.name!r}")
            return kwargs, False
        if guess is not None:
            if init is not None or warm_start is False:
                raise ValueError("guess= starts from that guess: pass it without init= and without warm_start=False")
            if tuple(guess.shape) != tuple(x_T.shape):
                raise ValueError(f"guess must have the trajectory's shape (B, T, D) = {tuple(x_T.shape)}, "
                                 f"got {tuple(guess.shape)}")
            guess = guess.to(x_T)
        elif guess_rows is not None:
            raise ValueError("guess_rows needs a guess= tensor")
        elif (warm_start is not False and init is None and spec.warm_start and self._warm is not None
              and self._warm[0] == call_key):
            guess = self._warm[1]
        if guess is not None and runs_sequentially(spec, schedule, deadline_at):
            guess = None
        if guess is not None:
            if prefix is not None:  # the frozen actions are known: the guess holds them exactly
                guess = torch.where(known_mask(prefix[1]), prefix[0], guess)
            init = warm_start_init(schedule, guess, x_T, noise)
        kwargs.update(init=init, deadline_at=deadline_at)
        if guess_rows is not None:
            kwargs.update(init_rows=guess_rows.to(device=x_T.device, dtype=torch.bool))
        return kwargs, guess is not None
