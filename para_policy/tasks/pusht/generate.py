"""Generate PushT demonstrations with the scripted expert and save them as a zarr replay buffer.

Usage::

    python -m para_policy.tasks.pusht.generate --episodes 200 --seed 0 \
        --out data/pusht/pusht_expert.zarr --workers 2 [--img]

Seeds: start state ``i`` (0 <= i < 100000) of a run with ``--seed S`` uses
``env.reset(seed=episode_seed(S, i))`` with ``episode_seed(S, i) = 1_000_000 + 100_000 * S + i``
(the expert's sampler uses the same number), so all training start states are >= 1,000,000 and
disjoint from the evaluation seeds 100000-100049.  Output is deterministic for a given ``--seed``
whatever the number of workers: episodes are computed independently and kept in order of ``i``.
Only successful episodes (coverage >= target) are kept; failures are counted and logged.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from ..seeds import (  # noqa: F401  (EVAL_SEEDS, SEED_BASE, SEED_STRIDE re-exported)
    EVAL_SEEDS,
    SEED_BASE,
    SEED_STRIDE,
    add_seed_arguments,
    env_seeds_from_args,
    episode_seed,
)
from .env import block_keypoints
from .expert import run_expert_episode
from .replay_buffer import ReplayBuffer


def _worker(args: tuple[int, dict[str, Any]]) -> dict[str, Any]:
    s, kw = args
    t0 = time.process_time()
    out = run_expert_episode(s, **kw)
    out["cpu_time"] = time.process_time() - t0
    return out


def generate_dataset(
    episodes: int,
    seed: int = 0,
    workers: int = 1,
    img: bool = False,
    max_steps: int = 300,
    target_coverage: float = 0.97,
    expert_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    seeds: list[int] | None = None,
) -> tuple[ReplayBuffer, dict[str, Any]]:
    """Run the expert on ``episodes`` start states; return the buffer of successes and run stats.

    ``seeds`` replaces the derived training seeds by explicit env seeds (e.g. the test
    seeds 100000-100049, to measure the expert where the policy is evaluated).
    """
    kw = {
        "max_steps": max_steps,
        "target_coverage": target_coverage,
        "img": img,
        "expert_kwargs": expert_kwargs,
    }
    if seeds is not None:
        episodes = len(seeds)
    jobs = [(s, kw) for s in seeds] if seeds is not None else [(episode_seed(seed, i), kw) for i in range(episodes)]
    t0 = time.time()
    results: list[dict[str, Any]] = []
    bar = tqdm(total=episodes, desc="expert episodes", disable=not progress)
    if workers <= 1:
        for j in jobs:
            results.append(_worker(j))
            bar.update()
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            for r in pool.imap(_worker, jobs, chunksize=1):  # imap keeps the order of i
                results.append(r)
                bar.update()
                bar.set_postfix(ok=sum(x["success"] for x in results))
    bar.close()
    wall = time.time() - t0

    buf = ReplayBuffer()
    failed = []
    for r in results:
        if not r["success"]:
            failed.append((r["seed"], r["max_coverage"]))
            continue
        ep = {
            "state": r["states"],
            "keypoint": block_keypoints(r["states"]).astype(np.float32),
            "action": r["actions"],
        }
        if img:
            ep["img"] = r["img"]
        buf.add_episode(ep)
    ok = [r for r in results if r["success"]]
    stats = {
        "episodes": episodes,
        "successes": len(ok),
        "failed": failed,
        "success_rate": len(ok) / max(episodes, 1),
        "mean_length": float(np.mean([r["length"] for r in ok])) if ok else float("nan"),
        "mean_coverage": float(np.mean([r["coverage"] for r in ok])) if ok else float("nan"),
        "cpu_time_per_episode": float(np.mean([r["cpu_time"] for r in results])) if results else 0.0,
        "wall_time": wall,
    }
    return buf, stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_seed_arguments(p)
    p.add_argument("--out", default="data/pusht/pusht_expert.zarr", help="output zarr (format 2) path")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--img", action="store_true", help="also store 96x96 RGB frames in data/img")
    p.add_argument("--max-steps", type=int, default=300, help="step limit per episode (env limit is 300)")
    p.add_argument("--target-coverage", type=float, default=0.97, help="stop recording at this coverage")
    p.add_argument("--candidates", type=int, default=None, help="expert candidate pushes per decision")
    args = p.parse_args(argv)
    seeds = env_seeds_from_args(p, args)

    ekw = {"n_candidates": args.candidates} if args.candidates else None
    buf, st = generate_dataset(
        args.episodes, args.seed, args.workers, args.img, args.max_steps, args.target_coverage, ekw, seeds=seeds
    )
    for s, cov in st["failed"]:
        print(f"failed: seed {s} (max coverage {cov:.3f})")
    print(
        f"success {st['successes']}/{st['episodes']} ({100 * st['success_rate']:.1f}%), "
        f"{len(st['failed'])} failed; mean length {st['mean_length']:.1f} steps; "
        f"mean final coverage {st['mean_coverage']:.3f}; "
        f"{st['cpu_time_per_episode']:.2f} s CPU/episode, "
        f"{st['wall_time'] / max(st['episodes'], 1):.2f} s wall/episode"
    )
    if args.no_save:
        return
    if buf.n_episodes == 0:
        raise SystemExit("no successful episodes; nothing written")
    path = buf.save(args.out)
    print(f"wrote {path}: {buf.n_episodes} episodes, {buf.n_steps} steps, keys {buf.keys()}")


if __name__ == "__main__":
    main()
