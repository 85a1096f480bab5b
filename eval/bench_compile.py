"""Eager vs ``torch.compile`` (dynamic shapes) of the shipped PushT policy at batch 1.

Times the default sampler (the ``paradigms`` preset) and the sequential loop, each eager
and compiled, interleaved on the first observation of 10 PushT episodes (2 calls each).
Compiling happens on the first calls and is reported separately.

    python eval/bench_compile.py          # ~4 min on 2 CPU cores, ~2 of them compiling
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from para_policy.inference import configure_inference
from para_policy.loading import load_policy
from para_policy.samplers import sampler_spec
from para_policy.tasks.pusht.env import make_env

CHECKPOINT = Path(__file__).resolve().parent.parent / "para_policy" / "assets" / "pusht_lowdim.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    eager = load_policy(args.checkpoint, backend="eager")
    compiled = configure_inference(load_policy(args.checkpoint, backend="eager"), compile=True)
    env = make_env()
    obs = [torch.from_numpy(np.stack([env.reset(seed=s)[0]] * eager.n_obs_steps).astype(np.float32))[None]
           for s in range(100000, 100000 + args.episodes)]
    env.close()
    fast = eager.resolve(sampler_spec("paradigms", warm_start=False), obs[0])  # window auto, measured once
    seq = sampler_spec("sequential")
    t0 = time.perf_counter()
    for o in obs[:3]:  # compiles for the row counts that occur
        for spec in (fast, seq):
            compiled.predict_action({"obs": o}, generator=torch.Generator().manual_seed(0), sampler=spec)
    print(f"compile + first calls: {time.perf_counter() - t0:.0f} s", flush=True)
    times: dict[str, list[float]] = {}
    runs = (("default sampler, eager", eager, fast), ("default sampler, compiled", compiled, fast),
            ("sequential, eager", eager, seq), ("sequential, compiled", compiled, seq))
    for _ in range(args.reps):
        for i, o in enumerate(obs):
            for name, policy, spec in runs:
                t = time.perf_counter()
                policy.predict_action({"obs": o}, generator=torch.Generator().manual_seed(i), sampler=spec)
                times.setdefault(name, []).append((time.perf_counter() - t) * 1e3)
    for name, ms in times.items():
        print(f"{name}: p50 {statistics.median(ms):.0f} ms per chunk ({len(ms)} calls)")


if __name__ == "__main__":
    main()
