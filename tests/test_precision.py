"""Precision: the network in bfloat16 or float16 (autocast, or cast weights), the sampler at float32.

The contract: samplers keep their state at float32 whatever the network's dtype; the denoiser
wrappers cast each call's input to the network's dtype and its output back; noise, known entries
and actions stay float32. Checked on every path a user samples through (``predict_action``,
``Controller.act``, a patched DiffusionPolicy object) for each preset: it runs, its actions are
finite float32, and their deviation from the float32 sequential actions is bounded by the
sequential loop's own deviation at the same precision (the independent reference), plus the
sampler's float32 deviation. The shipped PushT policy on DDIM-6 (a window of 3 for ``paradigms``,
so its window slides) and DiffusionPolicy's stand-in on DDPM-10 keep each case short.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dp_checkpoint import ACT_DIM, HORIZON, OBS_DIM, TO, DPStandIn

from para_policy import Controller, load_policy
from para_policy.integrations import patch
from para_policy.samplers import sampler_spec

CHECKPOINT = Path(__file__).resolve().parents[1] / "para_policy" / "assets" / "pusht_lowdim.safetensors"
SAMPLERS = ("sequential", "paradigms", "paradigms_published", "parataa")
#: name → (autocast dtype | None, how the weights are cast | None)
SETTINGS = {
    "autocast_bf16": (torch.bfloat16, None),
    "autocast_fp16": (torch.float16, None),
    "weights_bf16": (None, lambda m: m.to(torch.bfloat16)),
    "weights_fp16": (None, lambda m: m.half()),
}
#: the sequential loop's largest action deviation from float32 allowed, in PushT pixels (a bound
#: far above what rounding gives, far below a broken cast: actions span about 500 px)
SEQUENTIAL_BOUND = {"autocast_bf16": 8.0, "autocast_fp16": 2.0, "weights_bf16": 8.0, "weights_fp16": 2.0}


def spec(name: str, **schedule):
    """The preset on ``schedule`` (default DDIM-6); ``paradigms`` with a fixed window (no machine tuning)."""
    schedule = schedule or {"scheduler": "ddim", "num_inference_steps": 6}
    return sampler_spec(name, **schedule, **({"window": 3} if name == "paradigms" else {}))


def in_setting(module, setting: str):
    """``(module to run, context to run it in)``: a cast copy, or the module itself under autocast."""
    autocast, cast = SETTINGS[setting]
    if cast is not None:
        return cast(copy.deepcopy(module)), contextlib.nullcontext()
    return module, torch.autocast("cpu", dtype=autocast)


def check_deviation(setting: str, out: torch.Tensor, seq: torch.Tensor, ref_seq: torch.Tensor,
                    ref: torch.Tensor, scale: float = 1.0) -> None:
    """``out`` (a Picard sampler's, or the sequential one's) against the float32 sequential ``ref_seq``.

    ``seq``: the sequential loop at this precision; ``ref``: this sampler at float32; ``scale``:
    the bound's unit (PushT pixels: 1).
    """
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    seq_dev = float((seq - ref_seq).abs().max())
    assert 0 < seq_dev <= SEQUENTIAL_BOUND[setting] * scale, seq_dev  # rounding shows, and stays small
    dev, own = float((out - ref_seq).abs().max()), float((ref - ref_seq).abs().max())
    assert dev <= 2 * seq_dev + own + 0.1 * scale, (dev, seq_dev, own)


@pytest.fixture(scope="module")
def shipped():
    """The shipped policy, a batch-1 observation, each sampler's float32 actions (B, T, Da), a cache."""
    policy = load_policy(CHECKPOINT, sampler="sequential")
    obs = {"obs": torch.rand(1, 2, 20, generator=torch.Generator().manual_seed(0)) * 400 + 50}
    return policy, obs, {name: sample(policy, obs, name) for name in SAMPLERS}, {}


def sample(policy, obs, name):
    out = policy.predict_action(obs, generator=torch.Generator().manual_seed(1), sampler=spec(name),
                                **({"warm_start": False} if spec(name).iterative else {}))
    assert out["action"].dtype == out["action_pred"].dtype == out.trajectory.dtype == torch.float32
    return out["action_pred"]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_predict_action_in_low_precision(shipped, setting):
    policy, obs, ref, _ = shipped
    cast, context = in_setting(policy, setting)
    with context:
        out = {name: sample(cast, obs, name) for name in SAMPLERS}
    for name in SAMPLERS:
        check_deviation(setting, out[name], out["sequential"], ref["sequential"], ref[name])


