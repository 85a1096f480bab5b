"""backend='onnxruntime' / 'auto' (para_policy.inference, para_policy.onnx_backend) against eager PyTorch.

Eager PyTorch is the reference throughout: the shipped PushT UNet exported to ONNX gives its outputs
within 1e-5 at every row count and its actions on the same noise; the 'auto' dispatcher follows its
rule on given curves; bad combinations and a missing onnxruntime get clear errors.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval import ckpt, compose_eval, run_eval  # noqa: F401  (fixture)
from test_policy import ACT_DIM, HORIZON, OBS_DIM, TO, tiny_policy

from para_policy import window
from para_policy.devices import use_devices
from para_policy.evaluation import EvalConfigError, runner
from para_policy.extras import MissingExtraError
from para_policy.inference import RowDispatchDenoiser, configure_inference, make_denoiser
from para_policy.loading import load_policy
from para_policy.models.transformer import TransformerForDiffusion
from para_policy.samplers import sampler_spec

pytest.importorskip("onnxruntime")

ASSET = Path(__file__).resolve().parents[1] / "para_policy" / "assets" / "pusht_lowdim.safetensors"


@pytest.fixture(scope="module")
def eager():
    return load_policy(ASSET, sampler="sequential")


@pytest.fixture(scope="module")
def onnx():
    """The shipped policy with backend='onnxruntime', exported once for the module."""
    return configure_inference(load_policy(ASSET, sampler="sequential"), backend="onnxruntime")


def unet_inputs(n: int, seed: int = 0, shape: tuple[int, int] = (16, 2), cond_dim: int = 40):
    """``(x (n, T, D), t (n,) int64, global_cond (n, G))``: the shipped UNet's by default."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=g), torch.randint(0, 100, (n,), generator=g),
            torch.randn(n, cond_dim, generator=g))


def tiny_inputs(n: int):
    return unet_inputs(n, shape=(HORIZON, ACT_DIM), cond_dim=OBS_DIM * TO)


@pytest.mark.parametrize("rows", [1, 3, 64, 100])
def test_shipped_unet_matches_eager_within_1e5_at_every_row_count(onnx, rows):
    x, t, c = unet_inputs(rows, seed=rows)
    assert t.dtype == torch.int64  # the samplers' timesteps
    with torch.inference_mode():
        ref = onnx.model(x, t, global_cond=c)  # eager PyTorch, the same weights
        out = onnx.denoise(x, t, c)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.device.type == "cpu"
    assert (out - ref).abs().max().item() < 1e-5
    with torch.inference_mode():  # fractional timesteps are embedded as given, as in eager
        frac = t.float() + 0.5
        assert (onnx.denoise(x, frac, c) - onnx.model(x, frac, global_cond=c)).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def reference(eager):
    """Two observations and eager PyTorch's sequential DDPM-100 sample of them (noise seed 3)."""
    obs = {"obs": torch.rand(2, 2, 20, generator=torch.Generator().manual_seed(1)) * 400 + 50}
    return obs, eager.predict_action(obs, generator=torch.Generator().manual_seed(3))


def test_sequential_actions_match_eager_on_the_same_noise(onnx, reference):
    assert onnx.inference == {"backend": "onnxruntime"}
    obs, ref = reference
    out = onnx.predict_action(obs, generator=torch.Generator().manual_seed(3))
    assert (out["action"] - ref["action"]).abs().max().item() < 1e-4  # pixels (float32 ulp at 512 is 6e-5)
    assert (out.trajectory - ref.trajectory).abs().max().item() < 1e-5


def test_paradigms_at_tolerance_0_gives_the_eager_sequential_actions(onnx, reference):
    obs, ref = reference
    out = onnx.predict_action(obs, generator=torch.Generator().manual_seed(3), sampler="paradigms",
                              tolerance=0.0, window=4, warm_start=False)
    assert out.spec.name == "paradigms" and out.stats.model_evals > out.stats.rounds  # batched rounds ran
    assert (out["action"] - ref["action"]).abs().max().item() < 1e-4
    assert (out.trajectory - ref.trajectory).abs().max().item() < 1e-5


