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
        schedule: from :func:`para_policy.schedule.make_schedule`; a multistep one
            (DPM-Solver++, ``order = m > 1``) keeps the last ``m`` clean-sample predictions and
            steps with ``x_{k+1} = a_k x_k + Σ_j b_{k,j} x0(x_{k−j}) + σ_k z_k``
            (:meth:`~para_policy.schedule.MultistepSchedule.step_from_x0`).
        x_T: ``(B, T, D)`` initial noise.
        noise: ``(B, S, T, D)`` standard normal per-step noise (see ``draw_noise``);
            may be omitted for deterministic schedules (DDIM with eta = 0, dpmsolver++).
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
    x0s = None  # multistep schedules: (B, ≤ m, T, D) clean-sample predictions, newest first
    for k in range(schedule.num_steps):
        x = apply_inpaint(x, inpaint, k)
        k_rows = torch.full((B,), k, dtype=torch.long, device=x.device)
        model_output = denoiser(x, schedule.timesteps[k_rows], condition)
        x, x0s = schedule_step(schedule, x, k, model_output, x0s, noise, k_rows)
    x = apply_inpaint(x, inpaint, None)
    S = schedule.num_steps
    return x, SampleStats(
        rounds=S,
        model_evals=S * B,
        converged=torch.ones(B, dtype=torch.bool),
        rounds_per_sample=torch.full((B,), S, dtype=torch.long),
    )


def schedule_step(schedule: Schedule, x: torch.Tensor, k: int, model_output: torch.Tensor,
                  x0s: torch.Tensor | None, noise: torch.Tensor, k_rows: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of the sequential loop: ``x_{k+1}`` from ``x_k`` (B,T,D) and the model output; ``x0s``
    (B, ≤ m, T, D): a multistep schedule's clean-sample history, newest first (None for order 1).
    Returns ``(x_{k+1}, x0s)``; the samplers that step one step at a time (sequential, asyncdiff) share it."""
    if schedule.order == 1:  # every row at step k: an int index reads the coefficients as one (1, 1) view
        mean = schedule.step_mean(x, k if k_rows is None else k_rows, model_output)
    else:
        if k_rows is None:  # (B,) the step index per row; the caller's, when it has made it already
            k_rows = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
        x0 = schedule.predict_x0(x, k_rows, model_output)[:, None]
        x0s = x0 if x0s is None else torch.cat([x0, x0s[:, : schedule.order - 1]], dim=1)
        mean = schedule.step_from_x0(x, k_rows, x0s)
    return mean + schedule.noise_std[k] * noise[:, k], x0s
