"""The policy: normalization, conditioning, sampler choice, checkpoints, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DP_BETAS
from diffusers import DDPMScheduler

from para_policy import LinearNormalizer, LowdimPolicy, load_policy, save_checkpoint

OBS_DIM, ACT_DIM, TO, HORIZON, NA = 5, 2, 2, 8, 4
SCHED = {"_target_": "diffusers.DDPMScheduler", **DP_BETAS, "variance_type": "fixed_small", "clip_sample": True,
         "prediction_type": "epsilon"}


def tiny_config(global_cond: bool = True) -> dict:
    input_dim = ACT_DIM if global_cond else ACT_DIM + OBS_DIM
    return {
        "horizon": HORIZON, "n_obs_steps": TO, "n_action_steps": NA, "obs_dim": OBS_DIM, "action_dim": ACT_DIM,
        "num_inference_steps": 100, "obs_as_global_cond": global_cond, "oa_step_convention": True,
        "model": {"input_dim": input_dim, "global_cond_dim": OBS_DIM * TO if global_cond else None,
                  "diffusion_step_embed_dim": 16, "down_dims": [16, 32], "kernel_size": 3, "n_groups": 4,
                  "cond_predict_scale": True},
        "noise_scheduler": SCHED,
    }


def tiny_policy(global_cond: bool = True, seed: int = 0) -> LowdimPolicy:
    torch.manual_seed(seed)
    policy = LowdimPolicy(tiny_config(global_cond)).eval()
    rng = np.random.default_rng(seed)
    policy.normalizer.fit({"obs": rng.uniform(0, 500, (100, OBS_DIM)), "action": rng.uniform(0, 500, (100, ACT_DIM))})
    return policy


def test_normalizer_limits_mode_matches_hand_computation():
    data = np.array([[0.0, 5.0, 3.0], [10.0, 7.0, 3.0], [4.0, 6.0, 3.0]])
    norm = LinearNormalizer({"x": 3}).fit({"x": data})
    x = torch.tensor(data, dtype=torch.float32)
    n = norm.normalize("x", x)
    # dim 0: [0, 10] -> [-1, 1]; dim 1: [5, 7] -> [-1, 1]; dim 2 constant: shifted to 0, not scaled
    assert torch.allclose(n[:, 0], torch.tensor([-1.0, 1.0, -0.2]))
    assert torch.allclose(n[:, 1], torch.tensor([-1.0, 1.0, 0.0]))
    assert torch.allclose(n[:, 2], torch.zeros(3))
    assert torch.allclose(norm.unnormalize("x", n), x, atol=1e-5)
    keys = set(norm.state_dict())
    assert "params_dict.x.scale" in keys and "params_dict.x.input_stats.max" in keys


def reference_predict_action(policy: LowdimPolicy, obs: torch.Tensor, seed: int) -> torch.Tensor:
    """DiffusionPolicy's lowdim predict_action written out independently (diffusers loop, by-hand normalization)."""
    p = {k: v.clone() for k, v in policy.normalizer.state_dict().items()}
    nobs = obs * p["params_dict.obs.scale"] + p["params_dict.obs.offset"]
    B = obs.shape[0]
    scheduler = DDPMScheduler(**{k: v for k, v in SCHED.items() if k != "_target_"})
    g = torch.Generator().manual_seed(seed)
    if policy.obs_as_global_cond:
        shape, global_cond = (B, HORIZON, ACT_DIM), nobs[:, :TO].reshape(B, -1)
        data = mask = None
    else:
        shape, global_cond = (B, HORIZON, ACT_DIM + OBS_DIM), None
        data = torch.zeros(shape)
        mask = torch.zeros(shape, dtype=torch.bool)
        data[:, :TO, ACT_DIM:] = nobs[:, :TO]
        mask[:, :TO, ACT_DIM:] = True
    traj = torch.randn(shape, generator=g)
    scheduler.set_timesteps(100)
    with torch.no_grad():
        for t in scheduler.timesteps:
            if mask is not None:
                traj[mask] = data[mask]
            out = policy.model(traj, t, global_cond=global_cond)
            traj = scheduler.step(out, t, traj, generator=g).prev_sample
    if mask is not None:
        traj[mask] = data[mask]
    action = (traj[..., :ACT_DIM] - p["params_dict.action.offset"]) / p["params_dict.action.scale"]
    return action[:, TO - 1: TO - 1 + NA]


