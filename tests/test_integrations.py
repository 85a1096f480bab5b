"""patch / unpatch on live DiffusionPolicy and LeRobot policy objects; DP <-> LeRobot key names."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import DP_BETAS
from diffusers import DDPMScheduler
from test_dp_checkpoint import ACT_DIM, HORIZON, OBS_DIM, TO, DPStandIn, dp_cfg, write_dp_checkpoint
from torch import nn

from para_policy import load_policy
from para_policy.integrations import is_patched, patch, unpatch
from para_policy.models import ConditionalUnet1D, diffusion_policy_to_lerobot_keys, lerobot_to_diffusion_policy_keys


def dp_actions(policy, obs, seed):
    torch.manual_seed(seed)  # DiffusionPolicy samples from torch's global RNG
    return policy.predict_action({"obs": obs})["action"]


@pytest.mark.parametrize("global_cond", [True, False])
def test_patch_diffusion_policy_matches_and_unpatch_restores_exactly(global_cond):
    policy = DPStandIn(global_cond, seed=4)
    obs = torch.rand(2, TO, OBS_DIM) * 500
    before = dp_actions(policy, obs, 11)
    patch(policy, "paradigms", window=8, tolerance=0.0)
    assert is_patched(policy) and "conditional_sample" in vars(policy)
    patched = dp_actions(policy, obs, 11)
    assert torch.allclose(patched, before, atol=1e-3), (patched - before).abs().max()
    stats = policy.para_stats
    assert stats.all_converged and 1 <= stats.rounds <= policy.num_inference_steps
    assert stats.model_evals >= stats.rounds * 2
    # a looser tolerance is a different (cheaper) sampler: it changes the stats object
    patch(policy, "paradigms", window=8, tolerance=0.5)
    dp_actions(policy, obs, 11)
    assert policy.para_stats is not stats
    unpatch(policy)
    assert not is_patched(policy) and "conditional_sample" not in vars(policy)
    assert not hasattr(policy, "para_stats")
    assert torch.equal(dp_actions(policy, obs, 11), before)  # bit-exact original loop again
    with pytest.raises(ValueError, match="not patched"):
        unpatch(policy)


def test_patch_with_asyncdiff_runs_the_stages_and_unpatch_ends_them():
    from para_policy.integrations.diffusion_policy import SamplingPatch

    policy = DPStandIn(True, seed=4)
    obs = torch.rand(2, TO, OBS_DIM) * 500
    before = dp_actions(policy, obs, 11)
    patch(policy, "asyncdiff", warmup=policy.num_inference_steps)  # every step with the stages in turn
    assert torch.allclose(dp_actions(policy, obs, 11), before, atol=1e-3)
    patch(policy, "asyncdiff")  # stale stages: close to the original, not equal
    approx = dp_actions(policy, obs, 11)
    assert policy.para_stats.rounds == policy.num_inference_steps and not torch.equal(approx, before)
    pipelines = [pipe for _, pipe in vars(policy)[SamplingPatch.ATTRIBUTE].pipelines.values()]
    threads = [thread for pipe in pipelines for thread, _ in pipe.workers]
    assert len(threads) == 1 and threads[0].is_alive()  # stage 1's worker, kept for the next call
    unpatch(policy)
    assert not threads[0].is_alive()
    local = DPStandIn(False, seed=5, local_cond=True)
    patch(local, "asyncdiff")
    data = torch.zeros(2, HORIZON, ACT_DIM)
    with pytest.raises(ValueError, match="local_cond"):
        local.conditional_sample(data, torch.zeros_like(data, dtype=torch.bool),
                                 local_cond=torch.randn(2, HORIZON, OBS_DIM))


def test_patch_keeps_generator_reproducibility_and_local_cond():
    policy = DPStandIn(False, seed=5, local_cond=True)
    B = 2
    data = torch.zeros(B, HORIZON, ACT_DIM)
    mask = torch.zeros_like(data, dtype=torch.bool)
    local = torch.randn(B, HORIZON, OBS_DIM)
    ref = policy.conditional_sample(data, mask, local_cond=local, generator=torch.Generator().manual_seed(2))
    patch(policy, "paradigms", window=4, tolerance=0.0)
    out = policy.conditional_sample(data, mask, local_cond=local, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(out, ref, atol=1e-4)
    with pytest.raises(TypeError, match="scheduler.step arguments"):
        policy.conditional_sample(data, mask, local_cond=local, predict_epsilon=True)
    unpatch(policy)


def test_unpatch_restores_a_preexisting_instance_attribute():
    policy = DPStandIn(True)

    def custom(*args, **kwargs):
        return "custom"

    policy.conditional_sample = custom
    patch(policy, "sequential")
    assert policy.conditional_sample is not custom
    unpatch(policy)
    assert policy.conditional_sample is custom


def test_patch_rejects_bad_objects_and_options():
    with pytest.raises(TypeError, match="neither a DiffusionPolicy policy"):
        patch(object())
    with pytest.raises(ValueError, match="unknown sampler"):
        patch(DPStandIn(True), "fastest")
    with pytest.raises(ValueError, match="does not take"):
        patch(DPStandIn(True), "paradigms", windw=4)


# ---- LeRobot: a stand-in following modeling_diffusion.py's published code -------------------

class LeRobotDiffusionModelStandIn(nn.Module):
    """LeRobot's ``DiffusionModel`` sampling path (``conditional_sample`` copied in spirit, same signature)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = types.SimpleNamespace(horizon=HORIZON, n_action_steps=4, n_obs_steps=TO,
                                            action_feature=types.SimpleNamespace(shape=(ACT_DIM,)))
        self.unet = ConditionalUnet1D(input_dim=ACT_DIM, global_cond_dim=OBS_DIM * TO, diffusion_step_embed_dim=16,
                                      down_dims=[16, 32], kernel_size=3, n_groups=4, cond_predict_scale=True)
        with torch.no_grad():
            for p in self.unet.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.noise_scheduler = DDPMScheduler(**DP_BETAS, variance_type="fixed_small", clip_sample=True,
                                             prediction_type="epsilon")
        self.num_inference_steps = 20

    def conditional_sample(self, batch_size, global_cond=None, generator=None, noise=None):
        param = next(self.parameters())
        sample = noise if noise is not None else torch.randn(
            size=(batch_size, self.config.horizon, self.config.action_feature.shape[0]), dtype=param.dtype,
            device=param.device, generator=generator)
        self.noise_scheduler.set_timesteps(self.num_inference_steps)
        for t in self.noise_scheduler.timesteps:
            model_output = self.unet(sample, torch.full(sample.shape[:1], t, dtype=torch.long,
                                                        device=sample.device), global_cond=global_cond)
            sample = self.noise_scheduler.step(model_output, t, sample, generator=generator).prev_sample
        return sample


class LeRobotPolicyStandIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.diffusion = LeRobotDiffusionModelStandIn()
        self.queue: list = []

    def reset(self) -> None:  # LeRobot's reset clears the observation and action queues
        self.queue = []


def test_patched_lerobot_policy_warm_starts_in_a_loop_and_reset_forgets():
    policy = LeRobotPolicyStandIn()
    conds = [torch.randn(2, OBS_DIM * TO) for _ in range(3)]
    refs = [policy.diffusion.conditional_sample(2, global_cond=c, generator=torch.Generator().manual_seed(i))
            for i, c in enumerate(conds)]
    patch(policy, window=6, tolerance=0.0)  # the paradigms preset: warm start on
    warm = []
    for i, c in enumerate(conds):
        out = policy.diffusion.conditional_sample(2, global_cond=c, generator=torch.Generator().manual_seed(i))
        warm.append(policy.para_stats.warm)
        assert torch.allclose(out, refs[i], atol=1e-4)  # tolerance 0: the warm start changes nothing
    assert warm == [False, True, True]
    policy.queue = [1]
    policy.reset()  # the original reset still runs, and the warm start is forgotten
    assert policy.queue == []
    policy.diffusion.conditional_sample(2, global_cond=conds[0])
    assert not policy.para_stats.warm
    policy.diffusion.conditional_sample(3, global_cond=torch.randn(3, OBS_DIM * TO))  # new batch shape: cold
    assert not policy.para_stats.warm
    unpatch(policy)
    assert "reset" not in vars(policy)


