"""The observation encoders written here reproduce DiffusionPolicy's (the recorded fixtures): DP's
MultiImageObsEncoder (image policy) and the robomimic ObservationEncoder of its hybrid policy load the
checkpoints' ``obs_encoder.*`` weights strictly and give the recorded features; specs rebuild them; resize,
shared-model and crop paths agree with independent computations; bad inputs are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from para_policy.models.vision import (
    MultiImageObsEncoder,
    RobomimicObsEncoder,
    build_obs_encoder,
    multi_image_encoder_from_dp,
    robomimic_encoder_from_dp,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
ATOL = 1e-5


def _load_fixture(name: str):
    ckpt = FIXTURES / f"{name}.ckpt"
    if not ckpt.is_file():
        pytest.skip(f"{ckpt} is absent (the shared fixtures sit beside the checkout)")
    pytest.importorskip("omegaconf", reason="unpickling a DP checkpoint needs omegaconf")
    from omegaconf import OmegaConf

    from para_policy.integrations import restricted_pickle

    payload = torch.load(ckpt, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    policy_cfg = OmegaConf.to_container(payload["cfg"].policy, resolve=True)
    weights = {k[len("obs_encoder."):]: v for k, v in payload["state_dicts"]["model"].items()
               if k.startswith("obs_encoder.")}
    recorded = torch.load(FIXTURES / f"{name}_predict.pt", weights_only=True)
    # The policy flattens (B, To, ...) to (B*To, ...) b-major before its encoder.
    nobs = {key: recorded[f"nobs.{key}"].flatten(0, 1) for key in ("image", "agent_pos")}
    return policy_cfg, weights, recorded, nobs


@pytest.fixture(scope="module")
def dp_image():
    cfg, weights, recorded, nobs = _load_fixture("dp_image_A")
    encoder = multi_image_encoder_from_dp(cfg["obs_encoder"], cfg["shape_meta"])
    encoder.load_state_dict(weights, strict=True)
    return encoder.eval(), cfg, weights, recorded, nobs


@pytest.fixture(scope="module")
def dp_hybrid():
    cfg, weights, recorded, nobs = _load_fixture("dp_hybrid_A")
    encoder = robomimic_encoder_from_dp(cfg, cfg["shape_meta"])
    encoder.load_state_dict(weights, strict=True)
    return encoder.eval(), cfg, weights, recorded, nobs


# ---- the recorded DP fixtures ---------------------------------------------------------------------------------------


def test_multi_image_encoder_reproduces_dp_image_policy(dp_image):
    encoder, _, weights, rec, nobs = dp_image
    assert list(encoder.state_dict()) == list(weights)  # every obs_encoder.* key, _dummy_variable included
    assert encoder.feature_dim == 514 and encoder.obs_keys == ["image", "agent_pos"]
    with torch.no_grad():
        transformed = encoder.transform("image", nobs["image"])
        features = encoder(nobs)
    torch.testing.assert_close(transformed, rec["image_after_transform"], rtol=0, atol=ATOL)
    torch.testing.assert_close(features, rec["obs_encoder_features"], rtol=0, atol=ATOL)


def test_robomimic_encoder_reproduces_dp_hybrid_policy(dp_hybrid):
    encoder, _, weights, rec, nobs = dp_hybrid
    assert list(encoder.state_dict()) == list(weights)
    assert encoder.feature_dim == 66 and encoder.obs_keys == ["image", "agent_pos"]
    with torch.no_grad():
        cropped = encoder.crop("image", nobs["image"])
        net_out = encoder.obs_nets["image"](cropped)
        image_feature = encoder.rgb_feature("image", nobs["image"])
        features = encoder(nobs)
    torch.testing.assert_close(cropped, rec["image_after_crop"], rtol=0, atol=ATOL)
    torch.testing.assert_close(net_out, rec["image_feature_net_out"], rtol=0, atol=ATOL)
    torch.testing.assert_close(image_feature, rec["image_feature"], rtol=0, atol=ATOL)
    torch.testing.assert_close(features, rec["obs_encoder_features"], rtol=0, atol=ATOL)


def test_visual_core_registers_robomimic_aliases(dp_hybrid):
    encoder, _, weights, _, _ = dp_hybrid
    core = encoder.obs_nets["image"]
    assert core.backbone is core.nets[0] and core.pool is core.nets[1]
    sd = encoder.state_dict()
    assert sd["obs_nets.image.pool.pos_x"].shape == (1, 9)  # 76x76 crop → 3x3 feature map
    for key in weights:
        if ".backbone." in key or ".pool." in key:
            alias = key.replace(".backbone.", ".nets.0.").replace(".pool.", ".nets.1.")
            assert sd[key].data_ptr() == sd[alias].data_ptr()
            torch.testing.assert_close(weights[key], weights[alias], rtol=0, atol=0)


def test_specs_rebuild_the_fixture_encoders(dp_image, dp_hybrid):
    for encoder, *_ in (dp_image, dp_hybrid):
        spec = json.loads(json.dumps(encoder.spec))
        rebuilt = build_obs_encoder(spec)
        assert type(rebuilt) is type(encoder) and rebuilt.spec == encoder.spec
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
               {k: v.shape for k, v in encoder.state_dict().items()}
        assert rebuilt.feature_dim == encoder.feature_dim


def test_from_dp_refuses_what_is_not_implemented(dp_image, dp_hybrid):
    _, cfg, *_ = dp_image
    enc_cfg, shape_meta = cfg["obs_encoder"], cfg["shape_meta"]
    bad = [
        ({**enc_cfg, "rgb_model": {**enc_cfg["rgb_model"], "name": "resnet50"}}, "resnet50"),
        ({**enc_cfg, "rgb_model": {**enc_cfg["rgb_model"], "weights": "r3m"}}, "r3m"),
        ({**enc_cfg, "_target_": "my.Encoder"}, "my.Encoder"),
        ({**enc_cfg, "frozen": True}, "frozen"),
        ({**enc_cfg, "random_crop": "yes"}, "random_crop"),
    ]
    for enc_cfg_bad, match in bad:
        with pytest.raises(ValueError, match=match):
            multi_image_encoder_from_dp(enc_cfg_bad, shape_meta)
    # torchvision weights only initialise the network the checkpoint holds trained: accepted
    pretrained = {**enc_cfg, "rgb_model": {**enc_cfg["rgb_model"], "weights": "IMAGENET1K_V1"}}
    assert multi_image_encoder_from_dp(pretrained, shape_meta).feature_dim == 514
    _, hybrid_cfg, *_ = dp_hybrid
    with pytest.raises(ValueError, match="_target_"):
        robomimic_encoder_from_dp({**hybrid_cfg, "_target_": "diffusion_policy.policy.Other"}, shape_meta)
    with pytest.raises(ValueError, match="smaller"):
        robomimic_encoder_from_dp({**hybrid_cfg, "crop_shape": [96, 96]}, shape_meta)


# ---- tiny random encoders checked against independent computations ---------------------------------------------------

TINY_META = {"obs": {"cam_b": {"shape": [3, 32, 32], "type": "rgb"}, "state": {"shape": [3], "type": "low_dim"},
                     "cam_a": {"shape": [3, 32, 32], "type": "rgb"}}}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _tiny_obs(n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"cam_a": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
            "cam_b": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
            "state": torch.randn(n, 3, generator=g)}


def test_resize_crop_normalize_match_direct_ops():
    torch.manual_seed(0)
    encoder = MultiImageObsEncoder(TINY_META, resize_shape=[24, 24], crop_shape=[20, 18], use_group_norm=True,
                                   imagenet_norm=True).eval()
    obs = _tiny_obs()
    resized = F.interpolate(obs["cam_a"], size=(24, 24), mode="bilinear", align_corners=False, antialias=True)
    expected = (resized[..., 2:22, 3:21] - MEAN) / STD  # torchvision CenterCrop: round((24 - 20) / 2), round(6 / 2)
    torch.testing.assert_close(encoder.transform("cam_a", obs["cam_a"]), expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        features = encoder(obs)
        parts = [encoder.key_model_map[k](encoder.transform(k, obs[k])) for k in ("cam_a", "cam_b")]
    assert encoder.obs_keys == ["cam_a", "cam_b", "state"] and features.shape == (2, encoder.feature_dim) == (2, 1027)
    torch.testing.assert_close(features, torch.cat([*parts, obs["state"]], dim=-1), rtol=0, atol=0)


def test_shared_rgb_model_matches_per_camera_models_with_its_weights():
    torch.manual_seed(0)
    shared = MultiImageObsEncoder(TINY_META, crop_shape=[28, 28], share_rgb_model=True, use_group_norm=True).eval()
    # DP's quirk: the shared model is not converted to GroupNorm.
    assert "key_model_map.rgb.bn1.running_mean" in shared.state_dict()
    per_camera = MultiImageObsEncoder(TINY_META, crop_shape=[28, 28], use_group_norm=False).eval()
    for key in ("cam_a", "cam_b"):
        per_camera.key_model_map[key].load_state_dict(shared.key_model_map["rgb"].state_dict())
    obs = _tiny_obs()
    with torch.no_grad():
        torch.testing.assert_close(shared(obs), per_camera(obs), rtol=0, atol=1e-5)


def test_random_crop_false_disables_cropping_as_in_dp():
    encoder = MultiImageObsEncoder(TINY_META, crop_shape=[20, 20], random_crop=False)
    images = _tiny_obs()["cam_a"]
    for mode in (True, False):
        torch.testing.assert_close(encoder.train(mode).transform("cam_a", images), images, rtol=0, atol=0)


def _dp_crops(images: torch.Tensor, height: int, width: int, seed: int) -> torch.Tensor:
    """DP's CropRandomizer training crop, from its formula: tops then lefts, ``(max * rand(N, 1)).long()``."""
    torch.manual_seed(seed)
    n, _, h, w = images.shape
    tops = ((h - height) * torch.rand(n, 1)).long()[:, 0]
    lefts = ((w - width) * torch.rand(n, 1)).long()[:, 0]
    return torch.stack([images[i, :, tops[i]: tops[i] + height, lefts[i]: lefts[i] + width] for i in range(n)])


