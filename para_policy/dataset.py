"""Training data: DiffusionPolicy's sequence windows over a replay buffer.

DiffusionPolicy (``diffusion_policy/common/sampler.py``) trains on every window of ``horizon``
consecutive steps inside one episode, plus windows that hang over the episode's start by up to
``pad_before`` steps and over its end by up to ``pad_after`` steps; the missing steps repeat the
episode's first / last step.  With ``pad_before = n_obs_steps - 1`` every step of an episode can be
the *current* observation of some window, and with ``pad_after = n_action_steps - 1`` the last
actions of an episode are still predicted with a full action chunk.

DiffusionPolicy stores ``(buffer_start, buffer_end, sample_start, sample_end)`` per window and
copies and pads each window in a Python loop.  Here each window is precomputed as ``horizon``
buffer row indices (the padding is just a clamped index), so a batch of windows is one fancy-index
``obs[rows[batch]]``: no per-item Python work and identical results.

Datasets: :class:`PushTLowdimDataset` (a zarr replay buffer) and :class:`RobomimicLowdimDataset`
(a robomimic HDF5 file, e.g. Lift), both :class:`LowdimDataset` with DiffusionPolicy's
train / validation episode split; :class:`PushTImageDataset` (the zarr buffer's rendered frames,
DiffusionPolicy's ``PushTImageDataset``) windows dict observations the same way.

PushT's low-dim observation (DiffusionPolicy's ``PushTLowdimDataset``) is the 9 block keypoints
flattened ``x0, y0, x1, y1, ...`` (18 numbers) followed by the agent position ``state[:, :2]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

GENERATE_HINT = "python -m para_policy.tasks.pusht.generate"
LIFT_GENERATE_HINT = "python -m para_policy.tasks.lift.generate"


def window_rows(
    episode_ends: np.ndarray,
    horizon: int,
    pad_before: int = 0,
    pad_after: int = 0,
    episode_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Buffer row indices of every training window, DiffusionPolicy's ``create_indices`` order.

    Args:
        episode_ends: (E,) exclusive end row of each episode in the concatenated buffer.
        horizon: window length T.
        pad_before: how many steps a window may start before its episode (clamped to [0, T-1]).
        pad_after: how many steps a window may end after its episode (clamped to [0, T-1]).
        episode_mask: (E,) bool, which episodes to take windows from (default all).
    Returns:
        (n_windows, T) int64: row ``j`` of window ``i`` is the buffer row of its step ``j``.  Steps
        before the episode's start repeat its first row and steps after its end repeat its last row,
        exactly as ``SequenceSampler.sample_sequence`` pads.  Windows are ordered by episode, then
        by start offset ``-pad_before .. L - T + pad_after``.
    """
    episode_ends = np.asarray(episode_ends, dtype=np.int64)
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if episode_mask is None:
        episode_mask = np.ones(len(episode_ends), dtype=bool)
    episode_mask = np.asarray(episode_mask, dtype=bool)
    if episode_mask.shape != episode_ends.shape:
        raise ValueError(f"episode_mask shape {episode_mask.shape} != episode_ends shape {episode_ends.shape}")
    pad_before = min(max(pad_before, 0), horizon - 1)
    pad_after = min(max(pad_after, 0), horizon - 1)

    starts = np.concatenate([[0], episode_ends[:-1]])
    steps = np.arange(horizon, dtype=np.int64)
    blocks = []
    for start, end, keep in zip(starts, episode_ends, episode_mask, strict=True):
        length = int(end - start)
        if not keep or length <= 0:
            continue
        offsets = np.arange(-pad_before, length - horizon + pad_after + 1, dtype=np.int64)  # window starts
        if len(offsets) == 0:
            continue
        blocks.append(start + np.clip(offsets[:, None] + steps[None, :], 0, length - 1))
    if not blocks:
        return np.zeros((0, horizon), dtype=np.int64)
    return np.concatenate(blocks, axis=0)


