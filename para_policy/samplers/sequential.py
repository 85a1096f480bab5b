"""The reference loop: one model call per denoising step, as DiffusionPolicy samples."""

from __future__ import annotations

import torch

from para_policy.samplers.common import (
    Denoiser,
    Inpaint,
    SampleStats,
    apply_inpaint,
    check_inputs,
    float32_state,
)
from para_policy.schedule import Schedule


@torch.inference_mode()
@float32_state
def sequential_sample(
    denoiser: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    condition: torch.Tensor | None = None,
    inpaint: Inpaint | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Denoise ``x_T`` step by step: DiffusionPolicy's ``conditional_sample``.

    Before every model call the known entries are re-imposed (``inpaint = (data, mask)``,
    :data:`~para_policy.samplers.common.Inpaint`: the same data every step, or per step), and
    once more at the end.

    Args:
        denoiser: ``(x (B,T,D), t (B,), condition) -> (B,T,D)``.
        schedule: from :func:`para_policy.schedule.make_schedule`.
        x_T: ``(B, T, D)`` initial noise.
        noise: ``(B, S, T, D)`` standard normal per-step noise (see ``draw_noise``);
            may be omitted for deterministic schedules (DDIM, eta = 0).
        condition: ``(B, ...)`` passed to the denoiser as is.
    Returns:
        ``(sample (B, T, D), stats)`` with ``rounds = S``.
    """
    noise = check_inputs(schedule, x_T, noise, condition, inpaint)
    if inpaint is not None:
        inpaint = (inpaint[0].to(x_T.dtype), inpaint[1] if inpaint[1].dtype == torch.bool else inpaint[1].to(x_T.dtype))
    B = x_T.shape[0]
    schedule = schedule.to(x_T.device)
    x = x_T
    for k in range(schedule.num_steps):
        x = apply_inpaint(x, inpaint, k)
        k_rows = torch.full((B,), k, dtype=torch.long, device=x.device)
        model_output = denoiser(x, schedule.timesteps[k_rows], condition)
        x = schedule.step_mean(x, k_rows, model_output) + schedule.noise_std[k] * noise[:, k]
    x = apply_inpaint(x, inpaint, None)
    S = schedule.num_steps
    return x, SampleStats(
        rounds=S,
        model_evals=S * B,
        converged=torch.ones(B, dtype=torch.bool),
        rounds_per_sample=torch.full((B,), S, dtype=torch.long),
    )
