"""Triangular Anderson acceleration of the Picard iteration (ParaTAA; Tang et al., ICML 2024).

Picard iteration (:mod:`para_policy.samplers.picard`) solves the triangular system

    x_{k+1} = x_b + Σ_{j=b}^{k} (f_j(x_j) + s_j − x_j),      k = b … b+W−1,

over a window by plain fixed-point iteration ``x ← F(x)``: the model is evaluated at the
current iterate and the window is recomputed with prefix sums. Information travels one
step per round, so a window of W steps needs up to W rounds, and far slots wait for the
near ones. Anderson acceleration extrapolates the fixed point from the last few
iterates instead: with residuals ``r = F(x) − x`` and the differences ``ΔX, ΔR`` of the
last ``memory`` iterates and residuals,

    γ = argmin_γ ‖r − ΔR γ‖² + ridge ‖γ‖²,      x ← x + r − (ΔX + ΔR) γ.

Triangular: the system is lower-triangular (slot k depends only on slots before it),
so slot k's coefficients are fitted on the residuals of slots ``0 … k`` of the window
only (cumulative Gram sums), never on slots after it: a slot is not pulled around by
errors that cannot have caused its own. Each slot term is weighted by ``1/(D·σ_k²)``
(D the number of entries of one trajectory, T·D; σ_k² the step's posterior variance)
so that the fit is measured in the same units as the convergence test, and a slot with
large noise does not dominate one with small noise.

Exactness and progress are kept from Picard: slot 0 of the window (and every slot up to
the first one that has not converged) takes the plain Picard value, which is exact once
the slots before it are, so the window advances at least one step per round, rounds
never exceed S, and tolerance 0 reproduces the sequential sample. The convergence test
(``mean(r²) ≤ tolerance²·σ_k²``, the change the Picard map would make) and the window
sliding are Picard's.

Faithfulness at a given tolerance: the test bounds the change F would still make, not
the error. Plain Picard stops far inside that bound (its errors shrink by a factor per
round, so the last change dwarfs what is left); the extrapolated iterates stop about at
it. So at the same tolerance TAA's actions deviate further from the sequential ones than
Picard's: compare the two at equal deviation (``eval/bench_rounds.py``, docs/benchmarks.md),
not equal tolerance.

Every step keeps its own history, counted from the round it entered the window (a step
stays in the window until it is final), so a slot has at least as much history as any
slot after it and the triangular sums only mix slots with enough history.

Layout: :class:`TriangularAnderson` is the whole acceleration (history, Gram sums, the
update); :func:`taa_sample` is ``picard_sample`` with it as the per-round ``accelerator``.
"""

from __future__ import annotations

import torch

from para_policy.samplers.common import (
    Denoiser,
    Inpaint,
    SampleStats,
    float32_state,
    refuse_renamed,
)
from para_policy.samplers.options import check_anderson_options
from para_policy.samplers.picard import picard_sample
from para_policy.schedule import Schedule


def check_taa_options(memory: int, ridge: float) -> None:
    """Validate the Anderson options with a spec's checks (one copy); a ``ValueError`` names the bad one."""
    check_anderson_options(memory, ridge)


def slot_weights(schedule: Schedule, numel: int) -> torch.Tensor:
    """``(S,)`` weights ``1 / (numel · σ_k²)`` of the Anderson fit, in the convergence test's units."""
    return 1.0 / (numel * schedule.test_variance().to(torch.float64))


