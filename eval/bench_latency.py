"""Latency of every sampler on a recorded PushT control stream, side by side at batch 1.

What a robot waits for is one ``predict_action`` at batch 1, chunk after chunk, each
from the observation the last chunk led to. So:

1. **Record** the observation stream of real PushT rollouts of the shipped policy
   (sequential DDPM-100, the policy as trained): ``--episodes`` episodes from env seed
   100000, ``--max-chunks`` chunks each, plus one more episode for calibration.
2. **Cost curve**: the median time of one denoiser call on ``n`` rows for n = 1 … 100
   (:func:`para_policy.window.batch_cost_curve`). From it and the rows per round of each
   window on the calibration episode, :func:`para_policy.window.choose_window` picks the
   window (for cold Picard and for all improvements combined, separately).
3. **Replay** every chunk, in order, through every sampler, alternating the order of
   the samplers per chunk, all on the same ``x_T`` and step noise: sequential DDPM-100
   (the reference), sequential DDIM-16 and DDIM-10 (what a user would pick instead),
   ParaDDIM-16, ParaDiGMS as published (window 16, whole batch waits for its worst
   sample, cold start, no acceleration), each improvement alone (warm start across
   control steps, triangular Anderson acceleration, the linear solve of
   ``picard_sample(linear_solve=True)`` and its secant refinement (``secant=True``),
   window from the cost curve), all combined (warm start + linear solve + secant + window;
   also with ParaTAA on top, with a bf16 denoiser, and the previous default: ParaTAA
   without the secant at window 48), and a tolerance sweep. Warm-started samplers start each chunk from their
   *own* previous chunk's trajectory shifted by the executed actions (the first chunk of
   an episode is cold, as in a real control loop, and is counted).
4. **Report** per sampler: median / p95 / max ms per chunk and per action, rounds and
   model evaluations per chunk, max action deviation from the sequential sampler of the
   same schedule on the same noise (pixels), and the ratio to sequential DDPM-100's
   median. Per-sample windows are measured separately on batches of 8 and 50 chunks.

    python eval/bench_latency.py                              # ~10 min on 2 CPU cores
    python eval/bench_latency.py --episodes 1 --max-chunks 3 --tolerances 0.1 --out /tmp/bl

Writes ``<out>/bench_latency.{md,json}`` and ``latency_vs_tolerance.png`` (atomically).
Measure on a quiet machine: other processes change the milliseconds (not the rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from para_policy.checkpoints import atomic_write
from para_policy.evaluation.config import TaskSettings
from para_policy.evaluation.latency import distribution, machine_info
from para_policy.evaluation.rollout import call_noise, run_rollouts
from para_policy.inference import configure_inference
from para_policy.policy import LowdimPolicy, load_policy
from para_policy.samplers import SamplerConfig, sampler_spec, shift_trajectory
from para_policy.window import CANDIDATE_WINDOWS, DEFAULT_BATCHES, batch_cost_curve, choose_window

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "eval" / "results" / "bench_latency"
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
REPLAY_STREAM = 11  # noise-key stream of the replays


@dataclass
class Variant:
    """One sampler setting of the benchmark."""

    name: str
    spec: SamplerConfig
    reference: str  # the variant whose actions on the same noise are "exact" for this one
    group: str = "main"  # main | sweep
    precision: str = "fp32"  # the denoiser's (para_policy.inference)
    records: list[dict[str, Any]] = field(default_factory=list)
    previous: dict[int, torch.Tensor] = field(default_factory=dict)  # episode → last trajectory


def picard(name: str, window: int, tolerance: float, *, taa: bool = False, warm: bool = False, linear: bool = False,
           secant: bool = False, wait_for_worst: bool = False, group: str = "main", precision: str = "fp32"
           ) -> Variant:
    spec = sampler_spec("parataa" if taa else "paradigms_published", window=window, tolerance=tolerance,
                        per_sample_windows=not wait_for_worst, linear_solve=linear or secant, secant=secant,
                        warm_start=warm)
    return Variant(name, spec, "sequential DDPM-100", group, precision)


def combined(window: int, tolerance: float, group: str = "main", precision: str = "fp32", name: str = "",
             taa: bool = False, secant: bool = True) -> Variant:
    """Warm start + linear solve + secant, the window from the cost curve (ParaTAA measured on top)."""
    return picard(name or f"all combined (w{window}, tol {tolerance})", window, tolerance, taa=taa, warm=True,
                  linear=True, secant=secant, group=group, precision=precision)


def build_variants(tolerance: float, best_tolerance: float, tolerances: Sequence[float], w_picard: int,
                   w_best: int) -> list[Variant]:
    v = [
        Variant("sequential DDPM-100", sampler_spec("sequential"), "sequential DDPM-100"),
        Variant("sequential DDIM-16", sampler_spec("sequential", scheduler="ddim", num_inference_steps=16),
                "sequential DDIM-16"),
        Variant("sequential DDIM-10", sampler_spec("sequential", scheduler="ddim", num_inference_steps=10),
                "sequential DDIM-10"),
        Variant("ParaDDIM-16 (w16)", sampler_spec("paradigms_published", scheduler="ddim", num_inference_steps=16,
                                                  tolerance=tolerance, per_sample_windows=True), "sequential DDIM-16"),
        picard("ParaDiGMS as published (w16)", 16, tolerance, wait_for_worst=True),
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
        combined(w_best, best_tolerance, precision="bf16",
                 name=f"all combined, bf16 (w{w_best}, tol {best_tolerance})"),
    ]
    for tol in tolerances:
        if tol != tolerance:
            v.append(picard(f"published w16, tol {tol}", 16, tol, wait_for_worst=True, group="sweep"))
        if tol != best_tolerance:
            v.append(combined(w_best, tol, group="sweep", name=f"combined w{w_best}, tol {tol}"))
    return v


def record_stream(policy: LowdimPolicy, episodes: int, max_chunks: int, seed_start: int) -> list[dict[str, Any]]:
    """Chunk observations of ``episodes`` rollouts with sequential DDPM-100, in order."""
    task = TaskSettings(name="pusht", env_id="gym_pusht/PushT-v0", obs_type="keypoints", obs_dim=policy.obs_dim,
                        action_dim=policy.action_dim, episodes=episodes, seed_start=seed_start,
                        max_steps=max_chunks * policy.n_action_steps, fps=10)
    records, _ = run_rollouts(policy, sampler_spec("sequential"), task, task.seeds, num_envs=min(episodes, 8),
                              record_obs=True, progress=True, desc="recording")
    chunks = []
    for rec in records:
        if rec["error"]:
            raise RuntimeError(f"recording episode {rec['seed']} failed: {rec['error']}")
        for c, obs in enumerate(rec["chunk_obs"]):
            chunks.append({"episode": rec["seed"], "chunk": c, "obs": np.asarray(obs, dtype=np.float32)})
    return chunks


def run_call(policies: dict[str, LowdimPolicy], v: Variant, ch: dict[str, Any], key: tuple[int, ...]
             ) -> dict[str, Any]:
    """One timed batch-1 call of ``v`` on chunk ``ch``; updates the variant's warm-start state."""
    policy = policies[v.precision]
    schedule = policy.schedule_for(v.spec)
    x_T, noise = call_noise(schedule, policy.trajectory_shape(1)[1:], [key], policy.device, policy.dtype)
    obs = torch.from_numpy(ch["obs"])[None]
    warm: torch.Tensor | bool = False  # the variants share one policy: each keeps its own guess here
    prev = v.previous.get(ch["episode"]) if ch["chunk"] > 0 else None
    if v.spec.warm_start and prev is not None:
        warm = shift_trajectory(prev, policy.n_action_steps)
    t0 = time.perf_counter()
    out = policy.predict_action({"obs": obs}, x_T=x_T, noise=noise, sampler=v.spec, warm_start=warm)
    action = out["action"].cpu()
    ms = (time.perf_counter() - t0) * 1e3
    stats = out.stats
    v.previous[ch["episode"]] = out.trajectory.clone()
    return {"episode": ch["episode"], "chunk": ch["chunk"], "ms": ms, "rounds": int(stats.rounds),
            "model_evals": int(stats.model_evals), "warm": out.warm, "action": action[0].numpy()}


