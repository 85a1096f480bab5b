"""Denoising networks (weight-compatible with Diffusion Policy / LeRobot checkpoints)."""

from para_policy.models.lerobot_keys import diffusion_policy_to_lerobot_keys, lerobot_to_diffusion_policy_keys
from para_policy.models.transformer import TransformerForDiffusion
from para_policy.models.unet1d import ConditionalUnet1D, SinusoidalPosEmb

__all__ = [
    "ConditionalUnet1D",
    "SinusoidalPosEmb",
    "TransformerForDiffusion",
    "diffusion_policy_to_lerobot_keys",
    "lerobot_to_diffusion_policy_keys",
]
