"""para_policy: parallel (Picard / ParaDiGMS) sampling for diffusion policies.

Public API:
- policy: ``load_policy`` (para_policy ``.safetensors``, DiffusionPolicy ``.ckpt``, LeRobot directories;
  more formats: ``para_policy.loading.register_reader``), ``PolicyConfig`` (the typed policy config),
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
- sampling state: ``SamplingSession`` (spec, schedules, ``window='auto'``, warm start; what policies and
  patches sample through)
- robot loop: ``Controller`` and its ``ControllerConfig``
- integrations: ``patch``, ``unpatch`` (live DiffusionPolicy / LeRobot policy objects)
"""

# OMP_WAIT_POLICY is left to the program: OpenMP reads it once, when torch is first imported (often
# before this), and setting it here would change it for the importing program and all its children.
# eval.py and train.py choose passive waiting before torch starts; docs/reliability.md says when a
# program should too (a busy machine) and the one line that does it.

from para_policy.checkpoints import load_checkpoint, save_checkpoint
from para_policy.controller import Controller, ControllerConfig
from para_policy.image_policy import ImagePolicy
from para_policy.inference import configure_inference
from para_policy.integrations import patch, unpatch
from para_policy.loading import load_policy
from para_policy.models import ConditionalUnet1D, TransformerForDiffusion
from para_policy.models.lerobot_vision import LeRobotObsEncoder
from para_policy.models.vision import MultiImageObsEncoder, RobomimicObsEncoder
from para_policy.normalizer import LinearNormalizer
from para_policy.policy import LowdimPolicy, PolicyOutput
from para_policy.policy_config import PolicyConfig
from para_policy.samplers import (
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
from para_policy.schedule import Schedule, make_schedule
from para_policy.session import SamplingSession
from para_policy.window import tune_window

__version__ = "0.2.0"

__all__ = [
    "PRESETS",
    "ConditionalUnet1D",
    "Controller",
    "ControllerConfig",
    "ImagePolicy",
    "LeRobotObsEncoder",
    "LinearNormalizer",
    "LowdimPolicy",
    "MultiImageObsEncoder",
    "PicardOptions",
    "PolicyConfig",
    "PolicyOutput",
    "RobomimicObsEncoder",
    "SampleStats",
    "SamplerConfig",
    "SamplingSession",
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
