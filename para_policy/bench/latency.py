"""The latency comparison's replay: per-schedule rows, timed batch-1 calls, summaries and tables.

``eval/bench_latency.py`` (CPU backends, scores, ablations) and ``eval/bench_gpu.py`` (CUDA
runtimes) both replay a recorded stream through these rows and report them with these tables.
Every row of a schedule gets the same noise, keyed by the chunk (:func:`replay_noise`: the hash
the committed ``eval/results/bench_latency*`` were made with, kept so they reproduce).
Imports nothing from :mod:`para_policy.evaluation`, so a bare GPU machine runs it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from para_policy.bench.schedules import schedule_spec
from para_policy.policy import LowdimPolicy
from para_policy.samplers import SamplerConfig, draw_noise, shift_trajectory
from para_policy.window import DEFAULT_BATCHES, batch_cost_curve, predict_latency

ROOT = Path(__file__).resolve().parents[2]  # the repository
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
REPLAY_STREAM = 11  # noise-key stream of the replays
DEFAULT_SCHEDULES = ("ddpm100", "ddim16", "ddim10", "ddim8")
REFERENCE_BACKEND = "eager"
SAMPLER_LABELS = {"sequential": "sequential", "paradigms": "`paradigms`",
                  "paradigms_published": "ParaDiGMS as published (w16, tol 0.1, cold)"}


@dataclass
class Variant:
    """One sampler setting on one schedule, run on one policy object (its ``runtime``)."""

    name: str  # the preset name of a per-schedule row, or an ablation's label
    schedule: str
    spec: SamplerConfig
    runtime: str = REFERENCE_BACKEND  # key of the policy object: a backend, or a precision
    reference: str = ""  # key of the variant whose actions on the same noise are "exact" for this one
    group: str = "schedule"  # schedule | ablation | sweep
    tuning: dict[str, Any] | None = None  # how window='auto' was resolved
    records: list[dict[str, Any]] = field(default_factory=list)
    previous: dict[int, torch.Tensor] = field(default_factory=dict)  # episode -> last trajectory

    @property
    def key(self) -> str:
        return variant_key(self.schedule, self.name, self.runtime)


def variant_key(schedule: str, name: str, runtime: str) -> str:
    return f"{schedule} | {name} | {runtime}"


def schedule_variants(schedule: str, paradigms: Mapping[str, tuple[SamplerConfig, dict[str, Any]]],
                      reference: str = REFERENCE_BACKEND) -> list[Variant]:
    """The rows of one schedule: sequential and ``paradigms`` per runtime, ParaDiGMS as published on ``reference``.

    ``paradigms``: runtime -> (the preset with its window resolved on that runtime, the tuning info).
    Every row is compared with the sequential sampler on ``reference``.
    """
    ref = variant_key(schedule, "sequential", reference)
    seq = schedule_spec("sequential", schedule)
    rows = [Variant("sequential", schedule, seq, runtime, ref) for runtime in paradigms]
    rows += [Variant("paradigms", schedule, spec, runtime, ref, tuning=info) for runtime, (spec, info) in
             paradigms.items()]
    rows.append(Variant("paradigms_published", schedule, schedule_spec("paradigms_published", schedule), reference,
                        ref))
    return rows


def resolve_paradigms(policy: LowdimPolicy, schedule: str, observations: Sequence[np.ndarray],
                      recalibrate: bool = False, reps: int = 10) -> tuple[SamplerConfig, dict[str, Any]]:
    """The ``paradigms`` preset on ``schedule``, its ``window='auto'`` resolved by ``policy``'s own tuner.

    The tuner's candidates include window 1 (the sequential loop). Without ``recalibrate``
    the window cache answers when it holds this policy, schedule, backend and machine (what
    ``eval.py`` would run); with it, the window is measured now on ``observations``.
    """
    spec = schedule_spec("paradigms", schedule)
    if recalibrate:
        window, info = policy.calibrate(list(observations), spec, reps=reps)
        return spec.with_options(window=window), info
    resolved = policy.resolve(spec, list(observations))
    return resolved, policy.window_tuning(spec) or {"window": resolved.options["window"]}


def replay_noise(policy: LowdimPolicy, spec: SamplerConfig, key: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_T`` (1, T, D) and step noise of one replayed call, from a generator seeded by ``key`` alone.

    The key names the chunk, not the sampler, so every row of a schedule gets the same noise;
    drawn on the CPU (the same numbers on every device), then moved to the policy's.
    """
    seed = int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    x_T, noise = draw_noise(policy.schedule_for(spec), policy.trajectory_shape(1), torch.Generator().manual_seed(seed))
    return x_T.to(policy.device, policy.sample_dtype), noise.to(policy.device, policy.sample_dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_call(policies: Mapping[str, LowdimPolicy], v: Variant, ch: dict[str, Any], key: tuple[int, ...]
             ) -> dict[str, Any]:
    """One timed batch-1 call of ``v`` on chunk ``ch``; updates the variant's warm-start state.

    The clock covers ``predict_action`` and copying the actions to the host (what a control
    loop waits for); the observation and the noise are on the device before it starts.
    """
    policy = policies[v.runtime]
    x_T, noise = replay_noise(policy, v.spec, key)
    obs = torch.from_numpy(ch["obs"])[None].to(policy.device)
    warm: torch.Tensor | bool = False  # each variant keeps its own guess here
    prev = v.previous.get(ch["episode"]) if ch["chunk"] > 0 else None
    if v.spec.warm_start and prev is not None:
        warm = shift_trajectory(prev, policy.n_action_steps)
    _sync(policy.device)
    t0 = time.perf_counter()
    start = {"guess": warm} if isinstance(warm, torch.Tensor) else {"warm_start": False}
    out = policy.predict_action({"obs": obs}, x_T=x_T, noise=noise, sampler=v.spec, **start)
    action = out["action"].cpu()
    ms = (time.perf_counter() - t0) * 1e3
    stats = out.stats
    v.previous[ch["episode"]] = out.trajectory.clone()
    rows = stats.rows_per_round or [1] * int(stats.rounds)  # the sequential loop: one row a step
    return {"episode": ch["episode"], "chunk": ch["chunk"], "ms": ms, "rounds": int(stats.rounds),
            "model_evals": int(stats.model_evals), "warm": out.warm, "rows_per_round": [int(r) for r in rows],
            "action": action[0].numpy()}


def replay(policies: Mapping[str, LowdimPolicy], variants: Sequence[Variant], chunks: Sequence[dict[str, Any]],
           noise_seed: int = 0, progress: bool = True) -> None:
    """Every chunk in order through every variant, alternating their order per chunk (after one warm-up call each).

    Alternating spreads drifting machine load over all variants alike.
    """
    for v in variants:  # warm-up: allocator, thread pool, CUDA graphs
        run_call(policies, v, chunks[0], (REPLAY_STREAM, noise_seed, -1, 0))
        v.previous.clear()
    stream: Any = chunks
    if progress:
        from tqdm import tqdm

        stream = tqdm(chunks, desc="replay", unit="chunk")
    for i, ch in enumerate(stream):
        key = (REPLAY_STREAM, noise_seed, ch["episode"], ch["chunk"])
        for v in (variants if i % 2 == 0 else variants[::-1]):
            v.records.append(run_call(policies, v, ch, key))


def cost_curves(policies: Mapping[str, LowdimPolicy], obs: np.ndarray, batches: Sequence[int] = DEFAULT_BATCHES,
                reps: int = 15, warmup: int = 3) -> dict[str, dict[int, float]]:
    """Median ms of one denoiser call on n rows, per policy (through its configured denoiser)."""
    out = {}
    for name, policy in policies.items():
        cond, _ = policy.conditioning(policy.observation_batch(obs))
        out[name] = batch_cost_curve(policy.denoise, policy.trajectory_shape(1)[1:], cond, batches, reps=reps,
                                     warmup=warmup, device=policy.device)
    return out


def predicted_ms(records: Sequence[dict[str, Any]], cost: Mapping[int, float]) -> float:
    """Mean over chunks of Σ_rounds cost(rows): the model calls' share of a chunk on that cost curve."""
    return float(statistics.mean(predict_latency(cost, r["rows_per_round"]) for r in records))


def summarize(variants: Sequence[Variant], n_action_steps: int) -> list[dict[str, Any]]:
    """One row per variant; speed-up against the fastest sequential row of its schedule (at p50 and, against
    that row's p95, at p95)."""
    by_key = {v.key: v for v in variants}
    fastest: dict[str, tuple[float, float]] = {}
    for v in variants:
        if v.spec.name == "sequential" and v.records:
            p50, p95 = (float(x) for x in np.percentile([r["ms"] for r in v.records], [50, 95]))
            fastest[v.schedule] = min(fastest.get(v.schedule, (p50, p95)), (p50, p95))
    return [summary_row(v, by_key[v.reference], *fastest[v.schedule], n_action_steps=n_action_steps)
            for v in variants]


def summary_row(v: Variant, ref: Variant, fastest_seq_ms: float, fastest_seq_p95: float | None = None, *,
                n_action_steps: int) -> dict[str, Any]:
    ms = [r["ms"] for r in v.records]
    dev = [float(np.linalg.norm(r["action"] - q["action"], axis=-1).max()) for r, q in zip(v.records, ref.records,
                                                                                              strict=True)]
    p50, p95 = (float(x) for x in np.percentile(ms, [50, 95]))
    return {
        "key": v.key, "name": v.name, "schedule": v.schedule, "runtime": v.runtime, "group": v.group,
        "reference": v.reference, "spec": v.spec.as_dict(), "window": v.spec.options.get("window"),
        "ms_p50": p50, "ms_p95": p95, "ms_max": max(ms), "ms_per_action_p50": p50 / n_action_steps,
        "rounds_mean": statistics.mean(r["rounds"] for r in v.records),
        "rounds_max": max(r["rounds"] for r in v.records),
        "model_evals_mean": statistics.mean(r["model_evals"] for r in v.records),
        "dev_mean_px": statistics.mean(dev), "dev_max_px": max(dev),
        "speedup_p50": fastest_seq_ms / p50, "above_sequential": sum(m > fastest_seq_ms for m in ms),
        "speedup_p95": None if fastest_seq_p95 is None else fastest_seq_p95 / p95,
        "chunks": len(ms), "tuning": v.tuning,
    }


Column = tuple[str, Callable[[dict[str, Any]], str]]
SCHEDULE_COLUMNS: list[Column] = [
    ("window", lambda r: "" if r["window"] is None else str(r["window"])),
    ("ms/chunk p50", lambda r: f"{r['ms_p50']:.1f}"),
    ("p95", lambda r: f"{r['ms_p95']:.1f}"),
    ("rounds/chunk", lambda r: f"{r['rounds_mean']:.1f}"),
    ("model evals/chunk", lambda r: f"{r['model_evals_mean']:.0f}"),
    ("deviation mean (px)", lambda r: f"{r['dev_mean_px']:.3f}"),
    ("deviation max (px)", lambda r: f"{r['dev_max_px']:.3f}"),
    ("speed-up p50", lambda r: f"{r['speedup_p50']:.2f}×"),
    ("> fastest seq", lambda r: f"{r['above_sequential']}/{r['chunks']}"),
]


def row_label(r: dict[str, Any]) -> str:
    return SAMPLER_LABELS.get(r["name"], r["name"])


def table(rows: Sequence[dict[str, Any]], runtime_label: str = "backend",
          extra: Sequence[Column] = ()) -> list[str]:
    """A markdown table of summary rows: sampler, runtime, then :data:`SCHEDULE_COLUMNS` and ``extra``."""
    columns = [*SCHEDULE_COLUMNS, *extra]
    lines = ["| sampler | " + runtime_label + " | " + " | ".join(h for h, _ in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for r in rows:
        lines.append(f"| {row_label(r)} | {r['runtime']} | " + " | ".join(f(r) for _, f in columns) + " |")
    return lines


def tuning_line(r: dict[str, Any]) -> str:
    """How the window of a ``paradigms`` row was chosen: where from, and the tuner's predicted ms per window."""
    t = r.get("tuning") or {}
    source = t.get("source", "measured")
    how = "measured in this run" if source == "measured" else f"from the window cache ({source})"
    predicted = t.get("predicted_ms") or {}
    pred = ", ".join(f"w{w}: {float(ms):.0f}" for w, ms in sorted(predicted.items(), key=lambda kv: int(kv[0])))
    return f"`paradigms` on {r['runtime']}: window {r['window']}, {how}" + (f"; predicted ms {pred}" if pred else "")


def cost_table(curves: Mapping[str, Mapping[Any, float] | str]) -> list[str]:
    """Cost curves as one row each (a string value is a note: why the curve is missing)."""
    sizes = sorted({int(n) for c in curves.values() if not isinstance(c, str) for n in c})
    lines = ["| denoiser | " + " | ".join(str(n) for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for label, curve in curves.items():
        if isinstance(curve, str):
            lines.append(f"| {label} | {curve} |" + " |" * (len(sizes) - 1))
            continue
        ms = {int(n): v for n, v in curve.items()}
        lines.append(f"| {label} | " + " | ".join(f"{ms[n]:.2f}" if n in ms else "" for n in sizes) + " |")
    return lines


def machine_line(machine: Mapping[str, Any], load_before: Any = None) -> str:
    """One line of :func:`para_policy.evaluation.latency.machine_info`'s fields (the load before, when known)."""
    load = f"load average {machine.get('load_avg')}" if load_before is None else \
        f"load average before / after: {load_before} / {machine.get('load_avg')}"
    return (f"Machine: {machine.get('processor')}, {machine.get('cpu_count')} CPUs, torch {machine.get('torch')} with "
            f"{machine.get('torch_threads')} threads, {machine.get('platform')} ({load}).")
