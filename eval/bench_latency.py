"""Latency per schedule on a recorded PushT control stream: our sampler against what users run instead.

What a robot waits for is one ``predict_action`` at batch 1, chunk after chunk, each from the
observation the last chunk led to. A user who wants latency either runs the sequential loop on
the schedule their policy samples with, or a shorter DDIM or DPM-Solver++ schedule. Schedule
names (``--schedules``, ``ddpm100 ddim16 ddim10 ddim8`` by default; each built with
:func:`para_policy.samplers.sampler_spec` from the checkpoint's betas and prediction type):

- ``ddpm<N>``: DDPM with N steps (``ddpm100``, the shipped policy's own);
- ``ddim<N>``: DDIM with N steps, eta 0 (``ddim10``);
- ``dpm<order>-<N>``: DPM-Solver++ multistep (``scheduler='dpmsolver++'``, ``solver_order`` 1-3,
  :func:`para_policy.schedule.dpm_from` otherwise) with N steps: ``dpm2-10`` is order 2 (2M) at 10
  steps, ``dpm3-5`` order 3 at 5. Labelled ``DPM-Solver++(2)-10`` in the tables. ``dpm_from`` sets
  diffusers' ``lambda_min_clipped=-5.1`` on cosine beta schedules such as DiffusionPolicy's
  ``squaredcos_cap_v2`` (without it DPM-Solver++'s first clean-sample prediction divides by
  sqrt(ᾱ) = 5e-4 on the shipped policy, unclipped); ``--dpm-lambda-min-clipped=LAMBDA`` overrides it
  (``=-inf``: diffusers' own default, the unclipped solver).

For every schedule, in ONE interleaved run:

1. **Record** the observation stream of real PushT rollouts of the shipped policy (sequential
   DDPM-100, the policy as trained): ``--episodes`` episodes from env seed 100000,
   ``--max-chunks`` chunks each, plus one more episode whose chunks calibrate the windows. The
   stream is saved as ``<out>/stream.json``; ``--stream`` replays a saved one instead.
2. **Backends** (``--backends``, default ``eager auto``): each its own policy object (the
   checkpoint loaded once per backend, so their denoisers do not interfere), set with
   ``configure_inference(policy, backend=...)`` (``auto``: per row count, the faster of eager
   PyTorch and ONNX Runtime). A backend that this checkout or machine cannot run (no
   ``backend`` option yet, no onnxruntime) is skipped with a printed note.
   **Cost curve**: the median time of one denoiser call on n = 1 … 100 rows, per backend.
3. **Windows**: the ``paradigms`` preset's ``window="auto"`` resolved by each backend's policy
   itself, measured now on the calibration chunks by its tuner (:meth:`LowdimPolicy.calibrate`,
   which also updates the window cache; ``--cached-windows`` takes the cache's window where
   it has one, :meth:`LowdimPolicy.resolve`, as ``eval.py`` would). Window 1, the sequential
   loop, is among the tuner's candidates.
4. **Replay** every chunk, in order, through every row of every schedule, the order of the rows
   alternating per chunk: ``sequential`` and ``paradigms`` on every backend, and ParaDiGMS as
   published (``paradigms_published``: window 16, tolerance 0.1, cold, the batch waiting for
   its slowest sample) on eager. Rows of one schedule see the same ``x_T`` and step noise per
   chunk. Warm-started rows start each chunk from their *own* previous chunk shifted by the
   executed actions (an episode's first chunk is cold, as in a control loop, and is counted).
5. **Report** per row: median / p95 ms per chunk, rounds and model evaluations per chunk, the
   executed actions' deviation from the same schedule's sequential sampler on eager on the
   same noise (pixels; per chunk the max over its executed actions, then mean and max over
   chunks), and the speed-up against the fastest sequential row of the schedule.
6. ``--scores``: the closed-loop mean score (``--score-episodes``, 50 by default) of each
   schedule's ``sequential`` and ``paradigms``, rolled out with the evaluator's
   :func:`para_policy.evaluation.rollout.run_rollouts` on eager PyTorch, batched over
   ``--score-envs`` envs (scores do not depend on the machine); ``paradigms`` once per window
   its backends chose. Each is cached in ``<out>/scores/<name>/score.json`` (``ddim10_sequential``,
   ``ddim10_paradigms_w10``) after every episode, with a fingerprint of
   checkpoint, sampler spec, episodes and seeds: a rerun reuses it, an interrupted one resumes,
   and a changed setting recomputes.
7. ``--ablations``: the DDPM-100 rows that take ParaDiGMS as published apart (each improvement
   alone, ParaTAA, a bf16 denoiser, a tolerance sweep; their windows chosen from the eager cost
   curve on the calibration chunks), in the same interleaved replay, and the per-sample-window
   measurements on batches of chunks.

Writes ``<out>/bench_latency.{md,json}``, ``stream.json``, ``latency_vs_score.png`` (with
``--scores``) and ``latency_vs_tolerance.png`` (with ``--ablations``), atomically.
Measure on a quiet machine: other processes change the milliseconds (not the rounds).

    python eval/bench_latency.py --scores                     # the per-schedule table and scores
    python eval/bench_latency.py --episodes 1 --max-chunks 3 --schedules ddim8 ddim10 --out /tmp/bl
    python eval/bench_latency.py --scores --schedules ddpm100 ddim16 ddim10 dpm2-5 dpm2-10 dpm3-5 \
        --out eval/results/bench_latency_dpm           # the front: DPM-Solver++ next to DDIM and DDPM

With ``--scores`` the report also has **the front**: every schedule's fastest sequential and fastest
``paradigms`` row, with score, latency over the fastest sequential sampler of all schedules (p50 and
p95), rounds and deviation, and which rows no other is both faster and better-scoring than; and
each backend's ``paradigms`` (``window='auto'``) against its own sequential loop.

The functions that replay a stream import nothing from :mod:`para_policy.evaluation` (whose
extras a bare GPU machine lacks): ``eval/bench_gpu.py`` runs them on CUDA.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from para_policy.bench.latency import (
    CHECKPOINT,
    DEFAULT_SCHEDULES,
    REFERENCE_BACKEND,
    REPLAY_STREAM,
    ROOT,
    SAMPLER_LABELS,
    Variant,
    cost_curves,
    cost_table,
    machine_line,
    predicted_ms,
    replay,
    replay_noise,
    resolve_paradigms,
    row_label,
    run_call,
    schedule_variants,
    summarize,
    table,
    tuning_line,
    variant_key,
)
from para_policy.bench.schedules import (  # noqa: F401  (schedule_spec: the script's API, as before)
    SCHEDULE_SYNTAX,
    parse_schedule,
    schedule_label,
    schedule_order,
    schedule_spec,
)
from para_policy.bench.stream import load_stream, save_stream, split_stream
from para_policy.checkpoints import atomic_write
from para_policy.inference import configure_inference
from para_policy.loading import load_policy
from para_policy.policy import LowdimPolicy
from para_policy.samplers import SamplerConfig, sampler_spec
from para_policy.window import CANDIDATE_WINDOWS, DEFAULT_BATCHES, choose_window

RESULTS = ROOT / "eval" / "results" / "bench_latency"
DEFAULT_BACKENDS = ("eager", "auto")
PUSHT_MAX_STEPS = 300  # DiffusionPolicy's PushT test protocol (configs/task/pusht.yaml)
SCORED = ("sequential", "paradigms")


# ---- schedules and variants ------------------------------------------------------------------

def schedule_family(name: str) -> str:
    """``'DDPM'``, ``'DDIM'``, ``'DPM-Solver++(2)'``: the schedule without its step count (plot colours)."""
    kind, _ = parse_schedule(name)
    order = schedule_order(name)
    return kind.upper() if order is None else f"DPM-Solver++({order})"


# ---- policies and backends -------------------------------------------------------------------

def backend_policies(checkpoint: str | Path, backends: Sequence[str], device: str = "cpu"
                     ) -> tuple[dict[str, LowdimPolicy], dict[str, str]]:
    """One policy object per backend that runs here (eager first), and why the others were skipped.

    A policy of its own per backend: their denoisers, warm-start memories and window caches
    stay apart. Non-eager backends need ``configure_inference(policy, backend=...)`` and
    onnxruntime; where either is missing the backend is skipped (so this script runs before
    and after that option exists).
    """
    policies: dict[str, LowdimPolicy] = {}
    skipped: dict[str, str] = {}
    for backend in dict.fromkeys([REFERENCE_BACKEND, *backends]):
        if backend != REFERENCE_BACKEND and importlib.util.find_spec("onnxruntime") is None:
            skipped[backend] = "onnxruntime is not importable"
            continue
        policy = load_policy(checkpoint, device=device, backend="eager")
        if backend != REFERENCE_BACKEND:
            try:
                configure_inference(policy, backend=backend)
            except (TypeError, ValueError, ImportError) as e:
                skipped[backend] = f"configure_inference(policy, backend={backend!r}) failed: {type(e).__name__}: {e}"
                continue
        policies[backend] = policy
    return policies, skipped


# ---- the stream ------------------------------------------------------------------------------

def pusht_task(policy: LowdimPolicy, episodes: int, seed_start: int, max_steps: int) -> Any:
    """The evaluator's PushT task settings (keypoint observations) for ``episodes`` seeds from ``seed_start``."""
    from para_policy.evaluation.config import TaskSettings

    return TaskSettings(name="pusht", env_id="gym_pusht/PushT-v0", obs_type="keypoints", obs_dim=policy.obs_dim,
                        action_dim=policy.action_dim, episodes=episodes, seed_start=seed_start, max_steps=max_steps,
                        fps=10)


