"""The stages in worker processes over torch.distributed: exactness against the whole network and the
thread pipeline, the asyncdiff sampler over them, failures, shutdown."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest
import torch
from conftest import dp_ddim

from para_policy.distributed_stages import (
    JOB,
    DistributedStagePipeline,
    _decode_items,
    _encode,
    distributed_stage_pipeline,
)
from para_policy.models.unet1d import ConditionalUnet1D
from para_policy.models.unet_stages import split_unet, unet_units
from para_policy.samplers import asyncdiff_sample, draw_noise, sequential_sample
from para_policy.schedule import make_schedule
from para_policy.stages import EagerStage, StageFailed, StagePipeline, stage_examples


def tiny_unet() -> ConditionalUnet1D:
    torch.manual_seed(0)
    return ConditionalUnet1D(2, global_cond_dim=8, down_dims=[16, 32], diffusion_step_embed_dim=16,
                             kernel_size=3, n_groups=4).eval()


@pytest.fixture(scope="module")
def model() -> ConditionalUnet1D:
    return tiny_unet()


@pytest.fixture(scope="module")
def cuts(model) -> list[int]:
    return [0, 4, len(unet_units(model))]


@pytest.fixture(scope="module")
def pipe(model, cuts):
    with DistributedStagePipeline(split_unet(model, 2, cuts=cuts), backend="eager") as p:
        yield p


def inputs(seed: int, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 8, 2, generator=g), torch.tensor([3.0, 9.0])[:rows], torch.randn(rows, 8, generator=g)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_message_round_trips_shapes_and_none() -> None:
    items = (torch.randn(3, 4, 2), torch.tensor([1.0, 2.0, 3.0]), None, torch.randn(3, 5, 1))
    header, payload = _encode(JOB, items, torch.device("cpu"))
    fields = header.tolist()
    assert fields[:4] == [JOB, 0, 24 + 3 + 15, 4]
    back = _decode_items(fields, payload)
    assert back[2] is None and all(torch.equal(a, b) for a, b in zip(back, items, strict=True) if a is not None)


def test_run_stages_and_a_stale_step_on_current_carries_are_the_whole_network(model, pipe) -> None:
    x, t, cond = inputs(0)
    with torch.inference_mode():
        whole = model(x, t, global_cond=cond)
    out, carries = pipe.run_stages(x, t, cond)
    torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pipe(x, t, cond), whole, atol=1e-5, rtol=1e-5)
    stale, _ = pipe.stale_step(x, [t, t], cond, carries)
    torch.testing.assert_close(stale, whole, atol=1e-5, rtol=1e-5)
    with DistributedStagePipeline(split_unet(model, 1, cuts=[0, len(unet_units(model))])) as single:
        assert single.worker_pids == []  # one stage: no workers, no group
        torch.testing.assert_close(single(x, t, cond), whole, atol=1e-5, rtol=1e-5)


def test_stale_steps_match_the_thread_pipeline(model, cuts, pipe) -> None:
    threads = StagePipeline([EagerStage(s) for s in split_unet(model, 2, cuts=cuts)])
    with threads:
        x0, t0, cond = inputs(1)
        x1, t1, _ = inputs(2)
        _, carries = threads.run_stages(x0, t0, cond)
        for ts in ([t1, t0], [t1, torch.cat((t0, t1))]):  # the second: a stride of 2 (2·B rows last)
            ref, ref_carries = threads.stale_step(x1, ts, cond, carries)
            out, got_carries = pipe.stale_step(x1, ts, cond, carries)
            assert out.shape == ref.shape == (ts[-1].shape[0], 8, 2)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            for a, b in zip(got_carries, ref_carries, strict=True):
                for u, v in zip(a, b, strict=True):
                    torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


def test_asyncdiff_over_the_processes_is_sequential_with_full_warmup_and_matches_threads(model, cuts, pipe) -> None:
    steps = 6
    schedule = make_schedule(dp_ddim(), steps)
    x_T, noise = draw_noise(schedule, (2, 8, 2), torch.Generator().manual_seed(0))
    cond = inputs(3)[2]

    def denoise(x, t, c):
        return model(x, t, global_cond=c)

    ref, _ = sequential_sample(denoise, schedule, x_T, noise, condition=cond)
    out, stats = asyncdiff_sample(denoise, schedule, x_T, noise, condition=cond, staged=pipe, warmup=steps)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert stats.rounds == steps
    with StagePipeline([EagerStage(s) for s in split_unet(model, 2, cuts=cuts)]) as threads:
        for stride in (1, 2):
            want, _ = asyncdiff_sample(denoise, schedule, x_T, noise, condition=cond, staged=threads, stride=stride,
                                       extrapolate=stride == 1)
            got, _ = asyncdiff_sample(denoise, schedule, x_T, noise, condition=cond, staged=pipe, stride=stride,
                                      extrapolate=stride == 1)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_stage_raising_in_its_worker_is_stage_failed_and_the_pipeline_goes_on(model, pipe) -> None:
    x, t, cond = inputs(4)
    _, carries = pipe.run_stages(x, t, cond)
    wrong = [(carries[0][0][:, :3],)]  # too few channels for stage 1's convolution
    with pytest.raises(StageFailed, match="stage 1 of 2 failed in its worker process") as info:
        pipe.stale_step(x, [t, t], cond, wrong)
    assert "channels" in str(info.value) and "Traceback" in str(info.value)
    out, _ = pipe.stale_step(x, [t, t], cond, carries)  # still in step
    torch.testing.assert_close(out, pipe(x, t, cond), atol=1e-5, rtol=1e-5)


def test_onnx_workers_a_killed_worker_and_close_end_every_process(model) -> None:
    U = len(unet_units(model))
    x, t, cond = inputs(5)
    with torch.inference_mode():
        whole = model(x, t, global_cond=cond)
    pipe = distributed_stage_pipeline(model, 3, (8, 2), cond[:1], backend="onnxruntime", cuts=[0, 4, 8, U],
                                      timeout=20.0)
    pids = pipe.worker_pids
    assert len(pids) == 2 and {p.pid for p in multiprocessing.active_children()} >= set(pids)
    out, carries = pipe.run_stages(x, t, cond)
    torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)
    stale, carries = pipe.stale_step(x, [t, t, t], cond, carries)
    torch.testing.assert_close(stale, whole, atol=1e-5, rtol=1e-5)
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(StageFailed, match="stage 2 of 3: its worker process exited"):
        pipe.stale_step(x, [t, t, t], cond, carries)
    with pytest.raises(RuntimeError, match="closed"):  # a dead worker closes the pipeline
        pipe.run_stages(x, t, cond)
    pipe.close()
    pipe.close()
    assert pipe.worker_pids == [] and all(gone(p) for p in pids)
    assert not {p.pid for p in multiprocessing.active_children()} & set(pids)
    assert len(stage_examples(split_unet(model, 3, cuts=[0, 4, 8, U]), (8, 2), cond[:1])[2]) == 4  # x, t, cond, skip


def test_close_joins_the_workers_and_a_closed_pipeline_refuses_calls(model, cuts) -> None:
    pipe = DistributedStagePipeline(split_unet(model, 2, cuts=cuts))
    pids = pipe.worker_pids
    x, t, cond = inputs(6)
    _, carries = pipe.run_stages(x, t, cond)
    pipe.close()
    pipe.close()
    assert all(gone(p) for p in pids) and not {p.pid for p in multiprocessing.active_children()} & set(pids)
    with pytest.raises(RuntimeError, match="closed"):
        pipe.stale_step(x, [t, t], cond, carries)
