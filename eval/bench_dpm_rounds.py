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
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from para_policy import load_policy
from para_policy.checkpoints import atomic_write
from para_policy.samplers import draw_noise, picard_sample, sequential_sample, shift_trajectory, warm_start_init
from para_policy.schedule import ddim_from, dpm_from, make_schedule

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
STREAM = ROOT / "eval" / "results" / "bench_latency_schedules" / "stream.json"
#: name -> (scheduler kind, steps, DPM-Solver order)
SCHEDULES = {"ddpm100": ("ddpm", 100, 0), "ddim10": ("ddim", 10, 0), "dpm2-5": ("dpm", 5, 2),
             "dpm2-10": ("dpm", 10, 2), "dpm3-10": ("dpm", 10, 3), "dpm2-16": ("dpm", 16, 2)}
VARIANTS = {"paradigms": dict(linear_solve=True, secant=True, tolerance=0.02),
            "paradigms_published": dict(tolerance=0.1, per_sample_windows=False)}


def schedule_for(policy: Any, kind: str, steps: int, order: int) -> Any:
    own = policy.noise_scheduler
    scheduler = own if kind == "ddpm" else ddim_from(own) if kind == "ddim" else dpm_from(own, solver_order=order)
    return make_schedule(scheduler, steps)


def replay(policy: Any, schedule: Any, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds and deviation (px, mean over the chunk's executed actions) of every variant, per chunk."""
    steps = schedule.num_steps
    out = {name: {"rounds": [], "deviation": []} for name in VARIANTS}
    guess = None

    def model(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return policy.model(x, t, global_cond=c)

    for i, chunk in enumerate(chunks):
        obs = torch.as_tensor(chunk["obs"], dtype=torch.float32)[None]
        cond, _ = policy.conditioning(obs)
        x_T, noise = draw_noise(schedule, policy.trajectory_shape(1), torch.Generator().manual_seed(1000 + i))
        with torch.inference_mode():
            ref, _ = sequential_sample(model, schedule, x_T, noise, condition=cond)
            for name, options in VARIANTS.items():
                warm = name == "paradigms" and chunk["chunk"] > 0 and guess is not None
                init = warm_start_init(schedule, guess, x_T, noise) if warm else None
                sample, stats = picard_sample(model, schedule, x_T, noise, condition=cond, window=steps, init=init,
                                              **options)
                if name == "paradigms":
                    guess = shift_trajectory(sample, policy.n_action_steps)
                a, b = (policy.normalizer.unnormalize("action", s[..., : policy.action_dim]) for s in (ref, sample))
                start = policy.action_start
                gap = (a - b)[:, start: start + policy.n_action_steps].norm(dim=-1).mean()
                out[name]["rounds"].append(stats.rounds)
                out[name]["deviation"].append(float(gap))
    return {name: {"steps": steps, "rounds_mean": statistics.mean(r["rounds"]), "rounds_max": max(r["rounds"]),
                   "deviation_mean_px": statistics.mean(r["deviation"]),
                   "deviation_max_px": max(r["deviation"])} for name, r in out.items()}


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
    chunks = json.loads(STREAM.read_text())["chunks"][: args.chunks]
    results = {}
    for name in args.schedules:
        print(f"{name} ...", flush=True)
        results[name] = replay(policy, schedule_for(policy, *SCHEDULES[name]), chunks)
    command = "python eval/bench_dpm_rounds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "bench_dpm_rounds.json",
                 lambda p: Path(p).write_text(json.dumps({"command": command, "results": results}, indent=1)))
    text = markdown(results, command.strip(), len(chunks))
    atomic_write(args.out / "bench_dpm_rounds.md", lambda p: Path(p).write_text(text))
    print(text)


if __name__ == "__main__":
    main()
