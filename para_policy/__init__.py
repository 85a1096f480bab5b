"""para_policy: parallel (Picard / ParaDiGMS) sampling for diffusion policies.

Public API:
- policy: ``load_policy`` (para_policy ``.safetensors``, DiffusionPolicy ``.ckpt``, LeRobot directories),
  ``LowdimPolicy``, ``ImagePolicy`` (camera observations), ``PolicyOutput``, ``LinearNormalizer``
- sampler choice: ``sampler_spec`` (the one constructor), ``SamplerConfig``, ``PRESETS``
  (``paradigms``, ``paradigms_published``, ``parataa``, ``sequential``), ``PicardOptions``, ``TaaOptions``
- samplers: ``sequential_sample``, ``picard_sample``, ``taa_sample``, ``draw_noise``, ``SampleStats``,
  warm starts ``warm_start_init`` / ``shift_trajectory``
- models and schedules: ``ConditionalUnet1D``, ``TransformerForDiffusion`` (DiffusionPolicy's names),
  observation encoders ``MultiImageObsEncoder``, ``RobomimicObsEncoder``, ``LeRobotObsEncoder``,
  ``make_schedule``, ``Schedule``
- speed: ``tune_window`` (window from the machine's cost curve), ``configure_inference``
  (bf16, ``torch.compile``, CUDA graphs, the ONNX Runtime backend)
- checkpoints: ``save_checkpoint``, ``load_checkpoint``
- robot loop: ``Controller``
- integrations: ``patch``, ``unpatch`` (live DiffusionPolicy / LeRobot policy objects)
"""

import os

# Passive OpenMP waiting, chosen before torch starts OpenMP (it reads this once, when torch is first
# imported): worker threads that spin while waiting make every model call on a busy machine several
# times slower. Import para_policy before torch, or export OMP_WAIT_POLICY=PASSIVE yourself;
# OMP_WAIT_POLICY=ACTIVE in the environment overrides this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from para_policy.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from para_policy.controller import Controller  # noqa: E402
from para_policy.image_policy import ImagePolicy  # noqa: E402
from para_policy.inference import configure_inference  # noqa: E402
from para_policy.integrations import patch, unpatch  # noqa: E402
from para_policy.models import ConditionalUnet1D, TransformerForDiffusion  # noqa: E402
from para_policy.models.lerobot_vision import LeRobotObsEncoder  # noqa: E402
from para_policy.models.vision import MultiImageObsEncoder, RobomimicObsEncoder  # noqa: E402
from para_policy.normalizer import LinearNormalizer  # noqa: E402
from para_policy.policy import LowdimPolicy, PolicyOutput, load_policy  # noqa: E402
from para_policy.samplers import (  # noqa: E402
    PRESETS,
    PicardOptions,
    SamplerConfig,
    SampleStats,
    TaaOptions,
    draw_noise,
    mean_step_jacobians,
    picard_sample,
    sampler_spec,
    sequential_sample,
    shift_trajectory,
    taa_sample,
    warm_start_init,
)
from para_policy.schedule import Schedule, make_schedule  # noqa: E402
from para_policy.window import tune_window  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "PRESETS",
    "ConditionalUnet1D",
    "Controller",
    "ImagePolicy",
    "LeRobotObsEncoder",
    "LinearNormalizer",
    "LowdimPolicy",
    "MultiImageObsEncoder",
    "PicardOptions",
    "PolicyOutput",
    "RobomimicObsEncoder",
    "SampleStats",
    "SamplerConfig",
    "Schedule",
    "TaaOptions",
    "TransformerForDiffusion",
    "configure_inference",
    "draw_noise",
    "load_checkpoint",
    "load_policy",
    "make_schedule",
    "mean_step_jacobians",
    "patch",
    "picard_sample",
    "sampler_spec",
    "save_checkpoint",
    "sequential_sample",
    "shift_trajectory",
    "taa_sample",
    "tune_window",
    "unpatch",
    "warm_start_init",
]