def test_inference_settings_key_the_window_cache(eager, onnx):
    spec = sampler_spec("paradigms")
    keys = {p: p.session.window_key(spec, p.schedule_for(spec), 1, p.window_identity()) for p in (eager, onnx)}
    denoiser_id = {p: json.loads(json.loads(key)["denoiser"]) for p, key in keys.items()}
    assert denoiser_id == {eager: {}, onnx: {"backend": "onnxruntime"}}  # eager keeps the keys of earlier caches


def fake(ms_eager: dict[int, float], ms_onnx: dict[int, float]) -> RowDispatchDenoiser:
    def named(name):
        return lambda x, t, c=None: torch.full_like(x, float(name == "onnxruntime"))

    return RowDispatchDenoiser({"eager": named("eager"), "onnxruntime": named("onnxruntime")},
                               {"eager": ms_eager, "onnxruntime": ms_onnx})


def test_auto_rule_uses_the_backend_faster_at_the_next_measured_row_count():
    d = fake({1: 5.0, 4: 6.0, 16: 8.0, 64: 20.0}, {1: 1.0, 4: 7.0, 16: 7.5, 64: 30.0})
    assert d.choice == {1: "onnxruntime", 4: "eager", 16: "onnxruntime", 64: "eager"}
    expected = {1: "onnxruntime", 2: "eager", 4: "eager", 5: "onnxruntime", 16: "onnxruntime", 17: "eager",
                64: "eager", 500: "eager"}
    for rows, name in expected.items():
        assert d.backend_for(rows) == name
        out = d(torch.zeros(rows, 16, 2), torch.zeros(rows, dtype=torch.long), None)
        assert out.shape == (rows, 16, 2) and bool((out == float(name == "onnxruntime")).all())
    assert fake({1: 2.0, 100: 9.0}, {1: 3.0, 100: 1.0}).backend_for(1000) == "onnxruntime"  # past the largest
    assert fake({1: 2.0}, {1: 2.0}).choice == {1: "eager"}  # ties go to the first backend
    with pytest.raises(ValueError, match="same row counts"):
        fake({1: 1.0, 2: 1.0}, {1: 1.0})


def test_auto_built_dispatcher_measures_both_and_matches_eager(monkeypatch):
    monkeypatch.setattr(window, "DEFAULT_BATCHES", (1, 8))  # a short measurement; 100 rows take 8's backend
    policy = configure_inference(load_policy(ASSET, sampler="sequential"), backend="auto")
    d = policy.runtime.denoiser
    assert isinstance(d, RowDispatchDenoiser) and policy.inference == {"backend": "auto"}
    assert set(d.curves) == {"eager", "onnxruntime"} and all(set(c) == {1, 8} for c in d.curves.values())
    assert set(d.choice) == {1, 8} and set(d.choice.values()) <= {"eager", "onnxruntime"}
    for rows in (1, 100):
        x, t, c = unet_inputs(rows, seed=7)
        with torch.inference_mode():
            err = (policy.denoise(x, t, c) - policy.model(x, t, global_cond=c)).abs().max().item()
        assert err < 1e-5


def test_unconditioned_inpainting_unet_and_transformer_run_too():
    policy = tiny_policy(global_cond=False).set_sampler("sequential", num_inference_steps=8)
    obs = {"obs": torch.rand(2, TO, OBS_DIM, generator=torch.Generator().manual_seed(0)) * 500}
    ref = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))
    configure_inference(policy, backend="onnxruntime")
    out = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))
    assert (out.trajectory - ref.trajectory).abs().max().item() < 1e-5
    torch.manual_seed(0)  # a transformer with an observation encoder (PyTorch's fused-layer fast path in eager)
    net = TransformerForDiffusion(input_dim=2, output_dim=2, horizon=8, n_obs_steps=2, cond_dim=5, n_layer=2,
                                  n_head=2, n_emb=32, n_cond_layers=1).eval()
    fn = make_denoiser(net, backend="onnxruntime", condition_kw="cond")
    for rows in (1, 5):
        g = torch.Generator().manual_seed(rows)
        x, t, c = torch.randn(rows, 8, 2, generator=g), torch.randint(0, 100, (rows,)), torch.randn(rows, 2, 5)
        with torch.inference_mode():
            assert (fn(x, t, c) - net(x, t, cond=c)).abs().max().item() < 1e-5
    assert not net.training  # exporting keeps the model's mode