def get_val_mask(n_episodes: int, val_ratio: float, seed: int = 0) -> np.ndarray:
    """(n_episodes,) bool, True for validation episodes: DiffusionPolicy's split, bit for bit.

    At least one validation and one training episode whenever ``val_ratio > 0`` (so with 1 episode
    nothing can be held out: the mask is then all False); chosen with ``np.random.default_rng(seed)``.
    """
    val_mask = np.zeros(n_episodes, dtype=bool)
    if val_ratio <= 0 or n_episodes < 2:
        return val_mask
    n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
    rng = np.random.default_rng(seed=seed)
    val_mask[rng.choice(n_episodes, size=n_val, replace=False)] = True
    return val_mask


def downsample_mask(mask: np.ndarray, max_n: int | None, seed: int = 0) -> np.ndarray:
    """Keep at most ``max_n`` of the True episodes of ``mask`` (DiffusionPolicy's ``max_train_episodes``)."""
    mask = np.asarray(mask, dtype=bool)
    if max_n is None or mask.sum() <= max_n:
        return mask
    idx = np.nonzero(mask)[0]
    keep = idx[np.random.default_rng(seed=seed).choice(len(idx), size=int(max_n), replace=False)]
    out = np.zeros_like(mask)
    out[keep] = True
    return out


def pusht_lowdim_obs(keypoint: np.ndarray, state: np.ndarray) -> np.ndarray:
    """DiffusionPolicy's PushT low-dim observation from stored arrays.

    Args:
        keypoint: (N, 9, 2) block keypoints (world pixels).
        state: (N, 5) ``[agent_x, agent_y, block_x, block_y, block_angle]``.
    Returns:
        (N, 20) float32: keypoints flattened ``x0, y0, x1, y1, ...`` then ``agent_x, agent_y``
        (the same layout as ``para_policy.tasks.pusht.env.keypoint_obs``).
    """
    keypoint = np.asarray(keypoint)
    state = np.asarray(state)
    return np.concatenate([keypoint.reshape(len(keypoint), -1), state[:, :2]], axis=-1).astype(np.float32)


