"""Patch parallelism over the horizon (DistriFusion / PCPP) for the 1-D UNet: the sampler, the runners, the costs.

A measured experiment, not a sampler preset. ``eval/bench_patches.py`` runs it. Pieces:

* :func:`patch_parallel_sample`: the DDIM / DDPM loop with the trajectory cut into P patches
  along time (:class:`~para_policy.models.unet_patches.PatchUnet`); the first ``warmup`` steps run
  the whole network (exact), every later step runs the P patches at once, each reading its
  neighbours' halos and the group statistics from the previous step (displaced patches);
* :class:`EagerPatches`: the patches one after the other in eager PyTorch (exactness tests);
  :class:`OnnxPatches`: one ONNX Runtime session (one intra-op thread) per patch, the patches on
  :class:`~para_policy.stages.StagePipeline`'s worker threads (patch 0 in the caller's thread), and
  an ONNX graph of the whole network that also emits the exchange (warm-up steps);
* :func:`patch_costs`: per-call costs (whole network at 1 and 2 threads, one patch, the whole
  network emitting the exchange, two patches overlapped), blocks interleaved, p50 / p95;
* :func:`action_deviation`: the displaced sampler's executed actions against sequential on the
  same noise, in action units.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from para_policy.models.unet1d import ConditionalUnet1D
from para_policy.models.unet_patches import PatchExchange, PatchUnet, neighbour_inputs
from para_policy.onnx_backend import export_graph, export_onnx, make_session
from para_policy.samplers.sequential import schedule_step
from para_policy.schedule import Schedule
from para_policy.stages import StagePipeline
from para_policy.stats import percentile_summary

#: one patch's call result: ``(out (B, n, D), left_edge, right_edge, local)``
PatchResult = tuple[Tensor, Tensor, Tensor, Tensor]


class PatchRunner(Protocol):
    """What :func:`patch_parallel_sample` drives: the whole network with its exchange, and the P patches at once."""

    patches: int

    def full(self, x: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, list[PatchExchange]]: ...

    def run_patches(self, xs: Sequence[Tensor], t: Tensor, cond: Tensor | None,
                    inputs: Sequence[tuple[Tensor, Tensor, Tensor]]) -> list[PatchResult]: ...


class EagerPatches:
    """:class:`PatchUnet` in eager PyTorch, the patches one after the other (exact arithmetic, no speed-up)."""

    def __init__(self, patched: PatchUnet) -> None:
        self.patched = patched
        self.patches = patched.patches

    def full(self, x: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, list[PatchExchange]]:
        with torch.inference_mode():
            return self.patched.full(x, t, cond)

    def run_patches(self, xs: Sequence[Tensor], t: Tensor, cond: Tensor | None,
                    inputs: Sequence[tuple[Tensor, Tensor, Tensor]]) -> list[PatchResult]:
        with torch.inference_mode():
            return [self.patched(x, t, cond, *i) for x, i in zip(xs, inputs, strict=True)]


class PatchGraph(nn.Module):
    """One patch's ONNX graph: ``(x, t[, cond], left, right, others) -> (out, left_edge, right_edge, local)``."""

    def __init__(self, patched: PatchUnet, conditioned: bool) -> None:
        super().__init__()
        self.patched, self.conditioned = patched, conditioned

    def forward(self, x: Tensor, t: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        cond = rest[0] if self.conditioned else None
        return tuple(self.patched(x, t, cond, *rest[-3:]))


class FullGraph(nn.Module):
    """The whole network's ONNX graph: ``(x, t[, cond]) -> (out, then each patch's left_edge, right_edge, local)``."""

    def __init__(self, patched: PatchUnet) -> None:
        super().__init__()
        self.patched = patched

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> tuple[Tensor, ...]:
        out, exchanges = self.patched.full(x, t, cond)
        return (out, *(e for ex in exchanges for e in ex))


class PatchSession:
    """One ONNX Runtime session of :class:`PatchGraph`, a :class:`~para_policy.stages.StagePipeline` runner.

    Called with ``(x, t, cond, left, right, others)``, or with ``(x, t, cond)`` after :attr:`pending`
    was set to ``(left, right, others)`` (how the pipeline calls the patch in the caller's thread);
    keeps its latest result in :attr:`last` (the pipeline returns only part of it). ``session``: an
    ``onnxruntime.InferenceSession`` (its ``run`` may be called from several threads at once, so
    the patches share one copy of the weights).
    """

    def __init__(self, session: Any, names: Sequence[str]) -> None:
        self.session = session
        self.names = list(names)
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.pending: tuple[Tensor, ...] = ()
        self.last: PatchResult | None = None

    def __call__(self, inputs: tuple[Tensor | None, ...]) -> tuple[Tensor, ...]:
        given = [a for a in (*inputs, *(self.pending if len(inputs) == 3 else ())) if a is not None]
        feeds = {n: a.detach().float().contiguous().numpy() for n, a in zip(self.names, given, strict=True)
                 if n in self.inputs}
        self.last = tuple(torch.from_numpy(o) for o in self.session.run(None, feeds))  # type: ignore[assignment]
        return self.last  # type: ignore[return-value]


class OnnxPatches:
    """:class:`PatchUnet` on ONNX Runtime: one session per patch on worker threads, one for the whole network.

    ``sample_shape``: ``(T, D)``; ``cond_dim``: G or None. ``parallel``: the patches run at once
    (one per core) or one after the other in the caller's thread. :meth:`close` ends the workers.
    """

    def __init__(self, patched: PatchUnet, sample_shape: Sequence[int], cond_dim: int | None, *,
                 parallel: bool = True) -> None:
        T, D = (int(s) for s in sample_shape)
        patched.check_horizon(T)
        self.patches, n = patched.patches, T // patched.patches
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, T, D, generator=g), torch.tensor([3.0, 7.0])
        cond = None if cond_dim is None else torch.randn(2, cond_dim, generator=g)
        base = (x, t) if cond is None else (x, t, cond)
        names = ["x", "t", *([] if cond is None else ["condition"])]
        ex_names = [f"{k}{p}" for p in range(self.patches) for k in ("left_edge", "right_edge", "local")]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            self.full_session = make_session(export_graph(FullGraph(patched).eval(), base, names,
                                                          ["out", *ex_names]), 1)
            _, exchanges = patched.full(x, t, cond)
            left, right, others = neighbour_inputs(exchanges)[0]
            patch_names = [*names, "left", "right", "others"]
            graph = export_graph(PatchGraph(patched, cond is not None).eval(),
                                 (x[:, :n], *base[1:], left, right, others), patch_names,
                                 ["out", "left_edge", "right_edge", "local"])
        self.full_names = names
        session = make_session(graph, 1)
        self.runners = [PatchSession(session, patch_names) for _ in range(self.patches)]
        self.pipeline = StagePipeline(self.runners) if parallel and self.patches > 1 else None

    def full(self, x: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, list[PatchExchange]]:
        given = [a for a in (x, t.reshape(-1).expand(x.shape[0]), cond) if a is not None]
        feeds = {n: a.detach().float().contiguous().numpy() for n, a in zip(self.full_names, given, strict=True)}
        outs = [torch.from_numpy(o) for o in self.full_session.run(None, feeds)]
        return outs[0], [tuple(outs[1 + 3 * p: 4 + 3 * p]) for p in range(self.patches)]  # type: ignore[misc]

    def run_patches(self, xs: Sequence[Tensor], t: Tensor, cond: Tensor | None,
                    inputs: Sequence[tuple[Tensor, Tensor, Tensor]]) -> list[PatchResult]:
        t = t.reshape(-1).expand(xs[0].shape[0]).float()
        if self.pipeline is None:
            return [r((x, t, cond, *i)) for r, x, i in zip(self.runners, xs, inputs, strict=True)]  # type: ignore
        self.runners[0].pending = tuple(inputs[0])
        carries = [(x, *i) for x, i in zip(xs[1:], inputs[1:], strict=True)]
        self.pipeline.stale_step(xs[0], [t] * self.patches, cond, carries)  # type: ignore[arg-type]
        return [r.last for r in self.runners]  # type: ignore[misc]

    def close(self) -> None:
        """End the worker threads (idempotent)."""
        if self.pipeline is not None:
            self.pipeline.close()


