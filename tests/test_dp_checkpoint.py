"""DiffusionPolicy workspace .ckpt files: written here in DP's format, read by load_policy.

The reference is a DiffusionPolicy-style policy written out in this file (DP's
``conditional_sample`` / ``predict_action`` as literal loops with the diffusers scheduler
and by-hand normalization, torch's global RNG as DP uses it), independent of LowdimPolicy.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import DP_BETAS
from diffusers import DDPMScheduler
from omegaconf import OmegaConf
from torch import nn

from para_policy import load_policy, save_checkpoint
from para_policy.integrations import diffusion_policy_config, read_diffusion_policy_checkpoint, safe_eval
from para_policy.integrations.diffusion_policy import LOWDIM_TARGET, UNET_TARGET
from para_policy.models import ConditionalUnet1D

OBS_DIM, ACT_DIM, TO, HORIZON, NA = 5, 2, 2, 8, 4
STEPS = 20


class DPStandIn(nn.Module):
    """DiffusionPolicy's ``DiffusionUnetLowdimPolicy`` inference path, written out (global cond or inpainting)."""

    def __init__(self, global_cond: bool, seed: int = 0, local_cond: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.obs_as_global_cond = global_cond
        self.obs_as_local_cond = local_cond
        input_dim = ACT_DIM if (global_cond or local_cond) else ACT_DIM + OBS_DIM
        self.model = ConditionalUnet1D(input_dim=input_dim, local_cond_dim=OBS_DIM if local_cond else None,
                                       global_cond_dim=OBS_DIM * TO if global_cond else None,
                                       diffusion_step_embed_dim=16, down_dims=[16, 32], kernel_size=3, n_groups=4,
                                       cond_predict_scale=True)
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.noise_scheduler = DDPMScheduler(**DP_BETAS, variance_type="fixed_small", clip_sample=True,
                                             prediction_type="epsilon")
        self.num_inference_steps = STEPS
        self.n_action_steps = NA
        self.kwargs: dict = {}
        # DP's LinearNormalizer 'limits' parameters for raw values in [0, 500]
        self.norm = {k: {"scale": torch.rand(d, generator=g) * 0.004 + 0.002,
                         "offset": -torch.rand(d, generator=g) - 0.2}
                     for k, d in (("obs", OBS_DIM), ("action", ACT_DIM))}

    def dp_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's state dict with DiffusionPolicy's names (incl. its dummy variables)."""
        sd = {f"model.{k}": v.clone() for k, v in self.model.state_dict().items()}
        for key, p in self.norm.items():
            prefix = f"normalizer.params_dict.{key}."
            sd[prefix + "scale"] = p["scale"].clone()
            sd[prefix + "offset"] = p["offset"].clone()
            for stat in ("min", "max", "mean", "std"):
                sd[prefix + f"input_stats.{stat}"] = torch.zeros_like(p["scale"])
        sd["_dummy_variable"] = torch.zeros(0)
        sd["mask_generator._dummy_variable"] = torch.zeros(0)
        return sd

    def reset(self):  # BaseLowdimPolicy.reset: stateless in DP's low-dim policies
        pass

    def conditional_sample(self, condition_data, condition_mask, local_cond=None, global_cond=None,
                           generator=None, **kwargs):
        trajectory = torch.randn(size=condition_data.shape, dtype=condition_data.dtype,
                                 device=condition_data.device, generator=generator)
        self.noise_scheduler.set_timesteps(self.num_inference_steps)
        for t in self.noise_scheduler.timesteps:
            trajectory[condition_mask] = condition_data[condition_mask]
            model_output = self.model(trajectory, t, local_cond=local_cond, global_cond=global_cond)
            trajectory = self.noise_scheduler.step(model_output, t, trajectory, generator=generator,
                                                   **kwargs).prev_sample
        trajectory[condition_mask] = condition_data[condition_mask]
        return trajectory

    @torch.no_grad()
    def predict_action(self, obs_dict):
        nobs = obs_dict["obs"] * self.norm["obs"]["scale"] + self.norm["obs"]["offset"]
        B = nobs.shape[0]
        local_cond = global_cond = None
        if self.obs_as_local_cond:
            local_cond = torch.zeros(B, HORIZON, OBS_DIM)
            local_cond[:, :TO] = nobs[:, :TO]
            shape = (B, HORIZON, ACT_DIM)
            cond_data = torch.zeros(shape)
            cond_mask = torch.zeros(shape, dtype=torch.bool)
        elif self.obs_as_global_cond:
            global_cond = nobs[:, :TO].reshape(B, -1)
            shape = (B, HORIZON, ACT_DIM)
            cond_data = torch.zeros(shape)
            cond_mask = torch.zeros(shape, dtype=torch.bool)
        else:
            shape = (B, HORIZON, ACT_DIM + OBS_DIM)
            cond_data = torch.zeros(shape)
            cond_mask = torch.zeros(shape, dtype=torch.bool)
            cond_data[:, :TO, ACT_DIM:] = nobs[:, :TO]
            cond_mask[:, :TO, ACT_DIM:] = True
        nsample = self.conditional_sample(cond_data, cond_mask, local_cond=local_cond, global_cond=global_cond,
                                          **self.kwargs)
        action_pred = (nsample[..., :ACT_DIM] - self.norm["action"]["offset"]) / self.norm["action"]["scale"]
        start = TO - 1  # oa_step_convention=True
        return {"action": action_pred[:, start: start + NA], "action_pred": action_pred}


def dp_cfg(global_cond: bool = True, use_ema: bool = True):
    """A workspace cfg shaped like DP's train_diffusion_unet_lowdim_workspace.yaml, left unresolved."""
    return OmegaConf.create({
        "_target_": "diffusion_policy.workspace.train_diffusion_unet_lowdim_workspace."
                    "TrainDiffusionUnetLowdimWorkspace",
        "task": {"name": "pusht_lowdim", "obs_dim": OBS_DIM, "action_dim": ACT_DIM, "keypoint_dim": 2},
        "obs_dim": "${task.obs_dim}", "action_dim": "${task.action_dim}", "task_name": "${task.name}",
        "horizon": HORIZON, "n_obs_steps": TO, "n_action_steps": NA, "n_latency_steps": 0,
        "obs_as_local_cond": False, "obs_as_global_cond": global_cond, "pred_action_steps_only": False,
        "policy": {
            "_target_": LOWDIM_TARGET,
            "model": {
                "_target_": UNET_TARGET,
                "input_dim": "${eval: ${task.action_dim} if ${obs_as_local_cond} or ${obs_as_global_cond} "
                             "else ${task.obs_dim} + ${task.action_dim}}",
                "local_cond_dim": "${eval: ${task.obs_dim} if ${obs_as_local_cond} else None}",
                "global_cond_dim": "${eval: ${task.obs_dim}*${n_obs_steps} if ${obs_as_global_cond} else None}",
                "diffusion_step_embed_dim": 16, "down_dims": [16, 32], "kernel_size": 3, "n_groups": 4,
                "cond_predict_scale": True,
            },
            "noise_scheduler": {"_target_": "diffusers.schedulers.scheduling_ddpm.DDPMScheduler", **DP_BETAS,
                                "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon"},
            "horizon": "${horizon}", "obs_dim": "${obs_dim}", "action_dim": "${action_dim}",
            "n_action_steps": "${eval:'${n_action_steps}+${n_latency_steps}'}", "n_obs_steps": "${n_obs_steps}",
            "num_inference_steps": STEPS, "obs_as_local_cond": "${obs_as_local_cond}",
            "obs_as_global_cond": "${obs_as_global_cond}", "pred_action_steps_only": "${pred_action_steps_only}",
            "oa_step_convention": True,
        },
        "training": {"device": "cuda:0", "seed": 42, "use_ema": use_ema},
        # never resolved by the reader (no 'now' resolver needed)
        "logging": {"name": "${now:%Y.%m.%d-%H.%M.%S}_${name}_${task_name}"},
        "name": "train_diffusion_unet_lowdim",
    })


def write_dp_checkpoint(path, cfg, model_sd, ema_sd=None, state_dicts_extra=None) -> None:
    """``BaseWorkspace.save_checkpoint``'s payload, saved as DP saves it (dill when available)."""
    try:
        import dill as pickle_module
    except ImportError:
        pickle_module = pickle
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(3))], lr=1e-4)
    state_dicts = {"model": model_sd, "optimizer": optimizer.state_dict()}
    if ema_sd is not None:
        state_dicts["ema_model"] = ema_sd
    state_dicts.update(state_dicts_extra or {})
    payload = {"cfg": cfg, "state_dicts": state_dicts,
               "pickles": {"global_step": pickle_module.dumps(1000), "epoch": pickle_module.dumps(10)}}
    with open(path, "wb") as f:
        torch.save(payload, f, pickle_module=pickle_module)


