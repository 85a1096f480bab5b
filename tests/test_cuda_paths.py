"""The CUDA paths: what can be checked on the CPU is checked here (host syncs of the transformer, the graph
denoiser's bucket / capture / invalidation logic, TF32 flag handling, refusals, device moves), and the rest
runs where CUDA exists (skipped elsewhere)."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from test_policy import OBS_DIM, TO, tiny_policy
from torch.overrides import TorchFunctionMode

from para_policy.controller import generator_on
from para_policy.cuda_graphs import CudaGraphDenoiser, WeightsWatch, exact_fp32, power_buckets, weights_identity
from para_policy.inference import check_inference_options
from para_policy.models.transformer import TransformerForDiffusion, is_causal_mask
from para_policy.samplers.common import noise_device
from para_policy.window import device_label

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
#: functions and methods that read a tensor's value on the host (a device sync on a GPU)
HOST_READS = {"__bool__", "item", "tolist", "cpu", "numpy", "nonzero", "unique", "equal", "__int__", "__float__",
              "__index__", "_local_scalar_dense", "masked_select"}


class HostReads(TorchFunctionMode):
    """Counts the calls in :data:`HOST_READS` made through torch's Python API while active."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def transformer(seed: int = 0, **kw) -> TransformerForDiffusion:
    torch.manual_seed(seed)
    args = dict(input_dim=2, output_dim=2, horizon=10, n_obs_steps=2, cond_dim=5, n_layer=2, n_head=2, n_emb=32,
                p_drop_emb=0.0, p_drop_attn=0.0, causal_attn=True)
    return TransformerForDiffusion(**{**args, **kw}).eval()


TRANSFORMERS = {"decoder": {}, "decoder + encoder": {"n_cond_layers": 1},
                "encoder only": {"cond_dim": 0, "time_as_cond": False}}


def transformer_inputs(model: TransformerForDiffusion, n: int = 3):
    g = torch.Generator().manual_seed(1)
    c = torch.randn(n, 2, 5, generator=g) if model.obs_as_cond else None
    return torch.randn(n, 10, 2, generator=g), torch.tensor([3, 50, 99][:n]), c


# ---- TransformerForDiffusion: no host sync, same outputs --------------------------------------------
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_forward_reads_nothing_on_the_host(name):
    model = transformer(**TRANSFORMERS[name])
    x, t, c = transformer_inputs(model)
    with torch.no_grad(), HostReads() as mode:
        model(x, t, c)
    assert mode.reads == []
    # the counter sees the per-forward causal-mask detection the model now avoids
    with torch.no_grad(), HostReads() as mode:
        layers = model.decoder if model.decoder is not None else model.encoder
        if model.decoder is not None:
            layers(torch.randn(3, 10, 32), torch.randn(3, model.T_cond, 32), tgt_mask=model.mask)
        else:
            layers(torch.randn(3, 11, 32), mask=model.mask)
    assert "__bool__" in mode.reads


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_outputs_are_those_of_the_detected_mask(name):
    model = transformer(**TRANSFORMERS[name])
    x, t, c = transformer_inputs(model)
    with torch.no_grad():
        now = model(x, t, c)
        model.mask_is_causal = None  # None: the layers detect the mask per call, as before
        detected = model(x, t, c)
        model.mask_is_causal = False  # the mask applied as an additive mask, no causal hint
        masked = model(x, t, c)
    assert torch.equal(now, detected)
    torch.testing.assert_close(now, masked, rtol=1e-5, atol=1e-5)


def test_a_loaded_mask_is_checked_once_on_load():
    model = transformer()
    assert model.mask_is_causal and is_causal_mask(model.mask)
    state = model.state_dict()
    state["mask"] = torch.zeros_like(state["mask"])  # attends everywhere: not causal
    model.load_state_dict(state)
    assert model.mask_is_causal is False and model._is_causal() is False
    model.load_state_dict(transformer().state_dict(), assign=True)
    assert model.mask_is_causal is True
    assert transformer(causal_attn=False)._is_causal() is None  # no mask: nothing to detect


# ---- options that cannot go together -----------------------------------------------------------------
def test_cuda_graphs_with_devices_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"cuda_graphs=True cannot be combined with devices=\[\.\.\.\]"):
        check_inference_options(cuda_graphs=True, devices=["cuda:0", "cuda:1"])
    policy = tiny_policy()
    with pytest.raises(ValueError, match="cuda_graphs=True on one device, or devices"):
        policy.set_inference(cuda_graphs=True, devices=["cpu", "cpu"])
    assert policy.inference == {} and policy.runtime.denoiser is None


