"""``picard_sample(jacobian=...)`` against the default on a recorded PushT stream: rounds and ms per chunk.

The rounds of the mean-Jacobian lead are in ``eval/bench_rounds_floor.py``; this asks what they
cost on this machine. A mean Jacobian per step (:func:`para_policy.samplers.mean_step_jacobians`)
is calibrated on chunks of other episodes (its time is reported), then the chunks of
``eval/results/bench_latency_schedules/stream.json`` are replayed at batch 1 on the
checkpoint's DDPM-100 through the ``paradigms`` preset's options at window 100 (eager), each
variant warm-started from its own previous chunk, the order of the variants alternating per
chunk:

- ``default``: the preset (linear solve + secant);
- ``zero Jacobian``: ``jacobian=0`` (the matrix solve's own cost: the same rounds up to the
  secant's clamp);
- ``mean Jacobian``: ``jacobian=`` the calibrated mean.

    python eval/bench_jacobian.py
    python eval/bench_jacobian.py --calibration-episodes 1 --max-chunks 6 --out /tmp/bj.md

Writes ``eval/results/bench_jacobian.md`` (atomically).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from para_policy.checkpoints import atomic_write
from para_policy.evaluation.latency import distribution
from para_policy.policy import load_policy
from para_policy.samplers import (
    PRESETS,
    draw_noise,
    mean_step_jacobians,
    picard_sample,
    sampler_spec,
    shift_trajectory,
    warm_start_init,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rounds import record_stream  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
STREAM = ROOT / "eval" / "results" / "bench_latency_schedules" / "stream.json"
OUT = ROOT / "eval" / "results" / "bench_jacobian.md"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--stream", default=str(STREAM), help="recorded chunks (bench_latency.py's stream.json)")
    parser.add_argument("--episodes", type=int, default=4, help="stream episodes to replay (from its first)")
    parser.add_argument("--calibration-episodes", type=int, default=2)
    parser.add_argument("--calibration-seed-start", type=int, default=100020)
    parser.add_argument("--max-chunks", type=int, default=6, help="chunks per calibration episode")
    parser.add_argument("--replay-chunks", type=int, default=None, help="replay only this many chunks (a quick check)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(OUT))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = load_policy(args.checkpoint)
    sched = policy.schedule_for(sampler_spec("sequential", scheduler="ddpm", num_inference_steps=100))
    stream = json.loads(Path(args.stream).read_text())["chunks"]
    seeds = sorted({c["episode"] for c in stream})[: args.episodes]
    chunks = [c for c in stream if c["episode"] in seeds][: args.replay_chunks]
    calib_seeds = set(range(args.calibration_seed_start, args.calibration_seed_start + args.calibration_episodes))
    if calib_seeds & set(seeds):
        raise SystemExit("--calibration-seed-start: the calibration episodes must not be replayed episodes")

    calib = record_stream(policy, args.calibration_episodes, args.max_chunks, args.calibration_seed_start, 10, 0)
    cond = torch.cat([policy.conditioning(torch.from_numpy(c["obs"])[None])[0] for c in calib])
    x_T, noise = draw_noise(sched, (len(calib), *policy.trajectory_shape(1)[1:]), torch.Generator().manual_seed(5))
    start = time.perf_counter()
    mean_jac = mean_step_jacobians(policy.denoise, sched, x_T, noise, cond)
    calib_s = time.perf_counter() - start
    print(f"calibration: {len(calib)} chunks in {calib_s:.0f} s", flush=True)

    options = {**PRESETS["paradigms"]["options"], "window": 100}
    variants = {"default": None, "zero Jacobian": torch.zeros_like(mean_jac), "mean Jacobian": mean_jac}
    res: dict[str, dict[str, list[float]]] = {k: {"ms": [], "rounds": [], "evals": []} for k in variants}
    previous: dict[str, dict[int, torch.Tensor]] = {k: {} for k in variants}
    Na = policy.n_action_steps
    for i, ch in enumerate(chunks):
        obs_cond, _ = policy.conditioning(torch.tensor(ch["obs"], dtype=torch.float32)[None])
        xt, z = draw_noise(sched, policy.trajectory_shape(1), torch.Generator().manual_seed(1000 + i))
        for name in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
            before = previous[name].get(ch["episode"])
            t0 = time.perf_counter()
            init = None if before is None else warm_start_init(sched, shift_trajectory(before, Na), xt, z)
            out, stats = picard_sample(policy.denoise, sched, xt, z, condition=obs_cond, init=init,
                                       jacobian=variants[name], **options)
            res[name]["ms"].append(1000 * (time.perf_counter() - t0))
            res[name]["rounds"].append(stats.rounds)
            res[name]["evals"].append(stats.model_evals)
            previous[name][ch["episode"]] = out
    ms = {name: distribution(r["ms"]) for name, r in res.items()}
    base = ms["default"]["p50"]
    lines = ["# `picard_sample(jacobian=...)` on this machine (DDPM-100, batch 1, eager)", "",
             f"Command: `{' '.join(['python eval/bench_jacobian.py', *argv])}`", "",
             f"Mean Jacobian from {len(calib)} chunks of {args.calibration_episodes} other episodes (env seeds "
             f"{min(calib_seeds)}-{max(calib_seeds)}), computed in {calib_s:.0f} s. Replay: {len(chunks)} chunks of "
             f"episodes {seeds[0]}-{seeds[-1]} of `{Path(args.stream).name}` (first chunk of each episode cold), "
             f"`paradigms` options at window 100, torch {torch.__version__} with {args.threads} threads, the order "
             "of the rows alternating per chunk.", "",
             "| variant | ms/chunk p50 | p95 | p50 vs default | rounds mean | max | model evals mean |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        p50 = ms[name]["p50"]
        lines.append(f"| {name} | {p50:.0f} | {ms[name]['p95']:.0f} | {base / p50:.2f}× | "
                     f"{statistics.mean(r['rounds']):.2f} | {max(r['rounds'])} | {statistics.mean(r['evals']):.0f} |")
    md = "\n".join(lines) + "\n"
    atomic_write(args.out, lambda p: Path(p).write_text(md))
    print(md)
    return md


if __name__ == "__main__":
    main()
