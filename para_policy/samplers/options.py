"""The checks of the samplers' options, in one place below everything that uses them.

The registry's option dataclasses (a spec) and the sampler functions (called directly) refuse
the same values with the same message, because both call these.
"""

from __future__ import annotations

import math
from typing import Any


class SamplerOptionError(ValueError):
    """A sampler name or option that is refused when the sampler is chosen.

    ``key``: the option at fault (None for the name); ``detail``: the message without the
    sampler's name, so a config reader can say ``sampler.<key> ...``.
    """

    def __init__(self, message: str, key: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.detail = detail or message


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise SamplerOptionError(f"{name} must be true or false, got {value!r}", name)


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SamplerOptionError(f"{name} must be an integer >= {minimum}, got {value!r}", name)


def check_number(name: str, value: Any, maximum: float | None = None, why: str = "") -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
    if bad or (maximum is not None and value > maximum):
        bound = "" if maximum is None else f" and <= {maximum:g}"
        raise SamplerOptionError(f"{name} must be a finite number >= 0{bound}{why}, got {value!r}", name)


#: the largest ``tolerance``. It is measured in each step's noise std (a point is converged when its
#: RMS change is within ``tolerance · σ_k``), so far above 1 the test accepts almost any change and
#: the sample is no longer the policy's; its square also overflows a float near 1e154.
MAX_TOLERANCE = 10.0


def check_round_options(window: Any, tolerance: Any, max_iterations: Any, *, auto: bool = False) -> None:
    """Check the options every Picard sampler takes: window, tolerance, max_iterations.

    The one copy of these checks: :class:`PicardOptions` calls it for a spec (``auto=True``:
    ``window='auto'`` is allowed, resolved later by :mod:`para_policy.window`) and the sampler
    functions call it through :func:`~para_policy.samplers.common.check_options` (an integer
    window). Raises :class:`SamplerOptionError` naming the option and the accepted range.
    """
    is_auto = isinstance(window, str) and window == "auto"
    if not (auto and is_auto):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            expected = "an integer >= 1 or 'auto'" if auto else "an integer >= 1"
            hint = " ('auto' is resolved by the policy: para_policy.window)" if is_auto else ""
            raise SamplerOptionError(f"window must be {expected}, got {window!r}{hint}", "window")
    check_number("tolerance", tolerance, MAX_TOLERANCE, " (in units of each step's noise std)")
    if max_iterations is not None:
        check_int("max_iterations", max_iterations, 1)


def check_anderson_options(memory: Any, ridge: Any) -> None:
    """Check ParaTAA's options (the one copy: :class:`TaaOptions` and :func:`~para_policy.samplers.taa_sample`)."""
    check_int("memory", memory, 1)
    check_number("ridge", ridge)


def check_stage_options(stages: Any, warmup: Any, stride: Any, exact: Any, time_shift: Any = True, tail: Any = 0,
                        extrapolate: Any = False) -> None:
    """Check AsyncDiff's options (the one copy: :class:`AsyncDiffOptions` and :func:`asyncdiff_sample`).

    ``stages`` >= 1 (workers; 1 is the whole network), ``warmup`` >= 1 (the stale steps need one
    step's stage outputs to start from), ``stride`` >= 1, ``tail`` >= 0, ``exact``, ``time_shift``
    and ``extrapolate`` flags; ``extrapolate`` reads the previous round's output, so needs stride 1.
    """
    check_int("stages", stages, 1)
    check_int("warmup", warmup, 1)
    check_int("stride", stride, 1)
    check_int("tail", tail, 0)
    check_bool("exact", exact)
    check_bool("time_shift", time_shift)
    check_bool("extrapolate", extrapolate)
    if extrapolate and stride > 1:
        raise SamplerOptionError(f"extrapolate=True extrapolates each step's output from the step before, so it "
                                 f"needs stride=1, got stride={stride} (set extrapolate=False to stride)",
                                 "extrapolate")


def check_patch_options(patches: Any, warmup: Any, exact: Any) -> None:
    """Check the patch sampler's options (the one copy: :class:`PatchOptions` and :func:`patch_sample`).

    ``patches`` >= 1 (workers; 1 is the whole network; that it divides the horizon is checked when
    the runner is built, where the horizon is known), ``warmup`` >= 1 (the first displaced step
    reads the halos and statistics of a whole-network step before it), ``exact`` a flag.
    """
    check_int("patches", patches, 1)
    check_int("warmup", warmup, 1)
    check_bool("exact", exact)