def calibrate(policies: dict[str, LowdimPolicy], chunks: list[dict[str, Any]], cost: dict[int, float],
              tolerance: float, best_tolerance: float, noise_seed: int) -> dict[str, Any]:
    """Rows per round of each candidate window on the calibration chunks, and the chosen windows."""
    out: dict[str, Any] = {}
    for label in ("picard_cold", "combined"):
        traces: dict[int, list[list[int]]] = {}
        for w in CANDIDATE_WINDOWS:
            v = picard(label, w, tolerance) if label == "picard_cold" else combined(w, best_tolerance)
            for ch in chunks:
                run_call(policies, v, ch, (REPLAY_STREAM, noise_seed, ch["episode"], ch["chunk"]))
                traces.setdefault(w, []).append(list(policies["fp32"].last_stats.extra["rows_per_round"]))
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
                x_T, noise = call_noise(policy.schedule_for(spec), policy.trajectory_shape(1)[1:], keys,
                                        policy.device, policy.dtype)
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


def summarize(policy: LowdimPolicy, variants: list[Variant]) -> list[dict[str, Any]]:
    by_name = {v.name: v for v in variants}
    base = statistics.median(r["ms"] for r in by_name["sequential DDPM-100"].records)
    Na = policy.n_action_steps
    rows = []
    for v in variants:
        ms = [r["ms"] for r in v.records]
        ref = by_name[v.reference].records
        dev = [float(np.linalg.norm(r["action"] - q["action"], axis=-1).max()) for r, q in zip(v.records, ref,
                                                                                                  strict=True)]
        d = distribution(ms)
        rows.append({
            "name": v.name, "group": v.group, "spec": {"name": v.spec.name, "scheduler": v.spec.scheduler,
                                                       "num_inference_steps": v.spec.num_inference_steps,
                                                       "options": v.spec.options, "warm_start": v.spec.warm_start},
            "reference": v.reference, "ms_p50": d["p50"], "ms_p95": d["p95"], "ms_max": d["max"],
            "ms_per_action_p50": d["p50"] / Na, "ms_per_action_p95": d["p95"] / Na,
            "rounds_mean": statistics.mean(r["rounds"] for r in v.records),
            "rounds_max": max(r["rounds"] for r in v.records),
            "model_evals_mean": statistics.mean(r["model_evals"] for r in v.records),
            "dev_max_px": max(dev), "dev_mean_px": statistics.mean(dev),
            "speedup_p50": base / d["p50"], "above_sequential": sum(m > base for m in ms),
            "precision": v.precision,
            "chunks": len(ms),
        })
    return rows


