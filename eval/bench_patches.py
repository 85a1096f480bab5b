"""Patch parallelism over the horizon (DistriFusion / PCPP) for the 1-D UNet: does it pay on this CPU?

Three network sizes, batch 1, ONNX Runtime (one intra-op thread per patch, the two patches on
two worker threads; :mod:`para_policy.bench.patches` over :mod:`para_policy.patches`):

* DiffusionPolicy PushT (the shipped policy, horizon 16);
* LeRobot-like (a random ConditionalUnet1D with LeRobot PushT's widths (512, 1024, 2048),
  kernel 5, 8 groups, FiLM scale, global conditioning 132 = 2 steps x (64 image + 2 state)),
  horizon 64;
* DiffusionPolicy's real-robot size (the same widths, horizon 16, 10-D actions, global
  conditioning 2 x (2 x 512 + 9)).

Per size: the whole network (1 and 2 threads), the whole network at T/2 (the patch's compute
floor), one patch with its halos, the whole network emitting the exchange (warm-up steps) and
two patches overlapped; interleaved, p50 / p95. Then whole DDIM-10 sampling calls (sequential
vs displaced patches, 2 workers) and, on the shipped policy, the displaced sampler's executed
action deviation from sequential on the same noise. Timings mean something only on a quiet machine.

    python eval/bench_patches.py            # writes eval/results/bench_patches/bench_patches.{md,json}
    python eval/bench_patches.py --quick    # fewer repetitions, same files
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from para_policy.bench import command_line, load_stream, machine_info, markdown_table, schedule_spec, write_report
from para_policy.bench.patches import action_deviation, patch_costs, sampler_latency
from para_policy.loading import load_policy
from para_policy.models.unet1d import ConditionalUnet1D
from para_policy.models.unet_patches import PatchUnet
from para_policy.patches import EagerPatches

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "para_policy" / "assets" / "pusht_lowdim.safetensors"
STREAM = ROOT / "eval" / "results" / "bench_latency_schedules" / "stream.json"
WIDE = {"diffusion_step_embed_dim": 128, "down_dims": (512, 1024, 2048), "kernel_size": 5, "n_groups": 8,
        "cond_predict_scale": True}


def networks(policy) -> list[tuple[str, ConditionalUnet1D, int, int]]:
    """``(label, network, horizon, global_cond_dim)`` of the three sizes (module docstring)."""
    torch.manual_seed(0)
    lerobot = ConditionalUnet1D(2, global_cond_dim=132, **WIDE).eval()
    robot = ConditionalUnet1D(10, global_cond_dim=2 * (2 * 512 + 9), **WIDE).eval()
    return [("DP PushT (shipped), T=16", policy.model, 16, 40), ("LeRobot-like, T=64", lerobot, 64, 132),
            ("DP real-robot size, T=16", robot, 16, 2 * (2 * 512 + 9))]


def cost_lines(costs: dict[str, dict]) -> list[str]:
    """One table: each size's per-call p50 / p95 ms, and the ratios the verdict reads."""
    calls = [k for k in next(iter(costs.values())) if isinstance(next(iter(costs.values()))[k], dict)]
    rows = [[label, call, f"{c[call]['p50']:.2f}", f"{c[call]['p95']:.2f}"] for label, c in costs.items()
            for call in calls]
    lines = ["## Per-call cost at batch 1 (ms, ONNX Runtime, interleaved)", "",
             *markdown_table(["network", "call", "p50 ms", "p95 ms"], rows), "",
             *markdown_table(["network", "one patch / whole (1 thread)", "halo overhead of a patch (ms)",
                              "2 patches overlapped vs fastest whole"],
                             [[label, f"{c['one patch / whole 1 thread']:.2f}",
                               f"{c['one patch']['p50'] - c['whole at T/P, no halo (patch compute floor)']['p50']:.2f}",
                               f"{c['speed-up of overlapped patches vs fastest whole']:.2f}x"]
                              for label, c in costs.items()])]
    return lines