class TriangularAnderson:
    """The Anderson half of ParaTAA: per-step history and the accelerated update of a window.

    Everything Picard-specific (model call, prefix sums, convergence test, sliding) stays
    in the sampling loop; each round hands this object the window's Picard values and
    gets back the values to store. Per-step history is a ring buffer over rounds:
    ``x[b, k, i]`` / ``r[b, k, i]`` (each (T, D)) hold an iterate ``x_{k+1}`` at which the
    Picard map was evaluated and its residual; ``seen[b, k]`` counts the rounds step k has
    been in sample b's window (its valid history length).
    """

    def __init__(self, schedule: Schedule, shape: tuple[int, int, int], memory: int, ridge: float,
                 device: torch.device, dtype: torch.dtype) -> None:
        B, T, D = shape
        S = schedule.num_steps
        self.steps = S
        self.memory = memory
        self.ridge = float(ridge)
        self.weights = slot_weights(schedule, T * D).to(device)  # (S,)
        # step S is a scratch step: slots past the trajectory's end write there, nobody reads it
        self.x = torch.zeros((B, S + 1, memory + 1, T, D), device=device, dtype=dtype)
        self.r = torch.zeros_like(self.x)
        self.seen = torch.zeros((B, S + 1), device=device, dtype=torch.long)
        ring = torch.arange(memory + 1, device=device)
        self.orders = (ring[:, None] - ring[None, :]) % (memory + 1)  # [slot] = ring slots, newest first

    def step(self, rnd: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, new: torch.Tensor, old: torch.Tensor,
             plain_upto: torch.Tensor) -> torch.Tensor:
        """Record round ``rnd`` and return the next iterate of every slot, ``(B, W, T, D)``.

        Args:
            k: ``(B, W)`` step index of each slot (clamped to S−1 where not ``valid``).
            valid: ``(B, W)`` slots inside the trajectory.
            new, old: ``(B, W, T, D)`` the Picard map's value ``F(x)`` and the iterate ``x``.
            plain_upto: ``(B,)`` slots ``0 … plain_upto`` take the plain Picard value ``new``
                (the converged prefix and the first unconverged slot, whose value is then
                exact up to the tolerance); later slots are extrapolated.
        """
        residual = torch.where(valid[..., None, None], new - old, 0.0)
        slot = rnd % (self.memory + 1)
        b = torch.arange(k.shape[0], device=k.device)[:, None]
        step = torch.where(valid, k, self.steps)  # (B, W); slots past the end record into the scratch step
        self.x[b, step, slot] = old
        self.r[b, step, slot] = residual
        self.seen[b, step] += 1
        dX, dR, m = self.differences(rnd, k)
        weight = torch.where(valid, self.weights[k], 0.0)
        correction = anderson_correction(dX, dR, m, residual, weight, self.ridge)
        mix = torch.arange(k.shape[1], device=k.device)[None, :] > plain_upto[:, None]
        return torch.where(mix[..., None, None], new - correction, new)

    def differences(self, rnd: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ΔX, ΔR, m)`` for the window ``k`` (B, W) after round ``rnd`` was recorded.

        ΔX, ΔR: ``(B, W, memory, T, D)``, newest difference first
        (``ΔX[..., i, :, :] = x^{n−i} − x^{n−i−1}``); m: ``(B, W)`` how many are valid.
        """
        M = self.memory
        order = self.orders[rnd % (M + 1)]
        b = torch.arange(k.shape[0], device=k.device)[:, None]
        x = self.x[b, k][:, :, order]  # (B, W, M+1, T, D), newest first
        r = self.r[b, k][:, :, order]
        m = (self.seen[b, k] - 1).clamp(min=0, max=M)
        return x[:, :, :-1] - x[:, :, 1:], r[:, :, :-1] - r[:, :, 1:], m


def anderson_correction(
    dX: torch.Tensor, dR: torch.Tensor, m: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, ridge: float,
) -> torch.Tensor:
    """The triangular Anderson correction ``(ΔX + ΔR) γ_k`` for every slot of every window.

    Args:
        dX, dR: ``(B, W, M, T, D)`` iterate and residual differences, newest first.
        m: ``(B, W)`` valid differences per slot (non-increasing along W); columns ≥ m are unused.
        residual: ``(B, W, T, D)`` this round's residuals ``F(x) − x``.
        weight: ``(B, W)`` per-slot weight ``1/(D·σ_k²)``, 0 for slots outside the window.
        ridge: added to the diagonal of every Gram matrix (weighted units).
    Returns:
        ``(B, W, T, D)``: subtract from ``F(x)`` to get the accelerated iterate. Zero where
        a slot has no history or its system could not be solved.
    """
    M = dX.shape[2]
    dR64 = dR.to(torch.float64)
    w = weight.to(torch.float64)
    # Gram sums over slots 0..k (the triangular restriction): cumsum along the window
    gram = (torch.einsum("bwitd,bwjtd->bwij", dR64, dR64) * w[..., None, None]).cumsum(dim=1)
    rhs = (torch.einsum("bwitd,bwtd->bwi", dR64, residual.to(torch.float64)) * w[..., None]).cumsum(dim=1)
    cols = torch.arange(M, device=m.device) < m[..., None]  # (B, W, M)
    pairs = cols[..., :, None] & cols[..., None, :]
    eye = torch.eye(M, device=m.device, dtype=torch.float64)
    diag = torch.where(cols, torch.full_like(rhs, float(ridge)), torch.ones_like(rhs))
    gram = torch.where(pairs, gram, 0.0) + eye * diag[..., None, :]
    rhs = torch.where(cols, rhs, 0.0)
    gamma, info = torch.linalg.solve_ex(gram, rhs)
    usable = (info == 0) & torch.isfinite(gamma).all(dim=-1) & (m > 0)
    gamma = torch.where(usable[..., None], gamma, 0.0).to(dX.dtype)
    return torch.einsum("bwi,bwitd->bwtd", gamma, dX + dR)


@refuse_renamed("deadline")
@torch.inference_mode()
@float32_state
def taa_sample(
    denoiser: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    window: int = 16,
    tolerance: float = 0.1,
    max_iterations: int | None = None,
    condition: torch.Tensor | None = None,
    inpaint: Inpaint | None = None,
    init: torch.Tensor | None = None,
    init_rows: torch.Tensor | None = None,
    per_sample_windows: bool = True,
    deadline_at: float | None = None,
    linear_solve: bool = False,
    secant: bool = False,
    memory: int = 3,
    ridge: float = 1e-3,
    round_shape: str = "compact",
    compile_round: bool = False,
) -> tuple[torch.Tensor, SampleStats]:
    """Picard sampling with triangular Anderson acceleration; tolerance 0 reproduces the sequential sample.

    Arguments and stats are :func:`para_policy.samplers.picard_sample`'s (same window,
    tolerance, convergence test, per-sample windows, ``init`` / ``init_rows`` warm start,
    ``linear_solve``, ``secant``, ``deadline_at``, ``round_shape`` and ``compile_round``), plus:

    Args:
        memory: how many past iterate differences each slot mixes (2–5 are sensible;
            1 is a secant step). A slot that entered the window ``h`` rounds ago uses
            ``min(memory, h − 1)`` of them, so newly entered slots take plain Picard steps.
        ridge: Tikhonov term on the weighted Gram matrices. It keeps the fit stable
            when the differences are nearly dependent, and makes γ → 0 (plain Picard)
            once they are much smaller than the tolerance. 0 disables it (a singular
            system then falls back to a plain Picard step for that slot).
    Returns:
        ``(sample (B, T, D), stats)``; ``stats.rounds`` never exceeds S; ``stats.deadline_hit``.
    """
    check_taa_options(memory, ridge)
    if x_T.dim() != 3:
        raise ValueError(f"x_T must have shape (B, T, D), got {tuple(x_T.shape)}")
    anderson = TriangularAnderson(schedule.to(x_T.device), tuple(x_T.shape), memory, ridge, x_T.device, x_T.dtype)
    return picard_sample(denoiser, schedule, x_T, noise, window=window, tolerance=tolerance,
                         max_iterations=max_iterations, condition=condition, inpaint=inpaint, init=init,
                         init_rows=init_rows,
                         per_sample_windows=per_sample_windows, deadline_at=deadline_at, accelerator=anderson,
                         linear_solve=linear_solve, secant=secant, round_shape=round_shape,
                         compile_round=compile_round)
