"""para_policy: parallel (Picard / ParaDiGMS) sampling for diffusion policies.

Public API:
- models: ``ConditionalUnet1D`` (DiffusionPolicy's network and state_dict names)
- schedules: ``make_schedule``, ``Schedule``
- samplers: ``sequential_sample``, ``picard_sample``, ``draw_noise``, ``SampleStats``
- policy: ``LowdimPolicy``, ``load_policy``, ``LinearNormalizer``
- checkpoints: ``save_checkpoint``, ``load_checkpoint`` (DiffusionPolicy ``.ckpt`` via ``load_policy``)
- robot loop: ``Controller``
- integrations: ``patch``, ``unpatch`` (live DiffusionPolicy / LeRobot policy objects)
"""

from para_policy.checkpoints import load_checkpoint, save_checkpoint
from para_policy.controller import Controller
from para_policy.integrations import patch, unpatch
from para_policy.models import ConditionalUnet1D
from para_policy.normalizer import LinearNormalizer
from para_policy.policy import LowdimPolicy, SamplerConfig, load_policy
from para_policy.samplers import SampleStats, draw_noise, picard_sample, sequential_sample, warm_start_init
from para_policy.schedule import Schedule, make_schedule

__version__ = "0.1.0"

__all__ = [
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
    "sequential_sample",
    "unpatch",
    "warm_start_init",
]
