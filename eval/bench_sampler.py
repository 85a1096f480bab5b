"""Sequential vs Picard sampling at batch 1: latency per chunk, rounds, model evaluations.

Every setting is timed on the same noise draws, interleaved with the sequential baseline
(one chunk of every setting per repetition), so the ratios come from one run on one
machine. Rounds (sequential model calls) are the hardware-independent number; the
milliseconds are this machine's.

    python eval/bench_sampler.py                       # both model sizes, DDPM-100 and DDIM-16
    python eval/bench_sampler.py --models small --reps 3 --tolerances 0.1 --windows 16
    python eval/bench_sampler.py --checkpoint para_policy/assets/pusht_lowdim.safetensors

Writes ``eval/results/bench_sampler.{md,json}`` (atomically).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from para_policy.bench import keyed_noise, percentile_summary, write_report
from para_policy.models import ConditionalUnet1D
from para_policy.samplers import picard_sample, sequential_sample
from para_policy.schedule import build_scheduler, ddim_from, make_schedule

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    # the example config of the core issue (4.6M parameters)
    "small": dict(down_dims=[64, 128, 256], kernel_size=5, diffusion_step_embed_dim=128),
    # DiffusionPolicy's low-dim default (train_diffusion_unet_lowdim_workspace.yaml)
    "default": dict(down_dims=[256, 512, 1024], kernel_size=5, diffusion_step_embed_dim=256),
}
DP_DDPM = {"_target_": "diffusers.DDPMScheduler", "num_train_timesteps": 100, "beta_start": 0.0001,
           "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_small",
           "clip_sample": True, "prediction_type": "epsilon"}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def build(name: str, checkpoint: str | None, seed: int):
    """(denoiser, ddpm scheduler, conditions (N, C), description) for one model."""
    g = torch.Generator().manual_seed(seed)
    if checkpoint:
        from para_policy.loading import load_policy
        from para_policy.tasks.pusht.env import make_env

        policy = load_policy(checkpoint)
        env = make_env()
        conds = []
        for i in range(8):
            obs, _ = env.reset(seed=200000 + i)
            obs = torch.as_tensor(obs, dtype=torch.float32)[None, None].repeat(1, policy.n_obs_steps, 1)
            conds.append(policy.conditioning(obs)[0])
        n = sum(p.numel() for p in policy.model.parameters())
        return policy.denoise, policy.noise_scheduler, torch.cat(conds), f"checkpoint {checkpoint} ({n/1e6:.1f}M)"
    model = ConditionalUnet1D(input_dim=2, global_cond_dim=40, n_groups=8, cond_predict_scale=True, **MODELS[name])
    model.eval()
    n = sum(p.numel() for p in model.parameters())

    def denoiser(x, t, c):
        return model(x, t, global_cond=c)

    conds = torch.randn(8, 40, generator=g)
    return denoiser, build_scheduler(DP_DDPM), conds, f"{name} ({n/1e6:.1f}M params, random weights)"


def bench(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    results = {"machine": machine(), "command": "python eval/bench_sampler.py " + " ".join(args.argv), "runs": []}
    models = ["checkpoint"] if args.checkpoint else args.models
    for model_name in models:
        denoiser, ddpm, conds, desc = build(model_name, args.checkpoint, args.seed)
        schedules = {"DDPM-100": make_schedule(ddpm, 100), f"DDIM-{args.ddim_steps}":
                     make_schedule(ddim_from(ddpm), args.ddim_steps)}
        with torch.inference_mode():  # warm-up: every batch size the windows use
            for w in sorted(set(args.windows) | {1}):
                denoiser(torch.randn(min(w, 100), 16, 2), torch.zeros(min(w, 100), dtype=torch.long),
                         conds[:1].expand(min(w, 100), -1))
        for sched_name, schedule in schedules.items():
            S = schedule.num_steps
            picard = dict.fromkeys((min(w, S), tol) for w in args.windows for tol in args.tolerances)
            settings = [("sequential", None, None)] + [("picard", w, tol) for w, tol in picard]
            times = {s: [] for s in settings}
            rounds = {s: [] for s in settings}
            evals = {s: [] for s in settings}
            dev = {s: [] for s in settings}
            bar = tqdm(total=args.reps * len(settings), desc=f"{model_name} {sched_name}")
            for rep in range(args.reps):
                cond = conds[rep % len(conds)][None]
                x_T, noise = keyed_noise(schedule, (16, 2), [args.seed + rep])
                ref = None
                for s in settings:
                    name, w, tol = s
                    t0 = time.perf_counter()
                    if name == "sequential":
                        out, st = sequential_sample(denoiser, schedule, x_T, noise, condition=cond)
                    else:
                        out, st = picard_sample(denoiser, schedule, x_T, noise, window=w, tolerance=tol,
                                                condition=cond)
                    times[s].append((time.perf_counter() - t0) * 1000)
                    if ref is None:
                        ref = out
                    rounds[s].append(st.rounds)
                    evals[s].append(st.model_evals)
                    dev[s].append(float((out - ref).abs().max()))
                    bar.update()
            bar.close()
            seq_p50 = percentile_summary(times[settings[0]])["p50"]
            for s in settings:
                name, w, tol = s
                ms = percentile_summary(times[s])
                p50 = ms["p50"]
                results["runs"].append({
                    "model": desc, "schedule": sched_name, "sampler": name, "window": w, "tolerance": tol,
                    "ms_p50": p50, "ms_p95": ms["p95"],
                    "rounds": statistics.mean(rounds[s]), "model_evals": statistics.mean(evals[s]),
                    "max_dev": max(dev[s]), "speedup_p50": seq_p50 / p50, "reps": ms["n"],
                })
    return results


def to_markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", f"Command: `{results['command']}`", ""]
    lines += ["| model | schedule | sampler | window | tolerance | p50 ms/chunk | p95 ms/chunk | rounds | "
              "model evals | max dev | speed-up (p50) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        w = "" if r["window"] is None else r["window"]
        tol = "" if r["tolerance"] is None else r["tolerance"]
        lines.append(f"| {r['model']} | {r['schedule']} | {r['sampler']} | {w} | {tol} | {r['ms_p50']:.0f} | "
                     f"{r['ms_p95']:.0f} | {r['rounds']:.1f} | {r['model_evals']:.0f} | {r['max_dev']:.2g} | "
                     f"{r['speedup_p50']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["small", "default"], choices=sorted(MODELS))
    parser.add_argument("--checkpoint", help="benchmark a trained policy checkpoint instead of random nets")
    parser.add_argument("--windows", nargs="+", type=int, default=[4, 8, 16, 32, 100])
    parser.add_argument("--tolerances", nargs="+", type=float, default=[0.01, 0.05, 0.1, 0.5])
    parser.add_argument("--ddim-steps", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5, help="chunks (noise draws) per setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "bench_sampler"), help="output path without suffix")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    results = bench(args)
    md = to_markdown(results)
    write_report(Path(args.out).with_suffix(""), md, results)
    print(md)


if __name__ == "__main__":
    main()
