"""Patch parallelism over the horizon (DistriFusion): the patch split, the displaced sampler, the ONNX runner."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import pytest
import torch
from conftest import dp_ddim, dp_ddpm

from para_policy.bench.patches import OnnxPatches, patch_parallel_sample
from para_policy.models.unet1d import ConditionalUnet1D
from para_policy.models.unet_patches import PatchUnet, neighbour_inputs
from para_policy.samplers import draw_noise, sequential_sample
from para_policy.schedule import make_schedule

PUSHT = Path(__file__).resolve().parents[1] / "para_policy" / "assets" / "pusht_lowdim.safetensors"


def tiny_unet(seed: int = 0, kernel: int = 5) -> ConditionalUnet1D:
    torch.manual_seed(seed)
    return ConditionalUnet1D(2, global_cond_dim=3, diffusion_step_embed_dim=16, down_dims=(16, 32, 32),
                             kernel_size=kernel, n_groups=4).eval()


def patchwise(patched: PatchUnet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Each patch on CURRENT neighbour halos and statistics (sliced from a whole-network run), concatenated."""
    with torch.inference_mode():
        _, exchanges = patched.full(x, t, cond)
        n = x.shape[1] // patched.patches
        outs = [patched(x[:, p * n: (p + 1) * n], t, cond, *ins) for p, ins in enumerate(neighbour_inputs(exchanges))]
    return torch.cat([o[0] for o in outs], dim=1)


@pytest.mark.parametrize(("patches", "horizon", "kernel"), [(2, 16, 5), (4, 32, 5), (2, 8, 3), (1, 16, 5)])
def test_patches_on_current_halos_equal_the_whole_tiny_network(patches: int, horizon: int, kernel: int) -> None:
    model = tiny_unet(kernel=kernel)
    patched = PatchUnet(model, patches)
    x, t, cond = torch.randn(3, horizon, 2), torch.tensor([1.0, 5.0, 9.0]), torch.randn(3, 3)
    with torch.inference_mode():
        whole = model(x, t, global_cond=cond)
        full, _ = patched.full(x, t, cond)
    torch.testing.assert_close(full, whole, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(patchwise(patched, x, t, cond), whole, atol=2e-6, rtol=1e-5)


def test_a_patch_emits_the_exchange_the_whole_network_slices_out() -> None:
    patched = PatchUnet(tiny_unet(), 2)
    x, t, cond = torch.randn(1, 16, 2), torch.tensor([4.0]), torch.randn(1, 3)
    with torch.inference_mode():
        _, exchanges = patched.full(x, t, cond)
        for p, ins in enumerate(neighbour_inputs(exchanges)):
            out = patched(x[:, p * 8: (p + 1) * 8], t, cond, *ins)
            for emitted, sliced in zip(out[1:], exchanges[p], strict=True):
                torch.testing.assert_close(emitted, sliced, atol=2e-6, rtol=1e-5)
    assert exchanges[0][0].shape == (1, patched.halo_size) and exchanges[0][2].shape == (1, 2, patched.stat_size)


def test_patches_on_current_halos_equal_the_shipped_pusht_unet() -> None:
    from para_policy import load_policy

    model = load_policy(PUSHT).model
    x, t, cond = torch.randn(1, 16, 2), torch.tensor([37.0]), torch.randn(1, 40)
    with torch.inference_mode():
        whole = model(x, t, global_cond=cond)
    torch.testing.assert_close(patchwise(PatchUnet(model, 2), x, t, cond), whole, atol=5e-6, rtol=1e-5)


def test_horizons_that_do_not_split_and_local_conditioning_are_refused() -> None:
    patched = PatchUnet(tiny_unet(), 2)  # 3 levels, halo 2: multiples of 2 * 2 * 4 = 16
    with pytest.raises(ValueError, match="multiple of 16"):
        patched.full(torch.randn(1, 8, 2), torch.tensor([1.0]), torch.randn(1, 3))
    torch.manual_seed(0)
    local = ConditionalUnet1D(2, local_cond_dim=2, down_dims=(16, 32), kernel_size=5, n_groups=4)
    with pytest.raises(ValueError, match="local conditioning"):
        PatchUnet(local, 2)


@pytest.mark.parametrize("make", [dp_ddim, dp_ddpm])
def test_warmup_over_every_step_is_the_sequential_loop(make) -> None:
    model = tiny_unet()
    schedule = make_schedule(make(), num_inference_steps=8)
    x_T, noise = draw_noise(schedule, (2, 16, 2), torch.Generator().manual_seed(3))
    cond = torch.randn(2, 3)
    seq, _ = sequential_sample(lambda x, t, c: model(x, t, global_cond=c), schedule, x_T, noise, condition=cond)
    patched = PatchUnet(model, 2)
    same = patch_parallel_sample(patched, schedule, x_T, noise, condition=cond, warmup=schedule.num_steps)
    torch.testing.assert_close(same, seq, atol=1e-5, rtol=1e-5)
    stale = patch_parallel_sample(patched, schedule, x_T, noise, condition=cond, warmup=1)
    assert not torch.allclose(stale, seq, atol=1e-5) and torch.isfinite(stale).all()
    with pytest.raises(ValueError, match="warmup"):
        patch_parallel_sample(patched, schedule, x_T, noise, condition=cond, warmup=0)


def test_onnx_patches_on_worker_threads_match_eager_and_shut_down() -> None:
    pytest.importorskip("onnxruntime")
    model = tiny_unet()
    patched = PatchUnet(model, 2)
    schedule = make_schedule(dp_ddim(), num_inference_steps=6)
    x_T, noise = draw_noise(schedule, (1, 16, 2), torch.Generator().manual_seed(5))
    cond = torch.randn(1, 3)
    gc.collect()  # other tests' pipelines left for the collector end their workers now, not during the count
    before = threading.active_count()
    runner = OnnxPatches(patched, (16, 2), 3)
    try:
        assert threading.active_count() == before + 1  # patch 0 runs in the caller's thread
        for warmup in (1, 3, 6):
            eager = patch_parallel_sample(patched, schedule, x_T, noise, condition=cond, warmup=warmup)
            onnx = patch_parallel_sample(runner, schedule, x_T, noise, condition=cond, warmup=warmup)
            torch.testing.assert_close(onnx, eager, atol=2e-5, rtol=1e-5)
    finally:
        runner.close()
    assert threading.active_count() == before
