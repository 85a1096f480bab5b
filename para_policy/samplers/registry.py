"""The sampler registry: sampler families, their typed options, the named presets, one constructor.

Why one module: a sampler name must mean the same thing on every path (``load_policy``,
``set_sampler``, ``predict_action(sampler=...)``, ``Controller``, ``patch`` and
``configs/sampler/*.yaml``), and an option must be checked once, completely, when the
sampler is chosen rather than at the first call. Every path builds its spec with
:func:`sampler_spec`.

* **Families** are the sampling functions: ``sequential`` (:func:`sequential_sample`),
  ``picard`` (:func:`picard_sample`), ``taa`` (:func:`taa_sample`), ``asyncdiff``
  (:func:`asyncdiff_sample`, the network's stages at once on worker threads) and ``patches``
  (:func:`patch_sample`, patches of the horizon at once on worker threads). Each family but
  the sequential one has a dataclass of options (:class:`PicardOptions`, :class:`TaaOptions`,
  :class:`AsyncDiffOptions`, :class:`PatchOptions`) whose defaults are the function's own.
* **Presets** are named settings of a family (:data:`PRESETS`): ``paradigms`` is the
  fastest measured setting, ``paradigms_published`` ParaDiGMS as published, ``parataa``
  ParaTAA, ``sequential`` the reference loop, ``asyncdiff`` AsyncDiff's stage parallelism,
  ``patches`` DistriFusion's displaced patch parallelism over the horizon.
* **The schedule** (``scheduler='ddpm'|'ddim'|'dpmsolver++'|'sde-dpmsolver++'``,
  ``num_inference_steps``, ``solver_order`` for DPM-Solver++) is orthogonal: any preset runs on
  any schedule; ``None`` means the checkpoint's own.

A spec (:class:`SamplerConfig`) holds the preset name, the schedule choice, the
complete validated options of its family and ``warm_start``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from para_policy.samplers.asyncdiff import asyncdiff_sample
from para_policy.samplers.options import (
    SamplerOptionError,
    check_anderson_options,
    check_bool,
    check_int,
    check_patch_options,
    check_round_options,
    check_stage_options,
)
from para_policy.samplers.patches import patch_sample
from para_policy.samplers.picard import ROUND_SHAPES, picard_sample
from para_policy.samplers.sequential import sequential_sample
from para_policy.samplers.taa import taa_sample
from para_policy.schedule import Schedule, ddim_from, dpm_from, make_schedule


@dataclass(frozen=True)
class PicardOptions:
    """Options of :func:`~para_policy.samplers.picard_sample` (see it for their meaning).

    window: steps refined per round, an integer >= 1 or ``'auto'`` (chosen from this
    machine's cost curve when the sampler first runs, :mod:`para_policy.window`);
    tolerance: finite, in [0, :data:`~para_policy.samplers.options.MAX_TOLERANCE`] (0 = exact);
    max_iterations: None (= number of steps) or >= 1; secant needs linear_solve; round_shape:
    ``'compact'``, ``'fixed'`` or ``'auto'`` (chosen with the window from the measured cost of
    both, so only with ``window='auto'``); compile_round needs ``round_shape='fixed'``.
    """

    window: int | str = 16
    tolerance: float = 0.1
    max_iterations: int | None = None
    per_sample_windows: bool = True
    linear_solve: bool = False
    secant: bool = False
    round_shape: str = "compact"
    compile_round: bool = False

    def __post_init__(self) -> None:
        check_round_options(self.window, self.tolerance, self.max_iterations, auto=True)
        object.__setattr__(self, "tolerance", float(self.tolerance))
        for flag in ("per_sample_windows", "linear_solve", "secant", "compile_round"):
            check_bool(flag, getattr(self, flag))
        if self.secant and not self.linear_solve:
            raise SamplerOptionError("secant=True needs linear_solve=True (it refines the linear solve)", "secant")
        if self.round_shape not in (*ROUND_SHAPES, "auto"):
            raise SamplerOptionError(f"round_shape must be one of {[*ROUND_SHAPES, 'auto']}, got "
                                     f"{self.round_shape!r}", "round_shape")
        if self.round_shape == "auto" and self.window != "auto":
            raise SamplerOptionError("round_shape='auto' is chosen together with the window: it needs window='auto'",
                                     "round_shape")
        if self.compile_round and self.round_shape != "fixed":
            raise SamplerOptionError("compile_round=True needs round_shape='fixed'", "compile_round")


@dataclass(frozen=True)
class TaaOptions(PicardOptions):
    """:class:`PicardOptions` plus ParaTAA's memory (past iterates mixed, >= 1) and ridge (>= 0)."""

    memory: int = 3
    ridge: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_anderson_options(self.memory, self.ridge)
        object.__setattr__(self, "ridge", float(self.ridge))


@dataclass(frozen=True)
class AsyncDiffOptions:
    """Options of :func:`~para_policy.samplers.asyncdiff_sample` (see it for their meaning).

    stages: workers the network is cut over (>= 1); warmup: sequential steps first (>= 1);
    tail: sequential steps last (>= 0); stride: steps per parallel round (>= 1); exact: refine to
    the sequential answer; time_shift: later stages embed the timestep their stale input was
    computed at; extrapolate: each stale output extrapolated one step forward (stride 1).
    """

    stages: int = 2
    warmup: int = 1
    tail: int = 2
    stride: int = 1
    exact: bool = False
    time_shift: bool = True
    extrapolate: bool = True

    def __post_init__(self) -> None:
        check_stage_options(self.stages, self.warmup, self.stride, self.exact, self.time_shift, self.tail,
                            self.extrapolate)


@dataclass(frozen=True)
class PatchOptions:
    """Options of :func:`~para_policy.samplers.patch_sample` (see it for their meaning).

    patches: patches of the horizon run at once (>= 1; that it divides the horizon is checked
    when the policy builds its runner); warmup: whole-network steps first (>= 1); exact: refine
    to the sequential answer.
    """

    patches: int = 2
    warmup: int = 1
    exact: bool = False

    def __post_init__(self) -> None:
        check_patch_options(self.patches, self.warmup, self.exact)


@dataclass(frozen=True)
class Family:
    """A sampling function and its options class (None: it takes no options).

    ``takes_init``: with options, whether it takes ``init`` / warm starts / ``deadline_at`` (the
    Picard families do; AsyncDiff and the patches do not).
    """

    sample: Callable[..., Any]
    options: type[PicardOptions] | type[AsyncDiffOptions] | type[PatchOptions] | None
    takes_init: bool = True

    @property
    def iterative(self) -> bool:
        """Takes ``init`` / warm starts / ``deadline_at`` (the Picard families)."""
        return self.options is not None and self.takes_init

    @property
    def staged(self) -> bool:
        """Runs the network cut into stages (AsyncDiff): the denoiser must offer ``staged(n)``."""
        return self.options is AsyncDiffOptions

    @property
    def patched(self) -> bool:
        """Runs the network on patches of the horizon (the ``patches`` family): the denoiser must offer
        ``patched(n)``."""
        return self.options is PatchOptions

    @property
    def option_names(self) -> tuple[str, ...]:
        return () if self.options is None else tuple(f.name for f in dataclasses.fields(self.options))


FAMILIES: dict[str, Family] = {
    "sequential": Family(sequential_sample, None),
    "picard": Family(picard_sample, PicardOptions),
    "taa": Family(taa_sample, TaaOptions),
    "asyncdiff": Family(asyncdiff_sample, AsyncDiffOptions, takes_init=False),
    "patches": Family(patch_sample, PatchOptions, takes_init=False),
}

#: name → family, warm_start and the options that differ from the family's defaults.
#: ``paradigms`` is the fastest measured setting (eval/results/bench_latency/): Picard with
#: the linear part of every step solved exactly and refined by a secant slope, a warm start
#: from the previous chunk, the window from this machine's cost curve.
PRESETS: dict[str, dict[str, Any]] = {
    "paradigms": {"family": "picard", "warm_start": True,
                  "options": {"window": "auto", "tolerance": 0.02, "linear_solve": True, "secant": True}},
    "paradigms_published": {"family": "picard", "warm_start": False,
                            "options": {"window": 16, "tolerance": 0.1, "per_sample_windows": False}},
    "parataa": {"family": "taa", "warm_start": False, "options": {"window": 16, "tolerance": 0.1}},
    "sequential": {"family": "sequential", "warm_start": False, "options": {}},
    "asyncdiff": {"family": "asyncdiff", "warm_start": False, "options": {}},
    "patches": {"family": "patches", "warm_start": False, "options": {}},
}
DEFAULT_SAMPLER = "paradigms"
#: the :class:`SamplerConfig` fields besides ``name`` and ``options`` (the schedule choice, warm start)
SPEC_FIELDS = ("scheduler", "num_inference_steps", "warm_start", "solver_order")
#: the DPM-Solver++ schedulers (diffusers' ``DPMSolverMultistepScheduler`` ``algorithm_type``)
DPM_SCHEDULERS = ("dpmsolver++", "sde-dpmsolver++")
SCHEDULERS = (None, "ddpm", "ddim", *DPM_SCHEDULERS)
#: ``solver_order`` of a DPM-Solver++ schedule derived from a DDPM or DDIM scheduler
DEFAULT_SOLVER_ORDER = 2
#: names earlier releases accepted, and what they are now
RENAMED = {
    "paraddpm": "sampler='paradigms_published', scheduler='ddpm'",
    "paraddim": "sampler='paradigms_published', scheduler='ddim', num_inference_steps=16",
    "recommended": "sampler='paradigms'",
}


@dataclass(frozen=True)
class SamplerConfig:
    """A validated sampler spec: preset name, schedule choice, complete options, warm start.

    Build one with :func:`sampler_spec` (or directly: missing options take the preset's
    values, then the family's defaults). Every field is checked here, so a spec that
    exists is one that runs.

    name: a key of :data:`PRESETS`, required (no default here: ``sampler_spec()`` and
    ``load_policy`` default to ``paradigms``, a policy built directly starts ``sequential``, and a
    third default would be one too many); scheduler: the schedule's kind string, ``'ddpm'`` /
    ``'ddim'`` / ``'dpmsolver++'`` / ``'sde-dpmsolver++'`` / None (the checkpoint's; the diffusers
    object is ``noise_scheduler`` wherever one is passed); num_inference_steps: >= 1 or None (the
    checkpoint's); options: the family's complete options as a dict (``{}`` for sequential);
    warm_start: start each call from the previous call's trajectory (iterative families only;
    None: the preset's); solver_order: DPM-Solver++'s order, 1–3, only with a DPM scheduler
    (None: the checkpoint's when its scheduler is DPM-Solver++, else
    :data:`DEFAULT_SOLVER_ORDER`; with ``scheduler=None`` it is checked against the
    checkpoint's scheduler when the schedule is built).
    """

    name: str
    scheduler: str | None = None
    num_inference_steps: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    warm_start: bool | None = None
    solver_order: int | None = None

    def __post_init__(self) -> None:
        if self.name in RENAMED:
            raise SamplerOptionError(f"sampler {self.name!r} is now {RENAMED[self.name]}")
        if self.name not in PRESETS:
            raise SamplerOptionError(f"unknown sampler {self.name!r}; expected one of {sorted(PRESETS)}")
        if self.scheduler not in SCHEDULERS:
            raise SamplerOptionError(f"unknown scheduler {self.scheduler!r}; expected one of "
                                     f"{[s for s in SCHEDULERS if s]} or None")
        if self.num_inference_steps is not None:
            check_int("num_inference_steps", self.num_inference_steps, 1)
        if self.solver_order is not None:
            if isinstance(self.solver_order, bool) or not isinstance(self.solver_order, int) \
                    or not 1 <= self.solver_order <= 3:
                raise SamplerOptionError(f"solver_order must be 1, 2 or 3, got {self.solver_order!r}",
                                         "solver_order")
            if self.scheduler is not None and self.scheduler not in DPM_SCHEDULERS:
                raise SamplerOptionError(f"solver_order is DPM-Solver++'s order: it needs scheduler="
                                         f"{' or '.join(map(repr, DPM_SCHEDULERS))}, not {self.scheduler!r}",
                                         "solver_order")
        preset = PRESETS[self.name]
        family = FAMILIES[preset["family"]]
        given = dict(self.options)
        unknown = sorted(set(given) - set(family.option_names))
        if unknown:
            takes = list(family.option_names) or "no options"
            raise SamplerOptionError(f"sampler {self.name!r} does not take {unknown}; it takes {takes}", unknown[0],
                                     f"{self.name!r} does not take {unknown}; it takes {takes}")
        if family.options is None:
            options: dict[str, Any] = {}
        else:
            try:
                options = dataclasses.asdict(family.options(**{**preset["options"], **given}))
            except SamplerOptionError as e:
                raise SamplerOptionError(f"sampler {self.name!r}: {e}", e.key, str(e)) from None
        object.__setattr__(self, "options", options)
        warm = preset["warm_start"] if self.warm_start is None else self.warm_start
        check_bool("warm_start", warm)
        if warm and not family.iterative:
            raise SamplerOptionError(f"warm_start needs a Picard sampler, not {self.name!r}")
        object.__setattr__(self, "warm_start", warm)

    @property
    def family(self) -> Family:
        return FAMILIES[PRESETS[self.name]["family"]]

    @property
    def iterative(self) -> bool:
        """Whether it takes warm starts, ``init`` and a ``deadline_at`` (the Picard families)."""
        return self.family.iterative

    @property
    def window_is_auto(self) -> bool:
        return self.options.get("window") == "auto"

    def with_options(self, **changes: Any) -> SamplerConfig:
        """This spec with some options (or ``warm_start``, ``scheduler``, ``num_inference_steps``,
        ``solver_order``) changed."""
        fields = {k: changes.pop(k) for k in SPEC_FIELDS if k in changes}
        return dataclasses.replace(self, options={**self.options, **changes}, **fields)

    def as_dict(self) -> dict[str, Any]:
        """JSON form (what results files and fingerprints record)."""
        return {"name": self.name, "scheduler": self.scheduler, "num_inference_steps": self.num_inference_steps,
                "options": dict(self.options), "warm_start": self.warm_start, "solver_order": self.solver_order}


def sampler_spec(sampler: str | SamplerConfig | Mapping[str, Any] | None = DEFAULT_SAMPLER,
                 **options: Any) -> SamplerConfig:
    """The one constructor of sampler specs: a preset name (or a spec, or a mapping) plus options.

    ``options`` may hold the family's options, ``scheduler``, ``num_inference_steps``,
    ``solver_order`` and ``warm_start``; they override the preset's values. A mapping is read as
    ``{'name': ..., **options}`` (a Hydra ``sampler`` group; ``None`` values mean "the
    preset's"). Given a spec, ``options`` change it. Raises :class:`SamplerOptionError`
    (a ``ValueError``) naming what was wrong and what was expected.
    """
    if isinstance(sampler, SamplerConfig):
        return sampler.with_options(**options) if options else sampler
    if isinstance(sampler, Mapping):
        node = {k: v for k, v in sampler.items() if v is not None}
        if "name" not in node:
            raise SamplerOptionError(f"a sampler mapping needs a 'name' (one of {sorted(PRESETS)}), "
                                     f"got {dict(sampler)}")
        name = node.pop("name")
        options = {**node, **options}
    elif sampler is None:
        name = DEFAULT_SAMPLER
    elif isinstance(sampler, str):
        name = sampler
    else:
        raise SamplerOptionError(f"sampler must be a name, a SamplerConfig or a mapping, got {type(sampler).__name__}")
    opts = dict(options)
    fields = {k: opts.pop(k) for k in SPEC_FIELDS if k in opts}
    return SamplerConfig(name, options=opts, **fields)


def scheduler_kind(noise_scheduler: Any) -> str:
    """The kind string of a diffusers ``noise_scheduler`` object: ``'ddim'`` for a DDIMScheduler, its
    ``algorithm_type`` (``'dpmsolver++'`` / ``'sde-dpmsolver++'``) for a DPMSolverMultistepScheduler,
    ``'ddpm'`` otherwise."""
    name = type(noise_scheduler).__name__
    if name == "DDIMScheduler":
        return "ddim"
    if name == "DPMSolverMultistepScheduler":
        return str(noise_scheduler.config.get("algorithm_type", "dpmsolver++"))
    return "ddpm"


def _ddpm_from(noise_scheduler: Any) -> Any:
    """The DDPM scheduler of a DPM-Solver++ scheduler's betas and prediction type (no clipping, as DPM-Solver)."""
    from diffusers import DDPMScheduler

    cfg = noise_scheduler.config
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                         beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
                         trained_betas=cfg.get("trained_betas"), clip_sample=False,
                         prediction_type=cfg.prediction_type)


