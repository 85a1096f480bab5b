"""Patch parallelism over the horizon (DistriFusion / PCPP) for the 1-D UNet: the costs, measured.

``eval/bench_patches.py`` runs it. The sampler is :func:`~para_policy.samplers.patch_sample` (the
``patches`` preset), its runners :class:`~para_policy.patches.EagerPatches` and
:class:`~para_policy.patches.OnnxPatches` (:mod:`para_policy.patches`). Here:

* :func:`patch_costs`: per-call costs (whole network at 1 and 2 threads, one patch, the whole
  network emitting the exchange, two patches overlapped), blocks interleaved, p50 / p95;
* :func:`sampler_latency`: whole sampling calls, the sequential loop on the whole network's
  session against the displaced sampler on :class:`~para_policy.patches.OnnxPatches`;
* :func:`action_deviation`: the displaced sampler's executed actions against sequential on the
  same noise, in action units.

Every warm-up step here runs the runner's whole-network graph (no separate denoiser), so the
sequential reference (``warmup = S``) and the displaced sampler run the same graphs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from para_policy.models.unet1d import ConditionalUnet1D
from para_policy.models.unet_patches import PatchUnet, neighbour_inputs
from para_policy.onnx_backend import export_onnx, make_session
from para_policy.patches import OnnxPatches, PatchRunner
from para_policy.samplers.patches import patch_sample
from para_policy.samplers.sequential import schedule_step
from para_policy.schedule import Schedule
from para_policy.stats import percentile_summary


def displaced_sample(runner: PatchRunner, schedule: Schedule, x_T: Tensor, noise: Tensor | None = None,
                     condition: Tensor | None = None, warmup: int = 1) -> Tensor:
    """:func:`~para_policy.samplers.patch_sample` on ``runner`` alone (every warm-up step on its whole
    graph): the sample (B, T, D)."""
    return patch_sample(None, schedule, x_T, noise, condition=condition, patches=runner.patches,  # type: ignore
                        warmup=warmup, patched=runner)[0]


def whole_sessions(model: ConditionalUnet1D, sample_shape: Sequence[int], cond_dim: int | None,
                   threads: Sequence[int] = (1, 2)) -> dict[int, Any]:
    """ONNX Runtime sessions of the whole network (the sequential baseline), one per intra-op thread count."""
    graph = export_onnx(model, sample_shape, None if cond_dim is None else (cond_dim,))
    return {k: make_session(graph, k) for k in threads}


def onnx_feeds(x: Tensor, t: Tensor, cond: Tensor | None) -> dict[str, np.ndarray]:
    """The whole-network graph's inputs (``x`` (B, T, D), ``t`` (B,), ``cond`` (B, G) or None) as numpy."""
    feeds = {"x": x.float().contiguous().numpy(), "t": t.reshape(-1).expand(x.shape[0]).float().contiguous().numpy()}
    return feeds if cond is None else {**feeds, "condition": cond.float().contiguous().numpy()}


@torch.inference_mode()
def whole_loop(session: Any, schedule: Schedule, x_T: Tensor, noise: Tensor | None = None,
               condition: Tensor | None = None) -> Tensor:
    """The sequential loop over a whole-network session (the baseline of :func:`sampler_latency`): (B, T, D)."""
    B, S = x_T.shape[0], schedule.num_steps
    noise = torch.zeros(B, S, *x_T.shape[1:]) if noise is None else noise
    steps = schedule.timesteps.to(torch.float32)
    x, x0s = x_T.float(), None
    for k in range(S):
        out = torch.from_numpy(session.run(None, onnx_feeds(x, steps[k], condition))[0])
        x, x0s = schedule_step(schedule, x, k, out, x0s, noise.float())
    return x


