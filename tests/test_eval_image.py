"""The evaluator on PushT's image task (task=pusht_image): env observation, config, dict rollouts, latency, resume.

Runs use a small random-weight image policy (DP's MultiImageObsEncoder with a ResNet18, crop 84,
a UNet of down_dims [16, 32], 10 DDPM steps), 2 episodes of 16 steps: seconds, not minutes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_fixtures import fresh_baseline_cache, one_torch_thread  # noqa: F401  (autouse fixtures)
from hydra import compose, initialize_config_dir

from para_policy import save_checkpoint
from para_policy.evaluation import EvalConfigError, episodes, evaluate, runner, sampler_config
from para_policy.evaluation.config import observation_mismatch, task_settings
from para_policy.evaluation.report import read_chunk_obs, write_chunk_obs
from para_policy.evaluation.rollout import make_task_env, run_rollouts
from para_policy.image_policy import ImagePolicy
from para_policy.loading import load_policy
from para_policy.tasks.pusht.env import make_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
FAST = ["task.episodes=2", "task.max_steps=16", "num_envs=2", "latency.calls=4", "latency.warmup=1",
        "logger=none", "progress=false", "threads=1"]
IMAGE = ["task=pusht_image", *FAST]
SHAPES = {"image": (3, 96, 96), "agent_pos": (2,)}


def compose_eval(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides or []))


def image_policy_config(image_shape: tuple[int, int, int] = (3, 96, 96), crop: int = 84) -> dict:
    """A small DP-style image policy: MultiImageObsEncoder (resnet18, group norm, crop) + a tiny UNet."""
    obs = {"image": {"shape": list(image_shape), "type": "rgb"}, "agent_pos": {"shape": [2], "type": "low_dim"}}
    features = 512 + 2
    return {
        "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8, "obs_dim": features, "action_dim": 2,
        "num_inference_steps": 10, "obs_as_global_cond": True, "oa_step_convention": True, "model_type": "unet",
        "model": {"input_dim": 2, "global_cond_dim": features * 2, "diffusion_step_embed_dim": 16,
                  "down_dims": [16, 32], "kernel_size": 3, "n_groups": 4, "cond_predict_scale": True},
        "noise_scheduler": {"_target_": "diffusers.DDPMScheduler", "num_train_timesteps": 100,
                            "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2",
                            "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon"},
        "obs_keys": obs,
        "obs_encoder": {"kind": "dp_multi_image", "shape_meta": {"obs": obs}, "resize_shape": None,
                        "crop_shape": [crop, crop], "random_crop": True, "use_group_norm": True,
                        "share_rgb_model": False, "imagenet_norm": False},
        "normalizer": {"image": {"shape": [1], "mode": "affine"}, "agent_pos": {"shape": [2], "mode": "affine"},
                       "action": {"shape": [2], "mode": "affine"}},
    }


def build_image_checkpoint(path: Path) -> Path:
    """Random weights; DP's image range normalizer ([0, 1] -> [-1, 1]); positions and actions span the arena."""
    torch.manual_seed(0)
    policy = ImagePolicy(image_policy_config())
    with torch.no_grad():
        policy.normalizer.params_dict["image"].scale.fill_(2.0)
        policy.normalizer.params_dict["image"].offset.fill_(-1.0)
    arena = np.array([[20.0, 20.0], [490.0, 490.0]])
    policy.normalizer.fit({"agent_pos": arena, "action": arena})
    save_checkpoint(path, policy.state_dict(), policy.config)
    return path


def build_lowdim_checkpoint(path: Path) -> Path:
    """A random-weight PushT keypoint policy (obs_dim 20)."""
    from para_policy import LowdimPolicy

    config = {**image_policy_config(), "obs_dim": 20}
    for key in ("obs_keys", "obs_encoder", "normalizer", "model_type"):
        config.pop(key)
    config["model"] = {**config["model"], "global_cond_dim": 40}
    torch.manual_seed(0)
    policy = LowdimPolicy(config)
    arena = np.array([[20.0] * 20, [490.0] * 20])
    policy.normalizer.fit({"obs": arena, "action": arena[:, :2]})
    save_checkpoint(path, policy.state_dict(), policy.config)
    return path


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory) -> Path:
    return build_image_checkpoint(tmp_path_factory.mktemp("image_ckpt") / "image.safetensors")


