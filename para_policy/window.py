"""Choosing the Picard window from what a batch costs on this machine.

A round of Picard sampling is one denoiser call on the rows of the window, so its cost
is the cost of a batch of that many rows. On a GPU a batch of 100 costs about as much
as a batch of 1 and the largest window wins; on a small CPU it does not (the shipped
PushT net on 2 cores: a batch of 16 costs about 2 single calls, a batch of 100 about
6). Wider windows need fewer rounds but each round costs more, so the best window is a
property of the machine and the model, not a constant.

Method: the **cost curve** ``c(n)`` (median ms of one denoiser call on ``n`` rows) is
measured once; each candidate window is run on a few calibration chunks, which gives
its rows per round (``stats.rows_per_round``, independent of the machine);
the predicted latency of a chunk is ``Σ_rounds c(rows)``, with ``c`` interpolated
linearly between measured batch sizes. The window with the lowest mean prediction wins;
window 1, the sequential loop, is a candidate, so the choice is never predicted slower than
sequential sampling. :func:`calibrate_window` does it for any denoiser, :func:`tune_window`
for a policy, and :func:`resolve_window` caches the result (``window='auto'`` on every path).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
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


def choose_window(cost: Mapping[int, float], traces: Mapping[int, Sequence[Sequence[int]]],
                  overhead: Mapping[int, float] | None = None) -> tuple[int, dict]:
    """The window with the lowest predicted mean latency.

    Args:
        cost: ``{batch size: ms}`` from :func:`batch_cost_curve`.
        traces: ``{window: [rows_per_round of each calibration chunk]}``.
        overhead: ``{window: ms}`` the sampler's own work per round outside the model call
            (:func:`sampler_overhead`); it matters where rounds are many and calls cheap, e.g.
            window 1's hundred steps against a few wide rounds. None: 0.
    Returns:
        ``(window, {window: predicted mean ms})``; ties go to the smaller window.
    """
    if not traces:
        raise ValueError("no candidate windows")
    predicted = {}
    for w, runs in traces.items():
        if not runs:
            raise ValueError(f"window {w} has no calibration runs")
        per_round = 0.0 if overhead is None else float(overhead[int(w)])
        predicted[int(w)] = statistics.mean(predict_latency(cost, r) + per_round * len(r) for r in runs)
    best = min(sorted(predicted), key=lambda w: predicted[w])
    return best, predicted


#: window 1 is the sequential loop: with it among the candidates, ``auto`` never predicts slower than sequential
CANDIDATE_WINDOWS = (1, 8, 16, 24, 32, 48, 64, 100)
#: environment variable naming the folder of the window cache ("off" disables the file)
CACHE_ENV = "PARA_POLICY_CACHE_DIR"
CACHE_FILE = "windows.json"
_MEMORY: dict[str, dict[str, Any]] = {}
log = logging.getLogger("para_policy.window")


@dataclass
class Problem:
    """One calibration call: its conditioning, inpainting and trajectory shape ``(B, T, D)``."""

    shape: tuple[int, int, int]
    condition: torch.Tensor | None = None
    inpaint: tuple[torch.Tensor, torch.Tensor] | None = None


@torch.inference_mode()
def calibrate_window(
    denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    schedule: Any,
    spec: Any,
    problems: Sequence[Problem],
    candidates: Sequence[int] = CANDIDATE_WINDOWS,
    *,
    cost: Mapping[int, float] | None = None,
    reps: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[int, dict[str, Any]]:
    """The window for ``spec`` on this machine: cost curve × rows per round on ``problems``.

    Args:
        denoiser: the callable the sampler will be handed.
        schedule: the :class:`~para_policy.schedule.Schedule` it samples on.
        spec: the iterative :class:`~para_policy.samplers.SamplerConfig` to tune (its
            window is replaced by each candidate, everything else kept). Calibration calls
            are cold and draw their own noise from ``seed``.
        problems: the calls to calibrate on (their batch size is the one tuned for).
        candidates: windows to try (clipped to the number of steps).
        cost: a cost curve measured before (``{rows: ms}``); measured now when None.
        device: where the calibration tensors live (the denoiser's device).
    Returns:
        ``(window, info)``; info has ``cost``, ``predicted_ms`` and ``rounds`` per window, and
        ``round_shape``: with ``round_shape='auto'`` both shapes are candidates (the fixed one
        evaluates ``B·W`` rows every round, the same rounds), each with its own measured
        bookkeeping per round, and the cheaper prediction wins (``predicted_ms_fixed`` has the
        fixed shape's predictions).
    """
    from para_policy.samplers import draw_noise

    if not problems:
        raise ValueError("calibrating the window needs at least one observation")
    if not spec.iterative:
        raise ValueError(f"only Picard samplers have a window, not {spec.name!r}")
    S = schedule.num_steps
    windows = sorted({min(int(w), S) for w in candidates})
    first = problems[0]
    B, T, D = first.shape
    if cost is None:
        cond = None if first.condition is None else first.condition[:1]
        top = windows[-1] * B
        sizes = sorted({n for n in DEFAULT_BATCHES if n <= top} | {top})
        cost = batch_cost_curve(denoiser, (T, D), cond, sizes, num_train_timesteps=int(schedule.timesteps.max()) + 1,
                                reps=reps, device=device)
    g = torch.Generator().manual_seed(seed)
    noises = [draw_noise(schedule, p.shape, g) for p in problems]
    traces: dict[int, list[list[int]]] = {}
    fn = spec.family.sample
    shape = spec.options.get("round_shape", "compact")
    for w in windows:
        options = {**spec.options, "window": w, **({"round_shape": "compact"} if shape == "auto" else {})}
        for p, (x_T, noise) in zip(problems, noises, strict=True):
            _, stats = fn(denoiser, schedule, x_T.to(device), noise.to(device), condition=p.condition,
                          inpaint=p.inpaint, **options)
            traces.setdefault(w, []).append(list(stats.rows_per_round))
    compact = spec.with_options(round_shape="compact") if shape == "auto" else spec
    overhead = sampler_overhead(schedule, compact, first, noises[0], windows, device=device)
    best, predicted = choose_window(cost, traces, overhead)
    rounds = {w: statistics.mean(len(t) for t in ts) for w, ts in traces.items()}
    info = {"cost": dict(cost), "predicted_ms": predicted, "rounds": rounds, "overhead_ms_per_round": overhead,
            "round_shape": "compact" if shape == "auto" else shape}
    if shape == "auto":  # the fixed shape: the same rounds, every slot evaluated, its own bookkeeping
        wide = [w for w in windows if w > 1]  # window 1 is the sequential loop in either shape
        if wide:
            fixed = {w: [[B * w] * len(run) for run in traces[w]] for w in wide}
            fixed_overhead = sampler_overhead(schedule, spec.with_options(round_shape="fixed"), first, noises[0],
                                              wide, device=device)
            best_fixed, predicted_fixed = choose_window(cost, fixed, fixed_overhead)
            info.update(predicted_ms_fixed=predicted_fixed, overhead_ms_per_round_fixed=fixed_overhead)
            if predicted_fixed[best_fixed] < predicted[best]:
                best, info["round_shape"] = best_fixed, "fixed"
    return best, info


def tuned_spec(spec: Any, window: int, info: Mapping[str, Any] | None = None) -> Any:
    """``spec`` with what tuning chose: the window, and the round shape where it was ``'auto'``.

    The one way every path (policy, Controller, evaluator, patches) turns a resolved window
    into the spec it samples with.
    """
    changes: dict[str, Any] = {"window": int(window)}
    if spec.options.get("round_shape") == "auto":
        changes["round_shape"] = (info or {}).get("round_shape") or "compact"
    return spec.with_options(**changes)


@torch.inference_mode()
def sampler_overhead(schedule: Any, spec: Any, problem: Problem, noise: tuple[torch.Tensor, torch.Tensor],
                     windows: Sequence[int], *, reps: int = 3, device: torch.device | str = "cpu"
                     ) -> dict[int, float]:
    """``{window: ms}``: the sampler's own time per round, the model replaced by a free one.

    The sampler runs on ``problem`` with a denoiser that returns zeros at no cost, so its
    time per round is what the cost curve leaves out (scheduler arithmetic, the linear solve,
    bookkeeping). Median of ``reps`` runs per window.
    """
    def free(x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros_like(x)

    x_T, step_noise = (n.to(device) for n in noise)
    cuda = torch.device(device).type == "cuda"
    out = {}
    for w in windows:
        options = {**spec.options, "window": int(w)}
        per_round = []
        for _ in range(reps):
            if cuda:  # the clock reads after the device finished: its queue holds the sampler's kernels
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            _, stats = spec.family.sample(free, schedule, x_T, step_noise, condition=problem.condition,
                                          inpaint=problem.inpaint, **options)
            if cuda:
                torch.cuda.synchronize(device)
            per_round.append((time.perf_counter() - t0) * 1000 / max(stats.rounds, 1))
        out[int(w)] = statistics.median(per_round)
    return out


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
    """:func:`calibrate_window` for a :class:`~para_policy.policy.LowdimPolicy` on a few observations.

    ``observations``: as :meth:`LowdimPolicy.observation_batch` takes them, e.g. arrays of
    ``(n_obs_steps, obs_dim)`` (tuned for batch 1) or ``(B, n_obs_steps, obs_dim)`` (batch B).
    Measures now; nothing is cached (:meth:`LowdimPolicy.calibrate` caches).
    """
    if not observations:
        raise ValueError("tune_window needs at least one observation to calibrate on")
    problems = []
    for o in observations:
        obs = policy.observation_batch(o)
        cond, inpaint = policy.conditioning(obs)
        problems.append(Problem(policy.trajectory_shape(policy.batch_size(obs)), cond, inpaint))
    return calibrate_window(policy.denoise, policy.schedule_for(spec), spec, problems, candidates, cost=cost,
                            reps=reps, seed=seed, device=policy.device)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of a network's parameter names and bytes: the identity a window is cached under."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def window_key(model_id: str, spec: Any, schedule: Any, batch_size: int, device: Any, denoiser_id: str = "") -> str:
    """The cache key of a resolved window: policy, sampler options, schedule, batch size, device, machine."""
    options = {k: v for k, v in spec.options.items() if k != "window"}
    sched = [schedule.kind, schedule.num_steps, *([schedule.order] if schedule.order > 1 else [])]  # + DPM's order
    return json.dumps({"model": model_id, "denoiser": denoiser_id, "family": spec.family.sample.__name__,
                       "options": options, "schedule": sched,
                       "batch": int(batch_size), "device": device_label(device), "machine": machine_id()},
                      sort_keys=True)


def device_label(device: Any) -> str:
    """``str(device)``, with the GPU's name for a CUDA device (``'cuda:0'`` alone does not say which GPU)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def machine_id() -> dict[str, Any]:
    """What a timing measured here depends on, beyond the model: processor, CPU count, torch threads and version."""
    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def cache_path(name: str = CACHE_FILE) -> Path | None:
    """The window cache file, ``$PARA_POLICY_CACHE_DIR/windows.json`` (default folder ``~/.cache/para_policy``).

    ``name``: another file of the same folder (``backend='auto'``'s cost curves live in
    ``backends.json``). None when the variable is ``off`` (or empty): kept in this process only.
    """
    folder = os.environ.get(CACHE_ENV)
    if folder is not None and folder.strip().lower() in ("", "off", "0", "none"):
        return None
    base = Path(folder) if folder else Path(os.path.expanduser("~")) / ".cache" / "para_policy"
    return base / name


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def read_cache_entry(path: Path | None, key: str) -> Any:
    """The entry stored under ``key`` in the JSON cache file ``path`` (None if absent, unreadable or no file)."""
    return None if path is None else _read_cache(path).get(key)


def store_cache_entry(path: Path | None, key: str, entry: Any) -> None:
    """Store ``entry`` under ``key`` in ``path`` (atomically; other keys kept); a read-only folder only logs."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = entry
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home keeps the in-process cache
        log.warning("cannot write the cache %s: %s", path, e)


def cached_window(key: str) -> dict[str, Any] | None:
    """The entry this process resolved or read under ``key`` (None if none)."""
    entry = _MEMORY.get(key)
    return None if entry is None else dict(entry)


def _int_keys(entry: dict[str, Any]) -> dict[str, Any]:
    """JSON's string keys of the per-size / per-window tables back to ints."""
    tables = ("cost", "predicted_ms", "rounds", "overhead_ms_per_round", "predicted_ms_fixed",
              "overhead_ms_per_round_fixed")
    return {k: ({int(n): v for n, v in val.items()} if k in tables and
                isinstance(val, dict) else val) for k, val in entry.items()}


def resolve_window(key: str, tune: Callable[[], tuple[int, dict[str, Any]]], *,
                   recalibrate: bool = False) -> tuple[int, dict[str, Any]]:
    """The window cached under ``key`` (this process, then the cache file), or ``tune()``'s, then cached.

    Why a file: the tuner times calls, so two runs on one machine can pick different
    windows within its noise; reusing the first choice makes later runs reproducible.
    ``recalibrate`` measures again and replaces the entry. Returns ``(window, info)``;
    ``info['source']`` says where it came from (``'measured'`` in this process, or the file).
    """
    path = cache_path()
    if not recalibrate:
        if key in _MEMORY:
            entry = _MEMORY[key]
            return int(entry["window"]), dict(entry)
        if path is not None:
            entry = _read_cache(path).get(key)
            if isinstance(entry, dict) and isinstance(entry.get("window"), int):
                entry = {**_int_keys(entry), "source": str(path)}
                _MEMORY[key] = entry
                log.info("window auto -> %d (cached in %s)", entry["window"], path)
                return int(entry["window"]), dict(entry)
    t0 = time.perf_counter()
    window, info = tune()
    entry = _int_keys(json.loads(json.dumps(
        {"window": int(window), **info, "tuning_s": round(time.perf_counter() - t0, 2)}, default=float)))
    _MEMORY[key] = {**entry, "source": "measured"}
    log.info("window auto -> %d (measured in %.1f s; predicted ms %s)", window, entry["tuning_s"],
             ", ".join(f"w{w}: {ms:.0f}" for w, ms in info["predicted_ms"].items()))
    store_cache_entry(path, key, {k: v for k, v in entry.items() if k != "source"})
    return int(window), {**entry, "source": "measured"}