def test_training_crops_follow_dps_sampler():
    images = torch.randn(8, 3, 32, 32)
    encoder = MultiImageObsEncoder(TINY_META, crop_shape=[20, 24]).train()
    torch.manual_seed(5)
    torch.testing.assert_close(encoder.transform("cam_a", images), _dp_crops(images, 20, 24, seed=5), rtol=0, atol=0)
    fixed = RobomimicObsEncoder(TINY_META, crop_shape=[20, 24], eval_fixed_crop=True)
    robomimic_crop = RobomimicObsEncoder(TINY_META, crop_shape=[20, 24], eval_fixed_crop=False).eval()
    for encoder in (fixed.train(), robomimic_crop):  # robomimic's own CropRandomizer crops at random in eval too
        torch.manual_seed(5)
        torch.testing.assert_close(encoder.crop("cam_a", images), _dp_crops(images, 20, 24, seed=5), rtol=0, atol=0)
    torch.testing.assert_close(fixed.eval().crop("cam_a", images), images[..., 6:26, 4:28], rtol=0, atol=0)


def test_robomimic_encoder_keeps_shape_meta_order_and_sizes_its_keypoint_grid():
    meta = {"obs": {"state": {"shape": [3], "type": "low_dim"}, "cam_b": {"shape": [4, 48, 40], "type": "rgb"},
                    "grid": {"shape": [2, 2], "type": "low_dim"}}}
    torch.manual_seed(0)
    encoder = RobomimicObsEncoder(meta, crop_shape=None, use_group_norm=True).eval()
    assert encoder.obs_keys == ["state", "cam_b", "grid"] and encoder.feature_dim == 3 + 64 + 4
    assert encoder.obs_nets["cam_b"].pool.pos_x.shape == (1, 2 * 2)  # ceil(48/32) x ceil(40/32)
    assert encoder.obs_nets["cam_b"].backbone.nets[0].weight.shape == (64, 4, 7, 7)  # robomimic's input_channel
    obs = {"state": torch.randn(2, 3), "cam_b": torch.randn(2, 4, 48, 40), "grid": torch.randn(2, 2, 2)}
    with torch.no_grad():
        features = encoder(obs)
        image = torch.relu(encoder.obs_nets["cam_b"](obs["cam_b"]))
    torch.testing.assert_close(features, torch.cat([obs["state"], image, obs["grid"].flatten(1)], -1), rtol=0, atol=0)
    rebuilt = build_obs_encoder(json.loads(json.dumps(encoder.spec)))
    assert list(rebuilt.state_dict()) == list(encoder.state_dict())


