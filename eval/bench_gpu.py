"""The latency benchmark on a CUDA machine: cost curves (fp32, bf16, CUDA graphs), rounds and latency per schedule.

Parallel sampling's home is a GPU, where a batch of 100 rows may cost about what one row does
and latency is roughly rounds × one call. On one CUDA device, within ``--time-budget-s``
(parts that would start after it are skipped, with a note in the report):

1. **Cost curves**: the median ms of one denoiser call on n = 1 … 100 rows
   (:data:`para_policy.window.DEFAULT_BATCHES`) in fp32, in bf16 (``precision='bf16'``) and
   with CUDA graphs (``cuda_graphs=True``), each set with
   :func:`para_policy.inference.configure_inference` on a policy object of its own, for two
   networks: the shipped PushT policy, and DiffusionPolicy's default network size (the shipped
   policy's config with ``down_dims`` (256, 512, 1024) and ``diffusion_step_embed_dim`` 256, so
   the same input and conditioning dims; random weights).
2. **The honest GPU baseline** (``captured``): on the recorded stream's chunks (batch 1, the same
   noise for every row of a chunk, rows interleaved), per schedule, in fp32 (TF32 off) and bf16:
   the sequential loop eager and captured whole as one CUDA graph
   (:class:`~para_policy.samplers.captured.CapturedSequential`, what a latency-minded GPU user
   would run), and ``paradigms`` (its tolerance, linear solve, secant and warm start) with eager
   compacting rounds and with fixed rounds replayed from CUDA graphs
   (:class:`~para_policy.samplers.captured.CapturedPicard`), per window of
   ``--captured-windows`` (default: all steps, and 16). Fixed windows, not ``window='auto'``:
   the tuner measures eager rounds, not captured ones. Beside it, the round's own cost: one
   replay of a round's graph against one captured model call on the same rows.
3. **Rounds and latency per schedule** (``--schedules``: ``ddpm100 ddim16 ddim10 ddim8``) for
   the shipped policy, replaying a recorded PushT control stream at batch 1 (``--stream``: the
   chunk observations ``eval/bench_latency.py --record-only`` saved, so no simulator is needed
   here): ``sequential`` and ``paradigms`` (its ``window='auto'`` measured by the policy's own
   tuner on that runtime) on each of ``--runtimes`` (fp32 and CUDA graphs), and ParaDiGMS as
   published on the first. It is ``eval/bench_latency.py``'s replay, summary and tables (``para_policy.bench.latency``).
4. **DiffusionPolicy's default size, predicted**: its latency per schedule is not measured
   (rounds of random weights say nothing about a trained network); it is predicted from the
   shipped policy's rows per round in every replayed chunk and the default-size network's cost
   curve (:func:`para_policy.window.predict_latency`: the model calls only).

Writes ``<out>/bench_gpu.{md,json}`` (default ``eval/results/bench_gpu/``), atomically.

Without a CUDA device the same code runs on the CPU with reduced sizes (rows 1 and 2, two
chunks, one calibration chunk; CUDA-graph rows skipped, bf16 as CPU autocast; the captured part
on the first schedule only, its graphs' static buffers run eagerly, ``capture=False``), and the
report says it ran on the CPU. ``--quick`` asks for the reduced sizes on CUDA too; ``--parts``
runs a subset.

    bash eval/bench_gpu.sh                              # on the CUDA machine: sets up, then runs this
    bash eval/bench_gpu.sh --quick --out /tmp/bench_gpu
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from para_policy.bench.latency import (
    CHECKPOINT,
    DEFAULT_SCHEDULES,
    REPLAY_STREAM,
    ROOT,
    cost_curves,
    cost_table,
    machine_line,
    predicted_ms,
    replay,
    replay_noise,
    resolve_paradigms,
    row_label,
    schedule_variants,
    summarize,
    table,
    tuning_line,
)
from para_policy.bench.schedules import parse_schedule, schedule_label, schedule_spec
from para_policy.bench.stream import load_stream, split_stream
from para_policy.checkpoints import atomic_write
from para_policy.cuda_graphs import exact_fp32
from para_policy.inference import configure_inference
from para_policy.loading import load_policy
from para_policy.policy import LowdimPolicy
from para_policy.samplers import (
    picard_sample,
    sampler_spec,
    sequential_sample,
    shift_trajectory,
    warm_start_init,
)
from para_policy.samplers.captured import CapturedPicard, CapturedSequential
from para_policy.schedule import Schedule
from para_policy.window import DEFAULT_BATCHES

RESULTS = ROOT / "eval" / "results" / "bench_gpu"
STREAM = RESULTS / "stream.json"
#: runtime name -> configure_inference settings
MODES: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "cuda-graphs": {"cuda_graphs": True},
    "bf16-cuda-graphs": {"precision": "bf16", "cuda_graphs": True},
}
DEFAULT_MODES = ("fp32", "bf16", "cuda-graphs")
DEFAULT_RUNTIMES = ("fp32", "cuda-graphs")
#: DiffusionPolicy's default ConditionalUnet1D (its low-dim PushT config), on the shipped policy's dims
DEFAULT_SIZE = {"down_dims": [256, 512, 1024], "diffusion_step_embed_dim": 256}


@dataclass(frozen=True)
class Sizes:
    """How much to measure: the full GPU run, or the reduced one (CPU fallback, ``--quick``)."""

    batches: tuple[int, ...]
    cost_reps: int
    cost_warmup: int
    episodes: int
    max_chunks: int
    calib_chunks: int
    tune_reps: int
    captured_chunks: int  # the captured part's chunks: the first of the replayed ones
    captured_schedules: int | None  # how many of its schedules the captured part runs (None: all)
    round_reps: int  # timings of one round (or step) beside one model call


FULL = Sizes(tuple(DEFAULT_BATCHES), cost_reps=15, cost_warmup=3, episodes=4, max_chunks=12, calib_chunks=6,
             tune_reps=10, captured_chunks=24, captured_schedules=None, round_reps=30)
REDUCED = Sizes((1, 2), cost_reps=3, cost_warmup=1, episodes=1, max_chunks=2, calib_chunks=1, tune_reps=2,
                captured_chunks=2, captured_schedules=1, round_reps=1)
PARTS = ("cost", "captured", "replay")


class Budget:
    """Wall-clock budget of the whole run: a part starts only if its estimate fits in what is left."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.start = time.perf_counter()
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, part: str, estimate_s: float = 0.0) -> bool:
        """Whether ``part`` may start; if not, it is noted as skipped."""
        if self.elapsed() + estimate_s <= self.seconds:
            return True
        self.skipped.append(f"{part}: skipped, time budget of {self.seconds:.0f} s (used {self.elapsed():.0f} s, "
                            f"estimated {estimate_s:.0f} s more)")
        print(f"note: {self.skipped[-1]}", flush=True)
        return False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: --device cuda, but torch sees no CUDA device")
    return torch.device(name)


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: the evaluator's machine_info where its extras exist, plus the GPU."""
    try:
        from para_policy.evaluation.latency import machine_info

        info = machine_info()
    except ImportError:  # a bare GPU machine has no eval extras
        info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                "load_avg": [round(x, 2) for x in os.getloadavg()]}
    info["python"] = platform.python_version()
    info["device"] = str(device)
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return info


