"""Choosing DPM-Solver++ (``scheduler='dpmsolver++'``, ``solver_order``) on every path: spec, policy, eval config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_sampler_seam import obs_stream, small_policy

from para_policy.evaluation import EvalConfigError, sampler_config
from para_policy.evaluation.config import baseline_config
from para_policy.samplers import SamplerOptionError, sampler_spec
from para_policy.samplers.registry import build_schedule, schedule_key, scheduler_kind
from para_policy.schedule import MultistepSchedule, build_scheduler

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def test_dpm_spec_builds_and_records_its_order():
    spec = sampler_spec("sequential", scheduler="dpmsolver++", num_inference_steps=10, solver_order=3)
    assert (spec.scheduler, spec.num_inference_steps, spec.solver_order) == ("dpmsolver++", 10, 3)
    assert spec.as_dict()["solver_order"] == 3
    assert sampler_spec(spec, solver_order=1).solver_order == 1
    assert spec.with_options(scheduler="sde-dpmsolver++").scheduler == "sde-dpmsolver++"
    with pytest.raises(SamplerOptionError, match="solver_order is DPM-Solver\\+\\+'s order: it needs scheduler"):
        sampler_spec("sequential", scheduler="ddim", solver_order=2)
    with pytest.raises(SamplerOptionError, match="solver_order must be 1, 2 or 3"):
        sampler_spec("sequential", scheduler="dpmsolver++", solver_order=4)
    policy = small_policy()  # DDPM-trained: solver_order with the checkpoint's scheduler is refused when built
    with pytest.raises(SamplerOptionError, match="order, but the schedule is 'ddpm'"):
        policy.set_sampler("sequential", solver_order=2)


def test_dpm_on_a_ddpm_trained_policy_paradigms_at_tolerance_0_equals_sequential():
    policy = small_policy()
    obs = {"obs": obs_stream(1, batch=2)[0]}
    common = dict(scheduler="dpmsolver++", num_inference_steps=10)
    seq = policy.predict_action(obs, generator=torch.Generator().manual_seed(0),
                                sampler=sampler_spec("sequential", **common))["action"]
    par = policy.predict_action(obs, generator=torch.Generator().manual_seed(0),
                                sampler=sampler_spec("paradigms", window=10, tolerance=0.0, warm_start=False,
                                                     **common))["action"]
    # the untrained net's clean-sample predictions are large and DPM-Solver does not clip them: the actions
    # reach ~1e6, so "equal" is float32 rounding relative to their scale
    assert torch.isfinite(seq).all() and (par - seq).abs().max() <= 1e-5 * seq.abs().max()
    schedule = policy.schedule_for(sampler_spec("sequential", **common))
    assert isinstance(schedule, MultistepSchedule) and (schedule.kind, schedule.order) == ("dpmsolver++", 2)
    three = policy.schedule_for(sampler_spec("sequential", solver_order=3, **common))
    assert three.order == 3 and three is not schedule  # the order is part of the cache key


def test_dpm_trained_scheduler_kind_key_and_derivations():
    dpm = build_scheduler({"_target_": "diffusers.DPMSolverMultistepScheduler", "num_train_timesteps": 100,
                           "beta_schedule": "squaredcos_cap_v2", "solver_order": 3})
    assert scheduler_kind(dpm) == "dpmsolver++"
    assert schedule_key(sampler_spec("sequential"), dpm, 10) == ("dpmsolver++", 10, 3)  # the checkpoint's order
    assert build_schedule(sampler_spec("sequential"), dpm, 10).order == 3
    assert build_schedule(sampler_spec("sequential", solver_order=1), dpm, 10).order == 1
    assert build_schedule(sampler_spec("sequential", scheduler="sde-dpmsolver++"), dpm, 10).kind == "sde-dpmsolver++"
    assert build_schedule(sampler_spec("sequential", scheduler="ddim"), dpm, 10).kind == "ddim"
    assert build_schedule(sampler_spec("sequential", scheduler="ddpm"), dpm, 10).kind == "ddpm"


def test_eval_config_takes_solver_order():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["sampler=sequential", "sampler.scheduler=dpmsolver++",
                                                     "sampler.solver_order=3"])
    spec = sampler_config(cfg.sampler)
    assert spec == sampler_spec("sequential", scheduler="dpmsolver++", solver_order=3)
    assert baseline_config(spec, "dpmsolver++", 10).solver_order == 3
    with pytest.raises(EvalConfigError, match="sampler.solver_order is DPM-Solver"):
        sampler_config({"name": "paradigms", "scheduler": "ddim", "solver_order": 2})
