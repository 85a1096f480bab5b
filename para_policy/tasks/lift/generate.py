"""Generate Lift demonstrations with the scripted expert into a robomimic HDF5 file.

Usage::

    python -m para_policy.tasks.lift.generate --episodes 200 --seed 0 \
        --out data/lift/lift_expert.hdf5 --workers 2
    python -m para_policy.tasks.lift.generate --env-seeds 100000:100050   # expert on the test starts

Seeds follow :mod:`para_policy.tasks.seeds`: start state ``i`` of ``--seed S`` is
``env.reset(seed=1_000_000 + 100_000 * S + i)``, disjoint from the evaluation seeds
100000-100049. Each worker process makes one env and reuses it (making one takes seconds); an
episode depends only on its seed, so the file is the same for any number of workers. Only
successful demos are written (as ``demo_0 .. demo_<n-1>`` in seed order, each with its seed as
an attribute); failures are listed. The file is written atomically (temp file, then rename).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from ..seeds import add_seed_arguments, env_seeds_from_args, episode_seed
from .env import LiftEnv, make_env_args
from .expert import run_expert_episode
from .robomimic_hdf5 import write_demos

_WORKER_ENV: LiftEnv | None = None


def _worker_env() -> LiftEnv:
    global _WORKER_ENV
    if _WORKER_ENV is None:
        _WORKER_ENV = LiftEnv(terminate_on_success=True)
    return _WORKER_ENV


def _run(job: tuple[int, int, dict[str, Any] | None]) -> dict[str, Any]:
    seed, max_steps, expert_kwargs = job
    t0 = time.process_time()
    out = run_expert_episode(seed, max_steps=max_steps, env=_worker_env(), expert_kwargs=expert_kwargs)
    out["cpu_time"] = time.process_time() - t0
    return out


def generate_demos(
    seeds: list[int],
    workers: int = 1,
    max_steps: int = 400,
    expert_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the expert from each seed's start state.

    Returns:
        ``(successful episodes in seed order (run_expert_episode dicts), stats)`` with stats
        ``episodes, successes, success_rate, failed (seeds), mean_length, cpu_time_per_episode,
        wall_time, env_args``.
    """
    jobs = [(int(s), int(max_steps), expert_kwargs) for s in seeds]
    t0 = time.time()
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), desc="lift expert", unit="ep", disable=not progress)
    if workers <= 1:
        for job in jobs:
            results.append(_run(job))
            bar.update()
            bar.set_postfix(ok=sum(r["success"] for r in results))
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            for r in pool.imap(_run, jobs, chunksize=1):  # imap keeps the seed order
                results.append(r)
                bar.update()
                bar.set_postfix(ok=sum(x["success"] for x in results))
    bar.close()
    ok = [r for r in results if r["success"]]
    stats = {
        "episodes": len(results),
        "successes": len(ok),
        "success_rate": len(ok) / max(len(results), 1),
        "failed": [r["seed"] for r in results if not r["success"]],
        "mean_length": float(np.mean([r["length"] for r in ok])) if ok else float("nan"),
        "cpu_time_per_episode": float(np.mean([r["cpu_time"] for r in results])) if results else 0.0,
        "wall_time": time.time() - t0,
    }
    return ok, stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_seed_arguments(p)
    p.add_argument("--out", default="data/lift/lift_expert.hdf5", help="output robomimic HDF5 path")
    p.add_argument("--workers", type=int, default=2, help="worker processes (one env each)")
    p.add_argument("--max-steps", type=int, default=400, help="step limit per episode")
    p.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise on the expert's position command")
    args = p.parse_args(argv)
    seeds = env_seeds_from_args(p, args)
    if seeds is None:
        seeds = [episode_seed(args.seed, i) for i in range(args.episodes)]
    expert_kwargs = {"noise": args.noise} if args.noise else None

    demos, st = generate_demos(seeds, args.workers, args.max_steps, expert_kwargs)
    for s in st["failed"]:
        print(f"failed: seed {s}")
    print(
        f"success {st['successes']}/{st['episodes']} ({100 * st['success_rate']:.1f}%); "
        f"mean length {st['mean_length']:.1f} steps; {st['cpu_time_per_episode']:.2f} s CPU/episode, "
        f"{st['wall_time'] / max(st['episodes'], 1):.2f} s wall/episode"
    )
    if args.no_save:
        return
    if not demos:
        raise SystemExit("no successful episodes; nothing written")
    env_args = make_env_args()
    generation = {"generator": "para_policy.tasks.lift.generate", "seed": args.seed, "episodes": args.episodes,
                  "max_steps": args.max_steps, "expert_kwargs": expert_kwargs or {}, "failed_seeds": st["failed"]}
    path = write_demos(args.out, demos, env_args, attrs={"para_policy_generation": generation})
    steps = sum(d["length"] for d in demos)
    print(f"wrote {path}: {len(demos)} demos, {steps} steps")


if __name__ == "__main__":
    main()
