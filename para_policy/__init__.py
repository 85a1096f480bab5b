"""para_policy: parallel (Picard / ParaDiGMS) sampling for diffusion policies.

Public API:
- policy: ``load_policy`` (para_policy ``.safetensors``, DiffusionPolicy ``.ckpt``, LeRobot directories;
  more formats: ``para_policy.loading.register_reader``), ``PolicyConfig`` (the typed policy config),
  ``LowdimPolicy``, ``ImagePolicy`` (camera observations), ``PolicyOutput``, ``LinearNormalizer``
- sampler choice: ``sampler_spec`` (the one constructor), ``SamplerConfig``, ``PRESETS``
  (``paradigms``, ``paradigms_published``, ``parataa``, ``sequential``, ``asyncdiff``, ``patches``),
  ``PicardOptions``, ``TaaOptions``
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
- robot loop: ``Controller`` and its ``ControllerConfig``; ``RemoteController``, the same loop with the
  policy on a server (``para-policy serve``; needs only numpy, grpcio and safetensors)
- integrations: ``patch``, ``unpatch`` (live DiffusionPolicy / LeRobot policy objects)
"""

# OMP_WAIT_POLICY is left to the program: OpenMP reads it once, when torch is first imported (often
# before this), and setting it here would change it for the importing program and all its children.
# eval.py and train.py choose passive waiting before torch starts; docs/reliability.md says when a
# program should too (a busy machine) and the one line that does it.

import importlib
from typing import Any

#: public name -> the module that defines it; imported on first use (PEP 562), so that
#: ``from para_policy import RemoteController`` works on a robot computer without torch
_EXPORTS = {
    "ConditionalUnet1D": "para_policy.models",
    "Controller": "para_policy.controller",
    "ControllerConfig": "para_policy.controller",
    "ImagePolicy": "para_policy.image_policy",
    "LeRobotObsEncoder": "para_policy.models.lerobot_vision",
    "LinearNormalizer": "para_policy.normalizer",
    "LowdimPolicy": "para_policy.policy",
    "MultiImageObsEncoder": "para_policy.models.vision",
    "PRESETS": "para_policy.samplers",
    "PicardOptions": "para_policy.samplers",
    "PolicyConfig": "para_policy.policy_config",
    "PolicyOutput": "para_policy.policy",
    "RemoteController": "para_policy.serving.client",
    "RobomimicObsEncoder": "para_policy.models.vision",
    "SampleStats": "para_policy.samplers",
    "SamplerConfig": "para_policy.samplers",
    "SamplingSession": "para_policy.session",
    "Schedule": "para_policy.schedule",
    "TaaOptions": "para_policy.samplers",
    "TransformerForDiffusion": "para_policy.models",
    "configure_inference": "para_policy.inference",
    "draw_noise": "para_policy.samplers",
    "load_checkpoint": "para_policy.checkpoints",
    "load_policy": "para_policy.loading",
    "make_schedule": "para_policy.schedule",
    "mean_step_jacobians": "para_policy.samplers",
    "patch": "para_policy.integrations",
    "picard_sample": "para_policy.samplers",
    "sampler_spec": "para_policy.samplers",
    "save_checkpoint": "para_policy.checkpoints",
    "sequential_sample": "para_policy.samplers",
    "shift_trajectory": "para_policy.samplers",
    "taa_sample": "para_policy.samplers",
    "tune_window": "para_policy.window",
    "unpatch": "para_policy.integrations",
    "warm_start_init": "para_policy.samplers",
}

__version__ = "0.2.0"

__all__ = [
    "PRESETS",
    "RemoteController",
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


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first used (``para_policy.load_policy``, ...)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'para_policy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
