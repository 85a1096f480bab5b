"""Non-finite actions raise on every path, checked on what is returned; normalizers refuse unusable scales."""

from __future__ import annotations

import pytest
import torch
from test_dp_checkpoint import ACT_DIM, HORIZON, OBS_DIM, TO, DPStandIn
from test_integrations import LeRobotPolicyStandIn
from test_policy import tiny_policy

from para_policy import LinearNormalizer, load_policy, save_checkpoint
from para_policy.integrations import patch, unpatch


@pytest.mark.parametrize("name, value, message", [
    ("scale", 0.0, r"'action': params_dict.action.scale must be finite and non-zero, got 0.0 at index \(1,\)"),
    ("scale", float("inf"), "scale must be finite and non-zero"),
    ("offset", float("nan"), r"'action': params_dict.action.offset must be finite, got nan"),
])
def test_normalizer_refuses_unusable_values_at_load_and_keeps_its_own(name, value, message):
    norm = LinearNormalizer({"obs": 3, "action": 2})
    state = norm.state_dict()
    state[f"params_dict.action.{name}"] = torch.tensor([1.0, value])
    with pytest.raises(ValueError, match=message):
        norm.load_state_dict(state)
    assert torch.equal(norm.params_dict["action"].scale, torch.ones(2))  # refused before anything was copied
    mean_std = LinearNormalizer({"action": {"shape": 2, "mode": "mean_std"}})
    stats = {**mean_std.state_dict(), "params_dict.action.input_stats.std": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ValueError, match="input_stats.std must be finite"):
        mean_std.load_state_dict(stats)


def test_a_checkpoint_with_a_zero_action_scale_is_refused_naming_the_field(tmp_path):
    policy = tiny_policy()
    state = policy.state_dict()
    state["normalizer.params_dict.action.scale"] = torch.zeros_like(state["normalizer.params_dict.action.scale"])
    path = save_checkpoint(tmp_path / "zero_scale.safetensors", state, policy.config)
    with pytest.raises(ValueError, match="normalizer field 'action'.*scale must be finite and non-zero"):
        load_policy(path, sampler="sequential", backend="eager")


def test_predict_action_checks_the_unnormalized_actions():
    policy = tiny_policy().set_sampler("paradigms", window=4, num_inference_steps=4)
    obs = {"obs": torch.full((1, TO, OBS_DIM), 100.0)}
    good = policy.predict_action(obs)
    with torch.no_grad():  # a finite, non-zero scale so small that every unnormalized action overflows
        policy.normalizer.params_dict["action"].scale.fill_(1e-45)
    with pytest.raises(ValueError, match="non-finite actions.*action normalizer"):
        policy.predict_action(obs)
    assert policy.last_stats is good.stats  # nothing of the failed call was kept (warm start included)


def test_patched_loops_refuse_to_return_non_finite_samples():
    dp = patch(DPStandIn(True), "paradigms", window=4)
    data = torch.zeros(2, HORIZON, ACT_DIM)
    huge = torch.full((2, OBS_DIM * TO), 1e30)  # finite conditioning the network overflows on
    with pytest.raises(ValueError, match="non-finite actions"):
        dp.conditional_sample(data, torch.zeros_like(data, dtype=torch.bool), global_cond=huge)
    unpatch(dp)
    lerobot = patch(LeRobotPolicyStandIn(), "sequential")
    with pytest.raises(ValueError, match="non-finite actions"):
        lerobot.diffusion.conditional_sample(2, global_cond=huge)
