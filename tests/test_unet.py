"""Tests for para_policy.models: ConditionalUnet1D and the DiffusionPolicy <-> LeRobot key converters."""

from __future__ import annotations

import math

import pytest
import torch

from para_policy.models import (
    ConditionalUnet1D,
    SinusoidalPosEmb,
    diffusion_policy_to_lerobot_keys,
    lerobot_to_diffusion_policy_keys,
)
from para_policy.models.unet1d import Conv1dBlock

# The PushT low-dim configuration of Diffusion Policy; numbers below are those of the original.
EXAMPLE = dict(
    input_dim=2,
    global_cond_dim=40,
    down_dims=[64, 128, 256],
    kernel_size=5,
    n_groups=8,
    diffusion_step_embed_dim=128,
    cond_predict_scale=True,
)
EXAMPLE_SHAPES = {
    "down_modules.0.0.blocks.0.block.0.weight": (64, 2, 5),
    "down_modules.0.0.cond_encoder.1.weight": (128, 168),
    "up_modules.0.0.blocks.0.block.0.weight": (128, 512, 5),
    "up_modules.0.2.conv.weight": (128, 128, 4),
    "final_conv.1.weight": (2, 64, 1),
}
TINY = dict(
    input_dim=3,
    global_cond_dim=5,
    diffusion_step_embed_dim=8,
    down_dims=(8, 16),
    kernel_size=3,
    n_groups=4,
    cond_predict_scale=True,
)


def tiny(seed: int = 0, **overrides) -> ConditionalUnet1D:
    torch.manual_seed(seed)
    return ConditionalUnet1D(**{**TINY, **overrides}).eval()


def inputs(batch: int = 3, horizon: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, horizon, TINY["input_dim"], generator=gen), torch.randn(
        batch, TINY["global_cond_dim"], generator=gen
    )


