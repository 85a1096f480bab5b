"""LeRobot 0.6.1 diffusion directories read without LeRobot, checked against LeRobot's own recording.

The fixture ``lerobot_diffusion_A`` and its recording were written by LeRobot 0.6.1 (see
``shared/fixtures/README.md``); the older buffers layout is built here from its statistics.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from para_policy.integrations.lerobot_checkpoint import read_lerobot_directory
from para_policy.models.lerobot_vision import LeRobotObsEncoder
from para_policy.models.unet1d import ConditionalUnet1D
from para_policy.normalizer import normalize_values
from para_policy.schedule import build_scheduler, make_schedule

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
DIRECTORY = FIXTURES / "lerobot_diffusion_A"
RECORDING = FIXTURES / "lerobot_diffusion_A_predict.pt"
NEEDED = [DIRECTORY / name for name in (
    "config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json",
    "policy_preprocessor_step_3_normalizer_processor.safetensors",
    "policy_postprocessor_step_0_unnormalizer_processor.safetensors")] + [RECORDING]
MISSING = [str(p) for p in NEEDED if not p.is_file()]

pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"LeRobot fixtures not available: missing {MISSING}")


@pytest.fixture(scope="module")
def recording() -> dict[str, torch.Tensor]:
    return torch.load(RECORDING, weights_only=True)


@pytest.fixture(scope="module")
def converted() -> tuple[dict[str, torch.Tensor], dict]:
    return read_lerobot_directory(DIRECTORY)


def _sub(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _stats(state_dict: dict[str, torch.Tensor], field: str) -> dict[str, torch.Tensor]:
    return _sub(state_dict, f"normalizer.params_dict.{field}.input_stats.")


def test_config(converted):
    _, config = converted
    json.dumps(config)  # JSON-serialisable
    assert config["obs_dim"] == 2 + 64 and config["model"]["global_cond_dim"] == 132
    assert config["num_inference_steps"] == 100  # null in config.json → num_train_timesteps
    assert list(config["obs_keys"]) == ["observation.state", "observation.image"]
    assert config["normalizer"]["observation_image"] == {"shape": [3, 1, 1], "mode": "mean_std", "eps": 1e-8}
    assert config["normalizer"]["action"]["mode"] == "min_max"
    assert config["source"]["version_layout"] == "processors"
    assert config["noise_scheduler"]["_target_"].endswith("DDPMScheduler")


def test_encoder_reproduces_features(converted, recording):
    state_dict, config = converted
    spec = config["obs_encoder"]
    encoder = LeRobotObsEncoder(**{k: v for k, v in spec.items() if k != "kind"})
    assert encoder.spec == spec and encoder.feature_dim == config["obs_dim"]
    encoder.load_state_dict(_sub(state_dict, "obs_encoder."), strict=True)
    encoder.eval()
    B, To = recording["chunk.pre.observation.state"].shape[:2]
    nobs = {"observation.image": recording["chunk.pre.observation.image"].reshape(B * To, 3, 96, 96),
            "observation.state": recording["chunk.pre.observation.state"].reshape(B * To, 2)}
    with torch.no_grad():
        features = encoder(nobs)
    torch.testing.assert_close(features[:, 2:], recording["chunk.rgb_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(features.reshape(B, To * encoder.feature_dim), recording["chunk.global_cond"],
                               atol=1e-5, rtol=0)


def test_normalize_reproduces_processors(converted, recording):
    state_dict, config = converted
    for key in ("observation.image", "observation.state"):
        field = config["normalizer_fields"][key]
        entry = config["normalizer"][field]
        pre = recording[f"chunk.pre.{key}"]
        ours = normalize_values(recording[f"chunk.raw.{key}"], entry["mode"], _stats(state_dict, field), entry["eps"])
        torch.testing.assert_close(ours, pre, atol=1e-6 * float(pre.abs().max()), rtol=0)
        # the affine form agrees up to rounding
        prefix = f"normalizer.params_dict.{field}."
        affine = recording[f"chunk.raw.{key}"] * state_dict[prefix + "scale"] + state_dict[prefix + "offset"]
        torch.testing.assert_close(affine, pre, atol=1e-5 * float(pre.abs().max()), rtol=0)
    entry = config["normalizer"]["action"]
    for name in ("ddpm", "ddim16"):
        action = normalize_values(recording[f"chunk.{name}.action_normalized"], entry["mode"],
                                  _stats(state_dict, "action"), entry["eps"], inverse=True)
        torch.testing.assert_close(action, recording[f"chunk.{name}.action"], atol=1e-4, rtol=0)


def test_unet_reproduces_probe(converted, recording):
    state_dict, config = converted
    unet = ConditionalUnet1D(**config["model"])
    unet.load_state_dict(_sub(state_dict, "model."), strict=True)
    unet.eval()
    with torch.no_grad():
        out = unet(recording["chunk.noise"], torch.full((2,), 57), global_cond=recording["chunk.global_cond"])
    torch.testing.assert_close(out, recording["unet_probe.output"], atol=1e-5, rtol=0)


def test_ddim_directory_reproduces_chunk(tmp_path, recording):
    """noise_scheduler_type DDIM, 16 steps: the recording's ``chunk.ddim16`` (LeRobot built the same scheduler)."""
    state_dict, config = read_lerobot_directory(_copy_config(tmp_path, noise_scheduler_type="DDIM",
                                                             num_inference_steps=16))
    assert config["noise_scheduler"]["_target_"].endswith("DDIMScheduler") and config["num_inference_steps"] == 16
    encoder = LeRobotObsEncoder(**{k: v for k, v in config["obs_encoder"].items() if k != "kind"})
    encoder.load_state_dict(_sub(state_dict, "obs_encoder."), strict=True)
    unet = ConditionalUnet1D(**config["model"])
    unet.load_state_dict(_sub(state_dict, "model."), strict=True)
    encoder.eval()
    unet.eval()
    nobs = {"observation.image": recording["chunk.pre.observation.image"].reshape(4, 3, 96, 96),
            "observation.state": recording["chunk.pre.observation.state"].reshape(4, 2)}
    schedule = make_schedule(build_scheduler(config["noise_scheduler"]), config["num_inference_steps"])
    assert torch.equal(schedule.timesteps, recording["ddim16.timesteps"])
    x = recording["chunk.noise"]
    with torch.no_grad():
        global_cond = encoder(nobs).reshape(2, -1)
        for k in range(schedule.num_steps):
            out = unet(x, torch.full((2,), int(schedule.timesteps[k])), global_cond=global_cond)
            x = schedule.step_mean(x, torch.full((2,), k), out)  # eta 0: no noise
    start = config["n_obs_steps"] - 1
    action = x[:, start: start + config["n_action_steps"]]
    torch.testing.assert_close(action, recording["chunk.ddim16.action_normalized"], atol=1e-5, rtol=0)


