"""backend='default' (issue 26): ``load_policy`` runs the fastest installed runtime unless told otherwise.

On a CPU with onnxruntime installed that is ``'auto'`` (eager or ONNX Runtime per row count), said in a
log line, its cost curves timed once per machine and architecture and cached; eager when forced (the
argument or ``PARA_POLICY_BACKEND``), for eager-only settings, or without the ``[onnx]`` extra; picked
again when the policy moves. The evaluator runs its sequential baseline on the candidate's backend.
The conftest pins ``PARA_POLICY_BACKEND=eager`` for the rest of the suite; these tests unset it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging

import pytest
import torch
from test_eval import ckpt, compose_eval, run_eval  # noqa: F401  (fixture)

from para_policy import inference, window
from para_policy.devices import use_devices
from para_policy.evaluation import runner
from para_policy.inference import RowDispatchDenoiser
from para_policy.loading import load_policy

pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    monkeypatch.delenv(inference.BACKEND_ENV, raising=False)
    monkeypatch.setattr(window, "DEFAULT_BATCHES", (1, 8))  # a short timing of 'auto'; 100 rows take 8's backend


def test_default_is_auto_on_a_cpu_with_onnxruntime_logged_and_cached(ckpt, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="para_policy")
    policy = load_policy(ckpt, sampler="sequential")
    assert policy.inference == {"backend": "auto"} and isinstance(policy.runtime.denoiser, RowDispatchDenoiser)
    assert policy.backend_choice is not None and policy.backend_choice[0] == "auto"
    assert "backend='default' -> 'auto'" in caplog.text and "timed in" in caplog.text
    cached = json.loads(window.cache_path(inference.CURVES_FILE).read_text())
    assert len(cached) == 1 and set(next(iter(cached.values()))) == {"eager", "onnxruntime"}
    caplog.clear()
    again = load_policy(ckpt, sampler="sequential")  # the curves come from the cache: nothing timed
    assert again.runtime.denoiser.curves == policy.runtime.denoiser.curves and "timed in" not in caplog.text
    eager = load_policy(ckpt, sampler="sequential", backend="eager")
    assert eager.inference == {} and eager.backend_choice is None and eager.runtime.denoiser is None
    obs = {"obs": torch.rand(2, 2, 20, generator=torch.Generator().manual_seed(0)) * 400 + 50}
    out, ref = (p.predict_action(obs, generator=torch.Generator().manual_seed(1)) for p in (policy, eager))
    assert (out.trajectory - ref.trajectory).abs().max().item() < 1e-5


def test_forced_eager_and_eager_only_settings_and_missing_onnx(ckpt, monkeypatch):  # noqa: F811
    monkeypatch.setenv(inference.BACKEND_ENV, "eager")
    policy = load_policy(ckpt, sampler="sequential")
    assert policy.inference == {} and policy.backend_choice == ("eager", "PARA_POLICY_BACKEND=eager")
    monkeypatch.setenv(inference.BACKEND_ENV, "tensorrt")
    with pytest.raises(ValueError, match="PARA_POLICY_BACKEND='tensorrt'"):
        load_policy(ckpt)
    monkeypatch.delenv(inference.BACKEND_ENV)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime"
                        else find_spec(name, *a))
    policy = load_policy(ckpt, sampler="sequential")
    assert policy.inference == {} and "pip install 'para_policy[onnx]'" in policy.backend_choice[1]
    with pytest.raises(ValueError, match="backend must be one of"):
        load_policy(ckpt, backend="fastest")


def test_default_is_picked_again_after_settings_moves_and_copies(ckpt):  # noqa: F811
    policy = load_policy(ckpt, sampler="sequential")
    assert policy.inference == {"backend": "auto"}
    use_devices(policy, ["cpu", "cpu"])  # an eager-only setting: eager, not a clash
    assert policy.inference == {"devices": ["cpu", "cpu"]} and policy.backend_choice[0] == "eager"
    use_devices(policy, None)
    assert policy.inference == {"backend": "auto"}
    policy.to(torch.float64)  # ONNX Runtime runs float32 only
    assert policy.inference == {} and "float64" in policy.backend_choice[1]
    policy.to(torch.float32)
    assert policy.inference == {"backend": "auto"}
    twin = copy.deepcopy(policy)  # its own sessions over its own weights
    assert twin.inference == {"backend": "auto"} and twin.runtime.denoiser.backends["onnxruntime"].model is twin.model
    with torch.no_grad():
        next(twin.model.parameters()).mul_(0.5)
    x, t, c = torch.randn(1, 16, 2), torch.tensor([5]), torch.randn(1, 40)
    with torch.inference_mode():
        assert (twin.denoise(x, t, c) - twin.model(x, t, global_cond=c)).abs().max().item() < 1e-5


def test_evaluator_runs_the_baseline_on_the_candidates_default_backend(ckpt, tmp_path, monkeypatch):  # noqa: F811
    assert runner._eval_settings(compose_eval())["inference"]["backend"] == "default"
    seen = []
    roll_out = runner.roll_out_seeds

    def recording(policy, spec, *args, **kwargs):
        seen.append((kwargs["role"], spec.name, dict(policy.inference), policy.runtime.denoiser))
        return roll_out(policy, spec, *args, **kwargs)

    monkeypatch.setattr(runner, "roll_out_seeds", recording)
    results = run_eval(ckpt, tmp_path, "task.episodes=1", "task.max_steps=8", "latency.calls=2", "sampler.window=4",
                       "video.enabled=false")
    (_, cand, cand_inf, cand_fn), (_, base, base_inf, base_fn) = seen
    assert (cand, base) == ("paradigms", "sequential") and [r for r, *_ in seen] == ["candidate", "baseline"]
    assert cand_inf == base_inf == {"backend": "auto"} and cand_fn is base_fn
    assert results["inference"]["backend"] == "auto" and "sequential baseline" in results["inference"]["note"]
    assert "- inference: backend auto for the candidate and the sequential baseline" in \
        (tmp_path / runner.SUMMARY_FILE).read_text()