def fill_deterministic(model: torch.nn.Module) -> None:
    """Set every weight from a fixed formula, so golden outputs do not depend on torch's RNG."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.state_dict().items())):
            p.copy_(0.5 * torch.sin(0.37 * torch.arange(p.numel(), dtype=torch.float32) + i).reshape(p.shape))


# ---------------------------------------------------------------------------------------------- structure


def test_example_config_matches_diffusion_policy_state_dict():
    model = ConditionalUnet1D(**EXAMPLE)
    sd = model.state_dict()
    assert len(sd) == 148
    assert sum(p.numel() for p in model.parameters()) == 4_559_554
    for key, shape in EXAMPLE_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    # Every decoder level upsamples (the original's is_last never fires there); the last encoder
    # level does not downsample; no local encoder without local_cond_dim.
    assert "up_modules.1.2.conv.weight" in sd
    assert not any(k.startswith("down_modules.2.2.") for k in sd)
    assert not any(k.startswith("local_cond_encoder.") for k in sd)
    assert "diffusion_step_encoder.0.freqs" not in sd  # non-persistent buffer


def test_default_config_builds_and_runs():
    model = ConditionalUnet1D(input_dim=2).eval()
    sd = model.state_dict()
    assert tuple(sd["diffusion_step_encoder.1.weight"].shape) == (1024, 256)
    assert tuple(sd["down_modules.0.0.blocks.0.block.0.weight"].shape) == (256, 2, 3)
    assert tuple(sd["mid_modules.1.blocks.1.block.0.weight"].shape) == (1024, 1024, 3)
    assert tuple(sd["down_modules.0.0.cond_encoder.1.weight"].shape) == (256, 256)  # no scale
    with torch.inference_mode():
        assert model(torch.randn(1, 4, 2), 10).shape == (1, 4, 2)


def test_local_cond_encoder_keys():
    sd = tiny(local_cond_dim=2).state_dict()
    assert tuple(sd["local_cond_encoder.0.blocks.0.block.0.weight"].shape) == (8, 2, 3)
    assert tuple(sd["local_cond_encoder.1.residual_conv.weight"].shape) == (8, 2, 1)


@pytest.mark.parametrize(
    "kwargs",
    [dict(kernel_size=4), dict(down_dims=()), dict(down_dims=(8, 10)), dict(input_dim=0)],
)
def test_invalid_config_raises(kwargs):
    with pytest.raises(ValueError):
        ConditionalUnet1D(**{**TINY, **kwargs})


def test_sinusoidal_embedding_formula():
    t = torch.tensor([0.0, 3.0, 250.5])
    emb = SinusoidalPosEmb(8)(t)
    freqs = [math.exp(-k * math.log(10000) / 3) for k in range(4)]
    expected = [[math.sin(x * f) for f in freqs] + [math.cos(x * f) for f in freqs] for x in t.tolist()]
    torch.testing.assert_close(emb, torch.tensor(expected))


# ---------------------------------------------------------------------------------------------- forward


# Outputs of the original diffusion_policy ConditionalUnet1D (same weights and inputs), rounded.
GOLDEN = {
    "film_scale_local_global": (
        dict(
            local_cond_dim=3,
            global_cond_dim=4,
            diffusion_step_embed_dim=8,
            down_dims=(16, 32),
            kernel_size=3,
            n_groups=4,
            cond_predict_scale=True,
        ),
        [
            [-1.24941, -1.23641, -1.30813, -1.36854, -1.37041, -1.3753, -1.36735, -1.34671],
            [-1.38322, -1.36725, -1.33966, -1.36276, -1.42155, -1.44438, -1.4048, -1.3815],
        ],
        [
            [-1.34497, -1.32044, -1.34594, -1.35768, -1.34484, -1.32491, -1.34068, -1.36897],
            [-1.4261, -1.41027, -1.38632, -1.40106, -1.42857, -1.42449, -1.38223, -1.38331],
        ],
    ),
    "film_bias_only": (
        dict(
            global_cond_dim=4,
            diffusion_step_embed_dim=8,
            down_dims=(8, 16, 16),
            kernel_size=5,
            n_groups=2,
            cond_predict_scale=False,
        ),
        [
            [-0.19455, -0.16625, -0.20225, -0.23712, -0.28338, -0.33626, -0.36058, -0.37198],
            [-0.17446, -0.16204, -0.21021, -0.24947, -0.29929, -0.34805, -0.35168, -0.35808],
        ],
        [
            [0.83387, 0.81544, 0.85568, 0.88512, 0.92911, 0.97681, 0.9983, 0.99421],
            [0.81438, 0.80998, 0.8632, 0.89753, 0.94414, 0.9875, 0.99069, 0.98156],
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_matches_original_outputs(name):
    cfg, out0, out1 = GOLDEN[name]
    model = ConditionalUnet1D(input_dim=2, **cfg).eval()
    fill_deterministic(model)
    batch, horizon = 2, 8
    sample = torch.cos(0.3 * torch.arange(batch * horizon * 2, dtype=torch.float32)).reshape(batch, horizon, 2)
    kwargs = {"global_cond": torch.sin(0.7 * torch.arange(batch * 4, dtype=torch.float32)).reshape(batch, 4)}
    if "local_cond_dim" in cfg:
        local = torch.cos(0.2 * torch.arange(batch * horizon * 3, dtype=torch.float32))
        kwargs["local_cond"] = local.reshape(batch, horizon, 3)
    with torch.inference_mode():
        out = model(sample, torch.tensor([3, 40]), **kwargs)
    expected = torch.stack([torch.tensor(out0), torch.tensor(out1)], dim=-1)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(batch):
    sample, cond = inputs(batch)
    with torch.inference_mode():
        out = tiny()(sample, torch.zeros(batch, dtype=torch.long), global_cond=cond)
    assert out.shape == sample.shape
    assert out.dtype == sample.dtype
    assert not out.requires_grad


def test_timestep_forms_agree():
    model = tiny()
    sample, cond = inputs()
    with torch.inference_mode():
        ref = model(sample, torch.full((3,), 7, dtype=torch.long), global_cond=cond)
        for t in (7, 7.0, torch.tensor(7), torch.tensor([7]), torch.tensor([7.0, 7.0, 7.0])):
            torch.testing.assert_close(model(sample, t, global_cond=cond), ref, msg=f"timestep={t!r}")
        assert not torch.allclose(model(sample, 8, global_cond=cond), ref)


def test_per_sample_timesteps_and_batch_independence():
    model = tiny()
    sample, cond = inputs()
    t = torch.tensor([0, 17, 99])
    with torch.inference_mode():
        out = model(sample, t, global_cond=cond)
        for i in range(3):
            single = model(sample[i : i + 1], t[i], global_cond=cond[i : i + 1])
            torch.testing.assert_close(out[i : i + 1], single, atol=1e-5, rtol=1e-5)


def test_global_cond_changes_output():
    model = tiny()
    sample, cond = inputs()
    with torch.inference_mode():
        a = model(sample, 5, global_cond=cond)
        b = model(sample, 5, global_cond=cond + 1.0)
    assert (a - b).abs().max() > 1e-3


def test_local_cond_changes_output_and_up_encoder_is_inert():
    model = tiny(local_cond_dim=2)
    sample, cond = inputs()
    local = torch.randn(3, 8, 2)
    with torch.inference_mode():
        a = model(sample, 5, local_cond=local, global_cond=cond)
        assert (a - model(sample, 5, local_cond=local + 1.0, global_cond=cond)).abs().max() > 1e-3
        # As in the original, local_cond_encoder[1] never reaches the output.
        for p in model.local_cond_encoder[1].parameters():
            p.add_(1.0)
        torch.testing.assert_close(model(sample, 5, local_cond=local, global_cond=cond), a, rtol=0, atol=0)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_batch1_conv_path_matches_nn_conv1d(kernel_size):
    torch.manual_seed(0)
    block = Conv1dBlock(6, 8, kernel_size, n_groups=4)
    x = torch.randn(1, 6, 8)
    with torch.inference_mode():
        torch.testing.assert_close(block(x), block.block(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(block(x.expand(2, -1, -1))[:1], block(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_gradients_flow(batch):
    model = tiny().train()
    sample, cond = inputs(batch)
    model(sample, torch.arange(batch), global_cond=cond).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "sample_shape, match",
    [((8, 3), r"sample must be \(B, T, 3\)"), ((3, 8, 4), r"sample must be \(B, T, 3\)"), ((3, 7, 3), "T=7")],
)
def test_bad_sample_raises(sample_shape, match):
    with pytest.raises(ValueError, match=match):
        tiny()(torch.zeros(sample_shape), 0, global_cond=torch.zeros(3, 5))


@pytest.mark.parametrize(
    "global_cond, match",
    [
        (None, r"global_cond of shape \(3, 5\) is required"),
        (torch.zeros(3, 4), r"global_cond must have shape \(3, 5\), got \(3, 4\)"),
        (torch.zeros(2, 5), r"global_cond must have shape \(3, 5\), got \(2, 5\)"),
    ],
)
def test_bad_global_cond_raises(global_cond, match):
    with pytest.raises(ValueError, match=match):
        tiny()(torch.zeros(3, 8, 3), 0, global_cond=global_cond)


def test_unexpected_conds_raise():
    model = tiny(global_cond_dim=None)
    with pytest.raises(ValueError, match="built without global_cond_dim"):
        model(torch.zeros(3, 8, 3), 0, global_cond=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="built without local_cond_dim"):
        model(torch.zeros(3, 8, 3), 0, local_cond=torch.zeros(3, 8, 2))
    with pytest.raises(ValueError, match=r"local_cond of shape \(3, 8, 2\) is required"):
        tiny(local_cond_dim=2)(torch.zeros(3, 8, 3), 0, global_cond=torch.zeros(3, 5))


def test_bad_timestep_raises():
    with pytest.raises(ValueError, match="timestep"):
        tiny()(torch.zeros(3, 8, 3), torch.zeros(2), global_cond=torch.zeros(3, 5))
    with pytest.raises(TypeError, match="timestep"):
        tiny()(torch.zeros(3, 8, 3), "5", global_cond=torch.zeros(3, 5))


# ---------------------------------------------------------------------------------------------- keys


def lerobot_name(dp_key: str) -> str:
    """Independent, string-level statement of LeRobot's naming for a bare DiffusionPolicy UNet key."""
    key = dp_key.replace(".blocks.0.", ".conv1.").replace(".blocks.1.", ".conv2.")
    for coarse in ("down_modules", "up_modules"):
        for level in range(10):
            key = key.replace(f"{coarse}.{level}.2.conv.", f"{coarse}.{level}.2.")
    return key


