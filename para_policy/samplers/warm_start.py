"""Warm starts: an initial Picard iterate built from a guess of the clean trajectory.

The previous control step's trajectory is a good guess of the next chunk's *clean*
trajectory x0 (shifted by the actions executed since), but its noisy intermediate
states carry the old noise and are off by about σ_k at every step, which is exactly the
scale the convergence test measures. So the guess is rebuilt with the new noise: run
the step recurrence with the denoiser's x0 prediction replaced by the guess,

    x_{k+1} = step_mean(x_k, k, output implied by x0_guess) + σ_k z_k,

which costs no model call. Where the guess is right, the iterate is already the fixed
point and the window slides through at once.
"""

from __future__ import annotations

import torch

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
    out = torch.empty((B, S, *x_T.shape[1:]), device=x_T.device, dtype=x_T.dtype)
    x = x_T
    for k in range(S):
        rows = torch.full((B,), k, dtype=torch.long, device=x.device)
        x = sched.step_mean(x, rows, sched.output_for_x0(x, rows, x0))
        if noise is not None:
            x = x + sched.noise_std[k] * noise[:, k]
        out[:, k] = x
    return out


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
