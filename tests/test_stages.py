"""AsyncDiff's stage parallelism: the UNet's stage split, the stage workers, the asyncdiff sampler."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import dp_ddim, dp_ddpm, dp_dpm

from para_policy.models.unet1d import ConditionalUnet1D
from para_policy.models.unet_stages import balanced_cuts, split_unet, unet_units
from para_policy.samplers import SamplerOptionError, asyncdiff_sample, draw_noise, sampler_spec, sequential_sample
from para_policy.schedule import make_schedule
from para_policy.stages import EagerStage, StageFailed, StagePipeline, stage_pipeline

PUSHT = Path(__file__).resolve().parents[1] / "para_policy" / "assets" / "pusht_lowdim.safetensors"


def tiny_unet(seed: int = 0) -> ConditionalUnet1D:
    torch.manual_seed(seed)
    return ConditionalUnet1D(2, global_cond_dim=3, diffusion_step_embed_dim=16, down_dims=(16, 32, 32),
                             kernel_size=3, n_groups=4).eval()


def eager_pipeline(model: ConditionalUnet1D, cuts: list[int]) -> StagePipeline:
    return StagePipeline([EagerStage(s) for s in split_unet(model, len(cuts) - 1, cuts=cuts)])


def chain(stages, x, t, cond):
    carry = (x,)
    with torch.inference_mode():
        for s in stages:
            carry = s(carry[0], t, cond, *carry[1:])
    return carry[0]


@pytest.fixture(scope="module")
def pusht():
    from para_policy import load_policy

    return load_policy(PUSHT, sampler="asyncdiff", scheduler="ddim", num_inference_steps=10)


def test_every_split_of_a_tiny_unet_recombines_to_the_whole_network() -> None:
    model = tiny_unet()
    U = len(unet_units(model))
    x, t, cond = torch.randn(3, 8, 2), torch.tensor([1.0, 5.0, 9.0]), torch.randn(3, 3)
    with torch.inference_mode():
        whole = model(x, t, global_cond=cond)
    for cut in range(1, U):
        assert torch.equal(chain(split_unet(model, 2, cuts=[0, cut, U]), x, t, cond), whole), cut
    assert torch.equal(chain(split_unet(model, 3, cuts=[0, 4, 11, U]), x[:1], t[:1], cond[:1]),
                       model(x[:1], t[:1], global_cond=cond[:1]).detach())


def test_the_shipped_unet_split_by_measured_cost_recombines_eager_and_onnx(pusht) -> None:
    model = pusht.model
    x, t, cond = torch.randn(1, 16, 2), torch.tensor([7.0]), torch.randn(1, 40)
    with torch.inference_mode():
        whole = model(x, t, global_cond=cond)
    for n in (2, 3):
        assert torch.equal(chain(split_unet(model, n, sample_shape=(16, 2), global_cond=cond), x, t, cond), whole)
    with stage_pipeline(model, 2, (16, 2), cond, backend="onnxruntime") as pipe:
        out, carries = pipe.run_stages(x, t, cond)
        torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)
        stale, _ = pipe.stale_step(x, [t, t], cond, carries)  # stale inputs that are the current ones
        torch.testing.assert_close(stale, whole, atol=1e-5, rtol=1e-5)


def test_balanced_cuts_minimise_the_slowest_stage() -> None:
    assert balanced_cuts([1, 1, 1, 1], 2) == [0, 2, 4]
    assert balanced_cuts([5, 1, 1, 1, 1, 1], 2) == [0, 1, 6]
    assert balanced_cuts([1, 2, 3], 3) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="num_stages"):
        balanced_cuts([1, 2], 3)
    with pytest.raises(ValueError, match="cuts must rise"):
        split_unet(tiny_unet(), 2, cuts=[0, 0, len(unet_units(tiny_unet()))])


def worker_threads(pipe: StagePipeline) -> list[threading.Thread]:
    """The pipeline's own worker threads (other tests' pipelines may end theirs meanwhile: no global count)."""
    return [thread for thread, _ in pipe.workers]


def test_workers_shut_down_and_a_failing_worker_surfaces_in_the_caller() -> None:
    model = tiny_unet()
    pipe = eager_pipeline(model, [0, 5, 9, len(unet_units(model))])
    threads = worker_threads(pipe)
    assert len(threads) == 2 and all(t.is_alive() for t in threads)
    x, t = torch.randn(1, 8, 2), torch.tensor([3.0])
    _, carries = pipe.run_stages(x, t, torch.randn(1, 3))
    pipe.close()
    pipe.close()
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(RuntimeError, match="closed"):
        pipe.stale_step(x, [t] * 3, None, carries)

    calls = []

    def broken_once(inputs):
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("stage blew up")
        return inputs[:1]

    with StagePipeline([lambda inputs: inputs[:1], broken_once]) as failing:
        threads = worker_threads(failing)
        with pytest.raises(StageFailed, match="stage 1 of 2") as info:
            failing.stale_step(x, [t, t], None, [(x,)])
        assert isinstance(info.value.__cause__, ZeroDivisionError)
        out, _ = failing.stale_step(x, [t, t], None, [(x + 1,)])  # the queues stayed in step
        assert torch.equal(out, x + 1)
    assert not any(t.is_alive() for t in threads)
    forgotten = StagePipeline([lambda inputs: inputs[:1], lambda inputs: inputs[:1]])
    threads = worker_threads(forgotten)
    assert all(t.is_alive() for t in threads)
    del forgotten  # never closed: collecting it ends its worker
    gc.collect()
    assert not any(t.is_alive() for t in threads)


def lockstep_asyncdiff(stages, schedule, x_T, noise, cond, warmup, stride, tail=0, extrapolate=False):
    """AsyncDiff written out in lock step, the stages called in turn (the reference for the streamed pipeline)."""
    from para_policy.samplers.sequential import schedule_step

    B, S, N = x_T.shape[0], schedule.num_steps, len(stages)
    steps = schedule.timesteps.float()
    x, x0s, k, carries, prev = x_T, None, 0, None, None

    def chain_at(x, k):
        carry, carries = (x,), []
        for s in stages:
            carry = s(carry[0], steps[k].expand(B), cond, *carry[1:])
            carries.append(carry)
        return carry[0], carries

    with torch.inference_mode():
        while k < warmup:
            prev, carries = chain_at(x, k)
            x, x0s = schedule_step(schedule, x, k, prev, x0s, noise)
            k += 1
        while k < S - tail:
            r = min(stride, S - tail - k)
            t_last = steps[[max(k + i - r, 0) for i in range(r)]].repeat_interleave(B)
            outs = [stages[0](x, steps[k + r - 1].expand(B), cond)]
            for i in range(1, N):
                c, n = carries[i - 1], (r if i == N - 1 else 1)
                t_i = t_last if i == N - 1 else t_last[-1].expand(B)
                skips = (h.repeat(n, 1, 1) for h in c[1:])
                outs.append(stages[i](c[0].repeat(n, 1, 1), t_i, cond.repeat(n, 1), *skips))
            carries, out = outs, outs[-1][0]
            served = out + (N - 1) * (out - prev) if extrapolate else out
            prev = out
            for i, eps in enumerate(served.split(B)):
                x, x0s = schedule_step(schedule, x, k + i, eps, x0s, noise)
            k += r
        for j in range(k, S):
            x, x0s = schedule_step(schedule, x, j, chain_at(x, j)[0], x0s, noise)
    return x


@pytest.mark.parametrize("stride,tail,extrapolate", [(1, 0, False), (3, 0, False), (3, 2, False), (1, 2, True)])
def test_the_streamed_rounds_equal_asyncdiff_in_lock_step(stride, tail, extrapolate) -> None:
    model = tiny_unet()
    cuts = [0, 4, 9, 14, len(unet_units(model))]
    schedule = make_schedule(dp_ddpm(), 10)
    x_T, noise = draw_noise(schedule, (2, 8, 2), torch.Generator().manual_seed(0))
    cond = torch.randn(2, 3)
    ref = lockstep_asyncdiff(split_unet(model, 4, cuts=cuts), schedule, x_T, noise, cond, 2, stride, tail, extrapolate)
    with eager_pipeline(model, cuts) as pipe:
        out, stats = asyncdiff_sample(None, schedule, x_T, noise, condition=cond, staged=pipe, stages=4,
                                      warmup=2, stride=stride, tail=tail, extrapolate=extrapolate)
    assert torch.equal(out, ref)
    assert stats.rounds == 2 + -(-(8 - tail) // stride) + tail
    rest = (8 - tail) % stride
    parallel = [2 * stride] * ((8 - tail) // stride) + [2 * rest] * (rest > 0)
    assert stats.rows_per_round == [2] * 2 + parallel + [2] * tail


@pytest.mark.parametrize("stride,extrapolate", [(1, True), (3, False)])
def test_onnx_stages_stream_numpy_arrays_and_equal_the_lock_step_loop_over_the_same_sessions(stride,
                                                                                          extrapolate) -> None:
    """ONNX Runtime stages hand the sessions' numpy arrays on (a stride's rows tiled in numpy, the step in one
    call at stride 1): the bits of the lock-step loop calling the same sessions in turn on tensors."""
    pytest.importorskip("onnxruntime")
    model = tiny_unet()
    cuts = [0, 4, 9, 14, len(unet_units(model))]
    schedule = make_schedule(dp_ddpm(), 10)
    x_T, noise = draw_noise(schedule, (2, 8, 2), torch.Generator().manual_seed(0))
    cond = torch.randn(2, 3)
    with stage_pipeline(model, 4, (8, 2), cond[:1], backend="onnxruntime", cuts=cuts) as pipe:
        assert pipe.arrays
        stages = [lambda x, t, c, *skips, r=r: r((x, t, c, *skips)) for r in pipe.runners]
        ref = lockstep_asyncdiff(stages, schedule, x_T, noise, cond, 2, stride, 2, extrapolate)
        out, _ = asyncdiff_sample(None, schedule, x_T, noise, condition=cond, staged=pipe, stages=4, warmup=2,
                                  stride=stride, tail=2, extrapolate=extrapolate)
    assert torch.equal(out, ref)


def test_a_slow_caller_between_the_first_jobs_keeps_every_stage_in_round_order(monkeypatch) -> None:
    model = tiny_unet()
    cuts = [0, 4, 9, 14, len(unet_units(model))]
    schedule = make_schedule(dp_ddpm(), 10)
    x_T, noise = draw_noise(schedule, (2, 8, 2), torch.Generator().manual_seed(0))
    cond = torch.randn(2, 3)
    ref = lockstep_asyncdiff(split_unet(model, 4, cuts=cuts), schedule, x_T, noise, cond, 2, 3, 2)
    with eager_pipeline(model, cuts) as pipe:
        submit = pipe._submit

        def slow(i, call, j, carry):  # the caller preempted after each first-round job: workers run ahead
            submit(i, call, j, carry)
            if j == 0:
                time.sleep(0.05)

        monkeypatch.setattr(pipe, "_submit", slow)
        out, _ = asyncdiff_sample(None, schedule, x_T, noise, condition=cond, staged=pipe, stages=4, warmup=2,
                                  stride=3, tail=2, extrapolate=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("make,steps", [(dp_ddpm, 20), (dp_ddim, 8), (dp_dpm, 8)])
def test_warmup_over_every_step_is_the_sequential_loop(make, steps) -> None:
    model = tiny_unet()
    schedule = make_schedule(make(), steps)
    x_T, noise = draw_noise(schedule, (2, 8, 2), torch.Generator().manual_seed(0))
    cond = torch.randn(2, 3)

    def denoise(x, t, c):
        return model(x, t, global_cond=c)

    ref, _ = sequential_sample(denoise, schedule, x_T, noise, condition=cond)
    with eager_pipeline(model, [0, 7, len(unet_units(model))]) as pipe:
        out, stats = asyncdiff_sample(denoise, schedule, x_T, noise, condition=cond, staged=pipe, warmup=steps)
        assert torch.equal(out, ref)
        assert stats.rounds == steps
        approx, stats = asyncdiff_sample(denoise, schedule, x_T, noise, condition=cond, staged=pipe, warmup=1)
        assert stats.rounds == steps and not torch.equal(approx, ref)
        exact, _ = asyncdiff_sample(denoise, schedule, x_T, noise, condition=cond, staged=pipe, exact=True)
        scale = float(ref.abs().max())  # DPM-Solver on a random network reaches thousands: roundoff scales with it
        torch.testing.assert_close(exact, ref, atol=1e-5 * scale, rtol=1e-5)
        strided, stats = asyncdiff_sample(denoise, schedule, x_T, noise, condition=cond, staged=pipe, stride=3,
                                          extrapolate=False)
        assert stats.rounds == 1 + -(-(steps - 3) // 3) + 2 and torch.isfinite(strided).all()


STEP_CASES = [
    ("ddpm-clip", lambda: dp_ddpm(), 100, 0.0),
    ("ddpm-sample-noclip", lambda: dp_ddpm(prediction_type="sample", clip_sample=False), 20, 0.0),
    ("ddim-v", lambda: dp_ddim(prediction_type="v_prediction"), 10, 0.0),
    ("ddim-eta", lambda: dp_ddim(), 16, 0.7),
]


@pytest.mark.parametrize("name,make,steps,eta", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_the_one_call_step_is_the_samplers_step(name, make, steps, eta) -> None:
    """The step after a streamed round in one ONNX Runtime call gives the bits of ``schedule_step`` on the
    extrapolated output, at every step, with and without extrapolation."""
    from para_policy.samplers.sequential import schedule_step
    from para_policy.stages import OnnxStep

    schedule = make_schedule(make(), steps, eta=eta)
    g = torch.Generator().manual_seed(3)
    x, out, prev = (torch.randn(2, 8, 2, generator=g) * 2 for _ in range(3))
    noise = torch.randn(2, steps, 8, 2, generator=g)
    for lag in (0, 1):
        step = OnnxStep(schedule, lag, (8, 2))
        for k in range(steps):
            served = out + lag * (out - prev) if lag else out
            ref, _ = schedule_step(schedule, x, k, served, None, noise)
            assert torch.equal(torch.from_numpy(step(x, out, prev, noise, k)), ref), (name, lag, k)


def test_the_pipeline_offers_the_one_call_step_only_where_it_applies(pusht) -> None:
    pipe = pusht.staged(2)  # ONNX Runtime stages
    ddpm = make_schedule(dp_ddpm(), 10)
    assert pipe.step_runner(ddpm, 1, (16, 2)) is pipe.step_runner(ddpm, 1, (16, 2))  # kept
    assert pipe.step_runner(make_schedule(dp_dpm(), 8), 1, (16, 2)) is None  # multistep: reads earlier steps
    with eager_pipeline(tiny_unet(), [0, 7, len(unet_units(tiny_unet()))]) as eager:
        assert eager.step_runner(ddpm, 1, (8, 2)) is None


def test_a_transformer_runs_staged_and_refuses_a_stride() -> None:
    from para_policy.models.transformer import TransformerForDiffusion

    torch.manual_seed(0)
    model = TransformerForDiffusion(2, 2, horizon=8, n_obs_steps=2, cond_dim=3, n_layer=3, n_head=2, n_emb=16,
                                    p_drop_emb=0.0, p_drop_attn=0.0).eval()
    schedule = make_schedule(dp_ddim(), 6)
    x_T, noise = draw_noise(schedule, (2, 8, 2), torch.Generator().manual_seed(0))
    cond = torch.randn(2, 2, 3)
    ref, _ = sequential_sample(lambda x, t, c: model(x, t, c), schedule, x_T, noise, condition=cond)
    with stage_pipeline(model, 2, (8, 2), cond, backend="eager") as pipe:
        assert not pipe.time_in_every_stage
        out, _ = asyncdiff_sample(None, schedule, x_T, noise, condition=cond, staged=pipe, warmup=6)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        approx, _ = asyncdiff_sample(None, schedule, x_T, noise, condition=cond, staged=pipe)
        assert torch.isfinite(approx).all() and not torch.equal(approx, ref)
        with pytest.raises(ValueError, match="stride=2"):
            asyncdiff_sample(None, schedule, x_T, noise, condition=cond, staged=pipe, stride=2)


def test_the_asyncdiff_preset_on_the_shipped_policy_stays_close_to_sequential(pusht) -> None:
    gc.collect()  # other tests' pipelines left for the collector end their workers now
    before = threading.active_count()
    obs = {"obs": torch.randn(1, 2, 20, generator=torch.Generator().manual_seed(1))}
    x_T, noise = draw_noise(pusht.schedule_for(pusht.sampler), (1, 16, 2), torch.Generator().manual_seed(0))
    ref = pusht.predict_action(obs, x_T=x_T, noise=noise, sampler="sequential", scheduler="ddim",
                               num_inference_steps=10)
    out = pusht.predict_action(obs, x_T=x_T, noise=noise)
    assert out.spec.name == "asyncdiff" and out.stats.rounds == 10
    deviation = (out.trajectory - ref.trajectory).abs().max().item()
    assert 0 < deviation < 0.3  # normalized units; measured about 0.05 (seeds differ by about 0.1)
    exact = pusht.predict_action(obs, x_T=x_T, noise=noise, exact=True)
    torch.testing.assert_close(exact.trajectory, ref.trajectory, atol=1e-4, rtol=1e-4)
    assert threading.active_count() <= before + 1  # one worker, kept by the policy for the next call


def test_asyncdiff_options_are_checked_when_chosen() -> None:
    spec = sampler_spec("asyncdiff", stages=3, warmup=2, stride=2, exact=True, extrapolate=False)
    assert spec.options == {"stages": 3, "warmup": 2, "tail": 2, "stride": 2, "exact": True, "time_shift": True,
                            "extrapolate": False}
    assert not spec.iterative
    for bad in ({"stages": 0}, {"warmup": 0}, {"tail": -1}, {"stride": 1.5}, {"exact": "yes"}, {"window": 4},
                {"stride": 2}):  # extrapolate (on by default) needs stride 1
        with pytest.raises(SamplerOptionError):
            sampler_spec("asyncdiff", **bad)
    with pytest.raises(SamplerOptionError, match="warm_start"):
        sampler_spec("asyncdiff", warm_start=True)
    schedule = make_schedule(dp_ddim(), 4)
    with pytest.raises(TypeError, match="cut into stages"):
        asyncdiff_sample(lambda x, t, c: x, schedule, torch.randn(1, 8, 2))


def test_eval_sampler_group_asyncdiff_is_the_preset() -> None:
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir

    from para_policy.evaluation.config import sampler_config

    config_dir = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["sampler=asyncdiff", "sampler.scheduler=ddim",
                                                     "sampler.num_inference_steps=10", "sampler.warmup=2"])
    assert sampler_config(cfg.sampler) == sampler_spec("asyncdiff", scheduler="ddim", num_inference_steps=10,
                                                       warmup=2)
