"""PolicyConfig: the one place a policy config is checked; from_dict / to_dict round trip."""

from __future__ import annotations

import json

import pytest
from test_policy import tiny_config

from para_policy import LowdimPolicy, PolicyConfig


def image_policy_config() -> dict:
    """An image policy's config (the encoder spec is not built here: PolicyConfig checks the config only)."""
    obs = {"image": {"shape": [3, 96, 96], "type": "rgb"}, "agent_pos": {"shape": [2], "type": "low_dim"}}
    model = {"input_dim": 2, "global_cond_dim": 2 * 514, "down_dims": [16, 32], "kernel_size": 3, "n_groups": 4}
    return {**tiny_config(), "horizon": 16, "n_action_steps": 8, "obs_dim": 514, "model": model,
            "obs_keys": obs, "obs_encoder": {"kind": "dp_multi_image", "shape_meta": {"obs": obs}},
            "normalizer": {"image": {"shape": [1]}, "agent_pos": {"shape": [2]}, "action": {"shape": [2]}}}


def test_round_trip_and_defaults():
    config = PolicyConfig.from_dict(tiny_config())
    assert config.model_type == "unet" and config.pred_action_steps_only is False and not config.is_image
    data = config.to_dict()
    json.dumps(data)  # what checkpoints store
    assert PolicyConfig.from_dict(data) == config
    assert {k: data[k] for k in tiny_config()} == tiny_config()  # nothing given is changed
    assert "obs_keys" not in data and "source" not in data  # unset optional fields are left out
    image = PolicyConfig.from_dict(image_policy_config())
    assert image.is_image and PolicyConfig.from_dict(image.to_dict()) == image
    assert image.observation_spec() == {"image": ((3, 96, 96), "rgb"), "agent_pos": ((2,), "low_dim")}


def test_checkpoint_envelope_and_resolved_steps():
    data = {**tiny_config(), "kind": "para_policy.lowdim_diffusion_policy", "version": 1, "num_inference_steps": None}
    config = PolicyConfig.from_dict(data)
    assert config.num_inference_steps == 100  # the scheduler's num_train_timesteps
    assert "kind" not in config.to_dict() and "version" not in config.to_dict()
    assert PolicyConfig.coerce(config) is config
    assert LowdimPolicy(config).config == LowdimPolicy(config.to_dict()).config == config.to_dict()


def test_given_mappings_are_copied():
    data = tiny_config()
    config = PolicyConfig.from_dict(data)
    data["model"]["down_dims"].append(64)
    assert config.model["down_dims"] == [16, 32]
    with pytest.raises(AttributeError):
        config.horizon = 4  # frozen: every value was checked once


@pytest.mark.parametrize("change, message", [
    ({"horizon": 0}, "horizon must be an integer >= 1"),
    ({"obs_dim": 2.5}, "obs_dim must be an integer >= 1"),
    ({"n_obs_steps": True}, "n_obs_steps must be an integer >= 1"),
    ({"obs_as_global_cond": "false"}, "obs_as_global_cond must be true or false"),
    ({"model": None}, "model must be a mapping"),
    ({"n_action_steps": 9}, "horizon=8 is too short"),
    ({"obs_as_local_cond": True}, "obs_as_local_cond=True policies are not supported"),
    ({"pred_action_steps_only": True, "obs_as_global_cond": False}, "requires obs_as_global_cond"),
    ({"model_type": "rnn"}, "model_type must be 'unet' or 'transformer'"),
    ({"task": 3}, "task must be a task name"),
    ({"training": [1]}, "training must be a mapping"),
])
def test_invalid_fields_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        PolicyConfig.from_dict({**tiny_config(), **change})


def test_model_arguments_must_fit_the_shapes():
    config = tiny_config()
    with pytest.raises(ValueError, match="model.input_dim is 7, expected 2"):
        PolicyConfig.from_dict({**config, "model": {**config["model"], "input_dim": 7}})
    with pytest.raises(ValueError, match="model.global_cond_dim is 3, expected 10"):
        PolicyConfig.from_dict({**config, "model": {**config["model"], "global_cond_dim": 3}})
    with pytest.raises(ValueError, match="model.cond_dim is None, expected 5"):
        PolicyConfig.from_dict({**config, "model_type": "transformer"})


@pytest.mark.parametrize("change, message", [
    ({"normalizer": None}, r"image policy config is missing \['normalizer'\]"),
    ({"obs_keys": {}}, "obs_keys must be a non-empty mapping"),
    ({"obs_keys": {"image": {"shape": [3, 96, 96], "type": "depth"}}}, "type must be 'rgb' or 'low_dim'"),
    ({"obs_keys": {"image": {"type": "rgb"}}}, r"obs_keys\['image'\] must be"),
    ({"normalizer_fields": {"agent_pos": "state"}}, r"normalizer config has no field for \['state'\]"),
    ({"pred_action_steps_only": True}, "not supported for image policies"),
])
def test_invalid_image_fields(change, message):
    with pytest.raises(ValueError, match=message):
        PolicyConfig.from_dict({**image_policy_config(), **change})


def test_missing_and_unknown_keys_are_refused():
    config = tiny_config()
    del config["horizon"]
    with pytest.raises(ValueError, match=r"missing \['horizon'\]"):
        PolicyConfig.from_dict(config)
    with pytest.raises(ValueError, match=r"unknown keys \['horizn', 'sampler'\]; known keys: \['action_dim'"):
        PolicyConfig.from_dict({**tiny_config(), "horizn": 8, "sampler": "paradigms"})
    with pytest.raises(ValueError, match="must be a mapping, got list"):
        PolicyConfig.from_dict([1, 2])