class SequenceDataset(torch.utils.data.Dataset):
    """Windows of ``horizon`` steps of ``obs`` and ``action`` from the episodes in ``episode_mask``.

    Items are ``{'obs': (horizon, obs_dim), 'action': (horizon, action_dim)}`` float32 tensors;
    :meth:`get_batch` returns a whole batch ``(B, horizon, ...)`` with one fancy-index, which is what
    the training loop uses (a ``DataLoader`` works too, just slower).
    """

    def __init__(
        self,
        obs: np.ndarray | torch.Tensor,
        action: np.ndarray | torch.Tensor,
        episode_ends: np.ndarray,
        horizon: int,
        pad_before: int = 0,
        pad_after: int = 0,
        episode_mask: np.ndarray | None = None,
    ):
        """obs (N, obs_dim), action (N, action_dim), episode_ends (E,) with episode_ends[-1] == N."""
        self.obs = torch.as_tensor(np.asarray(obs, dtype=np.float32))
        self.action = torch.as_tensor(np.asarray(action, dtype=np.float32))
        self.episode_ends = np.asarray(episode_ends, dtype=np.int64)
        n = len(self.obs)
        if len(self.action) != n:
            raise ValueError(f"obs has {n} rows but action has {len(self.action)}")
        if len(self.episode_ends) and (self.episode_ends[-1] != n or np.any(np.diff(self.episode_ends) < 0)):
            raise ValueError(
                f"episode_ends must be non-decreasing and end at the number of steps ({n}); "
                f"got last={self.episode_ends[-1]}"
            )
        self.horizon = int(horizon)
        self.pad_before = int(pad_before)
        self.pad_after = int(pad_after)
        if episode_mask is None:
            episode_mask = np.ones(len(self.episode_ends), dtype=bool)
        self.episode_mask = np.asarray(episode_mask, dtype=bool)
        self.rows = torch.from_numpy(
            window_rows(self.episode_ends, self.horizon, self.pad_before, self.pad_after, self.episode_mask)
        )

    @property
    def n_episodes(self) -> int:
        """Number of episodes windows are taken from."""
        return int(self.episode_mask.sum())

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        rows = self.rows[idx]
        return {"obs": self.obs[rows], "action": self.action[rows]}

    def get_batch(self, idx: torch.Tensor | np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """Windows ``idx`` (B,) as ``{'obs': (B, horizon, obs_dim), 'action': (B, horizon, action_dim)}``."""
        rows = self.rows[torch.as_tensor(idx, dtype=torch.long)]
        return {"obs": self.obs[rows], "action": self.action[rows]}

    def with_mask(self, episode_mask: np.ndarray) -> SequenceDataset:
        """The same buffer windowed over other episodes (shares the obs / action tensors)."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.episode_mask = np.asarray(episode_mask, dtype=bool)
        other.rows = torch.from_numpy(
            window_rows(self.episode_ends, self.horizon, self.pad_before, self.pad_after, other.episode_mask)
        )
        return other

    def get_normalizer_data(self) -> dict[str, np.ndarray]:
        """All steps of the buffer, ``{'obs': (N, obs_dim), 'action': (N, action_dim)}`` float32.

        DiffusionPolicy fits its normalizer on the whole replay buffer (training and validation
        episodes alike), so this ignores the episode mask.
        """
        return {"obs": self.obs.numpy(), "action": self.action.numpy()}


class LowdimDataset(SequenceDataset):
    """Windows over a low-dim buffer with DiffusionPolicy's train / validation episode split.

    The instance itself holds the training episodes; :meth:`get_validation_dataset` the held-out
    ones (``val_ratio`` of the episodes, chosen by ``seed`` exactly as DiffusionPolicy does).
    """

    def __init__(
        self,
        obs: np.ndarray,
        action: np.ndarray,
        episode_ends: np.ndarray,
        horizon: int = 16,
        pad_before: int = 1,
        pad_after: int = 7,
        val_ratio: float = 0.0,
        seed: int = 42,
        max_train_episodes: int | None = None,
        path: str | None = None,
    ):
        """obs (N, obs_dim), action (N, action_dim), episode_ends (E,)."""
        self.val_mask = get_val_mask(len(episode_ends), val_ratio, seed)
        train_mask = downsample_mask(~self.val_mask, max_train_episodes, seed)
        super().__init__(obs, action, episode_ends, horizon, pad_before, pad_after, episode_mask=train_mask)
        self.path = path

    def get_validation_dataset(self) -> LowdimDataset:
        """The held-out episodes, windowed the same way (empty if ``val_ratio == 0``)."""
        return self.with_mask(self.val_mask)


class PushTLowdimDataset(LowdimDataset):
    """DiffusionPolicy's ``PushTLowdimDataset``: keypoint observations, train / validation split."""

    def __init__(
        self,
        keypoint: np.ndarray,
        state: np.ndarray,
        action: np.ndarray,
        episode_ends: np.ndarray,
        **kwargs: Any,
    ):
        """keypoint (N, 9, 2), state (N, 5), action (N, 2), episode_ends (E,); ``kwargs`` as :class:`LowdimDataset`."""
        super().__init__(pusht_lowdim_obs(keypoint, state), action, episode_ends, **kwargs)

    @classmethod
    def from_path(cls, path: str | os.PathLike, **kwargs) -> PushTLowdimDataset:
        """Load a PushT zarr replay buffer (``data/{state,keypoint,action}``, ``meta/episode_ends``).

        Raises ``FileNotFoundError`` naming the path and the command that generates the dataset.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"PushT dataset not found: {path.resolve()}\n"
                f"Generate it with the scripted expert:  {GENERATE_HINT} --help  "
                f"(writes data/pusht/pusht_expert.zarr by default), or point task.dataset_path at an "
                f"existing zarr replay buffer."
            )
        arrays = load_replay_arrays(path, ("keypoint", "state", "action"))
        return cls(
            arrays["keypoint"],
            arrays["state"],
            arrays["action"],
            arrays["episode_ends"],
            path=str(path),
            **kwargs,
        )


class RobomimicLowdimDataset(LowdimDataset):
    """DiffusionPolicy's ``RobomimicReplayLowdimDataset`` (relative actions): a robomimic HDF5 file's
    ``obs/<key>`` concatenated in ``obs_keys`` order, and ``actions``, windowed like PushT."""

    @classmethod
    def from_path(
        cls, path: str | os.PathLike, obs_keys: tuple[str, ...] | list[str] | None = None, **kwargs
    ) -> RobomimicLowdimDataset:
        """Load every ``data/demo_<i>`` of a robomimic HDF5 file (generated here or robomimic's own).

        Args:
            obs_keys: observation keys to concatenate (default DiffusionPolicy's Lift keys, 19 dims).
        Raises ``FileNotFoundError`` naming the path and the command that generates the dataset, and
        ``MissingExtraError`` with the install hint when h5py is missing.
        """
        from para_policy.tasks.lift.env import OBS_KEYS
        from para_policy.tasks.lift.robomimic_hdf5 import read_lowdim

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"robomimic dataset not found: {path.resolve()}\n"
                f"Generate it with the scripted expert:  {LIFT_GENERATE_HINT} --help  "
                f"(writes data/lift/lift_expert.hdf5 by default), or point task.dataset_path at a robomimic "
                f"low_dim.hdf5 of the same task."
            )
        arrays = read_lowdim(path, tuple(obs_keys or OBS_KEYS))
        check_finite(path, arrays, ("obs", "action"))
        return cls(arrays["obs"], arrays["action"], arrays["episode_ends"], path=str(path), **kwargs)


#: DiffusionPolicy's image range normalizer (``get_image_range_normalizer``): [0, 1] -> [-1, 1], shape (1,)
IMAGE_RANGE_NORMALIZER = {"scale": 2.0, "offset": -1.0, "min": 0.0, "max": 1.0, "mean": 0.5, "std": (1 / 12) ** 0.5}


class PushTImageDataset(torch.utils.data.Dataset):
    """DiffusionPolicy's ``PushTImageDataset``: rendered frames plus the agent position, windowed as the low-dim data.

    Batches are ``{'image': (B, k, 3, H, W) float32 in [0, 1], 'agent_pos': (B, horizon, 2),
    'action': (B, horizon, 2)}`` (what :meth:`ImagePolicy.compute_loss` takes), with DP's
    ``image = moveaxis(img, -1, 1) / 255`` and ``agent_pos = state[:, :2]``; ``image`` is the
    float32 array the env's ``PushTImageObs`` gives for the same frame.

    Why ``k = n_obs_steps`` frames and not ``horizon``: the policy conditions on the first
    ``n_obs_steps`` frames of a window only, and the other frames would be most of a batch's
    cost (DP's real-robot datasets cut them the same way, ``SequenceSampler(key_first_k=...)``).
    Frames stay in memory as uint8 (N, 3, H, W) (a quarter of float32) and are converted per
    batch; float stores (DP writes 0..255 as float32) are turned into uint8 when their values
    are whole numbers.  Train / validation episodes are split as in :class:`LowdimDataset`.
    """

    def __init__(
        self,
        img: np.ndarray,
        state: np.ndarray,
        action: np.ndarray,
        episode_ends: np.ndarray,
        horizon: int = 16,
        pad_before: int = 1,
        pad_after: int = 7,
        n_obs_steps: int | None = None,
        val_ratio: float = 0.0,
        seed: int = 42,
        max_train_episodes: int | None = None,
        path: str | None = None,
    ):
        """img (N, H, W, 3) uint8 or float 0..255, state (N, >=2), action (N, Da), episode_ends (E,).

        ``n_obs_steps``: how many leading frames of each window to return (None = all ``horizon``).
        """
        img, state = np.asarray(img), np.asarray(state)
        if img.ndim != 4 or img.shape[-1] != 3:
            raise ValueError(f"img must be (N, H, W, 3) RGB frames, got shape {img.shape}")
        if state.ndim != 2 or state.shape[1] < 2:
            raise ValueError(f"state must be (N, >=2) with the agent position first, got shape {state.shape}")
        self.img = torch.from_numpy(np.ascontiguousarray(np.moveaxis(_pixels(img, path), -1, 1)))
        self.agent_pos = torch.as_tensor(np.asarray(state[:, :2], dtype=np.float32))
        self.action = torch.as_tensor(np.asarray(action, dtype=np.float32))
        self.episode_ends = np.asarray(episode_ends, dtype=np.int64)
        n = len(self.img)
        if len(self.agent_pos) != n or len(self.action) != n:
            raise ValueError(f"img has {n} rows but state has {len(self.agent_pos)} and action {len(self.action)}")
        if len(self.episode_ends) == 0 or self.episode_ends[-1] != n or np.any(np.diff(self.episode_ends) < 0):
            raise ValueError(f"episode_ends must be non-decreasing and end at the number of steps ({n})")
        self.horizon, self.pad_before, self.pad_after = int(horizon), int(pad_before), int(pad_after)
        self.n_obs_steps = self.horizon if n_obs_steps is None else int(n_obs_steps)
        if not 1 <= self.n_obs_steps <= self.horizon:
            raise ValueError(f"n_obs_steps must be in [1, horizon={self.horizon}], got {n_obs_steps}")
        self.val_mask = get_val_mask(len(self.episode_ends), val_ratio, seed)
        self.episode_mask = downsample_mask(~self.val_mask, max_train_episodes, seed)
        self.rows = torch.from_numpy(
            window_rows(self.episode_ends, self.horizon, self.pad_before, self.pad_after, self.episode_mask)
        )
        self.path = path

    @property
    def n_episodes(self) -> int:
        """Number of episodes windows are taken from."""
        return int(self.episode_mask.sum())

    def obs_shapes(self) -> dict[str, tuple[int, ...]]:
        """One step's observation: ``{'image': (3, H, W), 'agent_pos': (2,)}``."""
        return {"image": tuple(self.img.shape[1:]), "agent_pos": (2,)}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get_batch([idx]).items()}

    def get_batch(self, idx: torch.Tensor | np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """Windows ``idx`` (B,): ``{'image': (B, k, 3, H, W), 'agent_pos': (B, T, 2), 'action': (B, T, Da)}``."""
        rows = self.rows[torch.as_tensor(idx, dtype=torch.long)]
        image = self.img[rows[:, : self.n_obs_steps]].to(torch.float32) / 255
        return {"image": image, "agent_pos": self.agent_pos[rows], "action": self.action[rows]}

    # the same buffer windowed over other episodes (shares the frame, position and action tensors)
    with_mask = SequenceDataset.with_mask

    def get_validation_dataset(self) -> PushTImageDataset:
        """The held-out episodes, windowed the same way (empty if ``val_ratio == 0``)."""
        return self.with_mask(self.val_mask)

    def get_normalizer_data(self) -> dict[str, np.ndarray]:
        """``{'agent_pos': (N, 2), 'action': (N, Da)}`` of the whole buffer, for DP's 'limits' fit.

        The image is not fitted: DP uses the fixed range normalizer :data:`IMAGE_RANGE_NORMALIZER`.
        """
        return {"agent_pos": self.agent_pos.numpy(), "action": self.action.numpy()}

    def fingerprint_arrays(self) -> tuple[np.ndarray, ...]:
        """The arrays that name the data a checkpoint saw: episode ends, frames, positions, actions."""
        return self.episode_ends, self.img.numpy(), self.agent_pos.numpy(), self.action.numpy()

    @classmethod
    def from_path(cls, path: str | os.PathLike, **kwargs) -> PushTImageDataset:
        """Load a PushT zarr replay buffer with frames (``data/{img,state,action}``, ``meta/episode_ends``).

        Raises ``FileNotFoundError`` naming the path and the generating command, and ``ValueError``
        when the store has no ``data/img``.
        """
        path = Path(path)
        hint = f"{GENERATE_HINT} --img --out {path}"
        if not path.exists():
            raise FileNotFoundError(
                f"PushT image dataset not found: {path.resolve()}\n"
                f"Generate it with the scripted expert (96x96 frames in data/img):  {hint}  "
                f"(see --help), or point task.dataset_path at an existing zarr replay buffer with frames."
            )
        import zarr

        data = zarr.open_group(str(path), mode="r").get("data")
        if data is None or "img" not in set(data.array_keys()):
            raise ValueError(f"{path} has no data/img frames (a low-dim buffer?); regenerate it with:  {hint}")
        arrays = load_replay_arrays(path, ("img", "state", "action"))
        return cls(arrays["img"], arrays["state"], arrays["action"], arrays["episode_ends"], path=str(path),
                   **kwargs)


def _pixels(img: np.ndarray, path: str | None) -> np.ndarray:
    """Frames as uint8 0..255 (float stores with whole values are converted; others kept as float32)."""
    if img.dtype == np.uint8:
        return img
    where = f"{path}: " if path else ""
    if not np.issubdtype(img.dtype, np.number) or np.issubdtype(img.dtype, np.complexfloating):
        raise ValueError(f"{where}img must hold pixel values 0..255, got dtype {img.dtype}")
    values = img.astype(np.float32)
    if values.size and (not np.isfinite(values).all() or values.min() < 0 or values.max() > 255):
        raise ValueError(f"{where}img must hold pixel values 0..255 (as DP stores them), got the range "
                         f"{values.min():g} to {values.max():g}")
    if values.size and values.max() <= 1.0:
        raise ValueError(f"{where}img values all lie in [0, 1]; the buffer must store 0..255 pixels (the dataset "
                         f"divides by 255, as DP's does)")
    return values.astype(np.uint8) if np.array_equal(values, np.round(values)) else values


def load_replay_arrays(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read ``data/<key>`` for each key and ``meta/episode_ends`` of a zarr replay buffer into memory."""
    from para_policy.tasks.pusht.replay_buffer import ReplayBuffer

    rb = ReplayBuffer.load(str(path))
    out = {key: np.asarray(rb[key][:]) for key in keys}
    out["episode_ends"] = ends = np.asarray(rb.episode_ends[:], dtype=np.int64)
    if len(ends) == 0 or ends[-1] == 0:
        raise ValueError(f"{path}: the replay buffer holds no episodes (meta/episode_ends is empty)")
    check_finite(path, out, keys)
    return out


def check_finite(path: str | os.PathLike, arrays: dict[str, np.ndarray], keys: tuple[str, ...]) -> None:
    """Refuse NaN / inf in training data, naming the array, the episode and the step (a normalizer fit on
    them would silently make that dimension meaningless)."""
    ends = arrays["episode_ends"]
    for key in keys:
        values = np.asarray(arrays[key])
        if not np.issubdtype(values.dtype, np.floating):
            continue
        bad = ~np.isfinite(values.reshape(len(values), -1))
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            episode = int(np.searchsorted(ends, row, side="right"))
            start = int(ends[episode - 1]) if episode > 0 else 0
            raise ValueError(f"{path}: data/{key} holds {int(bad.sum())} non-finite values; the first is "
                             f"{values.reshape(len(values), -1)[row, col]} at row {row} (episode {episode}, step "
                             f"{row - start}), column {col}")
