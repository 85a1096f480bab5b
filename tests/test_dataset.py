"""Sequence windowing (DiffusionPolicy's SequenceSampler), the episode split, and zarr loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from para_policy.dataset import (
    PushTLowdimDataset,
    SequenceDataset,
    get_val_mask,
    pusht_lowdim_obs,
    window_rows,
)


def write_synthetic_pusht(path: str | Path, lengths: list[int], seed: int = 0) -> Path:
    """Write a tiny PushT-shaped zarr replay buffer (for tests: the real one takes an hour to make).

    The agent follows a smooth random walk and the action is the agent's next position, so a
    policy can learn something; the block drifts a little.  Layout as the PushT replay buffer:
    ``data/state (N,5)``, ``data/keypoint (N,9,2)``, ``data/action (N,2)``, ``meta/episode_ends``.
    """
    import zarr

    from para_policy.tasks.pusht.env import block_keypoints

    rng = np.random.default_rng(seed)
    states, actions = [], []
    for length in lengths:
        agent = rng.uniform(100, 400, size=2)
        vel = rng.normal(0, 5, size=2)
        block = np.array([*rng.uniform(150, 350, size=2), rng.uniform(-np.pi, np.pi)])
        for _ in range(length):
            vel = 0.8 * vel + rng.normal(0, 2, size=2)
            target = np.clip(agent + vel, 0, 512)
            states.append(np.concatenate([agent, block]))
            actions.append(target)
            agent = target
            block = block + rng.normal(0, [0.5, 0.5, 0.01])
    state = np.asarray(states, dtype=np.float32)
    root = zarr.open_group(str(path), mode="w")
    root.create_array("data/state", data=state)
    root.create_array("data/keypoint", data=block_keypoints(state).astype(np.float32))
    root.create_array("data/action", data=np.asarray(actions, dtype=np.float32))
    root.create_array("meta/episode_ends", data=np.cumsum(lengths).astype(np.int64))
    return Path(path)


def reference_windows(data: np.ndarray, episode_ends, horizon, pad_before, pad_after):
    """DiffusionPolicy's create_indices + sample_sequence, transliterated loop by loop."""
    pad_before = min(max(pad_before, 0), horizon - 1)
    pad_after = min(max(pad_after, 0), horizon - 1)
    out = []
    for i in range(len(episode_ends)):
        start_idx = 0 if i == 0 else episode_ends[i - 1]
        length = episode_ends[i] - start_idx
        for idx in range(-pad_before, length - horizon + pad_after + 1):
            b0 = max(idx, 0) + start_idx
            b1 = min(idx + horizon, length) + start_idx
            s0 = b0 - (idx + start_idx)
            s1 = horizon - ((idx + horizon + start_idx) - b1)
            sample = data[b0:b1]
            window = np.zeros((horizon,) + data.shape[1:], dtype=data.dtype)
            window[:s0] = sample[0]
            window[s1:] = sample[-1]
            window[s0:s1] = sample
            out.append(window)
    return np.stack(out)


def test_window_rows_hand_computed():
    # Episodes of lengths 3 (rows 0-2) and 5 (rows 3-7); horizon 4, n_obs_steps 2, n_action_steps 4.
    rows = window_rows(np.array([3, 8]), horizon=4, pad_before=1, pad_after=3)
    expected = [
        # episode 0: window starts -1, 0, 1, 2
        [0, 0, 1, 2],
        [0, 1, 2, 2],
        [1, 2, 2, 2],
        [2, 2, 2, 2],
        # episode 1: window starts -1 .. 4
        [3, 3, 4, 5],
        [3, 4, 5, 6],
        [4, 5, 6, 7],
        [5, 6, 7, 7],
        [6, 7, 7, 7],
        [7, 7, 7, 7],
    ]
    np.testing.assert_array_equal(rows, expected)


def test_window_rows_no_padding_and_clamping():
    # No padding: only windows fully inside an episode; the length-3 episode has none.
    np.testing.assert_array_equal(window_rows(np.array([3, 8]), 4), [[3, 4, 5, 6], [4, 5, 6, 7]])
    # Padding larger than horizon - 1 is clamped to horizon - 1, as DiffusionPolicy does.
    np.testing.assert_array_equal(
        window_rows(np.array([2]), 2, pad_before=5, pad_after=5), [[0, 0], [0, 1], [1, 1]]
    )
    # The mask drops episodes.
    np.testing.assert_array_equal(
        window_rows(np.array([3, 8]), 4, 1, 3, episode_mask=np.array([False, True]))[0], [3, 3, 4, 5]
    )