def _copy_config(tmp_path: Path, **changes) -> Path:
    """A directory with the fixture's files (linked) and a config.json edited by ``changes`` (None deletes)."""
    target = tmp_path / "policy"
    target.mkdir(parents=True)
    for source in DIRECTORY.iterdir():
        if source.name != "config.json":
            (target / source.name).symlink_to(source)
    config = json.loads((DIRECTORY / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_older_buffers_layout(tmp_path, converted):
    """LeRobot <= 0.3: statistics as Normalize buffers in model.safetensors, no processor files."""
    state_dict, config = converted
    target = tmp_path / "old"
    target.mkdir()
    shutil.copy(DIRECTORY / "config.json", target / "config.json")
    tensors = load_file(str(DIRECTORY / "model.safetensors"))
    stats = load_file(str(DIRECTORY / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    buffers = {
        "normalize_inputs.buffer_observation_image.mean": stats["observation.image.mean"],
        "normalize_inputs.buffer_observation_image.std": stats["observation.image.std"],
        "normalize_inputs.buffer_observation_state.min": stats["observation.state.min"],
        "normalize_inputs.buffer_observation_state.max": stats["observation.state.max"],
    }
    for module in ("normalize_targets", "unnormalize_outputs"):
        buffers[f"{module}.buffer_action.min"] = stats["action.min"]
        buffers[f"{module}.buffer_action.max"] = stats["action.max"]
    save_file({**tensors, **{k: v.clone() for k, v in buffers.items()}}, str(target / "model.safetensors"))

    old_state, old_config = read_lerobot_directory(target)
    assert old_config["source"]["version_layout"] == "buffers"
    # LeRobot <= 0.3 adds eps to every min-max range: the same fields, its own min-max formula
    renamed = {f: {**e, "mode": e["mode"].replace("min_max_eps", "min_max")}
               for f, e in old_config["normalizer"].items()}
    assert renamed == config["normalizer"]
    assert old_config["normalizer"]["observation_state"]["mode"] == "min_max_eps"
    assert old_config["obs_encoder"] == config["obs_encoder"] and old_config["model"] == config["model"]
    for name in buffers:
        key = name.split(".", 1)[1].removeprefix("buffer_")
        field, stat = key.rsplit(".", 1)
        assert torch.equal(old_state[f"normalizer.params_dict.{field}.input_stats.{stat}"],
                           state_dict[f"normalizer.params_dict.{field}.input_stats.{stat}"])
    assert set(old_state) == set(state_dict)
    for key in state_dict:
        if not key.startswith("normalizer."):
            assert torch.equal(old_state[key], state_dict[key])
    # the older MIN_MAX formula adds eps to the range: equal to the newer one to float rounding here
    raw = torch.tensor([[100.0, 200.0]])
    new = normalize_values(raw, "min_max", _stats(state_dict, "observation_state"))
    old = normalize_values(raw, "min_max_eps", _stats(old_state, "observation_state"))
    stats = _stats(old_state, "observation_state")
    torch.testing.assert_close(old, (raw - stats["min"]) / (stats["max"] - stats["min"] + 1e-8) * 2 - 1, atol=0, rtol=0)
    torch.testing.assert_close(old, new, atol=1e-6, rtol=0)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="horizon"):
        read_lerobot_directory(_copy_config(tmp_path / "a", horizon=None))
    with pytest.raises(ValueError, match="'act'"):
        read_lerobot_directory(_copy_config(tmp_path / "b", type="act"))
    with pytest.raises(ValueError, match="noise_scheduler_type"):
        read_lerobot_directory(_copy_config(tmp_path / "c", noise_scheduler_type="DPMSolver"))
    with pytest.raises(ValueError, match="resnet34"):
        read_lerobot_directory(_copy_config(tmp_path / "d", vision_backbone="resnet34"))
    with pytest.raises(ValueError, match="prediction_type"):
        read_lerobot_directory(_copy_config(tmp_path / "e", prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="does not match"):  # config disagrees with the weights
        read_lerobot_directory(_copy_config(tmp_path / "f", spatial_softmax_num_keypoints=16))
    with pytest.raises(FileNotFoundError):
        read_lerobot_directory(tmp_path / "nowhere")


def test_processor_errors(tmp_path):
    target = _copy_config(tmp_path / "a")
    pre = json.loads((DIRECTORY / "policy_preprocessor.json").read_text())
    pre["steps"][3]["config"]["norm_map"]["STATE"] = "QUANTILES"
    (target / "policy_preprocessor.json").unlink()
    (target / "policy_preprocessor.json").write_text(json.dumps(pre))
    with pytest.raises(ValueError, match="QUANTILES"):
        read_lerobot_directory(target)
    target = _copy_config(tmp_path / "b")
    (target / "policy_postprocessor.json").unlink()
    with pytest.raises(FileNotFoundError, match="policy_postprocessor.json"):
        read_lerobot_directory(target)


def test_unknown_tensor_is_refused(tmp_path):
    target = _copy_config(tmp_path)
    (target / "model.safetensors").unlink()
    tensors = load_file(str(DIRECTORY / "model.safetensors"))
    tensors["diffusion.extra_head.weight"] = torch.zeros(3)
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(ValueError, match="diffusion.extra_head.weight"):
        read_lerobot_directory(target)


def test_encoder_input_errors(converted):
    _, config = converted
    encoder = LeRobotObsEncoder(**{k: v for k, v in config["obs_encoder"].items() if k != "kind"}).eval()
    good = {"observation.image": torch.zeros(2, 3, 96, 96), "observation.state": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="observation.state"):
        encoder({"observation.image": good["observation.image"]})
    with pytest.raises(ValueError, match="uint8"):
        encoder({**good, "observation.image": torch.zeros(2, 3, 96, 96, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="shape"):
        encoder({**good, "observation.image": torch.zeros(2, 3, 84, 84)})
    kwargs = {k: v for k, v in config["obs_encoder"].items() if k != "kind"}
    with pytest.raises(ValueError, match="resnet34"):
        LeRobotObsEncoder(**{**kwargs, "vision_backbone": "resnet34"})
    with pytest.raises(ValueError, match="pretrained"):
        LeRobotObsEncoder(**{**kwargs, "pretrained_backbone_weights": "ResNet18_Weights.IMAGENET1K_V1"})


def test_shared_encoder_batches_cameras():
    """A shared encoder sees every camera; features are concatenated per row in camera order."""
    torch.manual_seed(0)
    kwargs = dict(image_keys=["observation.images.a", "observation.images.b"], image_shape=[3, 40, 40],
                  state_key="observation.state", state_dim=3, crop_shape=[32, 32], crop_is_random=True,
                  use_group_norm=False, spatial_softmax_num_keypoints=4, separate_per_camera=False)
    encoder = LeRobotObsEncoder(**kwargs).eval()
    assert "rgb_encoder.backbone.1.running_mean" in encoder.state_dict()  # BatchNorm without group norm
    nobs = {"observation.images.a": torch.randn(5, 3, 40, 40), "observation.images.b": torch.randn(5, 3, 40, 40),
            "observation.state": torch.randn(5, 3)}
    with torch.no_grad():
        out = encoder(nobs)
        a = encoder.rgb_encoder(nobs["observation.images.a"])
        b = encoder.rgb_encoder(nobs["observation.images.b"])
    assert out.shape == (5, encoder.feature_dim) == (5, 3 + 2 * 8)
    torch.testing.assert_close(out, torch.cat([nobs["observation.state"], a, b], dim=1))
    rebuilt = LeRobotObsEncoder(**{k: v for k, v in encoder.spec.items() if k != "kind"})
    assert rebuilt.spec == encoder.spec
