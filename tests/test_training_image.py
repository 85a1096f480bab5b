"""Image-policy training (task=pusht_image): frames equal to the env's, windows, overfitting, checkpoints, resume.

The data are three 20-step scripted-expert episodes rendered by gym-pusht's own renderer (the
generator's ``--img`` path); the policy is DP's image policy (ResNet-18 encoder, on frames resized
to 48x48 and cropped to 40x40 for speed) with a tiny UNet, trained for a few steps at batch 8 on
one thread.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from para_policy.checkpoints import load_checkpoint
from para_policy.dataset import IMAGE_RANGE_NORMALIZER, PushTImageDataset, window_rows
from para_policy.image_policy import ImagePolicy
from para_policy.loading import load_policy
from para_policy.tasks.pusht.env import make_env
from para_policy.tasks.pusht.expert import run_expert_episode
from para_policy.tasks.pusht.replay_buffer import ReplayBuffer
from para_policy.training import build_policy_config, fit_normalizer, make_datasets, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SEEDS = (1_000_000, 1_000_001, 1_000_002)
STEPS = 20

TINY = [
    "policy.model.down_dims=[8,16]",
    "policy.model.diffusion_step_embed_dim=16",
    "policy.model.kernel_size=3",
    "policy.obs_encoder.resize_shape=[48,48]",  # the ResNet on 40x40 crops: a fifth of the 84x84 cost
    "policy.obs_encoder.crop_shape=[40,40]",
    "training.batch_size=8",
    "training.num_threads=1",
    "training.log_every=1",
    "training.progress=false",
    "training.lr_warmup_steps=2",
    "training.val_batches=1",
    "training.rollout_predict.num_inference_steps=4",
    "task.val_ratio=0.34",
    "logger.backend=none",
]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="train_image", overrides=overrides)


@pytest.fixture(scope="module")
def episodes() -> list[dict]:
    return [run_expert_episode(seed, max_steps=STEPS, img=True) for seed in SEEDS]


@pytest.fixture(scope="module")
def image_store(tmp_path_factory, episodes) -> Path:
    """What ``generate --img`` writes, for three short (unfinished) expert episodes."""
    from para_policy.tasks.pusht.env import block_keypoints

    buf = ReplayBuffer()
    for ep in episodes:
        buf.add_episode({"state": ep["states"], "keypoint": block_keypoints(ep["states"]).astype(np.float32),
                         "action": ep["actions"], "img": ep["img"]})
    return buf.save(tmp_path_factory.mktemp("data") / "tiny_image.zarr")


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_train_py_task_pusht_image_composes_the_image_recipe():
    out = subprocess.run([sys.executable, "train.py", "task=pusht_image", "--cfg", "job"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kind: dp_multi_image" in out.stdout and "lr: 0.0003" in out.stdout and "batch_size: 64" in out.stdout
    assert "dataset_path: data/pusht/pusht_image_expert.zarr" in out.stdout

    pc = build_policy_config(compose_cfg([]))
    assert pc["obs_dim"] == 512 + 2 and pc["model"]["global_cond_dim"] == 2 * 514 and pc["model"]["input_dim"] == 2
    assert pc["obs_keys"] == {"image": {"shape": [3, 96, 96], "type": "rgb"},
                              "agent_pos": {"shape": [2], "type": "low_dim"}}
    assert pc["obs_encoder"] == {"kind": "dp_multi_image", "shape_meta": {"obs": pc["obs_keys"]},
                                 "resize_shape": None, "crop_shape": [76, 76], "random_crop": True,
                                 "use_group_norm": True, "share_rgb_model": False, "imagenet_norm": True}
    affine = {"mode": "affine"}
    assert pc["normalizer"] == {"image": {"shape": [1], **affine}, "agent_pos": {"shape": [2], **affine},
                                "action": {"shape": [2], **affine}}
    # train.yaml with an image task but no encoder: a clear error, not a low-dim policy
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        plain = compose(config_name="train", overrides=["task=pusht_image"])
    with pytest.raises(ValueError, match="train_image"):
        build_policy_config(plain)


def test_generated_frames_are_the_env_observations(episodes, image_store):
    """The dataset's image / agent_pos of every step equal what the evaluator's env gives there."""
    ds = PushTImageDataset.from_path(image_store, horizon=1)  # one window per step, in order
    assert ds.img.dtype == torch.uint8 and ds.obs_shapes() == {"image": (3, 96, 96), "agent_pos": (2,)}
    batch = ds.get_batch(torch.arange(len(ds)))
    row = 0
    env = make_env(obs_type="pixels_agent_pos")
    for ep in episodes:
        obs, _ = env.reset(seed=ep["seed"])
        for action in ep["actions"]:
            assert np.array_equal(batch["image"][row, 0].numpy(), obs["image"])
            assert np.array_equal(batch["agent_pos"][row, 0].numpy(), obs["agent_pos"])
            obs, *_ = env.step(action)
            row += 1
    env.close()
    assert row == len(ds) == len(SEEDS) * STEPS


def test_image_dataset_windows(image_store, tmp_path):
    ds = PushTImageDataset.from_path(image_store, horizon=16, pad_before=1, pad_after=7, n_obs_steps=2,
                                     val_ratio=0.34)
    val = ds.get_validation_dataset()
    assert ds.n_episodes == 2 and val.n_episodes == 1 and len(ds) == 2 * (STEPS - 16 + 1 + 7 + 1)
    rows = window_rows(ds.episode_ends, 16, 1, 7, ds.episode_mask)
    assert np.array_equal(ds.rows.numpy(), rows)
    idx = [0, 5, len(ds) - 1]
    b = ds.get_batch(idx)
    assert b["image"].shape == (3, 2, 3, 96, 96) and b["image"].dtype == torch.float32
    assert b["agent_pos"].shape == (3, 16, 2) and b["action"].shape == (3, 16, 2)
    img = ReplayBuffer.load(image_store)["img"]
    state = ReplayBuffer.load(image_store)["state"]
    for i, r in zip(idx, rows[idx], strict=True):
        expected = np.moveaxis(img[r[:2]], -1, 1).astype(np.float32) / 255  # DP's _sample_to_data
        assert np.array_equal(b["image"][idx.index(i)].numpy(), expected)
        assert np.array_equal(b["agent_pos"][idx.index(i)].numpy(), state[r, :2])
    assert rows[0, 0] == rows[0, 1]  # the first window repeats the episode's first step (pad_before)
    item = ds[5]
    assert all(torch.equal(item[k], b[k][1]) for k in b)
    norm = ds.get_normalizer_data()
    assert set(norm) == {"agent_pos", "action"} and norm["agent_pos"].shape == (len(ds.img), 2)

    # DP stores frames as float32 0..255: the same tensors
    buf = ReplayBuffer.load(image_store)
    as_float = PushTImageDataset(buf["img"].astype(np.float32), buf["state"], buf["action"], buf.episode_ends,
                                 n_obs_steps=2, val_ratio=0.34)
    assert as_float.img.dtype == torch.uint8 and torch.equal(as_float.get_batch(idx)["image"], b["image"])
    with pytest.raises(ValueError, match="0..255"):
        PushTImageDataset(buf["img"].astype(np.float32) / 255, buf["state"], buf["action"], buf.episode_ends)

    # a low-dim buffer, or no buffer: errors naming the generator's --img
    lowdim = ReplayBuffer({k: buf[k] for k in ("state", "keypoint", "action")}, buf.episode_ends)
    lowdim.save(tmp_path / "lowdim.zarr")
    with pytest.raises(ValueError, match="--img"):
        PushTImageDataset.from_path(tmp_path / "lowdim.zarr")
    with pytest.raises(FileNotFoundError, match="--img"):
        PushTImageDataset.from_path(tmp_path / "absent.zarr")


def test_image_policy_overfits_a_fixed_batch(image_store):
    cfg = compose_cfg([*TINY, f"task.dataset_path={image_store}"])
    train_set, _ = make_datasets(cfg)
    torch.manual_seed(0)
    policy = ImagePolicy(build_policy_config(cfg))
    fit_normalizer(policy, train_set)
    image = policy.normalizer.params_dict["image"]
    assert image.scale.item() == 2.0 and image.offset.item() == -1.0 and image.input_stats.max.item() == 1.0
    assert image.input_stats.std.item() == pytest.approx(IMAGE_RANGE_NORMALIZER["std"])
    batch = train_set.get_batch(torch.arange(8))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    losses = []
    for _ in range(10):  # the same noise, timesteps and crops every step: only the weights change
        torch.manual_seed(1)
        loss = policy.compute_loss(batch, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0] and losses[-1] == min(losses), losses
    encoder_grad = policy.obs_encoder.key_model_map["image"].conv1.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0  # the encoder trains with the UNet


def test_tiny_image_training_checkpoint_loads_and_acts(tmp_path, image_store):
    run = tmp_path / "run"
    cfg = compose_cfg([*TINY, f"task.dataset_path={image_store}", "training.max_steps=4", "training.val_every=2",
                       "training.checkpoint_every=2", "training.rollout_every=4", "training.rollout_episodes=1",
                       "task.max_steps=8"])
    summary = train(cfg, output_dir=run)
    assert summary["step"] == 4 and summary["stop_reason"] == "max_steps"
    log = read_log(run)
    assert [r["step"] for r in log if "train_loss" in r] == [1, 2, 3, 4]
    assert len([r for r in log if "val_loss_ema" in r]) == 2
    assert summary["rollout"]["step"] == 4 and len(summary["rollout"]["max_rewards"]) == 1  # env rollout, dict obs

    state, config = load_checkpoint(run / "checkpoints" / "final.safetensors")
    assert config["task"] == "pusht_image" and config["training"]["dataset"]["episodes"] == 3
    assert state["normalizer.params_dict.image.scale"].tolist() == [2.0]
    policy = load_policy(run / "checkpoints" / "final.safetensors", sampler="sequential", scheduler="ddim",
                         num_inference_steps=4)
    assert isinstance(policy, ImagePolicy)
    env = make_env(obs_type="pixels_agent_pos")
    obs, _ = env.reset(seed=100000)
    env.close()
    window = {k: torch.from_numpy(np.stack([v, v]))[None] for k, v in obs.items()}  # (1, To, ...)
    out = policy.predict_action(window, generator=torch.Generator().manual_seed(0))
    assert out["action"].shape == (1, 8, 2) and torch.isfinite(out["action"]).all()


def test_image_resume_continues_exactly(tmp_path, image_store):
    common = [*TINY, f"task.dataset_path={image_store}", "training.lr_scheduler=constant_with_warmup",
              "training.val_every=0", "training.checkpoint_every=0"]
    straight = tmp_path / "straight"
    train(compose_cfg([*common, "training.max_steps=6"]), output_dir=straight)
    split = tmp_path / "split"
    train(compose_cfg([*common, "training.max_steps=3"]), output_dir=split)
    second = train(compose_cfg([*common, "training.max_steps=6", "resume=true"]), output_dir=split)
    assert second["step"] == 6

    log = [r for r in read_log(split) if "train_loss" in r]
    assert [r["step"] for r in log] == list(range(1, 7))
    ref = [r["train_loss"] for r in read_log(straight) if "train_loss" in r]
    assert [r["train_loss"] for r in log] == ref  # same batches, crops, noise and optimizer state
    a, _ = load_checkpoint(straight / "checkpoints" / "final.safetensors")
    b, _ = load_checkpoint(split / "checkpoints" / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
