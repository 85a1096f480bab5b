"""Warm starts: an initial Picard iterate built from a guess of the clean trajectory.

The previous control step's trajectory is a good guess of the next chunk's *clean*
trajectory x0 (shifted by the actions executed since), but its noisy intermediate
states carry the old noise and are off by about σ_k at every step, which is exactly the
scale the convergence test measures. So the guess is rebuilt with the new noise: run
the step recurrence with the denoiser's x0 prediction replaced by the guess,

    x_{k+1} = step_mean(x_k, k, output implied by x0_guess) + σ_k z_k,

which costs no model call. With x0 fixed every step is affine in x, so all S steps are
one :func:`~para_policy.samplers.picard.linear_recurrence` (one batched matrix product,
not a loop of S small steps). Where the guess is right, the iterate is already the fixed
point and the window slides through at once.
"""

from __future__ import annotations

import torch

from para_policy.samplers.solves import linear_recurrence
from para_policy.schedule import Schedule


@torch.inference_mode()
def warm_start_init(schedule: Schedule, x0_guess: torch.Tensor, x_T: torch.Tensor,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
    """Initial iterate ``(B, S, T, D)`` of x_1 … x_S from a clean-trajectory guess ``(B, T, D)``.

    ``x_T`` (B, T, D) and ``noise`` (B, S, T, D, standard normal) are the ones the
    sampler will use; the result goes to ``picard_sample(init=...)``.
    """
    if x0_guess.shape != x_T.shape:
        raise ValueError(f"x0_guess must have the shape of x_T {tuple(x_T.shape)}, got {tuple(x0_guess.shape)}")
    S = schedule.num_steps
    B = x_T.shape[0]
    sched = schedule.to(x_T.device)
    x0 = x0_guess.clamp(-sched.clip_sample_range, sched.clip_sample_range) if sched.clip_sample else x0_guess
    # with x0 fixed each step is affine in x: x_{k+1} = a_k x_k + b_k + σ_k z_k, with
    # b_k the step from x = 0; all S steps at once (one matrix product, not S small ones)
    if sched.order > 1:  # a multistep schedule: every step's weighted predictions, all equal to the guess
        drive = sched.x0_drive(x0[:, None].expand(B, S, *x_T.shape[1:]))
    else:
        k = torch.arange(S, device=x_T.device).repeat_interleave(B)
        zeros = torch.zeros((S * B, *x_T.shape[1:]), device=x_T.device, dtype=x_T.dtype)
        x0_rows = x0.repeat(S, *([1] * (x0.dim() - 1)))
        drive = sched.step_mean(zeros, k, sched.output_for_x0(zeros, k, x0_rows)).view(S, B, *x_T.shape[1:])
        drive = drive.transpose(0, 1)  # (B, S, T, D)
    if noise is not None:
        drive = drive + sched.noise_std.view(1, S, 1, 1).to(drive.dtype) * noise
    a = sched.linear_coeff().to(x_T.dtype).expand(B, S)
    return linear_recurrence(a, x_T, drive)


def shift_trajectory(trajectory: torch.Tensor, steps: int) -> torch.Tensor:
    """``trajectory`` (B, T, D) advanced by ``steps``: drop the first steps, repeat the last to keep T.

    The warm-start guess of the next chunk after ``steps`` of this chunk's actions ran.
    """
    T = trajectory.shape[1]
    steps = min(int(steps), T)
    if steps <= 0:
        return trajectory.clone()
    tail = trajectory[:, -1:].expand(-1, steps, -1)
    return torch.cat([trajectory[:, steps:], tail], dim=1)
