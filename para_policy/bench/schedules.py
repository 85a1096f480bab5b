"""Schedule names of the benchmarks' CLIs (``ddpm100``, ``ddim10``, ``dpm2-10``) and the sampler specs on them.

A benchmark variant is a sampler spec (:func:`~para_policy.samplers.sampler_spec`): a preset,
its options and the schedule. The CLIs name schedules compactly; this is the one parser.
"""

from __future__ import annotations

import re
from typing import Any

from para_policy.samplers import SamplerConfig, sampler_spec

SCHEDULE_SYNTAX = ("ddpm<N>, ddim<N> or dpm<order>-<N> (DPM-Solver++ of order 1-3) with N >= 1, "
                   "e.g. ddpm100 ddim10 dpm2-10")


def _match(name: str) -> re.Match[str]:
    m = re.fullmatch(r"(ddpm|ddim)(\d+)|dpm([123])-(\d+)", name)
    if not m or int(m.group(2) or m.group(4)) < 1:
        raise ValueError(f"schedule {name!r}: expected {SCHEDULE_SYNTAX}")
    return m


def parse_schedule(name: str) -> tuple[str, int]:
    """``'ddim10'`` → ``('ddim', 10)``, ``'dpm2-10'`` → ``('dpmsolver++', 10)``: ``sampler_spec``'s
    ``scheduler`` and the steps (the order: :func:`schedule_order`). ValueError for other names."""
    m = _match(name)
    if m.group(1):
        return m.group(1), int(m.group(2))
    return "dpmsolver++", int(m.group(4))


def schedule_order(name: str) -> int | None:
    """DPM-Solver++'s ``solver_order`` of a ``dpm<order>-<N>`` name; None for DDPM and DDIM."""
    m = _match(name)
    return None if m.group(1) else int(m.group(3))


def schedule_label(name: str) -> str:
    """``'DDPM-100'``, ``'DDIM-10'``, ``'DPM-Solver++(2)-10'``: how tables name a schedule."""
    kind, steps = parse_schedule(name)
    order = schedule_order(name)
    return f"{kind.upper() if order is None else f'DPM-Solver++({order})'}-{steps}"


def schedule_spec(preset: str, name: str, **options: Any) -> SamplerConfig:
    """The preset ``preset`` on the schedule ``name``, with ``options`` (window, tolerance, warm_start, ...)."""
    kind, steps = parse_schedule(name)
    order = schedule_order(name)
    extra = {} if order is None else {"solver_order": order}
    return sampler_spec(preset, scheduler=kind, num_inference_steps=steps, **extra, **options)
