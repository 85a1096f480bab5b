"""Tests for the PushT observation adapter, the scripted expert and the data generator."""

from __future__ import annotations

import math

import gymnasium
import numpy as np
import pytest

from para_policy.tasks.pusht import (
    KEYPOINT_ENV_ID,
    KEYPOINTS_LOCAL,
    ReplayBuffer,
    block_keypoints,
    get_state,
    keypoint_obs,
    make_env,
    run_expert_episode,
    set_state,
)
from para_policy.tasks.pusht.env import points_in_t
from para_policy.tasks.pusht.generate import EVAL_SEEDS, episode_seed, generate_dataset, main


def test_block_keypoints_hand_rotation():
    theta = math.pi / 6
    state = np.array([1.0, 2.0, 100.0, 200.0, theta])
    kp = block_keypoints(state)
    assert kp.shape == (9, 2)
    x, y = KEYPOINTS_LOCAL[0]  # (9.2698, 90.0410)
    expected = (
        100.0 + math.cos(theta) * x - math.sin(theta) * y,
        200.0 + math.sin(theta) * x + math.cos(theta) * y,
    )
    np.testing.assert_allclose(kp[0], expected, atol=1e-9)
    # angle 0: pure translation
    np.testing.assert_allclose(block_keypoints(np.array([0, 0, 10.0, 20.0, 0.0])), KEYPOINTS_LOCAL + [10, 20])
    # batched
    assert block_keypoints(np.zeros((3, 4, 5))).shape == (3, 4, 9, 2)


def test_keypoints_on_the_t_as_posed_by_env():
    """DiffusionPolicy's keypoints lie in/on the env's T (within 3 px of its outline, pixel sampling)."""
    assert points_in_t(KEYPOINTS_LOCAL, tol=3.0).all()
    assert points_in_t(KEYPOINTS_LOCAL).sum() >= 2  # e.g. (9.3, 90.0) in the stem, (-0.3, 25.5) in the bar
    env = make_env(keypoints=False)
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = np.array([450.0, 450.0, *rng.uniform(150, 350, 2), rng.uniform(-np.pi, np.pi)])
        set_state(env, s)
        block = env.unwrapped.block
        kp = block_keypoints(get_state(env))
        back = np.array([block.world_to_local(tuple(p)) for p in kp])
        np.testing.assert_allclose(back, KEYPOINTS_LOCAL, atol=1e-6)
        dist = [min(sh.point_query(tuple(p)).distance for sh in block.shapes) for p in kp]
        assert max(dist) < 3.0, dist
    env.close()


def test_keypoint_obs_order():
    state = np.array([[11.0, 22.0, 250.0, 260.0, 0.3], [33.0, 44.0, 200.0, 150.0, -2.0]])
    obs = keypoint_obs(state)
    assert obs.shape == (2, 20)
    np.testing.assert_allclose(obs[:, :18].reshape(2, 9, 2), block_keypoints(state))
    np.testing.assert_allclose(obs[:, 18:], state[:, :2])
    np.testing.assert_allclose(obs[0, :2], block_keypoints(state[0])[0])


def test_set_state_exact_and_wrapper():
    env = make_env()
    s = np.array([100.0, 120.0, 210.0, 300.0, 1.0])
    obs, info = set_state(env, s)
    np.testing.assert_allclose(get_state(env), s, atol=1e-9)
    assert obs.shape == (20,) and obs.dtype == np.float32
    assert env.observation_space.shape == (20,)
    np.testing.assert_allclose(obs, keypoint_obs(s), atol=1e-3)
    obs, reward, terminated, truncated, info = env.step(np.array([100.0, 120.0], dtype=np.float32))
    assert "coverage" in info and "is_success" in info
    assert reward == pytest.approx(np.clip(info["coverage"] / 0.95, 0, 1))
    env.close()


def test_vector_env():
    venv = gymnasium.vector.SyncVectorEnv([lambda: gymnasium.make(KEYPOINT_ENV_ID) for _ in range(2)])
    obs, _ = venv.reset(seed=[100000, 100001])
    assert obs.shape == (2, 20)
    obs, *_ = venv.step(np.full((2, 2), 256.0, dtype=np.float32))
    assert obs.shape == (2, 20)
    venv.close()


@pytest.mark.parametrize("seed", [1000, 1003])
def test_expert_succeeds(seed):
    out = run_expert_episode(seed)
    assert out["success"], out["max_coverage"]
    assert out["coverage"] > 0.95
    n = out["length"]
    assert out["states"].shape == (n, 5) and out["actions"].shape == (n, 2)
    assert out["actions"].dtype == np.float32
    # obs_t is what was seen before action_t: replaying the actions reproduces the states
    env = make_env(keypoints=False)
    obs, _ = env.reset(seed=seed)
    for t in range(n):
        np.testing.assert_allclose(obs, out["states"][t], atol=1e-3)
        obs, _, _, _, info = env.step(out["actions"][t])
    assert info["coverage"] >= 0.97
    env.close()


def test_seeds_disjoint_from_eval():
    seeds = {episode_seed(s, i) for s in range(3) for i in (0, 1, 99_999)}
    assert not seeds & set(EVAL_SEEDS)
    with pytest.raises(ValueError):
        episode_seed(0, 100_000)


def test_generate_deterministic(tmp_path):
    out = tmp_path / "d.zarr"
    main(["--episodes", "2", "--seed", "3", "--workers", "2", "--out", str(out)])
    a = ReplayBuffer.load(out)
    b, stats = generate_dataset(2, seed=3, workers=1, progress=False)
    assert a.n_episodes == b.n_episodes == stats["successes"] >= 1
    np.testing.assert_array_equal(a.episode_ends, b.episode_ends)
    for k in ("state", "keypoint", "action"):
        np.testing.assert_array_equal(a[k], b[k])
