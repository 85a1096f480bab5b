"""The shipped PushT policy: it loads, acts sensibly, and the evaluator runs it with every sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval import FAST, compose_eval

from para_policy import load_policy
from para_policy.evaluation import evaluate, runner
from para_policy.tasks.pusht.env import make_env

ASSET = Path(__file__).resolve().parents[1] / "para_policy" / "assets" / "pusht_lowdim.safetensors"


@pytest.fixture(scope="module")
def policy():
    return load_policy(ASSET)


def test_shipped_checkpoint_loads_with_the_pusht_recipe(policy):
    assert ASSET.stat().st_size < 25 * 2**20
    assert (policy.obs_dim, policy.action_dim, policy.horizon) == (20, 2, 16)
    assert (policy.n_obs_steps, policy.n_action_steps, policy.num_inference_steps) == (2, 8, 100)
    training = policy.config["training"]
    assert training["seed"] == 42 and "train.py" in training["command"]


def test_shipped_policy_gives_finite_actions_in_the_arena(policy):
    env = make_env()
    obs, _ = env.reset(seed=100000)
    env.close()
    obs = torch.as_tensor(obs, dtype=torch.float32)[None, None].repeat(1, 2, 1)
    out = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(0),
                                sampler="sequential", scheduler="ddim", num_inference_steps=16)
    action = out["action"]
    assert action.shape == (1, 8, 2) and out["action_pred"].shape == (1, 16, 2)
    assert torch.isfinite(action).all()
    assert ((action > -20) & (action < 532)).all()  # pixels: the 512 x 512 arena


def test_dpm_solver_on_the_ddpm_trained_policy_stays_in_the_arena(policy):
    # the DPM-Solver++ twin of this cosine-schedule policy clips lambda (schedule.dpm_from); unclipped, its
    # first clean-sample prediction amplifies the network's error ~2000x and the actions leave the arena
    env = make_env()
    obs, _ = env.reset(seed=100000)
    env.close()
    obs = torch.as_tensor(obs, dtype=torch.float32)[None, None].repeat(1, 2, 1)
    out = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(0), sampler="sequential",
                                scheduler="dpmsolver++", solver_order=2, num_inference_steps=8)
    assert ((out["action"] > -20) & (out["action"] < 532)).all()


def test_picard_on_the_real_network_reproduces_sequential(policy):
    obs = torch.tensor(np.random.default_rng(0).uniform(50, 450, (1, 2, 20)), dtype=torch.float32)
    kw = dict(scheduler="ddim", num_inference_steps=16)
    ref = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(1), sampler="sequential", **kw)
    fast = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(1), sampler="paradigms",
                                 window=8, tolerance=0.0, **kw)
    assert (fast["action"] - ref["action"]).abs().max() < 1e-3  # pixels


@pytest.mark.parametrize("sampler", ["paradigms", "paradigms_published"])
def test_evaluator_runs_the_shipped_policy(sampler, tmp_path):
    runner._BASELINE_CACHE.clear()
    overrides = [f"sampler={sampler}", *FAST, "task.max_steps=8", "latency.calls=2", "video.enabled=false"]
    if sampler == "paradigms":
        overrides.append("sampler.num_inference_steps=20")  # short: a CI-sized run of the real network
    else:
        overrides += ["sampler.scheduler=ddim", "sampler.num_inference_steps=16"]  # ParaDDIM-16
    results = evaluate(compose_eval(overrides), tmp_path, overrides=overrides)
    cand, base = results["samplers"]["candidate"], results["samplers"]["baseline"]
    assert cand["name"] == sampler and base["name"] == "sequential"
    assert [e["seed"] for e in cand["episodes"]] == [e["seed"] for e in base["episodes"]] == [100000, 100001]
    assert results["checkpoint"].endswith("pusht_lowdim.safetensors")
    assert 0.0 <= cand["mean_score"] <= 1.0 and 0.0 <= base["mean_score"] <= 1.0
    assert results["comparison"]["faithfulness"]["max_px"] < 5.0


def test_evaluator_accepts_parataa_options_and_refuses_them_elsewhere(tmp_path):
    from para_policy.evaluation import EvalConfigError, sampler_config

    spec = sampler_config(compose_eval(["sampler=parataa", "sampler.memory=2"]).sampler)
    assert spec.name == "parataa" and spec.options["memory"] == 2 and spec.options["ridge"] == 0.001
    with pytest.raises(EvalConfigError, match="memory"):
        sampler_config(compose_eval(["sampler=paradigms_published", "+sampler.memory=2"]).sampler)
