"""A DiffusionPolicy ``.ckpt`` whose config names ``DPMSolverMultistepScheduler`` (issue 28).

The checkpoint is the shared fixture ``dp_transformer_lowdim_A.ckpt`` (written by DiffusionPolicy's own
code) with its ``cfg.policy.noise_scheduler`` switched to diffusers' DPM-Solver++ and a short
``num_inference_steps``, re-saved here as DiffusionPolicy saves it. ``load_policy`` must sample from it
what DiffusionPolicy's ``predict_action`` would: its ``conditional_sample`` loop over
``DPMSolverMultistepScheduler.step`` on the same initial noise, written out below with the fixture's
own network (the transformer and normalizer read from the same file, checked against the original
code's recording in tests/test_transformer.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
NAME = "dp_transformer_lowdim_A"
DPM_TARGET = "diffusers.schedulers.scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler"
#: case -> (solver_order, num_inference_steps, more scheduler kwargs); lambda_min_clipped is what diffusers
#: prescribes for cosine (squaredcos_cap_v2) betas like DiffusionPolicy's, and must reach the schedule
CASES = {"order2-8": (2, 8, {}), "order3-10": (3, 10, {}),
         "order2-8-lambda-clipped": (2, 8, {"lambda_min_clipped": -5.1})}


def _payload():
    ckpt = FIXTURES / f"{NAME}.ckpt"
    if not ckpt.is_file():
        pytest.skip(f"{ckpt} is absent (the shared fixtures sit beside the checkout)")
    from para_policy.integrations import restricted_pickle

    return torch.load(ckpt, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)


@pytest.fixture(scope="module")
def fixture():
    """The fixture's payload, its DDPM scheduler config, the network and normalizer, the recorded obs."""
    from omegaconf import OmegaConf

    from para_policy.models.transformer import TransformerForDiffusion
    from para_policy.normalizer import LinearNormalizer

    payload = _payload()
    policy_cfg = OmegaConf.to_container(payload["cfg"].policy, resolve=True)
    model = TransformerForDiffusion(**{k: v for k, v in policy_cfg["model"].items() if k != "_target_"}).eval()
    sd = payload["state_dicts"]["model"]
    model.load_state_dict({k[len("model."):]: v for k, v in sd.items()
                           if k.startswith("model.") and k != "model._dummy_variable"}, strict=True)
    normalizer = LinearNormalizer({"obs": 20, "action": 2})
    normalizer.load_state_dict({k[len("normalizer."):]: v for k, v in sd.items() if k.startswith("normalizer.")},
                               strict=False)
    obs = torch.load(FIXTURES / f"{NAME}_predict.pt", weights_only=True)["input.obs.obs"]
    return payload, policy_cfg, model, normalizer, obs


def dpm_scheduler_config(ddpm: dict, solver_order: int, **more) -> dict:
    """The DPM-Solver++ config a DiffusionPolicy user writes for a DDPM-trained policy: same betas and
    prediction type, no ``clip_sample`` / ``variance_type`` (DPM-Solver has neither), diffusers' defaults
    otherwise."""
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    return {"_target_": DPM_TARGET, **{k: ddpm[k] for k in keep}, "algorithm_type": "dpmsolver++",
            "solver_order": solver_order, **more}


def write_dpm_checkpoint(path: Path, payload: dict, scheduler: dict, steps: int) -> None:
    """The payload with ``cfg.policy.noise_scheduler`` and ``num_inference_steps`` replaced, saved as
    DiffusionPolicy's ``BaseWorkspace.save_checkpoint`` does (``torch.save`` with dill where installed)."""
    import copy

    from omegaconf import OmegaConf

    try:
        import dill as pickle_module
    except ImportError:
        import pickle as pickle_module
    payload = {**payload, "cfg": copy.deepcopy(payload["cfg"])}
    OmegaConf.set_struct(payload["cfg"], False)
    payload["cfg"].policy.noise_scheduler = scheduler
    payload["cfg"].policy.num_inference_steps = steps
    with open(path, "wb") as f:
        torch.save(payload, f, pickle_module=pickle_module)


