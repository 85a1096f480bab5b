"""Drive PushT through para_policy's Controller at a fixed control rate.

Shows the robot-loop API: ``Controller.act(obs)`` once per control tick, a new chunk of
actions every ``n_action_steps`` ticks, warm starts from the previous chunk, an optional
per-chunk deadline, and the latency / rounds statistics at the end.

    python examples/controller_pusht.py --help
    python examples/controller_pusht.py --rate-hz 10 --deadline-ms 80
    python examples/controller_pusht.py --compare-warm-start --rate-hz 0 --max-steps 80
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import para_policy
from para_policy import PRESETS, load_policy
from para_policy.controller import Controller
from para_policy.tasks.pusht.env import make_env

DEFAULT_CHECKPOINT = Path(para_policy.__file__).parent / "assets" / "pusht_lowdim.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                   help="policy checkpoint: para_policy .safetensors or a trusted DiffusionPolicy .ckpt")
    p.add_argument("--sampler", default="paradigms", choices=sorted(PRESETS),
                   help="a preset of para_policy.PRESETS; paradigms: Picard + linear solve + secant + warm start, "
                        "window auto, tolerance 0.02 (the fastest measured)")
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default=None, help="default: the checkpoint's")
    p.add_argument("--window", type=window_arg, default=None,
                   help="Picard window (steps refined per round), or auto: measured on the first chunk")
    p.add_argument("--tolerance", type=float, default=None, help="Picard tolerance (0 = exact)")
    p.add_argument("--num-inference-steps", type=int, default=None, help="override the checkpoint's steps")
    p.add_argument("--no-warm-start", action="store_true", help="start every chunk cold")
    p.add_argument("--compare-warm-start", action="store_true",
                   help="run the same episodes cold and warm (same seeds) and print both")
    p.add_argument("--deadline-ms", type=float, default=None, help="time budget per chunk (Picard samplers)")
    p.add_argument("--rate-hz", type=float, default=10.0, help="control rate; 0 runs as fast as possible")
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=300, help="env steps per episode")
    p.add_argument("--seed", type=int, default=0, help="env seed of the first episode and noise seed")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    return p.parse_args(argv)


def run_episodes(controller: Controller, args: argparse.Namespace) -> tuple[list[float], int]:
    """Run ``args.episodes`` episodes at ``args.rate_hz``.

    Returns each episode's max reward and the number of control ticks the loop was late for.
    """
    env = make_env(max_episode_steps=args.max_steps)
    period = 1.0 / args.rate_hz if args.rate_hz > 0 else 0.0
    rewards = []
    late_ticks = 0
    for episode in range(args.episodes):
        obs, _ = env.reset(seed=args.seed + episode)
        controller.reset()
        best = 0.0
        next_tick = time.perf_counter()
        while True:
            action = controller.act(obs)
            obs, reward, terminated, truncated, _ = env.step(action)
            best = max(best, float(reward))
            if terminated or truncated:
                break
            if period:
                next_tick += period
                slack = next_tick - time.perf_counter()
                if slack > 0:
                    time.sleep(slack)
                else:  # the loop fell behind: count it and restart the clock rather than bursting
                    late_ticks += 1
                    next_tick = time.perf_counter()
        rewards.append(best)
    env.close()
    return rewards, late_ticks


def summary(controller: Controller, rewards: list[float], late_ticks: int) -> dict:
    s = controller.stats()
    s["late_ticks"] = late_ticks
    s["episode_max_reward"] = rewards
    s["mean_max_reward"] = float(np.mean(rewards)) if rewards else None
    return s


def print_summary(name: str, s: dict) -> None:
    lat, act, rounds = s["chunk_latency_ms"], s["action_latency_ms"], s["rounds"]
    print(f"[{name}] sampler={s['sampler']} options={s['options']} warm_start={s['warm_start']} "
          f"deadline_ms={s['deadline_ms']}")
    print(f"  chunks={s['chunks']} actions={s['actions']} late control ticks={s['late_ticks']}")
    print(f"  chunk latency ms  p50={lat['p50']:.1f} p95={lat['p95']:.1f} max={lat['max']:.1f}")
    print(f"  action latency ms p50={act['p50']:.2f} p95={act['p95']:.1f} max={act['max']:.1f}")
    print(f"  rounds per chunk  mean={rounds['mean']:.1f} p50={rounds['p50']:.0f} p95={rounds['p95']:.0f} "
          f"max={rounds['max']:.0f}; model evals/chunk mean={s['model_evals']['mean']:.0f}")
    print(f"  deadline misses={s['deadline_misses']} overruns={s['overruns']} unconverged={s['unconverged']}")
    print(f"  reward (max per episode)=[{', '.join(f'{r:.3f}' for r in s['episode_max_reward'])}] "
          f"mean={s['mean_max_reward']:.3f}")


def window_arg(text: str) -> int | str:
    """``--window``: an integer or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"checkpoint not found: {args.checkpoint} (pass --checkpoint PATH)")
    policy = load_policy(args.checkpoint)
    options = {}
    if args.sampler != "sequential":
        options.update({k: v for k, v in (("window", args.window), ("tolerance", args.tolerance)) if v is not None})
    if args.num_inference_steps:
        options["num_inference_steps"] = args.num_inference_steps
    if args.scheduler:
        options["scheduler"] = args.scheduler
    runs = [("cold", False), ("warm", True)] if args.compare_warm_start else [
        ("cold" if args.no_warm_start else "warm", not args.no_warm_start)]
    results = {}
    for name, warm in runs:
        controller = Controller(policy, sampler=args.sampler, warm_start=warm if PRESETS[args.sampler][
                                    "family"] != "sequential" else None, deadline_ms=args.deadline_ms,
                                seed=args.seed, **options)
        rewards, late_ticks = run_episodes(controller, args)
        results[name] = summary(controller, rewards, late_ticks)
        if not args.json:
            print_summary(name, results[name])
    if args.json:
        print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
