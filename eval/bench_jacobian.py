"""``picard_sample(jacobian=...)`` against the default on a recorded PushT stream: rounds and ms per chunk.

The rounds of the mean-Jacobian lead are in ``eval/bench_rounds_floor.py``; this asks what they
cost on this machine. A mean Jacobian per step (:func:`para_policy.samplers.mean_step_jacobians`)
is calibrated on chunks of other episodes (its time is reported), then the chunks of
``eval/results/bench_latency_schedules/stream.json`` are replayed at batch 1 on the
checkpoint's DDPM-100 through the ``paradigms`` preset's options at window 100 (eager), each
variant warm-started from its own previous chunk, the order of the variants alternating per
chunk (:func:`para_policy.bench.replay`, the sampler called with ``jacobian=``):

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
import statistics
import sys
import time
from pathlib import Path

import torch

from para_policy import LowdimPolicy, load_policy
from para_policy.bench import (
    ChunkKeys,
    Variant,
    episodes_of,
    load_stream,
    percentile_summary,
    record_stream,
    replay,
    sampler_call,
    schedule_spec,
    write_text,
)
from para_policy.samplers import draw_noise, mean_step_jacobians

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
STREAM = ROOT / "eval" / "results" / "bench_latency_schedules" / "stream.json"
OUT = ROOT / "eval" / "results" / "bench_jacobian.md"
KEYS = ChunkKeys(stream=None, offset=1000)  # chunk i of the replay: torch.manual_seed(1000 + i)
CALIBRATION_SEED = 5  # one generator for the calibration chunks' noise, drawn as one batch


def parse_args(argv: list[str]) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def mean_jacobian(policy: LowdimPolicy, args: argparse.Namespace) -> tuple[torch.Tensor, int, float]:
    """``(mean Jacobian (S, TD, TD), calibration chunks, seconds)`` over chunks of the calibration episodes."""
    sched = policy.schedule_for(schedule_spec("sequential", "ddpm100"))
    calib = record_stream(policy, args.calibration_episodes, args.max_chunks, args.calibration_seed_start,
                          spec=schedule_spec("sequential", "ddim10"))
    cond = torch.cat([policy.conditioning(torch.from_numpy(c["obs"])[None])[0] for c in calib])
    x_T, noise = draw_noise(sched, (len(calib), *policy.trajectory_shape(1)[1:]),
                            torch.Generator().manual_seed(CALIBRATION_SEED))
    start = time.perf_counter()
    jac = mean_step_jacobians(policy.denoise, sched, x_T, noise, cond)
    return jac, len(calib), time.perf_counter() - start


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = load_policy(args.checkpoint, backend="eager")  # the Jacobians differentiate through PyTorch
    stream, _ = load_stream(args.stream)
    seeds = episodes_of(stream)[: args.episodes]
    chunks = [c for c in stream if c["episode"] in seeds][: args.replay_chunks]
    calib_seeds = set(range(args.calibration_seed_start, args.calibration_seed_start + args.calibration_episodes))
    if calib_seeds & set(seeds):
        raise SystemExit("--calibration-seed-start: the calibration episodes must not be replayed episodes")
    mean_jac, n_calib, calib_s = mean_jacobian(policy, args)
    print(f"calibration: {n_calib} chunks in {calib_s:.0f} s", flush=True)

    spec = schedule_spec("paradigms", "ddpm100", window=100)
    variants = [Variant(name, spec, call=sampler_call(**extra)) for name, extra in
                (("default", {}), ("zero Jacobian", {"jacobian": torch.zeros_like(mean_jac)}),
                 ("mean Jacobian", {"jacobian": mean_jac}))]
    records = replay(policy, variants, chunks, KEYS, warmup=0)
    ms = {name: percentile_summary(r["ms"] for r in recs) for name, recs in records.items()}
    base = ms["default"]["p50"]
    lines = ["# `picard_sample(jacobian=...)` on this machine (DDPM-100, batch 1, eager)", "",
             f"Command: `{' '.join(['python eval/bench_jacobian.py', *argv])}`", "",
             f"Mean Jacobian from {n_calib} chunks of {args.calibration_episodes} other episodes (env seeds "
             f"{min(calib_seeds)}-{max(calib_seeds)}), computed in {calib_s:.0f} s. Replay: {len(chunks)} chunks of "
             f"episodes {seeds[0]}-{seeds[-1]} of `{Path(args.stream).name}` (first chunk of each episode cold), "
             f"`paradigms` options at window 100, torch {torch.__version__} with {args.threads} threads, the order "
             "of the rows alternating per chunk.", "",
             "| variant | ms/chunk p50 | p95 | p50 vs default | rounds mean | max | model evals mean |",
             "|---|---|---|---|---|---|---|"]
    for name, recs in records.items():
        p50, rounds = ms[name]["p50"], [r["rounds"] for r in recs]
        lines.append(f"| {name} | {p50:.0f} | {ms[name]['p95']:.0f} | {base / p50:.2f}× | "
                     f"{statistics.mean(rounds):.2f} | {max(rounds)} | "
                     f"{statistics.mean(r['model_evals'] for r in recs):.0f} |")
    md = "\n".join(lines) + "\n"
    write_text(args.out, md)
    print(md)
    return md


if __name__ == "__main__":
    main()