def test_patch_lerobot_matches_and_unpatch_restores():
    policy = LeRobotPolicyStandIn()
    cond = torch.randn(3, OBS_DIM * TO)
    x_T = torch.randn(3, HORIZON, ACT_DIM)

    def run(**kw):
        return policy.diffusion.conditional_sample(3, global_cond=cond, **kw)

    before = run(generator=torch.Generator().manual_seed(5))
    before_noise = run(generator=torch.Generator().manual_seed(5), noise=x_T)
    torch.manual_seed(9)
    before_global = run()
    patch(policy, "paradigms", window=6, tolerance=0.0)
    assert "conditional_sample" in vars(policy.diffusion) and is_patched(policy)
    assert torch.allclose(run(generator=torch.Generator().manual_seed(5)), before, atol=1e-4)
    assert policy.para_stats.all_converged and policy.para_stats.rounds <= 20
    assert torch.allclose(run(generator=torch.Generator().manual_seed(5), noise=x_T), before_noise, atol=1e-4)
    torch.manual_seed(9)
    assert torch.allclose(run(), before_global, atol=1e-4)
    with pytest.raises(ValueError, match="noise must have shape"):
        run(noise=x_T[:2])
    unpatch(policy)
    assert "conditional_sample" not in vars(policy.diffusion) and not hasattr(policy, "para_stats")
    assert torch.equal(run(generator=torch.Generator().manual_seed(5)), before)


# ---- key names ------------------------------------------------------------------------

def test_key_mapping_round_trips(tmp_path):
    unet = ConditionalUnet1D(input_dim=ACT_DIM, global_cond_dim=OBS_DIM * TO, diffusion_step_embed_dim=16,
                             down_dims=[16, 32], kernel_size=3, n_groups=4, cond_predict_scale=True)
    bare = unet.state_dict()
    lerobot = diffusion_policy_to_lerobot_keys(bare, "", "")
    assert any(".conv1." in k for k in lerobot) and not any(".blocks." in k for k in lerobot)
    assert "down_modules.0.2.weight" in lerobot  # Downsample1d's .conv dropped
    back = lerobot_to_diffusion_policy_keys(lerobot, "", "")
    assert list(back) == list(bare) and all(back[k] is bare[k] for k in bare)

    # a whole DiffusionPolicy checkpoint state dict: UNet keys renamed, normalizer passed through
    dp_sd = DPStandIn(True).dp_state_dict()
    lr_sd = diffusion_policy_to_lerobot_keys(dp_sd)
    assert "diffusion.unet.final_conv.1.weight" in lr_sd and "normalizer.params_dict.obs.scale" in lr_sd
    assert lerobot_to_diffusion_policy_keys(lr_sd) == dp_sd

    # LeRobot-named weights load into a LowdimPolicy (through a DP checkpoint) and give the same UNet
    path = tmp_path / "from_lerobot.ckpt"
    restored = lerobot_to_diffusion_policy_keys(lr_sd)
    write_dp_checkpoint(path, dp_cfg(use_ema=False), restored)
    policy = load_policy(path)
    x, t, c = torch.randn(2, HORIZON, ACT_DIM), torch.tensor([3, 50]), torch.randn(2, OBS_DIM * TO)
    ref = ConditionalUnet1D(**policy.config["model"])
    ref.load_state_dict({k[len("model."):]: v for k, v in dp_sd.items() if k.startswith("model.")})
    with torch.no_grad():
        assert torch.equal(policy.model(x, t, global_cond=c), ref(x, t, global_cond=c))