def test_weights_changed_in_place_are_re_exported():
    policy = configure_inference(tiny_policy(), backend="onnxruntime")
    x, t, c = tiny_inputs(3)
    other = tiny_policy(seed=1)
    policy.model.load_state_dict(other.model.state_dict())
    with torch.inference_mode():
        assert (policy.denoise(x, t, c) - other.model(x, t, global_cond=c)).abs().max().item() < 1e-5


def test_bad_backends_and_combinations_are_named():
    policy = tiny_policy()
    with pytest.raises(ValueError, match="backend must be one of"):
        configure_inference(policy, backend="tensorrt")
    with pytest.raises(ValueError, match=r"cannot be combined with precision='bf16'"):
        configure_inference(policy, precision="bf16", backend="onnxruntime")
    with pytest.raises(ValueError, match="cannot be combined with compile"):
        configure_inference(policy, compile=True, backend="auto")
    use_devices(policy, ["cpu", "cpu"])
    with pytest.raises(ValueError, match="cannot be combined with devices"):
        configure_inference(policy, backend="onnxruntime")
    use_devices(policy, None)
    meta = copy.deepcopy(policy.model).to("meta")
    for backend in ("onnxruntime", "auto"):
        with pytest.raises(ValueError, match="runs the model on the CPU, but it is on meta"):
            make_denoiser(meta, backend=backend, example=((HORIZON, ACT_DIM), torch.zeros(1, OBS_DIM * TO)))
    with pytest.raises(ValueError, match="float32 models only"):
        make_denoiser(copy.deepcopy(policy.model).double(), backend="onnxruntime")
    with pytest.raises(ValueError, match="backend='auto' measures"):
        make_denoiser(policy.model, backend="auto")


def test_missing_onnxruntime_names_the_extra_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    policy = tiny_policy()
    with pytest.raises(MissingExtraError, match=r"pip install 'para_policy\[onnx\]'"):
        configure_inference(policy, backend="onnxruntime")
    with pytest.warns(UserWarning, match="backend='auto' runs eagerly") as record:
        configure_inference(policy, backend="auto")
    assert len(record) == 1
    x, t, c = tiny_inputs(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, when built; none per call
        with torch.inference_mode():
            assert torch.equal(policy.denoise(x, t, c), policy.model(x, t, global_cond=c))


def test_evaluator_checks_the_backend(ckpt, tmp_path):  # noqa: F811
    with pytest.raises(EvalConfigError, match=r"inference: backend must be one of \['eager', 'onnxruntime', 'auto', "
                       r"'default'\]"):
        run_eval(ckpt, tmp_path, "+inference.backend=tensorrt")
    with pytest.raises(EvalConfigError, match="cannot be combined with precision='bf16'"):
        run_eval(ckpt, tmp_path, "+inference.backend=onnxruntime", "+inference.precision=bf16")
    settings = runner._eval_settings(compose_eval(["+inference.backend=onnxruntime"]))
    assert settings["inference"]["backend"] == "onnxruntime"
    opts = runner._eval_settings(compose_eval(["+inference.backend=eager"]))
    applied, note = runner._configure_inference(load_policy(ckpt, backend="eager"), opts)
    assert "backend" not in applied and "backend eager" in note  # eager runs keep their fingerprint


def test_image_policy_runs_its_unet_on_onnxruntime():
    path = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "dp_image_A.ckpt"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared fixtures sit beside the checkout)")
    policy = load_policy(path, sampler="sequential", num_inference_steps=20)
    g = torch.Generator().manual_seed(0)
    obs = {k: torch.rand(1, policy.n_obs_steps, *s, generator=g) for k, s in policy.observation_shapes().items()}
    ref = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))
    configure_inference(policy, backend="onnxruntime")  # the encoder stays eager, the UNet is exported
    out = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))
    assert (out.trajectory - ref.trajectory).abs().max().item() < 1e-5


def test_as_feed_passes_a_float32_array_through_and_converts_the_rest() -> None:
    from para_policy.onnx_backend import as_feed

    a = torch.randn(2, 3)
    assert as_feed(a).dtype == np.float32 and np.shares_memory(as_feed(a), a.numpy())  # no copy
    for other in (a.to(torch.bfloat16), a.t(), a.clone().requires_grad_(), a[None].expand(2, 2, 3)):
        feed = as_feed(other)
        assert feed.dtype == np.float32 and feed.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(feed, other.detach().float().numpy())
