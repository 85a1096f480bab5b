"""LeRobot integration: patch a live ``lerobot`` ``DiffusionPolicy`` to sample with Picard iterations.

Why: LeRobot users keep their policy objects, ``select_action`` loop and checkpoints;
only the denoising loop changes. LeRobot's loop lives in
``DiffusionModel.conditional_sample(batch_size, global_cond=None, generator=None,
noise=None)`` (``policy.diffusion``; ``noise`` is the initial sample, added in later
releases; 0.3.x has no ``noise``): it draws ``x_T`` of shape ``(B, horizon, action_dim)``
unless given, then runs ``noise_scheduler.step`` for ``num_inference_steps`` steps, calling
``unet(x, t (B,) long, global_cond=global_cond)``. There is no inpainting.

lerobot is not imported: objects are recognised by duck typing.
"""

from __future__ import annotations

from typing import Any

import torch

from para_policy.integrations.diffusion_policy import SamplingPatch, in_model_dtype
from para_policy.samplers import draw_noise, sampler_spec


def find_diffusion_model(policy: Any) -> Any | None:
    """The object holding LeRobot's sampling loop: ``policy.diffusion`` or ``policy`` itself; None if neither."""
    for candidate in (getattr(policy, "diffusion", None), policy):
        if candidate is not None and all(
            hasattr(candidate, name) for name in ("conditional_sample", "unet", "noise_scheduler", "config")
        ):
            return candidate
    return None


def _action_dim(config: Any) -> int:
    feature = getattr(config, "action_feature", None)  # lerobot >= 0.1 (features API)
    if feature is not None:
        return int(feature.shape[0])
    shapes = getattr(config, "output_shapes", None)  # older releases
    if shapes and "action" in shapes:
        return int(shapes["action"][0])
    raise ValueError("cannot find the action dimension: config has neither action_feature nor output_shapes['action']")


def patch_lerobot(policy: Any, sampler: str = "paradigms", **options: Any) -> Any:
    """Replace LeRobot's ``conditional_sample`` on ``policy.diffusion`` (or ``policy``) with para_policy sampling.

    ``policy`` is a LeRobot ``DiffusionPolicy`` or its ``DiffusionModel``. The replacement
    takes ``(batch_size, global_cond (B, G) | None = None, generator=None, noise (B, horizon,
    action_dim) | None = None)`` and returns ``(B, horizon, action_dim)``; it draws ``x_T`` (unless
    ``noise`` is given) and the step noise from ``generator`` or torch's global RNG in LeRobot's
    order, so seeded runs reproduce (up to ``tolerance``). ``x_T``, the noise, the sampler's
    state and the result are float32 whatever the UNet's dtype (a given ``noise`` is cast to it);
    the UNet's calls run in its own dtype. Stats of the last call are in
    ``policy.para_stats``. With the ``paradigms`` preset each call warm-starts from the
    previous one shifted by ``config.n_action_steps`` (LeRobot's ``select_action`` executes
    that many actions between calls); ``policy.reset()`` forgets it. Undo with
    :func:`para_policy.integrations.unpatch`.
    """
    spec = sampler_spec(sampler, **options)
    existing = vars(policy).get(SamplingPatch.ATTRIBUTE)
    if existing is not None:
        existing.set_spec(spec)
        return policy
    model = find_diffusion_model(policy)
    if model is None:
        raise TypeError(f"{type(policy).__name__} is not a LeRobot diffusion policy: expected an object with "
                        "conditional_sample, unet, noise_scheduler and config (or a .diffusion that has them)")
    state = SamplingPatch(policy, model, spec, int(getattr(model.config, "n_action_steps", 0) or 0))

    def conditional_sample(batch_size: int, global_cond: torch.Tensor | None = None,
                           generator: torch.Generator | None = None,
                           noise: torch.Tensor | None = None) -> torch.Tensor:
        param = next(model.parameters())
        device, dtype = param.device, torch.promote_types(param.dtype, torch.float32)  # the sampler's dtype
        shape = (int(batch_size), int(model.config.horizon), _action_dim(model.config))
        schedule = state.schedule(model.noise_scheduler, model.num_inference_steps)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape (batch_size, horizon, action_dim) = {shape}, "
                             f"got {tuple(noise.shape)}")
        # LeRobot's loop draws x_T only when no noise is given; the steps' noise after it, in its order
        x_T, step_noise = draw_noise(schedule, shape, generator, device=device, dtype=dtype, x_T=noise)
        unet = model.unet

        def denoiser(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
            return unet(x, t, global_cond=c)

        return state.run(in_model_dtype(denoiser, unet), schedule, x_T, step_noise, global_cond, None, unet)

    state.install(conditional_sample)
    return policy
