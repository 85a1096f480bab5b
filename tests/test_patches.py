"""Patch parallelism over the horizon (DistriFusion): the patch split, the runners, the ``patches`` preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import dp_ddim, dp_ddpm
from test_policy import tiny_policy

from para_policy import Controller, load_policy, save_checkpoint
from para_policy.models.unet1d import ConditionalUnet1D
from para_policy.models.unet_patches import PatchUnet, neighbour_inputs
from para_policy.patches import EagerPatches, OnnxPatches, patch_runner
from para_policy.samplers import SamplerOptionError, draw_noise, patch_sample, sampler_spec, sequential_sample
from para_policy.samplers.sequential import schedule_step
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




def denoiser_of(model: ConditionalUnet1D):
    def denoise(x, t, c):
        return model(x, t, global_cond=c)

    return denoise


def displaced_loop(patched: PatchUnet, schedule, x_T, noise, cond, warmup: int) -> torch.Tensor:
    """DistriFusion's displaced patches written out on the eager PatchUnet: the first ``warmup`` steps the
    whole network, then every patch on its own current slice and the previous step's exchange."""
    B, T, _ = x_T.shape
    P, n = patched.patches, T // patched.patches
    x, x0s, exchanges = x_T, None, None
    with torch.inference_mode():
        for k in range(schedule.num_steps):
            t = schedule.timesteps[k].expand(B)
            if k < warmup:
                out, exchanges = patched.full(x, t, cond)
            else:
                ins = neighbour_inputs(exchanges)
                results = [patched(x[:, p * n: (p + 1) * n], t, cond, *ins[p]) for p in range(P)]
                out = torch.cat([r[0] for r in results], dim=1)
                exchanges = [tuple(r[1:]) for r in results]
            x, x0s = schedule_step(schedule, x, k, out, x0s, noise)
    return x


@pytest.mark.parametrize("make", [dp_ddim, dp_ddpm])
def test_warmup_over_every_step_is_the_sequential_loop_and_exact_refines_to_it(make) -> None:
    model = tiny_unet()
    schedule = make_schedule(make(), num_inference_steps=8)
    x_T, noise = draw_noise(schedule, (2, 16, 2), torch.Generator().manual_seed(3))
    cond = torch.randn(2, 3)
    denoise = denoiser_of(model)
    seq, _ = sequential_sample(denoise, schedule, x_T, noise, condition=cond)
    runner = EagerPatches(PatchUnet(model, 2))
    for warmup in (8, 20):
        same, stats = patch_sample(denoise, schedule, x_T, noise, condition=cond, warmup=warmup, patched=runner)
        assert torch.equal(same, seq) and stats.rounds == 8
    stale, stats = patch_sample(denoise, schedule, x_T, noise, condition=cond, patched=runner)
    assert not torch.allclose(stale, seq, atol=1e-5) and torch.isfinite(stale).all() and stats.rounds == 8
    exact, stats = patch_sample(denoise, schedule, x_T, noise, condition=cond, exact=True, patched=runner)
    torch.testing.assert_close(exact, seq, atol=1e-5, rtol=1e-5)
    assert stats.rounds > 8  # the steps, then Picard's rounds


@pytest.mark.parametrize(("patches", "warmup", "make"), [(2, 1, dp_ddpm), (4, 2, dp_ddim)])
def test_the_displaced_sampler_is_displaced_patches_written_out(patches, warmup, make) -> None:
    model = tiny_unet(seed=1)
    patched = PatchUnet(model, patches)
    horizon = 16 * patches // 2  # the tiny UNet splits in multiples of patches x 2 x 4
    schedule = make_schedule(make(), num_inference_steps=6)
    x_T, noise = draw_noise(schedule, (2, horizon, 2), torch.Generator().manual_seed(4))
    cond = torch.randn(2, 3)
    ref = displaced_loop(patched, schedule, x_T, noise, cond, warmup)
    alone, _ = patch_sample(None, schedule, x_T, noise, condition=cond, patches=patches, warmup=warmup,
                            patched=EagerPatches(patched))  # every warm-up step on the patched network, as written out
    torch.testing.assert_close(alone, ref, atol=1e-6, rtol=1e-6)
    found, _ = patch_sample(denoiser_of(model), schedule, x_T, noise, condition=cond, patches=patches,
                            warmup=warmup, patched=EagerPatches(patched))  # early warm-up steps on the denoiser
    torch.testing.assert_close(found, ref, atol=1e-5, rtol=1e-5)


def test_onnx_patches_on_worker_threads_match_eager_and_shut_down() -> None:
    pytest.importorskip("onnxruntime")
    model = tiny_unet()
    schedule = make_schedule(dp_ddim(), num_inference_steps=6)
    x_T, noise = draw_noise(schedule, (1, 16, 2), torch.Generator().manual_seed(5))
    cond = torch.randn(1, 3)
    runner = patch_runner(model, 2, (16, 2))
    assert isinstance(runner, OnnxPatches)
    threads = [thread for thread, _ in runner.pipeline.workers]
    assert len(threads) == 1 and threads[0].is_alive()  # patch 0 runs in the caller's thread
    try:
        eager = EagerPatches(PatchUnet(model, 2))
        for warmup in (1, 3, 6):
            want, _ = patch_sample(None, schedule, x_T, noise, condition=cond, warmup=warmup, patched=eager)
            got, _ = patch_sample(None, schedule, x_T, noise, condition=cond, warmup=warmup, patched=runner)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    finally:
        runner.close()
    runner.close()
    assert not threads[0].is_alive()
    assert isinstance(patch_runner(model, 2, (16, 2), backend="eager"), EagerPatches)


