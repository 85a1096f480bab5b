"""Names that say one thing (issue 27 item 5): each old spelling is refused with an error naming the new one.

* ``warm_start`` is a flag everywhere (a spec's, ``predict_action``'s, the session's); the explicit
  clean-trajectory guess is ``guess=`` (B, T, D) and its rows ``guess_rows=`` (B,) bool.
* ``deadline_at`` is a ``time.perf_counter()`` instant (``predict_action``, the sampler functions,
  the session); ``deadline_ms`` stays the Controller's and the evaluator's budget in ms.
* ``noise_scheduler`` is the diffusers object; ``scheduler`` only the spec's kind string.
* ``obs_feature_dim`` is an image policy's encoder width; ``obs_dim`` a low-dim policy's raw width.
* ``SamplerConfig`` has no default preset: ``sampler_spec()`` and ``load_policy`` default to
  ``paradigms``, a policy built directly starts ``sequential``.
"""

from __future__ import annotations

import inspect
import time

import pytest
import torch
from conftest import MLPDenoiser, dp_ddpm
from test_policy import TO, tiny_policy

from para_policy import SamplerConfig, SamplingSession, make_schedule, picard_sample, sampler_spec, taa_sample
from para_policy.image_policy import ImagePolicy
from para_policy.integrations.diffusion_policy import SamplingPatch
from para_policy.samplers.registry import build_schedule, schedule_key, scheduler_kind
from para_policy.schedule import ddim_from, dpm_from


@pytest.fixture(scope="module")
def policy():
    return tiny_policy().set_sampler("paradigms", window=4)


def obs(policy) -> dict[str, torch.Tensor]:
    return {"obs": torch.randn(1, TO, policy.obs_dim, generator=torch.Generator().manual_seed(0))}


def sampler_inputs(steps: int = 10):
    schedule = make_schedule(dp_ddpm(), steps)
    g = torch.Generator().manual_seed(0)
    return schedule, torch.randn(2, 8, 3, generator=g), torch.randn(2, steps, 8, 3, generator=g)


# ---- warm_start is a flag; the guess is guess= ---------------------------------------------------------

def test_predict_action_refuses_a_warm_start_tensor_naming_guess(policy):
    guess = torch.zeros(policy.trajectory_shape(1))
    with pytest.raises(TypeError, match=r"warm_start= takes True, False or None; pass the tensor as guess="):
        policy.predict_action(obs(policy), warm_start=guess)
    out = policy.predict_action(obs(policy), guess=guess)  # the new spelling
    assert out.warm


def test_predict_action_refuses_warm_rows_naming_guess_rows(policy):
    guess = torch.zeros(policy.trajectory_shape(1))
    with pytest.raises(TypeError, match=r"warm_rows= was renamed: pass guess_rows="):
        policy.predict_action(obs(policy), guess=guess, warm_rows=torch.ones(1, dtype=torch.bool))
    assert policy.predict_action(obs(policy), guess=guess, guess_rows=torch.ones(1, dtype=torch.bool)).warm


def test_session_run_refuses_the_old_spellings():
    session = SamplingSession(sampler_spec("paradigms", window=4), n_action_steps=2)
    schedule, x_T, noise = sampler_inputs()
    den = MLPDenoiser(dim=3)
    old = {"warm_start": torch.zeros_like(x_T), "warm_rows": torch.ones(2, dtype=torch.bool), "deadline": 0.0}
    new = {"warm_start": "guess=", "warm_rows": "guess_rows=", "deadline": "deadline_at="}
    for key, value in old.items():
        with pytest.raises(TypeError, match=new[key]):
            session.run(den, session.spec, schedule, x_T, noise, condition=torch.zeros(2, 4), **{key: value})


def test_warm_start_true_needs_a_spec_that_warm_starts(policy):
    with pytest.raises(ValueError, match=r"warm_start=True needs a sampler spec that warm-starts .*or a guess="):
        policy.predict_action(obs(policy), sampler="paradigms_published", warm_start=True)
    with pytest.raises(ValueError, match="without warm_start=False"):
        policy.predict_action(obs(policy), guess=torch.zeros(policy.trajectory_shape(1)), warm_start=False)


# ---- deadline_at is an instant; deadline_ms a budget -------------------------------------------------

def test_predict_action_refuses_deadline_naming_deadline_at(policy):
    with pytest.raises(TypeError, match=r"deadline= was renamed: pass deadline_at= \(a time.perf_counter\(\)"):
        policy.predict_action(obs(policy), deadline=time.perf_counter())
    assert policy.predict_action(obs(policy), deadline_at=time.perf_counter()).stats.rounds >= 1


@pytest.mark.parametrize("sample", [picard_sample, taa_sample])
def test_sampler_functions_refuse_deadline_naming_deadline_at(sample):
    schedule, x_T, noise = sampler_inputs()
    with pytest.raises(TypeError, match=r"deadline= was renamed: pass deadline_at="):
        sample(MLPDenoiser(dim=3), schedule, x_T, noise, window=4, condition=torch.zeros(2, 4), deadline=0.0)
    _, stats = sample(MLPDenoiser(dim=3), schedule, x_T, noise, window=4, condition=torch.zeros(2, 4),
                      deadline_at=time.perf_counter())
    assert stats.deadline_hit and stats.rounds == 1


# ---- noise_scheduler is the diffusers object ---------------------------------------------------------

@pytest.mark.parametrize("fn", [SamplingSession.schedule_for, SamplingPatch.schedule, build_schedule, schedule_key,
                                scheduler_kind, make_schedule, ddim_from, dpm_from])
def test_the_diffusers_object_is_noise_scheduler_in_every_signature(fn):
    params = inspect.signature(fn).parameters
    assert "noise_scheduler" in params and "scheduler" not in params


# ---- obs_feature_dim is an image policy's encoder width ---------------------------------------------

def test_image_policy_refuses_obs_dim_naming_obs_feature_dim():
    keys = {"image": {"shape": [3, 32, 32], "type": "rgb"}, "agent_pos": {"shape": [2], "type": "low_dim"}}
    torch.manual_seed(0)
    image = ImagePolicy({
        "horizon": 8, "n_obs_steps": 2, "n_action_steps": 4, "obs_dim": 514, "action_dim": 2,
        "num_inference_steps": 4,
        "model": {"input_dim": 2, "global_cond_dim": 514 * 2, "diffusion_step_embed_dim": 8,
                  "down_dims": [8, 16], "kernel_size": 3, "n_groups": 4},
        "noise_scheduler": {"_target_": "diffusers.DDPMScheduler", "num_train_timesteps": 100},
        "obs_keys": keys,
        "obs_encoder": {"kind": "dp_multi_image", "shape_meta": {"obs": keys}, "resize_shape": None,
                        "crop_shape": [28, 28], "random_crop": True, "use_group_norm": True,
                        "share_rgb_model": False, "imagenet_norm": False},
        "normalizer": {"image": {"shape": [1]}, "agent_pos": {"shape": [2]}, "action": {"shape": [2]}},
    })
    assert image.obs_feature_dim == 514 and image.config["obs_dim"] == 514  # the on-disk key is unchanged
    with pytest.raises(AttributeError, match="obs_feature_dim"):
        image.obs_dim  # noqa: B018
    assert not hasattr(image, "obs_dim")


# ---- no third default preset -------------------------------------------------------------------------

def test_sampler_config_needs_a_name():
    with pytest.raises(TypeError, match="name"):
        SamplerConfig()
    assert sampler_spec().name == "paradigms" and SamplerConfig("sequential").name == "sequential"
    assert tiny_policy().sampler.name == "sequential"  # built directly: the policy as trained