HEADER = ("| sampler | ms/chunk p50 | p95 | max | ms/action p50 | p95 | rounds (mean) | max | model evals | "
          "speedup p50 | > seq | mean dev (px) | max dev (px) |")
RULE = "|---" * 13 + "|"


def to_markdown(rows: list[dict[str, Any]], psw: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cal = meta["calibration"]
    lines = [
        "# Per-chunk latency on a recorded PushT control stream (batch 1)", "",
        f"Command: `{meta['command']}`", "",
        f"Machine: {meta['machine']['processor']}, {meta['machine']['cpu_count']} CPUs, torch "
        f"{meta['machine']['torch']} with {meta['machine']['torch_threads']} threads (load average before/after: "
        f"{meta['load_before']} / {meta['machine']['load_avg']}). Checkpoint: `{meta['checkpoint']}`.", "",
        f"Stream: {meta['n_chunks']} chunks from {meta['episodes']} PushT episodes (env seeds {meta['seeds']}) "
        f"rolled out with sequential DDPM-100; every sampler replays every chunk in order on the same noise, "
        f"the order of the samplers alternating per chunk. Tolerance {meta['tolerance']} unless the name says "
        f"otherwise. Speedup: "
        f"sequential DDPM-100's median ms per chunk over the sampler's. Deviation: max distance of an executed "
        f"action from the sequential sampler of the same schedule on the same noise (pixels of the 512-px arena), "
        f"mean over chunks of the chunk's max, and max over chunks. "
        f"\"> seq\": chunks slower than sequential DDPM-100's median.", "",
        HEADER, RULE,
    ]

    def line(r: dict[str, Any]) -> str:
        return (f"| {r['name']} | {r['ms_p50']:.0f} | {r['ms_p95']:.0f} | {r['ms_max']:.0f} | "
                f"{r['ms_per_action_p50']:.1f} | {r['ms_per_action_p95']:.1f} | {r['rounds_mean']:.1f} | "
                f"{r['rounds_max']} | {r['model_evals_mean']:.0f} | {r['speedup_p50']:.2f}× | "
                f"{r['above_sequential']}/{r['chunks']} | {r['dev_mean_px']:.3f} | {r['dev_max_px']:.3f} |")

    lines += [line(r) for r in rows if r["group"] == "main"]
    sweep = [r for r in rows if r["group"] == "sweep"]
    if sweep:
        lines += ["", "Tolerance sweep (same run):", "", HEADER, RULE]
        lines += [line(r) for r in sweep]
    lines += ["", "Cost curve (median ms of one denoiser call on n rows):", "",
              "| n | " + " | ".join(str(n) for n in meta["cost"]) + " |",
              "|---|" + "---|" * len(meta["cost"]),
              "| ms | " + " | ".join(f"{ms:.1f}" for ms in meta["cost"].values()) + " |", "",
              "Window choice (calibration episode, env seed "
              f"{meta['calibration_seed']}): predicted ms per chunk = Σ over rounds of the cost of that round's rows.",
              "", "| window | " + " | ".join(str(w) for w in CANDIDATE_WINDOWS) + " | chosen |",
              "|---|" + "---|" * (len(CANDIDATE_WINDOWS) + 1)]
    for label, text in (("picard_cold", "Picard, cold"), ("combined", "all combined")):
        c = cal[label]
        lines.append(f"| {text}: rounds | " + " | ".join(f"{c['rounds'][w]:.1f}" for w in CANDIDATE_WINDOWS)
                     + f" | {c['window']} |")
        lines.append(f"| {text}: predicted ms | " + " | ".join(f"{c['predicted_ms'][w]:.0f}"
                                                                for w in CANDIDATE_WINDOWS) + " | |")
    if psw:
        lines += ["", f"Per-sample windows: one batched call of n chunk observations (window 16, tolerance "
                  f"{meta['tolerance']}, cold), median of {meta['psw_reps']} calls. Waiting for the worst sample "
                  "(ParaDiGMS as published) vs each sample sliding its own window.", "",
                  "| n | sampler | ms (wait) | ms (own) | rounds (wait) | rounds (own) | "
                  "mean rounds per sample (own) | model evals (wait) | model evals (own) | time saved |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in psw:
            a, b = r["wait_for_worst"], r["per_sample"]
            lines.append(f"| {r['batch']} | {r['sampler']} | {a['ms']:.0f} | {b['ms']:.0f} | {a['rounds']} | "
                         f"{b['rounds']} | {b['mean_rounds_per_sample']:.1f} | {a['model_evals']} | "
                         f"{b['model_evals']} | {1 - b['ms'] / a['ms']:.0%} |")
    return "\n".join(lines) + "\n"


SERIES = {  # plot line → name prefixes of its main-table row and its sweep rows
    "ParaDiGMS as published (w16, cold)": ("ParaDiGMS as published", "published w16"),
    "all combined (warm + linear solve + secant + window)": ("all combined (", "combined w"),
}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Median ms per chunk against tolerance, one line per sampler; sequential samplers as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, prefixes in SERIES.items():
        pts = sorted((float(r["spec"]["options"]["tolerance"]), r["ms_p50"]) for r in rows
                     if r["name"].startswith(prefixes))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    for r, color in zip([r for r in rows if r["name"].startswith("sequential")], ("black", "gray", "silver"),
                        strict=False):
        ax.axhline(r["ms_p50"], linestyle="--", linewidth=1, color=color, label=r["name"])
    ax.set_xscale("log")
    ax.set_xlabel("tolerance (per-step change / noise scale)")
    ax.set_ylabel("ms per chunk (median, batch 1)")
    ax.set_ylim(bottom=0)
    ax.set_title("PushT, shipped policy: latency vs tolerance")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--episodes", type=int, default=4, help="episodes of the observation stream")
    parser.add_argument("--max-chunks", type=int, default=12, help="chunks per episode at most")
    parser.add_argument("--seed-start", type=int, default=100000)
    parser.add_argument("--tolerance", type=float, default=0.1, help="tolerance of the main table (published)")
    parser.add_argument("--best-tolerance", type=float, default=0.02,
                        help="tolerance of the combined sampler in the main table (linear solve stops later "
                             "relative to the change: compare at equal deviation)")
    parser.add_argument("--tolerances", nargs="+", type=float, default=[0.01, 0.02, 0.05, 0.1, 0.2],
                        help="tolerance sweep (published, combined)")
    parser.add_argument("--cost-reps", type=int, default=15, help="timed calls per batch size of the cost curve")
    parser.add_argument("--psw-batches", nargs="*", type=int, default=[8, 50],
                        help="batch sizes of the per-sample-window comparison (none to skip)")
    parser.add_argument("--psw-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--report-only", metavar="JSON", default=None,
                        help="re-render the markdown table and plot of an earlier run's bench_latency.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.report_only:
        data = json.loads(Path(args.report_only).read_text())
        meta = data["meta"]
        meta["cost"] = {int(n): ms for n, ms in meta["cost"].items()}
        for c in meta["calibration"].values():
            for key in ("predicted_ms", "rounds"):
                c[key] = {int(w): v for w, v in c[key].items()}
        out = Path(args.report_only).parent
        md = to_markdown(data["rows"], data["per_sample_windows"], meta)
        atomic_write(out / "bench_latency.md", lambda p: Path(p).write_text(md))
        plot(data["rows"], out / "latency_vs_tolerance.png")
        print(md)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = machine_info()["load_avg"]

    policy = load_policy(args.checkpoint)
    policies = {"fp32": policy, "bf16": configure_inference(load_policy(args.checkpoint), precision="bf16")}
    stream = record_stream(policy, args.episodes + 1, args.max_chunks, args.seed_start)
    calib_seed = args.seed_start + args.episodes
    chunks = [c for c in stream if c["episode"] != calib_seed]
    calib = [c for c in stream if c["episode"] == calib_seed]

    cond, _ = policy.conditioning(torch.from_numpy(chunks[0]["obs"])[None])
    print("cost curve ...", flush=True)
    cost = batch_cost_curve(policy.denoise, policy.trajectory_shape(1)[1:], cond, DEFAULT_BATCHES,
                            reps=args.cost_reps)
    print("  " + ", ".join(f"{n}: {ms:.1f} ms" for n, ms in cost.items()), flush=True)
    print("calibrating the window ...", flush=True)
    calibration = calibrate(policies, calib, cost, args.tolerance, args.best_tolerance, args.noise_seed)
    w_picard, w_best = calibration["picard_cold"]["window"], calibration["combined"]["window"]
    print(f"  chosen windows: Picard cold {w_picard}, all combined {w_best}", flush=True)

    variants = build_variants(args.tolerance, args.best_tolerance, args.tolerances, w_picard, w_best)
    from tqdm import tqdm

    for v in variants:  # warm-up: allocator, thread pool
        run_call(policies, v, chunks[0], (REPLAY_STREAM, args.noise_seed, -1, 0))
        v.previous.clear()
    for i, ch in enumerate(tqdm(chunks, desc="replay", unit="chunk")):
        key = (REPLAY_STREAM, args.noise_seed, ch["episode"], ch["chunk"])
        for v in (variants if i % 2 == 0 else variants[::-1]):
            v.records.append(run_call(policies, v, ch, key))
    rows = summarize(policy, variants)
    print("per-sample windows ...", flush=True)
    psw = per_sample_windows(policy, chunks, args.psw_batches, args.tolerance, args.noise_seed, args.psw_reps)

    machine = machine_info()
    meta = {"command": "python eval/bench_latency.py " + " ".join(argv), "machine": machine,
            "load_before": load_before, "checkpoint": Path(args.checkpoint).name, "n_chunks": len(chunks),
            "episodes": args.episodes, "seeds": f"{args.seed_start}-{calib_seed - 1}", "tolerance": args.tolerance,
            "cost": cost, "calibration": calibration, "calibration_seed": calib_seed, "psw_reps": args.psw_reps}
    md = to_markdown(rows, psw, meta)
    atomic_write(out / "bench_latency.md", lambda p: Path(p).write_text(md))
    data = {"meta": meta, "rows": rows, "per_sample_windows": psw,
            "chunks": {v.name: [{k: r[k] for k in ("episode", "chunk", "ms", "rounds", "model_evals", "warm")}
                                for r in v.records] for v in variants}}
    atomic_write(out / "bench_latency.json", lambda p: Path(p).write_text(json.dumps(data, indent=1, default=str)))
    plot(rows, out / "latency_vs_tolerance.png")
    print(md)


if __name__ == "__main__":
    main()