# ---- the real LeRobot class, when installed ----------------------------------------------

def test_patch_real_lerobot_diffusion_policy():
    """Optional: runs only where lerobot imports (it is not a dependency)."""
    modeling = pytest.importorskip("lerobot.policies.diffusion.modeling_diffusion")
    configuration = pytest.importorskip("lerobot.policies.diffusion.configuration_diffusion")
    types_mod = pytest.importorskip("lerobot.configs.types")
    F, PF = types_mod.FeatureType, types_mod.PolicyFeature
    config = configuration.DiffusionConfig(
        input_features={"observation.state": PF(type=F.STATE, shape=(4,)),
                        "observation.environment_state": PF(type=F.ENV, shape=(6,))},
        output_features={"action": PF(type=F.ACTION, shape=(ACT_DIM,))},
        down_dims=(16, 32), n_groups=4, diffusion_step_embed_dim=16, kernel_size=3, horizon=HORIZON,
        n_obs_steps=TO, n_action_steps=4, num_inference_steps=20, device="cpu")
    torch.manual_seed(0)
    policy = modeling.DiffusionPolicy(config).eval()
    model = policy.diffusion
    cond = torch.randn(2, 10 * TO)
    with torch.no_grad():
        before = model.conditional_sample(2, global_cond=cond, generator=torch.Generator().manual_seed(1))
    patch(policy, "paradigms", window=8, tolerance=0.0)
    with torch.no_grad():
        after = model.conditional_sample(2, global_cond=cond, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(after, before, atol=1e-4) and policy.para_stats.all_converged
    unpatch(policy)
    with torch.no_grad():
        again = model.conditional_sample(2, global_cond=cond, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, before)
    # LeRobot's UNet weights, renamed, run in our ConditionalUnet1D with the same outputs
    sd = lerobot_to_diffusion_policy_keys(
        {k: v for k, v in policy.state_dict().items() if k.startswith("diffusion.unet.")}, dst_prefix="")
    ours = ConditionalUnet1D(input_dim=ACT_DIM, global_cond_dim=10 * TO, diffusion_step_embed_dim=16,
                             down_dims=[16, 32], kernel_size=3, n_groups=4,
                             cond_predict_scale=config.use_film_scale_modulation)
    ours.load_state_dict(sd)
    x, t = torch.randn(2, HORIZON, ACT_DIM), torch.tensor([3, 70])
    with torch.no_grad():
        assert torch.allclose(ours(x, t, global_cond=cond), model.unet(x, t, global_cond=cond), atol=1e-5)


def test_patch_lerobot_samples_with_dpm_solver_at_any_order():
    # reference: the stand-in's own diffusers loop with its scheduler swapped for the DPM-Solver++ twin
    from para_policy.schedule import dpm_from

    policy = LeRobotPolicyStandIn()
    cond = torch.randn(2, OBS_DIM * TO)
    x_T = torch.randn(2, HORIZON, ACT_DIM)
    ddpm = policy.diffusion.noise_scheduler
    for order in (2, 3):
        policy.diffusion.noise_scheduler = dpm_from(ddpm, solver_order=order)
        ref = policy.diffusion.conditional_sample(2, global_cond=cond, noise=x_T)
        policy.diffusion.noise_scheduler = ddpm
        for sampler in ("sequential", "paradigms"):
            extra = {"window": 20, "tolerance": 0.0} if sampler == "paradigms" else {}
            patch(policy, sampler, scheduler="dpmsolver++", solver_order=order, **extra)
            out = policy.diffusion.conditional_sample(2, global_cond=cond, noise=x_T)
            unpatch(policy)
            assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item()), (order, sampler)