def ema_and_raw(global_cond: bool) -> tuple[DPStandIn, DPStandIn]:
    return DPStandIn(global_cond, seed=1), DPStandIn(global_cond, seed=2)


def reference(standin: DPStandIn, obs: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # DP samples from torch's global RNG
    return standin.predict_action({"obs": obs})["action"]


@pytest.mark.parametrize("global_cond", [True, False])
def test_ckpt_loads_and_matches_diffusion_policy(tmp_path, global_cond):
    ema, raw = ema_and_raw(global_cond)
    path = tmp_path / "latest.ckpt"
    write_dp_checkpoint(path, dp_cfg(global_cond), raw.dp_state_dict(), ema.dp_state_dict())
    policy = load_policy(path, sampler="sequential")
    assert policy.obs_as_global_cond is global_cond and policy.n_action_steps == NA
    assert policy.num_inference_steps == STEPS and policy.config["source"]["weights"] == "ema_model"
    obs = torch.rand(2, TO, OBS_DIM) * 500
    ref = reference(ema, obs, seed=7)
    assert not torch.allclose(ref, reference(raw, obs, seed=7), atol=1e-2)  # the two weight sets differ
    out = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(7))["action"]
    assert out.shape == (2, NA, ACT_DIM)
    assert torch.allclose(out, ref, atol=1e-3), (out - ref).abs().max()
    fast = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(7), sampler="paradigms",
                                 window=8, tolerance=0.0)["action"]
    assert torch.allclose(fast, ref, atol=1e-3)
    # converting once to the pickle-free format keeps the outputs
    st = save_checkpoint(tmp_path / "converted.safetensors", policy.state_dict(), policy.config)
    again = load_policy(st, sampler="sequential").predict_action(
        {"obs": obs}, generator=torch.Generator().manual_seed(7))["action"]
    assert torch.equal(again, out)


