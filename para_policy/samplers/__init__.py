"""Samplers: plain functions ``(denoiser, schedule, x_T, noise, **options) -> (sample, stats)``."""

from para_policy.samplers.common import Denoiser, SampleStats, apply_inpaint, draw_noise
from para_policy.samplers.picard import picard_sample
from para_policy.samplers.sequential import sequential_sample

__all__ = [
    "Denoiser",
    "SampleStats",
    "apply_inpaint",
    "draw_noise",
    "picard_sample",
    "sequential_sample",
]
