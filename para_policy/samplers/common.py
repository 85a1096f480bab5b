"""What every sampler shares: the denoiser contract, noise drawing, input checks, stats."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from para_policy.samplers.options import check_round_options
from para_policy.schedule import Schedule


class Denoiser(Protocol):
    """``denoiser(x (N, T, D), t (N,) long, condition (N, ...) | None) -> (N, T, D)``.

    Predicts what the schedule expects (epsilon for DiffusionPolicy). ``condition`` is
    the caller's per-sample conditioning (e.g. DiffusionPolicy's global_cond), gathered
    by the sampler to the rows it evaluates; ``None`` when the caller gave none.
    """

    def __call__(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor: ...


@dataclass
class SampleStats:
    """How much sequential and total model work one sampling call took.

    rounds: sequential model calls (Picard iterations); the hardware-independent latency.
    model_evals: denoiser rows evaluated, summed over rounds (the total compute).
    converged: ``(B,)`` whether each sample met the tolerance everywhere.
    rounds_per_sample: ``(B,)`` the round at which each sample finished.
    deadline_hit: whether a deadline stopped the sampler before every sample finished.
    rows_per_round: the denoiser's batch size in each round (what each round cost).
    warm: whether the call started from a warm-start guess (set by the caller that built it).
    """

    rounds: int
    model_evals: int
    converged: torch.Tensor
    rounds_per_sample: torch.Tensor
    deadline_hit: bool = False
    rows_per_round: list[int] = field(default_factory=list)
    warm: bool = False

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


Sampler = TypeVar("Sampler", bound=Callable[..., Any])

#: keywords earlier releases took: old spelling → (the keyword that replaced it, what that one holds).
#: A keyword in :data:`FLAG_KEYWORDS` keeps its name as a flag and is refused only with another value.
RENAMED_KEYWORDS: dict[str, tuple[str, str]] = {
    "deadline": ("deadline_at", "a time.perf_counter() instant after which no new round starts; deadline_ms, "
                 "where it is taken (Controller, eval config), is a budget in ms"),
    "warm_rows": ("guess_rows", "(B,) bool, the rows of guess= that hold a guess"),
    "warm_start": ("guess", "a (B, T, D) guess of the clean normalized trajectory; warm_start is a flag: None "
                   "(the spec's rule: the previous call's trajectory), True, or False (cold)"),
}
#: renamed keywords whose old name lives on as a flag (True / False / None)
FLAG_KEYWORDS = ("warm_start",)


def renamed_keyword_error(old: str) -> TypeError:
    """The error for the old spelling ``old`` (a key of :data:`RENAMED_KEYWORDS`): it names the new keyword."""
    new, what = RENAMED_KEYWORDS[old]
    if old in FLAG_KEYWORDS:
        return TypeError(f"{old}= takes True, False or None; pass the tensor as {new}= ({what})")
    return TypeError(f"{old}= was renamed: pass {new}= ({what})")


def refuse_renamed(*old: str) -> Callable[[Sampler], Sampler]:
    """Decorate a function so that the old spellings ``old`` (keys of :data:`RENAMED_KEYWORDS`) raise a
    ``TypeError`` naming the keyword that replaced each.

    Why: a removed keyword would otherwise fail with Python's bare "unexpected keyword argument", or,
    for a function that takes ``**options`` (``predict_action``), be read as an unknown sampler
    option; and a flag given the value it used to take (``warm_start=<tensor>``) would be read as
    true. A flag keyword (:data:`FLAG_KEYWORDS`) is refused only when its value is not None or a bool.
    """
    for name in old:
        if name not in RENAMED_KEYWORDS:
            raise KeyError(f"{name!r} is not a renamed keyword ({sorted(RENAMED_KEYWORDS)})")

    def decorate(fn: Sampler) -> Sampler:
        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            for name in old:
                if name in kwargs and (name not in FLAG_KEYWORDS
                                       or not (kwargs[name] is None or isinstance(kwargs[name], bool))):
                    raise renamed_keyword_error(name)
            return fn(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorate


def float32_state(sample: Sampler) -> Sampler:
    """Run a sampler's own arithmetic in float32 (or ``x_T``'s dtype if wider), the model as the caller set it.

    A bf16 or fp16 model (``policy.half()``), or a caller under ``torch.autocast``, must not
    change the sampler's state: prefix sums, linear solves and convergence tests in half
    precision drift, and mixing dtypes in index writes fails. So ``x_T`` and ``noise`` are
    taken in float32, autocast is switched off for the sampler's own operations, and the
    denoiser is called under the caller's autocast state with its output cast to the state's
    dtype. The denoiser casts its input to its weights' dtype itself
    (:meth:`para_policy.policy.LowdimPolicy.denoise`). With a float32 model outside autocast
    nothing changes.
    """

    @functools.wraps(sample)
    def run(denoiser: Denoiser, schedule: Schedule, x_T: torch.Tensor, noise: torch.Tensor | None = None,
            **options: Any) -> Any:
        dtype = torch.promote_types(x_T.dtype, torch.float32)
        device_type = x_T.device.type
        noise = None if noise is None else noise.to(dtype)
        if not torch.is_autocast_enabled(device_type):

            def model(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
                return denoiser(x, t, c).to(dtype)

            return sample(model, schedule, x_T.to(dtype), noise, **options)
        caller = torch.get_autocast_dtype(device_type)

        def autocast_model(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
            with torch.autocast(device_type, dtype=caller):
                return denoiser(x, t, c).to(dtype)

        with torch.autocast(device_type, enabled=False):
            return sample(autocast_model, schedule, x_T.to(dtype), noise, **options)

    return run  # type: ignore[return-value]


#: ``(data, mask)``: the known entries of the trajectory. ``mask`` (B, T, D): bool (DiffusionPolicy's
#: hard mask), or float weights in [0, 1] (soft masking: before each model call an entry moves
#: that fraction of the way to ``data``, ``torch.lerp``; weight 1 is a known entry, 0 a free one;
#: only the known ones are imposed on the result). ``data`` (B, T, D), the same values before
#: every step, or (B, S + 1, T, D), per step: ``data[:, k]`` before step ``k``'s model call,
#: ``data[:, S]`` at the end (see :func:`diffuse_known`).
Inpaint = tuple[torch.Tensor, torch.Tensor]


def draw_noise(
    schedule: Schedule,
    shape: tuple[int, int, int],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    batched: bool = False,
    x_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``x_T`` and the per-step noise in the order of the sequential loop.

    DiffusionPolicy draws ``x_T`` first, then one tensor per step whose scheduler
    ``step`` draws noise (DDPM: every ``t > 0``). Drawing them here in that order from
    the same generator reproduces its samples exactly. ``batched=True`` draws everything
    in one call instead (one kernel on a GPU, not one per step): the same distribution,
    other numbers than DiffusionPolicy's for the same seed.

    ``x_T`` given (B, T, D): only the per-step noise is drawn, in the same order as after a
    drawn ``x_T``, and ``x_T`` comes back on ``device`` in ``dtype``. For loops that take the
    caller's initial sample and draw the rest themselves (LeRobot's ``conditional_sample``
    with ``noise=``): drawing an ``x_T`` anyway would shift the generator's stream by one draw,
    and every seeded call after it.

    A generator on another device than ``device`` (a CPU generator for a CUDA policy) draws
    on its own device (:func:`noise_device`) and the draws are moved to ``device``: torch
    refuses a generator of another device, and this way one seeded CPU generator gives the
    same noise whichever device the policy is on.

    Returns:
        ``x_T`` of ``shape`` (B, T, D) and ``noise`` (B, S, T, D) of standard normal draws,
        zero at steps that draw none, on ``device``.
    """
    if x_T is not None and tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T must have shape {tuple(shape)}, got {tuple(x_T.shape)}")
    where = noise_device(generator, device)
    S, first = schedule.num_steps, int(x_T is None)  # first: the draws before the steps' (x_T's)
    if batched:
        draws = torch.randn((first + S, *shape), generator=generator, device=where, dtype=dtype)
        noise = draws[first:] * schedule.draws_noise.to(device=where, dtype=dtype).view(S, 1, 1, 1)
        start = draws[0] if x_T is None else x_T
        return start.to(device=device, dtype=dtype), noise.transpose(0, 1).contiguous().to(device)
    if x_T is None:
        x_T = torch.randn(shape, generator=generator, device=where, dtype=dtype)
    noise = torch.zeros((shape[0], S, *shape[1:]), device=where, dtype=dtype)
    for k in torch.nonzero(schedule.draws_noise.cpu()).flatten().tolist():
        noise[:, k] = torch.randn(shape, generator=generator, device=where, dtype=dtype)
    return x_T.to(device=device, dtype=dtype), noise.to(device)


