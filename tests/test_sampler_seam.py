"""One seam from sampler choice to denoiser: one constructor, the same spec on every path, warm starts
for callers that keep no state, window='auto' everywhere, composed denoiser wrappers, layering."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dp_checkpoint import ACT_DIM, NA, OBS_DIM, TO, DPStandIn
from test_policy import tiny_policy

from para_policy import Controller, load_policy, save_checkpoint
from para_policy.evaluation import EvalConfigError, sampler_config
from para_policy.integrations import patch, unpatch
from para_policy.samplers import PRESETS, SamplerConfig, SamplerOptionError, sampler_spec
from para_policy.window import CACHE_ENV, CACHE_FILE

STEPS = 20


def small_policy(seed: int = 0):
    policy = tiny_policy(seed=seed)
    policy.num_inference_steps = policy.config["num_inference_steps"] = STEPS
    return policy


def obs_stream(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """(n, batch, TO, OBS_DIM) observation windows of a slowly drifting state."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(100, 400, (batch, 1, OBS_DIM)) + np.cumsum(rng.normal(0, 3, (batch, n + TO, OBS_DIM)), 1)
    return torch.tensor(np.stack([x[:, i: i + TO] for i in range(n)]), dtype=torch.float32)


# ---- one constructor, one meaning --------------------------------------------------------

def test_every_path_builds_the_same_spec_for_a_name(tmp_path):
    expected = sampler_spec("paradigms", tolerance=0.05)
    policy = small_policy()
    path = save_checkpoint(tmp_path / "p.safetensors", policy.state_dict(), policy.config)
    assert load_policy(path, tolerance=0.05).sampler == expected  # default: the paradigms preset
    assert small_policy().set_sampler("paradigms", tolerance=0.05).sampler == expected
    assert Controller(policy, tolerance=0.05).spec == expected
    assert sampler_config({"name": "paradigms", "tolerance": 0.05, "window": None}) == expected
    dp = patch(DPStandIn(True), tolerance=0.05)
    assert vars(dp)["_para_patch"].spec == expected
    unpatch(dp)
    assert sampler_spec("paradigms").options == {"window": "auto", "tolerance": 0.02, "max_iterations": None,
                                                 "per_sample_windows": True, "linear_solve": True, "secant": True,
                                                 "round_shape": "compact", "compile_round": False}
    assert sampler_spec("paradigms").warm_start and not sampler_spec("paradigms_published").warm_start
    assert sampler_spec("parataa").options["memory"] == 3 and set(PRESETS) == {
        "paradigms", "paradigms_published", "parataa", "sequential", "asyncdiff", "patches"}


@pytest.mark.parametrize("options, message", [
    ({"tolerance": math.inf}, "tolerance must be a finite number >= 0"),
    ({"tolerance": math.nan}, "tolerance must be a finite number >= 0"),
    ({"tolerance": -0.1}, "tolerance must be a finite number >= 0"),
    ({"tolerance": True}, "tolerance must be a finite number >= 0"),
    ({"window": 0}, "window must be an integer >= 1"),
    ({"window": 2.5}, "window must be an integer >= 1"),
    ({"window": "fast"}, "window must be an integer >= 1 or 'auto'"),
    ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1"),
    ({"max_iterations": 0}, "max_iterations must be an integer >= 1"),
    ({"linear_solve": False}, "secant=True needs linear_solve=True"),
    ({"per_sample_windows": "yes"}, "per_sample_windows must be true or false"),
    ({"warm_start": 1}, "warm_start must be true or false"),
    ({"scheduler": "euler"}, "unknown scheduler 'euler'"),
    ({"memory": 3}, "does not take \\['memory'\\]"),
    ({"windw": 4}, "does not take \\['windw'\\]"),
])
def test_bad_options_are_refused_when_the_sampler_is_chosen(options, message):
    with pytest.raises(SamplerOptionError, match=message):
        sampler_spec("paradigms", **options)
    policy = small_policy()
    with pytest.raises(ValueError, match=message):
        policy.set_sampler("paradigms", **options)
    with pytest.raises(ValueError, match=message):
        Controller(policy, **options)
    with pytest.raises(EvalConfigError, match=message):
        sampler_config({"name": "paradigms", **options})


