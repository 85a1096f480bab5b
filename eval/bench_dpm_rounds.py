"""Rounds and action deviation of Picard sampling on DPM-Solver++ schedules, next to DDIM and DDPM.

ParaDPMSolver runs the multistep DPM-Solver++ steps in parallel windows. Its convergence test
is the one of DDPM and DDIM (a point's change within ``tolerance`` of its step's noise scale);
whether that means the same action deviation on a few large DPM-Solver steps is what this
measures. The shipped PushT policy (DDPM-trained) replays a recorded control stream at batch 1,
the same noise for the sequential loop and the parallel variants of a chunk; ``paradigms``
is warm-started from its own previous chunk as in a control loop (cold at an episode's first
chunk), ParaDiGMS as published starts cold. Rounds count model calls, so the machine's load
does not change them.

    python eval/bench_dpm_rounds.py                 # writes eval/results/bench_dpm_rounds.{md,json}
    python eval/bench_dpm_rounds.py --chunks 4 --out /tmp/dpm
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from para_policy import load_policy
from para_policy.bench import ChunkKeys, Variant, deviations, load_stream, replay, schedule_spec, write_report

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
STREAM = ROOT / "eval" / "results" / "bench_latency_schedules" / "stream.json"
SCHEDULES = ("ddpm100", "ddim10", "dpm2-5", "dpm2-10", "dpm3-10", "dpm2-16")
#: variant -> (preset, options besides the window, which is the whole schedule)
VARIANTS = {"paradigms": ("paradigms", {}), "paradigms_published": ("paradigms_published", {})}
KEYS = ChunkKeys(stream=None, offset=1000)  # chunk i of the replay: torch.manual_seed(1000 + i)


def replay_schedule(policy: Any, schedule: str, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds and deviation (px, mean over the chunk's executed actions) of every variant on ``schedule``."""
    steps = policy.schedule_for(schedule_spec("sequential", schedule)).num_steps
    variants = [Variant("sequential", schedule_spec("sequential", schedule))]
    variants += [Variant(name, schedule_spec(preset, schedule, window=steps, **options))
                 for name, (preset, options) in VARIANTS.items()]
    records = replay(policy, variants, chunks, KEYS, warmup=0)
    out = {}
    for name in VARIANTS:
        rounds = [r["rounds"] for r in records[name]]
        gap = deviations(records[name], records["sequential"], how="mean_norm")
        out[name] = {"steps": steps, "rounds_mean": statistics.mean(rounds), "rounds_max": max(rounds),
                     "deviation_mean_px": statistics.mean(gap), "deviation_max_px": max(gap)}
    return out


def markdown(results: dict[str, Any], command: str, chunks: int) -> str:
    lines = ["# Picard rounds on DPM-Solver++ schedules, next to DDIM and DDPM", "",
             f"`{command}`; the shipped PushT policy, {chunks} chunks of the recorded stream at batch 1, the "
             "window the whole schedule. `paradigms`: linear solve + secant, tolerance 0.02, warm-started "
             "from its previous chunk; `paradigms_published`: tolerance 0.1, cold. Deviation: mean distance "
             "of the executed actions from the sequential loop's on the same noise (px).", "",
             "| schedule | steps | sampler | rounds mean | max | deviation mean px | max px |",
             "|---|---|---|---|---|---|---|"]
    for schedule, res in results.items():
        for name, r in res.items():
            lines.append(f"| {schedule} | {r['steps']} | {name} | {r['rounds_mean']:.2f} | {r['rounds_max']} | "
                         f"{r['deviation_mean_px']:.4f} | {r['deviation_max_px']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=16, help="chunks of the recorded stream (default 16)")
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    policy = load_policy(CHECKPOINT, sampler="sequential", backend="eager")
    chunks = load_stream(STREAM)[0][: args.chunks]
    results = {}
    for name in args.schedules:
        print(f"{name} ...", flush=True)
        results[name] = replay_schedule(policy, name, chunks)
    command = "python eval/bench_dpm_rounds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, command.strip(), len(chunks))
    write_report(args.out / "bench_dpm_rounds", text, {"command": command, "results": results})
    print(text)


if __name__ == "__main__":
    main()
