"""Env seeds of generated training demonstrations, kept apart from the evaluation seeds.

Start state ``i`` (0 <= i < 100000) of a generator run with ``--seed S`` is
``env.reset(seed=episode_seed(S, i))`` with ``episode_seed(S, i) = 1_000_000 + 100_000 * S + i``,
so every training start state is >= 1,000,000 and disjoint from the evaluation seeds
100000-100049 (DiffusionPolicy's test seeds, used by every task here).
"""

from __future__ import annotations

import argparse

SEED_BASE = 1_000_000
SEED_STRIDE = 100_000
EVAL_SEEDS = range(100_000, 100_050)


def episode_seed(seed: int, i: int) -> int:
    """Env/expert seed of start state ``i`` for run seed ``seed`` (disjoint from EVAL_SEEDS)."""
    if not 0 <= i < SEED_STRIDE or seed < 0:
        raise ValueError(f"need seed >= 0 and 0 <= i < {SEED_STRIDE}, got seed={seed}, i={i}")
    return SEED_BASE + SEED_STRIDE * seed + i


def add_seed_arguments(parser: argparse.ArgumentParser, default_episodes: int = 200) -> None:
    """The generators' shared options: ``--episodes``, ``--seed``, ``--env-seeds FIRST:END``, ``--no-save``."""
    parser.add_argument("--episodes", type=int, default=default_episodes, help="number of start states to try")
    parser.add_argument("--seed", type=int, default=0, help="run seed (start state i uses 1e6 + 1e5*seed + i)")
    parser.add_argument("--env-seeds", metavar="FIRST:END",
                        help="run on env seeds FIRST..END-1 instead of the training seeds (e.g. 100000:100050, "
                             "the test start states); implies --no-save")
    parser.add_argument("--no-save", action="store_true", help="only report success rate and lengths")


def env_seeds_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int] | None:
    """The explicit ``--env-seeds`` (setting ``args.no_save``), or None for the derived training seeds.

    Exits through ``parser.error`` on a malformed range.
    """
    if not args.env_seeds:
        if args.episodes < 1:
            parser.error(f"--episodes must be >= 1, got {args.episodes}")
        return None
    try:
        first, end = (int(v) for v in args.env_seeds.split(":"))
    except ValueError:
        parser.error(f"--env-seeds expects FIRST:END (two integers), got {args.env_seeds!r}")
    if end <= first:
        parser.error(f"--env-seeds: END must be greater than FIRST, got {args.env_seeds!r}")
    args.no_save = True
    return list(range(first, end))