# ---- the weights' identity -----------------------------------------------------------------------------
def test_weights_identity_changes_with_storage_and_in_place_writes_only():
    model = torch.nn.Linear(3, 2)
    watch = WeightsWatch(model)
    first = weights_identity(list(model.parameters()))
    with torch.no_grad():
        model(torch.randn(4, 3))
    assert not watch.changed() and weights_identity(list(model.parameters())) == first
    with torch.no_grad():
        model.weight.add_(1.0)  # in place: the version counter
    assert watch.changed() and not watch.changed()  # once per change
    model.weight.data = torch.randn(2, 3)  # an EMA-style swap of the storage: the pointer
    assert watch.changed()
    model.load_state_dict({"weight": torch.randn(2, 3), "bias": torch.randn(2)}, assign=True)  # new Parameters
    assert watch.changed()
    model.to(torch.float64)
    assert watch.changed()
    model.to("meta")  # new Parameters, set in the module's table without a registration hook
    assert watch.changed() and watch.device == torch.device("meta")
    assert not watch.changed()


class FakeGraphDenoiser(CudaGraphDenoiser):
    """The graph denoiser's logic with CPU stand-ins for capture and replay (what CUDA does is tested below)."""

    def _capture(self, x, t, c):
        static = (x.clone(), t.clone(), None if c is None else c.clone())
        out = self.fn(*static).clone()
        fn = self.fn

        class Graph:
            def replay(self):
                out.copy_(fn(*static))

        from para_policy.cuda_graphs import _key

        self.graphs[_key(x, c)] = (Graph(), static, out)
        self.captures += 1


def test_graphs_are_captured_up_front_replayed_and_recaptured_when_the_weights_change():
    model = torch.nn.Linear(4, 3)

    def fn(x, t, c):
        return model(torch.cat([x, c[:, None, :1].expand(-1, x.shape[1], 1)], -1))[..., :3]

    example = ((5, 3), torch.randn(1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing lazy here
        graphs = FakeGraphDenoiser(fn, model=model, example=example, capture_rows=5, device="cpu")
        assert graphs.captures == 4 and sorted(k[0] for k in graphs.graphs) == [1, 2, 4, 8]
        x, t, c = torch.randn(3, 5, 3), torch.zeros(3, dtype=torch.long), torch.randn(3, 2)
        torch.testing.assert_close(graphs(x, t, c), fn(x, t, c))
        assert graphs.captures == 4
        model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()}, assign=True)
        torch.testing.assert_close(graphs(x, t, c), fn(x, t, c))  # the new weights, not the freed ones
        assert graphs.captures == 8
    with pytest.warns(UserWarning, match="capturing a CUDA graph on the first call"):
        graphs(torch.randn(16, 5, 3), torch.zeros(16, dtype=torch.long), torch.randn(16, 2))
    assert graphs.captures == 9
    with pytest.warns(UserWarning, match="larger than the largest captured CUDA graph"):
        big = FakeGraphDenoiser(fn, [1, 2], model=model)
        assert big(x, t, c).shape == (3, 5, 3) and big.captures == 0
    model.to("meta")  # the weights left the graphs' device
    with pytest.raises(ValueError, match="moved to meta after its CUDA graphs were captured on cpu"):
        graphs(x, t, c)


def test_power_buckets_cover_the_rows():
    assert power_buckets(1) == [1] and power_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert power_buckets(128)[-1] == 128 and power_buckets(4096)[-1] == 4096


# ---- TF32 -----------------------------------------------------------------------------------------------
def test_exact_fp32_turns_tf32_off_inside_and_restores_the_flags():
    cudnn = torch.backends.cudnn
    before = (cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        with exact_fp32():
            assert not cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
            with exact_fp32():  # nested
                pass
            assert not cudnn.allow_tf32
        assert cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"
        with pytest.raises(RuntimeError), exact_fp32():
            raise RuntimeError("in the denoiser")
        assert cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"
        inside, leave = threading.Event(), threading.Event()

        def other():
            with exact_fp32():
                inside.set()
                leave.wait(5)

        thread = threading.Thread(target=other)
        thread.start()
        inside.wait(5)
        with exact_fp32():
            pass
        assert not cudnn.allow_tf32  # the other thread is still inside
        leave.set()
        thread.join(5)
        assert cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    finally:
        cudnn.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])


