"""The Picard round as a GPU would run it: shapes, host syncs, whole-graph compilation, precision.

References: the sequential loop (tolerance 0), the compacting round (the fixed shape must give
the same rounds and samples), and a count of every torch call (:class:`HostSyncCounter`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import MLPDenoiser, dp_ddim, dp_ddpm

from para_policy import load_policy
from para_policy.cuda_graphs import WeightsWatch
from para_policy.samplers import draw_noise, picard_sample, sequential_sample, taa_sample
from para_policy.samplers.captured import CapturedPicard, CapturedSequential
from para_policy.samplers.host_sync import HostSyncCounter
from para_policy.samplers.picard import compiled_round, initial_window_state, make_round_setup, picard_round
from para_policy.samplers.warm_start import warm_start_init
from para_policy.schedule import make_schedule

SHIPPED = "para_policy/assets/pusht_lowdim.safetensors"
B, T, D = 2, 8, 3
#: (name, sampler, options): the presets' solve strategies, and a fixed Jacobian
STRATEGIES = [
    ("prefix_sum", picard_sample, {"per_sample_windows": False}),
    ("linear_secant", picard_sample, {"linear_solve": True, "secant": True}),
    ("jacobian", picard_sample, {"linear_solve": True, "secant": True, "jacobian": "random"}),
    ("taa", taa_sample, {}),
]


def inputs(steps: int = 10, kind: str = "ddim", mask: str | None = None):
    sched = make_schedule(dp_ddim() if kind == "ddim" else dp_ddpm(), steps)
    g = torch.Generator().manual_seed(5)
    x_T, noise = draw_noise(sched, (B, T, D), g)
    cond = torch.randn(B, 4, generator=g)
    inpaint = None
    if mask is not None:
        data = torch.randn(B, T, D, generator=g)
        weights = torch.zeros(B, T, D)
        weights[:, :2, 1:] = 1.0
        if mask == "soft":  # real-time chunking: frozen actions, then decaying weights
            weights[:, 2:5, :] = torch.tensor([0.6, 0.3, 0.1]).view(1, 3, 1)
        inpaint = (data, weights if mask == "soft" else weights.bool())
    return sched, x_T, noise, cond, inpaint


def options(opts: dict, sched) -> dict:
    opts = dict(opts)
    if opts.get("jacobian") == "random":
        n = T * D
        opts["jacobian"] = 0.05 * torch.randn(sched.num_steps, n, n, generator=torch.Generator().manual_seed(2))
    return opts


@pytest.mark.parametrize("name,sample,opts", STRATEGIES, ids=[s[0] for s in STRATEGIES])
@pytest.mark.parametrize("mask", [None, "bool", "soft"])
def test_fixed_round_equals_compacting_round(name, sample, opts, mask):
    """Every slot evaluated and masked gives the compacting round's rounds and samples; tolerance 0 is sequential."""
    if name == "jacobian" and mask == "soft":
        pytest.skip("jacobian refuses soft inpaint weights")
    den = MLPDenoiser()
    sched, x_T, noise, cond, inpaint = inputs(mask=mask)
    opts = options(opts, sched)
    init = warm_start_init(sched, torch.zeros(B, T, D), x_T, noise)
    common = dict(condition=cond, inpaint=inpaint, window=4, init=init, init_rows=torch.tensor([True, False]))
    compact, cs = sample(den, sched, x_T, noise, tolerance=0.05, **common, **opts)
    fixed, fs = sample(den, sched, x_T, noise, tolerance=0.05, round_shape="fixed", **common, **opts)
    assert fs.rounds == cs.rounds and torch.equal(fs.rounds_per_sample, cs.rounds_per_sample)
    assert torch.allclose(fixed, compact, atol=1e-5)
    assert fs.rows_per_round == [B * 4] * fs.rounds and cs.model_evals <= fs.model_evals
    ref, _ = sequential_sample(den, sched, x_T, noise, condition=cond, inpaint=inpaint)
    exact, _ = sample(den, sched, x_T, noise, tolerance=0.0, round_shape="fixed", **common, **opts)
    assert torch.allclose(exact, ref, atol=1e-5)


def assert_round_budget(counter: HostSyncCounter, syncs: int) -> None:
    assert counter.model_calls >= 2
    for i, counts in enumerate(counter.between):
        assert counts.syncs <= syncs, (i, counts.sync_calls)
        assert counts.copies == 0, (i, counts.copy_calls)