def timed(fn: Any) -> float:
    """One call's wall time in ms."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def cost_calls(model: ConditionalUnet1D, horizon: int, cond_dim: int | None, patches: int = 2
               ) -> tuple[dict[str, Any], OnnxPatches]:
    """The calls :func:`patch_costs` times, by name, and the runner that owns the worker threads (close it)."""
    D = model.input_dim
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, horizon, D, generator=g), torch.tensor([10.0])
    cond = None if cond_dim is None else torch.randn(1, cond_dim, generator=g)
    feeds = onnx_feeds(x, t, cond)
    whole = whole_sessions(model, (horizon, D), cond_dim)
    half = whole_sessions(model, (horizon // patches, D), cond_dim, (1,))[1]
    half_feeds = onnx_feeds(x[:, : horizon // patches], t, cond)
    runner = OnnxPatches(PatchUnet(model, patches), (horizon, D), cond_dim)
    _, exchanges = runner.full(x, t, cond)
    inputs = neighbour_inputs(exchanges)
    n = horizon // patches
    xs = [x[:, p * n: (p + 1) * n] for p in range(patches)]
    calls = {
        "whole ORT 1 thread": lambda: whole[1].run(None, feeds),
        "whole ORT 2 threads": lambda: whole[2].run(None, feeds),
        "whole at T/P, no halo (patch compute floor)": lambda: half.run(None, half_feeds),
        "whole + exchange (warm-up step)": lambda: runner.full(x, t, cond),
        "one patch": lambda: runner.runners[1]((xs[1], t, cond, *inputs[1])),
        f"{patches} patches overlapped": lambda: runner.run_patches(xs, t, cond, inputs),
    }
    return calls, runner


def patch_costs(model: ConditionalUnet1D, horizon: int, cond_dim: int | None, *, reps: int = 60, blocks: int = 4
                ) -> dict[str, Any]:
    """Per-call ms at batch 1, ``{name: {'p50', 'p95', 'n'}}``: calls interleaved call by call, order alternating.

    Why interleaved: on a loaded machine the load drifts; alternating the calls within each block
    lets it hit every call alike, so their ratios mean more than their absolute times.
    """
    calls, runner = cost_calls(model, horizon, cond_dim)
    try:
        names = list(calls)
        for name in names:  # warm-up
            for _ in range(3):
                calls[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        per_block = max(reps // blocks, 1)
        for b in range(blocks):
            for _ in range(per_block):
                for name in (names if b % 2 == 0 else names[::-1]):
                    times[name].append(timed(calls[name]))
    finally:
        runner.close()
    out: dict[str, Any] = {name: {k: percentile_summary(v)[k] for k in ("p50", "p95", "n")}
                           for name, v in times.items()}
    whole = min(out["whole ORT 1 thread"]["p50"], out["whole ORT 2 threads"]["p50"])
    out["speed-up of overlapped patches vs fastest whole"] = whole / out["2 patches overlapped"]["p50"]
    out["one patch / whole 1 thread"] = out["one patch"]["p50"] / out["whole ORT 1 thread"]["p50"]
    return out


@torch.inference_mode()
def action_deviation(policy: Any, schedule: Schedule, observations: Sequence[np.ndarray], runner: PatchRunner,
                     warmups: Sequence[int], seeds: Sequence[int] | None = None) -> dict[int, dict[str, float]]:
    """Executed actions of :func:`displaced_sample` vs the whole network's loop on the same noise.

    ``policy``: a lowdim UNet policy (global conditioning); ``warmups``: whole-network steps to try.
    Returns ``{warmup: {'mean', 'max'}}``: per observation the max |Δ| over the executed actions
    (action units, e.g. PushT pixels), then the mean and max over observations. The reference is
    ``warmup = S`` on the same runner (the sequential loop over the whole-network graph).
    """
    from para_policy.bench.noise import keyed_noise

    S = schedule.num_steps
    start, steps = policy.action_start, policy.n_action_steps
    devs: dict[int, list[float]] = {w: [] for w in warmups}
    for i, obs in enumerate(observations):
        cond, _ = policy.conditioning(policy.observation({"obs": torch.as_tensor(obs)[None]}))
        x_T, noise = keyed_noise(schedule, policy.trajectory_shape(1)[1:], [i if seeds is None else seeds[i]])

        def actions(w: int, cond: Tensor | None = cond, x_T: Tensor = x_T, noise: Tensor = noise) -> Tensor:
            traj = displaced_sample(runner, schedule, x_T, noise, cond, w)
            return policy.normalizer.unnormalize("action", traj[..., : policy.action_dim])[0, start: start + steps]

        ref = actions(S)
        for w in warmups:
            devs[w].append(float((actions(w) - ref).abs().max()))
    return {w: {"mean": float(np.mean(v)), "max": float(np.max(v))} for w, v in devs.items()}


def sampler_latency(model: ConditionalUnet1D, schedule: Schedule, cond_dim: int | None, horizon: int,
                    warmups: Sequence[int] = (1,), reps: int = 20) -> dict[str, dict[str, float]]:
    """Whole sampling calls at batch 1, ms p50 / p95: the sequential loop on the whole network's ONNX session
    (1 and 2 threads) against :func:`displaced_sample` on :class:`OnnxPatches` (2 workers), interleaved."""
    D = model.input_dim
    whole = whole_sessions(model, (horizon, D), cond_dim)
    runner = OnnxPatches(PatchUnet(model, 2), (horizon, D), cond_dim)
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(1, horizon, D, generator=g)
    noise = torch.randn(1, schedule.num_steps, horizon, D, generator=g)
    cond = None if cond_dim is None else torch.randn(1, cond_dim, generator=g)
    calls = {f"sequential whole ORT {k} thread{'s' if k > 1 else ''}":
             (lambda s=s: whole_loop(s, schedule, x_T, noise, cond)) for k, s in whole.items()}
    calls |= {f"patches 2 workers, warmup {w}":
              (lambda w=w: displaced_sample(runner, schedule, x_T, noise, cond, w))
              for w in warmups}
    times: dict[str, list[float]] = {name: [] for name in calls}
    try:
        for name in calls:
            calls[name]()
        for rep in range(reps):
            for name in (list(calls) if rep % 2 == 0 else list(calls)[::-1]):
                times[name].append(timed(calls[name]))
    finally:
        runner.close()
    out = {name: {k: percentile_summary(v)[k] for k in ("p50", "p95", "n")} for name, v in times.items()}
    fastest = min(v["p50"] for name, v in out.items() if name.startswith("sequential"))
    for v in out.values():
        v["speedup"] = fastest / v["p50"]
    return out