def test_cast_policy_keeps_float32_normalizer_and_sampling_dtype():
    policy = load_policy(CHECKPOINT, sampler="sequential").to(torch.bfloat16)
    assert policy.dtype == torch.bfloat16 and policy.sample_dtype == torch.float32
    assert {p.dtype for p in policy.normalizer.parameters()} == {torch.float32}
    cond, _ = policy.conditioning(policy.check_obs(torch.zeros(1, 2, 20, dtype=torch.float64)))
    assert cond.dtype == torch.bfloat16  # what the network takes
    x = torch.zeros(3, *policy.trajectory_shape(1)[1:])
    assert policy.denoise(x, torch.tensor([1, 2, 3]), cond.expand(3, -1)).dtype == torch.float32
    policy.set_inference(precision="bf16")  # make_denoiser's wrapper casts the same way
    assert policy.denoise(x, torch.tensor([1, 2, 3]), cond.float().expand(3, -1)).dtype == torch.float32


def test_onnx_runtime_exports_float32_under_a_callers_autocast():
    """A first call under autocast exports the graph: it must trace the float32 network ONNX Runtime runs."""
    pytest.importorskip("onnxruntime")
    from test_policy import tiny_policy

    from para_policy.inference import configure_inference

    policy = configure_inference(tiny_policy(), backend="onnxruntime")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, *policy.trajectory_shape(1)[1:], generator=g), torch.tensor([1, 50, 99])
    c = torch.randn(3, policy.n_obs_steps * policy.obs_dim, generator=g)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = policy.denoise(x, t, c)
    with torch.inference_mode():
        assert out.dtype == torch.float32 and (out - policy.model(x, t, global_cond=c)).abs().max() < 1e-5


#: the Picard sampler each setting runs on the slower paths (each preset at least once), next to sequential
ROTATION = dict(zip(SETTINGS, ("paradigms", "paradigms_published", "parataa", "paradigms"), strict=True))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_controller_in_low_precision(shipped, setting):
    """Real-time chunking, the delay in steps: the second chunk has a frozen prefix, a guide and a warm start."""
    policy, name, cache = shipped[0], ROTATION[setting], shipped[3]
    obs = (np.random.default_rng(0).uniform(50, 450, (1, 20)) + np.arange(9)[:, None]).astype(np.float32)

    def run(module, sampler):
        ctl = Controller(module, sampler=spec(sampler), seed=3, mode="rtc", clock="steps", delay_steps=2)
        actions = [ctl.act(o) for o in obs]
        assert len(ctl.records) == 2 and all(a.dtype == np.float32 for a in actions)
        return torch.from_numpy(np.stack(actions))

    for sampler in ("sequential", name):  # float32 references, once per module
        if ("controller", sampler) not in cache:
            cache["controller", sampler] = run(policy, sampler)
    ref_seq, ref = cache["controller", "sequential"], cache["controller", name]
    cast, context = in_setting(policy, setting)
    with context:
        seq, out = run(cast, "sequential"), run(cast, name)
    check_deviation(setting, out, seq, ref_seq, ref)


def dp_problem(global_cond: bool):
    """DiffusionPolicy's ``conditional_sample`` inputs: ``(condition_data, condition_mask, global_cond | None)``."""
    g = torch.Generator().manual_seed(0)
    D = ACT_DIM if global_cond else ACT_DIM + OBS_DIM
    data, mask = torch.zeros(2, HORIZON, D), torch.zeros(2, HORIZON, D, dtype=torch.bool)
    if global_cond:
        return data, mask, torch.randn(2, TO * OBS_DIM, generator=g)
    data[:, :TO, ACT_DIM:] = torch.randn(2, TO, OBS_DIM, generator=g)
    mask[:, :TO, ACT_DIM:] = True
    return data, mask, None


@functools.cache
def dp_sample(global_cond: bool, name: str | None, setting: str | None = None) -> torch.Tensor:
    """A fresh stand-in (cast for a weights setting) patched with ``name`` (None: its own loop), sampled once.

    ``condition_data`` and ``global_cond`` come in the network's dtype, as DiffusionPolicy's
    ``predict_action`` makes them; the stand-in's own DDPM schedule at 10 steps, which draw noise.
    Cached: the float32 references serve every setting.
    """
    dp = DPStandIn(global_cond, seed=4)
    dp.num_inference_steps = 10
    autocast, cast = SETTINGS[setting] if setting else (None, None)
    if cast is not None:
        cast(dp)
    if name is not None:
        patch(dp, spec(name, num_inference_steps=None))
    dtype = next(dp.model.parameters()).dtype
    data, mask, cond = dp_problem(global_cond)
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        return dp.conditional_sample(data.to(dtype), mask, global_cond=None if cond is None else cond.to(dtype),
                                     generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_patched_diffusion_policy_in_low_precision(setting):
    """The patch samples at float32 and returns float32 whatever the network's dtype; its own loop is the reference."""
    picard = ("paradigms", "paradigms_published", "parataa")
    for mode, global_cond in enumerate((True, False)):
        name = picard[(2 * list(SETTINGS).index(setting) + mode) % len(picard)]
        ref_seq, ref = dp_sample(global_cond, None), dp_sample(global_cond, name)
        seq, out = dp_sample(global_cond, "sequential", setting), dp_sample(global_cond, name, setting)
        check_deviation(setting, out, seq, ref_seq, ref, scale=0.01)  # normalized units: ±1 is the action range
