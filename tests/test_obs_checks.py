"""Observations are checked where they enter an image policy (issue 31 item 4).

* Float images outside 0..1, above all 0..255 floats (the common mistake, which moved actions by
  74–110 px without a word), are refused by ``check_obs`` and so by ``predict_action``, the
  Controller and calibration; uint8 images stay refused with the hint to divide by 255.
* ``select_action`` checks each observation as it arrives, not when it leaves the queue a chunk
  later: a NaN, uint8 or wrong-size image fails the call that brings it, and enters no queue.

A tiny random-weight image policy (ResNet-18 encoder on 32x32 images, a small UNet, 4 DDPM steps).
"""

from __future__ import annotations

import pytest
import torch

from para_policy.image_policy import ImagePolicy

IMAGE = (3, 32, 32)


@pytest.fixture(scope="module")
def policy() -> ImagePolicy:
    obs = {"image": {"shape": list(IMAGE), "type": "rgb"}, "agent_pos": {"shape": [2], "type": "low_dim"}}
    features = 512 + 2
    torch.manual_seed(0)
    return ImagePolicy({
        "horizon": 8, "n_obs_steps": 2, "n_action_steps": 4, "obs_dim": features, "action_dim": 2,
        "num_inference_steps": 4,
        "model": {"input_dim": 2, "global_cond_dim": features * 2, "diffusion_step_embed_dim": 8,
                  "down_dims": [8, 16], "kernel_size": 3, "n_groups": 4},
        "noise_scheduler": {"_target_": "diffusers.DDPMScheduler", "num_train_timesteps": 100},
        "obs_keys": obs,
        "obs_encoder": {"kind": "dp_multi_image", "shape_meta": {"obs": obs}, "resize_shape": None,
                        "crop_shape": [28, 28], "random_crop": True, "use_group_norm": True,
                        "share_rgb_model": False, "imagenet_norm": False},
        "normalizer": {"image": {"shape": [1]}, "agent_pos": {"shape": [2]}, "action": {"shape": [2]}},
    }).eval()


def batch(image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Observations of 1 sample and 2 steps: ``image`` (1, 2, 3, 32, 32) in 0..1 unless given."""
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(1, 2, *IMAGE, generator=g) if image is None else image,
            "agent_pos": torch.rand(1, 2, 2, generator=g)}


def test_float_images_in_0_255_are_refused(policy):
    good = batch()
    policy.check_obs(good)  # 0..1 floats pass
    policy.check_obs(batch(good["image"].clamp(0.02, 0.98)))
    pixels = good["image"] * 212.0  # a 0..255 frame, max 212
    with pytest.raises(ValueError, match=r"observation 'image' looks like 0\.\.255 \(max 2\d\d\.\d\), "
                                         r"expected 0\.\.1 floats"):
        policy.predict_action(batch(pixels), sampler="sequential")
    with pytest.raises(ValueError, match=r"observation 'image' is outside 0\.\.1 \(min -2"):  # already normalized
        policy.check_obs(batch((good["image"] - 0.45) / 0.225))
    with pytest.raises(ValueError, match=r"image is torch\.uint8; expected float images in \[0, 1\]"):
        policy.check_obs(batch(pixels.to(torch.uint8)))  # uint8: refused, as before


@pytest.mark.parametrize("bad", ["nan", "uint8", "size"])
def test_select_action_checks_each_observation_on_arrival(policy, bad):
    g = torch.Generator().manual_seed(2)
    steps = [{"image": torch.rand(1, *IMAGE, generator=g), "agent_pos": torch.rand(1, 2, generator=g)}
             for _ in range(3)]
    image = steps[1]["image"]
    wrong = {"nan": image * float("nan"), "uint8": (image * 255).to(torch.uint8), "size": image[..., :30, :30]}[bad]
    policy.reset()
    kw = {"sampler": "sequential", "generator": torch.Generator().manual_seed(3)}
    expected = [policy.select_action(s, **kw) for s in steps]
    policy.reset()
    kw["generator"].manual_seed(3)
    assert torch.equal(policy.select_action(steps[0], **kw), expected[0])
    # mid-chunk: three actions are still queued, so nothing would look at this image until later
    with pytest.raises(ValueError, match={"nan": "NaN or inf", "uint8": "uint8", "size": "wrong image size"}[bad]):
        policy.select_action({**steps[1], "image": wrong}, **kw)
    for s, e in zip(steps[1:], expected[1:], strict=True):  # the bad observation entered no queue
        assert torch.equal(policy.select_action(s, **kw), e)
    policy.reset()
