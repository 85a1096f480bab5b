"""AsyncDiff stage parallelism against the fastest sequential sampler, shipped PushT policy, batch 1, this CPU.

Per schedule (DDPM-100, DDIM-16, DDIM-10): the sequential loop on ONNX Runtime with 1 and 2
intra-op threads, ``paradigms``, and ``asyncdiff`` at 2 stages (one ONNX Runtime session and one
core per stage: the defaults, ``tail=1``, ``tail=0`` without extrapolation, and the ``exact`` mode),
and ``patches`` (DistriFusion's displaced patches: the horizon in 2 patches, one core each),
interleaved call by call on recorded PushT observations; p50 / p95 latency and the executed
actions' deviation from sequential on the same noise. First the cost model's terms (each
stage's time, the hand-off cost, where a round's time goes inside the sampler), last its
prediction for 4 and 8 stages on as many cores (:mod:`para_policy.bench.stages`). Timings mean
something only on a quiet machine.

    python eval/bench_stages.py            # writes eval/results/bench_stages.{md,json}
    python eval/bench_stages.py --quick    # a smoke run: DDIM-10, a few chunks, no files
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from para_policy.bench import command_line, load_stream, machine_info, write_report
from para_policy.bench.stages import latency_rows, loop_segments, markdown, predictions, stage_costs, stage_splits
from para_policy.loading import load_policy

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
STREAM = ROOT / "eval" / "results" / "bench_latency_schedules" / "stream.json"
SCHEDULES = ("ddpm100", "ddim16", "ddim10")


def policies() -> dict[str, object]:
    """The shipped policy on ONNX Runtime with 1 and with 2 intra-op threads (the thread count read at export),
    and on the ``auto`` backend with 2 threads (``paradigms``' batched rounds)."""
    out = {}
    for key, threads, backend in (("ort1", 1, "onnxruntime"), ("ort2", 2, "onnxruntime"), ("auto", 2, "auto")):
        torch.set_num_threads(threads)
        out[key] = load_policy(CHECKPOINT, sampler="sequential", backend=backend)
    return out  # torch left at 2 threads: the auto backend's eager calls (the ONNX sessions keep their own)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: DDIM-10, 3 chunks, 1 repetition, no files")
    ap.add_argument("--chunks", type=int, default=20, help="recorded observations replayed per repetition")
    ap.add_argument("--reps", type=int, default=5, help="repetitions over the chunks")
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "bench_stages"))
    args = ap.parse_args(argv)
    chunks = min(args.chunks, 3) if args.quick else args.chunks
    reps = args.reps if not args.quick else 1
    pols = policies()
    obs = [np.asarray(c["obs"], dtype=np.float32) for c in load_stream(STREAM)[0][:chunks]] if STREAM.exists() \
        else [np.random.default_rng(i).standard_normal((2, 20)).astype(np.float32) for i in range(chunks)]
    costs = stage_costs(pols, obs[0], reps=30 if args.quick else 300)
    segments = loop_segments(pols["ort1"], obs[0], "ddim10" if args.quick else "ddpm100", 2 if args.quick else 10)
    schedules = ("ddim10",) if args.quick else SCHEDULES
    rows = [r for s in schedules for r in latency_rows(pols, s, obs, reps)]
    splits = stage_splits(pols["ort1"], obs[0], counts=(2,) if args.quick else (2, 4, 8),
                          reps=10 if args.quick else 100)
    predicted = predictions(rows, splits, costs)
    lines = ["# AsyncDiff stage parallelism vs sequential (batch 1)", "",
             f"`{command_line('bench_stages.py', argv)}`", "", *markdown(costs, rows, predicted, splits, segments)]
    print("\n".join(lines))
    if not args.quick:
        print(write_report(args.out, "\n".join(lines) + "\n",
                           {"costs": costs, "segments": segments, "rows": rows, "splits": splits,
                            "predicted": predicted, "machine": machine_info(), "argv": argv}))


if __name__ == "__main__":
    main(sys.argv[1:])
