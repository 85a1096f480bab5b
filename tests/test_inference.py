"""Inference options of the denoiser (para_policy.inference): bf16, torch.compile, CUDA-graph fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_policy import OBS_DIM, TO, tiny_policy

from para_policy.inference import bucket_for, configure_inference, make_denoiser, pad_rows


def call(policy, x, t, cond):
    with torch.inference_mode():
        return policy.denoise(x, t, cond)


def inputs(n: int = 5):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 8, 2, generator=g), torch.randint(0, 100, (n,), generator=g),
            torch.randn(n, OBS_DIM * TO, generator=g))


def test_bf16_changes_outputs_by_rounding_only():
    policy = tiny_policy()
    x, t, c = inputs()
    ref = call(policy, x, t, c)
    configure_inference(policy, precision="bf16")
    low = call(policy, x, t, c)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    err = (low - ref).abs().max().item()
    assert 0 < err < 0.05 * ref.abs().max().item()  # rounded, not another function
    configure_inference(policy)  # defaults restore the plain method
    assert torch.equal(call(policy, x, t, c), ref)


def test_compiled_denoiser_gives_the_eager_outputs_for_any_row_count():
    policy = tiny_policy()
    configure_inference(policy, compile=True)
    for n in (3, 7):  # dynamic shapes: a second row count runs without error
        x, t, c = inputs(n)
        eager = policy.model(x, t, global_cond=c)
        assert torch.allclose(call(policy, x, t, c), eager, atol=1e-4)


def test_cuda_graphs_fall_back_to_eager_on_cpu_with_a_warning():
    policy = tiny_policy()
    x, t, c = inputs()
    ref = call(policy, x, t, c)
    with pytest.warns(UserWarning, match="cuda_graphs needs a CUDA device"):
        configure_inference(policy, cuda_graphs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(call(policy, x, t, c), ref)


def test_buckets_and_padding_keep_rows_independent():
    assert [bucket_for(n, [1, 2, 4, 8]) for n in (1, 3, 4, 5, 9)] == [1, 4, 4, 8, 9]
    policy = tiny_policy()
    x, t, c = inputs(5)
    padded = policy.model(pad_rows(x, 8), pad_rows(t, 8), global_cond=pad_rows(c, 8))
    assert torch.allclose(padded[:5], policy.model(x, t, global_cond=c), atol=1e-5)
    assert torch.equal(pad_rows(x, 8)[5:], x[-1:].expand(3, -1, -1))


def test_bad_inference_options_are_named():
    policy = tiny_policy()
    with pytest.raises(ValueError, match="precision must be one of"):
        configure_inference(policy, precision="fp8")
    with pytest.raises(ValueError, match="compile must be"):
        make_denoiser(policy.model, compile=3)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        configure_inference(policy, cuda_graphs="yes")
