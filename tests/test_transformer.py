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
                          "parataa": {"window": 100, "tolerance": 0.0}}.items():
        out = policy.predict_action({"obs": rec["input.obs.obs"]}, x_T=x_T, noise=noise, sampler=sampler, **opts)
        torch.testing.assert_close(out["action"], rec["ddpm.action"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out["action_pred"], rec["ddpm.action_pred"], rtol=1e-5, atol=1e-4)
