"""The stage-parallel (AsyncDiff) benchmark: the cost model's terms and the interleaved latency table.

``eval/bench_stages.py`` runs it. Two parts:

* :func:`stage_costs`: one call of the whole network (ONNX Runtime, 1 and 2 intra-op threads),
  each stage alone, the stages in turn (:meth:`~para_policy.stages.StagePipeline.run_stages`) and
  overlapped (:meth:`~para_policy.stages.StagePipeline.stale_step`); the hand-off cost is the
  overlapped step minus its slowest stage. These predict other worker counts (a prediction).
* :func:`latency_rows`: per schedule, batch 1, the sequential loop on ONNX Runtime at 1 and 2
  threads, ``paradigms``, ``asyncdiff`` (2 stages, its variants and ``exact``) and ``patches``
  (2 patches of the horizon, DistriFusion) timed call by call, the variants'
  order alternating every repetition so machine load hits them alike; p50 / p95 and the
  executed actions' deviation from sequential (1 thread) on the same noise.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from para_policy.bench.noise import keyed_noise
from para_policy.bench.schedules import schedule_spec
from para_policy.samplers import SamplerConfig
from para_policy.stats import percentile_summary

#: ``(label, preset, options, policy key)``: what each schedule's table compares
VARIANTS: tuple[tuple[str, str, dict[str, Any], str], ...] = (
    ("sequential ORT 1 thread", "sequential", {}, "ort1"),
    ("sequential ORT 2 threads", "sequential", {}, "ort2"),
    ("paradigms (auto backend, 2 threads)", "paradigms", {}, "auto"),
    ("asyncdiff 2 stages", "asyncdiff", {"stages": 2}, "ort1"),
    ("asyncdiff 2 stages, tail 1", "asyncdiff", {"stages": 2, "tail": 1}, "ort1"),
    ("asyncdiff 2 stages, tail 0, no extrapolation", "asyncdiff",
     {"stages": 2, "tail": 0, "extrapolate": False}, "ort1"),
    ("asyncdiff 2 stages exact", "asyncdiff", {"stages": 2, "exact": True}, "ort1"),
    ("patches 2 patches", "patches", {"patches": 2}, "ort1"),
    ("patches 2 patches exact", "patches", {"patches": 2, "exact": True}, "ort1"),
)
#: variants timed on the first repetition only (each call takes many sequential samples' time)
SLOW = ("asyncdiff 2 stages exact", "patches 2 patches exact")
#: stage counts the cost model measures (each stage alone on one core) and predicts for
PREDICT_STAGES = (2, 4, 8)


def median_ms(fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in ms over ``reps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def stage_costs(policies: dict[str, Any], obs: np.ndarray, reps: int = 200) -> dict[str, Any]:
    """The cost model's terms at batch 1 (ms, medians; see the module docstring), ``policies``: ``ort1``, ``ort2``.

    ``stages streamed`` is one round of :meth:`~para_policy.stages.StagePipeline.stale_rounds` in a
    run of 50, the sample stepped in between by nothing but a copy (what the streamed rounds cost
    beyond the slowest stage is the hand-off).
    """
    policy = policies["ort1"]
    cond = policy.conditioning(policy.observation({"obs": torch.as_tensor(obs)[None]}))[0]
    pipe = policy.staged(2)
    x, t = torch.randn(policy.trajectory_shape(1)), torch.tensor([10.0])
    _, carries = pipe.run_stages(x, t, cond)
    carry = carries[0]
    rounds = [[t, t]] * 50

    def streamed() -> None:
        pipe.stale_rounds(x, rounds, cond, carries, lambda j, out: x)

    calls = {
        "whole ORT 1 thread": lambda: policies["ort1"].denoise(x, t, cond),
        "whole ORT 2 threads": lambda: policies["ort2"].denoise(x, t, cond),
        "stage 0": lambda: pipe.runners[0]((x, t, cond)),
        "stage 1": lambda: pipe.runners[1]((carry[0], t, cond, *carry[1:])),
        "stages in turn": lambda: pipe.run_stages(x, t, cond),
        "stages overlapped, one round": lambda: pipe.stale_step(x, [t, t], cond, carries),
        "stages streamed, per round": streamed,
    }
    out: dict[str, Any] = {name: [] for name in calls}
    for rep in range(3):  # interleaved blocks: load drifting during the run hits every call alike
        for name in (calls if rep % 2 == 0 else reversed(list(calls))):
            n = max(reps // 150, 3) if name == "stages streamed, per round" else max(reps // 3, 5)
            out[name].append(median_ms(calls[name], n) / (len(rounds) if name == "stages streamed, per round" else 1))
    ms = {name: statistics.median(v) for name, v in out.items()}
    ms["hand-off"] = ms["stages streamed, per round"] - max(ms["stage 0"], ms["stage 1"])
    ms["cuts"] = [[r.stage.start, r.stage.stop] for r in pipe.runners]
    ms.update(worker_kinds(policy.model, [0, *ms["cuts"][1]], x, t, cond, reps))
    return ms


class _TimedSession:
    """An ONNX Runtime session whose ``run`` records ``(name, start, end)`` in ``events`` (perf_counter seconds)."""

    def __init__(self, session: Any, name: str, events: list[tuple[str, float, float]]) -> None:
        self.session, self.name, self.events = session, name, events

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.session, attr)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = self.session.run(*args, **kwargs)
        self.events.append((self.name, start, time.perf_counter()))
        return out


def loop_segments(policy: Any, obs: np.ndarray, schedule: str = "ddpm100", calls: int = 10) -> dict[str, float]:
    """Where a streamed 2-stage round's time goes inside ``asyncdiff`` sampling (ms, medians of the middle rounds).

    Why: the ``ε`` served at step ``k`` is the network's output at ``x_{k-1}``, so the sample's own
    loop ``x_k → stage 0 → stage 1 → step → x_{k+2}`` spans two rounds. Its segments, timed from
    the stage sessions' ``run`` calls and the caller's ``advance``: ``stage 0``, ``stage 1`` (the
    sessions' runs), ``hand-off 0→1`` (stage 0's run ends → stage 1's next run starts),
    ``hand-off 1→caller`` (stage 1's run ends → the caller's step starts), ``step`` (the caller's
    ``advance``), ``step→stage 0`` (→ stage 0's next run). When the loop binds, a round is half
    their sum (``loop / 2``), whatever the slowest stage.
    """
    spec = schedule_spec("asyncdiff", schedule, stages=2)
    x_T, noise = keyed_noise(policy.schedule_for(spec), policy.trajectory_shape(1)[1:], [0])
    o = {"obs": torch.as_tensor(obs)[None]}
    policy.predict_action(o, sampler=spec, x_T=x_T, noise=noise)  # builds the pipeline
    pipe = policy.staged(2)
    events: list[tuple[str, float, float]] = []
    sessions = [r.session for r in pipe.runners]
    stale_rounds = pipe.stale_rounds

    def timed_rounds(x: Any, rounds: Any, cond: Any, carries: Any, advance: Callable[[int, Any], Any]) -> Any:
        def timed(j: int, out: Any) -> Any:
            start = time.perf_counter()
            nxt = advance(j, out)
            events.append(("step", start, time.perf_counter()))
            return nxt
        return stale_rounds(x, rounds, cond, carries, timed)

    for i, r in enumerate(pipe.runners):
        r.session = _TimedSession(sessions[i], f"s{i}", events)
    pipe.stale_rounds = timed_rounds
    seg: dict[str, list[float]] = {k: [] for k in ("stage 0", "hand-off 0→1", "stage 1", "hand-off 1→caller",
                                                   "step", "step→stage 0", "round")}
    try:
        for _ in range(calls):
            events.clear()
            policy.predict_action(o, sampler=spec, x_T=x_T, noise=noise)
            s0, s1, step = ([e for e in events if e[0] == n] for n in ("s0", "s1", "step"))
            J = len(step)
            for j in range(J // 5, J - J // 5):  # round j: s0[1 + j], s1[1 + j] (index 0: the warm-up step)
                a0, a1, st, b0, b1 = s0[1 + j], s1[1 + j], step[j], s0[2 + j], s1[2 + j]
                for key, value in (("stage 0", a0[2] - a0[1]), ("hand-off 0→1", b1[1] - a0[2]),
                                   ("stage 1", a1[2] - a1[1]), ("hand-off 1→caller", st[1] - a1[2]),
                                   ("step", st[2] - st[1]), ("step→stage 0", b0[1] - st[2]), ("round", b0[1] - a0[1])):
                    seg[key].append(value * 1e3)
    finally:
        for r, session in zip(pipe.runners, sessions, strict=True):
            r.session = session
        del pipe.stale_rounds
    out = {k: statistics.median(v) for k, v in seg.items()}
    out["loop (2 rounds)"] = sum(v for k, v in out.items() if k != "round")
    return out


def worker_kinds(model: Any, cuts: list[int], x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                 reps: int) -> dict[str, float]:
    """One stale round (ms, median) of the same 2 stages with eager PyTorch on a worker thread, and in a
    worker process (:mod:`para_policy.distributed_stages`, gloo) with eager PyTorch and with ONNX Runtime.

    Why: eager stages on threads take turns on the GIL; in processes they overlap. Process start-up
    (spawn, export) is left out. ``cuts``: the 2-stage split ``[0, c, U]``.
    """
    from para_policy.distributed_stages import distributed_stage_pipeline
    from para_policy.stages import stage_pipeline

    shape = tuple(x.shape[1:])
    builds = {
        "stale round, eager stages on threads": lambda: stage_pipeline(model, 2, shape, cond, backend="eager",
                                                                        cuts=cuts),
        "stale round, eager stages in processes (gloo)": lambda: distributed_stage_pipeline(
            model, 2, shape, cond, backend="eager", cuts=cuts),
        "stale round, ONNX Runtime stages in processes (gloo)": lambda: distributed_stage_pipeline(
            model, 2, shape, cond, backend="onnxruntime", cuts=cuts),
    }
    out = {}
    for name, build in builds.items():
        with build() as pipe:
            _, carries = pipe.run_stages(x, t, cond)
            out[name] = median_ms(lambda p=pipe, c=carries: p.stale_step(x, [t, t], cond, c), max(reps // 3, 5))
    return out


def stage_splits(policy: Any, obs: np.ndarray, counts: Sequence[int] = PREDICT_STAGES, reps: int = 60
                 ) -> dict[str, Any]:
    """Each stage's time alone (ms, ONNX Runtime, one thread) when the network is cut into each of ``counts``.

    The measured terms of the cost model's prediction for more cores (:func:`predictions`): the
    stages run here one at a time, so no core is shared.
    """
    from para_policy.stages import stage_pipeline

    cond = policy.conditioning(policy.observation({"obs": torch.as_tensor(obs)[None]}))[0]
    x, t = torch.randn(policy.trajectory_shape(1)), torch.tensor([10.0])
    out: dict[str, Any] = {}
    for n in counts:
        with stage_pipeline(policy.model, n, tuple(x.shape[1:]), cond) as pipe:
            _, carries = pipe.run_stages(x, t, cond)
            inputs = [(x, t, cond), *((c[0], t, cond, *c[1:]) for c in carries)]
            out[str(n)] = {"cuts": [[r.stage.start, r.stage.stop] for r in pipe.runners],
                           "stage_ms": [median_ms(lambda r=r, i=i: r(i), reps) for r, i in zip(pipe.runners, inputs,
                                                                                                strict=True)]}
    return out


def predictions(rows: Sequence[dict[str, Any]], splits: dict[str, Any], costs: dict[str, Any],
                variant: str = "asyncdiff 2 stages", warmup: int = 1, tail: int = 2) -> list[dict[str, Any]]:
    """The cost model: ``variant``'s measured chunk latency at 2 stages carried to N stages on N cores (a prediction).

    A streamed round of N stages is bound twice. Each worker runs one stage per round plus the
    hand-off ``w`` (``costs['hand-off']``: streamed rounds with nothing to step, where the workers
    are the bottleneck). And the sample's own loop: the ``ε`` served at step ``k`` is the network's
    output at ``x_{k-N+1}``, so ``x_k → stage 0 → … → stage N−1 → step → x_{k+N}`` spans N
    rounds and holds every stage once, N hand-offs and the caller's step: per round, the mean
    stage ``s̄_N`` plus a loop overhead ``o``. So

        round_N = max(slowest_N + w, s̄_N + o),   o = round_2 − s̄_2   (N > 2; round_2 as measured),

    with the stage times of ``splits`` (each stage alone) and ``round_2`` the measured chunk's
    rounds (its warm-up and tail steps counted at ``costs['stages in turn']``). Per
    schedule of S steps, ``chunk_N = chunk_2 − (S − warmup − tail) · (round_2 − round_N)``.
    Against the fastest sequential sampler's measured chunk (which more cores do not speed up at
    batch 1: a second ONNX Runtime thread already gains little).
    """
    out = []
    stage_ms = {int(n): split["stage_ms"] for n, split in splits.items()}
    slowest = {n: max(v) for n, v in stage_ms.items()}
    mean = {n: sum(v) / n for n, v in stage_ms.items()}
    for schedule in dict.fromkeys(r["schedule"] for r in rows):
        mine = [r for r in rows if r["schedule"] == schedule]
        measured = next(r["p50"] for r in mine if r["variant"] == variant)
        sequential = min(r["p50"] for r in mine if r["variant"].startswith("sequential"))
        steps = int("".join(c for c in schedule if c.isdigit()))
        rounds = steps - warmup - tail
        round_2 = (measured - (steps - rounds) * costs["stages in turn"]) / rounds
        loop = round_2 - mean[2]  # o: what the sample's loop adds per round beyond the mean stage
        for n in sorted(stage_ms):
            round_n = round_2 if n == 2 else max(slowest[n] + costs["hand-off"], mean[n] + loop)
            chunk = measured - rounds * (round_2 - round_n)
            out.append({"schedule": schedule, "stages": n, "slowest_stage_ms": slowest[n],
                        "mean_stage_ms": mean[n], "round_ms": round_n, "chunk_ms": chunk,
                        "speedup": sequential / chunk})
    return out


def predict_action_ms(policy: Any, spec: SamplerConfig, obs: np.ndarray, x_T: torch.Tensor, noise: torch.Tensor
                      ) -> tuple[float, torch.Tensor]:
    """One timed batch-1 ``predict_action``: ``(ms, executed actions (n_action_steps, Da))``."""
    o = {"obs": torch.as_tensor(obs)[None]}
    t0 = time.perf_counter()
    out = policy.predict_action(o, sampler=spec, x_T=x_T, noise=noise)
    return (time.perf_counter() - t0) * 1e3, out["action"][0]


def latency_rows(policies: dict[str, Any], schedule: str, observations: Sequence[np.ndarray], reps: int,
                 variants: Sequence[tuple[str, str, dict[str, Any], str]] = VARIANTS) -> list[dict[str, Any]]:
    """One row per variant on ``schedule`` (``'ddim10'`` …): p50 / p95 ms and action deviation (module docstring)."""
    specs = [(label, schedule_spec(preset, schedule, **opts), key) for label, preset, opts, key in variants]
    ref = policies["ort1"]
    schedule_obj = ref.schedule_for(specs[0][1])
    noises = [keyed_noise(schedule_obj, ref.trajectory_shape(1)[1:], [seed]) for seed in range(len(observations))]
    times: dict[str, list[float]] = {label: [] for label, _, _ in specs}
    actions: dict[str, dict[int, torch.Tensor]] = {label: {} for label, _, _ in specs}
    for _, spec, key in specs:  # warm-up: exports, stage pipelines, first calls
        predict_action_ms(policies[key], spec, observations[0], *noises[0])
    for rep in range(reps):
        for i, obs in enumerate(observations):
            order = specs if (rep + i) % 2 == 0 else specs[::-1]
            for label, spec, key in order:
                if rep and label in SLOW:
                    continue
                ms, a = predict_action_ms(policies[key], spec, obs, *noises[i])
                times[label].append(ms)
                actions[label][i] = a
    base = actions[specs[0][0]]
    rows = []
    for label, spec, _ in specs:
        dev = [float((actions[label][i] - base[i]).abs().max()) for i in base]
        rows.append({"schedule": schedule, "variant": label, "spec": spec.as_dict(),
                     **{k: percentile_summary(times[label])[k] for k in ("p50", "p95", "n")},
                     "dev_mean": float(np.mean(dev)), "dev_max": float(np.max(dev))})
    fastest = min(r["p50"] for r in rows if r["variant"].startswith("sequential"))
    for r in rows:
        r["speedup"] = fastest / r["p50"]
    return rows


def markdown(costs: dict[str, Any], rows: Sequence[dict[str, Any]], predicted: Sequence[dict[str, Any]] = (),
             splits: dict[str, Any] | None = None, segments: dict[str, float] | None = None) -> list[str]:
    """The report: the cost model's terms, the latency table of every schedule, the cost model's predictions."""
    lines = ["## Per-call costs at batch 1 (ms, medians)", "", "| call | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in costs.items() if isinstance(v, float)]
    if segments:
        lines += ["", "## A streamed round inside `asyncdiff` sampling (2 stages, ms, medians of the middle rounds)",
                  "",
                  "The sample's loop `x_k → stage 0 → stage 1 → step → x_{k+2}` spans two rounds "
                  "(`para_policy.bench.stages.loop_segments`).", "", "| segment | ms |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in segments.items()]
    lines += ["", "## Latency per chunk at batch 1 (interleaved)", "",
              "| schedule | variant | p50 ms | p95 ms | calls | speed-up vs fastest sequential | "
              "action dev mean (px) | action dev max (px) |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['schedule']} | {r['variant']} | {r['p50']:.2f} | {r['p95']:.2f} | {r['n']} | "
              f"{r['speedup']:.2f}x | {r['dev_mean']:.3f} | {r['dev_max']:.3f} |" for r in rows]
    if splits:
        lines += ["", "## Stage times when cut into N stages (ms, each stage alone, ONNX Runtime, 1 thread)", "",
                  "| N | cuts | stage ms |", "|---|---|---|"]
        lines += [f"| {n} | {s['cuts']} | {', '.join(f'{v:.3f}' for v in s['stage_ms'])} |" for n, s in splits.items()]
    if predicted:
        lines += ["", "## Cost model: `asyncdiff` predicted at N stages on N cores (the 2-stage row is measured)", "",
                  "| schedule | stages | slowest stage ms | mean stage ms | round ms | chunk ms | "
                  "speed-up vs fastest sequential |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['schedule']} | {r['stages']} | {r['slowest_stage_ms']:.3f} | {r['mean_stage_ms']:.3f} | "
                  f"{r['round_ms']:.3f} | {r['chunk_ms']:.1f} | {r['speedup']:.2f}x |" for r in predicted]
    return lines
