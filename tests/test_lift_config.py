"""task=lift without robosuite: config composition, the install hint, robomimic HDF5 layout (h5py only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from para_policy import LowdimPolicy, save_checkpoint
from para_policy.evaluation import EvalConfigError, evaluate
from para_policy.evaluation.config import task_settings
from para_policy.tasks.lift import INSTALL_HINT, MissingExtraError, require
from para_policy.training import build_policy_config, make_datasets

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def lift_policy_config() -> dict:
    cfg = compose_cfg("train", ["task=lift", "policy.model.down_dims=[8,16]", "policy.model.diffusion_step_embed_dim=8",
                                "policy.model.kernel_size=3", "policy.model.n_groups=4",
                                "policy.num_inference_steps=4"])
    return build_policy_config(cfg)


def test_lift_configs_compose():
    cfg = compose_cfg("eval", ["task=lift", "sampler=paradigms"])
    task = task_settings(cfg)
    assert (task.name, task.env_id, task.obs_type) == ("lift", "robosuite/Lift", "lowdim")
    assert (task.obs_dim, task.action_dim, task.max_steps) == (19, 7, 400)
    assert task.seeds == list(range(100000, 100050))
    assert cfg.checkpoint.endswith("para_policy/assets/lift_lowdim.safetensors")
    assert compose_cfg("eval", []).checkpoint.endswith("para_policy/assets/pusht_lowdim.safetensors")
    assert list(cfg.task.obs_keys) == ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]

    pc = lift_policy_config()
    assert pc["task"] == "lift" and pc["obs_dim"] == 19 and pc["action_dim"] == 7
    assert pc["model"]["input_dim"] == 7 and pc["model"]["global_cond_dim"] == 38


def test_lift_obs_type_is_checked():
    with pytest.raises(EvalConfigError, match="'lowdim'"):
        task_settings(compose_cfg("eval", ["task=lift", "task.obs_type=keypoints"]))
    with pytest.raises(EvalConfigError, match="'keypoints' or 'state'"):
        task_settings(compose_cfg("eval", ["task=pusht", "task.obs_type=lowdim"]))


@pytest.fixture
def no_robosuite(monkeypatch):
    """Make ``import robosuite`` / ``import h5py`` fail as they do when the extra is not installed."""
    for name in [m for m in sys.modules if m == "robosuite" or m.startswith("robosuite.") or m == "h5py"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "robosuite", None)
    monkeypatch.setitem(sys.modules, "h5py", None)


def test_missing_extra_raises_the_install_hint(no_robosuite):
    with pytest.raises(MissingExtraError, match=r"pip install -e '\.\[lift\]'") as err:
        require("robosuite")
    assert isinstance(err.value, ImportError) and isinstance(err.value.__cause__, ImportError)
    from para_policy.tasks.lift.env import LiftEnv

    with pytest.raises(MissingExtraError, match="robosuite"):
        LiftEnv()


def test_eval_without_the_extra_stops_with_the_hint(no_robosuite, tmp_path):
    torch.manual_seed(0)
    policy = LowdimPolicy(lift_policy_config())
    policy.normalizer.fit({"obs": np.random.default_rng(0).normal(size=(32, 19)),
                           "action": np.random.default_rng(1).uniform(-1, 1, size=(32, 7))})
    ckpt = save_checkpoint(tmp_path / "lift.safetensors", policy.state_dict(), policy.config)
    cfg = compose_cfg("eval", ["task=lift", f"checkpoint={ckpt}", "logger=none", "progress=false"])
    with pytest.raises(EvalConfigError) as err:
        evaluate(cfg, tmp_path / "out")
    assert INSTALL_HINT in str(err.value)
    assert not (tmp_path / "out" / "results.json").exists()


def test_training_without_the_extra_stops_with_the_hint(no_robosuite, tmp_path):
    path = tmp_path / "lift.hdf5"
    path.write_bytes(b"")  # exists, so the loader gets as far as needing h5py
    cfg = compose_cfg("train", ["task=lift", f"task.dataset_path={path}"])
    with pytest.raises(MissingExtraError, match=r"\[lift\]"):
        make_datasets(cfg)


def test_missing_lift_dataset_names_the_generator(tmp_path):
    cfg = compose_cfg("train", ["task=lift", f"task.dataset_path={tmp_path / 'absent.hdf5'}"])
    with pytest.raises(FileNotFoundError, match="python -m para_policy.tasks.lift.generate"):
        make_datasets(cfg)


# ---- robomimic HDF5 layout (h5py only) ------------------------------------------------------

def fake_demo(T: int, value: float) -> dict:
    obs = {"object": np.full((T, 10), value), "robot0_eef_pos": np.full((T, 3), value + 0.1),
           "robot0_eef_quat": np.full((T, 4), value + 0.2), "robot0_gripper_qpos": np.full((T, 2), value + 0.3),
           "robot0_joint_pos": np.zeros((T, 7))}
    return {"obs": obs, "next_obs": {k: v + 1 for k, v in obs.items()}, "actions": np.full((T, 7), value),
            "states": np.arange(T * 32, dtype=np.float64).reshape(T, 32), "rewards": np.zeros(T),
            "dones": np.eye(1, T, T - 1, dtype=np.int64)[0], "model_xml": f"<mujoco model='{value}'/>",
            "seed": int(1000 + value)}


ENV_ARGS = {"env_name": "Lift", "env_version": "1.4.1", "type": 1,
            "env_kwargs": {"robots": ["Panda"], "controller_configs": {"type": "OSC_POSE"}, "control_freq": 20}}


def test_robomimic_hdf5_layout_and_round_trip(tmp_path):
    h5py = pytest.importorskip("h5py")
    from para_policy.tasks.lift.robomimic_hdf5 import read_env_args, read_lowdim, write_demos

    lengths = [9, 11, 10, 8, 12, 9, 9, 10, 11, 8, 13, 9]  # 12 demos: demo_10 and demo_11 sort after demo_9
    demos = [fake_demo(T, float(i)) for i, T in enumerate(lengths)]
    path = write_demos(tmp_path / "d.hdf5", demos, ENV_ARGS, attrs={"para_policy_generation": {"seed": 0}})
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert set(data.keys()) == {f"demo_{i}" for i in range(12)}
        assert data.attrs["total"] == sum(lengths)
        assert json.loads(data.attrs["env_args"]) == ENV_ARGS
        demo = data["demo_10"]
        assert set(demo.keys()) == {"obs", "next_obs", "actions", "states", "rewards", "dones"}
        assert demo.attrs["num_samples"] == 13 and demo.attrs["model_file"] == "<mujoco model='10.0'/>"
        assert demo.attrs["seed"] == 1010
        assert demo["obs/object"].shape == (13, 10) and demo["actions"].shape == (13, 7)
        assert demo["states"].shape == (13, 32) and demo["dones"][-1] == 1
        np.testing.assert_array_equal(demo["next_obs/object"][:], demos[10]["next_obs"]["object"])
    assert read_env_args(path) == ENV_ARGS

    out = read_lowdim(path, ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"])
    assert out["demos"] == [f"demo_{i}" for i in range(12)]
    np.testing.assert_array_equal(out["episode_ends"], np.cumsum(lengths))
    assert out["obs"].shape == (sum(lengths), 19) and out["obs"].dtype == np.float32
    assert out["action"].shape == (sum(lengths), 7)
    start = int(np.cumsum(lengths)[9])  # demo_10's first row: numeric, not lexical, order
    np.testing.assert_allclose(out["obs"][start], [10.0] * 10 + [10.1] * 3 + [10.2] * 4 + [10.3] * 2, rtol=1e-6)
    with pytest.raises(KeyError, match="robot0_eef_vel"):
        read_lowdim(path, ["object", "robot0_eef_vel"])

    cfg = compose_cfg("train", ["task=lift", f"task.dataset_path={path}", "task.val_ratio=0.2"])
    train_set, val_set = make_datasets(cfg)
    assert train_set.n_episodes + val_set.n_episodes == 12 and val_set.n_episodes == 2
    batch = train_set.get_batch([0, 1])
    assert batch["obs"].shape == (2, 16, 19) and batch["action"].shape == (2, 16, 7)
    with pytest.raises(ValueError, match="obs_dim"):
        make_datasets(compose_cfg("train", ["task=lift", f"task.dataset_path={path}", "task.obs_dim=20"]))


def test_write_refuses_ragged_demos(tmp_path):
    pytest.importorskip("h5py")
    from para_policy.tasks.lift.robomimic_hdf5 import write_demos

    demo = fake_demo(4, 0.0)
    demo["states"] = demo["states"][:3]
    with pytest.raises(ValueError, match="states has 3 steps"):
        write_demos(tmp_path / "bad.hdf5", [demo], ENV_ARGS)
    assert not (tmp_path / "bad.hdf5").exists()
    assert not list(tmp_path.iterdir())  # no temp file left behind


def test_shipped_lift_policy_matches_the_task():
    from para_policy.checkpoints import load_checkpoint
    from para_policy.loading import load_policy

    cfg = compose_cfg("eval", ["task=lift"])
    path = Path(cfg.checkpoint)
    assert path.is_file() and path.stat().st_size < 20e6
    policy = load_policy(path, sampler="sequential")
    assert (policy.obs_dim, policy.action_dim, policy.n_obs_steps, policy.n_action_steps) == (19, 7, 2, 8)
    meta = load_checkpoint(path)[1]
    assert meta["task"] == "lift" and meta["training"]["steps"] == 3000
    assert meta["training"]["dataset"]["episodes"] == 200
    out = policy.predict_action({"obs": torch.zeros(1, 2, 19)}, generator=torch.Generator().manual_seed(0))
    assert out["action"].shape == (1, 8, 7) and torch.isfinite(out["action"]).all()
