"""Per-step Jacobians of the denoising steps, for :func:`~para_policy.samplers.picard_sample`'s ``jacobian``.

With ``linear_solve`` each step is ``x_{k+1} = a_k x_k + g_k(x_k) + σ_k z_k``, and Picard
iterates on ``g_k``. The better the solve's linearization of ``g_k``, the fewer rounds; the
exact Jacobian is known only at the answer, but its mean over the sequential samples of a few
calibration observations is a fixed matrix per step, found once per policy and schedule (as a
window is), and any linearization keeps the sequential sample as the fixed point.
"""

from __future__ import annotations

import torch

from para_policy.samplers.common import Denoiser, check_inputs
from para_policy.samplers.sequential import sequential_sample
from para_policy.schedule import Schedule, require_single_step


def step_jacobians(denoiser: Denoiser, schedule: Schedule, inputs: torch.Tensor,
                   condition: torch.Tensor | None = None) -> torch.Tensor:
    """``(S, T·D, T·D)``: the exact Jacobian of each step's nonlinear part at ``inputs[k]``.

    ``g_k(x) = step_mean(x, k) − a_k x`` (``a_k`` from :meth:`Schedule.linear_coeff`);
    ``inputs`` ``(S, T, D)`` one trajectory's step inputs, ``condition`` ``(1, ...)`` its
    conditioning. Costs T·D backward passes per step (``torch.func.jacrev``).
    """
    from torch.func import jacrev

    require_single_step(schedule, "step_jacobians")
    S, T, D = inputs.shape
    if S != schedule.num_steps:
        raise ValueError(f"inputs must have one row per step ({schedule.num_steps}), got {S}")
    a = schedule.linear_coeff().to(inputs.dtype)
    mats = []
    for k in range(S):
        kr = torch.full((1,), k, dtype=torch.long, device=inputs.device)

        def g(x: torch.Tensor, k: int = k, kr: torch.Tensor = kr) -> torch.Tensor:
            out = denoiser(x[None], schedule.timesteps[kr], condition)
            return (schedule.step_mean(x[None], kr, out) - a[k] * x[None])[0]

        with torch.no_grad():  # no graph back to the weights (it would keep every step's activations)
            mats.append(jacrev(g)(inputs[k].clone()).reshape(T * D, T * D).detach())
    return torch.stack(mats)


def mean_step_jacobians(denoiser: Denoiser, schedule: Schedule, x_T: torch.Tensor, noise: torch.Tensor | None = None,
                        condition: torch.Tensor | None = None) -> torch.Tensor:
    """``(S, T·D, T·D)``: :func:`step_jacobians` along each sample's sequential trajectory, averaged.

    Args:
        x_T: ``(B, T, D)`` initial noise of B calibration samples; noise: ``(B, S, T, D)`` their
            step noise (``draw_noise``; optional for deterministic schedules); condition:
            ``(B, ...)`` their conditioning (e.g. B recorded observations).
    """
    noise = check_inputs(schedule, x_T, noise, condition, None)
    total = None
    for b in range(x_T.shape[0]):
        cond = None if condition is None else condition[b: b + 1]
        inputs: list[torch.Tensor] = []

        def recording(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None,
                      inputs: list[torch.Tensor] = inputs) -> torch.Tensor:
            inputs.append(x[0])
            return denoiser(x, t, c)

        sequential_sample(recording, schedule, x_T[b: b + 1], noise[b: b + 1], condition=cond)
        jac = step_jacobians(denoiser, schedule, torch.stack(inputs), cond)
        total = jac if total is None else total + jac
    return total / x_T.shape[0]
