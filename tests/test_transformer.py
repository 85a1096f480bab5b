"""TransformerForDiffusion written here reproduces DiffusionPolicy's (the recorded fixture): its state_dict
loads strictly, the denoiser probe matches, and sampled actions match the original predict_action for the
sequential sampler and, at tolerance 0, for Picard sampling with every improvement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from para_policy.models.transformer import TransformerForDiffusion
from para_policy.normalizer import LinearNormalizer
from para_policy.samplers import picard_sample, sequential_sample
from para_policy.schedule import build_scheduler, ddim_from, make_schedule

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
NAME = "dp_transformer_lowdim_A"


@pytest.fixture(scope="module")
def fixture():
    ckpt = FIXTURES / f"{NAME}.ckpt"
    if not ckpt.is_file():
        pytest.skip(f"{ckpt} is absent (the shared fixtures sit beside the checkout)")
    from omegaconf import OmegaConf

    from para_policy.integrations import restricted_pickle

    payload = torch.load(ckpt, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    policy_cfg = OmegaConf.to_container(payload["cfg"].policy, resolve=True)
    model_cfg = {k: v for k, v in policy_cfg["model"].items() if k != "_target_"}
    model = TransformerForDiffusion(**model_cfg).eval()
    sd = payload["state_dicts"]["model"]
    model.load_state_dict({k[len("model."):]: v for k, v in sd.items()
                           if k.startswith("model.") and k != "model._dummy_variable"}, strict=True)
    normalizer = LinearNormalizer({"obs": 20, "action": 2})
    normalizer.load_state_dict({k[len("normalizer."):]: v for k, v in sd.items() if k.startswith("normalizer.")},
                               strict=False)
    recorded = torch.load(FIXTURES / f"{NAME}_predict.pt", weights_only=True)
    return model, normalizer, policy_cfg, recorded


def test_denoiser_probe_matches_the_original(fixture):
    model, _, _, rec = fixture
    with torch.no_grad():
        out = model(rec["model_probe.sample"], rec["model_probe.timestep"], cond=rec["model_probe.cond"])
    torch.testing.assert_close(out, rec["model_probe.output"], rtol=0, atol=1e-5)
    assert model.mask is not None and model.memory_mask is not None  # causal_attn: saved buffers


@pytest.mark.parametrize("kind", ["ddpm", "ddim16"])
def test_sampled_actions_match_predict_action_for_every_sampler(fixture, kind):
    model, normalizer, cfg, rec = fixture
    scheduler = build_scheduler(cfg["noise_scheduler"])
    steps = 100 if kind == "ddpm" else 16
    schedule = make_schedule(scheduler if kind == "ddpm" else ddim_from(scheduler), steps)
    cond = normalizer.normalize("obs", rec["input.obs.obs"])[:, : cfg["n_obs_steps"]]
    torch.testing.assert_close(cond, rec["cond"], rtol=0, atol=1e-5)
    draws = rec[f"{kind}.randn_draws"]
    x_T = draws[0]
    noise = torch.zeros((x_T.shape[0], schedule.num_steps, *x_T.shape[1:]))
    for i, k in enumerate(torch.nonzero(schedule.draws_noise).flatten().tolist()):
        noise[:, k] = draws[1 + i]

    def denoiser(x, t, c):
        return model(x, t, cond=c)

    start = cfg["n_obs_steps"] - 1  # DiffusionTransformerLowdimPolicy: oa_step_convention
    expected = rec[f"{kind}.action"]
    runs = {"sequential": sequential_sample(denoiser, schedule, x_T, noise, condition=cond)[0]}
    for name, opts in {"picard": {}, "linear_solve + secant": {"linear_solve": True, "secant": True}}.items():
        runs[name] = picard_sample(denoiser, schedule, x_T, noise, condition=cond, window=steps, tolerance=0.0,
                                   **opts)[0]
    for name, sample in runs.items():
        action = normalizer.unnormalize("action", sample)[:, start: start + cfg["n_action_steps"]]
        # pixels of a few hundred: float32 roundoff of 100 steps stays within a few 1e-6 relative
        torch.testing.assert_close(action, expected, rtol=1e-5, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_load_policy_reads_the_transformer_checkpoint_and_every_preset_reproduces_it():
    ckpt = FIXTURES / f"{NAME}.ckpt"
    if not ckpt.is_file():
        pytest.skip(f"{ckpt} is absent (the shared fixtures sit beside the checkout)")
    from para_policy import load_policy

    rec = torch.load(FIXTURES / f"{NAME}_predict.pt", weights_only=True)
    policy = load_policy(ckpt, sampler="sequential")
    assert policy.model_type == "transformer" and policy.obs_as_global_cond and policy.action_start == 1
    schedule = policy.schedule_for(policy.sampler)
    draws = rec["ddpm.randn_draws"]
    x_T = draws[0]
    noise = torch.zeros((x_T.shape[0], schedule.num_steps, *x_T.shape[1:]))
    for i, k in enumerate(torch.nonzero(schedule.draws_noise).flatten().tolist()):
        noise[:, k] = draws[1 + i]
    for sampler, opts in {"sequential": {}, "paradigms": {"window": 100, "tolerance": 0.0},
                          "parataa": {"window": 100, "tolerance": 0.0},
                          "asyncdiff": {"warmup": 100}}.items():  # the stages in turn on ONNX Runtime
        out = policy.predict_action({"obs": rec["input.obs.obs"]}, x_T=x_T, noise=noise, sampler=sampler, **opts)
        torch.testing.assert_close(out["action"], rec["ddpm.action"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out["action_pred"], rec["ddpm.action_pred"], rtol=1e-5, atol=1e-4)


class DPTransformerStandIn(torch.nn.Module):
    """DiffusionPolicy's ``DiffusionTransformerLowdimPolicy`` inference path (obs_as_cond), written out."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        torch.manual_seed(seed)
        self.model = TransformerForDiffusion(input_dim=2, output_dim=2, horizon=10, n_obs_steps=2, cond_dim=5,
                                             n_layer=2, n_head=2, n_emb=32, p_drop_emb=0.0, p_drop_attn=0.0,
                                             causal_attn=True).eval()
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                             clip_sample=True, prediction_type="epsilon")
        self.num_inference_steps, self.n_obs_steps, self.n_action_steps = 20, 2, 8
        self.kwargs: dict = {}

    def reset(self) -> None:
        pass

    def conditional_sample(self, condition_data, condition_mask, cond=None, generator=None, **kwargs):
        trajectory = torch.randn(size=condition_data.shape, dtype=condition_data.dtype, generator=generator)
        self.noise_scheduler.set_timesteps(self.num_inference_steps)
        for t in self.noise_scheduler.timesteps:
            trajectory[condition_mask] = condition_data[condition_mask]
            model_output = self.model(trajectory, t, cond)
            trajectory = self.noise_scheduler.step(model_output, t, trajectory, generator=generator,
                                                   **kwargs).prev_sample
        trajectory[condition_mask] = condition_data[condition_mask]
        return trajectory

    @torch.no_grad()
    def predict_action(self, obs):
        cond = obs[:, : self.n_obs_steps]
        data = torch.zeros(obs.shape[0], 10, 2)
        sample = self.conditional_sample(data, torch.zeros_like(data, dtype=torch.bool), cond=cond, **self.kwargs)
        return sample[:, self.n_obs_steps - 1: self.n_obs_steps - 1 + self.n_action_steps]


def test_patched_transformer_policy_matches_its_own_loop_at_tolerance_0():
    from para_policy.integrations import patch, unpatch

    policy = DPTransformerStandIn()
    stream = [torch.randn(2, 2, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def run():
        out = []
        for i, o in enumerate(stream):
            torch.manual_seed(100 + i)
            out.append(policy.predict_action(o))
        return out

    before = run()
    patch(policy, window=20, tolerance=0.0)  # the paradigms preset, exact
    after = run()
    assert policy.para_stats.warm and policy.para_stats.rounds <= 20
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    unpatch(policy)
    assert all(torch.equal(a, b) for a, b in zip(run(), before, strict=True))