def record_stream(policy: LowdimPolicy, episodes: int, max_chunks: int, seed_start: int) -> list[dict[str, Any]]:
    """Chunk observations of ``episodes`` rollouts with sequential DDPM-100, in order."""
    from para_policy.evaluation.rollout import run_rollouts

    task = pusht_task(policy, episodes, seed_start, max_chunks * policy.n_action_steps)
    records, _ = run_rollouts(policy, sampler_spec("sequential"), task, task.seeds, num_envs=min(episodes, 8),
                              record_obs=True, progress=True, desc="recording")
    chunks = []
    for rec in records:
        if rec["error"]:
            raise RuntimeError(f"recording episode {rec['seed']} failed: {rec['error']}")
        for c, obs in enumerate(rec["chunk_obs"]):
            chunks.append({"episode": rec["seed"], "chunk": c, "obs": np.asarray(obs, dtype=np.float32)})
    return chunks


# ---- scores ----------------------------------------------------------------------------------

def score_name(schedule: str, sampler: str, window: Any = None) -> str:
    """The folder name of a score: ``ddim10_sequential``, ``ddim10_paradigms_w10`` (one per resolved window)."""
    return f"{schedule}_{sampler}" + ("" if window is None else f"_w{window}")


def row_score(scores: Mapping[str, Any], r: Mapping[str, Any]) -> float | None:
    """The mean score of a per-schedule row's sampler spec (None when it was not scored)."""
    if r["group"] != "schedule":
        return None
    return (scores.get(score_name(r["schedule"], r["name"], r["window"])) or {}).get("mean_score")


def load_score_progress(path: Path, fingerprint: dict[str, Any]) -> list[dict[str, Any]]:
    """The episodes an earlier run of the same config saved in ``path``; none (with a note) if its settings differ."""
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    if saved.get("fingerprint") != fingerprint:
        print(f"note: {path} holds another config's episodes (checkpoint, sampler, episodes or seeds differ): "
              "recomputing", flush=True)
        return []
    return list(saved.get("episodes", []))