@pytest.mark.parametrize("shape", ["compact", "fixed"])
@pytest.mark.parametrize("name,sample,opts", STRATEGIES, ids=[s[0] for s in STRATEGIES])
@pytest.mark.parametrize("mask", [None, "soft"])
def test_one_host_read_per_round(shape, name, sample, opts, mask):
    """Between two model calls: at most one device-to-host read (the stop test), no host-to-device copy."""
    if name == "jacobian" and mask == "soft":
        pytest.skip("jacobian refuses soft inpaint weights")
    den = MLPDenoiser()
    sched, x_T, noise, cond, inpaint = inputs(steps=20, kind="ddpm", mask=mask)
    opts = options(opts, sched)
    init = warm_start_init(sched, torch.zeros(B, T, D), x_T, noise)
    counter = HostSyncCounter()
    with counter:
        sample(counter.wrap(den), sched, x_T, noise, condition=cond, inpaint=inpaint, window=5, tolerance=0.05,
               init=init, round_shape=shape, **opts)
    assert_round_budget(counter, 1)


def test_sequential_loop_reads_nothing_back():
    den = MLPDenoiser()
    sched, x_T, noise, cond, inpaint = inputs(mask="bool")
    counter = HostSyncCounter()
    with counter:
        sequential_sample(counter.wrap(den), sched, x_T, noise, condition=cond, inpaint=inpaint)
    assert_round_budget(counter, 0)


def test_predict_action_one_host_read_per_round():
    """The policy's whole path (warm start, real-time chunking's soft prefix) keeps the budget."""
    policy = load_policy(SHIPPED, sampler="sequential", backend="eager")
    policy.set_sampler("paradigms", window=8, scheduler="ddim", num_inference_steps=10)
    obs = {"obs": torch.randn(1, policy.n_obs_steps, policy.obs_dim, generator=torch.Generator().manual_seed(0))}
    policy.predict_action(obs)  # cold, then warm with a frozen prefix and a guide
    counter = HostSyncCounter()
    policy.denoise = counter.wrap(policy.denoise)
    try:
        with counter:
            policy.predict_action(obs, prefix_actions=torch.zeros(1, 2, policy.action_dim),
                                  guide_actions=torch.zeros(1, 4, policy.action_dim))
    finally:
        del policy.denoise
    assert_round_budget(counter, 1)


def test_fixed_round_compiles_whole():
    """``torch.compile(fullgraph=True)`` traces a whole round (model and bookkeeping) without a break.

    A break would be a host read or a Python branch on tensor data: on a GPU, a sync, and a round
    that cannot be captured. The eager backend checks the trace without generating code.
    """
    den = MLPDenoiser()
    sched, x_T, noise, cond, inpaint = inputs(mask="soft")
    for solve in (False, True):
        runs = []
        for step in (picard_round, compiled_round(backend="eager")):
            setup = make_round_setup(den, sched, x_T, noise, 4, 0.05, cond, inpaint, None, True, linear_solve=solve,
                                     secant=solve, jacobian=None)
            state = initial_window_state(x_T, sched.num_steps, None, None)
            with torch.inference_mode():
                for _ in range(3):
                    step(setup, state, None)
            runs.append(state)
        assert torch.equal(runs[0].traj[:, :-1], runs[1].traj[:, :-1]) and torch.equal(runs[0].begin, runs[1].begin)
        assert int(runs[0].begin.min()) > 0


@pytest.mark.parametrize("name,sample,opts", STRATEGIES[:2] + STRATEGIES[3:],
                         ids=[s[0] for s in STRATEGIES[:2] + STRATEGIES[3:]])