def test_names_and_family_rules():
    with pytest.raises(SamplerOptionError, match="unknown sampler 'fastest'"):
        sampler_spec("fastest")
    with pytest.raises(SamplerOptionError, match="'paraddim' is now sampler='paradigms_published', scheduler='ddim'"):
        sampler_spec("paraddim")
    with pytest.raises(SamplerOptionError, match="warm_start needs a Picard sampler"):
        sampler_spec("sequential", warm_start=True)
    with pytest.raises(SamplerOptionError, match="takes no options"):
        sampler_spec("sequential", window=4)
    with pytest.raises(SamplerOptionError, match="memory must be an integer >= 1"):
        sampler_spec("parataa", memory=0)
    spec = sampler_spec("paradigms_published", scheduler="ddim", num_inference_steps=16)
    assert (spec.scheduler, spec.num_inference_steps, spec.options["window"]) == ("ddim", 16, 16)
    assert sampler_spec(spec, tolerance=0.0).options["tolerance"] == 0.0 and spec.options["tolerance"] == 0.1
    assert SamplerConfig("paradigms") == sampler_spec("paradigms")  # the dataclass fills in the preset too
    with pytest.raises(ValueError, match="DDPM schedule cannot be derived"):
        p = small_policy()
        p.noise_scheduler = __import__("conftest").dp_ddim()
        p.set_sampler("sequential", scheduler="ddpm")


# ---- warm start where the caller keeps no state ---------------------------------------------

