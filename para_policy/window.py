"""Choosing the Picard window from what a batch costs on this machine.

A round of Picard sampling is one denoiser call on the rows of the window, so its cost
is the cost of a batch of that many rows. On a GPU a batch of 100 costs about as much
as a batch of 1 and the largest window wins; on a small CPU it does not (the shipped
PushT net on 2 cores: a batch of 16 costs about 2 single calls, a batch of 100 about
6). Wider windows need fewer rounds but each round costs more, so the best window is a
property of the machine and the model, not a constant.

Method: the **cost curve** ``c(n)`` (median ms of one denoiser call on ``n`` rows) is
measured once; each candidate window is run on a few calibration chunks, which gives
its rows per round (``stats.extra['rows_per_round']``, independent of the machine);
the predicted latency of a chunk is ``Σ_rounds c(rows)``, with ``c`` interpolated
linearly between measured batch sizes. The window with the lowest mean prediction wins.
:func:`tune_window` does all of it for a policy; ``sampler.window=auto`` in ``eval.py``
calls it before the rollouts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

DEFAULT_BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 100)


@torch.inference_mode()
def batch_cost_curve(
    denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    sample_shape: tuple[int, int],
    condition: torch.Tensor | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    *,
    num_train_timesteps: int = 100,
    reps: int = 15,
    warmup: int = 3,
    device: torch.device | str = "cpu",
) -> dict[int, float]:
    """Median wall-clock ms of one denoiser call per batch size: ``{n: ms}``.

    Args:
        denoiser: ``(x (n, T, D), t (n,), condition (n, ...) | None) -> (n, T, D)``.
        sample_shape: ``(T, D)`` of one trajectory.
        condition: ``(1, ...)`` conditioning of one sample, repeated to ``n`` rows.
        batch_sizes: the ``n`` to measure (each ≥ 1).
        reps, warmup: timed and untimed calls per batch size; batch sizes are timed
            interleaved (round-robin), so drifting machine load biases none of them.
    """
    sizes = sorted({int(n) for n in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch_sizes must be integers >= 1, got {list(batch_sizes)}")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for n in sizes:
        x = torch.randn((n, *sample_shape), generator=g).to(device)
        t = torch.randint(0, num_train_timesteps, (n,), generator=g).to(device)
        c = None if condition is None else condition.expand(n, *condition.shape[1:]).to(device)
        inputs[n] = (x, t, c)

    def call(n: int) -> float:
        x, t, c = inputs[n]
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = denoiser(x, t, c)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        for n in sizes:
            call(n)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for r in range(reps):
        for n in (sizes if r % 2 == 0 else sizes[::-1]):
            times[n].append(call(n))
    return {n: statistics.median(ts) for n, ts in times.items()}


def round_cost(cost: Mapping[int, float], rows: int) -> float:
    """``c(rows)`` interpolated linearly in the measured curve (extrapolated linearly past its ends)."""
    if not cost:
        raise ValueError("empty cost curve")
    xs = np.array(sorted(cost), dtype=np.float64)
    ys = np.array([cost[int(x)] for x in xs], dtype=np.float64)
    if len(xs) == 1:
        return float(ys[0] * rows / xs[0])
    if rows > xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(ys[-1] + slope * (rows - xs[-1]))
    return float(np.interp(rows, xs, ys))


def predict_latency(cost: Mapping[int, float], rows_per_round: Sequence[int]) -> float:
    """Predicted ms of one sampling call: ``Σ_rounds c(rows)`` (model calls only)."""
    return float(sum(round_cost(cost, r) for r in rows_per_round))


def choose_window(cost: Mapping[int, float], traces: Mapping[int, Sequence[Sequence[int]]]) -> tuple[int, dict]:
    """The window with the lowest predicted mean latency.

    Args:
        cost: ``{batch size: ms}`` from :func:`batch_cost_curve`.
        traces: ``{window: [rows_per_round of each calibration chunk]}``.
    Returns:
        ``(window, {window: predicted mean ms})``; ties go to the smaller window.
    """
    if not traces:
        raise ValueError("no candidate windows")
    predicted = {}
    for w, runs in traces.items():
        if not runs:
            raise ValueError(f"window {w} has no calibration runs")
        predicted[int(w)] = statistics.mean(predict_latency(cost, r) for r in runs)
    best = min(sorted(predicted), key=lambda w: predicted[w])
    return best, predicted


CANDIDATE_WINDOWS = (8, 16, 24, 32, 48, 64, 100)


def tune_window(
    policy: Any,
    spec: Any,
    observations: Sequence[Any],
    candidates: Sequence[int] = CANDIDATE_WINDOWS,
    *,
    cost: Mapping[int, float] | None = None,
    reps: int = 10,
    seed: int = 0,
) -> tuple[int, dict[str, Any]]:
    """The window for ``spec`` on this machine: cost curve × rows per round on ``observations``.

    Args:
        policy: a :class:`~para_policy.policy.LowdimPolicy`.
        spec: the Picard :class:`~para_policy.policy.SamplerConfig` to tune (its ``window``
            is replaced by each candidate; everything else kept). Calibration calls are
            cold (no warm start): an episode's first chunk is what they see.
        observations: a few ``(n_obs_steps, obs_dim)`` observations to calibrate on.
        candidates: windows to try (clipped to the number of steps).
        cost: a cost curve measured before (``{rows: ms}``); measured now when None.
        reps: timed calls per batch size of the cost curve.
    Returns:
        ``(window, info)``; info has ``cost``, ``predicted_ms`` and ``rounds`` per window.
    """
    from dataclasses import replace

    if not observations:
        raise ValueError("tune_window needs at least one observation to calibrate on")
    schedule = policy.schedule_for(spec)
    S = schedule.num_steps
    windows = sorted({min(int(w), S) for w in candidates})
    obs = [torch.as_tensor(np.asarray(o, dtype=np.float32))[None] for o in observations]
    if cost is None:
        cond, _ = policy.conditioning(obs[0].to(policy.device))
        sizes = sorted({n for n in DEFAULT_BATCHES if n <= windows[-1]} | {windows[-1]})
        cost = batch_cost_curve(policy.denoise, policy.trajectory_shape(1)[1:], cond, sizes,
                                num_train_timesteps=int(schedule.timesteps.max()) + 1, reps=reps,
                                device=policy.device)
    g = torch.Generator().manual_seed(seed)
    noises = [policy_noise(policy, schedule, g) for _ in obs]
    traces: dict[int, list[list[int]]] = {}
    for w in windows:
        trial = replace(spec, options={**spec.options, "window": w}, warm_start=False)
        for o, (x_T, noise) in zip(obs, noises, strict=True):
            policy.predict_action({"obs": o}, x_T=x_T, noise=noise, sampler=trial)
            traces.setdefault(w, []).append(list(policy.last_stats.extra["rows_per_round"]))
    best, predicted = choose_window(cost, traces)
    rounds = {w: statistics.mean(len(t) for t in ts) for w, ts in traces.items()}
    return best, {"cost": dict(cost), "predicted_ms": predicted, "rounds": rounds}


def policy_noise(policy: Any, schedule: Any, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_T`` and step noise for one batch-1 call of ``policy`` on ``schedule``."""
    from para_policy.samplers import draw_noise

    return draw_noise(schedule, policy.trajectory_shape(1), generator, device=policy.device, dtype=policy.dtype)