def test_sampler_state_stays_float32(name, sample, opts):
    """Under bf16 autocast and with a bf16 model the sampler's state stays float32; deviation as sequential's."""
    den = MLPDenoiser()

    def bf16_model(x, t, c):  # a model that reads and returns bf16
        return den(x.to(torch.bfloat16).float(), t, c).to(torch.bfloat16)

    sched, x_T, noise, cond, inpaint = inputs(mask="soft")
    ref, _ = sequential_sample(den, sched, x_T, noise, condition=cond, inpaint=inpaint)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seq_amp, _ = sequential_sample(den, sched, x_T, noise, condition=cond, inpaint=inpaint)
        out_amp, _ = sample(den, sched, x_T, noise, condition=cond, inpaint=inpaint, window=4, tolerance=0.0,
                            **opts)
    seq_half, _ = sequential_sample(bf16_model, sched, x_T, noise, condition=cond, inpaint=inpaint)
    out_half, _ = sample(bf16_model, sched, x_T, noise, condition=cond, inpaint=inpaint, window=4, tolerance=0.0,
                         **opts)
    for out, seq in ((out_amp, seq_amp), (out_half, seq_half)):
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        # tolerance 0 follows the sequential loop under the same precision up to rounding
        assert (out - seq).abs().max() <= 0.05 + 0.5 * (seq - ref).abs().max()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (none here)")


@pytest.mark.parametrize("capture", [False, pytest.param(True, marks=CUDA)])
@pytest.mark.parametrize("mask", [None, "soft"])
def test_captured_samplers_equal_the_eager_ones(capture, mask):
    """Static buffers reused across calls with new inputs: the eager fixed round's and the loop's results."""
    device = "cuda" if capture else "cpu"
    model = MLPDenoiser().to(device)
    sched = make_schedule(dp_ddpm(), 20)
    loop = CapturedSequential(model, sched, capture=capture, weights_changed=WeightsWatch(model).changed)
    rounds = CapturedPicard(model, sched, window=5, tolerance=0.05, linear_solve=True, secant=True, capture=capture,
                            weights_changed=WeightsWatch(model).changed)
    for seed in range(4):
        if seed == 3:  # new weights (an EMA swap, a load): the graphs must read them, not the old addresses
            model.load_state_dict(MLPDenoiser(seed=1).state_dict(), assign=True)
        _, x_T, noise, cond, inpaint = inputs(steps=20, kind="ddpm", mask=mask)
        g = torch.Generator().manual_seed(seed)
        x_T, noise = draw_noise(sched, (B, T, D), g)
        x_T, noise, cond = x_T.to(device), noise.to(device), cond.to(device)
        inpaint = None if inpaint is None else tuple(v.to(device) for v in inpaint)
        ref, _ = sequential_sample(model, sched, x_T, noise, condition=cond, inpaint=inpaint)
        out, stats = loop(x_T, noise, condition=cond, inpaint=inpaint)
        assert torch.allclose(out, ref, atol=1e-6) and stats.rounds == 20
        eager, es = picard_sample(model, sched, x_T, noise, condition=cond, inpaint=inpaint, window=5, tolerance=0.05,
                                  linear_solve=True, secant=True, round_shape="fixed")
        out, stats = rounds(x_T, noise, condition=cond, inpaint=inpaint)
        assert stats.rounds == es.rounds and torch.allclose(out, eager, atol=1e-6)
    assert len(loop.graphs) == 1 and len(rounds.graphs) == 1  # one capture, replayed with each call's inputs


def test_window_auto_chooses_the_round_shape(monkeypatch):
    """``round_shape='auto'``: both shapes predicted from the cost curve and each one's bookkeeping; cheaper wins."""
    from para_policy import window as win
    from para_policy.samplers import SamplerOptionError, sampler_spec

    den = MLPDenoiser()
    sched, x_T, noise, cond, _ = inputs(steps=20, kind="ddpm")
    spec = sampler_spec("paradigms", round_shape="auto")
    problems = [win.Problem((B, T, D), cond)]
    linear = {n: float(n) for n in (1, 2, 4, 8, 16, 32, 64)}  # every row costs: compacting wins
    window, info = win.calibrate_window(den, sched, spec, problems, (1, 4, 16), cost=linear, reps=1)
    assert info["round_shape"] == "compact" and set(info["predicted_ms_fixed"]) == {4, 16}
    assert all(info["predicted_ms_fixed"][w] > info["predicted_ms"][w] for w in (4, 16))
    resolved = win.tuned_spec(spec, window, info)
    assert resolved.options["round_shape"] == "compact" and resolved.options["window"] == window

    # rows free, and the fixed shape's rounds far cheaper to run (as when a GPU replays them captured)
    flat = {n: 1.0 for n in linear}
    real = win.sampler_overhead
    monkeypatch.setattr(win, "sampler_overhead", lambda schedule, spec, *a, **k: {
        w: (0.0 if spec.options["round_shape"] == "fixed" else 50.0) for w in real(schedule, spec, *a, **k)})
    window, info = win.calibrate_window(den, sched, spec, problems, (1, 4, 16), cost=flat, reps=1)
    assert info["round_shape"] == "fixed" and window in (4, 16)
    out, stats = picard_sample(den, sched, x_T, noise, condition=cond,
                               **win.tuned_spec(spec, window, info).options)
    assert stats.rows_per_round == [B * window] * stats.rounds
    with pytest.raises(SamplerOptionError, match="needs window='auto'"):
        sampler_spec("paradigms", window=8, round_shape="auto")
    with pytest.raises(ValueError, match="round_shape"):
        picard_sample(den, sched, x_T, noise, round_shape="auto")