def noise_device(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    """Where :func:`draw_noise` draws: ``device``, or the generator's own device when it is another one."""
    device = torch.device(device)
    if generator is None:
        return device
    have = generator.device
    if have.type == device.type and (device.index is None or have.index in (None, device.index)):
        return device
    return have


def check_inputs(
    schedule: Schedule,
    x_T: torch.Tensor,
    noise: torch.Tensor | None,
    condition: torch.Tensor | None,
    inpaint: Inpaint | None,
) -> torch.Tensor:
    """Validate sampler inputs; return the noise tensor (zeros when none is needed).

    Raises ``ValueError`` naming the offending argument and what was expected.
    """
    if x_T.dim() != 3:
        raise ValueError(f"x_T must have shape (B, T, D), got {tuple(x_T.shape)}")
    B, T, D = x_T.shape
    S = schedule.num_steps
    if noise is None:
        if bool(schedule.draws_noise.any()) and bool((schedule.noise_std > 0).any()):
            raise ValueError(
                f"noise is required: this {schedule.kind} schedule adds noise at some steps; "
                "draw it with para_policy.samplers.draw_noise"
            )
        noise = torch.zeros((B, S, T, D), device=x_T.device, dtype=x_T.dtype)
    elif tuple(noise.shape) != (B, S, T, D):
        raise ValueError(f"noise must have shape (B, S, T, D) = {(B, S, T, D)}, got {tuple(noise.shape)}")
    if not bool(torch.isfinite(x_T).all()):
        raise ValueError("x_T contains NaN or inf")
    if condition is not None:
        if condition.shape[0] != B:
            raise ValueError(f"condition must have batch size {B} (as x_T), got shape {tuple(condition.shape)}")
        if not bool(torch.isfinite(condition).all()):
            raise ValueError("condition contains NaN or inf (check the observations)")
    if inpaint is not None:
        data, mask = inpaint
        if tuple(data.shape) not in ((B, T, D), (B, S + 1, T, D)) or tuple(mask.shape) != (B, T, D):
            raise ValueError(
                f"inpaint (condition_data, condition_mask) must have shapes {(B, T, D)} (or per step "
                f"{(B, S + 1, T, D)} for the data) and {(B, T, D)}, got {tuple(data.shape)} and {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool and not (mask.is_floating_point() and bool(((mask >= 0) & (mask <= 1)).all())):
            raise ValueError(f"inpaint condition_mask must be a bool tensor or float weights in [0, 1], got "
                             f"{mask.dtype}" + (f" from {mask.min().item():.3g} to {mask.max().item():.3g}"
                                                if mask.is_floating_point() else ""))
    return noise


def check_options(schedule: Schedule, window: int, tolerance: float, max_iterations: int | None) -> int:
    """Validate Picard options; return the effective max_iterations (the number of steps when None).

    The checks are a spec's (:func:`~para_policy.samplers.options.check_round_options`), so a
    sampler function called directly refuses exactly what a spec refuses.
    """
    check_round_options(window, tolerance, max_iterations)
    return schedule.num_steps if max_iterations is None else max_iterations


def check_deadline(deadline_at: Any) -> float | None:
    """``deadline_at`` (a ``time.perf_counter()`` instant) as a float, or None for no deadline.

    Why: the host loop stops when ``time.perf_counter() >= deadline_at``; that is never true for
    NaN or +inf, so such a deadline would be silently ignored (and -inf is a clock reading
    no caller means). Raises ``ValueError`` naming the argument.
    """
    if deadline_at is None:
        return None
    if isinstance(deadline_at, bool) or not isinstance(deadline_at, numbers.Real) or not math.isfinite(deadline_at):
        raise ValueError(f"deadline_at must be a finite time.perf_counter() instant (None: no deadline), "
                         f"got {deadline_at!r}")
    return float(deadline_at)


def find_form(denoiser: Any, sampler: str, marker: str, make: str, count: int, size: str, need: str) -> Any:
    """The form of ``denoiser`` a sampler that splits the network runs (a stage pipeline, a patch runner).

    Looked for in order: ``denoiser`` itself when it has the method ``marker``; ``denoiser.<make>(count)``;
    the owner of a bound-method denoiser, ``denoiser.__self__.<make>(count)`` (a policy's
    ``policy.denoise``). ``size``: the form's attribute that must equal ``count``; ``need``: what
    ``sampler`` needs, for the error when nothing is found.
    """
    if callable(getattr(denoiser, marker, None)):
        found = denoiser
    else:
        build = getattr(denoiser, make, None) or getattr(getattr(denoiser, "__self__", None), make, None)
        if not callable(build):
            raise TypeError(f"sampler {sampler!r} {need}; got {type(denoiser).__name__}")
        found = build(count)
    if getattr(found, size) != count:
        raise ValueError(f"{size.removeprefix('num_')}={count}, but the {make} denoiser has {getattr(found, size)}")
    return found


def promote_state(x_T: torch.Tensor, noise: torch.Tensor, inpaint: Inpaint | None
                  ) -> tuple[torch.Tensor, torch.Tensor, Inpaint | None]:
    """``x_T``, ``noise`` and the known values in float32 at least (a half-precision caller's sample is
    stepped in float32, as :func:`float32_state` does); a boolean mask stays boolean."""
    dtype = torch.promote_types(x_T.dtype, torch.float32)
    if inpaint is not None:
        inpaint = (inpaint[0].to(dtype), inpaint[1] if inpaint[1].dtype == torch.bool else inpaint[1].to(dtype))
    return x_T.to(dtype), noise.to(dtype), inpaint


def known_mask(mask: torch.Tensor) -> torch.Tensor:
    """The entries an inpaint mask fixes outright: a bool mask itself, weights equal to 1."""
    return mask if mask.dtype == torch.bool else mask >= 1


def impose(x: torch.Tensor, data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with ``mask``'s entries replaced by ``data`` (bool), or moved toward it by the weights."""
    return torch.where(mask, data, x) if mask.dtype == torch.bool else torch.lerp(x, data, mask.to(x.dtype))


def apply_inpaint(x: torch.Tensor, inpaint: Inpaint | None, k: int | None) -> torch.Tensor:
    """``x`` (B, T, D) before step ``k`` with the known entries imposed; ``k = None``: the result.

    DiffusionPolicy's ``trajectory[mask] = data[mask]``; per-step data gives step ``k``'s values
    (the last slot for the result); soft weights pull before each step, and the result gets only
    the known entries (weight 1).
    """
    if inpaint is None:
        return x
    data, mask = inpaint
    if k is None:
        return torch.where(known_mask(mask), data[:, -1] if data.dim() == 4 else data, x)
    return impose(x, data[:, k] if data.dim() == 4 else data, mask)


def diffuse_known(schedule: Schedule, data: torch.Tensor, noised: torch.Tensor, x_T: torch.Tensor) -> torch.Tensor:
    """Per-step known values (B, S + 1, T, D): the ``noised`` entries at each step's noise level.

    RePaint's imposition (Lugmayr et al. 2022): a model trained without inpainting sees a known
    entry as clean data among noisy ones only near the end; imposed at step ``k``'s level,
    ``sqrt(alpha_k) data + sqrt(1 - alpha_k) x_T`` (``x_T``'s own entries as the noise, so the
    values follow one deterministic path from ``x_T`` to ``data``), they look like the rest of
    ``x_k``. The other entries, and every entry at the end (``k = S``), are ``data`` itself.

    Args:
        data: (B, T, D) clean known values; ``noised``: (B, T, D) bool, the entries to diffuse;
        x_T: (B, T, D), the sample's initial noise.
    """
    alpha = schedule.alpha_t.to(device=data.device, dtype=data.dtype).view(1, -1, 1, 1)  # (1, S, 1, 1)
    levels = alpha.sqrt() * data[:, None] + (1 - alpha).sqrt() * x_T[:, None]  # (B, S, T, D)
    per_step = torch.where(noised[:, None], levels, data[:, None])
    return torch.cat([per_step, data[:, None]], dim=1)
