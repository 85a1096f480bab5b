"""para_policy: parallel (Picard / ParaDiGMS) sampling for diffusion policies.

Public API:
- models: ``ConditionalUnet1D`` (DiffusionPolicy's network and state_dict names)
- schedules: ``make_schedule``, ``Schedule``
- samplers: ``sequential_sample``, ``picard_sample`` (``linear_solve``, ``secant``), ``taa_sample``, ``draw_noise``,
  ``SampleStats``, warm starts ``warm_start_init`` / ``shift_trajectory``
- policy: ``LowdimPolicy``, ``load_policy``, ``LinearNormalizer``, ``RECOMMENDED_SAMPLER``
- speed: ``tune_window`` (window from the machine's cost curve), ``configure_inference``
  (bf16, ``torch.compile``, CUDA graphs)
- checkpoints: ``save_checkpoint``, ``load_checkpoint`` (DiffusionPolicy ``.ckpt`` via ``load_policy``)
- robot loop: ``Controller``
- integrations: ``patch``, ``unpatch`` (live DiffusionPolicy / LeRobot policy objects)
"""

from para_policy.checkpoints import load_checkpoint, save_checkpoint
from para_policy.controller import Controller
from para_policy.inference import configure_inference
from para_policy.integrations import patch, unpatch
from para_policy.models import ConditionalUnet1D
from para_policy.normalizer import LinearNormalizer
from para_policy.policy import RECOMMENDED_SAMPLER, LowdimPolicy, SamplerConfig, load_policy
from para_policy.samplers import (
    SampleStats,
    draw_noise,
    picard_sample,
    sequential_sample,
    shift_trajectory,
    taa_sample,
    warm_start_init,
)
from para_policy.schedule import Schedule, make_schedule
from para_policy.window import tune_window

__version__ = "0.1.0"

__all__ = [
    "RECOMMENDED_SAMPLER",
    "ConditionalUnet1D",
    "Controller",
    "LinearNormalizer",
    "LowdimPolicy",
    "SampleStats",
    "SamplerConfig",
    "Schedule",
    "draw_noise",
    "load_checkpoint",
    "load_policy",
    "make_schedule",
    "patch",
    "picard_sample",
    "save_checkpoint",
    "configure_inference",
    "sequential_sample",
    "shift_trajectory",
    "taa_sample",
    "tune_window",
    "unpatch",
    "warm_start_init",
]
