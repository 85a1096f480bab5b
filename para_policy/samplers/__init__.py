"""Samplers: plain functions ``(denoiser, schedule, x_T, noise, **options) -> (sample, stats)``, and their registry."""

from para_policy.samplers.asyncdiff import asyncdiff_sample
from para_policy.samplers.common import Denoiser, SampleStats, apply_inpaint, diffuse_known, draw_noise
from para_policy.samplers.jacobians import mean_step_jacobians, step_jacobians
from para_policy.samplers.patches import patch_sample
from para_policy.samplers.picard import picard_sample
from para_policy.samplers.registry import (
    FAMILIES,
    PRESETS,
    AsyncDiffOptions,
    PatchOptions,
    PicardOptions,
    SamplerConfig,
    SamplerOptionError,
    TaaOptions,
    sampler_spec,
)
from para_policy.samplers.sequential import sequential_sample
from para_policy.samplers.taa import taa_sample
from para_policy.samplers.warm_start import shift_trajectory, warm_start_init

__all__ = [
    "FAMILIES",
    "PRESETS",
    "AsyncDiffOptions",
    "Denoiser",
    "PatchOptions",
    "PicardOptions",
    "SampleStats",
    "SamplerConfig",
    "SamplerOptionError",
    "TaaOptions",
    "apply_inpaint",
    "asyncdiff_sample",
    "diffuse_known",
    "draw_noise",
    "mean_step_jacobians",
    "patch_sample",
    "picard_sample",
    "sampler_spec",
    "sequential_sample",
    "shift_trajectory",
    "step_jacobians",
    "taa_sample",
    "warm_start_init",
]