def run_eval(ckpt: Path, out: Path, *overrides: str) -> dict:
    cfg = compose_eval([f"checkpoint={ckpt}", *IMAGE, *overrides])
    return evaluate(cfg, out, overrides=[*IMAGE, *overrides])


@pytest.fixture(scope="module")
def exact_run(image_ckpt, tmp_path_factory):
    """paradigms at tolerance 0 against sequential: the same noise must give the same episodes."""
    runner._BASELINE_CACHE.clear()
    out = tmp_path_factory.mktemp("image_run")
    return run_eval(image_ckpt, out, "sampler=paradigms", "sampler.tolerance=0", "sampler.window=4"), out


# ---- the env: DiffusionPolicy's PushTImageEnv observation ------------------------------------

def test_env_gives_dp_image_observation():
    env = make_task_env(task_settings(compose_eval(["task=pusht_image"])))
    try:
        obs, _ = env.reset(seed=100000)
        assert set(obs) == {"image", "agent_pos"}
        image, pos = obs["image"], obs["agent_pos"]
        assert image.shape == (3, 96, 96) and image.dtype == np.float32 and image.flags.c_contiguous
        assert 0.0 <= image.min() < image.max() <= 1.0
        np.testing.assert_array_equal(np.rint(image * 255) / 255, image)  # a uint8 frame / 255
        assert pos.shape == (2,) and pos.dtype == np.float32
        np.testing.assert_allclose(pos, np.asarray(env.unwrapped.agent.position), atol=1e-4)
        # channels first, x along the columns: the blue agent disk sits at agent_pos * 96 / 512
        r, _, b = np.rint(image * 255).astype(int)
        rows, cols = np.nonzero(b - r > 80)
        assert rows.size > 10
        np.testing.assert_allclose([cols.mean() * 512 / 96, rows.mean() * 512 / 96], pos, atol=8.0)
        space = env.observation_space
        assert space["image"].shape == (3, 96, 96) and space["image"].dtype == np.float32
        assert space["agent_pos"].shape == (2,)
        nxt, *_ = env.step(np.array([300.0, 300.0]))
        assert not np.array_equal(nxt["agent_pos"], pos) and not np.array_equal(nxt["image"], image)
    finally:
        env.close()


def test_env_factory_renders_videos_and_refuses_a_window():
    env = make_task_env(task_settings(compose_eval(["task=pusht_image"])), render=True, video_size=128)
    try:
        env.reset(seed=0)
        assert env.render().shape == (128, 128, 3)  # the video frame, not the 96 px observation
    finally:
        env.close()
    with pytest.raises(ValueError, match="render_mode must be 'rgb_array'"):
        make_env(render_mode="human", obs_type="pixels_agent_pos")


# ---- config ----------------------------------------------------------------------------------

def test_image_task_config_keeps_dp_test_protocol():
    cfg = compose_eval(["task=pusht_image"])
    assert cfg.checkpoint is None  # no shipped image policy
    task = task_settings(cfg)
    assert task.name == "pusht_image" and task.obs_type == "pixels_agent_pos" and task.obs_dim is None
    assert task.obs_shapes == SHAPES and task.observation_shapes == SHAPES
    assert (task.episodes, task.max_steps, task.seeds[0], task.seeds[-1]) == (50, 300, 100000, 100049)
    assert task.fingerprint()["obs_shapes"] == {"image": [3, 96, 96], "agent_pos": [2]}  # JSON-stable
    assert "obs_shapes" not in task_settings(compose_eval()).fingerprint()  # flat tasks: as before