@torch.inference_mode()
def patch_parallel_sample(runner: PatchRunner | PatchUnet, schedule: Schedule, x_T: Tensor, noise: Tensor | None = None,
                          *, condition: Tensor | None = None, warmup: int = 1) -> Tensor:
    """Denoise ``x_T`` (B, T, D) with displaced patches (module docstring): the sample (B, T, D).

    ``noise``: (B, S, T, D) per-step noise (None: zeros, for deterministic schedules);
    ``condition``: (B, G) or None; ``warmup``: whole-network steps first (``warmup >= S`` is the
    sequential loop). Single-step (order 1) and multistep schedules; no inpainting.
    """
    if isinstance(runner, PatchUnet):
        runner = EagerPatches(runner)
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (the first step has no previous step to read), got {warmup}")
    B, T, _ = x_T.shape
    S, P = schedule.num_steps, runner.patches
    noise = torch.zeros(B, S, *x_T.shape[1:]) if noise is None else noise
    steps = schedule.timesteps.to(torch.float32)
    x, x0s, exchanges, n = x_T.float(), None, None, T // P
    for k in range(S):
        t = steps[k].expand(B)
        if k < warmup or exchanges is None:
            out, exchanges = runner.full(x, t, condition)
        else:
            xs = [x[:, p * n: (p + 1) * n] for p in range(P)]
            results = runner.run_patches(xs, t, condition, neighbour_inputs(exchanges))
            out = torch.cat([r[0] for r in results], dim=1)
            exchanges = [tuple(r[1:]) for r in results]  # type: ignore[misc]
        x, x0s = schedule_step(schedule, x, k, out.float(), x0s, noise.float())
    return x


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
    """Executed actions of :func:`patch_parallel_sample` vs the whole network's loop on the same noise.

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
            traj = patch_parallel_sample(runner, schedule, x_T, noise, condition=cond, warmup=w)
            return policy.normalizer.unnormalize("action", traj[..., : policy.action_dim])[0, start: start + steps]

        ref = actions(S)
        for w in warmups:
            devs[w].append(float((actions(w) - ref).abs().max()))
    return {w: {"mean": float(np.mean(v)), "max": float(np.max(v))} for w, v in devs.items()}


def sampler_latency(model: ConditionalUnet1D, schedule: Schedule, cond_dim: int | None, horizon: int,
                    warmups: Sequence[int] = (1,), reps: int = 20) -> dict[str, dict[str, float]]:
    """Whole sampling calls at batch 1, ms p50 / p95: the sequential loop on the whole network's ONNX session
    (1 and 2 threads) against :func:`patch_parallel_sample` on :class:`OnnxPatches` (2 workers), interleaved."""
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
              (lambda w=w: patch_parallel_sample(runner, schedule, x_T, noise, condition=cond, warmup=w))
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
