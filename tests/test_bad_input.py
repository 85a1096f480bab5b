"""Bad input gets a clear error: policy configs, observations, non-finite values, the Controller, eval keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_eval import ckpt, run_eval  # noqa: F401  (fixture)
from test_policy import ACT_DIM, OBS_DIM, TO, tiny_config, tiny_policy

from para_policy import Controller, LinearNormalizer, LowdimPolicy
from para_policy.evaluation import EvalConfigError


@pytest.mark.parametrize("change, message", [
    ({"horizon": -1}, "horizon must be an integer >= 1"),
    ({"n_action_steps": 0}, "n_action_steps must be an integer >= 1"),
    ({"n_action_steps": 32}, "horizon=.* is too short"),
    ({"obs_dim": "20"}, "obs_dim must be an integer >= 1"),
    ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1"),
    ({"model": [1, 2]}, "model must be a mapping"),
    ({"noise_scheduler": "ddpm"}, "noise_scheduler must be a mapping"),
])
def test_policy_config_invariants_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        LowdimPolicy({**tiny_config(), **change})


def test_observations_are_checked_before_sampling():
    policy = tiny_policy().set_sampler("sequential", num_inference_steps=4)
    with pytest.raises(ValueError, match="B >= 1"):
        policy.predict_action({"obs": torch.zeros(0, TO, OBS_DIM)})
    with pytest.raises(ValueError, match="mapping with key 'obs'"):
        policy.predict_action(torch.zeros(1, TO, OBS_DIM))
    for dtype in (torch.bool, torch.complex64):
        with pytest.raises(ValueError, match="real numbers"):
            policy.predict_action({"obs": torch.zeros(1, TO, OBS_DIM, dtype=dtype)})
    assert policy.predict_action({"obs": torch.zeros(1, TO, OBS_DIM, dtype=torch.int64)})["action"].dtype == \
        torch.float32


def test_finite_observations_that_overflow_the_network_raise_instead_of_returning_nan():
    policy = tiny_policy().set_sampler("sequential", num_inference_steps=4)
    with pytest.raises(ValueError, match="non-finite"):
        policy.predict_action({"obs": torch.full((1, TO, OBS_DIM), 1e30)})


def test_normalizer_refuses_non_finite_or_empty_data():
    norm = LinearNormalizer({"x": 2})
    data = np.zeros((5, 2))
    data[3, 1] = np.inf
    with pytest.raises(ValueError, match="row 3, dimension 1"):
        norm.fit({"x": data})
    with pytest.raises(ValueError, match="no data"):
        norm.fit({"x": np.zeros((0, 2))})


def test_controller_refuses_nan_observations_without_corrupting_its_history():
    policy = tiny_policy()
    ctl = Controller(policy, sampler="sequential", num_inference_steps=4, seed=0, max_records=3)
    obs = np.full(OBS_DIM, 100.0, dtype=np.float32)
    bad = obs.copy()
    bad[0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        ctl.act(bad)  # at a chunk boundary
    ctl.act(obs)
    with pytest.raises(ValueError, match="NaN or inf"):
        ctl.act(bad)  # mid-chunk
    actions = [ctl.act(obs) for _ in range(12)]  # the next valid calls work
    assert all(a.shape == (ACT_DIM,) and np.isfinite(a).all() for a in actions)
    assert len(ctl.records) == 3 and len(ctl.act_latency_ms) == 3  # bounded
    with pytest.raises(ValueError, match="max_records"):
        Controller(policy, max_records=0)
    with pytest.raises(ValueError, match="deadline_ms must be a number"):
        Controller(policy, deadline_ms="abc")


def test_unknown_eval_keys_are_refused(ckpt, tmp_path):  # noqa: F811
    with pytest.raises(EvalConfigError, match=r"unknown config keys \['foo'\]"):
        run_eval(ckpt, tmp_path, "+foo=1")
    with pytest.raises(EvalConfigError, match="checkpoint_trust must be true or false"):
        run_eval(ckpt, tmp_path, "checkpoint_trust=maybe")
    with pytest.raises(EvalConfigError, match="inference must be a mapping"):
        run_eval(ckpt, tmp_path, "+inference=[1,2]")


def test_checkpoint_metadata_is_checked_against_its_weights_before_allocating(tmp_path, monkeypatch):
    import para_policy.policy as policy_module
    from para_policy import load_policy, save_checkpoint

    built_on = []
    real = policy_module.ConditionalUnet1D

    def spy(**kwargs):
        built_on.append(torch.empty(0).device.type)  # the default device the network is built on
        return real(**kwargs)

    monkeypatch.setattr(policy_module, "ConditionalUnet1D", spy)
    policy = tiny_policy()
    built_on.clear()
    huge = {**policy.config, "model": {**policy.config["model"], "down_dims": [4000, 4000]}}
    path = save_checkpoint(tmp_path / "huge.safetensors", policy.state_dict(), huge)
    with pytest.raises(ValueError, match=r"the config makes model\..* of shape \(4000"):
        load_policy(path)
    assert built_on == ["meta"]  # the 4000-wide network was never allocated
    bad = save_checkpoint(tmp_path / "bad.safetensors", policy.state_dict(), {**policy.config, "horizon": -1})
    with pytest.raises(ValueError, match="horizon must be an integer >= 1"):
        load_policy(bad)
    good = save_checkpoint(tmp_path / "good.safetensors", policy.state_dict(), policy.config)
    built_on.clear()
    load_policy(good, sampler="sequential")
    assert built_on == ["meta", "cpu"]


@pytest.mark.parametrize("key", ["state", "action"])
def test_training_data_with_non_finite_values_is_refused_naming_where(tmp_path, key):
    import zarr
    from test_dataset import write_synthetic_pusht

    from para_policy.dataset import PushTLowdimDataset

    path = write_synthetic_pusht(tmp_path / "d.zarr", [10, 12, 9], seed=1)
    store = zarr.open(str(path), mode="r+")
    values = store[f"data/{key}"][:]
    values[15, 1] = np.inf if key == "state" else np.nan
    store[f"data/{key}"][:] = values
    with pytest.raises(ValueError, match=rf"data/{key} holds 1 non-finite.*row 15 \(episode 1, step 5\), column 1"):
        PushTLowdimDataset.from_path(path, horizon=4)


def test_a_replay_buffer_without_episodes_is_refused(tmp_path):
    from para_policy.dataset import PushTLowdimDataset
    from para_policy.tasks.pusht.replay_buffer import ReplayBuffer

    empty = {"state": np.zeros((0, 5)), "keypoint": np.zeros((0, 9, 2)), "action": np.zeros((0, 2))}
    path = ReplayBuffer(empty, np.zeros(0)).save(tmp_path / "empty.zarr")
    with pytest.raises(ValueError, match="no episodes"):
        PushTLowdimDataset.from_path(path, horizon=4)
