"""Drop para_policy's samplers into existing DiffusionPolicy and LeRobot stacks.

* ``patch(policy)`` (the ``paradigms`` preset) or ``patch(policy, sampler, **options)``
  swaps the sampling loop of a live DiffusionPolicy policy (``DiffusionUnetLowdimPolicy`` & co.) or LeRobot
  ``DiffusionPolicy``; ``unpatch(policy)`` restores it exactly. After each call the
  sampling stats (rounds, model_evals, converged) are in ``policy.para_stats``.
* ``read_diffusion_policy_checkpoint(path)`` reads a DiffusionPolicy ``.ckpt`` (trusted
  files only: it is a pickle); ``para_policy.load_policy('x.ckpt')`` uses it.

Example::

    from para_policy.integrations import patch, unpatch
    patch(policy)                                 # the paradigms preset: the fast method
    action = policy.predict_action(obs_dict)      # DiffusionPolicy, unchanged call
    print(policy.para_stats.rounds)               # sequential model rounds it took
    unpatch(policy)
"""

from __future__ import annotations

from typing import Any

from para_policy.integrations.diffusion_policy import (
    SamplingPatch,
    diffusion_policy_config,
    patch_diffusion_policy,
    read_diffusion_policy_checkpoint,
    register_eval_resolver,
    safe_eval,
    unpatch,
)
from para_policy.integrations.lerobot import find_diffusion_model, patch_lerobot

__all__ = [
    "SamplingPatch",
    "diffusion_policy_config",
    "is_patched",
    "patch",
    "patch_diffusion_policy",
    "patch_lerobot",
    "read_diffusion_policy_checkpoint",
    "register_eval_resolver",
    "safe_eval",
    "unpatch",
]

DP_ATTRIBUTES = ("conditional_sample", "model", "noise_scheduler", "num_inference_steps")


def is_patched(policy: Any) -> bool:
    """Whether ``policy`` currently samples through para_policy."""
    return SamplingPatch.ATTRIBUTE in vars(policy)


def patch(policy: Any, sampler: str = "paradigms", **options: Any) -> Any:
    """Make a live DiffusionPolicy or LeRobot diffusion policy sample with ``sampler``; returns it.

    Args:
        policy: a DiffusionPolicy policy (has ``conditional_sample``, ``model``,
            ``noise_scheduler``, ``num_inference_steps``) or a LeRobot ``DiffusionPolicy``
            (has ``diffusion.conditional_sample``, ``diffusion.unet``) or its ``DiffusionModel``.
        sampler: a preset (``'paradigms'``, the fastest measured setting; ``'paradigms_published'``,
            ``'parataa'``, ``'sequential'``, ``'asyncdiff'``; not ``'patches'``) or a
            :class:`~para_policy.samplers.SamplerConfig`.
        options: the preset's options to override (``window``, ``tolerance``, ...,
            ``warm_start``) and ``scheduler`` ('ddpm' / 'ddim': the DDIM twin of a DDPM
            scheduler) / ``num_inference_steps``. Validated now (:func:`~para_policy.samplers.sampler_spec`).
    Patching a patched policy changes its sampler and keeps the original loop for ``unpatch``.
    """
    if find_diffusion_model(policy) is not None and not hasattr(policy, "model"):
        return patch_lerobot(policy, sampler, **options)
    missing = [name for name in DP_ATTRIBUTES if not hasattr(policy, name)]
    if not missing:
        return patch_diffusion_policy(policy, sampler, **options)
    raise TypeError(
        f"cannot patch a {type(policy).__name__}: it is neither a DiffusionPolicy policy (missing {missing}) "
        "nor a LeRobot diffusion policy (no conditional_sample/unet/noise_scheduler/config on it or on .diffusion)"
    )
