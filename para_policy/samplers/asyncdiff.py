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

Two options beyond AsyncDiff, on by default because they shrink its error where it lands in the
sample (measured in ``eval/bench_stages.py``):

* ``tail``: the last steps run the stages in turn on current inputs (exact network calls). A
  stale output's error at the last steps reaches the sample undamped, while errors earlier on are
  largely forgotten by the steps after them.
* ``extrapolate``: the output served at step ``k`` is the stale one extrapolated linearly over its
  lag of L = N − 1 steps, ``ε̂_k = h_{N,k} + L (h_{N,k} − h_{N,k−1})``, a first-order correction
  of the one-step-late prediction (Adams–Bashforth's idea; stride 1).

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

import itertools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from para_policy.samplers.common import (
    Denoiser,
    Inpaint,
    SampleStats,
    apply_inpaint,
    check_inputs,
    find_form,
    promote_state,
)
from para_policy.samplers.options import check_stage_options
from para_policy.samplers.picard import exact_from
from para_policy.samplers.sequential import schedule_step
from para_policy.schedule import Schedule


class StagedDenoiser(Protocol):
    """A network cut into stages (:class:`para_policy.stages.StagePipeline` is one).

    ``run_stages(x (B,T,D), t (B,), condition) -> (ε (B,T,D), carries)``: the stages in order on
    current inputs; ``stale_rounds(x, rounds, condition, carries, advance) -> carries``: the
    parallel rounds, stage ``i`` of round ``j`` on stage ``i-1``'s output of round ``j-1``, each
    round's last-stage output (r·B, T, D) handed to ``advance(j, out)``, which returns stage 0's
    input for round ``j+1`` (:meth:`para_policy.stages.StagePipeline.stale_rounds`).
    """

    num_stages: int

    def run_stages(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None) -> tuple[Any, Any]: ...

    # optional: step_runner(schedule, lag, sample_shape) -> step(x, out, prev, noise, k) | None, the step after each
    # round (``ε̂ = out + lag (out − prev)``) taken in one call (:meth:`para_policy.stages.StagePipeline.step_runner`)

    def stale_rounds(self, x: torch.Tensor, rounds: Sequence[Sequence[torch.Tensor]],
                     condition: torch.Tensor | None, carries: Any,
                     advance: Callable[[int, torch.Tensor], torch.Tensor | None]) -> Any: ...


def find_staged(denoiser: Any, stages: int) -> StagedDenoiser:
    """The staged form of ``denoiser`` with ``stages`` stages.

    Looked for in order: ``denoiser`` itself when it has ``stale_rounds`` (a StagePipeline);
    ``denoiser.staged(stages)``; the owner of a bound-method denoiser, ``denoiser.__self__.staged(stages)``
    (a policy's ``policy.denoise``: :meth:`para_policy.policy.LowdimPolicy.staged`).
    """
    return find_form(denoiser, "asyncdiff", "stale_rounds", "staged", stages, "num_stages",
                     "runs the network's stages on separate workers, so it needs a denoiser that can be cut "
                     "into stages: a policy's (policy.denoise; LowdimPolicy.staged) or a "
                     "para_policy.stages.StagePipeline, passed as the denoiser or as staged=")


def round_plan(steps: torch.Tensor, start: int, stop: int, stride: int, num_stages: int, batch: int,
               time_shift: bool) -> tuple[list[int], list[list[torch.Tensor]]]:
    """The parallel rounds over steps ``start … stop-1``, ``stride`` steps each: ``(first step of each
    round, each round's timesteps per stage)``, made once, before the first round.

    ``steps`` (S,) float. Per round of steps ``k … k+r-1``: (B,) tensors for all stages but the
    last (stage 0 at ``t_{k+r-1}``, the middle ones at the last stage's last timestep), (r·B,) for
    the last, its r timesteps each repeated B times (``t_{k+i-r}`` with ``time_shift``, clamped at
    step 0; ``t_{k+i}`` without). One stage: its r timesteps.
    """
    starts = list(range(start, stop, stride))
    sizes = [min(stride, stop - k) for k in starts]
    shifted = time_shift and num_stages > 1
    last = [max(k + i - (r if shifted else 0), 0) for k, r in zip(starts, sizes, strict=True) for i in range(r)]
    first = [k + r - 1 for k, r in zip(starts, sizes, strict=True)]
    middle = [last[end - 1] for end in itertools.accumulate(sizes)]

    def rows(index: list[int], split: list[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.tensor(index, dtype=torch.long, device=steps.device).repeat_interleave(batch)
        return steps[idx].split([n * batch for n in split])

    lasts = rows(last, sizes)
    if num_stages == 1:
        return starts, [[t] for t in lasts]
    firsts, middles = rows(first, [1] * len(starts)), rows(middle, [1] * len(starts))
    return starts, [[f, *[m] * (num_stages - 2), t] for f, m, t in zip(firsts, middles, lasts, strict=True)]


def stale_trajectory(staged: StagedDenoiser, schedule: Schedule, x_T: torch.Tensor, noise: torch.Tensor,
                     condition: torch.Tensor | None, inpaint: Inpaint | None, warmup: int, stride: int,
                     time_shift: bool = True, tail: int = 0, extrapolate: bool = False
                     ) -> tuple[torch.Tensor, list[int]]:
    """AsyncDiff's loop (module docstring): ``(x_1 … x_S (B, S, T, D), rows of each parallel round)``.

    The ``warmup`` steps (at least one: the first parallel round needs every stage's output) and
    the last ``tail`` steps run the stages in turn; the parallel rounds between are streamed
    (:meth:`StagedDenoiser.stale_rounds`), the schedule's steps taken in the ``advance`` callback
    as each round's output arrives.
    """
    B, S = x_T.shape[0], schedule.num_steps
    steps = schedule.timesteps.to(torch.float32)
    warm = min(max(warmup, 1), S)
    stop = max(S - tail, warm)
    state: list[Any] = [x_T, None, None, None]  # the sample, the x0 history, the last output, the round's input
    traj: list[torch.Tensor] = []

    def take(k: int, x_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        state[0], state[1] = schedule_step(schedule, x_in, k, out.to(x_in.dtype), state[1], noise)
        traj.append(state[0])
        return state[0]

    carries = None
    for k in range(warm):
        x_in = apply_inpaint(state[0], inpaint, k)
        state[2], carries = staged.run_stages(x_in, steps[k].expand(B), condition)
        take(k, x_in, state[2])
    starts, rounds = round_plan(steps, warm, stop, stride, staged.num_stages, B, time_shift)
    lag = staged.num_stages - 1  # steps between a stale output's input and the step it serves

    make = getattr(staged, "step_runner", None)  # the same step in one call, where the staged form offers it
    step = make(schedule, lag if extrapolate else 0, x_T.shape[1:]) if callable(make) and inpaint is None \
        and stride == 1 and x_T.dtype == torch.float32 else None

    def advance(j: int, out: Any) -> Any:
        if step is not None:  # on the stages' arrays as they come (numpy between ONNX Runtime sessions)
            state[0] = step(state[0], out, state[2], noise, starts[j])
            state[2] = out
            traj.append(state[0])
            return state[0] if j + 1 < len(starts) else None
        out = torch.as_tensor(out)
        served = out + lag * (out - state[2]) if extrapolate else out  # linear, over the lag
        state[2] = out
        for i, eps in enumerate(served.split(B)):
            take(starts[j] + i, state[3] if i == 0 else apply_inpaint(state[0], inpaint, starts[j] + i), eps)
        state[3] = apply_inpaint(state[0], inpaint, len(traj)) if j + 1 < len(starts) else None
        return state[3]

    if starts:
        state[3] = apply_inpaint(state[0], inpaint, warm)
        staged.stale_rounds(state[3], rounds, condition, carries, advance)
    state[0], state[2] = torch.as_tensor(state[0]), torch.as_tensor(state[2])
    for k in range(stop, S):
        x_in = apply_inpaint(state[0], inpaint, k)
        take(k, x_in, staged.run_stages(x_in, steps[k].expand(B), condition)[0])
    return torch.stack([torch.as_tensor(x) for x in traj], dim=1), [ts[-1].shape[0] for ts in rounds]


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
    tail: int = 2,
    stride: int = 1,
    exact: bool = False,
    time_shift: bool = True,
    extrapolate: bool = True,
    staged: StagedDenoiser | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Denoise ``x_T`` with the network's stages one step stale (module docstring), or exactly.

    Args:
        denoiser: ``(x (N,T,D), t (N,), condition) -> (N,T,D)``; its staged form is found by
            :func:`find_staged` unless ``staged`` is given; ``exact`` refines over it.
        x_T: ``(B, T, D)`` initial noise; ``noise``: ``(B, S, T, D)`` per-step noise (optional for
            deterministic schedules); ``condition``, ``inpaint``: as :func:`sequential_sample`.
        stages: workers the network is cut over; warmup: sequential steps first (``warmup >= S``
            is the sequential loop over the stages); tail: sequential steps last; stride: steps
            per parallel round; exact: refine to the sequential answer (Picard, tolerance 0, from
            this trajectory); time_shift: later stages embed their stale input's timestep;
            extrapolate: each stale output extrapolated linearly over its lag (module docstring).
        staged: the staged form to run (:class:`StagedDenoiser`) instead of :func:`find_staged`'s.
    Returns:
        ``(sample (B, T, D), stats)``; ``stats.rounds``: sequential network calls (warm-up and
        tail steps) plus parallel rounds, plus Picard's rounds when ``exact``.
    """
    check_stage_options(stages, warmup, stride, exact, time_shift, tail, extrapolate)
    noise = check_inputs(schedule, x_T, noise, condition, inpaint)
    staged = find_staged(denoiser if staged is None else staged, stages)
    if stride > 1 and not getattr(staged, "time_in_every_stage", True):
        raise ValueError(f"stride={stride} runs the last stage at several timesteps at once, but this network's "
                         f"later stages take the timestep from the carried state (a TransformerForDiffusion's "
                         f"memory), so every one would give the same output: use stride=1")
    x_T, noise, inpaint = promote_state(x_T, noise, inpaint)
    B, S = x_T.shape[0], schedule.num_steps
    schedule = schedule.to(x_T.device)
    traj, parallel = stale_trajectory(staged, schedule, x_T, noise, condition, inpaint, warmup, stride, time_shift,
                                      tail, extrapolate)
    sequential, warm = S - sum(parallel) // B, min(max(warmup, 1), S)  # steps with the stages in turn
    rounds, evals = sequential + len(parallel), S * B
    sample, refine = exact_from(denoiser, schedule, x_T, noise, condition, inpaint, traj, exact)
    rounds, evals = rounds + refine.rounds, evals + refine.model_evals
    return sample, SampleStats(rounds=rounds, model_evals=evals, converged=torch.ones(B, dtype=torch.bool),
                               rounds_per_sample=torch.full((B,), rounds, dtype=torch.long),
                               rows_per_round=[B] * warm + parallel + [B] * (sequential - warm))
