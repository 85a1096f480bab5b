"""The solve strategies of a Picard round: how a window's new iterate is computed from one model call.

Every step of the sequential loop is ``x_{k+1} = f_k(x_k) + σ_k z_k``. A Picard round
evaluates ``f_k`` at the current guess of every step of a window in one batched model call;
a *solve* turns those values into the window's next guess ``x_{b+1} … x_{b+W}``, starting
from the window's final point ``x_b``. The strategies differ in how much of ``f_k`` they
treat as known:

* :func:`prefix_sum` (ParaDiGMS): nothing; ``x_{k+1} = x_b + Σ_{j ≤ k} (f_j(x_j) + σ_j z_j − x_j)``.
* :func:`linear_recurrence` (``linear_solve``): the step's linear part ``a_k x_k``, solved
  exactly over the window; only ``g_k(x) = f_k(x) − a_k x`` is iterated on.
* :func:`secant_slopes` (``secant``): also a one-number slope ``μ_k`` of ``g_k`` along its last
  change, moved into the solved coefficient ``a_k + μ_k``.
* :func:`matrix_recurrence` (``jacobian``): a fixed matrix ``J_k`` per step in the solve.

Every strategy has the sequential trajectory as its fixed point, so tolerance 0 stays exact.
All functions are shape-static and free of host reads, so a round built from them can be
compiled whole or captured as one CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def prefix_sum(base: torch.Tensor, drift: torch.Tensor) -> torch.Tensor:
    """ParaDiGMS's update ``x_{b+w+1} = x_b + Σ_{j=0}^{w} drift_j`` for every slot w of the window.

    Args:
        base: ``(B, T, D)`` the window's final point ``x_b``.
        drift: ``(B, W, T, D)`` ``f_k(x_k) + σ_k z_k − x_k`` per slot (0 past the trajectory's end).
    Returns:
        ``(B, W, T, D)``: the new guess of ``x_{b+1} … x_{b+W}``.
    """
    return base[:, None] + drift.cumsum(dim=1)


class KeepFactors(NamedTuple):
    """Per-entry factors of the linear solve's coefficients, with their distinct values found once per call.

    ``factors`` (B, T, D): the part of an entry a soft inpaint mask leaves to the iterate
    (``1 - weight``); ``levels``: each distinct factor and the (B, 1, T, D) indicator of where it stands.
    """

    factors: torch.Tensor
    levels: list[tuple[float, torch.Tensor]]


def keep_factors(factors: torch.Tensor, dtype: torch.dtype) -> KeepFactors:
    """:class:`KeepFactors` for ``factors`` (B, T, D) (one host read, before the rounds)."""
    return KeepFactors(factors, [(value, (factors == value).to(dtype)[:, None])
                                 for value in torch.unique(factors).tolist()])


def linear_recurrence(a: torch.Tensor, x0: torch.Tensor, g: torch.Tensor,
                      keep: KeepFactors | None = None) -> torch.Tensor:
    """All of ``x_{w+1} = a_w · keep · x_w + g_w`` for w = 0 … W−1 at once, from ``x_0``.

    Why (``linear_solve``): every step is ``x_{k+1} = a_k x_k + c_k x0(x_k) + σ_k z_k`` (``a_k``
    from :meth:`~para_policy.schedule.Schedule.linear_coeff`). ParaDiGMS's sums treat the whole
    step as unknown, so an error in ``x_j`` reaches every later step undamped, and near the end
    of sampling, where ``a_k`` is far from 1, the window advances about one step per round.
    Solving the linear part exactly over the window leaves only ``x0(x)`` to iterate on, which a
    trained denoiser makes nearly independent of small changes of ``x``.

    Args:
        a: ``(B, W)`` coefficients; x0: ``(B, T, D)``; g: ``(B, W, T, D)``;
        keep: per-entry factors of every coefficient (None: 1), :func:`keep_factors`.
    Returns:
        ``(B, W, T, D)``: ``x_1 … x_W``. Computed as ``Σ_j (Π_{i=j+1}^{w} a_i) keep^{w-j} g'_j``
        with a (B, W, W) matrix of partial products (no division, so a coefficient of 0 is
        fine), once per distinct value of ``keep``.
    """
    B, W = a.shape
    upper = torch.ones((B, W, W), dtype=a.dtype, device=a.device)
    mask = torch.triu(torch.ones((W, W), dtype=torch.bool, device=a.device), diagonal=1)
    upper = torch.where(mask, a[:, None, :].expand(B, W, W), upper)  # [j, i] = a_i for i > j
    prods = torch.tril(upper.cumprod(dim=2).transpose(1, 2))  # [w, j] = Π_{i=j+1}^{w} a_i, w ≥ j
    first = a[:, 0].view(B, 1, 1) * (x0 if keep is None else keep.factors * x0)
    g = torch.cat([(g[:, 0] + first)[:, None], g[:, 1:]], dim=1)
    if keep is None:
        return torch.einsum("bwj,bjtd->bwtd", prods, g)
    steps = torch.arange(W, device=a.device)
    gap = (steps[:, None] - steps[None, :]).clamp(min=0).to(a.dtype)  # [w, j] = w - j
    out = torch.zeros_like(g)
    for value, share in keep.levels:
        out = out + torch.einsum("bwj,bjtd->bwtd", prods * torch.pow(value, gap), g * share)
    return out


def matrix_recurrence(m: torch.Tensor, x0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """All of ``x_{w+1} = m_w x_w + g_w`` for w = 0 … W−1 from ``x_0``, with a matrix per step.

    Args:
        m: ``(B, W, N, N)`` with N = T·D (the flattened trajectory); x0: ``(B, T, D)``;
        g: ``(B, W, T, D)``.
    Returns:
        ``(B, W, T, D)``: ``x_1 … x_W``, by a scan of W batched matrix-vector products.
    """
    B, W = m.shape[:2]
    x = x0.reshape(B, -1, 1)
    drive = g.reshape(B, W, -1, 1)
    out = []
    for w in range(W):
        x = torch.baddbmm(drive[:, w], m[:, w], x)
        out.append(x)
    return torch.stack(out, dim=1).view_as(g)


class SecantMemory(NamedTuple):
    """Each step's last model input and nonlinear part, for :func:`secant_slopes`.

    ``x``, ``g``: ``(B, S + 1, T, D)``; ``seen``: ``(B, S + 1)`` whether step k has one.
    Index ``S`` is a scratch step that slots past the trajectory's end write to and nobody reads.
    """

    x: torch.Tensor
    g: torch.Tensor
    seen: torch.Tensor

    @classmethod
    def empty(cls, shape: tuple[int, int, int], steps: int, device: torch.device, dtype: torch.dtype
              ) -> SecantMemory:
        B, T, D = shape
        x = torch.zeros((B, steps + 1, T, D), device=device, dtype=dtype)
        return cls(x, torch.zeros_like(x), torch.zeros((B, steps + 1), dtype=torch.bool, device=device))


def secant_slopes(memory: SecantMemory, b: torch.Tensor, k: torch.Tensor, x: torch.Tensor, g: torch.Tensor,
                  known: torch.Tensor | None, low: torch.Tensor | float, high: torch.Tensor | float
                  ) -> torch.Tensor:
    """Per row, the slope ``μ_k = <Δg, Δx> / <Δx, Δx>`` of the nonlinear part along its last change.

    A one-number (Barzilai–Borwein) estimate of ``∂g_k/∂x`` between the step's last two model
    inputs, moved into the solve as ``x_{k+1} = (a_k + μ_k) x_k + (g_k(x_k) − μ_k x_k) + σ_k z_k``
    (same fixed point for any μ). Records this round's ``(x, g)`` in ``memory`` (in place).

    Why (``secant``): near the end of sampling ``x0(x)`` follows ``x`` almost one to one, so with
    ``x0`` held fixed a change of ``x_k`` reaches ``x_{k+1}`` only a round later and the window
    crawls one step per round; with the slope in the solve it goes through in the same round.
    Kept within ``[0, 1 − a_k]`` (the solved coefficient between the linear solve's and the
    published sums'), so the solved recurrence never amplifies; with a fixed Jacobian within
    ±0.5 (it corrects ``J_k``, it does not replace it). A step with no history uses μ = 0.

    Args:
        b, k: ``(R,)`` each row's sample and step (k = S for a row past the end: the scratch step).
        x, g: ``(R, T, D)`` the rows' model inputs before imposing and nonlinear parts.
        known: ``(R, T, D)`` bool entries the model never reads (left out of the slope), or None.
        low, high: bounds of μ (scalars or ``(R,)``); 0 where the step has no history yet.
    Returns:
        ``(R,)`` the slopes.
    """
    dx = x - memory.x[b, k]
    dg = g - memory.g[b, k]
    if known is not None:
        dx = dx.masked_fill(known, 0.0)
    dx2 = dx.pow(2).sum(dim=(-1, -2))
    has_slope = memory.seen[b, k] & (dx2 > 0)
    mu = torch.where(has_slope, (dg * dx).sum(dim=(-1, -2)) / dx2.clamp(min=1e-30), 0.0)
    memory.x[b, k] = x
    memory.g[b, k] = g
    memory.seen[b, k] = True
    return mu.clamp(min=low).clamp(max=high)
