"""Picard iteration over a sliding window of denoising steps (ParaDiGMS; ParaDDPM / ParaDDIM).

The sequential loop is the recursion ``x_{k+1} = f_k(x_k) + s_k`` over steps
``k = 0 … S-1``, with ``f_k`` the scheduler's step mean (one model call) and
``s_k = noise_std[k] · z_k`` noise fixed in advance. Written as sums,

    x_{k+1} = x_b + Σ_{j=b}^{k} (f_j(x_j) + s_j − x_j)

for any fixed ``x_b``. Picard iteration guesses all ``x_j`` in a window, evaluates every
``f_j`` in one batched model call, and recomputes the window with prefix sums. The first
point after ``x_b`` is exact after one round, so the window always advances; points whose
change in a round is within ``tolerance`` (measured in units of that step's noise scale)
count as converged and the window slides past them.

Each batch element keeps its own window (``per_sample_windows=True``): an easy sample
finishes and drops out of the batched call instead of waiting for the hardest.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Protocol

import torch

from para_policy.samplers.common import (
    Denoiser,
    Inpaint,
    SampleStats,
    apply_inpaint,
    check_inputs,
    check_options,
    impose,
    known_mask,
)
from para_policy.samplers.sequential import sequential_sample
from para_policy.schedule import Schedule


class Accelerator(Protocol):
    """A per-round hook of :func:`picard_sample` (e.g. Anderson acceleration).

    ``step(round, k (B,W), valid (B,W), new (B,W,T,D), old (B,W,T,D), own_lead (B,))``
    returns the values to store for the window; slots up to ``own_lead`` must keep
    ``new`` (exact given the converged prefix), so the window still advances every round.
    """

    def step(self, rnd: int, k: torch.Tensor, valid: torch.Tensor, new: torch.Tensor, old: torch.Tensor,
             plain_upto: torch.Tensor) -> torch.Tensor: ...


class KeepFactors(NamedTuple):
    """Per-entry factors of the linear solve's coefficients, with their distinct values found once per call.

    ``factors`` (B, T, D): the part of an entry a soft inpaint mask leaves to the iterate
    (``1 - weight``); ``levels``: each distinct factor and the (B, 1, T, D) indicator of where it stands.
    """

    factors: torch.Tensor
    levels: list[tuple[float, torch.Tensor]]


def keep_factors(factors: torch.Tensor, dtype: torch.dtype) -> KeepFactors:
    """:class:`KeepFactors` for ``factors`` (B, T, D) (one host sync, outside the rounds)."""
    return KeepFactors(factors, [(value, (factors == value).to(dtype)[:, None])
                                 for value in torch.unique(factors).tolist()])


def linear_recurrence(a: torch.Tensor, x0: torch.Tensor, g: torch.Tensor,
                      keep: KeepFactors | None = None) -> torch.Tensor:
    """All of ``x_{w+1} = a_w · keep · x_w + g_w`` for w = 0 … W−1 at once, from ``x_0``.

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
    g = g.clone()
    if keep is None:
        g[:, 0] = g[:, 0] + a[:, 0].view(B, 1, 1) * x0
        return torch.einsum("bwj,bjtd->bwtd", prods, g)
    g[:, 0] = g[:, 0] + a[:, 0].view(B, 1, 1) * keep.factors * x0
    steps = torch.arange(W, device=a.device)
    gap = (steps[:, None] - steps[None, :]).clamp(min=0).to(a.dtype)  # [w, j] = w - j
    out = torch.zeros_like(g)
    for value, share in keep.levels:
        out += torch.einsum("bwj,bjtd->bwtd", prods * torch.pow(value, gap), g * share)
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
    out = torch.empty_like(drive)
    for w in range(W):
        x = torch.baddbmm(drive[:, w], m[:, w], x)
        out[:, w] = x
    return out.view_as(g)