def test_predict_action_in_a_loop_warm_starts_and_resets():
    policy = small_policy().set_sampler("paradigms", window=8, tolerance=0.1)
    stream = obs_stream(4)
    outs = [policy.predict_action({"obs": o}, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(stream)]
    assert [o.warm for o in outs] == [False, True, True, True]
    assert outs[0].stats is policy.last_stats or outs[-1].stats is policy.last_stats
    assert all(o.spec.options["window"] == 8 for o in outs)
    # a new batch shape starts cold, and so does the call after reset()
    assert not policy.predict_action({"obs": stream[0].repeat(2, 1, 1)}).warm
    assert not policy.predict_action({"obs": stream[0]}).warm
    assert policy.predict_action({"obs": stream[1]}).warm
    policy.reset()
    assert not policy.predict_action({"obs": stream[2]}).warm
    # switched off: never warm; an explicit False starts cold too
    off = small_policy().set_sampler("paradigms", window=8, warm_start=False)
    assert not any(off.predict_action({"obs": o}).warm for o in stream[:3])
    assert not policy.predict_action({"obs": stream[3]}, warm_start=False).warm


@pytest.mark.parametrize("global_cond", [True, False])
def test_warm_started_loop_at_tolerance_0_equals_sequential(global_cond):
    policy = tiny_policy(global_cond)
    policy.num_inference_steps = STEPS
    policy.set_sampler("paradigms", window=8, tolerance=0.0)
    seq = tiny_policy(global_cond)
    seq.num_inference_steps = STEPS
    seq.set_sampler("sequential")
    for i, o in enumerate(obs_stream(4, batch=2, seed=1)):
        fast = policy.predict_action({"obs": o}, generator=torch.Generator().manual_seed(i))
        ref = seq.predict_action({"obs": o}, generator=torch.Generator().manual_seed(i))
        assert fast.warm == (i > 0)
        torch.testing.assert_close(fast["action"], ref["action"], rtol=0, atol=2e-3)


def test_patched_policy_in_a_loop_warm_starts_and_matches_the_original_at_tolerance_0():
    dp = DPStandIn(True, seed=3)
    stream = obs_stream(4, batch=2, seed=2)

    def run(p):
        outs = []
        for i, o in enumerate(stream):
            torch.manual_seed(i)
            outs.append(p.predict_action({"obs": o})["action"])
        return outs

    before = run(dp)
    patch(dp, window=8, tolerance=0.0)
    patched = run(dp)
    assert dp.para_stats.warm
    for a, b in zip(patched, before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
    dp.reset()  # DiffusionPolicy's reset() forgets the previous chunk
    torch.manual_seed(0)
    dp.predict_action({"obs": stream[0]})
    assert not dp.para_stats.warm
    unpatch(dp)
    assert "reset" not in vars(dp) and "conditional_sample" not in vars(dp)


# ---- window='auto' everywhere -----------------------------------------------------------------

def test_window_auto_works_on_every_path_and_is_cached(tmp_path, monkeypatch):
    policy = small_policy()
    path = save_checkpoint(tmp_path / "p.safetensors", policy.state_dict(), policy.config)
    loaded = load_policy(path, tolerance=0.0)  # the paradigms preset: window auto
    o = obs_stream(1)[0]
    out = loaded.predict_action({"obs": o}, generator=torch.Generator().manual_seed(0))
    window = out.spec.options["window"]
    assert isinstance(window, int) and 1 <= window <= STEPS
    tuning = loaded.window_tuning(loaded.sampler)
    assert tuning["window"] == window and set(tuning["rounds"]) <= {1, 8, 16, STEPS}
    cache = Path(tmp_path / "para_policy_cache" / CACHE_FILE)
    assert cache.is_file() and len(json.loads(cache.read_text())) == 1
    ref = small_policy().predict_action({"obs": o}, generator=torch.Generator().manual_seed(0))  # sequential
    torch.testing.assert_close(out["action"], ref["action"], rtol=0, atol=2e-3)
    # another object with the same weights reuses the window (here: from the file, this process forgot it)
    from para_policy import window as window_module

    window_module._MEMORY.clear()
    again = load_policy(path, tolerance=0.0)
    assert again.resolve(obs=o).options["window"] == window
    assert again.window_tuning()["source"] == str(cache)
    # Controller and patch resolve it too
    ctl = Controller(again, tolerance=0.0, seed=0)
    assert ctl.predict_chunk(o[0].numpy()).shape == (NA, ACT_DIM) and ctl.spec.options["window"] == window
    assert ctl.window_tuning["window"] == window
    dp = patch(DPStandIn(True), tolerance=0.1)
    torch.manual_seed(0)
    dp.predict_action({"obs": o})
    assert 1 <= dp.para_stats.rounds <= STEPS
    unpatch(dp)
    # with the cache file off, nothing is written
    monkeypatch.setenv(CACHE_ENV, "off")
    window_module._MEMORY.clear()
    cache.unlink()
    load_policy(path).resolve(obs=o)
    assert not cache.exists()


def test_calibrate_replaces_the_cached_window():
    policy = small_policy().set_sampler("paradigms", window=4)
    window, info = policy.calibrate([obs_stream(1)[0][0].numpy()], reps=1)
    assert info["source"] == "measured" and policy.window_tuning()["window"] == window
    assert policy.resolve(sampler_spec("paradigms")).options["window"] == window
    with pytest.raises(ValueError, match="Picard sampler"):
        policy.calibrate([np.zeros((TO, OBS_DIM))], sampler_spec("sequential"))


# ---- denoiser wrappers compose ------------------------------------------------------------------

def test_precision_and_devices_compose():
    from para_policy.devices import use_devices
    from para_policy.inference import configure_inference

    policy = small_policy()
    x, t, c = torch.randn(3, 8, ACT_DIM), torch.tensor([1, 5, 9]), torch.randn(3, OBS_DIM * TO)
    with torch.inference_mode():
        plain = policy.denoise(x, t, c)
        configure_inference(policy, precision="bf16")
        bf16 = policy.denoise(x, t, c)
        use_devices(policy, ["cpu", "cpu"])  # keeps bf16
        assert policy.inference == {"precision": "bf16", "devices": ["cpu", "cpu"]}
        both = policy.denoise(x, t, c)
        configure_inference(policy)  # keeps the devices
        assert policy.inference == {"devices": ["cpu", "cpu"]}
        two = policy.denoise(x, t, c)
    assert not torch.equal(bf16, plain) and (bf16 - plain).abs().max() < 0.1
    torch.testing.assert_close(both, bf16, rtol=0, atol=1e-2)
    torch.testing.assert_close(two, plain, rtol=0, atol=1e-5)
    use_devices(policy, None)
    assert policy.inference == {} and policy.runtime.denoiser is None


# ---- layering --------------------------------------------------------------------------------------

PACKAGE = Path(__file__).resolve().parents[1] / "para_policy"
# what each lower layer may import from para_policy (module prefixes)
ALLOWED = {
    "schedule": set(),
    "samplers": {"para_policy.samplers", "para_policy.schedule"},
    "models": {"para_policy.models"},
    "normalizer": set(),
}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("para_policy")}


def test_lower_layers_import_nothing_above_them():
    for layer, allowed in ALLOWED.items():
        files = sorted((PACKAGE / layer).rglob("*.py")) if (PACKAGE / layer).is_dir() else [PACKAGE / f"{layer}.py"]
        for f in files:
            bad = {m for m in imports_of(f) if not any(m == a or m.startswith(a + ".") for a in allowed)}
            assert not bad, f"{f.relative_to(PACKAGE)} imports {sorted(bad)} above its layer"


def test_no_import_cycles_at_module_level():
    """Module-level imports between para_policy modules form no cycle (deferred imports inside functions aside)."""
    def module_of(path: Path) -> str:
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    graph: dict[str, set[str]] = {}
    for f in PACKAGE.rglob("*.py"):
        top = set()
        for node in ast.parse(f.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("para_policy"):
                top.add(node.module)
            elif isinstance(node, ast.Import):
                top.update(a.name for a in node.names if a.name.startswith("para_policy"))
        graph[module_of(f)] = top
    for mod in graph:
        graph[mod] = {m for m in graph[mod] if m in graph and m != mod and not mod.startswith(m + ".")}

    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n):], n]))
            if n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
