"""Tests for the zarr replay buffer (DiffusionPolicy layout, zarr format 2 on disk)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from para_policy.tasks.pusht import ReplayBuffer


def _episode(T: int, seed: int, img: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ep = {
        "state": rng.uniform(0, 512, (T, 5)).astype(np.float32),
        "keypoint": rng.uniform(0, 512, (T, 9, 2)).astype(np.float32),
        "action": rng.uniform(0, 512, (T, 2)).astype(np.float32),
    }
    if img:
        ep["img"] = rng.integers(0, 255, (T, 96, 96, 3), dtype=np.uint8)
    return ep


def test_round_trip_format2(tmp_path):
    buf = ReplayBuffer()
    eps = [_episode(5, 0, img=True), _episode(3, 1, img=True), _episode(7, 2, img=True)]
    for ep in eps:
        buf.add_episode(ep)
    assert buf.n_episodes == 3 and buf.n_steps == 15
    np.testing.assert_array_equal(buf.episode_ends, [5, 8, 15])
    path = buf.save(tmp_path / "buf.zarr")
    # zarr format 2 on disk (what DiffusionPolicy's zarr-2 code reads)
    assert (path / ".zgroup").exists()
    assert (path / "data" / ".zgroup").exists() and (path / "meta" / ".zgroup").exists()
    for k in ("state", "keypoint", "action", "img"):
        assert (path / "data" / k / ".zarray").exists()
    assert (path / "meta" / "episode_ends" / ".zarray").exists()
    assert not (path / "zarr.json").exists()
    assert not list(tmp_path.glob(".buf.zarr.tmp-*"))  # temp dir renamed away

    back = ReplayBuffer.load(path)
    assert back.episode_ends.dtype == np.int64
    np.testing.assert_array_equal(back.episode_ends, [5, 8, 15])
    for k in ("state", "keypoint", "action", "img"):
        assert back[k].dtype == buf[k].dtype
        np.testing.assert_array_equal(back[k], buf[k])
    for i, ep in enumerate(eps):
        got = back.get_episode(i)
        for k in ep:
            np.testing.assert_array_equal(got[k], ep[k])
    np.testing.assert_array_equal(back.get_episode(-1)["action"], eps[2]["action"])

    # save over an existing store replaces it
    buf2 = ReplayBuffer()
    buf2.add_episode(_episode(2, 9))
    buf2.save(path)
    assert ReplayBuffer.load(path).n_steps == 2


def _write_direct(path, zarr_format: int, with_ends: bool = True, n_state: int = 6) -> None:
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    data = root.create_group("data")
    data.create_array("state", shape=(n_state, 5), dtype="float32")[...] = np.arange(n_state * 5).reshape(
        n_state, 5
    )
    data.create_array("keypoint", shape=(6, 9, 2), dtype="float32")[...] = 1.0
    data.create_array("action", shape=(6, 2), dtype="float32")[...] = 2.0
    if with_ends:
        root.create_group("meta").create_array("episode_ends", shape=(2,), dtype="int64")[...] = [4, 6]


@pytest.mark.parametrize("fmt", [2, 3])
def test_load_store_written_with_zarr_api(tmp_path, fmt):
    path = tmp_path / f"direct{fmt}.zarr"
    _write_direct(path, fmt)
    buf = ReplayBuffer.load(path)
    assert buf.n_episodes == 2 and buf.n_steps == 6
    np.testing.assert_array_equal(buf.get_episode(1)["state"], np.arange(30).reshape(6, 5)[4:])
    assert buf["action"].shape == (6, 2)


def test_missing_episode_ends_raises(tmp_path):
    path = tmp_path / "noends.zarr"
    _write_direct(path, 2, with_ends=False)
    with pytest.raises(ValueError, match="meta/episode_ends"):
        ReplayBuffer.load(path)


def test_mismatched_lengths_raise(tmp_path):
    path = tmp_path / "bad.zarr"
    _write_direct(path, 2, n_state=5)
    with pytest.raises(ValueError, match="data/state has 5 steps.*expected 6"):
        ReplayBuffer.load(path)
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.load(tmp_path / "nothing.zarr")


def test_add_episode_validation():
    buf = ReplayBuffer()
    bad = _episode(4, 0)
    bad["action"] = bad["action"][:3]
    with pytest.raises(ValueError, match="different lengths"):
        buf.add_episode(bad)
    buf.add_episode(_episode(4, 0))
    with pytest.raises(ValueError, match="keys"):
        buf.add_episode(_episode(4, 1, img=True))