@pytest.mark.parametrize("global_cond", [True, False])
def test_predict_action_matches_independent_reference(global_cond):
    policy = tiny_policy(global_cond)
    obs = torch.rand(2, TO, OBS_DIM) * 500
    ref = reference_predict_action(policy, obs, seed=3)
    out = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(3))
    assert out["action"].shape == (2, NA, ACT_DIM) and out["action_pred"].shape == (2, HORIZON, ACT_DIM)
    assert torch.allclose(out["action"], ref, atol=1e-3)  # pixels: float32 unnormalization of ~500 px
    fast = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(3), sampler="paradigms",
                                 window=8, tolerance=0.0)
    assert torch.allclose(fast["action"], ref, atol=1e-3)
    assert policy.last_stats.rounds <= 100


def test_checkpoint_round_trip(tmp_path):
    policy = tiny_policy()
    path = save_checkpoint(tmp_path / "p.safetensors", policy.state_dict(), policy.config)
    loaded = load_policy(path, sampler="paradigms", window=4, tolerance=0.0)
    obs = torch.rand(1, TO, OBS_DIM) * 500
    a = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(0))["action"]
    b = loaded.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(0))["action"]
    assert torch.allclose(a, b, atol=1e-3)
    assert loaded.sampler.name == "paradigms" and loaded.sampler.options["window"] == 4
    assert loaded.sampler.options["tolerance"] == 0.0 and loaded.sampler.options["secant"]  # the preset's
    # a safetensors file: 8-byte header length, then a JSON header; no pickle involved
    raw = path.read_bytes()
    assert raw[8:9] == b"{"


def test_bad_inputs_raise(tmp_path):
    policy = tiny_policy()
    with pytest.raises(ValueError, match="obs must have shape"):
        policy.predict_action({"obs": torch.zeros(1, TO, OBS_DIM + 1)})
    with pytest.raises(ValueError, match="obs must have shape"):
        policy.predict_action({"obs": torch.zeros(1, TO - 1, OBS_DIM)})
    bad = torch.zeros(1, TO, OBS_DIM)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        policy.predict_action({"obs": bad})
    with pytest.raises(ValueError, match="'obs'"):
        policy.predict_action({"observation": bad})
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_policy(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_policy(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="unknown sampler"):
        policy.set_sampler("fastest")
    with pytest.raises(ValueError, match="tolerance"):
        policy.set_sampler("paradigms", tolerance=-1)
    with pytest.raises(ValueError, match="does not take"):
        policy.set_sampler("sequential", window=4)
    cfg = tiny_config()
    cfg["model"]["global_cond_dim"] = 7
    with pytest.raises(ValueError, match="global_cond_dim"):
        LowdimPolicy(cfg)
    del cfg["horizon"]
    with pytest.raises(ValueError, match="missing"):
        LowdimPolicy(cfg)


def test_checkpoint_with_wrong_shapes_raises(tmp_path):
    policy = tiny_policy()
    state = policy.state_dict()
    state["model.final_conv.1.weight"] = torch.zeros(3, 16, 1)
    path = save_checkpoint(tmp_path / "bad.safetensors", state, policy.config)
    with pytest.raises(ValueError, match="do not fit"):
        load_policy(path)
    state = policy.state_dict()
    del state["model.final_conv.1.bias"]
    path = save_checkpoint(tmp_path / "bad2.safetensors", state, policy.config)
    with pytest.raises(ValueError, match="missing keys"):
        load_policy(path)


def test_compute_loss_is_finite_and_differentiable():
    policy = tiny_policy()
    batch = {"obs": torch.rand(4, HORIZON, OBS_DIM) * 500, "action": torch.rand(4, HORIZON, ACT_DIM) * 500}
    loss = policy.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and policy.model.final_conv[1].weight.grad is not None
