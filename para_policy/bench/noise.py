"""One noise-key scheme for every benchmark: a seed per (chunk, row), never per variant.

A benchmark compares samplers on the *same* noise: every variant of a chunk draws its ``x_T``
and step noise from one CPU generator seeded by the chunk's key, in the sequential loop's
order (:func:`~para_policy.samplers.draw_noise`), so a Picard sampler at tolerance 0 returns
the sequential sample of that chunk and deviations measure the sampler alone. Drawing on the
CPU and moving the draws gives the same numbers on every device.

A key is ``(stream, noise_seed, episode, chunk[, row])``, hashed by :func:`seed_for` (the
evaluator's ``seed_for``: ``eval.py``'s rollouts key their calls the same way), where
``stream`` keeps one benchmark's draws apart from another's. Two older forms are kept so that
committed results replay unchanged: no ``stream`` (``(noise_seed, episode, chunk)``, the PushT
recorder of ``bench_rounds.py``) and a seed that is a plain offset plus the chunk's position in
the replayed list (``torch.manual_seed(1000 + i)`` of several scripts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from para_policy.samplers import SamplerConfig, draw_noise
from para_policy.schedule import Schedule


def seed_for(*keys: int) -> int:
    """A 63-bit generator seed from integer keys (numpy's SeedSequence: distinct keys, independent streams).

    The one keyed-seed scheme: the evaluator's rollouts and the benchmarks' replays both use it
    (here, below the evaluator, so a bare GPU machine without its extras derives the same seeds).
    """
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


@dataclass(frozen=True)
class ChunkKeys:
    """How one benchmark names the noise of a chunk (and of a row within a batched call).

    stream: the benchmark's stream id, first in the key; None leaves it out (the recorder of
        ``bench_rounds.py``: key ``(noise_seed, episode, chunk)``).
    noise_seed: the run's noise seed (a CLI's ``--noise-seed``).
    offset: when set, the seed is ``offset + position`` (the chunk's index in the replayed list)
        instead of a hashed key: the ``torch.manual_seed(1000 + i)`` of older scripts.
    """

    stream: int | None
    noise_seed: int = 0
    offset: int | None = None

    def key(self, chunk: Mapping[str, Any], row: int = 0) -> tuple[int, ...]:
        """``(stream, noise_seed, episode, chunk)``, with ``row`` appended for rows after the first."""
        head = () if self.stream is None else (int(self.stream),)
        tail = (int(row),) if row else ()
        return (*head, int(self.noise_seed), int(chunk["episode"]), int(chunk["chunk"]), *tail)

    def seed(self, chunk: Mapping[str, Any], position: int, row: int = 0) -> int:
        """The generator seed of ``chunk`` (at ``position`` in the replayed list), row ``row``."""
        if self.offset is not None:
            if row:
                raise ValueError("positional seeds (offset) name batch-1 calls only: no row after the first")
            return int(self.offset) + int(position)
        return seed_for(*self.key(chunk, row))


def keyed_noise(schedule: Schedule, sample_shape: Sequence[int], seeds: Sequence[int],
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_T`` (B, T, D) and step noise (B, S, T, D), row ``b`` from a CPU generator seeded by ``seeds[b]``.

    ``sample_shape`` is ``(T, D)``; ``B = len(seeds)``. Drawn in float32 on the CPU, then moved.
    """
    xs, ns = [], []
    for seed in seeds:
        x_T, noise = draw_noise(schedule, (1, *sample_shape), torch.Generator().manual_seed(int(seed)))
        xs.append(x_T)
        ns.append(noise)
    return torch.cat(xs).to(device=device, dtype=dtype), torch.cat(ns).to(device=device, dtype=dtype)


def chunk_noise(policy: Any, spec: SamplerConfig, seeds: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`keyed_noise` on the schedule ``spec`` runs on, on ``policy``'s device and sampler dtype.

    Returns ``x_T`` (B, T, D) and noise (B, S, T, D), B the number of seeds (1 for an int).
    """
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    shape = policy.trajectory_shape(1)[1:]
    return keyed_noise(policy.schedule_for(spec), shape, seeds, policy.device, policy.sample_dtype)
