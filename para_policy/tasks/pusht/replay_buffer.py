"""Zarr replay buffer in DiffusionPolicy's PushT layout.

Layout (all episodes concatenated along the first axis)::

    data/state       (N, 5)  float32   [agent_x, agent_y, block_x, block_y, block_angle]
    data/keypoint    (N, 9, 2) float32 block keypoints (see env.block_keypoints)
    data/action      (N, 2)  float32   absolute agent target positions
    data/img         (N, 96, 96, 3) uint8   (optional)
    meta/episode_ends (E,)   int64     cumulative end index of each episode

Why zarr format 2 on write: DiffusionPolicy's own files are format 2 and its code uses zarr-2 APIs
(``DirectoryStore``), which cannot open format-3 stores; zarr 3 reads and writes format 2 fine.
Reading accepts either format.  Saving is atomic (write a temp dir beside the target, then rename),
so a crashed generator never leaves a half-written dataset at the target path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import zarr

REQUIRED_KEYS = ("state", "keypoint", "action")
_DTYPES = {"state": np.float32, "keypoint": np.float32, "action": np.float32, "img": np.uint8}


class ReplayBuffer:
    """In-memory episodes with DiffusionPolicy's zarr layout.

    Attributes:
        data: dict name -> (N, ...) numpy array.
        episode_ends: (E,) int64 cumulative episode end indices.
    """

    def __init__(self, data: dict[str, np.ndarray] | None = None, episode_ends: np.ndarray | None = None):
        self.data: dict[str, np.ndarray] = dict(data or {})
        self.episode_ends = np.asarray(episode_ends if episode_ends is not None else [], dtype=np.int64)
        self._check()

    # ---------------------------------------------------------------- properties
    @property
    def n_episodes(self) -> int:
        return int(len(self.episode_ends))

    @property
    def n_steps(self) -> int:
        return int(self.episode_ends[-1]) if len(self.episode_ends) else 0

    @property
    def episode_lengths(self) -> np.ndarray:
        """(E,) int64 length of every episode."""
        return np.diff(self.episode_ends, prepend=0)

    def keys(self) -> list[str]:
        return list(self.data.keys())

    def __getitem__(self, key: str) -> np.ndarray:
        return self.data[key]

    def _check(self) -> None:
        ends = self.episode_ends
        if ends.ndim != 1:
            raise ValueError(f"meta/episode_ends must be 1-D, got shape {ends.shape}")
        if len(ends) and (np.any(np.diff(ends) <= 0) or ends[0] <= 0):
            raise ValueError("meta/episode_ends must be strictly increasing positive cumulative indices")
        n = self.n_steps
        for k, v in self.data.items():
            if len(v) != n:
                raise ValueError(
                    f"data/{k} has {len(v)} steps but meta/episode_ends[-1] = {n}; expected {n} steps"
                )

    # ---------------------------------------------------------------- episodes
    def get_episode(self, i: int) -> dict[str, np.ndarray]:
        """Arrays of episode ``i`` (negative indices allowed): dict name -> (T_i, ...)."""
        if not -self.n_episodes <= i < self.n_episodes:
            raise IndexError(f"episode {i} out of range ({self.n_episodes} episodes)")
        i = i % self.n_episodes
        start = int(self.episode_ends[i - 1]) if i > 0 else 0
        end = int(self.episode_ends[i])
        return {k: v[start:end] for k, v in self.data.items()}

    def add_episode(self, episode: dict[str, np.ndarray]) -> None:
        """Append one episode: dict name -> (T, ...) arrays with a common T and the stored keys."""
        episode = {k: np.asarray(v) for k, v in episode.items()}
        lengths = {k: len(v) for k, v in episode.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"episode arrays have different lengths: {lengths}")
        T = next(iter(lengths.values()))
        if T == 0:
            raise ValueError("cannot add an empty episode")
        if self.n_episodes and set(episode) != set(self.data):
            raise ValueError(f"episode keys {sorted(episode)} differ from buffer keys {sorted(self.data)}")
        for k, v in episode.items():
            v = v.astype(_DTYPES.get(k, v.dtype), copy=False)
            self.data[k] = np.concatenate([self.data[k], v]) if k in self.data else v.copy()
        self.episode_ends = np.append(self.episode_ends, self.n_steps + T).astype(np.int64)

    # ---------------------------------------------------------------- io
    @classmethod
    def load(cls, path: str | os.PathLike) -> ReplayBuffer:
        """Read a zarr store (format 2 or 3) with the layout above into memory.

        Raises:
            FileNotFoundError: no store at ``path``.
            ValueError: ``meta/episode_ends`` or ``data/`` missing, or array lengths mismatched.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no zarr store at {path}")
        root = zarr.open_group(str(path), mode="r")
        keys = set(root.keys())
        if "meta" not in keys or "episode_ends" not in set(root["meta"].keys()):
            raise ValueError(
                f"{path}: missing meta/episode_ends (expected a (E,) int64 array of cumulative ends)"
            )
        if "data" not in keys:
            raise ValueError(f"{path}: missing data/ group (expected data/state, data/keypoint, data/action)")
        ends = np.asarray(root["meta"]["episode_ends"][...], dtype=np.int64)
        data_group = root["data"]
        data = {k: np.asarray(data_group[k][...]) for k in sorted(data_group.array_keys())}
        return cls(data, ends)

    def save(self, path: str | os.PathLike, chunk_steps: int = 10_000) -> Path:
        """Write atomically as a zarr format-2 directory store at ``path`` (replacing any existing one)."""
        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
            dg = root.create_group("data")
            mg = root.create_group("meta")
            for k, v in self.data.items():
                chunks = (min(chunk_steps if k != "img" else 128, max(len(v), 1)), *v.shape[1:])
                arr = dg.create_array(k, shape=v.shape, dtype=v.dtype, chunks=chunks)
                arr[...] = v
            arr = mg.create_array("episode_ends", shape=self.episode_ends.shape, dtype=np.int64)
            arr[...] = self.episode_ends
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.data.items()}
        return f"ReplayBuffer(n_episodes={self.n_episodes}, n_steps={self.n_steps}, data={shapes})"