def build_schedule(spec: SamplerConfig, noise_scheduler: Any, default_steps: int, eta: float = 0.0,
                   own: Callable[[], Any] | None = None) -> Schedule:
    """The :class:`Schedule` ``spec`` runs on, from the policy's diffusers ``noise_scheduler`` object.

    ``spec.scheduler`` None keeps the scheduler's own kind; ``'ddim'`` on a DDPM- or
    DPM-Solver-trained policy uses its DDIM twin (:func:`~para_policy.schedule.ddim_from`);
    ``'dpmsolver++'`` / ``'sde-dpmsolver++'`` on a DDPM- or DDIM-trained policy its DPM-Solver++
    twin (:func:`~para_policy.schedule.dpm_from`, order ``spec.solver_order`` or
    :data:`DEFAULT_SOLVER_ORDER`), on a DPM-Solver-trained one the policy's own scheduler (with
    ``solver_order`` / ``algorithm_type`` changed if asked); ``'ddpm'`` on a DPM-Solver-trained
    policy a DDPM scheduler of its betas. DDPM cannot be derived from DDIM. ``solver_order``
    on a non-DPM schedule is refused. ``own`` makes a fresh copy of the policy's scheduler
    (default: the scheduler itself, whose timesteps :func:`make_schedule` sets).
    """
    kind, steps, order = schedule_key(spec, noise_scheduler, default_steps)
    own_kind = scheduler_kind(noise_scheduler)
    if spec.solver_order is not None and kind not in DPM_SCHEDULERS:
        raise SamplerOptionError(f"solver_order is DPM-Solver++'s order, but the schedule is {kind!r} (the "
                                 "policy's scheduler); choose scheduler='dpmsolver++' or drop solver_order",
                                 "solver_order")
    if kind in DPM_SCHEDULERS:
        if own_kind in DPM_SCHEDULERS:
            sched = own() if own is not None else noise_scheduler
            if (own_kind, sched.config.solver_order) != (kind, order):
                sched = type(sched).from_config(sched.config, solver_order=order, algorithm_type=kind)
        else:
            sched = dpm_from(noise_scheduler, solver_order=order, algorithm_type=kind)
    elif kind == own_kind:
        sched = own() if own is not None else noise_scheduler
    elif kind == "ddim":
        sched = ddim_from(noise_scheduler)
    elif own_kind in DPM_SCHEDULERS:
        sched = _ddpm_from(noise_scheduler)
    else:
        raise SamplerOptionError("a DDPM schedule cannot be derived from a DDIM-trained policy's scheduler; "
                                 "use scheduler='ddim'")
    return make_schedule(sched, steps, eta=float(eta) if kind == "ddim" else 0.0)


def schedule_key(spec: SamplerConfig, noise_scheduler: Any, default_steps: int) -> tuple[str, int, int | None]:
    """``(kind, steps, solver_order)`` of the schedule ``spec`` runs on, for the policy's ``noise_scheduler``
    object (a cache key; order None unless DPM)."""
    kind = spec.scheduler or scheduler_kind(noise_scheduler)
    order = None
    if kind in DPM_SCHEDULERS:
        dpm = scheduler_kind(noise_scheduler) in DPM_SCHEDULERS
        own = noise_scheduler.config.get("solver_order") if dpm else None
        order = int(spec.solver_order or own or DEFAULT_SOLVER_ORDER)
    return kind, int(spec.num_inference_steps or default_steps), order