def default_size_policy(shipped: LowdimPolicy, seed: int = 0) -> LowdimPolicy:
    """The shipped policy's config at DiffusionPolicy's default network size, random weights, its normalizer."""
    config = copy.deepcopy(shipped.config)
    config["model"] = {**config["model"], **DEFAULT_SIZE}
    torch.manual_seed(seed)
    policy = LowdimPolicy(config)
    policy.normalizer.load_state_dict(shipped.normalizer.state_dict())
    return policy.to(shipped.device).eval()


def n_params(policy: LowdimPolicy) -> int:
    return sum(p.numel() for p in policy.model.parameters())


def unavailable(mode: str, device: torch.device) -> str | None:
    """Why ``mode`` cannot run on ``device`` (None if it can)."""
    if MODES[mode].get("cuda_graphs") and device.type != "cuda":
        return "skipped: no CUDA"
    return None


def with_mode(policy: LowdimPolicy, mode: str) -> LowdimPolicy:
    """A copy of ``policy`` whose denoiser runs in ``mode`` (its own object: graphs and caches stay apart)."""
    return configure_inference(copy.deepcopy(policy), **MODES[mode])


def measure_cost(networks: Mapping[str, LowdimPolicy], modes: Sequence[str], obs: Any, sizes: Sizes,
                 budget: Budget) -> dict[str, dict[str, Any]]:
    """network -> mode -> cost curve ``{rows: ms}``, or a note saying why it is missing."""
    out: dict[str, dict[str, Any]] = {}
    for net, policy in networks.items():
        out[net] = {}
        for mode in modes:
            why = unavailable(mode, policy.device)
            if why is None and not budget.allows(f"cost curve {net} {mode}"):
                why = "skipped: time budget"
            if why is not None:
                out[net][mode] = why
                continue
            print(f"cost curve: {net} {mode} ...", flush=True)
            try:
                out[net][mode] = cost_curves({mode: with_mode(policy, mode)}, obs, sizes.batches,
                                                reps=sizes.cost_reps, warmup=sizes.cost_warmup)[mode]
            except Exception as e:  # one failing runtime must not cost the rest of a GPU lease
                out[net][mode] = failure(f"cost curve {net} {mode}", e, budget)
    return out


def failure(part: str, e: BaseException, budget: Budget) -> str:
    """The note of a part that raised (printed, and listed in the report)."""
    note = f"failed: {type(e).__name__}: {e}"
    budget.skipped.append(f"{part}: {note}")
    print(f"error: {part}: {note}", flush=True)
    return note


def replay_runtimes(shipped: LowdimPolicy, names: Sequence[str], obs: Any, sizes: Sizes, budget: Budget
                    ) -> dict[str, LowdimPolicy]:
    """A policy object per runtime of the replay, each called once on every row count first.

    The calls capture a CUDA-graph runtime's graphs before anything is timed, and a runtime
    that fails here is left out with a note instead of failing every schedule.
    """
    runtimes: dict[str, LowdimPolicy] = {}
    for r in names:
        why = unavailable(r, shipped.device)
        if why:
            budget.skipped.append(f"runtime {r} of the per-schedule replay: {why}")
            continue
        try:
            policy = with_mode(shipped, r)
            cost_curves({r: policy}, obs, sizes.batches, reps=1, warmup=0)
            runtimes[r] = policy
        except Exception as e:
            failure(f"runtime {r} of the per-schedule replay", e, budget)
    return runtimes