def test_use_ema_false_picks_model_weights(tmp_path):
    ema, raw = ema_and_raw(True)
    path = tmp_path / "noema.ckpt"
    write_dp_checkpoint(path, dp_cfg(use_ema=False), raw.dp_state_dict())  # DP saves no ema_model then
    policy = load_policy(path, sampler="sequential")
    assert policy.config["source"]["weights"] == "model"
    obs = torch.rand(1, TO, OBS_DIM) * 500
    out = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(3))["action"]
    assert torch.allclose(out, reference(raw, obs, seed=3), atol=1e-3)
    # an explicit choice overrides the cfg; with both present use_ema=True in cfg picks ema
    path2 = tmp_path / "both.ckpt"
    write_dp_checkpoint(path2, dp_cfg(use_ema=True), raw.dp_state_dict(), ema.dp_state_dict())
    sd, _ = read_diffusion_policy_checkpoint(path2, use_ema=False)
    assert torch.equal(sd["model.final_conv.1.weight"], raw.model.final_conv[1].weight)
    sd, _ = read_diffusion_policy_checkpoint(path2)
    assert torch.equal(sd["model.final_conv.1.weight"], ema.model.final_conv[1].weight)
    assert "_dummy_variable" not in sd and "mask_generator._dummy_variable" not in sd