def cost_model_lines(costs: dict[str, dict], steps: int = 10, warmup: int = 1) -> list[str]:
    """The arithmetic: best case (hand-off free) and predicted DDIM-10 call from the per-call p50s (a prediction)."""
    rows = []
    for label, c in costs.items():
        whole = min(c["whole ORT 1 thread"]["p50"], c["whole ORT 2 threads"]["p50"])
        patch, both = c["one patch"]["p50"], c["2 patches overlapped"]["p50"]
        predicted = warmup * c["whole + exchange (warm-up step)"]["p50"] + (steps - warmup) * both
        rows.append([label, f"{whole:.2f}", f"{patch:.2f}", f"{both - patch:.2f}", f"{whole / patch:.2f}x",
                     f"{predicted:.1f} vs {steps * whole:.1f}", f"{steps * whole / predicted:.2f}x"])
    floor = "whole at T/P, no halo (patch compute floor)"
    verdict = []
    for r, c in zip(rows, costs.values(), strict=True):
        half = c[floor]["p50"] / c["whole ORT 1 thread"]["p50"]
        verdict.append(f"- {r[0]}: {'pays' if float(r[-1][:-1]) > 1 else 'does not pay'} (predicted {r[-1]}); the "
                       f"whole network at T/2 costs {half:.2f} of it at T: halving the horizon saves little where a "
                       "call is bound by per-operator overhead or by reading the weights (every patch reads them all)")
    return ["## Cost model (from the p50s above; a prediction)", "",
            "Step with 2 patches on 2 workers = one patch + hand-off (overlapped minus one patch); it can beat "
            "the fastest whole call only if one patch costs less than it. "
            f"DDIM-{steps} with {warmup} whole-network warm-up step = warm-up x (whole + exchange) "
            "+ rest x overlapped.",
            "", *markdown_table(["network", "fastest whole ms", "one patch ms", "hand-off ms",
                                 "best case (free hand-off)", f"DDIM-{steps} predicted vs sequential ms",
                                 "predicted speed-up"], rows), "", *verdict]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and observations (a loaded machine)")
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "bench_patches" / "bench_patches"))
    args = ap.parse_args(argv)
    reps, sample_reps, chunks = (20, 6, 5) if args.quick else (120, 30, 20)
    torch.set_num_threads(1)
    load_before = machine_info()["load_avg"]
    policy = load_policy(CHECKPOINT, sampler="sequential")
    schedule = policy.schedule_for(schedule_spec("sequential", "ddim10"))
    costs, latency = {}, {}
    for label, net, horizon, cond_dim in networks(policy):
        costs[label] = patch_costs(net, horizon, cond_dim, reps=reps)
        print(label, costs[label], flush=True)
        latency[label] = sampler_latency(net, schedule, cond_dim, horizon, warmups=(1, 3),
                                         reps=sample_reps if horizon == 16 and net is policy.model else 4)
        print(label, latency[label], flush=True)
    obs = [np.asarray(c["obs"], dtype=np.float32) for c in load_stream(STREAM)[0][:chunks]] if STREAM.exists() \
        else [np.random.default_rng(i).standard_normal((2, 20)).astype(np.float32) for i in range(chunks)]
    deviation = action_deviation(policy, schedule, obs, EagerPatches(PatchUnet(policy.model, 2)), (1, 2, 3, 5))
    info = {**machine_info(), "load_avg_before": load_before}
    lines = ["# Patch parallelism over the horizon (DistriFusion) vs the whole network, batch 1", "",
             f"`{command_line('bench_patches.py', argv)}`", "",
             f"Machine: {info['cpu_count']} CPUs, load average before {load_before}, after {info['load_avg']}"
             + (" (**load average above 0.5 before the run: ratios only**)" if max(load_before or [0]) > 0.5 else ""),
             "", *cost_lines(costs), "", *cost_model_lines(costs), "",
             "## DDIM-10 sampling call at batch 1 (ms, interleaved)", "",
             *markdown_table(["network", "variant", "p50 ms", "p95 ms", "speed-up vs fastest sequential"],
                             [[label, name, f"{v['p50']:.1f}", f"{v['p95']:.1f}", f"{v['speedup']:.2f}x"]
                              for label, rows in latency.items() for name, v in rows.items()]), "",
             "## Displaced patches vs sequential on the same noise, shipped PushT, DDIM-10", "",
             f"Executed actions (PushT pixels), {len(obs)} recorded observations; max |Δ| per chunk, mean / max:", "",
             *markdown_table(["whole-network warm-up steps", "mean", "max"],
                             [[w, f"{d['mean']:.2f}", f"{d['max']:.2f}"] for w, d in deviation.items()])]
    print("\n".join(lines))
    print(write_report(args.out, "\n".join(lines) + "\n",
                       {"costs": costs, "latency": latency, "deviation": deviation, "machine": info, "argv": argv}))


if __name__ == "__main__":
    main(sys.argv[1:])