def test_dp_to_lerobot_names():
    sd = ConditionalUnet1D(**EXAMPLE).state_dict()
    lr = diffusion_policy_to_lerobot_keys(sd, src_prefix="", dst_prefix="diffusion.unet.")
    assert list(lr) == ["diffusion.unet." + lerobot_name(k) for k in sd]
    assert "diffusion.unet.down_modules.0.0.conv1.block.0.weight" in lr
    assert "diffusion.unet.up_modules.0.2.weight" in lr
    assert "diffusion.unet.final_conv.0.block.0.weight" in lr
    assert not any(".blocks." in k or ".2.conv." in k for k in lr)


def test_round_trip_dp_lerobot_dp_and_unrelated_keys_untouched():
    unet = tiny(local_cond_dim=2).state_dict()
    extra = {
        "obs_encoder.blocks.0.weight": torch.ones(2),  # looks like a UNet key but is not under model.
        "normalizer.params_dict.action.scale": torch.ones(3),
    }
    dp = {**{f"model.{k}": v for k, v in unet.items()}, **extra}
    lr = diffusion_policy_to_lerobot_keys(dp)
    for key, value in extra.items():
        assert lr[key] is value
    assert sum(k.startswith("diffusion.unet.") for k in lr) == len(unet)
    back = lerobot_to_diffusion_policy_keys(lr)
    assert list(back) == list(dp)
    assert all(back[k] is dp[k] for k in dp)


def test_key_collision_raises():
    with pytest.raises(ValueError, match="collision"):
        diffusion_policy_to_lerobot_keys(
            {"model.up_modules.0.2.conv.weight": 1, "diffusion.unet.up_modules.0.2.weight": 2}
        )


def test_strict_load_of_lerobot_state_dict_gives_same_outputs():
    source = tiny(seed=0)
    lerobot_policy_sd = {
        **{"diffusion.unet." + lerobot_name(k): v.clone() for k, v in source.state_dict().items()},
        "diffusion.rgb_encoder.out.weight": torch.zeros(1),
    }
    converted = lerobot_to_diffusion_policy_keys(lerobot_policy_sd, dst_prefix="")
    unet_sd = {k: v for k, v in converted.items() if not k.startswith("diffusion.")}
    target = tiny(seed=123)
    target.load_state_dict(unet_sd, strict=True)
    sample, cond = inputs()
    with torch.inference_mode():
        torch.testing.assert_close(
            target(sample, 9, global_cond=cond), source(sample, 9, global_cond=cond), rtol=0, atol=0
        )
