"""Training: Hydra config composition, a tiny run that learns, checkpoints that load, exact resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_dataset import write_synthetic_pusht

from para_policy.checkpoints import load_checkpoint
from para_policy.policy import LowdimPolicy
from para_policy.training import EMA, build_policy_config, rollout, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

TINY = [
    "policy.model.down_dims=[8,16]",
    "policy.model.diffusion_step_embed_dim=16",
    "training.batch_size=32",
    "training.num_threads=1",  # tiny nets: threads only add sync overhead on a busy machine
    "training.log_every=1",
    "training.progress=false",
    "training.lr_warmup_steps=5",
    "optimizer.lr=8e-3",
    "task.val_ratio=0.2",
    "logger.backend=none",
]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="train", overrides=["task=pusht", *overrides])


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    lengths = [30, 41, 52, 60, 35, 47, 55, 64, 70, 38]
    return write_synthetic_pusht(tmp_path_factory.mktemp("data") / "tiny.zarr", lengths, seed=3)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_compose_pusht_gives_diffusion_policy_recipe(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg([])
    assert cfg.task.name == "pusht" and cfg.task.obs_dim == 20 and cfg.task.action_dim == 2
    assert cfg.task.dataset_path == "data/pusht/pusht_expert.zarr"
    assert cfg.task.max_steps == 300 and cfg.task.episodes == 50
    assert cfg.logger.backend == "wandb" and cfg.logger.mode == "offline" and cfg.resume is False
    if (CONFIGS / "logger" / "none.yaml").exists():  # the logger group shared with eval.py
        assert compose_cfg(["logger=none"]).logger.backend == "none"
    assert cfg.optimizer.weight_decay == 1e-6 and list(cfg.optimizer.betas) == [0.95, 0.999]
    pc = build_policy_config(cfg)
    assert pc == {
        "task": "pusht", "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8, "obs_dim": 20, "action_dim": 2,
        "num_inference_steps": 100, "obs_as_global_cond": True, "oa_step_convention": True,
        "model": {"input_dim": 2, "global_cond_dim": 40, "diffusion_step_embed_dim": 128,
                  "down_dims": [64, 128, 256], "kernel_size": 5, "n_groups": 8, "cond_predict_scale": True},
        "noise_scheduler": {"_target_": "diffusers.DDPMScheduler", "num_train_timesteps": 100,
                            "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2",
                            "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon"},
    }
    policy = LowdimPolicy(pc)
    n_params = sum(p.numel() for p in policy.model.parameters())
    assert 4.4e6 < n_params < 4.8e6


def test_train_py_entry_point_composes():
    out = subprocess.run(
        [sys.executable, "train.py", "task=pusht", "training.max_steps=123", "--cfg", "job"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "max_steps: 123" in out.stdout and "dataset_path: data/pusht/pusht_expert.zarr" in out.stdout


def test_missing_dataset_error_names_path_and_generator(tmp_path):
    cfg = compose_cfg([*TINY, f"task.dataset_path={tmp_path / 'absent.zarr'}"])
    with pytest.raises(FileNotFoundError, match="absent.zarr") as err:
        train(cfg, output_dir=tmp_path / "run")
    assert "python -m para_policy.tasks.pusht.generate" in str(err.value)


def test_resume_without_state_is_an_error(tmp_path, tiny_store):
    cfg = compose_cfg([*TINY, f"task.dataset_path={tiny_store}", "resume=true"])
    with pytest.raises(FileNotFoundError, match="resume.pt"):
        train(cfg, output_dir=tmp_path / "run")


def test_ema_matches_diffusion_policy_schedule():
    net = torch.nn.Linear(3, 2)
    avg = torch.nn.Linear(3, 2)
    avg.load_state_dict(net.state_dict())
    ema = EMA(avg, power=0.75)
    # DiffusionPolicy: decay 0 for the first two updates, then 1 - (1 + s)^-power with s = k - 1.
    assert ema.get_decay(0) == 0.0 and ema.get_decay(1) == 0.0
    assert ema.get_decay(2) == pytest.approx(1 - 2**-0.75)
    assert ema.get_decay(10**9) == 0.9999
    for k in range(4):
        before = avg.weight.detach().clone()
        with torch.no_grad():
            net.weight.add_(1.0)
        ema.step(net)
        d = ema.get_decay(k)
        torch.testing.assert_close(avg.weight, d * before + (1 - d) * net.weight)
    assert ema.optimization_step == 4 and not avg.weight.requires_grad


def test_tiny_training_learns_and_checkpoint_loads(tmp_path, tiny_store):
    run = tmp_path / "run"
    cfg = compose_cfg([*TINY, f"task.dataset_path={tiny_store}", "training.max_steps=60",
                       "training.val_every=30", "training.checkpoint_every=30"])
    summary = train(cfg, output_dir=run)
    assert summary["step"] == 60 and summary["stop_reason"] == "max_steps"

    losses = [r["train_loss"] for r in read_log(run) if "train_loss" in r]
    assert len(losses) == 60
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.85 * first, (first, last)
    vals = [r["val_loss"] for r in read_log(run) if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0]

    state, config = load_checkpoint(run / "checkpoints" / "final.safetensors")
    assert config["model"]["down_dims"] == [8, 16] and config["task"] == "pusht"
    prov = config["training"]
    assert prov["steps"] == 60 and prov["seed"] == 42 and prov["dataset"]["path"] == str(tiny_store)
    assert prov["dataset"]["episodes"] == 10 and prov["dataset"]["val_episodes"] == 2
    assert prov["final_train_loss"] > 0 and prov["final_val_loss_ema"] > 0 and prov["wall_time_s"] > 0
    policy = LowdimPolicy(config)
    policy.load_state_dict(state, strict=True)
    # The shipped weights are the EMA ones, not the raw model's (which live in resume.pt).
    train_state = torch.load(run / "checkpoints" / "resume.pt", weights_only=True)
    assert train_state["step"] == 60
    raw = train_state["model"]["model.final_conv.1.weight"]
    assert not torch.equal(raw, state["model.final_conv.1.weight"])
    # The normalizer was fitted to the data and travels with the checkpoint.
    assert not torch.equal(state["normalizer.params_dict.obs.scale"], torch.ones(20))

    obs = torch.from_numpy(np.random.default_rng(0).uniform(100, 400, (3, 2, 20)).astype(np.float32))
    out = policy.eval().predict_action({"obs": obs}, generator=torch.Generator().manual_seed(0),
                                       scheduler="ddim", num_inference_steps=8)
    assert out["action"].shape == (3, 8, 2) and out["action_pred"].shape == (3, 16, 2)
    assert torch.isfinite(out["action"]).all()


def test_resume_continues_exactly(tmp_path, tiny_store):
    common = [*TINY, f"task.dataset_path={tiny_store}", "training.lr_scheduler=constant_with_warmup",
              "training.val_every=0", "training.checkpoint_every=0", "training.batch_size=48"]
    straight = tmp_path / "straight"
    train(compose_cfg([*common, "training.max_steps=24"]), output_dir=straight)

    split = tmp_path / "split"
    first = train(compose_cfg([*common, "training.max_steps=11"]), output_dir=split)
    assert first["step"] == 11
    second = train(compose_cfg([*common, "training.max_steps=24", "resume=true"]), output_dir=split)
    assert second["step"] == 24

    log = [r for r in read_log(split) if "train_loss" in r]
    assert [r["step"] for r in log] == list(range(1, 25))
    ref = [r["train_loss"] for r in read_log(straight) if "train_loss" in r]
    assert [r["train_loss"] for r in log] == ref  # same batches, same noise, same optimizer state
    a, _ = load_checkpoint(straight / "checkpoints" / "final.safetensors")
    b, cfg_b = load_checkpoint(split / "checkpoints" / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cfg_b["training"]["steps"] == 24
    assert [x["start_step"] for x in cfg_b["training"]["sessions"]] == [0, 11]
    # Resuming with another network or other data is refused, naming what changed.
    with pytest.raises(ValueError, match="model"):
        train(compose_cfg([*common, "training.max_steps=30", "resume=true", "policy.model.down_dims=[8,8]"]),
              output_dir=split)
    other_store = write_synthetic_pusht(tmp_path / "other.zarr", [30, 41, 52, 60, 35, 47, 55, 64, 70, 38], seed=4)
    with pytest.raises(ValueError, match="dataset"):
        train(compose_cfg([*common, "training.max_steps=30", "resume=true", f"task.dataset_path={other_store}"]),
              output_dir=split)
    # Another seed gives another run: the comparison above can fail.
    other = tmp_path / "other"
    train(compose_cfg([*common, "training.max_steps=3", "training.seed=7"]), output_dir=other)
    assert [r["train_loss"] for r in read_log(other) if "train_loss" in r] != ref[:3]


def test_rollout_runs_policy_in_env(tiny_store):
    cfg = compose_cfg([*TINY, f"task.dataset_path={tiny_store}"])
    policy = LowdimPolicy(build_policy_config(cfg))
    policy.normalizer.fit({"obs": np.random.default_rng(0).uniform(0, 512, (50, 20)),
                           "action": np.random.default_rng(1).uniform(0, 512, (50, 2))})
    result = rollout(policy, episodes=2, seed_start=100000, max_steps=12,
                     predict_kwargs={"scheduler": "ddim", "num_inference_steps": 4})
    assert len(result["max_rewards"]) == 2
    assert 0.0 <= result["mean_max_reward"] <= 1.0 and 0.0 <= result["success_rate"] <= 1.0