# ---- device moves ----------------------------------------------------------------------------------------
def test_a_moved_policy_builds_its_denoiser_again_or_refuses_naming_why():
    pytest.importorskip("onnxruntime")
    policy = tiny_policy()
    policy.set_inference(backend="onnxruntime")
    with pytest.warns(UserWarning, match="policy moved from cpu .* to cpu .*float64.*backend='onnxruntime'"):
        policy.to(torch.float64)
    x = torch.randn(2, 8, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot run: backend='onnxruntime' runs float32 models only"):
        policy.denoise(x, torch.zeros(2, dtype=torch.long), torch.randn(2, OBS_DIM * TO, dtype=torch.float64))
    policy.set_inference(backend="eager")
    policy.to(torch.float32)
    assert policy.runtime.denoiser is None  # plain model again


def test_noise_and_the_controller_generator_follow_the_generator_and_the_policy():
    g = torch.Generator().manual_seed(0)
    assert noise_device(g, "cuda:0") == torch.device("cpu")  # drawn where the generator is, then moved
    assert noise_device(None, "cuda:0") == torch.device("cuda:0") and noise_device(g, "cpu") == torch.device("cpu")
    assert generator_on(g, "cpu") is g
    assert device_label("cpu") == "cpu"


# ---- on a GPU ----------------------------------------------------------------------------------------------
@CUDA
def test_cuda_transformer_forward_never_syncs_and_captures():
    model = transformer().cuda()
    x, t, c = (v.cuda() for v in transformer_inputs(model))
    with torch.no_grad():
        ref = model(x, t, c)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x, t, c)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    graphs = CudaGraphDenoiser(lambda a, b, d: model(a, b, d), model=model, example=((10, 2), c[:1]),
                               capture_rows=4)
    torch.testing.assert_close(graphs(x, t, c), ref, rtol=1e-4, atol=1e-4)


@CUDA
def test_cuda_graph_policy_captures_up_front_and_follows_weights_and_threads():
    policy = tiny_policy().cuda()
    policy.set_inference(cuda_graphs=True)
    graphs = policy.runtime.denoiser
    assert isinstance(graphs, CudaGraphDenoiser) and graphs.captures > 0
    captured = graphs.captures
    obs = {"obs": torch.randn(1, TO, OBS_DIM, device="cuda")}
    g = torch.Generator(device="cuda").manual_seed(0)
    done = []

    def worker():
        done.append(policy.predict_action(obs, generator=g, sampler="paradigms", window=16)["action"])

    thread = threading.Thread(target=worker)
    thread.start()
    while thread.is_alive():  # the main thread allocates meanwhile (act() does)
        torch.randn(64, 64, device="cuda") @ torch.randn(64, 64, device="cuda")
    thread.join()
    assert done and graphs.captures == captured  # nothing captured lazily by the worker
    x, t = torch.randn(3, 8, 2, device="cuda"), torch.randint(0, 100, (3,), device="cuda")
    c = torch.randn(3, OBS_DIM * TO, device="cuda")
    state = {k: torch.randn_like(v) for k, v in policy.model.state_dict().items()}
    policy.model.load_state_dict(state, assign=True)
    with torch.inference_mode(), exact_fp32():
        torch.testing.assert_close(policy.denoise(x, t, c), policy.model(x, t, global_cond=c), rtol=1e-4, atol=1e-4)


@CUDA
def test_cuda_settings_made_on_the_cpu_follow_a_move_to_the_gpu():
    policy = tiny_policy()
    with pytest.warns(UserWarning, match="cuda_graphs needs a CUDA device"):
        policy.set_inference(cuda_graphs=True)
    policy.cuda()
    assert isinstance(policy.runtime.denoiser, CudaGraphDenoiser)
    from para_policy import Controller

    cpu_policy = tiny_policy()
    controller = Controller(cpu_policy, sampler="sequential", seed=0)
    cpu_policy.cuda()
    controller.predict_chunk(torch.zeros(TO, OBS_DIM))
    assert controller.generator.device.type == "cuda"


@CUDA
def test_cuda_noise_from_a_cpu_generator_and_exact_fp32_tolerance_zero():
    from para_policy.samplers import draw_noise

    policy = tiny_policy().cuda()
    schedule = policy.schedule_for(policy.sampler)
    x_T, noise = draw_noise(schedule, (2, 8, 2), torch.Generator().manual_seed(0), device="cuda")
    cpu = draw_noise(schedule, (2, 8, 2), torch.Generator().manual_seed(0))
    assert x_T.device.type == "cuda" and torch.equal(x_T.cpu(), cpu[0]) and torch.equal(noise.cpu(), cpu[1])
    seen = []
    policy.set_inference(precision="fp32")
    inner = policy.runtime.denoiser.fn
    policy.runtime.denoiser.fn = lambda *a: (seen.append(torch.backends.cudnn.allow_tf32), inner(*a))[1]
    obs = {"obs": torch.randn(2, TO, OBS_DIM, device="cuda")}
    seq = policy.predict_action(obs, x_T=x_T, noise=noise, sampler="sequential")["action"]
    par = policy.predict_action(obs, x_T=x_T, noise=noise, sampler="paradigms", window=16, tolerance=0.0)["action"]
    assert seen and not any(seen) and torch.backends.cudnn.allow_tf32
    torch.testing.assert_close(par, seq, rtol=0, atol=1e-3)  # pixels: float32 rounding of a few hundred px


@CUDA
def test_cuda_window_key_names_the_gpu():
    assert torch.cuda.get_device_name(0) in device_label("cuda:0")
