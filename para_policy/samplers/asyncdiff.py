"""AsyncDiff (Chen et al. 2024): the denoiser's stages run at once, each reading the previous step's input.

The network ``ε = F_N ∘ … ∘ F_1`` is cut into N stages (:mod:`para_policy.models.unet_stages`).
The sequential loop evaluates them in order at every step. AsyncDiff instead, after ``warmup``
sequential steps, lets stage ``i`` at step ``k`` read what stage ``i-1`` produced at step ``k-1``:

    h_{1,k} = F_1(x_k, t_k),   h_{i,k} = F_i(h_{i-1,k-1}, t_k)   (i = 2 … N),   ε_k = h_{N,k}
    x_{k+1} = step(x_k, k, ε_k) + σ_k z_k

so the N stage calls of a step depend on nothing of that step but ``x_k`` and run at once, one
per worker: a step costs the slowest stage plus a hand-over instead of the whole network.
Consecutive steps' activations are close, which is why the result stays close to the
sequential one; it is not equal (``exact=True`` makes it so).

``time_shift`` (AsyncDiff's option of that name, on by default): stages 2 … N embed ``t_{k-1}``,
the timestep their stale input began at, instead of ``t_k``. With 2 stages the chain is then
consistent, ``ε_k = ε(x_{k-1}, t_{k-1})``: each network call spread over two steps, instead of
activations of one step mixed with the timestep of the next (which makes AsyncDiff's default,
time_shift off, drift further from the sequential sample on few-step schedules).

``stride`` r (AsyncDiff's stride denoising): one parallel round serves r steps. Stages 1 … N-1
run once per round, at the round's last timestep; the last stage runs its (stale) input at each
of the round's r timesteps in one call of r·B rows, giving ``ε_k … ε_{k+r-1}``, applied in turn
(with ``time_shift``, every stage after the first at the timesteps r steps earlier).

``exact=True``: the approximate trajectory is the warm start of Picard iteration at tolerance 0
(:func:`~para_policy.samplers.picard_sample`, window S) over the whole network, which ends at
the sequential loop's answer.

The step is the schedule's own (DDPM, DDIM, DPM-Solver++ multistep with its ``x0`` history), as
in :func:`~para_policy.samplers.sequential_sample`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from para_policy.samplers.common import Denoiser, Inpaint, SampleStats, apply_inpaint, check_inputs
from para_policy.samplers.options import check_stage_options
from para_policy.samplers.picard import picard_sample
from para_policy.samplers.sequential import schedule_step
from para_policy.schedule import Schedule


class StagedDenoiser(Protocol):
    """A network cut into stages (:class:`para_policy.stages.StagePipeline` is one).

    ``run_stages(x (B,T,D), t (B,), condition) -> (ε (B,T,D), carries)``: the stages in order on
    current inputs; ``stale_step(x, t, condition, carries, last_t (r·B,) | None) -> (ε (r·B,T,D),
    carries)``: all stages at once, stage ``i`` on the previous call's ``carries[i-1]``.
    """

    num_stages: int

    def run_stages(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None) -> tuple[Any, Any]: ...

    def stale_step(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None, carries: Any,
                   last_t: torch.Tensor | None = None) -> tuple[Any, Any]: ...


def find_staged(denoiser: Any, stages: int) -> StagedDenoiser:
    """The staged form of ``denoiser`` with ``stages`` stages.

    Looked for in order: ``denoiser`` itself when it has ``stale_step`` (a StagePipeline);
    ``denoiser.staged(stages)``; the owner of a bound-method denoiser, ``denoiser.__self__.staged(stages)``
    (a policy's ``policy.denoise``: :meth:`para_policy.policy.LowdimPolicy.staged`).
    """
    if callable(getattr(denoiser, "stale_step", None)):
        found = denoiser
    else:
        make = getattr(denoiser, "staged", None) or getattr(getattr(denoiser, "__self__", None), "staged", None)
        if not callable(make):
            raise TypeError(f"sampler 'asyncdiff' runs the network's stages on separate workers, so it needs a "
                            f"denoiser that can be cut into stages: a policy's (policy.denoise; "
                            f"LowdimPolicy.staged) or a para_policy.stages.StagePipeline, passed as the "
                            f"denoiser or as staged=; got {type(denoiser).__name__}")
        found = make(stages)
    if found.num_stages != stages:
        raise ValueError(f"stages={stages}, but the staged denoiser has {found.num_stages} stages")
    return found


def round_timesteps(steps: torch.Tensor, k: int, r: int, num_stages: int, batch: int, time_shift: bool
                    ) -> list[torch.Tensor]:
    """Each stage's timesteps in the parallel round of steps ``k … k+r-1`` (``steps`` (S,) float):
    (B,) for all but the last stage, (r·B,) for the last (module docstring)."""
    shift = r if time_shift else 0
    later = steps[(torch.arange(k, k + r) - shift).clamp(min=0)]  # the last stage's r timesteps
    ts = [steps[k + r - 1].expand(batch)] + [later[-1].expand(batch)] * (num_stages - 2)
    return [*ts, later.repeat_interleave(batch)] if num_stages > 1 else [steps[k: k + r].repeat_interleave(batch)]


def stale_trajectory(staged: StagedDenoiser, schedule: Schedule, x_T: torch.Tensor, noise: torch.Tensor,
                     condition: torch.Tensor | None, inpaint: Inpaint | None, warmup: int, stride: int,
                     time_shift: bool = True) -> tuple[torch.Tensor, list[int]]:
    """AsyncDiff's loop (module docstring): ``(x_1 … x_S (B, S, T, D), rows of each parallel round)``."""
    B, S = x_T.shape[0], schedule.num_steps
    steps = schedule.timesteps.to(torch.float32)
    x, x0s, carries, traj, rounds, k = x_T, None, None, [], [], 0
    while k < S:
        x_in = apply_inpaint(x, inpaint, k)
        if k < warmup or carries is None:
            out, carries = staged.run_stages(x_in, steps[k].expand(B), condition)
            outs = [out]
        else:
            r = min(stride, S - k)
            ts = round_timesteps(steps, k, r, staged.num_stages, B, time_shift)
            out, carries = staged.stale_step(x_in, ts, condition, carries)
            outs = list(out.to(x.dtype).split(B))
            rounds.append(r * B)
        for j, eps in enumerate(outs):
            if j:
                x_in = apply_inpaint(x, inpaint, k + j)
            x, x0s = schedule_step(schedule, x_in, k + j, eps.to(x.dtype), x0s, noise)
            traj.append(x)
        k += len(outs)
    return torch.stack(traj, dim=1), rounds


@torch.inference_mode()
def asyncdiff_sample(
    denoiser: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    condition: torch.Tensor | None = None,
    inpaint: Inpaint | None = None,
    stages: int = 2,
    warmup: int = 1,
    stride: int = 1,
    exact: bool = False,
    time_shift: bool = True,
    staged: StagedDenoiser | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Denoise ``x_T`` with the network's stages one step stale (module docstring), or exactly.

    Args:
        denoiser: ``(x (N,T,D), t (N,), condition) -> (N,T,D)``; its staged form is found by
            :func:`find_staged` unless ``staged`` is given; ``exact`` refines over it.
        x_T: ``(B, T, D)`` initial noise; ``noise``: ``(B, S, T, D)`` per-step noise (optional for
            deterministic schedules); ``condition``, ``inpaint``: as :func:`sequential_sample`.
        stages: workers the network is cut over; warmup: sequential steps first (``warmup >= S``
            is the sequential loop over the stages); stride: steps per parallel round; exact:
            refine to the sequential answer (Picard, tolerance 0, from this trajectory);
            time_shift: later stages embed their stale input's timestep.
        staged: the staged form to run (:class:`StagedDenoiser`) instead of :func:`find_staged`'s.
    Returns:
        ``(sample (B, T, D), stats)``; ``stats.rounds``: sequential network calls (warm-up steps)
        plus parallel rounds, plus Picard's rounds when ``exact``.
    """
    check_stage_options(stages, warmup, stride, exact, time_shift)
    noise = check_inputs(schedule, x_T, noise, condition, inpaint)
    staged = find_staged(denoiser if staged is None else staged, stages)
    dtype = torch.promote_types(x_T.dtype, torch.float32)
    x_T, noise = x_T.to(dtype), noise.to(dtype)
    if inpaint is not None:
        inpaint = (inpaint[0].to(dtype), inpaint[1] if inpaint[1].dtype == torch.bool else inpaint[1].to(dtype))
    B, S = x_T.shape[0], schedule.num_steps
    schedule = schedule.to(x_T.device)
    traj, parallel = stale_trajectory(staged, schedule, x_T, noise, condition, inpaint, warmup, stride, time_shift)
    sequential = min(warmup, S)
    rounds, evals = sequential + len(parallel), S * B
    if exact:
        sample, refine = picard_sample(denoiser, schedule, x_T, noise, window=S, tolerance=0.0,
                                       condition=condition, inpaint=inpaint, init=traj)
        rounds, evals = rounds + refine.rounds, evals + refine.model_evals
    else:
        sample = apply_inpaint(traj[:, -1], inpaint, None)
    return sample, SampleStats(rounds=rounds, model_evals=evals, converged=torch.ones(B, dtype=torch.bool),
                               rounds_per_sample=torch.full((B,), rounds, dtype=torch.long),
                               rows_per_round=[B] * sequential + parallel)