def dp_predict_action(model, normalizer, policy_cfg: dict, scheduler_cfg: dict, obs: torch.Tensor, steps: int,
                      seed: int) -> dict[str, torch.Tensor]:
    """DiffusionPolicy's ``DiffusionTransformerLowdimPolicy.predict_action`` (obs_as_cond), written out: the
    scheduler as ``hydra.utils.instantiate`` builds it, then ``conditional_sample``'s loop."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(**{k: v for k, v in scheduler_cfg.items() if k != "_target_"})
    to, na, horizon = policy_cfg["n_obs_steps"], policy_cfg["n_action_steps"], policy_cfg["horizon"]
    cond = normalizer.normalize("obs", obs)[:, :to]
    cond_data = torch.zeros(obs.shape[0], horizon, policy_cfg["action_dim"])
    cond_mask = torch.zeros_like(cond_data, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        trajectory = torch.randn(size=cond_data.shape, dtype=cond_data.dtype, generator=generator)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            trajectory[cond_mask] = cond_data[cond_mask]
            model_output = model(trajectory, t, cond)
            trajectory = scheduler.step(model_output, t, trajectory, generator=generator).prev_sample
        trajectory[cond_mask] = cond_data[cond_mask]
    action_pred = normalizer.unnormalize("action", trajectory)
    start = to - 1
    return {"action": action_pred[:, start: start + na], "action_pred": action_pred}


@pytest.mark.parametrize("case", list(CASES))
def test_dpm_solver_checkpoint_samples_as_diffusion_policy(fixture, tmp_path, case):
    from para_policy import load_policy
    from para_policy.schedule import MultistepSchedule

    payload, policy_cfg, model, normalizer, obs = fixture
    order, steps, more = CASES[case]
    scheduler_cfg = dpm_scheduler_config(policy_cfg["noise_scheduler"], order, **more)
    path = tmp_path / f"dpm_{case}.ckpt"
    write_dpm_checkpoint(path, payload, scheduler_cfg, steps)

    seed = 1234
    expected = dp_predict_action(model, normalizer, policy_cfg, scheduler_cfg, obs, steps, seed)

    # load_policy checks the config's shapes on a meta-device skeleton first: the scheduler must still build
    # there (DPMSolverMultistepScheduler's constructor copies its sigmas to the CPU)
    policy = load_policy(path, sampler="sequential")
    schedule = policy.schedule_for(policy.sampler)
    assert isinstance(schedule, MultistepSchedule) and schedule.kind == "dpmsolver++"
    assert schedule.num_steps == steps and schedule.order == order  # the checkpoint's own solver
    x_T = torch.randn(policy.trajectory_shape(obs.shape[0]), generator=torch.Generator().manual_seed(seed))
    noise = torch.zeros((x_T.shape[0], schedule.num_steps, *x_T.shape[1:]))  # dpmsolver++ draws none
    assert not bool(schedule.draws_noise.any())
    runs = {"sequential": policy.predict_action({"obs": obs}, x_T=x_T, noise=noise)}
    runs["paradigms, tolerance 0"] = policy.predict_action({"obs": obs}, x_T=x_T, noise=noise, sampler="paradigms",
                                                           window=steps, tolerance=0.0, warm_start=False)
    assert runs["paradigms, tolerance 0"].stats.rounds <= steps
    # the fixture's untrained network predicts large clean samples, and DPM-Solver does not clip them: the
    # actions can reach ~1e5-1e6 px, so "within 1e-5" is relative to their size (float32 rounding)
    for name, out in runs.items():
        for key in ("action", "action_pred"):
            assert torch.isfinite(out[key]).all()
            torch.testing.assert_close(out[key], expected[key], rtol=1e-5, atol=1e-5,
                                       msg=lambda m, name=name, key=key: f"{name}, {key}: {m}")
