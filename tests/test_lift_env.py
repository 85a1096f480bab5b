"""Lift with robosuite (skipped without the [lift] extra): env, expert, reset_to, generator, evaluator.

One env is made per module (about 4 s each); expert episodes take about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("robosuite")
h5py = pytest.importorskip("h5py")

from hydra import compose, initialize_config_dir  # noqa: E402

from para_policy import LowdimPolicy, save_checkpoint  # noqa: E402
from para_policy.evaluation import evaluate, runner  # noqa: E402
from para_policy.tasks.lift.env import OBS_KEYS, LiftEnv, lowdim_vector, make_env, make_env_args  # noqa: E402
from para_policy.tasks.lift.expert import LiftExpert, run_expert_episode, yaw_to_align  # noqa: E402
from para_policy.tasks.lift.generate import main as generate_main  # noqa: E402
from para_policy.tasks.lift.robomimic_hdf5 import read_env_args, read_lowdim, write_demos  # noqa: E402
from para_policy.training import build_policy_config  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SEEDS = (100000, 100001, 100002)


@pytest.fixture(scope="module")
def env():
    e = LiftEnv()
    yield e
    e.close()


@pytest.fixture(scope="module")
def episodes(env):
    return [run_expert_episode(s, env=env) for s in SEEDS]


def test_observation_layout(env):
    obs, info = env.reset(seed=100000)
    assert obs.shape == (19,) and obs.dtype == np.float32 and env.observation_space.shape == (19,)
    assert env.action_space.shape == (7,) and np.all(env.action_space.low == -1)
    d = env.observation_dict()
    np.testing.assert_allclose(obs, np.concatenate([d[k] for k in OBS_KEYS]), rtol=1e-6)
    np.testing.assert_allclose(obs[10:13], d["robot0_eef_pos"], rtol=1e-6)
    np.testing.assert_allclose(obs[7:10], d["robot0_eef_pos"] - d["object"][:3], atol=1e-6)  # eef minus cube
    assert abs(np.linalg.norm(obs[13:17]) - 1) < 1e-4 and abs(np.linalg.norm(obs[3:7]) - 1) < 1e-4
    assert 0.8 < obs[2] < 0.84  # cube resting on the table (top at z = 0.8)


def test_reset_is_deterministic_per_seed_and_leaves_numpy_alone(env):
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a, _ = env.reset(seed=100003)
    state_a = env.get_state()
    env.step(np.ones(7))
    b, _ = env.reset(seed=100004)
    c, _ = env.reset(seed=100003)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(state_a, env.get_state())
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_expert_lifts_the_cube(episodes):
    for ep in episodes:
        assert ep["success"], ep["seed"]
        T = ep["length"]
        assert 20 < T < 120
        assert ep["actions"].shape == (T, 7) and np.all(np.abs(ep["actions"]) <= 1)
        assert ep["rewards"][-1] == 1.0 and ep["rewards"][:-1].max() == 0.0
        assert ep["dones"].tolist() == [0] * (T - 1) + [1]
        assert ep["obs"]["object"][-1][2] < ep["next_obs"]["object"][-1][2]  # going up at the end
        assert ep["next_obs"]["object"][-1][2] > 0.84


def test_expert_gives_up_gracefully_when_time_runs_out(env):
    ep = run_expert_episode(SEEDS[0], max_steps=5, env=env)
    assert not ep["success"] and ep["length"] == 5 and ep["dones"][-1] == 1


def test_yaw_alignment_is_within_a_quarter_turn():
    expert = LiftExpert()
    assert expert.phase == "approach"
    for cube_yaw in np.linspace(-np.pi, np.pi, 17):
        c, s = np.cos(cube_yaw), np.sin(cube_yaw)
        turn = yaw_to_align(np.eye(3), np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]))
        assert abs(turn) <= np.pi / 4 + 1e-9
        assert abs(np.sin(2 * (cube_yaw - turn))) < 1e-9  # faces line up (mod 90°)


def test_reset_to_a_stored_state_reproduces_the_observation(env, episodes, tmp_path):
    path = write_demos(tmp_path / "demos.hdf5", episodes, env.env_args())
    data = read_lowdim(path, OBS_KEYS)
    with h5py.File(path, "r") as f:
        demo = f["data/demo_1"]
        states, xml = demo["states"][:], demo.attrs["model_file"]
        obs = lowdim_vector({k: demo["obs"][k][:] for k in OBS_KEYS})
    start = int(data["episode_ends"][0])
    np.testing.assert_array_equal(obs, data["obs"][start:start + len(obs)])
    env.reset(seed=100004)  # another episode (another cube size) first
    for t in (0, len(states) // 2, len(states) - 1):
        np.testing.assert_allclose(env.reset_to(states[t], model_xml=xml), obs[t], atol=1e-6)
    # replaying the recorded actions from the first state lifts the cube again
    env.reset_to(states[0], model_xml=xml)
    with h5py.File(path, "r") as f:
        actions = f["data/demo_1/actions"][:]
    rewards = [env.step(a)[1] for a in actions]
    assert max(rewards) == 1.0


def test_env_from_dataset_env_args(episodes, tmp_path):
    path = write_demos(tmp_path / "demos.hdf5", episodes[:1], make_env_args())
    env_args = read_env_args(path)
    assert env_args["env_name"] == "Lift" and env_args["type"] == 1
    assert env_args["env_kwargs"]["controller_configs"]["type"] == "OSC_POSE"
    assert env_args["env_kwargs"]["robots"] == ["Panda"] and env_args["env_kwargs"]["ignore_done"] is True
    e = make_env(max_episode_steps=10, env_args=json.dumps(env_args))
    try:
        obs, _ = e.reset(seed=SEEDS[0])
        np.testing.assert_allclose(obs, lowdim_vector({k: v[0] for k, v in episodes[0]["obs"].items()}), atol=1e-6)
        for _ in range(10):
            _, _, terminated, truncated, info = e.step(np.zeros(7))
        assert truncated and not terminated and info["is_success"] is False
    finally:
        e.close()


def test_generator_cli_writes_successful_demos(tmp_path, capsys):
    with pytest.raises(SystemExit) as ex:
        generate_main(["--help"])
    assert ex.value.code == 0 and "--episodes" in capsys.readouterr().out
    out = tmp_path / "lift.hdf5"
    generate_main(["--episodes", "2", "--seed", "3", "--workers", "1", "--out", str(out)])
    assert "success 2/2" in capsys.readouterr().out
    with h5py.File(out, "r") as f:
        assert [f[f"data/demo_{i}"].attrs["seed"] for i in range(2)] == [1_300_000, 1_300_001]
        assert json.loads(f["data"].attrs["para_policy_generation"])["episodes"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["lift.hdf5"]


def test_eval_runs_on_lift(episodes, tmp_path):
    """eval.py task=lift with a tiny random policy: both samplers, same seeds, files written, no video here."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        train_cfg = compose(config_name="train", overrides=[
            "task=lift", "policy.model.down_dims=[8,16]", "policy.model.diffusion_step_embed_dim=8",
            "policy.model.kernel_size=3", "policy.model.n_groups=4", "policy.num_inference_steps=4"])
    torch.manual_seed(0)
    policy = LowdimPolicy(build_policy_config(train_cfg))
    obs = np.concatenate([lowdim_vector(ep["obs"]) for ep in episodes])
    policy.normalizer.fit({"obs": obs, "action": np.concatenate([ep["actions"] for ep in episodes])})
    ckpt = save_checkpoint(tmp_path / "lift.safetensors", policy.state_dict(), policy.config)
    overrides = ["task=lift", f"checkpoint={ckpt}", "task.episodes=2", "task.max_steps=16", "num_envs=2",
                 "latency.calls=2", "latency.warmup=1", "logger=none", "progress=false", "threads=1"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides)
    runner._BASELINE_CACHE.clear()
    results = evaluate(cfg, tmp_path / "out", overrides=overrides)
    runner._BASELINE_CACHE.clear()
    assert results["task"] == "lift" and results["seeds"] == [100000, 100001]
    for role in ("candidate", "baseline"):
        eps = results["samplers"][role]["episodes"]
        assert [e["seed"] for e in eps] == [100000, 100001]
        assert all(e["error"] is None and e["length"] == 16 for e in eps)
    assert (tmp_path / "out" / "summary.md").is_file() and (tmp_path / "out" / "results.json").is_file()
    # the action distance is labelled in Lift's action unit, not PushT's pixels
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "action distance max (OSC delta)" in summary and " px" not in summary
