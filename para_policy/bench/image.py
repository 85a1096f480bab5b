"""DiffusionPolicy's real-robot image policy shapes, for benchmarks that need an image policy without a checkpoint.

DiffusionPolicy's real-robot workspace (``train_diffusion_unet_real_image_workspace.yaml``): two
cameras, a ResNet-18 with GroupNorm per camera on random crops, ImageNet normalization, a 2-d
end-effector pose and a ConditionalUnet1D conditioned on both observation steps. Built with
random (seeded) weights: latency depends on the shapes, not on the values.
"""

from __future__ import annotations

CAMERAS = ("camera_1", "camera_3")


def real_robot_config(down_dims: list[int], image_hw: tuple[int, int], crop_hw: tuple[int, int]) -> dict:
    """An ImagePolicy config with DiffusionPolicy's real-robot shapes (two cameras, eef pose, DDIM)."""
    obs = {cam: {"shape": [3, *image_hw], "type": "rgb"} for cam in CAMERAS}
    obs["robot_eef_pose"] = {"shape": [2], "type": "low_dim"}
    feature_dim = 512 * len(CAMERAS) + 2
    return {
        "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8, "obs_dim": feature_dim, "action_dim": 2,
        "num_inference_steps": 16, "obs_as_global_cond": True, "oa_step_convention": True, "model_type": "unet",
        "model": {"input_dim": 2, "local_cond_dim": None, "global_cond_dim": 2 * feature_dim,
                  "diffusion_step_embed_dim": 128, "down_dims": down_dims, "kernel_size": 5, "n_groups": 8,
                  "cond_predict_scale": True},
        # DDPM-trained, as DiffusionPolicy's sim configs; scheduler='ddim' derives the DDIM of its real-robot
        # config from it (same betas, set_alpha_to_one, steps_offset 0), so every schedule here runs on one policy
        "noise_scheduler": {"_target_": "diffusers.schedulers.scheduling_ddpm.DDPMScheduler",
                            "num_train_timesteps": 100, "beta_start": 0.0001, "beta_end": 0.02,
                            "beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_small", "clip_sample": True,
                            "prediction_type": "epsilon"},
        "obs_keys": obs,
        "obs_encoder": {"kind": "dp_multi_image", "shape_meta": {"obs": obs}, "resize_shape": list(image_hw),
                        "crop_shape": list(crop_hw), "random_crop": True, "use_group_norm": True,
                        "share_rgb_model": False, "imagenet_norm": True},
        "normalizer": {**{cam: {"shape": [1]} for cam in CAMERAS}, "robot_eef_pose": {"shape": [2]},
                       "action": {"shape": [2]}},
    }