def run_schedule(runtimes: Mapping[str, LowdimPolicy], schedule: str, chunks: list[dict[str, Any]],
                 calib_obs: list[Any], sizes: Sizes, cost: Mapping[str, Mapping[str, Any]], noise_seed: int
                 ) -> list[dict[str, Any]]:
    """bench_latency's rows of one schedule on every runtime, each with its latency predicted per network.

    ``predicted_ms``: network -> Σ_rounds cost(rows) on that network's curve of the row's runtime,
    from the rows per round the shipped policy needed in each chunk (mean over chunks).
    """
    reference = next(iter(runtimes))
    windows = {r: resolve_paradigms(p, schedule, calib_obs, recalibrate=True, reps=sizes.tune_reps)
               for r, p in runtimes.items()}
    variants = schedule_variants(schedule, windows, reference=reference)
    replay(runtimes, variants, chunks, noise_seed, progress=False)
    rows = summarize(variants, runtimes[reference].n_action_steps)
    for row, v in zip(rows, variants, strict=True):
        row["predicted_ms"] = {net: predicted_ms(v.records, curves[v.runtime]) for net, curves in cost.items()
                               if isinstance(curves.get(v.runtime), Mapping)}
    return rows


def predicted_speedups(rows: Sequence[dict[str, Any]], net: str) -> dict[str, float]:
    """key -> the fastest sequential row's predicted ms over this row's, on network ``net``."""
    seq = [r["predicted_ms"][net] for r in rows if r["name"] == "sequential" and net in r["predicted_ms"]]
    if not seq:
        return {}
    return {r["key"]: min(seq) / r["predicted_ms"][net] for r in rows if net in r["predicted_ms"]}


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def predicted_table(schedules: Mapping[str, Any], net: str) -> list[str]:
    """Rounds and predicted latency of every row on network ``net``, one line per (schedule, sampler, runtime)."""
    lines = ["| schedule | sampler | runtime | window (shipped policy's) | rounds/chunk | predicted ms/chunk | "
             "predicted speed-up |", "|---|---|---|---|---|---|---|"]
    for s, part in schedules.items():
        if "skipped" in part:
            lines.append(f"| {schedule_label(s)} | {part['skipped']} | | | | | |")
            continue
        speed = predicted_speedups(part["rows"], net)
        for r in part["rows"]:
            ms, up = r["predicted_ms"].get(net), speed.get(r["key"])
            lines.append(f"| {schedule_label(s)} | {row_label(r)} | {r['runtime']} | {r['window'] or ''} | "
                         f"{r['rounds_mean']:.1f} | {_num(ms, '{:.1f}')} | {_num(up, '{:.2f}×')} |")
    return lines


# ---- the honest GPU baseline: the sequential loop captured whole vs captured Picard rounds -----

CAPTURED_PRECISIONS = ("fp32", "bf16")
#: the ``paradigms`` preset's options that both Picard executions take (the window is this part's choice)
PICARD_KEYS = ("tolerance", "max_iterations", "per_sample_windows", "linear_solve", "secant")
DEFAULT_CAPTURED_WINDOWS = ("full", "16")
REFERENCE_KEY = "sequential | eager | fp32"  # every row's actions are compared with this one's
EXECUTIONS = {("sequential", "eager"): "eager loop", ("sequential", "captured"): "captured whole",
              ("paradigms", "eager"): "eager rounds (compact)", ("paradigms", "captured"): "captured rounds (fixed)"}