@pytest.mark.parametrize("horizon,pad_before,pad_after", [(16, 1, 7), (4, 1, 3), (5, 0, 0), (3, 2, 2)])
def test_dataset_matches_diffusion_policy_sampler(horizon, pad_before, pad_after):
    rng = np.random.default_rng(1)
    lengths = [1, 2, 7, 16, 23, 4]
    ends = np.cumsum(lengths)
    obs = rng.normal(size=(ends[-1], 20)).astype(np.float32)
    action = rng.normal(size=(ends[-1], 2)).astype(np.float32)
    ds = SequenceDataset(obs, action, ends, horizon, pad_before, pad_after)
    ref_obs = reference_windows(obs, ends, horizon, pad_before, pad_after)
    ref_action = reference_windows(action, ends, horizon, pad_before, pad_after)
    assert len(ds) == len(ref_obs)
    batch = ds.get_batch(torch.arange(len(ds)))
    np.testing.assert_array_equal(batch["obs"].numpy(), ref_obs)
    np.testing.assert_array_equal(batch["action"].numpy(), ref_action)
    item = ds[len(ds) // 2]
    assert item["obs"].dtype == torch.float32 and item["obs"].shape == (horizon, 20)
    assert item["action"].shape == (horizon, 2)
    np.testing.assert_array_equal(item["obs"].numpy(), ref_obs[len(ds) // 2])


def test_val_mask_matches_diffusion_policy():
    # DiffusionPolicy: n_val = min(max(1, round(n * ratio)), n - 1) episodes, rng.choice with the seed.
    mask = get_val_mask(100, 0.02, seed=42)
    expected = np.zeros(100, dtype=bool)
    expected[np.random.default_rng(42).choice(100, size=2, replace=False)] = True
    np.testing.assert_array_equal(mask, expected)
    assert get_val_mask(10, 0.0).sum() == 0
    assert get_val_mask(3, 0.9).sum() == 2  # always one training episode left
    assert get_val_mask(3, 0.01).sum() == 1  # always at least one validation episode


def test_validation_split_is_disjoint_by_episode():
    lengths = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    ends = np.cumsum(lengths)
    n = ends[-1]
    state = np.zeros((n, 5), dtype=np.float32)
    state[:, 0] = np.arange(n)  # agent_x = buffer row, so windows name their rows
    keypoint = np.zeros((n, 9, 2), dtype=np.float32)
    action = np.zeros((n, 2), dtype=np.float32)
    ds = PushTLowdimDataset(keypoint, state, action, ends, horizon=4, pad_before=1, pad_after=3, val_ratio=0.3, seed=7)
    val = ds.get_validation_dataset()
    assert val.n_episodes == 3 and ds.n_episodes == 7
    episode_of_row = np.searchsorted(ends, np.arange(n), side="right")

    def episodes(d):
        rows = d.get_batch(torch.arange(len(d)))["obs"][..., 18].long().numpy()
        ep = episode_of_row[rows]
        assert (ep == ep[:, :1]).all(), "a window crosses an episode boundary"
        return set(ep[:, 0].tolist())

    train_eps, val_eps = episodes(ds), episodes(val)
    assert train_eps.isdisjoint(val_eps)
    assert train_eps | val_eps == set(range(len(lengths)))
    assert val_eps == set(np.nonzero(get_val_mask(len(lengths), 0.3, 7))[0].tolist())
    # Same seed, same split; another seed, (here) another split.
    again = PushTLowdimDataset(keypoint, state, action, ends, horizon=4, val_ratio=0.3, seed=7)
    np.testing.assert_array_equal(again.val_mask, ds.val_mask)
    # The normalizer sees every step, held-out episodes included (as DiffusionPolicy).
    assert ds.get_normalizer_data()["obs"].shape == (n, 20)


def test_pusht_obs_layout_matches_env_adapter():
    from para_policy.tasks.pusht.env import block_keypoints, keypoint_obs

    rng = np.random.default_rng(0)
    state = np.concatenate([rng.uniform(0, 512, (6, 4)), rng.uniform(-3, 3, (6, 1))], axis=1)
    obs = pusht_lowdim_obs(block_keypoints(state), state)
    assert obs.shape == (6, 20) and obs.dtype == np.float32
    np.testing.assert_allclose(obs, keypoint_obs(state), rtol=1e-6, atol=1e-3)


def test_from_path_loads_zarr_and_names_missing_path(tmp_path):
    path = write_synthetic_pusht(tmp_path / "tiny.zarr", [3, 5, 9], seed=0)
    ds = PushTLowdimDataset.from_path(path, horizon=4, pad_before=1, pad_after=3)
    assert len(ds) == 4 + 6 + 10
    batch = ds.get_batch([0, 5])
    assert batch["obs"].shape == (2, 4, 20) and batch["action"].shape == (2, 4, 2)
    assert batch["obs"].dtype == torch.float32
    missing = tmp_path / "nope.zarr"
    with pytest.raises(FileNotFoundError, match="nope.zarr") as err:
        PushTLowdimDataset.from_path(missing)
    assert "python -m para_policy.tasks.pusht.generate" in str(err.value)
