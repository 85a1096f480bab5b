"""Displaced patch parallelism (DistriFusion, Li et al. 2024; PCPP, Zhang et al. 2024) over the horizon.

The trajectory ``x (B, T, D)`` is cut along time into P equal patches ``x^1 … x^P``
(B, T/P, D), one per worker. Inside the network every convolution of a patch needs a few columns
of its neighbours' input at that layer (the *halo* ``h``), and every GroupNorm the statistics
of the whole horizon (``s``: per-group mean and mean of squares). The sequential loop has both
at hand only by running the whole network. After ``warmup`` whole-network steps, displaced
patches read the other patches' halos and statistics from the previous step instead:

    ε_k^p, h_k^p, s_k^p = F(x_k^p, t_k; h_{k-1}^{p-1}, h_{k-1}^{p+1}, Σ_{q≠p} s_{k-1}^q)   (p = 1 … P)
    GroupNorm statistics of patch p:  (s_k^p + Σ_{q≠p} s_{k-1}^q) / P
    ε_k = [ε_k^1, …, ε_k^P]   (concatenated along time)
    x_{k+1} = step(x_k, k, ε_k) + σ_k z_k

so the P patch calls of a step depend on nothing of that step but ``x_k`` and run at once: a step
costs one patch plus a hand-over instead of the whole network. Consecutive steps' activations are
close, which is why the sample stays close to the sequential one; it is not equal
(``exact=True`` makes it so). A sequence end is a zero halo (the network's own padding).

The network side (the patch split, its halos and statistics) is
:class:`~para_policy.models.unet_patches.PatchUnet`; the runners that call it (one ONNX Runtime
session per patch on worker threads, or eager) are in :mod:`para_policy.patches`. This module
only steps: it finds the runner behind the denoiser (:func:`find_patched`) and needs of it
``full(x, t, condition) -> (ε, exchange)`` and ``displaced(x, t, condition, exchange) -> (ε, exchange)``.

``exact=True``: the approximate trajectory is the warm start of Picard iteration at tolerance 0
(:func:`~para_policy.samplers.picard_sample`, window S) over the whole network, which ends at
the sequential loop's answer.

The step is the schedule's own (DDPM, DDIM, DPM-Solver++ multistep with its ``x0`` history), as
in :func:`~para_policy.samplers.sequential_sample`, and the known entries (``inpaint``) are
imposed before every step as there.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from para_policy.samplers.options import check_patch_options
from para_policy.samplers.picard import exact_from
from para_policy.samplers.sequential import schedule_step
from para_policy.schedule import Schedule


class PatchedDenoiser(Protocol):
    """A network split into ``patches`` patches of the horizon (:class:`para_policy.patches.PatchRunner`).

    ``full(x (B,T,D), t (B,), condition) -> (ε (B,T,D), exchange)``: the whole network, exact,
    emitting every patch's halos and statistics; ``displaced(x, t, condition, exchange) ->
    (ε, exchange)``: the patches at once, each reading ``exchange`` (the previous call's).
    """

    patches: int

    def full(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None) -> tuple[torch.Tensor, Any]: ...

    def displaced(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None,
                  exchange: Sequence[Any]) -> tuple[torch.Tensor, Any]: ...


def find_patched(denoiser: Any, patches: int) -> PatchedDenoiser:
    """The patch form of ``denoiser`` with ``patches`` patches.

    Looked for in order: ``denoiser`` itself when it has ``displaced`` (a runner of
    :mod:`para_policy.patches`); ``denoiser.patched(patches)``; the owner of a bound-method
    denoiser, ``denoiser.__self__.patched(patches)`` (a policy's ``policy.denoise``:
    :meth:`para_policy.policy.LowdimPolicy.patched`).
    """
    return find_form(denoiser, "patches", "displaced", "patched", patches, "patches",
                     "runs the network on patches of the horizon at once, so it needs a denoiser that can be "
                     "split that way: a policy's (policy.denoise; LowdimPolicy.patched) or a runner of "
                     "para_policy.patches (EagerPatches, OnnxPatches), passed as the denoiser or as patched=")


def displaced_trajectory(patched: PatchedDenoiser, schedule: Schedule, x_T: torch.Tensor, noise: torch.Tensor,
                         condition: torch.Tensor | None, inpaint: Inpaint | None, warmup: int,
                         whole: Denoiser | None = None) -> torch.Tensor:
    """The displaced loop (module docstring): ``x_1 … x_S`` (B, S, T, D).

    The warm-up steps call ``whole`` (the caller's denoiser, so ``warmup >= S`` is the sequential
    loop itself) but the last, ``warmup-1``, which runs the patched network whole
    (:meth:`PatchedDenoiser.full`) for the exchange the first displaced step reads; every later
    step runs the patches at once. ``whole`` None: every warm-up step runs :meth:`PatchedDenoiser.full`.
    """
    B, S = x_T.shape[0], schedule.num_steps
    feeds = warmup - 1 if warmup < S else None  # the whole step whose exchange the first displaced one reads
    x, x0s, exchange = x_T, None, None
    traj = []
    for k in range(S):
        x = apply_inpaint(x, inpaint, k)
        t = schedule.timesteps[k].expand(B)
        if k < warmup and k != feeds and whole is not None:
            out = whole(x, t, condition)
        elif k < warmup or exchange is None:
            out, exchange = patched.full(x, t, condition)
        else:
            out, exchange = patched.displaced(x, t, condition, exchange)
        x, x0s = schedule_step(schedule, x, k, out.to(x.dtype), x0s, noise)
        traj.append(x)
    return torch.stack(traj, dim=1)


@torch.inference_mode()
def patch_sample(
    denoiser: Denoiser | None,
    schedule: Schedule,
    x_T: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    condition: torch.Tensor | None = None,
    inpaint: Inpaint | None = None,
    patches: int = 2,
    warmup: int = 1,
    exact: bool = False,
    patched: PatchedDenoiser | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Denoise ``x_T`` with displaced patches of the horizon (module docstring), or exactly.

    Args:
        denoiser: ``(x (N,T,D), t (N,), condition) -> (N,T,D)``; its patch form is found by
            :func:`find_patched` unless ``patched`` is given; the warm-up steps but the last
            call it, and ``exact`` refines over it (None: only with ``patched`` and not ``exact``).
        x_T: ``(B, T, D)`` initial noise; ``noise``: ``(B, S, T, D)`` per-step noise (optional for
            deterministic schedules); ``condition`` (B, G) or None, ``inpaint``: as
            :func:`sequential_sample`.
        patches: P, the patches (workers) the horizon is cut into (it must divide the horizon:
            checked when the runner is built); warmup: whole-network steps first (>= 1: the first
            displaced step reads the step before it; ``warmup >= S`` is the sequential loop);
            exact: refine to the sequential answer (Picard, tolerance 0, from this trajectory).
        patched: the patch form to run (:class:`PatchedDenoiser`) instead of :func:`find_patched`'s.
    Returns:
        ``(sample (B, T, D), stats)``; ``stats.rounds``: S (each step is one network round, whole
        or patched), plus Picard's rounds when ``exact``.
    """
    check_patch_options(patches, warmup, exact)
    noise = check_inputs(schedule, x_T, noise, condition, inpaint)
    if exact and denoiser is None:
        raise ValueError("exact=True refines with the whole network: pass the denoiser, not only patched=")
    patched = find_patched(denoiser if patched is None else patched, patches)
    x_T, noise, inpaint = promote_state(x_T, noise, inpaint)
    B, S = x_T.shape[0], schedule.num_steps
    schedule = schedule.to(x_T.device)
    traj = displaced_trajectory(patched, schedule, x_T, noise, condition, inpaint, warmup, denoiser)
    sample, refine = exact_from(denoiser, schedule, x_T, noise, condition, inpaint, traj, exact)
    rounds, evals = S + refine.rounds, S * B + refine.model_evals
    return sample, SampleStats(rounds=rounds, model_evals=evals, converged=torch.ones(B, dtype=torch.bool),
                               rounds_per_sample=torch.full((B,), rounds, dtype=torch.long), rows_per_round=[B] * S)