@torch.inference_mode()
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
    deadline: float | None = None,
    accelerator: Accelerator | None = None,
    linear_solve: bool = False,
    secant: bool = False,
    jacobian: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Sample with Picard iterations; tolerance 0 reproduces :func:`sequential_sample`.

    Args:
        denoiser: ``(x (N,T,D), t (N,), condition (N,...) | None) -> (N,T,D)``; called
            once per round on the rows of all active windows.
        schedule: from :func:`para_policy.schedule.make_schedule` (DDPM → ParaDDPM,
            DDIM → ParaDDIM).
        x_T: ``(B, T, D)`` initial noise.
        noise: ``(B, S, T, D)`` standard normal per-step noise, in the sequential loop's
            order (``draw_noise``); optional for deterministic schedules.
        window: steps refined per round for each sample (clipped to S). Window 1 is the
            sequential loop, and runs as :func:`sequential_sample` (without a deadline).
        tolerance: a point is converged when its mean squared change in a round is at
            most ``tolerance² · σ_k²`` (σ_k² the DDPM posterior variance of the step that
            produced it; :meth:`Schedule.test_variance`). 0 means exact.
        max_iterations: cap on rounds; the default S always finishes, so the result is
            the sequential one up to the tolerance. With a smaller cap (or a deadline) a
            sample that did not finish returns a clean estimate, never a noisy iterate: the
            end of its iterate where that spans the whole trajectory (a warm start, or a
            window that reached the last step), else the clean sample predicted at its first
            non-final step from that step's final input (what the sequential loop would
            predict there); clipped as the scheduler clips. ``stats.converged`` says which
            samples finished.
        condition: ``(B, ...)`` per-sample conditioning, gathered to rows for the denoiser.
        inpaint: ``(data, mask)`` (:data:`~para_policy.samplers.common.Inpaint`): known
            entries re-imposed (soft weights: pulled) before every model call, a row at step
            ``k`` with step ``k``'s values of per-step data, and the known ones on the result.
            Entries of weight 1 are left out of the convergence test (the model never reads them).
        init: ``(B, S, T, D)`` initial guess of ``x_1 … x_S`` (a warm start). Without it,
            the trajectory starts as ``x_T`` and every step entering the window starts
            from the last point computed before it (ParaDiGMS's cold start).
        init_rows: ``(B,)`` bool, which samples start from ``init``; the others start
            cold (e.g. the first chunk of an episode in a batch of warm-started envs).
            Default: all of them.
        per_sample_windows: each sample's window slides on its own errors; ``False``
            makes the batch wait for its slowest sample (ParaDiGMS as published).
        deadline: a ``time.perf_counter()`` instant; no new round starts after it (the
            first round always runs), and unfinished samples return their clean-sample
            estimate (see ``max_iterations``); ``stats.extra['deadline_hit']`` says so.
        linear_solve: iterate on the predicted clean sample only. Each step is
            ``x_{k+1} = a_k x_k + c_k x0(x_k) + σ_k z_k`` (``a_k`` from
            :meth:`Schedule.linear_coeff`); ParaDiGMS's sums treat the whole step as
            unknown, so an error in ``x_j`` reaches every later step undamped, and near the
            end of sampling, where ``a_k`` is far from 1, the window advances about one
            step per round. Solving the linear part exactly over the window
            (:func:`linear_recurrence`) leaves only ``x0(x)`` to iterate on, which a trained
            denoiser makes nearly independent of small changes of ``x``. Same fixed point
            (tolerance 0 still gives the sequential sample), far fewer rounds; errors stop
            later relative to the change, so use a smaller tolerance for the same deviation
            (``eval/bench_latency.py``).
        secant: with ``linear_solve``, also move the part of ``c_k x0(x)`` that changes
            with ``x`` into the linear solve: per step, the slope ``μ_k`` of the
            nonlinear part along its last change (``<Δg, Δx> / <Δx, Δx>`` between the
            step's last two model inputs, a one-number secant (Barzilai–Borwein) estimate of
            its Jacobian) makes the solved coefficient ``a_k + μ_k``, kept within
            ``[a_k, 1]``: between the linear solve's (μ = 0) and the published sums'
            (coefficient 1), so the solved recurrence never amplifies.
            Near the end of sampling ``x0(x)`` follows ``x`` almost one to one, so without
            it a change of ``x_k`` reaches ``x_{k+1}`` only a round later and the window
            crawls one step per round; with it the change goes through in the same round.
            Same fixed point for any ``μ`` (tolerance 0 is still exact); steps entering
            the window with no history use ``μ = 0``.
        jacobian: with ``linear_solve``, ``(S, T·D, T·D)``: a fixed linearization ``J_k`` of each
            step's nonlinear part ``g_k(x) = c_k x0(x)`` (e.g. its exact Jacobian averaged over
            calibration samples, :func:`~para_policy.samplers.jacobians.mean_step_jacobians`),
            moved into the solve as a matrix: ``x_{k+1} = (a_k + J_k) x_k + (g_k(x_k) − J_k x_k) +
            σ_k z_k``, solved over the window by :func:`matrix_recurrence`. The secant's
            one number then estimates the slope of what ``J_k`` leaves over (kept within ±0.5:
            it corrects ``J_k``, it does not replace it). Same fixed point for any ``J_k``
            (tolerance 0 is still exact). Not with soft inpaint weights.
        accelerator: a per-round hook (:class:`Accelerator`), e.g. ParaTAA's.
    Returns:
        ``(sample (B, T, D), stats)``; ``stats.rounds`` never exceeds S; ``stats.extra``
        has ``deadline_hit``, ``rows_per_round`` (the denoiser's batch size in each
        round, what a round costs: see :func:`para_policy.window.predict_latency`) and
        ``window_start_per_round`` (the first non-final step after each round, the
        slowest sample's: how the window slid).
    """
    noise = check_inputs(schedule, x_T, noise, condition, inpaint)
    max_iterations = check_options(schedule, window, tolerance, max_iterations)
    B, T, D = x_T.shape
    S = schedule.num_steps
    W = min(window, S)
    device = x_T.device
    if init is not None and tuple(init.shape) != (B, S, T, D):
        raise ValueError(f"init must have shape (B, S, T, D) = {(B, S, T, D)}, got {tuple(init.shape)}")
    sched = schedule.to(device)
    if W == 1 and max_iterations >= S and deadline is None and accelerator is None:
        # a window of one step is the sequential recursion (each round computes the next step from a
        # final point, so no guess is ever read): run the loop itself, without Picard's bookkeeping
        sample, stats = sequential_sample(denoiser, schedule, x_T, noise, condition=condition, inpaint=inpaint)
        stats.extra.update(deadline_hit=False, rows_per_round=[B] * S, window_start_per_round=list(range(1, S + 1)))
        return sample, stats

    # traj[:, j] is x_j, j = 0 … S; filled[b] is the last index holding a computed value
    # (cold start: later slots read as that value, so new window slots start from it).
    traj = torch.empty((B, S + 1, T, D), device=device, dtype=x_T.dtype)
    traj[:, 0] = x_T
    filled = torch.zeros(B, dtype=torch.long)
    if init is not None:
        traj[:, 1:] = init  # cold rows never read past their own computed points
        if init_rows is None:
            filled[:] = S
        else:
            if tuple(init_rows.shape) != (B,) or init_rows.dtype != torch.bool:
                raise ValueError(f"init_rows must be a bool tensor of shape ({B},), got "
                                 f"{init_rows.dtype} {tuple(init_rows.shape)}")
            filled[init_rows.cpu()] = S
    elif init_rows is not None:
        raise ValueError("init_rows needs init")
    scaled_noise = noise * sched.noise_std.view(1, S, 1, 1).to(noise.dtype)
    lin = sched.linear_coeff().to(x_T.dtype) if linear_solve else None  # (S,)
    threshold = float(tolerance) ** 2 * sched.test_variance().to(torch.float32)  # (S,)
    if secant:
        if lin is None:
            raise ValueError("secant=True needs linear_solve=True (it refines the linear solve's coefficient)")
        # each step's last model input and nonlinear part, for the secant slope
        seen_x = torch.zeros((B, S, T, D), device=device, dtype=x_T.dtype)
        seen_g = torch.zeros((B, S, T, D), device=device, dtype=x_T.dtype)
        seen = torch.zeros((B, S), dtype=torch.bool, device=device)
    jac = None
    if jacobian is not None:
        if lin is None:
            raise ValueError("jacobian needs linear_solve=True (it linearizes the linear solve's nonlinear part)")
        if tuple(jacobian.shape) != (S, T * D, T * D):
            raise ValueError(f"jacobian must have shape (S, T*D, T*D) = {(S, T * D, T * D)}, "
                             f"got {tuple(jacobian.shape)}")
        jac = jacobian.to(device=device, dtype=x_T.dtype)
        eye = torch.eye(T * D, device=device, dtype=x_T.dtype)
    begin = torch.zeros(B, dtype=torch.long)  # x[b, begin[b]] is final
    done_round = torch.zeros(B, dtype=torch.long)
    offsets = torch.arange(W)
    batch_index = torch.arange(B, device=device)[:, None].expand(B, W)
    drift = torch.empty((B, W, T, D), device=device, dtype=x_T.dtype)  # reused every round
    known = None if inpaint is None else known_mask(inpaint[1])[:, None]  # (B, 1, T, D), for the convergence test
    soft = inpaint is not None and inpaint[1].dtype != torch.bool and bool(((inpaint[1] > 0) & (inpaint[1] < 1)).any())
    keep = keep_factors((1.0 - inpaint[1]).to(x_T.dtype), x_T.dtype) if soft else None  # for the linear solve
    if soft and jac is not None:
        raise ValueError("jacobian cannot be combined with soft inpaint weights (0 < weight < 1); "
                         "use a bool mask or leave jacobian out")
    free_count = None if known is None else (~known).sum(dim=(-1, -2)).clamp(min=1)  # (B, 1)
    rounds = 0
    model_evals = 0
    rows_per_round: list[int] = []
    window_start_per_round: list[int] = []
    deadline_hit = False
    last_round: tuple | None = None  # the last round's rows, inputs and outputs, for an early stop's estimate
    while rounds < max_iterations and bool((begin < S).any()):
        if deadline is not None and rounds > 0 and time.perf_counter() >= deadline:  # one round always runs
            deadline_hit = True
            break
        rounds += 1
        k = begin[:, None] + offsets  # (B, W) step indices
        valid = k < S
        k = k.clamp(max=S - 1)
        read = torch.minimum(k, filled[:, None])
        read_next = torch.minimum(k + 1, filled[:, None])
        rows_b, rows_w = valid.nonzero(as_tuple=True)
        rows_k = k[rows_b, rows_w]
        # every host-to-device copy of the round before the model call: on a GPU a copy
        # queued behind the model's kernels would stall the host until they finish
        dev_b, dev_w, dev_k, k_dev = rows_b.to(device), rows_w.to(device), rows_k.to(device), k.to(device)
        valid_dev, read_next_dev = valid.to(device), read_next.to(device)
        base = traj[torch.arange(B, device=device), begin.to(device)]  # (B, T, D)
        old = traj[batch_index, read_next_dev]  # (B, W, T, D): the iterate before this round

        x_rows = traj[dev_b, read[rows_b, rows_w].to(device)]  # (R, T, D)
        x_in = x_rows
        if inpaint is not None:
            known_rows = inpaint[0][dev_b, dev_k] if inpaint[0].dim() == 4 else inpaint[0][dev_b]
            x_in = impose(x_rows, known_rows, inpaint[1][dev_b])
        cond_rows = None if condition is None else condition[dev_b]
        model_output = denoiser(x_in, sched.timesteps[dev_k], cond_rows)
        model_evals += int(rows_b.shape[0])
        rows_per_round.append(int(rows_b.shape[0]))
        last_round = (rows_b, rows_w, x_in, dev_k, model_output)

        drift.zero_()
        if lin is None:
            drift[dev_b, dev_w] = sched.step_mean(x_in, dev_k, model_output) + scaled_noise[dev_b, dev_k] - x_rows
            new = base[:, None] + drift.cumsum(dim=1)  # (B, W, T, D): x_{k+1} for each slot
        else:
            # x_{k+1} = a_k x_k + g_k(x_k) + σ_k z_k, g_k = c_k · x0(x_k) the nonlinear part
            # (soft inpaint weights w: x_k enters x_{k+1} as a_k (1 - w) x_k, solved exactly as well)
            keep_rows = 1.0 if keep is None else keep.factors[dev_b]
            g = sched.step_mean(x_in, dev_k, model_output) - lin[dev_k].view(-1, 1, 1) * keep_rows * x_rows
            if jac is not None:  # what the fixed linearization leaves over
                g = g - (jac[dev_k] @ x_rows.reshape(-1, T * D, 1)).view_as(g)
            coeff = torch.where(valid_dev, lin[k_dev], 1.0)  # (B, W)
            if secant:
                # g_k(x) ≈ g_k(x') + μ_k (x − x') along the step's last change: move μ_k x into
                # the linear solve (same fixed point for any μ_k)
                dx = x_rows - seen_x[dev_b, dev_k]
                dg = g - seen_g[dev_b, dev_k]
                if known is not None:  # known entries do not reach the model: slope of the others
                    dx = dx.masked_fill(known[dev_b, 0], 0.0)
                dx2 = dx.pow(2).sum(dim=(-1, -2))
                has_slope = seen[dev_b, dev_k] & (dx2 > 0)
                mu = torch.where(has_slope, (dg * dx).sum(dim=(-1, -2)) / dx2.clamp(min=1e-30), 0.0)
                if jac is None:
                    mu = torch.minimum(mu.clamp(min=0.0), 1.0 - lin[dev_k])  # solved coefficient within [a_k, 1]
                else:
                    mu = mu.clamp(-0.5, 0.5)
                seen_x[dev_b, dev_k], seen_g[dev_b, dev_k], seen[dev_b, dev_k] = x_rows, g, True
                g = g - mu.view(-1, 1, 1) * keep_rows * x_rows
                coeff = coeff.index_put((dev_b, dev_w), coeff[dev_b, dev_w] + mu)
            drift[dev_b, dev_w] = g + scaled_noise[dev_b, dev_k]
            if jac is None:
                new = linear_recurrence(coeff, base, drift, keep)
            else:  # slots past the end carry x unchanged (coefficient 1, no Jacobian, no drive)
                mats = coeff.view(B, W, 1, 1) * eye + jac[k_dev] * valid_dev.view(B, W, 1, 1)
                new = matrix_recurrence(mats, base, drift)
        change = (new - old).pow(2)
        if known is None:
            error = change.mean(dim=(-1, -2))  # (B, W)
        else:  # known entries are re-imposed before they are read: only the others must settle
            error = change.masked_fill(known, 0.0).sum(dim=(-1, -2)) / free_count
        converged = (error <= threshold[k_dev]).cpu()  # the round's one host sync

        converged |= ~valid
        converged[:, 0] = True  # x_{b+1} from the final x_b is exact
        own_lead = converged.to(torch.long).cumprod(dim=1).sum(dim=1)  # leading converged points
        if accelerator is not None:
            new = accelerator.step(rounds, k_dev, valid_dev, new, old, own_lead.to(device))
        traj[dev_b, dev_k + 1] = new[dev_b, dev_w]
        active = begin < S
        lead = own_lead if per_sample_windows else torch.full_like(own_lead, int(own_lead[active].min()))
        filled = torch.where(active, torch.maximum(filled, (begin + W).clamp(max=S)), filled)
        new_begin = torch.where(active, (begin + lead).clamp(max=S), begin)
        done_round = torch.where(active & (new_begin == S), rounds, done_round)
        begin = new_begin
        window_start_per_round.append(int(begin[active].min()) if bool(active.any()) else S)

    finished = begin == S
    final = traj[torch.arange(B, device=device), filled.to(device)]
    if last_round is not None and not bool(finished.all()):
        # an unfinished sample returns a clean estimate, never a noisy iterate: the end of its iterate
        # where that spans the whole trajectory (a warm start, or a window that reached the end), else
        # the clean sample the last round predicted at its first unfinished step from that step's final
        # input (every unfinished sample ran in the last round); clipped as the scheduler clips
        rows_b, rows_w, x_in, dev_k, model_output = last_round
        first = (rows_w == 0).nonzero(as_tuple=True)[0]  # host indices: no device sync
        x0_estimate = torch.zeros_like(final)
        f = first.to(device)
        x0_estimate[rows_b[first].to(device)] = sched.predict_x0(x_in[f], dev_k[f], model_output[f])
        estimate = torch.where((filled == S).to(device).view(B, 1, 1), final, x0_estimate)
        if sched.clip_sample:
            estimate = estimate.clamp(-sched.clip_sample_range, sched.clip_sample_range)
        final = torch.where(finished.to(device).view(B, 1, 1), final, estimate)
    final = apply_inpaint(final, inpaint, None)
    done_round = torch.where(finished, done_round, rounds)
    return final, SampleStats(
        rounds=rounds, model_evals=model_evals, converged=finished, rounds_per_sample=done_round,
        extra={"deadline_hit": deadline_hit, "rows_per_round": rows_per_round,
               "window_start_per_round": window_start_per_round},
    )