@pytest.mark.parametrize("kind", ["dp_multi_image", "robomimic"])
def test_bad_inputs_are_refused_by_name(kind):
    args = {"shape_meta": TINY_META, "crop_shape": [28, 28]}
    encoder = build_obs_encoder({"kind": kind, **args})
    obs = _tiny_obs()
    with pytest.raises(ValueError, match="'cam_b' is missing"):
        encoder({k: v for k, v in obs.items() if k != "cam_b"})
    with pytest.raises(ValueError, match=r"obs\['cam_a'\] has shape \[2, 3, 30, 32\]; expected \(N, 3, 32, 32\)"):
        encoder({**obs, "cam_a": obs["cam_a"][..., :30, :]})
    with pytest.raises(ValueError, match=r"obs\['cam_a'\] is torch.uint8; expected float images normalized"):
        encoder({**obs, "cam_a": (obs["cam_a"] > 0).to(torch.uint8)})
    with pytest.raises(ValueError, match="batch size"):
        encoder({**obs, "state": obs["state"][:1]})


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="unknown obs encoder kind"):
        build_obs_encoder({"kind": "vit"})
    with pytest.raises(ValueError, match="type 'depth'"):
        MultiImageObsEncoder({"obs": {"d": {"shape": [1, 8, 8], "type": "depth"}}})
    with pytest.raises(ValueError, match="smaller"):
        MultiImageObsEncoder(TINY_META, crop_shape=[32, 32])
    with pytest.raises(ValueError, match="lacks"):
        MultiImageObsEncoder(TINY_META, crop_shape={"cam_a": [20, 20]})
