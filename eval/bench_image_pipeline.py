"""Latency of the whole image-policy pipeline (encoder + sampler) at DiffusionPolicy's real-robot size.

DiffusionPolicy's real-robot workspace (``train_diffusion_unet_real_image_workspace.yaml``):
two cameras of 3x240x320, a ResNet-18 with GroupNorm per camera on 216x288 crops, ImageNet
normalization, a 2-d end-effector pose, and a ConditionalUnet1D with ``down_dims`` [512, 1024,
2048] conditioned on both observation steps; DDIM in its real-robot evaluation (derived here from
the DDPM training schedule, as ``scheduler='ddim'`` does, so DDPM-100 runs on the same policy). Weights are
random (seeded): latency depends on the shapes, not on the values, but the rounds a parallel
sampler needs do depend on the weights, so the rounds here are those of a random network.

For each schedule, ``sequential`` and ``paradigms`` (window resolved on this machine by the
auto tuner, which has window 1, the sequential loop, among its candidates) run the same
observation and noise, alternating call by call; the encoder alone is timed too. Writes
``bench_image_pipeline.{md,json}``.

    python eval/bench_image_pipeline.py                               # DDIM-16, DDIM-10, DDPM-100
    python eval/bench_image_pipeline.py --schedules ddim16 --calls 3 --out /tmp/pipe
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from para_policy import ImagePolicy  # noqa: E402
from para_policy.bench import percentile_summary, write_json, write_text  # noqa: E402
from para_policy.bench.image import CAMERAS, real_robot_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = {"ddim16": {"scheduler": "ddim", "num_inference_steps": 16},
             "ddim10": {"scheduler": "ddim", "num_inference_steps": 10},
             "ddpm100": {"scheduler": "ddpm", "num_inference_steps": 100}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--calls", type=int, default=5, help="timed calls per sampler and schedule (DDPM-100: "
                                                            "a third of them, at least 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--calibration-reps", type=int, default=2, help="reps per row count of the auto tuner")
    parser.add_argument("--candidates", type=int, nargs="+", default=None,
                        help="the auto tuner's candidate windows (default: all of para_policy.window's); at this "
                             "size each candidate costs a full parallel solve on the CPU")
    parser.add_argument("--down-dims", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "bench_image_pipeline")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    policy = ImagePolicy(real_robot_config(args.down_dims, (240, 320), (216, 288))).eval()
    policy.set_sampler("sequential")
    n_params = {"unet": sum(p.numel() for p in policy.model.parameters()),
                "encoder": sum(p.numel() for p in policy.obs_encoder.parameters())}
    rng = np.random.default_rng(0)
    obs = {cam: torch.from_numpy(rng.uniform(0, 1, (1, 2, 3, 240, 320)).astype(np.float32)) for cam in CAMERAS}
    obs["robot_eef_pose"] = torch.from_numpy(rng.uniform(-1, 1, (1, 2, 2)).astype(np.float32))

    with torch.inference_mode():
        checked = policy.check_obs(obs)
        encoder_ms = []
        for i in range(args.warmup + args.calls):
            start = time.perf_counter()
            policy.conditioning(checked)
            if i >= args.warmup:
                encoder_ms.append((time.perf_counter() - start) * 1000)
    print(f"encoder: {percentile_summary(encoder_ms)} ms")

    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()},
               "parameters": n_params, "encoder_ms": percentile_summary(encoder_ms), "schedules": {}}
    for name in args.schedules:
        kw = SCHEDULES[name]
        calls = max(2, args.calls // 3) if name == "ddpm100" else args.calls
        start = time.perf_counter()
        window, info = _calibrate(policy, obs, _paradigms(kw), args)
        calibration_s = time.perf_counter() - start
        print(f"{name}: auto window {window} (calibration {calibration_s:.0f} s)")
        specs = {"sequential": ("sequential", kw), "paradigms": ("paradigms", {**kw, "window": window})}
        ms: dict[str, list[float]] = {k: [] for k in specs}
        rounds: dict[str, list[int]] = {k: [] for k in specs}
        for i in range(args.warmup + calls):
            order = list(specs) if i % 2 == 0 else list(specs)[::-1]
            for key in order:
                sampler, options = specs[key]
                g = torch.Generator().manual_seed(100 + i)
                policy.reset()
                begin = time.perf_counter()
                out = policy.predict_action(obs, generator=g, sampler=sampler, warm_start=False, **options)
                elapsed = (time.perf_counter() - begin) * 1000
                if i >= args.warmup:
                    ms[key].append(elapsed)
                    rounds[key].append(int(out.stats.rounds))
            print(f"  call {i}: " + ", ".join(f"{k} {ms[k][-1]:.0f} ms" for k in specs if ms[k]))
        row = {k: {"ms": percentile_summary(ms[k]), "rounds": float(np.mean(rounds[k])), "calls": len(ms[k])}
               for k in specs}
        row["paradigms"]["window"] = window
        row["speedup_p50"] = row["sequential"]["ms"]["p50"] / row["paradigms"]["ms"]["p50"]
        row["speedup_p95"] = row["sequential"]["ms"]["p95"] / row["paradigms"]["ms"]["p95"]
        row["calibration_s"] = calibration_s
        row["cost_curve_ms"] = info.get("cost")
        row["predicted_ms"] = info.get("predicted_ms")
        results["schedules"][name] = row
        # after each schedule: a long run keeps its rows
        write_json(args.out / "bench_image_pipeline.json", results, indent=2)
        write_text(args.out / "bench_image_pipeline.md", report(results, args))
    print(report(results, args))


def _calibrate(policy: ImagePolicy, obs: dict, spec, args: argparse.Namespace) -> tuple[int, dict]:
    """The auto window on this machine (over ``--candidates`` when given), as ``policy.calibrate`` measures it."""
    from para_policy.window import CANDIDATE_WINDOWS, Problem, calibrate_window

    candidates = args.candidates or CANDIDATE_WINDOWS
    with torch.inference_mode():
        checked = policy.check_obs(obs)
        cond, inpaint = policy.conditioning(checked)
    problem = Problem(policy.trajectory_shape(1), cond, inpaint)
    return calibrate_window(policy.denoise, policy.schedule_for(spec), spec.with_options(warm_start=False), [problem],
                            candidates, reps=args.calibration_reps, device=policy.device)


def _paradigms(kw: dict):
    from para_policy.samplers import sampler_spec

    return sampler_spec("paradigms", **kw)


def report(results: dict, args: argparse.Namespace) -> str:
    m, p = results["machine"], results["parameters"]
    lines = [
        "# Image-policy pipeline latency at DiffusionPolicy's real-robot size",
        "",
        f"Two cameras 3x240x320 (ResNet-18 + GroupNorm each, 216x288 crops), UNet down_dims {args.down_dims} "
        f"({p['unet'] / 1e6:.0f} M parameters; encoders {p['encoder'] / 1e6:.1f} M), random weights, batch 1. "
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']} with {m['threads']} threads. "
        "Each chunk = encoder (once) + sampler; calls alternate between the samplers on the same observation "
        "and noise. The window is the auto tuner's choice on this machine (candidates "
        f"{args.candidates or 'all'}; window 1 is the sequential loop itself).",
        "",
        f"Encoder alone: p50 {results['encoder_ms']['p50']:.0f} ms, p95 {results['encoder_ms']['p95']:.0f} ms.",
        "",
        "| schedule | sampler | window | rounds/chunk | ms/chunk p50 | ms/chunk p95 | calls |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results["schedules"].items():
        for key in ("sequential", "paradigms"):
            r = row[key]
            lines.append(f"| {name} | {key} | {r.get('window', '—')} | {r['rounds']:.1f} | {r['ms']['p50']:.0f} | "
                         f"{r['ms']['p95']:.0f} | {r['calls']} |")
    lines += ["", "| schedule | sequential / paradigms p50 | p95 | auto-tuning time (s) |", "|---|---|---|---|"]
    for name, row in results["schedules"].items():
        lines.append(f"| {name} | {row['speedup_p50']:.2f}× | {row['speedup_p95']:.2f}× | "
                     f"{row['calibration_s']:.0f} |")
    lines += ["", "Command: `python eval/bench_image_pipeline.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("out",) and v is not None) + "`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