def plain_denoiser(policy: LowdimPolicy, precision: str) -> Callable[..., torch.Tensor]:
    """The policy's network as a plain PyTorch call: the captured samplers capture it themselves (no nesting).

    bf16 runs under autocast with its cast cache off (a cache filled during a capture would
    outlive it) and returns float32, the samplers' dtype.
    """
    model, kw = policy.model, policy.condition_kw

    def fp32(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return model(x, t, **({} if c is None else {kw: c}))

    def bf16(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, cache_enabled=False):
            out = model(x, t, **({} if c is None else {kw: c}))
        return out.float()

    return {"fp32": fp32, "bf16": bf16}[precision]


@dataclass
class CapturedVariant:
    """One way of sampling a chunk in the captured part: its sampler call, records and warm-start memory.

    ``engine``: the :class:`CapturedSequential` / :class:`CapturedPicard` object of a captured
    execution (its graphs are timed alone afterwards), None for an eager one.
    """

    sampler: str  # sequential | paradigms
    execution: str  # eager | captured
    precision: str
    window: int | None
    denoiser: Callable[..., torch.Tensor]
    sample: Callable[..., tuple[torch.Tensor, Any]]  # (x_T, noise, condition, inpaint, init) -> (sample, stats)
    engine: Any = None
    records: list[dict[str, Any]] = field(default_factory=list)
    previous: dict[int, torch.Tensor] = field(default_factory=dict)  # episode -> last trajectory

    @property
    def key(self) -> str:
        return f"{self.sampler} | {self.execution} | {self.precision}" + (f" | w{self.window}" if self.window else "")


def _eager_sequential(den: Any, schedule: Schedule, x_T: torch.Tensor, noise: torch.Tensor, cond: Any, inpaint: Any,
                      init: Any) -> tuple[torch.Tensor, Any]:
    return sequential_sample(den, schedule, x_T, noise, condition=cond, inpaint=inpaint)


def _captured_sequential(seq: CapturedSequential, x_T: torch.Tensor, noise: torch.Tensor, cond: Any, inpaint: Any,
                         init: Any) -> tuple[torch.Tensor, Any]:
    return seq(x_T, noise, condition=cond, inpaint=inpaint)


def _eager_picard(den: Any, schedule: Schedule, window: int, options: Mapping[str, Any], x_T: torch.Tensor,
                  noise: torch.Tensor, cond: Any, inpaint: Any, init: Any) -> tuple[torch.Tensor, Any]:
    return picard_sample(den, schedule, x_T, noise, window=window, condition=cond, inpaint=inpaint, init=init,
                         round_shape="compact", **options)


def _captured_picard(picard: CapturedPicard, x_T: torch.Tensor, noise: torch.Tensor, cond: Any, inpaint: Any,
                     init: Any) -> tuple[torch.Tensor, Any]:
    return picard(x_T, noise, condition=cond, inpaint=inpaint, init=init)


def captured_windows(choices: Sequence[str], steps: int) -> list[int]:
    """``--captured-windows`` on a schedule of ``steps``: 'full' is all of them, others clipped to it; largest first."""
    return sorted({steps if w == "full" else min(int(w), steps) for w in choices}, reverse=True)


def captured_variants(policy: LowdimPolicy, schedule: Schedule, windows: Sequence[int], capture: bool
                      ) -> list[CapturedVariant]:
    """Per precision: sequential eager and captured whole, then ``paradigms`` eager and captured per window.

    The first (sequential eager fp32) is every row's reference. ``paradigms`` takes the preset's
    options (tolerance, linear solve, secant) and warm start, with the window fixed here.
    """
    options = {k: v for k, v in sampler_spec("paradigms").options.items() if k in PICARD_KEYS}
    out = []
    for p in CAPTURED_PRECISIONS:
        den = plain_denoiser(policy, p)
        seq = CapturedSequential(den, schedule, capture=capture)
        out += [CapturedVariant("sequential", "eager", p, None, den, partial(_eager_sequential, den, schedule)),
                CapturedVariant("sequential", "captured", p, None, den, partial(_captured_sequential, seq), seq)]
        for w in windows:
            picard = CapturedPicard(den, schedule, window=w, capture=capture, **options)
            out += [CapturedVariant("paradigms", "eager", p, w, den, partial(_eager_picard, den, schedule, w, options)),
                    CapturedVariant("paradigms", "captured", p, w, den, partial(_captured_picard, picard), picard)]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def captured_call(policy: LowdimPolicy, schedule: Schedule, v: CapturedVariant, ch: Mapping[str, Any],
                  x_T: torch.Tensor, noise: torch.Tensor) -> dict[str, Any]:
    """One timed batch-1 chunk of ``v``: conditioning, warm start, sampling, actions copied to the host.

    What ``predict_action`` does around its sampler, so its milliseconds compare with the
    replay's; a ``paradigms`` variant starts from its own previous chunk of the episode, shifted.
    """
    obs = torch.from_numpy(ch["obs"])[None].to(policy.device)
    prev = v.previous.get(ch["episode"]) if ch["chunk"] > 0 and v.sampler == "paradigms" else None
    _sync(policy.device)
    t0 = time.perf_counter()
    cond, inpaint = policy.conditioning(policy.observation({"obs": obs}))
    init = None if prev is None else warm_start_init(schedule, shift_trajectory(prev, policy.n_action_steps), x_T,
                                                     noise)
    sample, stats = v.sample(x_T, noise, cond, inpaint, init)
    start = policy.action_start
    action = policy.normalizer.unnormalize("action", sample[..., : policy.action_dim])[:, start:
                                                                                       start + policy.n_action_steps]
    action = action.cpu()
    ms = (time.perf_counter() - t0) * 1e3
    v.previous[ch["episode"]] = sample.clone()
    return {"episode": ch["episode"], "chunk": ch["chunk"], "ms": ms, "rounds": int(stats.rounds),
            "warm": init is not None, "action": action[0].numpy()}


def replay_captured(policy: LowdimPolicy, schedule_name: str, variants: Sequence[CapturedVariant],
                    chunks: Sequence[dict[str, Any]], noise_seed: int, warmup: bool
                    ) -> tuple[list[CapturedVariant], dict[str, str]]:
    """Every chunk through every variant, alternating their order per chunk; every variant sees the chunk's noise.

    With ``warmup``, two untimed calls per variant first, a cold and a warm one: they capture
    both graphs a captured ``paradigms`` needs (an episode's first chunk starts cold, the
    others warm), so no capture is timed, and a variant whose capture fails is left out (a
    note says why) instead of costing the schedule. The CPU fallback skips them (nothing to
    capture). Returns the variants that ran and the notes of those left out.
    """
    spec = schedule_spec("sequential", schedule_name)
    schedule = policy.schedule_for(spec)
    x_T, noise = replay_noise(policy, spec, (REPLAY_STREAM, noise_seed, -1, 0))
    failed: dict[str, str] = {}
    for v in variants if warmup else ():
        try:
            for c in (0, 1):
                captured_call(policy, schedule, v, {**chunks[0], "episode": -1, "chunk": c}, x_T, noise)
        except Exception as e:  # e.g. a capture the device refuses: the other variants still run
            failed[v.key] = f"failed: {type(e).__name__}: {e}"
        v.previous.clear()
    variants = [v for v in variants if v.key not in failed]
    for i, ch in enumerate(chunks):
        x_T, noise = replay_noise(policy, spec, (REPLAY_STREAM, noise_seed, ch["episode"], ch["chunk"]))
        for v in (variants if i % 2 == 0 else variants[::-1]):
            v.records.append(captured_call(policy, schedule, v, ch, x_T, noise))
    return variants, failed


def captured_rows(variants: Sequence[CapturedVariant]) -> list[dict[str, Any]]:
    """One summary row per variant: ms p50/p95, rounds, deviation from sequential eager fp32, speed-up over sequential.

    Should sequential eager fp32 have been left out (a failed warm-up), the first variant that ran is the reference.
    """
    ref = next((v for v in variants if v.key == REFERENCE_KEY), variants[0]).records
    p50s = {v.key: float(np.percentile([r["ms"] for r in v.records], 50)) for v in variants}
    best_seq = min(p50s[v.key] for v in variants if v.sampler == "sequential")
    rows = []
    for v in variants:
        ms = [r["ms"] for r in v.records]
        dev = [float(np.linalg.norm(r["action"] - q["action"], axis=-1).max()) for r, q in zip(v.records, ref,
                                                                                                  strict=True)]
        rows.append({"key": v.key, "sampler": v.sampler, "execution": v.execution, "precision": v.precision,
                     "window": v.window, "ms_p50": p50s[v.key], "ms_p95": float(np.percentile(ms, 95)),
                     "rounds_mean": statistics.mean(r["rounds"] for r in v.records),
                     "rounds_max": max(r["rounds"] for r in v.records),
                     "warm_chunks": sum(r["warm"] for r in v.records),
                     "dev_mean_px": statistics.mean(dev), "dev_max_px": max(dev),
                     "speedup_p50": best_seq / p50s[v.key], "chunks": len(ms)})
    return rows


def best_of(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest sequential and the fastest parallel row (at the median), and the speed-up of one over the other."""
    seq = [r for r in rows if r["sampler"] == "sequential"]
    par = [r for r in rows if r["sampler"] != "sequential"]
    if not seq or not par:
        return {}
    seq, par = min(seq, key=lambda r: r["ms_p50"]), min(par, key=lambda r: r["ms_p50"])
    return {"sequential": seq["key"], "parallel": par["key"], "speedup_p50": seq["ms_p50"] / par["ms_p50"]}


def replayable(fn: Callable[[], Any], device: torch.device, capture: bool) -> Callable[[], Any]:
    """``fn`` as a CUDA graph's replay, captured as the samplers capture (warm-up on a side stream); else ``fn``."""
    if not capture:
        return fn
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keep = fn()  # the output lives in the graph's pool: held as long as the replay is
    return lambda: (graph.replay(), keep)[1]


def interleaved_ms(calls: Mapping[str, tuple[Callable[[], Any], int]], device: torch.device, reps: int,
                   warmup: bool) -> dict[str, float]:
    """Median ms of one call of each, the calls alternating per repetition.

    ``calls``: name -> (call, inner): each timing covers ``inner`` back-to-back calls, so a
    short replay is not lost in the synchronization around it.
    """
    items = list(calls.items())
    for _, (call, _) in items if warmup else ():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(reps):
        for name, (call, inner) in (items if i % 2 == 0 else items[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                call()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3 / inner)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def round_costs(policy: LowdimPolicy, schedule: Schedule, variants: Sequence[CapturedVariant], obs: Any,
                sizes: Sizes, capture: bool) -> list[dict[str, Any]]:
    """Per captured engine: one replay of its graph beside one model call on the same rows, captured alike.

    A ``paradigms`` round runs the model on B·W = W rows plus the round's bookkeeping (window
    geometry, solve, test, slide); a step of the captured sequential loop runs it on one row
    plus the step's arithmetic (its whole-chunk graph's replay over S). The difference is the
    sampler's own cost on the device.
    """
    device, S = policy.device, schedule.num_steps
    cond, _ = policy.conditioning(policy.observation_batch(obs))
    T, D = policy.trajectory_shape(1)[1:]
    inner = 10 if capture else 1  # back-to-back replays per timing, for the short ones
    out = []
    for v in variants:
        if v.engine is None or not v.engine.graphs:
            continue
        rows, per = (v.window, 1) if v.sampler == "paradigms" else (1, S)
        graph = next(iter(v.engine.graphs.values()))[0]
        x = torch.randn((rows, T, D), generator=torch.Generator().manual_seed(0)).to(device)
        t = schedule.to(device).timesteps[:rows]
        c = None if cond is None else cond.expand(rows, *cond.shape[1:]).contiguous()
        model = replayable(partial(v.denoiser, x, t, c), device, capture)
        ms = interleaved_ms({"engine": (graph, max(1, inner // per)), "model": (model, inner)}, device,
                            sizes.round_reps, warmup=capture)
        unit = ms["engine"] / per
        out.append({"key": v.key, "sampler": v.sampler, "precision": v.precision, "window": v.window, "rows": rows,
                    "unit_ms": unit, "model_ms": ms["model"], "bookkeeping_ms": unit - ms["model"],
                    "bookkeeping_share": (unit - ms["model"]) / unit})
    return out


def run_captured(policy: LowdimPolicy, schedule_name: str, chunks: list[dict[str, Any]], windows: Sequence[str],
                 sizes: Sizes, noise_seed: int, capture: bool) -> dict[str, Any]:
    """The captured part on one schedule: the replayed variants' rows, the best of each kind, the rounds' own cost.

    TF32 off throughout (:func:`~para_policy.cuda_graphs.exact_fp32`): an fp32 row's deviation
    is then fp32 rounding and the tolerance, not TF32's row-count-dependent rounding.
    """
    schedule = policy.schedule_for(schedule_spec("sequential", schedule_name))
    wins = captured_windows(windows, schedule.num_steps)
    with exact_fp32():
        variants = captured_variants(policy, schedule, wins, capture)
        variants, failed = replay_captured(policy, schedule_name, variants, chunks, noise_seed, warmup=capture)
        rows = captured_rows(variants)
        try:
            costs = round_costs(policy, schedule, variants, chunks[0]["obs"], sizes, capture)
        except Exception as e:  # the replay's rows are kept
            costs, failed["round cost"] = [], f"failed: {type(e).__name__}: {e}"
    return {"windows": wins, "rows": rows, "best": best_of(rows), "round_cost": costs, "failed": failed}


def captured_part(shipped: LowdimPolicy, schedules: Sequence[str], chunks: list[dict[str, Any]],
                  args: argparse.Namespace, sizes: Sizes, budget: Budget, report: Callable[[], Any]
                  ) -> dict[str, Any]:
    """The captured part on every schedule that fits the budget (its report rewritten after each)."""
    capture = shipped.device.type == "cuda"
    part: dict[str, Any] = {"capture": capture, "windows": list(args.captured_windows), "n_chunks": len(chunks),
                            "schedules": {}}
    per_step_s = 0.0  # seconds per denoising step of the last schedule: the next one's estimate
    for s in schedules:
        steps = parse_schedule(s)[1]
        if not budget.allows(f"captured {s}", per_step_s * steps):
            part["schedules"][s] = {"skipped": "skipped: time budget"}
            continue
        print(f"captured: {schedule_label(s)} ...", flush=True)
        t0 = time.perf_counter()
        try:
            part["schedules"][s] = res = run_captured(shipped, s, chunks, args.captured_windows, sizes,
                                                      args.noise_seed, capture)
            budget.skipped += [f"captured {s}, {key}: {note}" for key, note in res["failed"].items()]
        except Exception as e:  # the other schedules and parts still run
            part["schedules"][s] = {"skipped": failure(f"captured {s}", e, budget)}
        per_step_s = (time.perf_counter() - t0) / steps
        report()
    return part


def _variant_label(r: Mapping[str, Any]) -> str:
    return f"{'sequential' if r['sampler'] == 'sequential' else '`paradigms`'}, " \
           f"{EXECUTIONS[(r['sampler'], r['execution'])]}, {r['precision']}" + \
           (f", window {r['window']}" if r.get("window") else "")


def captured_markdown(part: Mapping[str, Any]) -> list[str]:
    """The captured part's section: the latency table, the best of each kind, the rounds' own cost."""
    lines = ["## The honest GPU baseline: the sequential loop captured whole vs captured Picard rounds", ""]
    if not part["capture"]:
        lines += ["**No CUDA: 'captured' rows ran their static buffers eagerly (`capture=False`), so they time the "
                  "plumbing, not a graph.**", ""]
    lines += [f"{part['n_chunks']} replayed chunks per schedule, batch 1; windows `{' '.join(part['windows'])}` "
              "('full': all steps).", "",
              "| schedule | sampler, execution, precision, window | ms/chunk p50 | p95 | rounds/chunk | "
              "deviation px mean | max | speed-up |", "|---|---|---|---|---|---|---|---|"]
    best, costs = [], []
    for s, res in part["schedules"].items():
        label = schedule_label(s)
        if "skipped" in res:
            lines.append(f"| {label} | {res['skipped']} | | | | | | |")
            continue
        lines += [f"| {label} | {_variant_label(r)} | {r['ms_p50']:.2f} | {r['ms_p95']:.2f} | {r['rounds_mean']:.1f} "
                  f"| {r['dev_mean_px']:.3g} | {r['dev_max_px']:.3g} | {r['speedup_p50']:.2f}× |" for r in res["rows"]]
        rows, b = {r["key"]: r for r in res["rows"]}, res["best"]
        if b:
            best.append(f"- {label}: {_variant_label(rows[b['parallel']])} ({rows[b['parallel']]['ms_p50']:.2f} ms) "
                        f"over {_variant_label(rows[b['sequential']])} ({rows[b['sequential']]['ms_p50']:.2f} ms): "
                        f"**{b['speedup_p50']:.2f}×**")
        costs += [f"| {label} | {'`paradigms` round' if c['sampler'] == 'paradigms' else 'sequential step'} | "
                  f"{c['precision']} | {c['rows']} | {c['unit_ms']:.3f} | {c['model_ms']:.3f} | "
                  f"{c['bookkeeping_ms']:.3f} | {100 * c['bookkeeping_share']:.0f}% |" for c in res["round_cost"]]
    lines += ["", "Best parallel over best sequential (ms/chunk p50):", "", *best, "",
              "### The round's own cost beside the model's", "",
              "| schedule | unit | precision | rows | ms per unit | model call ms (same rows) | bookkeeping ms | "
              "bookkeeping share |", "|---|---|---|---|---|---|---|---|", *costs, "", *CAPTURED_READING]
    return lines


CAPTURED_READING = [
    "How to read it:", "",
    "- **execution**: `eager loop` is `sequential_sample`; `captured whole` is `CapturedSequential` (all S steps in "
    "one CUDA graph, what a latency-minded GPU user would run); `eager rounds (compact)` is `picard_sample` as the "
    "policy runs it (each round on the unfinished window slots only); `captured rounds (fixed)` is `CapturedPicard` "
    "(every round on all B·W slots, one graph per call signature, one host read per round). `paradigms` rows take "
    "the preset's tolerance 0.02, linear solve and secant, and start warm from their own previous chunk; the window "
    "is fixed per row (`--captured-windows`), not tuned.",
    "- **precision**: the model call in fp32 (TF32 off) or under bf16 autocast; the sampler's state is float32 "
    "either way. Every row runs the plain network (no `configure_inference` wrapper).",
    "- **ms/chunk**: wall-clock of one batch-1 chunk (conditioning, warm start, sampling, actions copied to the "
    "host), the rows interleaved per chunk on the same noise. **rounds/chunk**: sequential model calls (S for a "
    "sequential row). **deviation**: per chunk the largest distance of an executed action from sequential eager "
    "fp32's (px of PushT's 512-px arena), mean and max over chunks. **speed-up**: the schedule's fastest "
    "sequential row over this row, at the median.",
    "- **The round's own cost**: `ms per unit` is one replay of a `paradigms` row's round graph, or the captured "
    "sequential graph's replay over S (one step); `model call ms` is one call of the same network on the same rows, "
    "captured alike; `bookkeeping` is their difference (window geometry, solve, convergence test and slide; a "
    "step's scheduler arithmetic), and its share of the unit.",
]


READING = [
    "How to read it:", "",
    "- **runtime**: how the denoiser runs (`configure_inference`): `fp32` eager PyTorch, `bf16` under bf16 autocast, "
    "`cuda-graphs` replayed from CUDA graphs captured per power-of-two row count. Each runtime runs on a policy "
    "object of its own; every row of a schedule sees the same observations and noise.",
    "- **ms/chunk p50, p95**: wall-clock of one batch-1 `predict_action` with the actions copied to the host, over "
    "the replayed chunks, the rows interleaved. **rounds/chunk**: sequential denoiser calls (a sequential row needs "
    "one per step). **deviation**: per chunk the largest distance of an executed action from sequential on the first "
    "runtime, same schedule and noise (px of PushT's 512-px arena), mean and max over chunks. **speed-up**: the "
    "fastest sequential row of the schedule over this row, at the median.",
    "- **predicted ms (model calls)**: Σ over each chunk's rounds of the cost curve at that round's rows, on the row's "
    "runtime: what the model calls alone take. Measured minus predicted is the sampler's own time per chunk.",
    "- **DiffusionPolicy's default size**: not run; predicted from the shipped policy's rows per round (its windows, "
    "chosen on its own cost curve) and the default-size network's cost curve. Its own tuner might choose another "
    "window.",
]


def to_markdown(data: dict[str, Any]) -> str:
    meta, nets = data["meta"], data["networks"]
    info = meta["machine"]
    if meta["device"].startswith("cuda"):
        where = (f"Ran on CUDA: {info.get('gpu')}, CUDA {info.get('cuda')}, torch {info.get('torch')}, Python "
                 f"{info.get('python')} (TF32 matmul {info.get('tf32_matmul')}, TF32 cuDNN {info.get('tf32_cudnn')}).")
    else:
        where = ("**Ran on the CPU (no CUDA device): the CPU fallback, with reduced sizes; CUDA-graph rows are "
                 "skipped and bf16 is CPU autocast. These numbers say nothing about a GPU.**")
    lines = ["# GPU benchmark: cost curves, rounds and latency per schedule (batch 1)", "", where, "",
             f"Command: `{meta['command']}`", "", machine_line(info), "",
             f"Sizes: {'reduced' if meta['reduced'] else 'full'} (rows "
             f"{', '.join(map(str, meta['sizes']['batches']))}; "
             f"{meta['n_chunks']} replayed chunks, {meta['n_calibration_chunks']} calibration chunks). Time: "
             f"{meta['elapsed_s']:.0f} s of a {meta['time_budget_s']:.0f} s budget.", ""]
    lines += [f"- {note}" for note in meta["skipped"]]
    lines += ["", "## Cost curves", "", "Median ms of one denoiser call on n rows:", ""]
    curves = {f"{nets[net]['label']}, {mode}": curve for net, modes in data["cost"].items()
              for mode, curve in modes.items()}
    lines += [*cost_table(curves), ""]
    if data.get("captured"):
        lines += [*captured_markdown(data["captured"]), ""]
    lines += ["## Rounds and latency per schedule: the shipped PushT policy (measured)", ""]
    extra = [("predicted ms (model calls)", lambda r: _num(r["predicted_ms"].get("shipped"), "{:.1f}"))]
    for s, part in data["schedules"].items():
        lines += [f"### {schedule_label(s)}", ""]
        if "skipped" in part:
            lines += [part["skipped"], ""]
            continue
        lines += [*table(part["rows"], runtime_label="runtime", extra=extra), ""]
        lines += [f"- {tuning_line(r)}" for r in part["rows"] if r["name"] == "paradigms"]
        lines.append("")
    lines += [f"## DiffusionPolicy's default size ({nets['default']['label']}): predicted, not measured", "",
              "Predicted from the shipped policy's measured rows per round and this network's cost curve "
              "(`para_policy.window.predict_latency`), per runtime:", "",
              *predicted_table(data["schedules"], "default"), "", *READING]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS), help="folder of bench_gpu.md / .json (default: %(default)s)")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--stream", default=str(STREAM),
                        help="recorded chunk observations, a stream.json of eval/bench_latency.py "
                             "(default: %(default)s)")
    parser.add_argument("--schedules", nargs="+", default=list(DEFAULT_SCHEDULES),
                        help="schedules, ddpm<N> or ddim<N> (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=list(MODES),
                        help="runtimes of the cost curves (default: %(default)s)")
    parser.add_argument("--runtimes", nargs="+", default=list(DEFAULT_RUNTIMES), choices=list(MODES),
                        help="runtimes of the per-schedule replay, the first is the reference (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: CUDA if torch sees a device, else the CPU fallback")
    parser.add_argument("--quick", action="store_true", help="the reduced sizes of the CPU fallback, on CUDA too")
    parser.add_argument("--time-budget-s", type=float, default=420.0,
                        help="wall-clock budget; parts that would start after it are skipped (default: %(default)s)")
    parser.add_argument("--episodes", type=int, default=None, help="stream episodes to replay (default: 4; 1 reduced)")
    parser.add_argument("--max-chunks", type=int, default=None, help="chunks per episode (default: 12; 2 reduced)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="what to run: cost curves, the captured part, the per-schedule replay (default: all)")
    parser.add_argument("--captured-schedules", nargs="+", default=None,
                        help="schedules of the captured part (default: --schedules; reduced: the first of them)")
    parser.add_argument("--captured-windows", nargs="+", default=list(DEFAULT_CAPTURED_WINDOWS),
                        help="windows of the captured part's paradigms rows: 'full' (all steps) or integers, "
                             "clipped to the schedule's steps (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        for s in [*args.schedules, *(args.captured_schedules or [])]:
            parse_schedule(s)
    except ValueError as e:
        parser.error(str(e))
    for w in args.captured_windows:
        if w != "full" and not (w.isdigit() and int(w) >= 1):
            parser.error(f"--captured-windows: expected 'full' or an integer >= 1, got {w!r}")
    return args


def network_info(net: str, policy: LowdimPolicy) -> dict[str, Any]:
    shipped = net == "shipped"
    label = (f"{'shipped PushT policy' if shipped else 'DiffusionPolicy default'} ({n_params(policy) / 1e6:.1f}M, "
             f"down_dims {list(policy.config['model']['down_dims'])}{'' if shipped else ', random weights'})")
    return {"label": label, "params": n_params(policy), "model": policy.config["model"]}


def write_report(out: Path, data: dict[str, Any], budget: Budget) -> str:
    """bench_gpu.json and bench_gpu.md into ``out`` (atomically, with the time used so far); returns the md."""
    data["meta"].update(elapsed_s=budget.elapsed(), skipped=list(budget.skipped))
    md = to_markdown(data)
    text = json.dumps(data, indent=1, default=str)
    atomic_write(out / "bench_gpu.json", lambda p: Path(p).write_text(text))
    atomic_write(out / "bench_gpu.md", lambda p: Path(p).write_text(md))
    return md


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    budget = Budget(args.time_budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    reduced = args.quick or device.type != "cuda"
    sizes = REDUCED if reduced else FULL
    out = Path(args.out)
    print(f"bench_gpu on {device}" + (" (reduced sizes)" if reduced else ""), flush=True)

    shipped = load_policy(args.checkpoint, device=str(device))
    networks = {"shipped": shipped, "default": default_size_policy(shipped)}
    stream, smeta = load_stream(args.stream)
    chunks, calib = split_stream(stream, smeta["calibration_seed"], args.episodes or sizes.episodes,
                                    args.max_chunks or sizes.max_chunks, sizes.calib_chunks)
    data: dict[str, Any] = {
        "meta": {"command": "bash eval/bench_gpu.sh " + " ".join(argv), "device": str(device),
                 "machine": machine(device), "reduced": reduced, "sizes": sizes.__dict__, "n_chunks": len(chunks),
                 "n_calibration_chunks": len(calib), "stream": {"path": str(args.stream), **smeta},
                 "time_budget_s": budget.seconds},
        "networks": {net: network_info(net, p) for net, p in networks.items()}, "cost": {}, "schedules": {}}
    if "cost" in args.parts:
        data["cost"] = measure_cost(networks, args.modes, chunks[0]["obs"], sizes, budget)
    else:
        data["cost"] = {net: {m: "skipped: not in --parts" for m in args.modes} for net in networks}
    cost = data["cost"]
    write_report(out, data, budget)

    if "captured" in args.parts:
        captured = (args.captured_schedules or args.schedules)[:sizes.captured_schedules]
        data["captured"] = captured_part(shipped, captured, chunks[:sizes.captured_chunks], args, sizes, budget,
                                         lambda: write_report(out, data, budget))
    runtimes = replay_runtimes(shipped, args.runtimes, chunks[0]["obs"], sizes, budget) \
        if "replay" in args.parts else {}
    per_step_s = 0.0  # seconds per denoising step of the last schedule: the next one's estimate
    for s in args.schedules:
        steps = parse_schedule(s)[1]
        if "replay" not in args.parts:
            data["schedules"][s] = {"skipped": "skipped: not in --parts"}
        elif not runtimes:
            data["schedules"][s] = {"skipped": "skipped: no runtime"}
        elif not budget.allows(f"schedule {s}", per_step_s * steps):
            data["schedules"][s] = {"skipped": "skipped: time budget"}
        else:
            print(f"{schedule_label(s)}: tuning and replaying ...", flush=True)
            t0 = time.perf_counter()
            try:
                data["schedules"][s] = {"rows": run_schedule(runtimes, s, chunks, [c["obs"] for c in calib], sizes,
                                                             cost, args.noise_seed)}
            except Exception as e:  # the other schedules still run
                data["schedules"][s] = {"skipped": failure(f"schedule {s}", e, budget)}
            per_step_s = (time.perf_counter() - t0) / steps
        write_report(out, data, budget)  # after every part: a lease cut short still leaves its results
    print(write_report(out, data, budget))
    return data


if __name__ == "__main__":
    main()
