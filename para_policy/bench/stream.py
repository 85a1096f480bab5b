"""Recorded PushT observation streams: what a benchmark replays instead of a simulator.

A stream is a list of chunks ``{'episode': env seed, 'chunk': index in the episode, 'obs':
(n_obs_steps, obs_dim) float32}`` in rollout order: the observation history a control loop
handed the policy for each chunk. Replaying it (:mod:`para_policy.bench.replay`) gives every
sampler the same observations, on a machine without the simulator (a bare GPU machine reads a
saved ``stream.json``). Recording needs the PushT env, imported only when recording.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from para_policy.bench.noise import ChunkKeys, chunk_noise
from para_policy.checkpoints import atomic_write
from para_policy.samplers import SamplerConfig, sampler_spec

Chunk = dict[str, Any]
#: the keys of ``bench_rounds.py``'s recorder, ``(noise_seed, episode, chunk)``
RECORD_KEYS = ChunkKeys(stream=None)
#: the keys of the evaluator's rollouts (its ``ROLLOUT_STREAM`` 0): recorded at batch 1 with these, a
#: stream holds the observations ``eval.py``'s batched rollouts see
ROLLOUT_KEYS = ChunkKeys(stream=0)


def record_stream(policy: Any, episodes: int, max_chunks: int, seed_start: int, *,
                  spec: SamplerConfig | None = None, keys: ChunkKeys = RECORD_KEYS,
                  progress: bool = False) -> list[Chunk]:
    """Roll ``policy`` out in PushT at batch 1 and keep each chunk's observation history.

    Episodes are env seeds ``seed_start ...``; each runs ``max_chunks`` chunks at most (less if
    it ends first), all ``n_action_steps`` actions of a chunk executed. ``spec`` (default: the
    sequential loop on the checkpoint's schedule) samples every chunk on the noise ``keys``
    name; ``policy.reset()`` starts each episode, so a warm-starting spec starts cold.
    """
    from para_policy.tasks.pusht.env import make_env

    spec = sampler_spec("sequential") if spec is None else spec
    env = make_env()
    chunks: list[Chunk] = []
    seeds = range(seed_start, seed_start + episodes)
    if progress:
        from tqdm import tqdm

        seeds = tqdm(seeds, desc="recording", unit="ep")
    try:
        for seed in seeds:
            chunks += _record_episode(policy, env, spec, keys, int(seed), max_chunks, len(chunks))
    finally:
        env.close()
    return chunks


def _record_episode(policy: Any, env: Any, spec: SamplerConfig, keys: ChunkKeys, seed: int, max_chunks: int,
                    position: int) -> list[Chunk]:
    """The chunks of one episode (see :func:`record_stream`); ``position``: the stream index of its first chunk."""
    policy.reset()
    obs, _ = env.reset(seed=seed)
    history = deque([np.asarray(obs, dtype=np.float32)] * policy.n_obs_steps, maxlen=policy.n_obs_steps)
    chunks: list[Chunk] = []
    for c in range(max_chunks):
        chunk = {"episode": seed, "chunk": c, "obs": np.stack(list(history))}
        chunks.append(chunk)
        x_T, noise = chunk_noise(policy, spec, keys.seed(chunk, position + c))
        out = policy.predict_action({"obs": torch.from_numpy(chunk["obs"])[None].to(policy.device)}, x_T=x_T,
                                    noise=noise, sampler=spec)
        for a in out["action"][0].cpu().numpy():
            obs, _, terminated, truncated, _ = env.step(a)
            history.append(np.asarray(obs, dtype=np.float32))
            if terminated or truncated:
                return chunks
    return chunks


def save_stream(path: str | Path, chunks: Sequence[Chunk], meta: dict[str, Any]) -> Path:
    """``chunks`` and what recorded them (``meta``) as one JSON file, atomically."""
    data = {"meta": meta, "chunks": [{"episode": int(c["episode"]), "chunk": int(c["chunk"]),
                                      "obs": np.asarray(c["obs"]).tolist()} for c in chunks]}
    text = json.dumps(data)
    return atomic_write(path, lambda p: Path(p).write_text(text))


def load_stream(path: str | Path) -> tuple[list[Chunk], dict[str, Any]]:
    """``(chunks, meta)`` of a :func:`save_stream` file; ``obs`` as float32 arrays (To, Do)."""
    data = json.loads(Path(path).read_text())
    chunks = [{"episode": int(c["episode"]), "chunk": int(c["chunk"]), "obs": np.asarray(c["obs"], dtype=np.float32)}
              for c in data["chunks"]]
    return chunks, data.get("meta", {})


def episodes_of(chunks: Sequence[Chunk]) -> list[int]:
    """The episodes (env seeds) of ``chunks``, in stream order."""
    return list(dict.fromkeys(int(c["episode"]) for c in chunks))


def split_stream(chunks: Sequence[Chunk], calibration_seed: int, episodes: int | None = None,
                 max_chunks: int | None = None, calib_chunks: int | None = None
                 ) -> tuple[list[Chunk], list[Chunk]]:
    """``(replayed chunks, calibration chunks)`` of a stream with a calibration episode.

    Replayed: the first ``episodes`` episodes other than ``calibration_seed``, at most
    ``max_chunks`` chunks of each; calibration: the first ``calib_chunks`` of that episode
    (what a window tuner measures on, kept apart from what is timed).
    """
    order = [e for e in episodes_of(chunks) if e != calibration_seed]
    keep = set(order if episodes is None else order[:episodes])
    replay = [c for c in chunks if c["episode"] in keep and (max_chunks is None or c["chunk"] < max_chunks)]
    calib = [c for c in chunks if c["episode"] == calibration_seed]
    return replay, calib if calib_chunks is None else calib[:calib_chunks]


def spread(n: int, k: int) -> list[int]:
    """Indices of ``k`` of ``n`` stream chunks spread evenly, first and last included (all when ``k >= n``).

    A stream is ordered by episode then chunk, so even spacing covers early and late phases
    of several episodes instead of the first episode's opening moves.
    """
    return np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist() if n and k > 0 else []
