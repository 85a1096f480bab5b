"""Choosing the Picard window from what a batch costs on this machine.

A round of Picard sampling is one denoiser call on the rows of the window, so its cost
is the cost of a batch of that many rows. On a GPU a wide batch costs about as much as a
batch of 1 and the largest window wins; on a small CPU the cost grows with the rows (measured
cost curves: docs/benchmarks.md). Wider windows need fewer rounds but each round costs more,
so the best window is a property of the machine and the model, not a constant.

Method: the **cost curve** ``c(n)`` (median ms of one denoiser call on ``n`` rows) is
measured once; each candidate window is run on a few calibration chunks, which gives
its rows per round (``stats.rows_per_round``, independent of the machine);
the predicted latency of a chunk is ``Σ_rounds c(rows)``, with ``c`` interpolated
linearly between measured batch sizes. The window with the lowest mean prediction wins;
window 1, the sequential loop, is a candidate, so the choice is never predicted slower than
sequential sampling. :func:`calibrate_window` does it for any denoiser, :func:`tune_window`
for a policy, and :func:`resolve_window` caches the result (``window='auto'`` on every path).

Any batch size is tuned with the work of batch 1: the candidate windows run on single samples
cut from the calibration problems (one of each, :data:`CALIBRATION_SAMPLES`), whose rows per
round add up to the batch's (:func:`batch_trace`); the cost curve is timed up to
:data:`MAX_CURVE_ROWS` rows (or the widest window) and extended linearly past them; the
sampler's own time per round is timed at no more than :data:`MAX_OVERHEAD_BATCH` samples and
extended linearly in the batch size. So while tuning the model is never called on more rows
than that, whatever the batch.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
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

from para_policy.checkpoints import atomic_write

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
#: single samples the candidate windows run on, at least one per calibration problem: a batch's rounds
#: are built from them, so calibrating a batch of any size costs what calibrating batch 1 does
CALIBRATION_SAMPLES = 1
#: the largest row count the cost curve is timed at (or the widest window, if wider); rounds with more
#: rows are costed by extending the curve linearly (:func:`round_cost`), as a CPU's cost grows
MAX_CURVE_ROWS = 100
#: the largest batch the sampler's own time per round is timed at; past it, extended linearly in the batch
MAX_OVERHEAD_BATCH = 8
#: environment variable naming the folder of the window cache ("off" disables the file)
CACHE_ENV = "PARA_POLICY_CACHE_DIR"
CACHE_FILE = "windows.json"
_MEMORY: dict[str, dict[str, Any]] = {}
log = logging.getLogger("para_policy.window")


@dataclass
class Problem:
    """One calibration call: its conditioning, inpainting and trajectory shape ``(B, T, D)``.

    ``condition`` ``(n, ...)`` and ``inpaint`` ``(n, T, D)`` tensors may hold fewer rows than ``B``
    (``n >= 1``): the tuner calibrates on a few of them and reuses them cyclically.
    """

    shape: tuple[int, int, int]
    condition: torch.Tensor | None = None
    inpaint: tuple[torch.Tensor, torch.Tensor] | None = None


def problem_rows(problem: Problem, rows: Sequence[int]) -> Problem:
    """``problem`` cut to samples ``rows`` (indices into its ``B``; its tensors' rows are reused cyclically)."""
    _, T, D = problem.shape

    def take(v: torch.Tensor) -> torch.Tensor:
        return v[torch.tensor([r % v.shape[0] for r in rows], device=v.device)]

    condition = None if problem.condition is None else take(problem.condition)
    inpaint = None if problem.inpaint is None else (take(problem.inpaint[0]), take(problem.inpaint[1]))
    return Problem((len(rows), T, D), condition, inpaint)


def sample_problems(problems: Sequence[Problem], limit: int = CALIBRATION_SAMPLES) -> list[Problem]:
    """Single-sample problems ``(1, T, D)`` cut from ``problems``: sample 0 of each, then sample 1 of each, ...

    At most ``max(limit, len(problems))`` of them, so the candidate windows run on as many chunks
    at batch 64 as at batch 1 (problems of batch 1 come back as they are).
    """
    order = ((p, i) for i in range(max(p.shape[0] for p in problems)) for p in problems if i < p.shape[0])
    return [problem_rows(p, [i]) for p, i in itertools.islice(order, max(limit, len(problems)))]


def batch_trace(runs: Sequence[Sequence[int]], batch: int, shared: bool = False) -> list[list[int]]:
    """Rows per round of chunks of ``batch`` samples, built from ``runs`` of single samples.

    Chunk ``c`` holds samples ``c, c + 1, ...`` of the runs, taken cyclically (``batch`` of them).
    With per-sample windows a sample's rounds do not depend on the others in its batch, so a
    round's rows are the sum of its members' rows in that round and the chunk lasts as long as
    its slowest member. A ``shared`` window (``per_sample_windows=False``) slides with the
    slowest sample; approximated as each round evaluating ``batch`` times the rows of the member
    with the most. Batch 1 gives the runs back. Returns one trace per run.
    """
    n = len(runs)
    traces = []
    for c in range(n):
        # how many times run k appears among the chunk's batch samples (c, c + 1, ... mod n)
        counts = [batch // n + int((k - c) % n < batch % n) for k in range(n)]
        members = [(runs[k], m) for k, m in enumerate(counts) if m]
        length = max(len(r) for r, _ in members)
        rows = []
        for i in range(length):
            here = [(r[i], m) for r, m in members if i < len(r)]
            rows.append(batch * max(x for x, _ in here) if shared else sum(x * m for x, m in here))
        traces.append(rows)
    return traces


@torch.inference_mode()
def batch_overhead(schedule: Any, spec: Any, problem: Problem, windows: Sequence[int], *, seed: int = 0,
                   device: torch.device | str = "cpu") -> dict[int, float]:
    """:func:`sampler_overhead` at ``problem``'s batch ``B``, timed at no more than :data:`MAX_OVERHEAD_BATCH` samples.

    Up to that batch it is timed at ``B`` itself; past it at batch 1 and at that batch and
    extended linearly in the batch size (the sampler's own work per round is a fixed part plus
    a part per row), so a batch of thousands is not run even with a free model.
    """
    from para_policy.samplers import draw_noise

    B, T, D = problem.shape
    small = min(B, MAX_OVERHEAD_BATCH)
    sizes = [small] if B == small else [1, small]
    at = {}
    for b in sizes:
        noise = draw_noise(schedule, (b, T, D), torch.Generator().manual_seed(seed))
        at[b] = sampler_overhead(schedule, spec, problem_rows(problem, range(b)), noise, windows, device=device)
    if B == small:
        return at[B]
    return {w: at[1][w] + max(at[small][w] - at[1][w], 0.0) * (B - 1) / (small - 1) for w in at[1]}


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
        problems: the calls to calibrate on (their batch size ``B`` is the one tuned for). The
            candidates run on single samples cut from them (:func:`sample_problems`) and the
            batch's rounds are built from those (:func:`batch_trace`): the denoiser never gets
            more rows than the widest window or :data:`MAX_CURVE_ROWS`, at any ``B``.
        candidates: windows to try (clipped to the number of steps).
        cost: a cost curve measured before (``{rows: ms}``); measured now when None, up to
            :data:`MAX_CURVE_ROWS` rows (extended linearly past them).
        device: where the calibration tensors live (the denoiser's device).
    Returns:
        ``(window, info)``; info has ``cost``, ``predicted_ms`` and ``rounds`` per window, and
        ``round_shape``: with ``round_shape='auto'`` both shapes are candidates (the fixed one
        evaluates ``B·W`` rows every round, the same rounds), each with its own measured
        bookkeeping per round, and the cheaper prediction wins (``predicted_ms_fixed`` has the
        fixed shape's predictions); ``calibration_samples``, the single samples run.
    """
    if not problems:
        raise ValueError("calibrating the window needs at least one observation")
    if not spec.iterative:
        raise ValueError(f"only Picard samplers have a window, not {spec.name!r}")
    windows = sorted({min(int(w), schedule.num_steps) for w in candidates})
    first = problems[0]
    B, T, D = first.shape
    if cost is None:
        cond = None if first.condition is None else first.condition[:1]
        top = min(windows[-1] * B, max(windows[-1], MAX_CURVE_ROWS))
        sizes = sorted({n for n in DEFAULT_BATCHES if n <= top} | {top})
        cost = batch_cost_curve(denoiser, (T, D), cond, sizes, num_train_timesteps=int(schedule.timesteps.max()) + 1,
                                reps=reps, device=device)
    singles = sample_problems(problems)
    shape = spec.options.get("round_shape", "compact")
    runs = _window_runs(denoiser, schedule, spec, singles, windows, seed, device)
    shared = not spec.options.get("per_sample_windows", True)
    traces = {w: batch_trace(r, B, shared) for w, r in runs.items()}
    compact = spec.with_options(round_shape="compact") if shape == "auto" else spec
    overhead = batch_overhead(schedule, compact, first, windows, seed=seed, device=device)
    best, predicted = choose_window(cost, traces, overhead)
    rounds = {w: statistics.mean(len(t) for t in ts) for w, ts in traces.items()}
    info = {"cost": dict(cost), "predicted_ms": predicted, "rounds": rounds, "overhead_ms_per_round": overhead,
            "round_shape": "compact" if shape == "auto" else shape, "calibration_samples": len(singles)}
    if shape == "auto":  # the fixed shape: the same rounds, every slot evaluated, its own bookkeeping
        wide = [w for w in windows if w > 1]  # window 1 is the sequential loop in either shape
        if wide:
            fixed = {w: [[B * w] * len(run) for run in traces[w]] for w in wide}
            fixed_overhead = batch_overhead(schedule, spec.with_options(round_shape="fixed"), first, wide,
                                            seed=seed, device=device)
            best_fixed, predicted_fixed = choose_window(cost, fixed, fixed_overhead)
            info.update(predicted_ms_fixed=predicted_fixed, overhead_ms_per_round_fixed=fixed_overhead)
            if predicted_fixed[best_fixed] < predicted[best]:
                best, info["round_shape"] = best_fixed, "fixed"
    return best, info


def _window_runs(denoiser: Callable[..., torch.Tensor], schedule: Any, spec: Any, singles: Sequence[Problem],
                 windows: Sequence[int], seed: int, device: torch.device | str) -> dict[int, list[list[int]]]:
    """``{window: [rows_per_round of each single-sample problem]}``: each candidate run cold on each sample."""
    from para_policy.samplers import draw_noise

    g = torch.Generator().manual_seed(seed)
    noises = [draw_noise(schedule, p.shape, g) for p in singles]
    shape = spec.options.get("round_shape", "compact")
    runs: dict[int, list[list[int]]] = {}
    for w in windows:
        options = {**spec.options, "window": w, **({"round_shape": "compact"} if shape == "auto" else {})}
        for p, (x_T, noise) in zip(singles, noises, strict=True):
            _, stats = spec.family.sample(denoiser, schedule, x_T.to(device), noise.to(device),
                                          condition=p.condition, inpaint=p.inpaint, **options)
            runs.setdefault(w, []).append(list(stats.rows_per_round))
    return runs


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
    ``(n_obs_steps, obs_dim)`` (tuned for batch 1) or ``(B, n_obs_steps, obs_dim)`` (batch B; only
    the first :data:`CALIBRATION_SAMPLES` samples of each are conditioned and run: pass several
    observations to calibrate on several samples).
    Measures now; nothing is cached (:meth:`LowdimPolicy.calibrate` caches).
    """
    if not observations:
        raise ValueError("tune_window needs at least one observation to calibrate on")
    problems = []
    for o in observations:
        obs = policy.observation_batch(o)
        # conditioning (an image encoder, for an image policy) on the few samples calibrated on, not all B
        cond, inpaint = policy.conditioning(_first_rows(obs, CALIBRATION_SAMPLES))
        problems.append(Problem(policy.trajectory_shape(policy.batch_size(obs)), cond, inpaint))
    return calibrate_window(policy.denoise, policy.schedule_for(spec), spec, problems, candidates, cost=cost,
                            reps=reps, seed=seed, device=policy.device)


def _first_rows(obs: Any, n: int) -> Any:
    """The first ``n`` samples of checked observations: a ``(B, ...)`` tensor or a dict of them."""
    return {k: v[:n] for k, v in obs.items()} if isinstance(obs, Mapping) else obs[:n]


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


_WARNED: set[tuple[str, str]] = set()


def _warn_once(path: Path, what: str, message: str, *args: Any) -> None:
    """Log ``message`` once per process for each cache file and kind of fault (a cache is read on every key)."""
    if (str(path), what) not in _WARNED:
        _WARNED.add((str(path), what))
        log.warning(message, *args)


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache file's JSON object; ``{}`` when there is none.

    A file that cannot be read (a folder, no permission) or is not a JSON object is ignored
    with a warning naming it: the cache only saves time, so sampling goes on and measures again.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        _warn_once(path, "read", "cannot read the cache %s (%s); ignoring it", path, e)
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        _warn_once(path, "json", "the cache %s is not a JSON object; ignoring it (the next measurement "
                   "rewrites it)", path)
        return {}
    return data


def read_cache_entry(path: Path | None, key: str) -> Any:
    """The entry stored under ``key`` in the JSON cache file ``path`` (None if absent, unreadable or no file)."""
    return None if path is None else _read_cache(path).get(key)


def store_cache_entry(path: Path | None, key: str, entry: Any) -> None:
    """Store ``entry`` under ``key`` in ``path``, other keys kept.

    Written with :func:`~para_policy.checkpoints.atomic_write`, so a reader sees the old file or
    the new one and no temporary file is left behind. A cache that cannot be written (a
    read-only home, ``path`` itself a folder) only warns: the entry stays in this process.
    """
    if path is None:
        return
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder", str(path))
        data = _read_cache(path)
        data[key] = entry
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))
    except OSError as e:  # a read-only home keeps the in-process cache
        _warn_once(path, "write", "cannot write the cache %s: %s", path, e)


def _cached_entry(path: Path, key: str) -> dict[str, Any] | None:
    """The usable window entry under ``key`` in ``path``, its tables' keys back to ints; None if none.

    An entry that is not a resolved window (say ``"window": 0`` after a hand edit) is ignored
    with a warning naming the file and the fault, and measured again, which replaces it.
    """
    from para_policy.samplers.picard import ROUND_SHAPES

    entry = _read_cache(path).get(key)
    if entry is None:
        return None
    window = entry.get("window") if isinstance(entry, dict) else None
    shape = entry.get("round_shape") if isinstance(entry, dict) else None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        why = f"window={window!r} is not an integer >= 1"
    elif shape is not None and shape not in ROUND_SHAPES:
        why = f"round_shape={shape!r} is not one of {list(ROUND_SHAPES)}"
    else:
        try:
            return {**_int_keys(entry), "source": str(path)}
        except (AttributeError, TypeError, ValueError):
            why = "its tables are not keyed by integers"
    log.warning("ignoring the window cached in %s for this policy (%s); measuring again and replacing it",
                path, why)
    return None


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
    A cached entry that is not a usable window (``"window": 0``) is ignored with a warning
    naming the file and the fault, and the new measurement replaces it.
    """
    path = cache_path()
    if not recalibrate:
        if key in _MEMORY:
            entry = _MEMORY[key]
            return int(entry["window"]), dict(entry)
        entry = None if path is None else _cached_entry(path, key)
        if entry is not None:
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
