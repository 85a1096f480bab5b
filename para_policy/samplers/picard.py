"""Picard iteration over a sliding window of denoising steps (ParaDiGMS; ParaDDPM / ParaDDIM).

The sequential loop is the recursion ``x_{k+1} = f_k(x_k) + s_k`` over steps
``k = 0 … S-1``, with ``f_k`` the scheduler's step mean (one model call) and
``s_k = noise_std[k] · z_k`` noise fixed in advance. Written as sums,

    x_{k+1} = x_b + Σ_{j=b}^{k} (f_j(x_j) + s_j − x_j)

for any fixed ``x_b``. Picard iteration guesses all ``x_j`` in a window, evaluates every
``f_j`` in one batched model call, and recomputes the window (a *solve*,
:mod:`para_policy.samplers.solves`). The first point after ``x_b`` is exact after one round,
so the window always advances; points whose change in a round is within ``tolerance``
(measured in units of that step's noise scale) count as converged and the window slides past
them. Each batch element keeps its own window (``per_sample_windows=True``): an easy sample
finishes and drops out of the batched call instead of waiting for the hardest.

Layout: :class:`RoundSetup` holds what one call fixes (denoiser, schedule tensors, options),
:class:`WindowState` the device tensors a round updates in place, :func:`picard_round` is one
round (window geometry, one model call, the solve, the convergence test, the slide) and
:func:`picard_sample` the host loop around it: :func:`make_round_setup` and
:func:`initial_window_state` build the two, :func:`run_rounds` runs the rounds (the CUDA-graph
sampler, :mod:`.captured`, calls the same three). A round reads nothing back to the host and
copies nothing to the device; the loop reads each sample's window start once per round
(the stop test, and in the compacting shape the row count of the next call).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from para_policy.samplers.common import (
    Denoiser,
    Inpaint,
    SampleStats,
    apply_inpaint,
    check_deadline,
    check_inputs,
    check_options,
    float32_state,
    impose,
    known_mask,
    refuse_renamed,
)
from para_policy.samplers.sequential import sequential_sample
from para_policy.samplers.solves import (
    KeepFactors,
    SecantMemory,
    keep_factors,
    linear_recurrence,
    matrix_recurrence,
    prefix_sum,
    secant_slopes,
)
from para_policy.schedule import Schedule

ROUND_SHAPES = ("compact", "fixed")


class Accelerator(Protocol):
    """A per-round hook of :func:`picard_sample` (e.g. Anderson acceleration).

    ``step(round () long tensor, k (B,W), valid (B,W), new (B,W,T,D), old (B,W,T,D), own_lead (B,))``
    returns the values to store for the window; slots up to ``own_lead`` must keep
    ``new`` (exact given the converged prefix), so the window still advances every round.
    Device tensors only, no host reads: it runs inside the round.
    """

    def step(self, rnd: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, new: torch.Tensor, old: torch.Tensor,
             plain_upto: torch.Tensor) -> torch.Tensor: ...


@dataclass
class RoundSetup:
    """What one sampling call fixes for all its rounds (device tensors, built once).

    ``scaled_noise`` (B, S, T, D) is ``σ_k z_k``; ``lin`` (S,) the linear solve's ``a_k``
    (None: ParaDiGMS's prefix sums); ``threshold`` (S,) ``tolerance² · σ_k²``; ``jac`` (S, N, N)
    or None; ``known`` (B, 1, T, D) the inpaint entries left out of the test, ``free_count``
    (B, 1) their complement's size; ``keep`` a soft mask's factors; ``secant`` the slope memory.
    ``offsets`` (W,), ``batch`` (B,) and ``grid_b``/``grid_w`` (B·W,) are index constants.
    ``x0_memory`` (B, S + 1, T, D): on a multistep schedule (DPM-Solver++ of order m > 1), each
    step's latest clean-sample prediction, which later steps read (slot S: scratch); else None.
    """

    denoiser: Denoiser
    schedule: Schedule
    window: int
    scaled_noise: torch.Tensor
    threshold: torch.Tensor
    lin: torch.Tensor | None
    jac: torch.Tensor | None
    condition: torch.Tensor | None
    inpaint: Inpaint | None
    known: torch.Tensor | None
    free_count: torch.Tensor | None
    keep: KeepFactors | None
    secant: SecantMemory | None
    accelerator: Accelerator | None
    per_sample_windows: bool
    offsets: torch.Tensor
    batch: torch.Tensor
    grid_b: torch.Tensor
    grid_w: torch.Tensor
    x0_memory: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return self.schedule.num_steps


@dataclass
class WindowState:
    """The device tensors a round updates in place.

    ``traj`` (B, S + 2, T, D): ``x_0 … x_S`` and a scratch slot ``S + 1`` that slots past
    the end write to; ``begin`` (B,): ``x_begin`` is final; ``filled`` (B,): the last index
    holding a computed value (cold start: later slots read as that value); ``done_round``
    (B,): the round each sample finished in; ``round`` (): rounds run so far.
    """

    traj: torch.Tensor
    begin: torch.Tensor
    filled: torch.Tensor
    done_round: torch.Tensor
    round: torch.Tensor


@dataclass
class RoundRows:
    """The rows one round evaluated: sample ``b``, slot ``w``, step ``k`` (R,), input and output (R, T, D)."""

    b: torch.Tensor
    w: torch.Tensor
    k: torch.Tensor
    x_in: torch.Tensor
    output: torch.Tensor


def _scatter(setup: RoundSetup, b: torch.Tensor, w: torch.Tensor, values: torch.Tensor,
             valid_rows: torch.Tensor | None) -> torch.Tensor:
    """Row values (R, ...) placed at their window slots, ``(B, W, ...)``; 0 at slots without a valid row."""
    if valid_rows is not None:
        values = torch.where(valid_rows.view(-1, *([1] * (values.dim() - 1))), values, 0.0)
    out = values.new_zeros((setup.batch.shape[0], setup.window, *values.shape[1:]))
    return out.index_put((b, w), values)


def _linear_solve(setup: RoundSetup, b: torch.Tensor, w: torch.Tensor, k_rows: torch.Tensor,
                  slot_rows: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, valid_rows: torch.Tensor | None,
                  x_rows: torch.Tensor, mean: torch.Tensor, noise_rows: torch.Tensor, base: torch.Tensor
                  ) -> torch.Tensor:
    """The window's new iterate with each step's linear part solved exactly (``linear_solve``).

    Step k is ``x_{k+1} = a_k x_k + g_k(x_k) + σ_k z_k``; with ``g_k`` held at this round's
    value (minus the secant's ``μ_k x`` and the fixed Jacobian's ``J_k x``, which move into the
    solve) the window is a linear recurrence (:func:`linear_recurrence`,
    :func:`matrix_recurrence`). Slots past the end carry ``x`` unchanged (coefficient 1, no drive).
    """
    lin, keep = setup.lin, setup.keep
    keep_rows = 1.0 if keep is None else keep.factors[b]
    g = mean - lin[k_rows].view(-1, 1, 1) * keep_rows * x_rows
    if setup.jac is not None:  # what the fixed linearization leaves over
        g = g - (setup.jac[k_rows] @ x_rows.flatten(1)[..., None]).view_as(g)
    coeff = torch.where(valid, lin[k], 1.0)  # (B, W)
    if setup.secant is not None:
        low, high = (0.0, 1.0 - lin[k_rows]) if setup.jac is None else (-0.5, 0.5)
        known_rows = None if setup.known is None else setup.known[b, 0]
        mu = secant_slopes(setup.secant, b, slot_rows, x_rows, g, known_rows, low, high)
        g = g - mu.view(-1, 1, 1) * keep_rows * x_rows
        coeff = coeff + _scatter(setup, b, w, mu, valid_rows)
    drive = _scatter(setup, b, w, g + noise_rows, valid_rows)
    if setup.jac is None:
        return linear_recurrence(coeff, base, drive, keep)
    eye = torch.eye(setup.jac.shape[-1], device=coeff.device, dtype=coeff.dtype)
    mats = coeff[..., None, None] * eye + setup.jac[k] * valid[..., None, None]
    return matrix_recurrence(mats, base, drive)


def _step_means(setup: RoundSetup, b: torch.Tensor, k_rows: torch.Tensor, slot_rows: torch.Tensor,
                x_in: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``(R, T, D)`` each row's step without noise, ``f_k = a_k x_k + Σ_j b_{k,j} x0(x_{k−j})``.

    One-step schedules (DDPM, DDIM): :meth:`Schedule.step_mean`. Multistep ones (DPM-Solver++,
    m > 1): this round's predictions are recorded first, so a row reads its window's earlier
    slots as evaluated now and the steps before the window as last evaluated (final there: the
    window only slides past converged points), which keeps tolerance 0 exact.
    """
    sched = setup.schedule
    if setup.x0_memory is None:
        return sched.step_mean(x_in, k_rows, output)
    memory = setup.x0_memory
    memory[b, slot_rows] = sched.predict_x0(x_in, k_rows, output)
    x0s = torch.stack([memory[b, (k_rows - j).clamp(min=0)] for j in range(sched.order)], dim=1)  # (R, m, T, D)
    return sched.step_from_x0(x_in, k_rows, x0s)


def _converged_lead(setup: RoundSetup, k: torch.Tensor, valid: torch.Tensor, new: torch.Tensor,
                    old: torch.Tensor) -> torch.Tensor:
    """``(B,)`` each window's leading converged slots: mean squared change within ``tolerance² σ_k²``.

    Slot 0 always counts (``x_{b+1}`` from the final ``x_b`` is exact), slots past the end too.
    Known inpaint entries are re-imposed before they are read, so only the others must settle.
    """
    change = (new - old).pow(2)
    if setup.known is None:
        error = change.mean(dim=(-1, -2))  # (B, W)
    else:
        error = change.masked_fill(setup.known, 0.0).sum(dim=(-1, -2)) / setup.free_count
    converged = (error <= setup.threshold[k]) | ~valid
    converged[:, 0] = True
    return converged.to(torch.long).cumprod(dim=1).sum(dim=1)


def _slide(setup: RoundSetup, state: WindowState, own_lead: torch.Tensor) -> None:
    """Move each unfinished window past its converged slots (in place)."""
    S = setup.steps
    begin = state.begin
    active = begin < S
    if setup.per_sample_windows:
        lead = own_lead
    else:  # the batch waits for its slowest sample
        lead = torch.where(active, own_lead, setup.window).amin().expand_as(own_lead)
    new_begin = torch.where(active, (begin + lead).clamp(max=S), begin)
    state.filled.copy_(torch.where(active, torch.maximum(state.filled, (begin + setup.window).clamp(max=S)),
                                   state.filled))
    state.done_round.copy_(torch.where(active & (new_begin == S), state.round, state.done_round))
    begin.copy_(new_begin)


def picard_round(setup: RoundSetup, state: WindowState, rows: int | None = None) -> RoundRows:
    """One Picard round, in place on ``state``: one batched model call, the solve, the test, the slide.

    ``rows``: the number of window slots inside the trajectory, known to the host from the
    last stop test (the compacting shape evaluates just those); None evaluates all ``B·W``
    slots (the fixed shape: invalid slots compute on a clamped step and are masked, their
    writes go to scratch slots).
    No host reads and no host-to-device copies, so the fixed shape compiles with
    ``torch.compile(fullgraph=True)`` and can be captured as one CUDA graph.
    """
    S, W, sched = setup.steps, setup.window, setup.schedule
    state.round.add_(1)
    k = state.begin[:, None] + setup.offsets  # (B, W) step indices
    valid = k < S
    k = k.clamp(max=S - 1)
    slot = torch.where(valid, k, S)  # where a slot's step-keyed state lives (S: scratch)
    if rows is None:
        b, w, valid_rows = setup.grid_b, setup.grid_w, valid.flatten()
    else:
        flat = torch.nonzero_static(valid.flatten(), size=rows)[:, 0]
        b, w, valid_rows = flat.div(W, rounding_mode="floor"), flat.remainder(W), None
    k_rows, slot_rows = k[b, w], slot[b, w]
    filled = state.filled[:, None]
    x_rows = state.traj[b, torch.minimum(k, filled)[b, w]]  # (R, T, D)
    x_in = x_rows
    if setup.inpaint is not None:
        data, mask = setup.inpaint
        x_in = impose(x_rows, data[b, k_rows] if data.dim() == 4 else data[b], mask[b])
    output = setup.denoiser(x_in, sched.timesteps[k_rows], None if setup.condition is None else setup.condition[b])
    base = state.traj[setup.batch, state.begin]  # (B, T, D)
    old = state.traj[setup.batch[:, None], torch.minimum(k + 1, filled)]  # (B, W, T, D): the iterate
    mean = _step_means(setup, b, k_rows, slot_rows, x_in, output)
    noise_rows = setup.scaled_noise[b, k_rows]
    if setup.lin is None:
        new = prefix_sum(base, _scatter(setup, b, w, mean + noise_rows - x_rows, valid_rows))
    else:
        new = _linear_solve(setup, b, w, k_rows, slot_rows, k, valid, valid_rows, x_rows, mean, noise_rows, base)
    own_lead = _converged_lead(setup, k, valid, new, old)
    if setup.accelerator is not None:
        new = setup.accelerator.step(state.round, k, valid, new, old, own_lead)
    state.traj[b, slot_rows + 1] = new[b, w]
    _slide(setup, state, own_lead)
    return RoundRows(b, w, k_rows, x_in, output)


_compiled_rounds: dict[str, Callable[..., RoundRows]] = {}


def compiled_round(backend: str = "inductor") -> Callable[..., RoundRows]:
    """:func:`picard_round` through ``torch.compile(fullgraph=True)``, built once per process and backend.

    ``fullgraph=True`` makes a graph break an error: on a GPU a break is a host sync or a
    Python branch on tensor data, so a round that compiles whole is one that can be captured.
    ``backend='eager'`` checks exactly that (dynamo traces the whole round) without generating code.
    """
    if backend not in _compiled_rounds:
        _compiled_rounds[backend] = torch.compile(picard_round, fullgraph=True, dynamic=False, backend=backend)
    return _compiled_rounds[backend]


def make_round_setup(denoiser: Denoiser, schedule: Schedule, x_T: torch.Tensor, noise: torch.Tensor, window: int,
                     tolerance: float, condition: torch.Tensor | None, inpaint: Inpaint | None,
                     accelerator: Accelerator | None, per_sample_windows: bool, linear_solve: bool, secant: bool,
                     jacobian: torch.Tensor | None) -> RoundSetup:
    """Check the solve options and build a call's :class:`RoundSetup` (host reads allowed here).

    Shared by :func:`picard_sample` and the CUDA-graph sampler (:mod:`.captured`), which replays
    the same round. The solve options, each with the sequential loop's fixed point:

    * ``linear_solve``: solve each step's linear part ``a_k x_k`` exactly over the window and
      iterate only on the clean-sample prediction (:func:`~para_policy.samplers.solves.linear_recurrence`,
      whose docstring says why): far fewer rounds; errors stop later relative to the change,
      so use a smaller tolerance for the same deviation.
    * ``secant`` (with ``linear_solve``): also move a one-number slope of ``x0(x)`` per step into
      the solve (:func:`~para_policy.samplers.solves.secant_slopes`).
    * ``jacobian`` (with ``linear_solve``), ``(S, T·D, T·D)``: a fixed linearization ``J_k`` of each
      step's nonlinear part (e.g. :func:`~para_policy.samplers.jacobians.mean_step_jacobians`)
      solved as a matrix (:func:`~para_policy.samplers.solves.matrix_recurrence`); the secant then
      estimates what ``J_k`` leaves over (within ±0.5). Not with soft inpaint weights.

    ``inpaint`` ``(data, mask)`` (:data:`~para_policy.samplers.common.Inpaint`): known entries are
    re-imposed (soft weights: pulled) before every model call, a row at step ``k`` with step ``k``'s
    values of per-step data, and entries of weight 1 are left out of the convergence test (the
    model never reads them).
    """
    B, T, D = x_T.shape
    S = schedule.num_steps
    device, dtype = x_T.device, x_T.dtype
    if secant and not linear_solve:
        raise ValueError("secant=True needs linear_solve=True (it refines the linear solve's coefficient)")
    if jacobian is not None:
        if not linear_solve:
            raise ValueError("jacobian needs linear_solve=True (it linearizes the linear solve's nonlinear part)")
        if schedule.order > 1:
            raise ValueError("jacobian linearizes a one-step schedule; this one reads earlier steps' predictions "
                             f"(order {schedule.order})")
        if tuple(jacobian.shape) != (S, T * D, T * D):
            raise ValueError(f"jacobian must have shape (S, T*D, T*D) = {(S, T * D, T * D)}, "
                             f"got {tuple(jacobian.shape)}")
    sched = schedule.to(device)
    known = free_count = keep = None
    if inpaint is not None:
        mask = inpaint[1] if inpaint[1].dtype == torch.bool else inpaint[1].to(dtype)
        inpaint = (inpaint[0].to(dtype), mask)
        known = known_mask(mask)[:, None]  # (B, 1, T, D)
        free_count = (~known).sum(dim=(-1, -2)).clamp(min=1)  # (B, 1)
        if mask.dtype != torch.bool and bool(((mask > 0) & (mask < 1)).any()):
            if jacobian is not None:
                raise ValueError("jacobian cannot be combined with soft inpaint weights (0 < weight < 1); "
                                 "use a bool mask or leave jacobian out")
            keep = keep_factors(1.0 - mask, dtype) if linear_solve else None
    W = min(window, S)
    batch = torch.arange(B, device=device)
    return RoundSetup(
        denoiser=denoiser, schedule=sched, window=W,
        scaled_noise=noise * sched.noise_std.view(1, S, 1, 1).to(dtype),
        threshold=float(tolerance) ** 2 * sched.test_variance().to(torch.float32),
        lin=sched.linear_coeff().to(dtype) if linear_solve else None,
        jac=None if jacobian is None else jacobian.to(device=device, dtype=dtype),
        condition=condition, inpaint=inpaint, known=known, free_count=free_count, keep=keep,
        secant=SecantMemory.empty((B, T, D), S, device, dtype) if secant else None,
        accelerator=accelerator, per_sample_windows=per_sample_windows,
        offsets=torch.arange(W, device=device), batch=batch,
        grid_b=batch.repeat_interleave(W), grid_w=torch.arange(W, device=device).repeat(B),
        x0_memory=torch.zeros((B, S + 1, T, D), device=device, dtype=dtype) if schedule.order > 1 else None)


def initial_window_state(x_T: torch.Tensor, steps: int, init: torch.Tensor | None, init_rows: torch.Tensor | None
                         ) -> WindowState:
    """The trajectory before round 1: ``x_T``, and ``init`` (x_1 … x_S) for the samples that start warm.

    ``init`` ``(B, S, T, D)`` is a warm start's guess of the whole trajectory; ``init_rows`` ``(B,)``
    bool says which samples start from it (default: all). A cold sample starts as ``x_T`` alone,
    and every step entering its window starts from the last point computed before it
    (ParaDiGMS's cold start).
    """
    B, T, D = x_T.shape
    S = steps
    device = x_T.device
    if init is not None and tuple(init.shape) != (B, S, T, D):
        raise ValueError(f"init must have shape (B, S, T, D) = {(B, S, T, D)}, got {tuple(init.shape)}")
    if init is None and init_rows is not None:
        raise ValueError("init_rows needs init")
    if init_rows is not None and (tuple(init_rows.shape) != (B,) or init_rows.dtype != torch.bool):
        raise ValueError(f"init_rows must be a bool tensor of shape ({B},), got "
                         f"{init_rows.dtype} {tuple(init_rows.shape)}")
    traj = torch.zeros((B, S + 2, T, D), device=device, dtype=x_T.dtype)
    traj[:, 0] = x_T
    filled = torch.zeros(B, dtype=torch.long, device=device)
    if init is not None:
        traj[:, 1: S + 1] = init  # cold rows never read past their own computed points
        warm = torch.ones(B, dtype=torch.bool, device=device) if init_rows is None else init_rows.to(device)
        filled = torch.where(warm, S, filled)
    zeros = torch.zeros(B, dtype=torch.long, device=device)
    return WindowState(traj, zeros, filled, zeros.clone(), torch.zeros((), dtype=torch.long, device=device))


def _finish(setup: RoundSetup, state: WindowState, last: RoundRows | None, finished_all: bool) -> torch.Tensor:
    """``(B, T, D)`` the samples; an unfinished one (deadline, round cap) gets a clean estimate.

    The end of its iterate where that spans the whole trajectory (a warm start, or a window that
    reached the end), else the clean sample the last round predicted at its first unfinished step
    from that step's final input (every unfinished sample ran in the last round); clipped as the
    scheduler clips. Never a noisy iterate.
    """
    S, sched = setup.steps, setup.schedule
    final = state.traj[setup.batch, state.filled]
    if last is not None and not finished_all:
        first = (last.w == 0).nonzero(as_tuple=True)[0]  # after the rounds: a host read is fine
        x0_estimate = torch.zeros_like(final)
        x0_estimate[last.b[first]] = sched.predict_x0(last.x_in[first], last.k[first], last.output[first])
        estimate = torch.where((state.filled == S).view(-1, 1, 1), final, x0_estimate)
        if sched.clip_sample:
            estimate = estimate.clamp(-sched.clip_sample_range, sched.clip_sample_range)
        final = torch.where((state.begin == S).view(-1, 1, 1), final, estimate)
    return apply_inpaint(final, setup.inpaint, None)


@refuse_renamed("deadline")
@torch.inference_mode()
@float32_state
def picard_sample(
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
    accelerator: Accelerator | None = None,
    linear_solve: bool = False,
    secant: bool = False,
    jacobian: torch.Tensor | None = None,
    round_shape: str = "compact",
    compile_round: bool = False,
) -> tuple[torch.Tensor, SampleStats]:
    """Sample with Picard iterations; tolerance 0 reproduces :func:`sequential_sample`.

    Args:
        denoiser: ``(x (N,T,D), t (N,), condition (N,...) | None) -> (N,T,D)``; called
            once per round on the rows of all active windows.
        schedule: from :func:`para_policy.schedule.make_schedule` (DDPM → ParaDDPM, DDIM → ParaDDIM).
        x_T: ``(B, T, D)`` initial noise.
        noise: ``(B, S, T, D)`` standard normal per-step noise, in the sequential loop's
            order (``draw_noise``); optional for deterministic schedules.
        window: steps refined per round for each sample (clipped to S). Window 1 is the
            sequential loop, and runs as :func:`sequential_sample` (without a deadline).
        tolerance: a point is converged when its mean squared change in a round is at
            most ``tolerance² · σ_k²`` (σ_k² the DDPM posterior variance of the step that
            produced it; :meth:`Schedule.test_variance`). 0 means exact.
        max_iterations: cap on rounds; the default S always finishes, so the result is the
            sequential one up to the tolerance. With a smaller cap (or a deadline) a sample that
            did not finish returns a clean estimate, never a noisy iterate (:func:`_finish` says
            which); ``stats.converged`` says which samples finished.
        condition: ``(B, ...)`` per-sample conditioning, gathered to rows for the denoiser.
        inpaint: ``(data, mask)`` known entries, re-imposed before every model call and on the
            result (:func:`make_round_setup`).
        init, init_rows: ``(B, S, T, D)`` initial guess of ``x_1 … x_S`` (a warm start) and ``(B,)``
            bool, which samples start from it (default all); see :func:`initial_window_state`.
        per_sample_windows: each sample's window slides on its own errors; ``False``
            makes the batch wait for its slowest sample (ParaDiGMS as published).
        deadline_at: a ``time.perf_counter()`` instant; no new round starts after it (the first
            round always runs), unfinished samples return as under ``max_iterations``, and
            ``stats.deadline_hit`` says so.
        accelerator: a per-round hook (:class:`Accelerator`), e.g. ParaTAA's.
        linear_solve, secant, jacobian: how a round solves its window; the same fixed point in
            far fewer rounds (:func:`make_round_setup` says what each does).
        round_shape: ``'compact'`` or ``'fixed'`` rows per round, the same result
            (:func:`run_rounds`); ``compile_round`` runs the round through
            ``torch.compile(fullgraph=True)`` (``'fixed'`` only), once per process and shapes.
    Returns:
        ``(sample (B, T, D), stats)``; ``stats.rounds`` never exceeds S; ``stats.deadline_hit``;
        ``stats.rows_per_round`` (the denoiser's batch size in each round, what a round costs:
        see :func:`para_policy.window.predict_latency`).
    """
    noise = check_inputs(schedule, x_T, noise, condition, inpaint)
    max_iterations = check_options(schedule, window, tolerance, max_iterations)
    _check_round_shape(round_shape, compile_round)
    B = x_T.shape[0]
    S = schedule.num_steps
    if min(window, S) == 1 and max_iterations >= S and deadline_at is None and accelerator is None:
        # a window of one step is the sequential recursion (each round computes the next step from a
        # final point, so no guess is ever read): run the loop itself, without Picard's bookkeeping
        sample, stats = sequential_sample(denoiser, schedule, x_T, noise, condition=condition, inpaint=inpaint)
        stats.rows_per_round = [B] * S
        return sample, stats
    setup = make_round_setup(denoiser, schedule, x_T, noise, window, tolerance, condition, inpaint, accelerator,
                             per_sample_windows, linear_solve, secant, jacobian)
    state = initial_window_state(x_T, S, None if init is None else init.to(x_T.dtype), init_rows)
    step = compiled_round() if compile_round else picard_round
    return run_rounds(setup, state, step, round_shape == "fixed", max_iterations, deadline_at)


def _check_round_shape(round_shape: str, compile_round: bool) -> None:
    """``round_shape`` must be resolved ('auto' is the policy's to resolve); compiling needs fixed shapes."""
    if round_shape not in ROUND_SHAPES:
        raise ValueError(f"round_shape must be one of {list(ROUND_SHAPES)}, got {round_shape!r} ('auto' is "
                         "resolved with window='auto' by the policy, para_policy.window.tuned_spec)")
    if compile_round and round_shape != "fixed":
        raise ValueError("compile_round=True needs round_shape='fixed' (the compacting round's row count "
                         "changes every round)")


def run_rounds(setup: RoundSetup, state: WindowState, step: Callable[..., RoundRows], fixed: bool,
               max_iterations: int, deadline_at: float | None) -> tuple[torch.Tensor, SampleStats]:
    """The host loop: rounds until every window reached the end (or the cap, or the deadline).

    ``step(setup, state, rows)`` runs one round: :func:`picard_round`, its compiled form, or a
    replayed CUDA graph (:mod:`.captured`). ``fixed``: every round evaluates all ``B·W`` window
    slots, finished ones masked (``round_shape='fixed'``: shapes fixed per (B, W), so the round
    compiles whole and can be captured as one graph); otherwise only the slots inside the
    trajectory (``'compact'``: fewer rows as samples finish, cheaper where rows cost compute).
    The one host read per round is each sample's window start: the stop test, and the
    compacting round's next row count.
    """
    deadline_at = check_deadline(deadline_at)  # NaN or inf would never stop the loop
    B, S, W = state.begin.shape[0], setup.steps, setup.window
    rounds = model_evals = 0
    rows_per_round: list[int] = []
    deadline_hit = False
    last: RoundRows | None = None
    begins = [0] * B  # every window starts at step 0
    while rounds < max_iterations and any(start < S for start in begins):
        if deadline_at is not None and rounds > 0 and time.perf_counter() >= deadline_at:  # one round always runs
            deadline_hit = True
            break
        rounds += 1
        rows = B * W if fixed else sum(min(W, S - start) for start in begins if start < S)
        last = step(setup, state, None if fixed else rows)
        model_evals += rows
        rows_per_round.append(rows)
        begins = state.begin.tolist()  # the round's one host read: the stop test and the next row count
    finished = state.begin == S
    final = _finish(setup, state, last, all(start == S for start in begins))
    return final, SampleStats(
        rounds=rounds, model_evals=model_evals, converged=finished.cpu(),
        rounds_per_sample=torch.where(finished, state.done_round, rounds).cpu(),
        deadline_hit=deadline_hit, rows_per_round=rows_per_round)


def exact_from(denoiser: Denoiser | None, schedule: Schedule, x_T: torch.Tensor, noise: torch.Tensor,
               condition: torch.Tensor | None, inpaint: Inpaint | None, traj: torch.Tensor, exact: bool
               ) -> tuple[torch.Tensor, SampleStats]:
    """An approximate sampler's result: its last state, or, ``exact``, the sequential loop's answer reached by
    Picard iteration at tolerance 0 (window S) from its trajectory ``traj`` (B, S, T, D) as the warm start.

    Why one function: the samplers that approximate the network (asyncdiff, patches) offer the
    same exact mode. Returns ``(sample (B, T, D), the refinement's stats)`` (zero rounds when not ``exact``).
    """
    if exact:
        return picard_sample(denoiser, schedule, x_T, noise, window=schedule.num_steps, tolerance=0.0,
                             condition=condition, inpaint=inpaint, init=traj)
    B = x_T.shape[0]
    return apply_inpaint(traj[:, -1], inpaint, None), SampleStats(
        rounds=0, model_evals=0, converged=torch.ones(B, dtype=torch.bool),
        rounds_per_sample=torch.zeros(B, dtype=torch.long))
