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
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

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