def run_score(policy: LowdimPolicy, spec: SamplerConfig, name: str, folder: Path, checkpoint: str | Path,
              episodes: int, seed_start: int, *, noise_seed: int = 0, num_envs: int = 8,
              max_steps: int = PUSHT_MAX_STEPS, progress: bool = True) -> dict[str, Any]:
    """The closed-loop score of ``spec``, cached in ``folder/score.json`` after every episode.

    The evaluator's rollouts (:func:`run_rollouts`: same noise per (episode, chunk) as
    ``eval.py``), so a rerun reuses the saved episodes and an interrupted one runs only the
    missing seeds; the fingerprint (checkpoint, spec, episodes, seeds, noise, task) must match.
    """
    from para_policy.evaluation.config import file_fingerprint
    from para_policy.evaluation.report import summarize_episodes
    from para_policy.evaluation.rollout import run_rollouts

    task = pusht_task(policy, episodes, seed_start, max_steps)
    fingerprint = {"checkpoint": file_fingerprint(Path(checkpoint)), "spec": spec_fingerprint(spec),
                   "episodes": episodes,
                   "seeds": task.seeds, "noise_seed": noise_seed, "task": task.fingerprint(), "runtime": "eager"}
    path = folder / "score.json"
    done = load_score_progress(path, fingerprint)

    def save() -> None:
        data = {"fingerprint": fingerprint, "episodes": done, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write(path, lambda p: Path(p).write_text(json.dumps(data, indent=1)))

    def on_episode(rec: dict[str, Any]) -> None:
        done.append({k: v for k, v in rec.items() if k not in ("chunk_obs", "chunk_guess", "traceback")})
        save()

    seen = {e["seed"] for e in done}
    todo = [s for s in task.seeds if s not in seen]
    if todo:
        run_rollouts(policy, spec, task, todo, noise_seed=noise_seed, num_envs=num_envs, on_episode=on_episode,
                     progress=progress, desc=f"score {name}")
    order = {s: i for i, s in enumerate(task.seeds)}
    done[:] = sorted((e for e in done if e["seed"] in order), key=lambda e: order[e["seed"]])
    save()
    summary = summarize_episodes(done)
    return {"name": name, "spec": spec.as_dict(), "episodes": len(done), "n_failed": summary["n_failed"],
            "mean_score": summary["mean_score"], "success_rate": summary["success_rate"],
            "computed": len(todo), "folder": str(folder)}


def spec_fingerprint(spec: SamplerConfig) -> dict[str, Any]:
    """``spec.as_dict()`` without a ``solver_order`` of None: a DDPM or DDIM spec fingerprints as it did
    before specs had a solver order, so the scores cached then still match. A DPM-Solver++ spec adds the
    twin's options of ``--dpm-lambda-min-clipped`` when set."""
    out = {k: v for k, v in spec.as_dict().items() if not (k == "solver_order" and v is None)}
    if DPM_TWIN_OPTIONS and spec.scheduler in DPM_SCHEDULERS:
        out["dpm_twin"] = dict(DPM_TWIN_OPTIONS)
    return out


#: options added to the DPM-Solver++ twin of the policy's scheduler (``--dpm-lambda-min-clipped``); empty: as
#: :func:`para_policy.schedule.dpm_from` builds it
DPM_TWIN_OPTIONS: dict[str, Any] = {}
DPM_SCHEDULERS = ("dpmsolver++", "sde-dpmsolver++")


def use_dpm_twin_options(**options: Any) -> None:
    """Build every DPM-Solver++ schedule of this process with ``options`` added to the diffusers scheduler.

    ``sampler_spec`` has no way to pass DPMSolverMultistepScheduler options to the DPM-Solver++ twin of a
    DDPM-trained policy (:func:`para_policy.schedule.dpm_from` takes diffusers' defaults), so this wraps
    the twin builder where the sampler registry calls it. ``lambda_min_clipped`` is what diffusers documents
    as "critical for cosine (squaredcos_cap_v2) noise schedule": the shipped policy's last ᾱ is 2.4e-7, and
    DPM-Solver++'s first clean-sample prediction (x − σ ε) / α then multiplies the network's error by ~2000,
    unclipped. The option goes into the score fingerprints of DPM-Solver++ rows.
    """
    import para_policy.samplers.registry as registry
    from para_policy.schedule import dpm_from

    def twin(scheduler: Any, solver_order: int = 2, algorithm_type: str = "dpmsolver++") -> Any:
        built = dpm_from(scheduler, solver_order=solver_order, algorithm_type=algorithm_type)
        return type(built).from_config(built.config, **options)

    DPM_TWIN_OPTIONS.clear()
    DPM_TWIN_OPTIONS.update(options)
    registry.dpm_from = twin if options else dpm_from


def spec_of(saved: Mapping[str, Any]) -> SamplerConfig:
    """The :class:`SamplerConfig` of its ``as_dict()`` form (a json row's ``spec``)."""
    return sampler_spec(saved["name"], scheduler=saved["scheduler"], num_inference_steps=saved["num_inference_steps"],
                        warm_start=saved["warm_start"], solver_order=saved.get("solver_order"), **saved["options"])


def scores_for(policy: LowdimPolicy, rows: Sequence[dict[str, Any]], args: argparse.Namespace, out: Path
               ) -> dict[str, dict[str, Any]]:
    """The score of each schedule's sequential sampler and ``paradigms``, rolled out on eager.

    ``rows``: :func:`summary_row`'s (each holds its sampler spec), so an earlier run's json can be
    scored later (``--report-only ... --scores``). ``paradigms`` once per window its backends
    resolved: a backend's rows differ from eager's by rounding only, so its spec on eager stands for it.
    """
    wanted = set(args.score_schedules or {r["schedule"] for r in rows})
    specs = {score_name(r["schedule"], r["name"], r["window"]): spec_of(r["spec"]) for r in rows
             if r["group"] == "schedule" and r["name"] in SCORED and r["schedule"] in wanted}
    scores = {}
    for name, spec in specs.items():
        print(f"score {name} ({args.score_episodes} episodes) ...", flush=True)
        scores[name] = run_score(policy, spec, name, out / "scores" / name, args.checkpoint, args.score_episodes,
                                 args.seed_start, noise_seed=args.noise_seed, num_envs=args.score_envs,
                                 max_steps=args.score_max_steps)
    return scores


# ---- ablations (DDPM-100) -------------------------------------------------------------------

def picard(name: str, window: int, tolerance: float, *, taa: bool = False, warm: bool = False, linear: bool = False,
           secant: bool = False, wait_for_worst: bool = False, group: str = "ablation", runtime: str = "eager"
           ) -> Variant:
    """A DDPM-100 Picard setting compared with sequential DDPM-100 on eager."""
    spec = sampler_spec("parataa" if taa else "paradigms_published", scheduler="ddpm", num_inference_steps=100,
                        window=window, tolerance=tolerance, per_sample_windows=not wait_for_worst,
                        linear_solve=linear or secant, secant=secant, warm_start=warm)
    return Variant(name, "ddpm100", spec, runtime, variant_key("ddpm100", "sequential", REFERENCE_BACKEND), group)


def combined(window: int, tolerance: float, group: str = "ablation", runtime: str = "eager", name: str = "",
             taa: bool = False, secant: bool = True) -> Variant:
    """Warm start + linear solve + secant, the window from the cost curve (ParaTAA measured on top)."""
    return picard(name or f"all combined (w{window}, tol {tolerance})", window, tolerance, taa=taa, warm=True,
                  linear=True, secant=secant, group=group, runtime=runtime)


def ablation_variants(tolerance: float, best_tolerance: float, tolerances: Sequence[float], w_picard: int,
                      w_best: int) -> list[Variant]:
    """Each change to ParaDiGMS as published alone, all combined, ParaTAA and bf16 on top, a tolerance sweep."""
    v = [
        picard("+ warm start (w16)", 16, tolerance, warm=True),
        picard("+ ParaTAA (w16)", 16, tolerance, taa=True),
        picard("+ linear solve (w16)", 16, tolerance, linear=True),
        picard("+ linear solve (w100)", 100, tolerance, linear=True),
        picard("+ linear solve + secant (w100)", 100, tolerance, secant=True),
        picard(f"+ cost-curve window (w{w_picard})", w_picard, tolerance),
        combined(w_best, best_tolerance),
        combined(w_best, best_tolerance, taa=True, name=f"all combined + ParaTAA (w{w_best}, tol {best_tolerance})"),
        combined(48, best_tolerance, taa=True, secant=False,
                 name=f"previous default: ParaTAA, no secant (w48, tol {best_tolerance})"),
        combined(w_best, best_tolerance, runtime="bf16", name=f"all combined, bf16 (w{w_best}, tol {best_tolerance})"),
    ]
    for tol in tolerances:
        if tol != tolerance:
            v.append(picard(f"published w16, tol {tol}", 16, tol, wait_for_worst=True, group="sweep"))
        if tol != best_tolerance:
            v.append(combined(w_best, tol, group="sweep", name=f"combined w{w_best}, tol {tol}"))
    return v


def ablation_windows(policies: Mapping[str, LowdimPolicy], chunks: Sequence[dict[str, Any]], cost: Mapping[int, float],
                     tolerance: float, best_tolerance: float, noise_seed: int) -> dict[str, Any]:
    """Rows per round of each candidate window on the calibration chunks, and the windows the cost curve picks."""
    out: dict[str, Any] = {}
    for label in ("picard_cold", "combined"):
        traces: dict[int, list[list[int]]] = {}
        for w in CANDIDATE_WINDOWS:
            v = picard(label, w, tolerance) if label == "picard_cold" else combined(w, best_tolerance)
            for ch in chunks:
                rec = run_call(policies, v, ch, (REPLAY_STREAM, noise_seed, ch["episode"], ch["chunk"]))
                traces.setdefault(w, []).append(rec["rows_per_round"])
        best, predicted = choose_window(cost, traces)
        out[label] = {"window": best, "predicted_ms": predicted,
                      "rounds": {w: statistics.mean(len(t) for t in ts) for w, ts in traces.items()}}
    return out


def per_sample_windows(policy: LowdimPolicy, chunks: list[dict[str, Any]], sizes: Sequence[int], tolerance: float,
                       noise_seed: int, reps: int) -> list[dict[str, Any]]:
    """One batched call of ``n`` chunk observations: each sample's own window vs waiting for the worst."""
    rows = []
    for n in sizes:
        picked = [chunks[i % len(chunks)] for i in range(n)]
        obs = torch.from_numpy(np.stack([c["obs"] for c in picked]))
        keys = [(REPLAY_STREAM, noise_seed, c["episode"], c["chunk"]) for c in picked]
        for taa in (False, True):
            results = {}
            for own in (False, True):
                spec = sampler_spec("parataa" if taa else "paradigms_published", window=16, tolerance=tolerance,
                                    per_sample_windows=own)
                noises = [replay_noise(policy, spec, k) for k in keys]
                x_T, noise = torch.cat([x for x, _ in noises]), torch.cat([e for _, e in noises])
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    policy.predict_action({"obs": obs}, x_T=x_T, noise=noise, sampler=spec)
                    times.append((time.perf_counter() - t0) * 1e3)
                st = policy.last_stats
                results[own] = {"ms": statistics.median(times), "rounds": int(st.rounds),
                                "model_evals": int(st.model_evals),
                                "mean_rounds_per_sample": float(st.rounds_per_sample.float().mean())}
            rows.append({"batch": n, "sampler": "parataa" if taa else "paradigms", "wait_for_worst": results[False],
                         "per_sample": results[True]})
    return rows


# ---- the report ------------------------------------------------------------------------------

def schedule_rows(rows: Sequence[dict[str, Any]], schedule: str) -> list[dict[str, Any]]:
    """The per-schedule rows of ``schedule`` in table order (sampler, then runtime as run)."""
    order = list(SAMPLER_LABELS)
    picked = [r for r in rows if r["schedule"] == schedule and r["group"] == "schedule"]
    return sorted(picked, key=lambda r: order.index(r["name"]))


def _speedup(r: Mapping[str, Any], key: str) -> str:
    return "—" if r.get(key) is None else f"{r[key]:.2f}×"


def summary_table(rows: Sequence[dict[str, Any]], schedules: Sequence[str], scores: Mapping[str, Any]) -> list[str]:
    """One line per schedule: its fastest sequential row, its fastest ``paradigms`` row, published, scores."""
    lines = ["| schedule | fastest sequential (backend): ms p50 (p95) | fastest `paradigms` (backend, window): ms p50 "
             "(p95) | speed-up p50 / p95 | rounds | deviation mean / max (px) | ParaDiGMS as published: ms p50 "
             "(speed-up) | score sequential | score `paradigms` |", "|---" * 9 + "|"]
    for s in schedules:
        mine = schedule_rows(rows, s)
        seq = min((r for r in mine if r["name"] == "sequential"), key=lambda r: r["ms_p50"], default=None)
        par = min((r for r in mine if r["name"] == "paradigms"), key=lambda r: r["ms_p50"], default=None)
        pub = next((r for r in mine if r["name"] == "paradigms_published"), None)
        if seq is None or par is None or pub is None:
            continue
        score = [row_score(scores, seq), row_score(scores, par)]
        lines.append(
            f"| {schedule_label(s)} | {seq['ms_p50']:.1f} ({seq['ms_p95']:.1f}) ({seq['runtime']}) | "
            f"{par['ms_p50']:.1f} ({par['ms_p95']:.1f}) ({par['runtime']}, w{par['window']}) | "
            f"{_speedup(par, 'speedup_p50')} / {_speedup(par, 'speedup_p95')} | {par['rounds_mean']:.1f} | "
            f"{par['dev_mean_px']:.3f} / "
            f"{par['dev_max_px']:.3f} | {pub['ms_p50']:.1f} ({pub['speedup_p50']:.2f}×) | "
            + " | ".join("—" if x is None else f"{x:.3f}" for x in score) + " |")
    return lines


def front_rows(rows: Sequence[dict[str, Any]], schedules: Sequence[str], scores: Mapping[str, Any]
               ) -> list[dict[str, Any]]:
    """Per schedule its fastest sequential row and its fastest ``paradigms`` row (any backend), by p50, with
    ``score``, ``ratio_p50`` / ``ratio_p95`` (ms over the fastest sequential row of ALL schedules, the sampler a
    user after latency would pick) and ``front`` (no other of these rows is as fast and scores as high, one of
    them strictly), sorted by p50."""
    picked = []
    for s in schedules:
        mine = schedule_rows(rows, s)
        for name in ("sequential", "paradigms"):
            best = min((r for r in mine if r["name"] == name), key=lambda r: r["ms_p50"], default=None)
            if best is not None:
                picked.append({**best, "score": row_score(scores, best)})
    seqs = [r for r in picked if r["name"] == "sequential"]
    if not seqs:
        return []
    ref = min(seqs, key=lambda r: r["ms_p50"])
    for r in picked:
        r["ratio_p50"], r["ratio_p95"] = r["ms_p50"] / ref["ms_p50"], r["ms_p95"] / ref["ms_p95"]
        r["reference_key"] = ref["key"]
        scored = [q for q in picked if q["score"] is not None]
        r["front"] = None if r["score"] is None else not any(
            q is not r and q["ms_p50"] <= r["ms_p50"] and q["score"] >= r["score"]
            and (q["ms_p50"] < r["ms_p50"] or q["score"] > r["score"]) for q in scored)
    return sorted(picked, key=lambda r: r["ms_p50"])


def front_table(rows: Sequence[dict[str, Any]], schedules: Sequence[str], scores: Mapping[str, Any]) -> list[str]:
    """:func:`front_rows` as markdown, then how ``window='auto'`` did against its own sequential loop."""
    front = front_rows(rows, schedules, scores)
    if not front:
        return []
    ref = next(r for r in front if r["key"] == front[0]["reference_key"])
    lines = ["Every schedule's fastest sequential row and fastest `paradigms` row (any backend), sorted by ms p50. "
             "Latency ratios are over the fastest sequential sampler of all schedules, "
             f"{schedule_label(ref['schedule'])} on {ref['runtime']} ({ref['ms_p50']:.1f} ms p50, "
             f"{ref['ms_p95']:.1f} ms p95), from this one interleaved replay; deviation is from the same "
             "schedule's sequential sampler on eager (0 for a schedule's own "
             "sequential loop). **front**: no other row here is as fast and scores as high.", "",
             "| schedule | sampler (backend, window) | score | ms p50 (p95) | p50 ÷ fastest seq | p95 ÷ fastest seq | "
             "rounds | deviation mean / max (px) | front |", "|---" * 9 + "|"]
    for r in front:
        who = "sequential" if r["name"] == "sequential" else f"`paradigms`, w{r['window']}"
        score = "—" if r["score"] is None else f"{r['score']:.3f}"
        mark = "" if r["front"] is None else ("**yes**" if r["front"] else "")
        lines.append(f"| {schedule_label(r['schedule'])} | {who} ({r['runtime']}) | {score} | {r['ms_p50']:.1f} "
                     f"({r['ms_p95']:.1f}) | {r['ratio_p50']:.2f} | {r['ratio_p95']:.2f} | {r['rounds_mean']:.1f} | "
                     f"{r['dev_mean_px']:.3f} / {r['dev_max_px']:.3f} | {mark} |")
    lines += ["", "`paradigms` with `window='auto'` against the sequential loop on the same backend (ms p50 and p95 "
              "of the sequential row over the `paradigms` row's: at least 1 means never slower):", "",
              "| schedule | backend | window | p50 | p95 | rounds |", "|---" * 6 + "|"]
    for s in schedules:
        mine = schedule_rows(rows, s)
        for par in (r for r in mine if r["name"] == "paradigms"):
            seq = next((r for r in mine if r["name"] == "sequential" and r["runtime"] == par["runtime"]), None)
            if seq is not None:
                lines.append(f"| {schedule_label(s)} | {par['runtime']} | {par['window']} | "
                             f"{seq['ms_p50'] / par['ms_p50']:.2f}× | {seq['ms_p95'] / par['ms_p95']:.2f}× | "
                             f"{par['rounds_mean']:.1f} |")
    return lines


READING = [
    "How to read the columns:", "",
    "- **backend**: how the denoiser runs: `eager` is plain PyTorch; `auto` is, per row count, the faster of eager "
    "and ONNX Runtime from their measured cost curves (`configure_inference(policy, backend='auto')`). Each backend "
    "runs on a policy object of its own.",
    "- **window**: the Picard window. `paradigms` takes the one its own tuner picks for that backend (`window='auto'`; "
    "window 1 is the sequential loop, so `auto` can fall back to it); ParaDiGMS as published uses 16.",
    "- **ms/chunk p50, p95**: wall-clock of one batch-1 `predict_action` (normalize, sample, unnormalize, actions "
    "copied to the host), median and 95th percentile over the replayed chunks. Every row replays the same chunks in "
    "one process, the order of the rows alternating per chunk: compare rows of one run, not milliseconds across runs.",
    "- **rounds/chunk**: sequential denoiser calls per chunk, mean over chunks: what parallel hardware turns into "
    "latency (a sequential row needs one per step).",
    "- **model evals/chunk**: denoiser rows evaluated per chunk, summed over its rounds (the total compute).",
    "- **deviation mean / max (px)**: per chunk, the largest distance between an executed action (the "
    "`n_action_steps` actions `predict_action` returns) and the same schedule's sequential sampler on eager, on the "
    "same observation and noise, in pixels of PushT's 512-px arena; then the mean and the max over chunks. 0 for "
    "that reference row itself. It compares samplers of one schedule, never schedules with each other.",
    "- **speed-up p50**: the median ms of the fastest sequential row of the same schedule (any backend) over this "
    "row's; above 1 is faster (the summary's p95 figure: that row's p95 over this row's). **> fastest seq**: chunks "
    "slower than that median.",
    "- **the front**: across schedules. **p50 / p95 ÷ fastest seq**: this row's ms over those of the fastest "
    "sequential row of all schedules (at or above 1; the fastest sampler a user could pick, whatever its score). "
    "**front**: no other row of that table is at least as fast (p50) and scores at least as high, one of them "
    "strictly. Scores over 50 episodes move by a few hundredths between samplers that differ only by rounding, so "
    "read a front of nearly equal scores as a tie.",
    "- **score**: closed-loop mean score over the episodes (env seeds from the stream's first seed; the same noise "
    "per (episode, chunk) for every config, as `eval.py` draws it), rolled out on eager PyTorch in batched envs. "
    "`paradigms` is scored once per window its backends chose (`<schedule>_paradigms_w<window>`): a backend "
    "changes the actions by rounding only.",
]


def to_markdown(data: dict[str, Any]) -> str:
    """bench_latency.md: what ran, the summary, one table per schedule, scores, cost curves, how to read it."""
    meta, rows, scores = data["meta"], data["rows"], data.get("scores") or {}
    schedules = meta["schedules"]
    lines = ["# Latency per schedule on a recorded PushT control stream (batch 1)", "",
             f"Command: `{meta['command']}`", "",
             *[f"Scores added by: `{c}`" + "\n" for c in meta.get("score_commands", [])],
             machine_line(meta["machine"], meta.get("load_before")) + f" Checkpoint: `{meta['checkpoint']}`.", "",
             f"Stream: {meta['n_chunks']} chunks from {meta['episodes']} PushT episodes (env seeds {meta['seeds']}) "
             f"rolled out with sequential DDPM-100; the windows were resolved on {meta['n_calibration_chunks']} chunks "
             f"of the calibration episode (env seed {meta['calibration_seed']}). Backends: "
             f"{', '.join(meta['backends'])}."]
    if any(schedule_order(s) is not None for s in schedules):
        twin = meta.get("dpm_twin") or {}
        lines.append("DPM-Solver++ schedules: diffusers' `DPMSolverMultistepScheduler` with the policy's betas and "
                     "prediction type, " + (", ".join(f"`{k}={v}`" for k, v in twin.items()) + " added"
                                            if twin else "its defaults otherwise (`para_policy.schedule.dpm_from`)")
                     + ".")
    for backend, why in (meta.get("skipped_backends") or {}).items():
        lines.append(f"Backend `{backend}` skipped: {why}.")
    lines += ["", "## Summary", "", *summary_table(rows, schedules, scores), ""]
    front = front_table(rows, schedules, scores)
    if front:
        lines += ["## The front: every schedule's fastest sampler", "", *front, ""]
    for s in schedules:
        mine = schedule_rows(rows, s)
        lines += [f"## {schedule_label(s)}", "", *table(mine), ""]
        lines += [f"- {tuning_line(r)}" for r in mine if r["name"] == "paradigms"]
        lines.append("")
    if scores:
        lines += ["## Closed-loop scores", "", "| config | sampler spec | episodes | mean score | success rate |",
                  "|---|---|---|---|---|"]
        for name, sc in scores.items():
            spec = sc["spec"]
            window = spec["options"].get("window")
            order = spec.get("solver_order")
            desc = f"{spec['name']} on {spec['scheduler']}-{spec['num_inference_steps']}" + \
                (f" (solver_order {order})" if order is not None else "") + \
                (f", window {window}" if window is not None else "")
            rate = "—" if sc["success_rate"] is None else f"{sc['success_rate']:.2f}"
            score = "—" if sc["mean_score"] is None else f"{sc['mean_score']:.3f}"
            lines.append(f"| {name} | {desc} | {sc['episodes']} ({sc['n_failed']} failed) | {score} | {rate} |")
        lines += ["", "![latency against mean score](latency_vs_score.png)", ""]
    lines += ["## Cost curves", "", "Median ms of one denoiser call on n rows, per backend:", "",
              *cost_table(meta["cost"]), "", *READING, ""]
    if data.get("ablations"):
        lines += ablations_markdown(data["ablations"], rows, meta)
    return "\n".join(lines) + "\n"


ABLATION_HEADER = ("| sampler | ms/chunk p50 | p95 | max | ms/action p50 | rounds (mean) | max | model evals | "
                   "speed-up p50 | > fastest seq | mean dev (px) | max dev (px) |")


def ablation_line(r: dict[str, Any]) -> str:
    name = r["name"] if r["group"] != "schedule" else f"{row_label(r)} ({r['runtime']})"
    return (f"| {name} | {r['ms_p50']:.0f} | {r['ms_p95']:.0f} | {r['ms_max']:.0f} | {r['ms_per_action_p50']:.1f} | "
            f"{r['rounds_mean']:.1f} | {r['rounds_max']} | {r['model_evals_mean']:.0f} | {r['speedup_p50']:.2f}× | "
            f"{r['above_sequential']}/{r['chunks']} | {r['dev_mean_px']:.3f} | {r['dev_max_px']:.3f} |")


def ablations_markdown(ab: dict[str, Any], rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The DDPM-100 ablation rows, the tolerance sweep, the window choice and the per-sample windows."""
    base = [r for r in schedule_rows(rows, "ddpm100") if r["runtime"] == REFERENCE_BACKEND]
    rule = "|---" * 12 + "|"
    lines = ["## Ablations (DDPM-100)", "",
             f"Each \"+\" row adds one change to ParaDiGMS as published (tolerance {ab['tolerance']} unless named); "
             "same stream, same replay, interleaved with the rows above.", "", ABLATION_HEADER, rule]
    lines += [ablation_line(r) for r in base + [r for r in rows if r["group"] == "ablation"]]
    sweep = [r for r in rows if r["group"] == "sweep"]
    if sweep:
        lines += ["", "Tolerance sweep (same run):", "", ABLATION_HEADER, rule, *[ablation_line(r) for r in sweep]]
    cal = ab["calibration"]
    windows = sorted(int(w) for w in cal["picard_cold"]["rounds"])
    lines += ["", "![latency vs tolerance](latency_vs_tolerance.png)", "",
              "Window choice of the ablation rows (calibration chunks, eager cost curve): predicted ms per chunk = "
              "Σ over rounds of the cost of that round's rows.", "",
              "| window | " + " | ".join(str(w) for w in windows) + " | chosen |", "|---" * (len(windows) + 2) + "|"]
    for label, text in (("picard_cold", "Picard, cold"), ("combined", "all combined")):
        c = cal[label]
        rounds = {int(w): v for w, v in c["rounds"].items()}
        pred = {int(w): v for w, v in c["predicted_ms"].items()}
        lines.append(f"| {text}: rounds | " + " | ".join(f"{rounds[w]:.1f}" for w in windows) + f" | {c['window']} |")
        lines.append(f"| {text}: predicted ms | " + " | ".join(f"{pred[w]:.0f}" for w in windows) + " | |")
    psw = ab.get("per_sample_windows") or []
    if psw:
        lines += ["", f"Per-sample windows: one batched call of n chunk observations (window 16, tolerance "
                  f"{ab['tolerance']}, cold), median of {ab['psw_reps']} calls. Waiting for the worst sample "
                  "(ParaDiGMS as published) vs each sample sliding its own window.", "",
                  "| n | sampler | ms (wait) | ms (own) | rounds (wait) | rounds (own) | "
                  "mean rounds per sample (own) | model evals (wait) | model evals (own) | time saved |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in psw:
            a, b = r["wait_for_worst"], r["per_sample"]
            lines.append(f"| {r['batch']} | {r['sampler']} | {a['ms']:.0f} | {b['ms']:.0f} | {a['rounds']} | "
                         f"{b['rounds']} | {b['mean_rounds_per_sample']:.1f} | {a['model_evals']} | "
                         f"{b['model_evals']} | {1 - b['ms'] / a['ms']:.0%} |")
    return lines + [""]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_vs_score(rows: Sequence[dict[str, Any]], scores: Mapping[str, Any], path: Path) -> Path | None:
    """Mean score against median ms per chunk, one marker per (schedule, sampler, backend), keyed in a legend.

    Colour: the schedule's family (DDPM, DDIM, DPM-Solver++ of each order), the step count written beside each
    marker; marker: sampler (o sequential, ^ ``paradigms``); filled: eager, hollow: another backend. A dashed
    line per family joins its schedules' fastest sequential rows (any backend), in order of latency: the
    sequential samplers a user after latency would pick.
    """
    points = [(r, row_score(scores, r)) for r in rows if row_score(scores, r) is not None]
    if not points:
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(8, 5))
    families = list(dict.fromkeys(schedule_family(r["schedule"]) for r, _ in points))
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    for r, score in points:
        filled = r["runtime"] == REFERENCE_BACKEND
        color = colors[schedule_family(r["schedule"])]
        ax.scatter(r["ms_p50"], score, marker="o" if r["name"] == "sequential" else "^", s=40,
                   color=color if filled else "none", edgecolors=color)
        ax.annotate(str(parse_schedule(r["schedule"])[1]), (r["ms_p50"], score), textcoords="offset points",
                    xytext=(4, 3), fontsize=6, color=color)
    for family in families:  # the fastest sequential row of each of the family's schedules
        fastest: dict[str, tuple[float, float]] = {}
        for r, score in points:
            if r["name"] == "sequential" and schedule_family(r["schedule"]) == family:
                fastest[r["schedule"]] = min(fastest.get(r["schedule"], (r["ms_p50"], score)), (r["ms_p50"], score))
        line = sorted(fastest.values())
        if len(line) > 1:
            ax.plot([x for x, _ in line], [y for _, y in line], linestyle="--", linewidth=0.8,
                    color=colors[family])
    backends = sorted({r["runtime"] for r, _ in points} - {REFERENCE_BACKEND})
    handles = [Line2D([], [], marker="s", linestyle="", color=c, label=f) for f, c in colors.items()]
    handles += [Line2D([], [], marker="o", linestyle="", color="gray", label="sequential"),
                Line2D([], [], marker="^", linestyle="", color="gray", label="paradigms"),
                Line2D([], [], marker="o", linestyle="", color="gray", label=REFERENCE_BACKEND + " (filled)")]
    if backends:
        handles.append(Line2D([], [], marker="o", linestyle="", color="none", markeredgecolor="gray",
                              label=", ".join(backends) + " (hollow)"))
    ax.legend(handles=handles, fontsize=7, loc="best", frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("ms per chunk (median, batch 1)")
    ax.set_ylabel("mean score (closed loop)")
    ax.set_title("PushT, shipped policy: latency against closed-loop score per schedule (numbers: steps; "
                 "dashed: fastest sequential)", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=130))
    plt.close(fig)
    return path


#: plot line -> which rows (DDPM-100, eager) belong to it
SERIES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "ParaDiGMS as published (w16, cold)":
        lambda r: (r["name"] == "paradigms_published" and r["group"] == "schedule") or r["name"].startswith(
            "published w16"),
    "all combined (warm + linear solve + secant + window)":
        lambda r: r["name"].startswith(("all combined (", "combined w")),
}


def plot_latency_vs_tolerance(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Median ms per chunk against tolerance (DDPM-100), one line per sampler; sequential rows as dashed lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ddpm = [r for r in rows if r["schedule"] == "ddpm100" and r["runtime"] == REFERENCE_BACKEND]
    for label, member in SERIES.items():
        pts = sorted((float(r["spec"]["options"]["tolerance"]), r["ms_p50"]) for r in ddpm if member(r))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    seq = [r for r in rows if r["name"] == "sequential" and r["runtime"] == REFERENCE_BACKEND]
    for r, color in zip(seq, ("black", "dimgray", "gray", "silver", "lightgray"), strict=False):
        ax.axhline(r["ms_p50"], linestyle="--", linewidth=1, color=color,
                   label=f"sequential {schedule_label(r['schedule'])}")
    ax.set_xscale("log")
    ax.set_xlabel("tolerance (per-step change / noise scale)")
    ax.set_ylabel("ms per chunk (median, batch 1)")
    ax.set_ylim(bottom=0)
    ax.set_title("PushT, shipped policy: latency vs tolerance (DDPM-100)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def write_report(data: dict[str, Any], out: Path) -> str:
    """The md, the json and the plots of ``data`` into ``out`` (atomically); returns the md."""
    md = to_markdown(data)
    atomic_write(out / "bench_latency.md", lambda p: Path(p).write_text(md))
    atomic_write(out / "bench_latency.json", lambda p: Path(p).write_text(json.dumps(data, indent=1, default=str)))
    if data.get("scores"):
        plot_latency_vs_score(data["rows"], data["scores"], out / "latency_vs_score.png")
    if data.get("ablations"):
        plot_latency_vs_tolerance(data["rows"], out / "latency_vs_tolerance.png")
    return md


# ---- the run ---------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--schedules", nargs="+", default=list(DEFAULT_SCHEDULES),
                        help=f"schedules to compare: {SCHEDULE_SYNTAX} (default: %(default)s)")
    parser.add_argument("--backends", nargs="+", default=list(DEFAULT_BACKENDS),
                        help="denoiser backends of configure_inference(policy, backend=...); eager is always run "
                             "(the reference); others that cannot run here are skipped with a note "
                             "(default: %(default)s)")
    parser.add_argument("--episodes", type=int, default=4, help="episodes of the replayed stream (default: 4)")
    parser.add_argument("--max-chunks", type=int, default=12, help="chunks per episode at most (default: 12)")
    parser.add_argument("--seed-start", type=int, default=100000, help="first env seed of the stream and the scores")
    parser.add_argument("--stream", default=None, metavar="JSON",
                        help="replay this saved stream (a stream.json this script wrote) instead of recording one")
    parser.add_argument("--record-only", action="store_true", help="record the stream, write <out>/stream.json, stop")
    parser.add_argument("--calib-chunks", type=int, default=None,
                        help="calibration chunks the window tuner runs on (default: the whole calibration episode)")
    parser.add_argument("--cached-windows", action="store_true",
                        help="take each paradigms window from the window cache where it holds one "
                             "(LowdimPolicy.resolve: what eval.py would run) instead of measuring it now "
                             "(LowdimPolicy.calibrate)")
    parser.add_argument("--cost-reps", type=int, default=15, help="timed calls per batch size of the cost curves")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--dpm-lambda-min-clipped", type=float, default=None, metavar="LAMBDA",
                        help="build the DPM-Solver++ schedules with diffusers' lambda_min_clipped=LAMBDA (e.g. -5.1, "
                             "diffusers' value for cosine schedules; =-inf: unclipped); "
                             "default: dpm_from's (-5.1 on cosine betas)")
    parser.add_argument("--report-only", metavar="JSON", default=None,
                        help="re-render the markdown and plots of an earlier run's bench_latency.json")
    sc = parser.add_argument_group("scores")
    sc.add_argument("--scores", action="store_true",
                    help="add the closed-loop mean score of each schedule's sequential sampler and paradigms, "
                         "cached in <out>/scores/<name>/ (paradigms once per window its backends chose)")
    sc.add_argument("--score-episodes", type=int, default=50, help="episodes per score (default: 50)")
    sc.add_argument("--score-schedules", nargs="+", default=None,
                    help="schedules to score (default: all of --schedules; DDPM-100's rollouts are the slow ones)")
    sc.add_argument("--score-envs", type=int, default=8, help="envs rolled out side by side (default: 8)")
    sc.add_argument("--score-max-steps", type=int, default=PUSHT_MAX_STEPS,
                    help="steps per episode (default: PushT's %(default)s)")
    ab = parser.add_argument_group("ablations (DDPM-100)")
    ab.add_argument("--ablations", action="store_true",
                    help="add the DDPM-100 ablation rows, a tolerance sweep and the per-sample-window measurements "
                         "(needs ddpm100 among --schedules)")
    ab.add_argument("--tolerance", type=float, default=0.1, help="tolerance of the ablation rows (published's)")
    ab.add_argument("--best-tolerance", type=float, default=0.02,
                    help="tolerance of the combined ablation rows (linear solve stops later relative to the change: "
                         "compare at equal deviation)")
    ab.add_argument("--tolerances", nargs="+", type=float, default=[0.01, 0.02, 0.05, 0.1, 0.2],
                    help="tolerance sweep (published, combined)")
    ab.add_argument("--psw-batches", nargs="*", type=int, default=[8, 50],
                    help="batch sizes of the per-sample-window comparison (none to skip)")
    ab.add_argument("--psw-reps", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        for s in args.schedules:
            parse_schedule(s)
    except ValueError as e:
        parser.error(str(e))
    if args.ablations and "ddpm100" not in args.schedules:
        parser.error("--ablations compares with sequential DDPM-100: keep ddpm100 among --schedules")
    return args


def obtain_stream(policy: LowdimPolicy, args: argparse.Namespace, out: Path
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """``(replayed chunks, calibration chunks, stream meta)``: recorded now (and saved), or read from ``--stream``."""
    if args.stream:
        stream, smeta = load_stream(args.stream)
    else:
        stream = record_stream(policy, args.episodes + 1, args.max_chunks, args.seed_start)
        smeta = {"checkpoint": Path(args.checkpoint).name, "sampler": "sequential DDPM-100",
                 "seed_start": args.seed_start, "episodes": args.episodes, "max_chunks": args.max_chunks,
                 "calibration_seed": args.seed_start + args.episodes}
    save_stream(out / "stream.json", stream, smeta)
    chunks, calib = split_stream(stream, smeta["calibration_seed"], args.episodes, args.max_chunks, args.calib_chunks)
    if not chunks or not calib:
        raise SystemExit(f"bench_latency: the stream has {len(chunks)} chunks to replay and {len(calib)} calibration "
                         "chunks; both must be > 0")
    return chunks, calib, smeta


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.dpm_lambda_min_clipped is not None:
        use_dpm_twin_options(lambda_min_clipped=args.dpm_lambda_min_clipped)
    if args.report_only:
        data = json.loads(Path(args.report_only).read_text())
        out = Path(args.report_only).parent
        if args.scores:  # add (or resume) scores of the earlier run's rows, without timing anything again
            data["scores"] = {**data.get("scores", {}),
                              **scores_for(load_policy(args.checkpoint, backend="eager"), data["rows"], args, out)}
            command = "python eval/bench_latency.py " + " ".join(argv)
            added = data["meta"].setdefault("score_commands", [])
            if command not in added:
                added.append(command)
        print(write_report(data, out))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    from para_policy.evaluation.latency import machine_info

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = machine_info()["load_avg"]

    policies, skipped = backend_policies(args.checkpoint, [] if args.record_only else args.backends)
    for backend, why in skipped.items():
        print(f"note: backend {backend!r} skipped: {why}", flush=True)
    eager = policies[REFERENCE_BACKEND]
    chunks, calib, smeta = obtain_stream(eager, args, out)
    if args.record_only:
        print(f"stream: {out / 'stream.json'}")
        return
    calib_obs = [c["obs"] for c in calib]

    print("cost curves ...", flush=True)
    cost = cost_curves(policies, chunks[0]["obs"], DEFAULT_BATCHES, reps=args.cost_reps)
    for backend, curve in cost.items():
        print(f"  {backend}: " + ", ".join(f"{n}: {ms:.1f} ms" for n, ms in curve.items()), flush=True)
    variants: list[Variant] = []
    for s in args.schedules:
        print(f"{schedule_label(s)}: resolving the paradigms window per backend ...", flush=True)
        windows = {b: resolve_paradigms(p, s, calib_obs, recalibrate=not args.cached_windows)
                   for b, p in policies.items()}
        print("  " + ", ".join(f"{b}: window {spec.options['window']}" for b, (spec, _) in windows.items()), flush=True)
        variants += schedule_variants(s, windows)
    ablations = None
    if args.ablations:
        policies["bf16"] = configure_inference(load_policy(args.checkpoint), precision="bf16")
        print("ablations: choosing their windows from the eager cost curve ...", flush=True)
        calibration = ablation_windows(policies, calib, cost[REFERENCE_BACKEND], args.tolerance, args.best_tolerance,
                                       args.noise_seed)
        w_picard, w_best = calibration["picard_cold"]["window"], calibration["combined"]["window"]
        print(f"  chosen windows: Picard cold {w_picard}, all combined {w_best}", flush=True)
        variants += ablation_variants(args.tolerance, args.best_tolerance, args.tolerances, w_picard, w_best)
        ablations = {"calibration": calibration, "tolerance": args.tolerance, "psw_reps": args.psw_reps}

    replay(policies, variants, chunks, args.noise_seed)
    rows = summarize(variants, eager.n_action_steps)
    for row, v in zip(rows, variants, strict=True):
        row["predicted_ms"] = predicted_ms(v.records, cost[v.runtime]) if v.runtime in cost else None
    if ablations is not None:
        print("per-sample windows ...", flush=True)
        ablations["per_sample_windows"] = per_sample_windows(eager, chunks, args.psw_batches, args.tolerance,
                                                             args.noise_seed, args.psw_reps)
    machine = machine_info()
    scores = scores_for(eager, rows, args, out) if args.scores else {}

    calib_seed = smeta["calibration_seed"]
    episodes = sorted({c["episode"] for c in chunks})
    meta = {"command": "python eval/bench_latency.py " + " ".join(argv), "machine": machine,
            "load_before": load_before, "checkpoint": Path(args.checkpoint).name, "schedules": list(args.schedules),
            "backends": [b for b in policies if b != "bf16"], "skipped_backends": skipped, "n_chunks": len(chunks),
            "episodes": len(episodes), "seeds": f"{episodes[0]}-{episodes[-1]}", "calibration_seed": calib_seed,
            "n_calibration_chunks": len(calib), "cost": cost, "stream": smeta, "dpm_twin": dict(DPM_TWIN_OPTIONS)}
    data = {"meta": meta, "rows": rows, "scores": scores, "ablations": ablations,
            "chunks": {v.key: [{k: r[k] for k in ("episode", "chunk", "ms", "rounds", "model_evals", "warm")}
                               for r in v.records] for v in variants}}
    print(write_report(data, out))


if __name__ == "__main__":
    main()