def test_malformed_checkpoints_list_what_is_wrong(tmp_path):
    ema, raw = ema_and_raw(True)
    good = ema.dp_state_dict()

    def write(name, cfg=None, sd=None, **kw):
        path = tmp_path / name
        write_dp_checkpoint(path, dp_cfg() if cfg is None else cfg, raw.dp_state_dict(),
                            good if sd is None else sd, **kw)
        return path

    cfg = dp_cfg()
    del cfg.policy.horizon
    del cfg.policy.n_obs_steps
    with pytest.raises(ValueError, match=r"missing \['horizon', 'n_obs_steps'\]"):
        load_policy(write("missing_cfg.ckpt", cfg))

    cfg = dp_cfg()
    cfg.policy.noise_scheduler._target_ = "diffusers.EulerDiscreteScheduler"
    cfg.policy.model.bogus = 3
    with pytest.raises(ValueError, match="EulerDiscreteScheduler") as err:
        load_policy(write("sched.ckpt", cfg))
    assert "bogus" in str(err.value)  # every problem is listed, not just the first

    cfg = dp_cfg()
    cfg.policy._target_ = "diffusion_policy.policy.diffusion_unet_hybrid_image_policy.DiffusionUnetHybridImagePolicy"
    with pytest.raises(ValueError, match=r"cfg.policy is missing \['shape_meta', 'crop_shape'\]"):
        load_policy(write("image.ckpt", cfg))  # a low-dim config under an image policy's target
    cfg = dp_cfg()
    cfg.policy._target_ = ("diffusion_policy.policy.diffusion_transformer_hybrid_image_policy."
                           "DiffusionTransformerHybridImagePolicy")
    with pytest.raises(ValueError, match="DiffusionTransformerHybridImagePolicy.*reads DiffusionUnetLowdimPolicy"):
        load_policy(write("image.ckpt", cfg))
    cfg = dp_cfg()
    cfg.policy._target_ = "my_lab.policies.Thing"
    with pytest.raises(ValueError, match="unsupported DiffusionPolicy policy _target_ 'my_lab.policies.Thing'"):
        load_policy(write("target.ckpt", cfg))

    sd = dict(good)
    sd["model.final_conv.1.weight"] = torch.zeros(3, 16, 1)
    with pytest.raises(ValueError,
                       match=r"model.final_conv.1.weight of shape \(2, 16, 1\), the file holds \(3, 16, 1\)"):
        load_policy(write("shape.ckpt", sd=sd))
    sd = dict(good)
    del sd["normalizer.params_dict.obs.scale"]
    with pytest.raises(ValueError, match=r"missing keys \['normalizer.params_dict.obs.scale'\]"):
        load_policy(write("missing_w.ckpt", sd=sd))
    sd = dict(good)
    sd["obs_encoder.backbone.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="obs_encoder.backbone.weight"):
        load_policy(write("extra_w.ckpt", sd=sd))

    path = tmp_path / "no_state.ckpt"
    torch.save({"cfg": dp_cfg()}, path)
    with pytest.raises(ValueError, match="no 'state_dicts'"):
        load_policy(path)
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_policy(path)
    with pytest.raises(FileNotFoundError):
        load_policy(tmp_path / "absent.ckpt")


def test_config_conversion_keeps_dp_defaults():
    cfg = dp_cfg()
    del cfg.policy.oa_step_convention  # DiffusionPolicy's default is False, LowdimPolicy's True
    config = diffusion_policy_config(cfg)
    assert config["oa_step_convention"] is False and config["obs_as_global_cond"] is True
    assert config["model"]["input_dim"] == ACT_DIM and config["model"]["global_cond_dim"] == OBS_DIM * TO
    assert "local_cond_dim" not in config["model"] and "_target_" not in config["model"]
    assert diffusion_policy_config(dp_cfg(global_cond=False))["model"]["input_dim"] == ACT_DIM + OBS_DIM
    cfg = dp_cfg()
    cfg.obs_as_local_cond = True
    with pytest.raises(ValueError, match="local"):
        diffusion_policy_config(cfg)


def test_safe_eval_allows_dp_arithmetic_and_nothing_else():
    assert safe_eval("2 if False or True else 20 + 2") == 2
    assert safe_eval("20*2 if True else None") == 40
    assert safe_eval("5 if False else None") is None
    assert safe_eval("8+0") == 8 and safe_eval(" -3 // 2 ") == -2 and safe_eval("(1, 2.5)") == (1, 2.5)
    assert safe_eval(7) == 7
    for bad in ("__import__('os').system('true')", "open('x')", "(1).__class__", "[1][0]", "x + 1",
                "10 ** 1000", "'a' * 10"):
        with pytest.raises(ValueError):
            safe_eval(bad)