@pytest.mark.parametrize("overrides, match", [
    (["task.obs_shapes.image=[96,96,3]"], r"task.obs_shapes.image must be \[3, height, width\]"),
    (["task.obs_shapes.agent_pos=[3]"], r"task.obs_shapes.agent_pos must be \[2\]"),
    (["+task.obs_dim=20"], "task.obs_dim does not apply to obs_type=pixels_agent_pos"),
    (["+task.obs_shapes.wrist=[3,96,96]"], r"keys \['agent_pos', 'image', 'wrist'\]"),
    (["task.obs_type=rgb"], "task.obs_type must be 'keypoints' or 'state' or 'pixels_agent_pos'"),
    (["task=pusht", "+task.obs_shapes.image=[3,96,96]"], "task.obs_shapes applies to obs_type=pixels_agent_pos"),
])
def test_image_task_config_errors_name_the_key(overrides, match):
    with pytest.raises(EvalConfigError, match=match):
        task_settings(compose_eval(["task=pusht_image", *overrides]))


def test_missing_checkpoint_says_the_task_ships_none(tmp_path, monkeypatch):
    monkeypatch.setattr(episodes, "run_rollouts", lambda *a, **k: pytest.fail("rolled out"))
    with pytest.raises(EvalConfigError, match=r"task 'pusht_image' ships no checkpoint.*checkpoint=path/to/policy"):
        evaluate(compose_eval(IMAGE), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- shape checks: policy vs task vs env -----------------------------------------------------

def test_lowdim_checkpoint_on_image_task_and_image_checkpoint_on_lowdim_task(image_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(episodes, "run_rollouts", lambda *a, **k: pytest.fail("rolled out"))
    lowdim = build_lowdim_checkpoint(tmp_path / "lowdim.safetensors")
    with pytest.raises(EvalConfigError, match=r"low-dim policy \(observation 'obs' of shape \(20,\)\).*"
                                              r"image \(3, 96, 96\), agent_pos \(2,\)"):
        run_eval(lowdim, tmp_path / "a")
    cfg = compose_eval([f"checkpoint={image_ckpt}", *FAST])  # task=pusht
    with pytest.raises(EvalConfigError, match=r"image policy observing image \(3, 96, 96\), agent_pos \(2,\).*"
                                              r"flat observations of shape \(20,\).*task=pusht_image"):
        evaluate(cfg, tmp_path / "b")


def test_image_size_mismatch_names_the_key(image_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(episodes, "run_rollouts", lambda *a, **k: pytest.fail("rolled out"))
    from para_policy.checkpoints import load_checkpoint

    # the ResNet's weights do not depend on the image size: the same weights as an 84 px policy
    state_dict, config = load_checkpoint(image_ckpt)
    small = image_policy_config((3, 84, 84), crop=76)
    config = {**config, "obs_keys": small["obs_keys"], "obs_encoder": small["obs_encoder"]}
    path = save_checkpoint(tmp_path / "image84.safetensors", state_dict, config)
    with pytest.raises(EvalConfigError, match=r"'image' has shape \(3, 96, 96\) where \(3, 84, 84\) is wanted"):
        run_eval(path, tmp_path / "out")
    assert observation_mismatch({"image": (3, 96, 96)}, {"agent_pos": (2,)}).startswith("'image' is missing")
    assert observation_mismatch(SHAPES, {**SHAPES, "extra": (1,)}) is None  # keys the policy does not read


def test_rollout_records_an_env_that_gives_the_wrong_image(image_ckpt):
    policy = load_policy(image_ckpt)
    task = task_settings(compose_eval(["task=pusht_image", "task.max_steps=8", "task.obs_shapes.image=[3,64,64]"]))
    spec = sampler_config({"name": "sequential"})
    records, _ = run_rollouts(policy, spec, task, [100000], progress=False)
    assert records[0]["error"] == ("ValueError: env observation 'image' has shape (3, 64, 64), the policy expects "
                                   "(3, 96, 96)")


# ---- a full run ------------------------------------------------------------------------------

def test_image_run_writes_results_for_both_samplers(exact_run):
    results, out = exact_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["samplers"].keys() == {"candidate", "baseline"}
    cand, base = on_disk["samplers"]["candidate"], on_disk["samplers"]["baseline"]
    assert cand["name"] == "paradigms" and base["name"] == "sequential"
    assert on_disk["task"] == "pusht_image" and on_disk["seeds"] == [100000, 100001]
    for s in (cand, base):
        assert s["n_episodes"] == 2 and s["n_failed"] == 0
        assert all(1 <= e["length"] <= 16 and e["n_chunks"] >= 1 for e in s["episodes"])
        assert all(not set(e) & {"chunk_obs", "chunk_obs_file", "chunk_guess"} for e in s["episodes"])
        lat = s["latency"]
        assert lat["ms_per_chunk"]["n"] == 4 and lat["ms_per_chunk"]["p50"] > 0
    assert on_disk["latency_method"]["includes_obs_encoder"] is True
    assert "observation encoder" in (out / "summary.md").read_text()
    assert (out / "results.json").stat().st_size < 100_000  # no images in it
    assert set(results["videos"]) == {"candidate", "baseline"}


def test_tolerance_zero_gives_the_baselines_episodes(exact_run):
    results, _ = exact_run
    cand, base = results["samplers"]["candidate"], results["samplers"]["baseline"]
    assert [e["max_reward"] for e in cand["episodes"]] == pytest.approx([e["max_reward"] for e in base["episodes"]],
                                                                          abs=1e-6)
    assert [e["length"] for e in cand["episodes"]] == [e["length"] for e in base["episodes"]]
    assert results["comparison"]["faithfulness"]["max_px"] < 1e-2


def test_chunk_observations_live_in_side_files(exact_run):
    results, out = exact_run
    progress = json.loads((out / "progress.json").read_text())
    episodes = progress["episodes"]["candidate"]
    assert all("chunk_obs" not in e for e in episodes)
    for e in episodes:
        arrays = read_chunk_obs(out / e["chunk_obs_file"])
        assert arrays["image"].shape == (e["n_chunks"], 2, 3, 96, 96) and arrays["image"].dtype == np.float32
        assert arrays["agent_pos"].shape == (e["n_chunks"], 2, 2)
        assert 0.0 <= arrays["image"].min() and arrays["image"].max() <= 1.0
    # the first chunk's history is the reset observation twice: the env's own, bit for bit
    env = make_task_env(task_settings(compose_eval(["task=pusht_image"])))
    try:
        obs, _ = env.reset(seed=100000)
    finally:
        env.close()
    first = read_chunk_obs(out / episodes[0]["chunk_obs_file"])
    assert episodes[0]["seed"] == 100000
    np.testing.assert_array_equal(first["image"][0, 0], obs["image"])
    np.testing.assert_array_equal(first["image"][0, 1], obs["image"])
    assert not any(f.name.startswith("baseline") for f in (out / "chunk_obs").iterdir())


def test_chunk_obs_files_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(3, 2, 3, 8, 8), dtype=np.uint8).astype(np.float32) / 255
    other = rng.normal(size=(3, 2, 2)).astype(np.float32)
    write_chunk_obs(tmp_path / "c.npz", {"image": frames, "agent_pos": other})
    back = read_chunk_obs(tmp_path / "c.npz")
    assert list(back) == ["image", "agent_pos"]
    np.testing.assert_array_equal(back["image"], frames)
    np.testing.assert_array_equal(back["agent_pos"], other)
    with np.load(tmp_path / "c.npz") as raw:  # frames stored as their uint8 values
        assert raw["a0"].dtype == np.uint8 and raw["a1"].dtype == np.float32


def test_resume_reuses_side_files_and_reruns_what_is_missing(image_ckpt, exact_run, tmp_path, monkeypatch):
    full, first = exact_run
    old = tmp_path / "interrupted"
    shutil.copytree(first / "chunk_obs", old / "chunk_obs")
    shutil.copytree(first / "videos", old / "videos")
    progress = json.loads((first / "progress.json").read_text())
    progress["episodes"]["baseline"] = []
    (old / "progress.json").write_text(json.dumps(progress))
    (old / "chunk_obs" / "candidate_seed100001.npz").unlink()  # lost: that episode runs again

    ran: list[tuple[str, list[int]]] = []
    real = episodes.run_rollouts

    def spy(policy, spec, task, seeds, **kw):
        ran.append((spec.name, list(seeds)))
        return real(policy, spec, task, seeds, **kw)

    monkeypatch.setattr(episodes, "run_rollouts", spy)
    new = tmp_path / "new"
    resumed = run_eval(image_ckpt, new, f"resume_dir={old}", "sampler=paradigms", "sampler.tolerance=0",
                       "sampler.window=4")
    assert ran == [("paradigms", [100001]), ("sequential", [100000, 100001])]
    assert sorted(p.name for p in (new / "chunk_obs").iterdir()) == ["candidate_seed100000.npz",
                                                                      "candidate_seed100001.npz"]
    np.testing.assert_array_equal(read_chunk_obs(new / "chunk_obs" / "candidate_seed100000.npz")["image"],
                                  read_chunk_obs(first / "chunk_obs" / "candidate_seed100000.npz")["image"])
    for role in ("candidate", "baseline"):
        a, b = resumed["samplers"][role]["episodes"], full["samplers"][role]["episodes"]
        assert [(e["seed"], e["length"]) for e in a] == [(e["seed"], e["length"]) for e in b]
        assert [e["max_reward"] for e in a] == pytest.approx([e["max_reward"] for e in b], abs=1e-5)
    assert resumed["samplers"]["candidate"]["latency"]["ms_per_chunk"]["n"] == 4


def test_window_auto_is_tuned_on_image_observations(image_ckpt, tmp_path):
    """The default sampler (window auto) measures its window on the first start states' dict observations."""
    results = run_eval(image_ckpt, tmp_path, "task.episodes=1", "compare=false", "video.enabled=false",
                       "latency.calls=2")
    window = results["samplers"]["candidate"]["spec"]["options"]["window"]
    assert isinstance(window, int) and window >= 1
    assert results["window_tuning"]["window"] == window


def test_eval_py_without_a_checkpoint_says_how_to_pass_one(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "disabled"}
    res = subprocess.run([sys.executable, str(ROOT / "eval.py"), "task=pusht_image", "logger=none"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode != 0
    assert "eval.py: error: checkpoint is not set, and task 'pusht_image' ships no checkpoint" in res.stderr
    assert "checkpoint=path/to/policy.safetensors" in res.stderr


def test_a_lerobot_directory_evaluates_on_pusht_image(tmp_path):
    """LeRobot's keys ('observation.image', 'observation.state') meet the env's ('image', 'agent_pos')."""
    directory = ROOT.parent / "shared" / "fixtures" / "lerobot_diffusion_A"
    if not (directory / "config.json").is_file():
        pytest.skip(f"{directory} is absent (the shared fixtures sit beside the checkout)")
    results = run_eval(directory, tmp_path, "sampler=paradigms", "sampler.tolerance=0", "sampler.window=100",
                       "sampler.scheduler=ddim", "sampler.num_inference_steps=10", "task.episodes=1",
                       "task.max_steps=8", "video.enabled=false", "latency.calls=2")
    cand, base = results["samplers"]["candidate"], results["samplers"]["baseline"]
    assert cand["episodes"][0]["error"] is None and cand["episodes"][0]["length"] == 8
    assert [e["max_reward"] for e in cand["episodes"]] == pytest.approx([e["max_reward"] for e in base["episodes"]],
                                                                          abs=1e-6)