@pytest.fixture(scope="module")
def patches_policy(tmp_path_factory):
    policy = tiny_policy()
    path = save_checkpoint(tmp_path_factory.mktemp("patches") / "p.safetensors", policy.state_dict(), policy.config)
    return load_policy(path, sampler="patches", scheduler="ddim", num_inference_steps=8)


def test_the_patches_preset_runs_end_to_end_on_a_policy(patches_policy) -> None:
    policy = patches_policy
    obs = {"obs": torch.rand(1, 2, 5, generator=torch.Generator().manual_seed(1)) * 500}
    x_T, noise = draw_noise(policy.schedule_for(policy.sampler), (1, 8, 2), torch.Generator().manual_seed(0))
    ref = policy.predict_action(obs, x_T=x_T, noise=noise, sampler="sequential", scheduler="ddim",
                                num_inference_steps=8)
    out = policy.predict_action(obs, x_T=x_T, noise=noise)
    assert out.spec.name == "patches" and out.stats.rounds == 8 and torch.isfinite(out["action"]).all()
    assert not torch.equal(out.trajectory, ref.trajectory)
    exact = policy.predict_action(obs, x_T=x_T, noise=noise, exact=True)
    torch.testing.assert_close(exact.trajectory, ref.trajectory, atol=1e-5, rtol=1e-5)
    runner = policy.patched(2)
    assert runner is policy.patched(2)  # kept for the next call
    assert isinstance(runner, OnnxPatches)  # CPU float32: one ONNX Runtime session per patch
    threads = [thread for thread, _ in runner.pipeline.workers]
    with torch.no_grad():
        next(policy.model.parameters()).add_(0.0)  # an in-place write: new weights, so a new runner
    assert policy.patched(2) is not runner and not any(t.is_alive() for t in threads)
    assert Controller(policy, "patches", warmup=2).spec == sampler_spec("patches", warmup=2)
    prefix = torch.rand(1, 2, 2, generator=torch.Generator().manual_seed(2)) * 500
    rtc = policy.predict_action(obs, prefix_actions=prefix, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(rtc["action"][:, :2], prefix, atol=1e-3, rtol=1e-4)  # the frozen actions imposed


def test_the_patches_preset_inpaints_the_observations() -> None:
    policy = tiny_policy(global_cond=False).set_sampler("patches", scheduler="ddim", num_inference_steps=6)
    obs = torch.rand(2, 2, 5, generator=torch.Generator().manual_seed(1)) * 500
    out = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(0))
    assert out.stats.rounds == 6 and torch.isfinite(out["action"]).all()
    known = policy.normalizer.normalize("obs", obs)
    torch.testing.assert_close(out.trajectory[:, :2, 2:], known, atol=1e-6, rtol=1e-6)


def test_patch_options_and_unsupported_networks_are_refused_clearly() -> None:
    assert sampler_spec("patches").options == {"patches": 2, "warmup": 1, "exact": False}
    assert not sampler_spec("patches").iterative
    for bad, key in (({"patches": 0}, "patches"), ({"warmup": 0}, "warmup"), ({"patches": 1.5}, "patches"),
                     ({"exact": "yes"}, "exact"), ({"stages": 2}, "stages")):
        with pytest.raises(SamplerOptionError, match=key) as info:
            sampler_spec("patches", **bad)
        assert info.value.key == key
    with pytest.raises(SamplerOptionError, match="warm_start"):
        sampler_spec("patches", warm_start=True)
    schedule = make_schedule(dp_ddim(), 4)
    with pytest.raises(TypeError, match="patches of the horizon"):
        patch_sample(lambda x, t, c: x, schedule, torch.randn(1, 8, 2))
    with pytest.raises(ValueError, match="horizon 8 does not split into 3 patches"):
        tiny_policy().patched(3)
    from para_policy.models.transformer import TransformerForDiffusion

    torch.manual_seed(0)
    transformer = TransformerForDiffusion(2, 2, horizon=8, n_obs_steps=2, cond_dim=3, n_layer=1, n_head=2, n_emb=16)
    with pytest.raises(TypeError, match="ConditionalUnet1D with global conditioning"):
        patch_runner(transformer, 2, (8, 2))
    local = ConditionalUnet1D(2, local_cond_dim=2, down_dims=(16, 32), kernel_size=5, n_groups=4)
    with pytest.raises(ValueError, match="local_cond"):
        patch_runner(local, 2, (8, 2))


def test_patched_diffusion_policy_objects_refuse_the_patches_preset() -> None:
    from test_dp_checkpoint import DPStandIn

    from para_policy.integrations import patch

    with pytest.raises(ValueError, match="load_policy"):
        patch(DPStandIn(True), "patches")


def test_eval_sampler_group_patches_is_the_preset() -> None:
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir

    from para_policy.evaluation.config import sampler_config

    config_dir = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["sampler=patches", "sampler.scheduler=ddim",
                                                     "sampler.num_inference_steps=10", "sampler.warmup=2"])
    assert sampler_config(cfg.sampler) == sampler_spec("patches", scheduler="ddim", num_inference_steps=10, warmup=2)