def test_captured_form_of_a_spec():
    """``captured_sampler``: the spec's own options baked in; the same samples as the plain sampler function."""
    from para_policy.samplers import sampler_spec
    from para_policy.samplers.captured import captured_sampler, run_captured

    den = MLPDenoiser()
    sched, x_T, noise, cond, inpaint = inputs(steps=20, kind="ddpm", mask="bool")
    init = warm_start_init(sched, torch.zeros(B, T, D), x_T, noise)
    assert captured_sampler(sampler_spec("paradigms", window=4), sched, den, capture=False) is None  # compacting
    assert captured_sampler(sampler_spec("parataa"), sched, den, capture=False) is None
    for spec, call in ((sampler_spec("sequential"), {}),
                       (sampler_spec("paradigms", window=4, round_shape="fixed"), {"init": init, "deadline_at": None})):
        captured = captured_sampler(spec, sched, den, capture=False)
        options = {**spec.options, **call}
        ref, ref_stats = spec.family.sample(den, sched, x_T, noise, condition=cond, inpaint=inpaint, **options)
        out, stats = run_captured(captured, x_T, noise, cond, inpaint, options)
        assert torch.equal(out, ref) and stats.rounds == ref_stats.rounds


@CUDA
def test_policy_samples_from_captured_graphs_on_cuda():
    """``cuda_graphs`` on CUDA: the sequential loop and fixed rounds run captured, as the eager samplers would."""
    policy = load_policy(SHIPPED, sampler="sequential", backend="eager").cuda()
    obs = {"obs": torch.randn(1, policy.n_obs_steps, policy.obs_dim).cuda()}
    plain = {}
    for name, options in (("sequential", {}), ("paradigms", {"window": 10, "round_shape": "fixed", "tolerance": 0.0})):
        spec_options = dict(scheduler="ddim", num_inference_steps=10, **options)
        plain[name] = policy.predict_action(obs, sampler=name, generator=torch.Generator("cuda").manual_seed(0),
                                            warm_start=False if options else None, **spec_options)
    policy.set_inference(cuda_graphs=True)
    for name, options in (("sequential", {}), ("paradigms", {"window": 10, "round_shape": "fixed", "tolerance": 0.0})):
        spec_options = dict(scheduler="ddim", num_inference_steps=10, **options)
        for _ in range(2):  # captured on the first call, replayed on the second
            out = policy.predict_action(obs, sampler=name, generator=torch.Generator("cuda").manual_seed(0),
                                        warm_start=False if options else None, **spec_options)
            assert torch.allclose(out["action"], plain[name]["action"], atol=1e-4)
    assert len(policy.session._captured) == 2


def test_noise_drawn_in_one_call():
    """``draw_noise(batched=True)``: one draw (x_T and every step's noise), zero where the scheduler draws none."""
    from torch.overrides import TorchFunctionMode

    class Draws(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Draws.calls += func is torch.randn
            return func(*args, **(kwargs or {}))

    sched = make_schedule(dp_ddpm(), 20)
    with Draws():
        x_T, noise = draw_noise(sched, (B, T, D), torch.Generator().manual_seed(0), batched=True)
    assert Draws.calls == 1
    draws = torch.randn((21, B, T, D), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_T, draws[0]) and noise.shape == (B, 20, T, D)
    assert torch.equal(noise[:, :-1], draws[1:-1].transpose(0, 1)) and not noise[:, -1].any()  # DDPM: t = 0 draws none
